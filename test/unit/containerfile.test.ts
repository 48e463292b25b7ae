// charts/image/Containerfile against the checkout. Every COPY source must exist where the build finds
// it, and the build stage must receive every file that `make compile` reads. Every file the agent
// opens relative to its installation must reach the image in the same layout. The runtime stage's
// files, linked into a scratch folder, must load every module the agent requires. Every shared
// library the native code needs must come from a package the image installs.
// Needs `make build` first (native/libagent.so, the CNI plugin and dist/ must exist), and dpkg and
// ldd, as on the Debian machines the project builds on.

import test from "ava";
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import { isBuiltin } from "node:module";
import os from "node:os";
import path from "node:path";
import { performance } from "node:perf_hooks";
import { REPO_ROOT } from "../harness/agent-process";
import { copiedPath, parseContainerfile, type CopyInstruction, type Stage } from "../harness/containerfile";
import { linkCopies, productionPackageDirs, ProductionFilter, type CheckoutCopy } from "../harness/image-tree";

const CONTAINERFILE = path.join(REPO_ROOT, "charts", "image", "Containerfile");
const stages = parseContainerfile(fs.readFileSync(CONTAINERFILE, "utf8"));
const buildStage = stageNamed("build");
const runtimeStage = stages.at(-1)!;

function stageNamed(name: string): Stage {
  const stage = stages.find((candidate) => candidate.name === name);
  if (stage === undefined) throw new Error(`${CONTAINERFILE} has no stage named ${name}`);
  return stage;
}

function run(command: string, args: string[], options: { cwd?: string; env?: NodeJS.ProcessEnv } = {}): { code: number; stdout: string; stderr: string } {
  const result = spawnSync(command, args, { cwd: options.cwd ?? REPO_ROOT, env: options.env, encoding: "utf8", timeout: 60_000 });
  if (result.error !== undefined) throw new Error(`running ${command} failed: ${result.error.message}`);
  return { code: result.status ?? -1, stdout: result.stdout, stderr: result.stderr };
}

/** Fails the file at once when `make build` has not run, naming what is missing. */
function requireBuilt(relative: string): void {
  if (!fs.existsSync(path.join(REPO_ROOT, relative))) throw new Error(`${relative} is missing: run \`make build\` before this test`);
}

/** Maps a COPY --from=build source to its path in the checkout, which the build stage's WORKDIR stands for. */
function checkoutPathOf(copy: CopyInstruction, source: string): string {
  const absolute = path.posix.resolve(buildStage.workdir, source);
  const relative = path.posix.relative(buildStage.workdir, absolute);
  if (relative.startsWith("..")) throw new Error(`Containerfile line ${copy.line}: ${source} is outside the build stage's WORKDIR ${buildStage.workdir}`);
  return relative === "" ? "." : relative;
}

/** The runtime stage's copies from the build stage, as checkout paths. */
const runtimeCopies: CheckoutCopy[] = runtimeStage.copies.flatMap((copy) => copy.sources.map((source) => ({ copy, source, relative: checkoutPathOf(copy, source) })));

function copiedIntoImage(relative: string): boolean {
  return runtimeCopies.some((entry) => relative === entry.relative || relative.startsWith(`${entry.relative}/`));
}

test("stages use Node.js of package.json's engines", (t) => {
  const engines = (JSON.parse(fs.readFileSync(path.join(REPO_ROOT, "package.json"), "utf8")) as { engines: { node: string } }).engines.node;
  const major = /^>=(\d+)\b/.exec(engines)?.[1];
  t.truthy(major, `package.json engines.node "${engines}" has no >=MAJOR`);
  t.is(buildStage.image, `node:${major}-bookworm`);
  t.is(runtimeStage.image, `node:${major}-bookworm-slim`);
});

test("build stage copies committed checkout files", (t) => {
  const contextCopies = buildStage.copies.filter((copy) => copy.from === undefined);
  t.true(contextCopies.length > 0);
  for (const copy of contextCopies) {
    for (const source of copy.sources) {
      t.true(fs.existsSync(path.join(REPO_ROOT, source)), `Containerfile line ${copy.line}: ${source} does not exist in the checkout`);
      // `make image` sends `git archive HEAD`, which has no ignored file.
      const ignored = run("git", ["check-ignore", "-q", source]).code === 0;
      t.false(ignored, `Containerfile line ${copy.line}: ${source} is ignored by git, so \`make image\` does not send it`);
    }
  }
});

