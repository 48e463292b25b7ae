// The native mutual-TLS baseline: a socat tunnel pair between the same two pods, on OpenSSL.
//
//   client pod: iperf3 -> 127.0.0.1:NATIVE_CLIENT_PORT (socat TCP-LISTEN) -> OPENSSL to server:NATIVE_TLS_PORT
//   server pod: socat OPENSSL-LISTEN:NATIVE_TLS_PORT (client certificate required) -> TCP 127.0.0.1:IPERF_PORT
//
// Both sides present ECDSA P-256 certificates from a throwaway CA made with openssl in the run's work
// folder, verify the peer's chain, and accept TLS 1.3 only. OpenSSL 3 offers TLS_AES_256_GCM_SHA384
// first, and the cipher each connection used is read back from socat's log.

import { execFileSync, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import type { Topology } from "../harness/topology";
import { IPERF_PORT } from "./iperf";
import { waitListening } from "./pod-process";

export const NATIVE_TLS_PORT = 5443;
export const NATIVE_CLIENT_PORT = 15201;
const SERVER_NAME = "bench-server";

export interface NativeTunnel {
  server: ChildProcess;
  client: ChildProcess;
  /** socat's log files, which record each connection's TLS cipher. */
  logs: string[];
}

function openssl(args: string[], cwd: string): void {
  execFileSync("openssl", args, { cwd, stdio: "pipe" });
}

function issueCertificate(dir: string, name: string): void {
  openssl(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", `${name}.key`, "-out", `${name}.csr`, "-subj", `/CN=${name}`], dir);
  fs.writeFileSync(path.join(dir, `${name}.ext`), `subjectAltName=DNS:${name}\n`);
  openssl(["x509", "-req", "-in", `${name}.csr`, "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1", "-out", `${name}.pem`, "-extfile", `${name}.ext`], dir);
}

/** Makes a CA and a server and a client certificate signed by it in `dir`. */
export function makeCertificates(dir: string): void {
  fs.mkdirSync(dir, { recursive: true });
  openssl(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=bench-ca"], dir);
  issueCertificate(dir, SERVER_NAME);
  issueCertificate(dir, "bench-client");
}

/** Starts the socat pair. `certDir` contains the files that makeCertificates wrote. */
export async function startNativeTunnel(topology: Topology, clientPod: string, serverPod: string, certDir: string): Promise<NativeTunnel> {
  const file = (name: string): string => path.join(certDir, name);
  const tlsOptions = `cafile=${file("ca.pem")},verify=1,min-version=TLS1.3`;
  const serverLog = file("socat-server.log");
  const clientLog = file("socat-client.log");

  const serverArgs = [
    "-d", "-d", "-lf", serverLog,
    `OPENSSL-LISTEN:${NATIVE_TLS_PORT},reuseaddr,fork,nodelay,cert=${file(`${SERVER_NAME}.pem`)},key=${file(`${SERVER_NAME}.key`)},${tlsOptions}`,
    `TCP:127.0.0.1:${IPERF_PORT},nodelay`,
  ];
  const server = topology.spawn(topology.pod(serverPod).netns, "socat", serverArgs, { stdio: ["ignore", "ignore", "ignore"] });
  await waitListening(topology, serverPod, NATIVE_TLS_PORT, server, "socat OPENSSL-LISTEN");

  const serverIp = topology.pod(serverPod).ip;
  const clientArgs = [
    "-d", "-d", "-lf", clientLog,
    `TCP-LISTEN:${NATIVE_CLIENT_PORT},bind=127.0.0.1,reuseaddr,fork,nodelay`,
    `OPENSSL:${serverIp}:${NATIVE_TLS_PORT},nodelay,cert=${file("bench-client.pem")},key=${file("bench-client.key")},commonname=${SERVER_NAME},${tlsOptions}`,
  ];
  const client = topology.spawn(topology.pod(clientPod).netns, "socat", clientArgs, { stdio: ["ignore", "ignore", "ignore"] });
  await waitListening(topology, clientPod, NATIVE_CLIENT_PORT, client, "socat TCP-LISTEN");
  return { server, client, logs: [serverLog, clientLog] };
}

/** Returns the distinct TLS ciphers that socat logged for the tunnel's connections. */
export function tunnelCiphers(tunnel: NativeTunnel): string[] {
  const ciphers = new Set<string>();
  for (const log of tunnel.logs) {
    if (!fs.existsSync(log)) continue;
    for (const match of fs.readFileSync(log, "utf8").matchAll(/SSL connection using (\S+)/g)) ciphers.add(match[1]);
  }
  return [...ciphers];
}

/** Ends both socat processes and waits for them to exit. */
export async function stopNativeTunnel(tunnel: NativeTunnel): Promise<void> {
  await Promise.all(
    [tunnel.server, tunnel.client].map((child) => {
      if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
      const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
      child.kill("SIGTERM");
      return exited;
    }),
  );
}
