// Reads a Containerfile into its stages: base image, WORKDIR, COPY and RUN instructions, packages
// installed with apt-get, symlinks and ENTRYPOINT. Only the forms charts/image/Containerfile uses are read.

import path from "node:path";

/** One COPY instruction: its sources and destination as written, and the stage it copies from, if any. */
export interface CopyInstruction {
  line: number;
  from?: string;
  sources: string[];
  destination: string;
  /** The destination as an absolute path in the image, resolved against the WORKDIR in force. */
  absoluteDestination: string;
}

/** One FROM ... [AS name] section. */
export interface Stage {
  name?: string;
  image: string;
  /** The last WORKDIR of the stage, "/" when it sets none. */
  workdir: string;
  copies: CopyInstruction[];
  /** The RUN instructions, in order, with continued lines joined. */
  runs: { line: number; command: string }[];
  /** Packages named by `apt-get install` in the stage's RUN instructions. */
  aptPackages: string[];
  /** `ln -s TARGET LINK` pairs of the stage's RUN instructions. */
  symlinks: { target: string; link: string }[];
  entrypoint?: string[];
}

interface Instruction {
  line: number;
  keyword: string;
  rest: string;
}

/** Splits a Containerfile into instructions, joining continued lines and dropping comments. */
function instructions(text: string): Instruction[] {
  const result: Instruction[] = [];
  let pending: Instruction | undefined;
  text.split("\n").forEach((raw, index) => {
    const line = raw.trim();
    if (line.startsWith("#") || (line === "" && pending === undefined)) return;
    const continued = line.endsWith("\\");
    const body = continued ? line.slice(0, -1).trim() : line;
    if (pending === undefined) {
      const match = /^(\S+)\s*(.*)$/.exec(body);
      if (match === null) return;
      pending = { line: index + 1, keyword: match[1].toUpperCase(), rest: match[2] };
    } else {
      pending.rest = `${pending.rest} ${body}`.trim();
    }
    if (!continued) {
      result.push(pending);
      pending = undefined;
    }
  });
  if (pending !== undefined) throw new Error(`Containerfile line ${pending.line}: the last instruction ends with a line continuation`);
  return result;
}

/** Parses a Containerfile's stages. Throws on an instruction before FROM and on COPY forms it does not read. */
export function parseContainerfile(text: string): Stage[] {
  const stages: Stage[] = [];
  for (const instruction of instructions(text)) {
    if (instruction.keyword === "FROM") {
      const match = /^(\S+)(?:\s+AS\s+(\S+))?$/i.exec(instruction.rest);
      if (match === null) throw new Error(`Containerfile line ${instruction.line}: unreadable FROM "${instruction.rest}"`);
      stages.push({ image: match[1], name: match[2], workdir: "/", copies: [], runs: [], aptPackages: [], symlinks: [] });
      continue;
    }
    const stage = stages.at(-1);
    if (stage === undefined) throw new Error(`Containerfile line ${instruction.line}: ${instruction.keyword} before the first FROM`);
    switch (instruction.keyword) {
      case "WORKDIR":
        stage.workdir = path.posix.resolve(stage.workdir, instruction.rest);
        break;
      case "COPY":
        stage.copies.push(parseCopy(instruction, stage.workdir));
        break;
      case "RUN":
        stage.runs.push({ line: instruction.line, command: instruction.rest });
        stage.aptPackages.push(...aptPackages(instruction.rest));
        stage.symlinks.push(...symlinks(instruction.rest));
        break;
      case "ENTRYPOINT":
        stage.entrypoint = JSON.parse(instruction.rest) as string[];
        break;
    }
  }
  return stages;
}

function parseCopy(instruction: Instruction, workdir: string): CopyInstruction {
  const words = instruction.rest.split(/\s+/);
  let from: string | undefined;
  while (words[0]?.startsWith("--")) {
    const flag = words.shift()!;
    const fromMatch = /^--from=(\S+)$/.exec(flag);
    if (fromMatch === null) throw new Error(`Containerfile line ${instruction.line}: COPY flag ${flag} is not read by this parser; extend test/harness/containerfile.ts`);
    from = fromMatch[1];
  }
  if (words[0]?.startsWith("[")) throw new Error(`Containerfile line ${instruction.line}: the JSON form of COPY is not read by this parser; use the plain form`);
  if (words.length < 2) throw new Error(`Containerfile line ${instruction.line}: COPY needs a source and a destination`);
  const wildcard = words.slice(0, -1).find((source) => /[*?[]/.test(source));
  if (wildcard !== undefined) throw new Error(`Containerfile line ${instruction.line}: the wildcard source ${wildcard} is not read by this parser; name the files`);
  const destination = words.at(-1)!;
  return { line: instruction.line, from, sources: words.slice(0, -1), destination, absoluteDestination: path.posix.resolve(workdir, destination) };
}

/**
 * Returns where COPY puts `inner`, a path inside `source` ("" for the source itself), as an absolute
 * path in the image. A folder's contents go into the destination. A file keeps its name in a
 * destination that ends with "/" or receives several sources, and takes the destination's name otherwise.
 */
export function copiedPath(copy: CopyInstruction, source: string, sourceIsDirectory: boolean, inner: string): string {
  if (sourceIsDirectory) return path.posix.join(copy.absoluteDestination, inner);
  const intoFolder = copy.destination.endsWith("/") || copy.sources.length > 1;
  return intoFolder ? path.posix.join(copy.absoluteDestination, path.posix.basename(source)) : copy.absoluteDestination;
}

/** Returns the package names of every `apt-get install` in a RUN command, without options. */
function aptPackages(command: string): string[] {
  return command
    .split(/&&|;/)
    .map((part) => part.trim().split(/\s+/))
    .flatMap((words) => {
      const install = words.indexOf("install");
      if (!words.includes("apt-get") || install < 0) return [];
      return words.slice(install + 1).filter((word) => !word.startsWith("-"));
    });
}

/** Returns the TARGET and LINK of every `ln -s TARGET LINK` in a RUN command. */
function symlinks(command: string): { target: string; link: string }[] {
  return [...command.matchAll(/\bln\s+-sf?\s+(\S+)\s+(\S+)/g)].map((match) => ({ target: match[1], link: match[2] }));
}