/** A target of make's database: its prerequisites and whether a rule gives it a recipe. */
interface MakeTarget {
  prerequisites: string[];
  recipe: boolean;
}

/** Reads the targets of make's database for the checkout's Makefile (`make -p`) and the phony ones. */
function makeDatabase(): { targets: Map<string, MakeTarget>; phony: Set<string> } {
  // -q runs no recipe. Its exit status only reports whether compile is up to date, so it is ignored.
  const { stdout } = run("make", ["-p", "-q", "compile"]);
  const targets = new Map<string, MakeTarget>();
  for (const block of stdout.split("\n\n")) {
    const lines = block.split("\n").filter((line) => !line.startsWith("#"));
    const match = /^([^\s:=%][^:=%]*?):{1,2}(?!=)(.*)$/.exec(lines[0] ?? "");
    if (match === null || targets.has(match[1])) continue;
    // Prerequisites after "|" are order-only, and make needs them as well.
    const prerequisites = match[2].split(/\s+/).filter((word) => word !== "" && word !== "|");
    targets.set(match[1], { prerequisites, recipe: lines.some((line) => line.startsWith("\t")) });
  }
  const phony = new Set(targets.get(".PHONY")?.prerequisites ?? []);
  return { targets, phony };
}

/**
 * Walks the prerequisites of `make compile`. Returns its inputs (files no rule makes) and its
 * products (the files of the rules with a recipe), as checkout paths.
 */
function compileGraph(): { inputs: string[]; products: string[] } {
  const { targets, phony } = makeDatabase();
  if (!targets.has("compile")) throw new Error("make -p shows no compile target in the Makefile");
  const inputs = new Set<string>();
  const products = new Set<string>();
  const pending = ["compile"];
  for (let name = pending.pop(); name !== undefined; name = pending.pop()) {
    const target = targets.get(name);
    if (target !== undefined && (target.recipe || phony.has(name))) {
      if (!phony.has(name)) products.add(name);
      pending.push(...target.prerequisites.filter((prerequisite) => !inputs.has(prerequisite) && !products.has(prerequisite)));
    } else {
      inputs.add(name);
    }
  }
  return { inputs: [...inputs], products: [...products] };
}

/** Lists the files at `relative` in the checkout: itself, or every file under it. */
function filesAt(relative: string): string[] {
  const absolute = path.join(REPO_ROOT, relative);
  if (!fs.statSync(absolute).isDirectory()) return [relative];
  return fs
    .readdirSync(absolute, { recursive: true, withFileTypes: true })
    .filter((entry) => !entry.isDirectory())
    .map((entry) => path.relative(REPO_ROOT, path.join(entry.parentPath, entry.name)));
}

/** Returns whether a COPY of the build context before `beforeLine` puts the checkout file `relative` at the same path under the WORKDIR. */
function receivedBefore(relative: string, beforeLine: number): boolean {
  const expectedPath = path.posix.join(buildStage.workdir, relative);
  return buildStage.copies.some(
    (copy) =>
      copy.from === undefined &&
      copy.line < beforeLine &&
      copy.sources.some((source) => {
        const normalized = path.posix.normalize(source).replace(/\/$/, "");
        if (relative === normalized) return copiedPath(copy, source, false, "") === expectedPath;
        const inner = path.posix.relative(normalized, relative);
        if (inner.startsWith("..")) return false;
        return copiedPath(copy, source, true, inner) === expectedPath;
      }),
  );
}

function runLine(pattern: RegExp, description: string): number {
  const found = buildStage.runs.find((instruction) => pattern.test(instruction.command));
  if (found === undefined) throw new Error(`the build stage has no RUN that ${description}`);
  return found.line;
}

