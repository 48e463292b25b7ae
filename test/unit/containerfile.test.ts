// charts/image/Containerfile against the checkout. Every COPY source must exist where the build finds
// it. Every file the agent opens relative to its installation must reach the image in the same
// layout. Every shared library the native code needs must come from a package the image installs.
// Needs `make build` first (native/libagent.so, the CNI plugin and dist/ must exist), and dpkg and
// ldd, as on the Debian machines the project builds on.

import test from "ava";
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { REPO_ROOT } from "../harness/agent-process";
import { parseContainerfile, type CopyInstruction, type Stage } from "../harness/containerfile";

const CONTAINERFILE = path.join(REPO_ROOT, "charts", "image", "Containerfile");
const stages = parseContainerfile(fs.readFileSync(CONTAINERFILE, "utf8"));
const buildStage = stageNamed("build");
const runtimeStage = stages.at(-1)!;

function stageNamed(name: string): Stage {
  const stage = stages.find((candidate) => candidate.name === name);
  if (stage === undefined) throw new Error(`${CONTAINERFILE} has no stage named ${name}`);
  return stage;
}

function run(command: string, args: string[]): { code: number; stdout: string; stderr: string } {
  const result = spawnSync(command, args, { cwd: REPO_ROOT, encoding: "utf8" });
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
const runtimeCopies = runtimeStage.copies.flatMap((copy) => copy.sources.map((source) => ({ copy, relative: checkoutPathOf(copy, source) })));

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
  const listed = run("npm", ["ls", "--omit=dev", "--all", "--parseable"]);
  const packageDirs = listed.stdout.split("\n").filter((dir) => dir.startsWith(path.join(REPO_ROOT, "node_modules")));
  const addons = packageDirs.flatMap((dir) =>
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
