// Operator views of nftables capture, for tests that run the agents with --capture nftables: the
// pods an agent lists in its state folder, and the capture table in a pod's network namespace.

import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { nftBinary, NFT_TABLE_FAMILY, NFT_TABLE_NAME } from "../../agent/capture/nft/capture";
import { LOCK_DIRECTORY } from "../../agent/capture/pin-lock";

/** One pod in an agent's nftables state folder: the namespace whose table the agent wrote. */
export interface NftStatePod {
  cookie: string;
  netnsPath: string;
  podIp: string;
  podIp6?: string;
  state: string;
}

/** Returns the folder where the agent of `node` lists the pods it wrote a table for, one file per netns cookie. */
export function nftStateDirectory(node: string): string {
  return path.join(LOCK_DIRECTORY, `nftables-${node}`);
}

/** Reads the pods that the agent of `node` lists in its state folder. The folder stays readable while the agent is down. */
export function nftStatePods(node: string): NftStatePod[] {
  const directory = nftStateDirectory(node);
  if (!fs.existsSync(directory)) return [];
  return fs.readdirSync(directory).flatMap((name) => {
    const match = /^(\d+)\.json$/.exec(name);
    if (!match) return [];
    const pod = JSON.parse(fs.readFileSync(path.join(directory, name), "utf8")) as Omit<NftStatePod, "cookie">;
    return [{ cookie: match[1], netnsPath: pod.netnsPath, podIp: pod.podIp, podIp6: pod.podIp6, state: pod.state }];
  });
}

/** Removes the state folders of the agents of `nodes`; call it after the agents stopped and their namespaces are gone. */
export function removeNftState(nodes: Iterable<string>): void {
  for (const node of nodes) fs.rmSync(nftStateDirectory(node), { recursive: true, force: true });
}

/**
 * Returns the listing of the capture table in the namespace at `netnsPath`, or undefined when the
 * namespace has none. Runs the nftables tool found by nftBinary(): node_modules/.bin has an unrelated `nft`.
 */
export function nftCaptureTable(netnsPath: string): string | undefined {
  const nsenter = (args: string[]): string => execFileSync("nsenter", [`--net=${netnsPath}`, "--", nftBinary(), ...args], { encoding: "utf8" });
  const tables = nsenter(["list", "tables"]);
  if (!tables.split("\n").some((line) => line.trim() === `table ${NFT_TABLE_FAMILY} ${NFT_TABLE_NAME}`)) return undefined;
  return nsenter(["list", "table", NFT_TABLE_FAMILY, NFT_TABLE_NAME]);
}