test("build stage receives compile's inputs", (t) => {
  const makeLine = runLine(/\bmake\b[^&;|]*\bcompile\b/, "runs `make compile`");
  const npmLine = runLine(/\bnpm ci\b/, "runs `npm ci`");
  const { inputs, products } = compileGraph();
  // Guards the reading of make's database: these must be among the inputs.
  for (const expected of ["tsconfig.json", "package.json", "native/libagent.h", "agent/cli/ambient-agent.ts"]) t.true(inputs.includes(expected), `make compile has no input ${expected}`);

  // The prerequisites under test/ only build dist/test, which the runtime stage does not copy.
  t.false(copiedIntoImage("dist/test"));
  const needed = ["Makefile", ...inputs.filter((input) => !input.startsWith("test/"))];
  for (const input of needed) t.true(receivedBefore(input, makeLine), `make compile reads ${input}, which no COPY before Containerfile line ${makeLine} puts at ${buildStage.workdir}/${input}`);
  for (const input of ["package.json", "package-lock.json"]) t.true(receivedBefore(input, npmLine), `npm ci reads ${input}, which no COPY before Containerfile line ${npmLine} puts at ${buildStage.workdir}/${input}`);

  // What the runtime stage takes from the build stage and no build step makes (the eBPF object,
  // the protocol files) must come from the build context.
  const outDir = (JSON.parse(fs.readFileSync(path.join(REPO_ROOT, "tsconfig.json"), "utf8")) as { compilerOptions: { outDir: string } }).compilerOptions.outDir;
  // tsc writes under outDir, and npm ci writes node_modules.
  const builtPaths = [...products, path.posix.normalize(outDir), "node_modules"];
  const isBuilt = (relative: string): boolean => builtPaths.some((built) => relative === built || relative.startsWith(`${built}/`));
  const unbuiltFiles = runtimeCopies.filter(({ relative }) => !isBuilt(relative)).flatMap(({ relative }) => filesAt(relative));
  t.true(unbuiltFiles.includes("bpf/capture.bpf.o"), `the runtime stage takes no prebuilt bpf/capture.bpf.o from the build stage: ${unbuiltFiles.join(", ")}`);
  for (const file of unbuiltFiles) t.true(receivedBefore(file, Infinity), `the runtime stage copies ${file} from the build stage, where no COPY puts it`);
});

test("runtime copies exist after the build", (t) => {
  requireBuilt("native/libagent.so");
  t.true(runtimeCopies.length > 0);
  for (const { copy, relative } of runtimeCopies) {
    t.is(copy.from, "build", `Containerfile line ${copy.line}: the runtime stage copies from the build stage only`);
    t.true(fs.existsSync(path.join(REPO_ROOT, relative)), `Containerfile line ${copy.line}: ${relative} does not exist after \`make build\``);
  }
});

test("runtime copies keep the checkout layout", (t) => {
  // The agent finds its files relative to its own scripts, so each one must sit where it sits in the checkout.
  for (const { copy, relative } of runtimeCopies) {
    t.is(copy.absoluteDestination, path.posix.join(runtimeStage.workdir, relative), `Containerfile line ${copy.line}`);
  }
});

/** A path the agent computes from __dirname: `path.resolve(__dirname, "..", "bpf", ...)` and the like. */
interface InstallationPath {
  source: string;
  /** The path relative to the installation root when the compiled file runs from dist/. */
  relative: string;
}

