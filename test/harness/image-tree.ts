// Assembles the files that a Containerfile stage copies from the build stage, taken from a checkout
// after `make build`, in a folder that is the image's root. Files are hard links: the runtime
// stage's 7,400 files take 0.7 to 1 s on a 2-vCPU Debian 12 machine (containerfile.test.ts logs
// the time). node_modules keeps only what `npm prune --omit=dev` leaves in the build stage: the
// packages that `npm ls --omit=dev` lists.

import { spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { copiedPath, type CopyInstruction } from "./containerfile";

/** One source of a COPY instruction and the checkout path that it copies. */
export interface CheckoutCopy {
  copy: CopyInstruction;
  /** The source as the instruction writes it. */
  source: string;
  /** The same path relative to the checkout. */
  relative: string;
}

/** Returns the folders of the production packages in `checkout`/node_modules, from `npm ls --omit=dev`. */
export function productionPackageDirs(checkout: string): string[] {
  const result = spawnSync("npm", ["ls", "--omit=dev", "--all", "--parseable"], { cwd: checkout, encoding: "utf8" });
  if (result.error !== undefined) throw new Error(`running npm ls in ${checkout} failed: ${result.error.message}`);
  const modules = path.join(checkout, "node_modules") + path.sep;
  const dirs = result.stdout.split("\n").filter((dir) => dir.startsWith(modules));
  if (dirs.length === 0) throw new Error(`npm ls --omit=dev lists no package under ${modules}: run \`make build\` first (${result.stderr.trim()})`);
  return dirs;
}

/** Which checkout paths `npm prune --omit=dev` keeps: everything outside node_modules, and the production packages in it. */
export class ProductionFilter {
  readonly #packages: Set<string>;
  /** Folders that lead to a production package: node_modules, @scope folders, a package's own node_modules. */
  readonly #ancestors = new Set<string>();

  constructor(packageDirs: string[]) {
    this.#packages = new Set(packageDirs);
    for (const dir of packageDirs) {
      for (let parent = path.dirname(dir); parent !== path.dirname(parent) && !this.#ancestors.has(parent); parent = path.dirname(parent)) {
        this.#ancestors.add(parent);
      }
    }
  }

  /** Returns whether the build stage keeps `absolute`, a file or folder of the checkout. */
  keeps(absolute: string, isDirectory: boolean): boolean {
    if (!absolute.split(path.sep).includes("node_modules")) return true;
    if (isDirectory && this.#ancestors.has(absolute)) return true;
    // The nearest package folder above decides. A node_modules folder reached first means that the
    // path belongs to no production package, because it is a development one or npm's own file.
    for (let dir = absolute; dir !== path.dirname(dir); dir = path.dirname(dir)) {
      if (this.#packages.has(dir)) return true;
      if (path.basename(dir) === "node_modules") return false;
    }
    return false;
  }
}

/**
 * Hard-links into `imageRoot` every checkout file that `copies` put into the image, at its path in
 * the image, and returns the number of files. Symbolic links are recreated with the same target.
 */
export function linkCopies(checkout: string, copies: CheckoutCopy[], imageRoot: string, filter: ProductionFilter): number {
  let files = 0;
  const place = (from: string, to: string, entry: fs.Dirent | fs.Stats): void => {
    fs.mkdirSync(path.dirname(to), { recursive: true });
    try {
      link(from, to, entry);
    } catch (error) {
      // A later COPY replaces what an earlier one put at the same path.
      if ((error as NodeJS.ErrnoException).code !== "EEXIST") throw error;
      fs.rmSync(to);
      link(from, to, entry);
    }
    files += 1;
  };

  for (const { copy, source, relative } of copies) {
    const top = path.join(checkout, relative);
    const stat = fs.lstatSync(top);
    if (!stat.isDirectory()) {
      place(top, path.join(imageRoot, copiedPath(copy, source, false, "")), stat);
      continue;
    }
    const pending = [top];
    for (let dir = pending.pop(); dir !== undefined; dir = pending.pop()) {
      for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
        const from = path.join(dir, entry.name);
        if (!filter.keeps(from, entry.isDirectory())) continue;
        if (entry.isDirectory()) pending.push(from);
        else place(from, path.join(imageRoot, copiedPath(copy, source, true, path.relative(top, from))), entry);
      }
    }
  }
  return files;
}

function link(from: string, to: string, entry: fs.Dirent | fs.Stats): void {
  if (entry.isSymbolicLink()) fs.symlinkSync(fs.readlinkSync(from), to);
  else fs.linkSync(from, to);
}