function installationPaths(): InstallationPath[] {
  const found: InstallationPath[] = [];
  const call = /path\.(?:resolve|join)\(\s*__dirname\s*((?:,\s*"[^"]*"\s*)+),?\s*\)/g;
  for (const file of fs.readdirSync(path.join(REPO_ROOT, "agent"), { recursive: true, encoding: "utf8" })) {
    if (!file.endsWith(".ts")) continue;
    const text = fs.readFileSync(path.join(REPO_ROOT, "agent", file), "utf8");
    const runtimeDir = path.posix.join("dist", "agent", path.posix.dirname(file));
    for (const match of text.matchAll(call)) {
      const segments = [...match[1].matchAll(/"([^"]*)"/g)].map((segment) => segment[1]);
      found.push({ source: `agent/${file}`, relative: path.posix.join(runtimeDir, ...segments) });
    }
  }
  return found;
}

test("files opened relative to the installation are copied", (t) => {
  requireBuilt("dist/agent/cli/ambient-agent.js");
  const paths = installationPaths();
  // Files the agent is known to open this way; the list guards the search pattern itself.
  for (const expected of ["bpf/capture.bpf.o", "native/libagent.so", "native/cni/ambient-agent-cni", "agent/identity/proto/ca.proto", "agent/audit/proto", "package.json"]) {
    t.true(paths.some((entry) => entry.relative === expected), `no path.resolve(__dirname, ...) in agent/ resolves to ${expected}`);
  }
  // Some files try several places, one for the sources and one for dist/: those that share a file
  // name within one source file are one group, and at least one of each group must exist.
  const groups = new Map<string, InstallationPath[]>();
  for (const entry of paths) {
    const key = `${entry.source} ${path.posix.basename(entry.relative)}`;
    groups.set(key, [...(groups.get(key) ?? []), entry]);
  }
  for (const [key, members] of groups) {
    const existing = members.filter((member) => fs.existsSync(path.join(REPO_ROOT, member.relative)));
    t.true(existing.length > 0, `${key}: none of ${members.map((member) => member.relative).join(", ")} exists after \`make build\``);
    for (const member of existing) {
      t.true(copiedIntoImage(member.relative), `${member.source} opens ${member.relative}, which no COPY of the runtime stage brings into the image`);
    }
  }
});

/**
 * Requires each [file, specifier] pair of argv[1] (JSON) from its file, as that file's own require
 * does, and writes [file, specifier, error message or null] triples to stdout as JSON. A required
 * package may keep timers or handles open, so the script exits as soon as it has written.
 */
const REQUIRE_EACH = `
const fs = require("node:fs");
const { createRequire } = require("node:module");
const results = JSON.parse(process.argv[1]).map(([from, specifier]) => {
  try {
    createRequire(from)(specifier);
    return [from, specifier, null];
  } catch (error) {
    return [from, specifier, String(error.message).split("\\n")[0]];
  }
});
fs.writeSync(1, JSON.stringify(results));
process.exit(0);
`;

/** Returns the JavaScript files of the tree outside node_modules: the agent's own. */
function agentScripts(imageRoot: string): string[] {
  return fs
    .readdirSync(imageRoot, { recursive: true, withFileTypes: true })
    .map((entry) => path.join(entry.parentPath, entry.name))
    .filter((file) => file.endsWith(".js") && !path.relative(imageRoot, file).split(path.sep).includes("node_modules"));
}

/** Returns the package specifiers (not node: built-ins, not relative paths) that a compiled file passes to require(). */
function requiredPackages(file: string): string[] {
  const text = fs.readFileSync(file, "utf8");
  return [...new Set([...text.matchAll(/\brequire\("([^"]+)"\)/g)].map((match) => match[1]))].filter(
    (specifier) => !specifier.startsWith(".") && !specifier.startsWith("/") && !isBuiltin(specifier),
  );
}

/** Throws when a node_modules folder outside the tree, which Node.js would search too, could hide a missing module. */
function assertNoOuterModules(scratch: string): void {
  const outer = [path.resolve(process.execPath, "..", "..", "lib", "node")];
  for (let dir = scratch; ; dir = path.dirname(dir)) {
    outer.push(path.join(dir, "node_modules"));
    if (dir === path.dirname(dir)) break;
  }
  const present = outer.filter((folder) => fs.existsSync(folder));
  if (present.length > 0) throw new Error(`${present.join(", ")} would serve modules the image tree lacks: remove it, or set TMPDIR to a folder outside it`);
}

test("runtime files load every dependency", (t) => {
  requireBuilt("dist/agent/cli/ambient-agent.js");
  const scratch = fs.mkdtempSync(path.join(os.tmpdir(), "aa-image-tree-"));
  t.teardown(() => fs.rmSync(scratch, { recursive: true, force: true }));
  assertNoOuterModules(scratch);
  const imageRoot = path.join(scratch, "root");
  const home = path.join(scratch, "home");
  const cwd = path.join(scratch, "cwd");
  fs.mkdirSync(home);
  fs.mkdirSync(cwd);

  const started = performance.now();
  const files = linkCopies(REPO_ROOT, runtimeCopies, imageRoot, new ProductionFilter(productionPackageDirs(REPO_ROOT)));
  t.log(`linked ${files} files of the runtime stage in ${Math.round(performance.now() - started)} ms`);
  // No NODE_PATH, and a HOME with no .node_modules: only the tree's own node_modules serves packages.
  const env = { PATH: process.env.PATH, HOME: home, NODE_PATH: "" };
  const inTree = (imagePath: string): string => path.join(imageRoot, imagePath);

  // The commands on PATH, run as the image runs them, with only the modules their start loads.
  t.true(runtimeStage.symlinks.length > 0, "the runtime stage links no command");
  for (const { target, link } of runtimeStage.symlinks) {
    const help = run(process.execPath, [inTree(target), "--help"], { cwd, env });
    const failure = help.stderr.split("\n").find((line) => /\bError\b/.test(line)) ?? help.stderr.trim();
    t.is(help.code, 0, `${link} --help in the runtime files: ${failure}`);
    t.regex(help.stdout, /^usage: /, `${link} --help`);
  }

  // Every package the agent requires, from the file that requires it, even where it is required
  // only on some path, and every production dependency of package.json with what it loads.
  const manifest = JSON.parse(fs.readFileSync(path.join(REPO_ROOT, "package.json"), "utf8")) as { dependencies: Record<string, string> };
  const fromWorkdir = path.join(inTree(runtimeStage.workdir), "package.json");
  const pairs = [
    ...agentScripts(imageRoot).flatMap((file) => requiredPackages(file).map((specifier) => [file, specifier])),
    ...Object.keys(manifest.dependencies).map((name) => [fromWorkdir, name]),
  ];
  t.true(pairs.some(([, specifier]) => specifier === "@kubernetes/client-node"), "no compiled file of the tree requires @kubernetes/client-node");
  const loadStarted = performance.now();
  const loaded = run(process.execPath, ["-e", REQUIRE_EACH, JSON.stringify(pairs)], { cwd, env });
  t.log(`required ${pairs.length} packages in ${Math.round(performance.now() - loadStarted)} ms`);
  t.is(loaded.code, 0, loaded.stderr);
  for (const [from, specifier, error] of JSON.parse(loaded.stdout) as [string, string, string | null][]) {
    t.is(error, null, `${path.relative(imageRoot, from)} requires ${specifier}`);
  }
});

/** Returns the paths of the shared libraries that `file` needs, from ldd. Throws on a library ldd cannot find. */
function sharedLibraries(file: string): string[] {
  const result = run("ldd", [file]);
  if (result.code !== 0) throw new Error(`ldd ${file} failed: ${result.stderr || result.stdout}`);
  return result.stdout
    .split("\n")
    .map((line) => line.trim())
    .filter((line) => line !== "" && !line.startsWith("linux-vdso"))
    .map((line) => {
      if (line.includes("not found")) throw new Error(`${file} needs ${line}: install the library's -dev package and rebuild`);
      const match = /=>\s*(\S+)/.exec(line) ?? /^(\/\S+)/.exec(line);
      if (match === null) throw new Error(`unreadable ldd line for ${file}: ${line}`);
      return match[1];
    });
}

/**
 * Returns the Debian package that owns `file`. Debian 12 has merged /usr, so dpkg may have
 * registered the file under /lib or /usr/lib, by its link name or by its real name.
 */
function owningPackage(file: string): string {
  const names = [...new Set([file, fs.realpathSync(file)])];
  const candidates = names.flatMap((name) => [name, name.startsWith("/usr/") ? name.slice(4) : `/usr${name}`]);
  for (const candidate of candidates) {
    const result = run("dpkg", ["-S", candidate]);
    const line = result.stdout.split("\n").find((entry) => entry !== "" && !entry.startsWith("diversion"));
    if (result.code === 0 && line !== undefined) return line.slice(0, line.indexOf(":"));
  }
  throw new Error(`no Debian package owns ${file} (tried ${candidates.join(", ")})`);
}

/**
 * Packages that node:*-bookworm-slim has without the runtime stage's apt-get: those of the
 * libraries Node.js itself links (libc6, libstdc++6, libgcc-s1), which the image's node binary
 * needs as this machine's does.
 */
function baseImagePackages(): Set<string> {
  return new Set(sharedLibraries(process.execPath).map(owningPackage));
}

function assertLibrariesInstalled(t: { true(value: boolean, message: string): void }, file: string, libraries: string[]): void {
  const installed = new Set([...runtimeStage.aptPackages, ...baseImagePackages()]);
  for (const library of libraries) {
    const owner = owningPackage(library);
    t.true(installed.has(owner), `${file} needs ${library} from package ${owner}, which the runtime stage does not install (it installs ${runtimeStage.aptPackages.join(", ")})`);
  }
}

test("libagent's libraries are installed", (t) => {
  requireBuilt("native/libagent.so");
  const libraries = sharedLibraries(path.join(REPO_ROOT, "native", "libagent.so"));
  t.true(libraries.some((library) => path.basename(library).startsWith("libbpf.so")), `ldd lists no libbpf: ${libraries.join(", ")}`);
  assertLibrariesInstalled(t, "native/libagent.so", libraries);
});

/** Returns the paths of the libraries native/*.c opens with dlopen by a literal name, resolved with ldconfig. */
function dlopenedLibraries(): string[] {
  const nativeDir = path.join(REPO_ROOT, "native");
  const names = new Set<string>();
  for (const file of fs.readdirSync(nativeDir).filter((name) => name.endsWith(".c"))) {
    const text = fs.readFileSync(path.join(nativeDir, file), "utf8");
    for (const match of text.matchAll(/"(lib[A-Za-z0-9_+-]+\.so(?:\.\d+)*)"/g)) names.add(match[1]);
  }
  const cache = run("ldconfig", ["-p"]).stdout;
  return [...names].map((name) => {
    const match = new RegExp(`^\\s*${name.replace(/[.+]/g, "\\$&")} \\([^)]*x86-64[^)]*\\) => (\\S+)$`, "m").exec(cache);
    if (match === null) throw new Error(`${name}, which native/ opens with dlopen, is not installed here: install its Debian package to run this check`);
    return match[1];
  });
}

test("dlopen'd libraries are installed", (t) => {
  const libraries = dlopenedLibraries();
  t.true(libraries.some((library) => path.basename(library).startsWith("libnftables.so")), `native/ opens no libnftables: ${libraries.join(", ")}`);
  assertLibrariesInstalled(t, "native/ (dlopen)", libraries);
});

test("Node addons' libraries are installed", (t) => {
  // Only production dependencies reach the image (npm prune --omit=dev).
  const addons = productionPackageDirs(REPO_ROOT).flatMap((dir) =>
    fs.readdirSync(dir, { recursive: true, encoding: "utf8" }).filter((file) => file.endsWith(".node")).map((file) => path.join(dir, file)),
  );
  t.true(addons.some((addon) => addon.includes("ffi-rs")), `no ffi-rs addon among the production dependencies: ${addons.join(", ")}`);
  for (const addon of addons) assertLibrariesInstalled(t, path.relative(REPO_ROOT, addon), sharedLibraries(addon));
});

test("CNI plugin is statically linked", (t) => {
  // The container runtime runs the plugin on the host, where the image's libraries are not.
  requireBuilt("native/cni/ambient-agent-cni");
  const result = run("ldd", [path.join(REPO_ROOT, "native", "cni", "ambient-agent-cni")]);
  t.regex(result.stdout + result.stderr, /not a dynamic executable|statically linked/);
});

test("entrypoint and commands on PATH", (t) => {
  t.deepEqual(runtimeStage.entrypoint, ["ambient-agent"]);
  for (const command of ["ambient-agent", "agentctl"]) {
    const symlink = runtimeStage.symlinks.find((candidate) => candidate.link === `/usr/local/bin/${command}`);
    t.truthy(symlink, `the runtime stage links no /usr/local/bin/${command}`);
    if (symlink === undefined) continue;
    const relative = path.posix.relative(runtimeStage.workdir, symlink.target);
    t.is(relative, `dist/agent/cli/${command}.js`);
    t.true(copiedIntoImage(relative), `${symlink.target} is not copied into the image`);
    const mode = fs.statSync(path.join(REPO_ROOT, relative)).mode;
    t.true((mode & 0o111) !== 0, `${relative} is not executable; \`make compile\` sets the mode that COPY keeps`);
  }
});
