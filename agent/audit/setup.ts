// Builds the audit pipeline from the agent's audit options: the sinks they name (the local file
// first, then the remote sinks in the order given), the spool and the redaction.

import fs from "node:fs";
import type { Logger } from "../log";
import type { AuditOptions, RemoteSinkSpec } from "./config";
import { AuditPipeline } from "./pipeline";
import type { AuditSink } from "./sink";
import { FileSink } from "./sinks/file";
import { OtlpLogsSink } from "./sinks/otlp";
import { StdoutSink } from "./sinks/stdout";
import { SyslogSink } from "./sinks/syslog";

/** Creates the node's pipeline; start() it once this agent is the node's only writer of the spool. */
export function createAuditPipeline(node: string, options: AuditOptions, logger: Logger): AuditPipeline {
  return new AuditPipeline(
    {
      node,
      spoolDir: options.spoolDir,
      sinks: createSinks(options, node, logger),
      spoolMaxBytes: options.spoolMaxBytes,
      fsync: options.fsync,
      queueCapacity: options.queueCapacity,
      redaction: options.redaction,
      redactionKey: readRedactionKey(options),
    },
    logger,
  );
}

export function createSinks(options: AuditOptions, node: string, logger: Logger): AuditSink[] {
  const sinks: AuditSink[] = [];
  if (options.file) {
    sinks.push(new FileSink({ ...options.file, fsync: options.fsync.mode === "always" }, logger));
  }
  for (const spec of options.sinks) sinks.push(createRemoteSink(spec, node, logger));
  const names = new Set<string>();
  for (const sink of sinks) {
    if (names.has(sink.name)) throw new Error(`audit sink ${sink.name} is given twice: give each destination once`);
    names.add(sink.name);
  }
  return sinks;
}

function createRemoteSink(spec: RemoteSinkSpec, node: string, logger: Logger): AuditSink {
  switch (spec.kind) {
    case "stdout":
      return new StdoutSink(logger);
    case "otlp":
      return new OtlpLogsSink({ endpoint: spec.endpoint, tls: spec.tls, headers: spec.headers, node }, logger);
    case "syslog":
      return new SyslogSink(
        { host: spec.host, port: spec.port, tls: spec.tls, facility: spec.facility, sdId: spec.sdId, maxMessageBytes: spec.maxMessageBytes, node },
        logger,
      );
  }
}

/** Reads the redaction key file named by the options, if any. Throws naming the file when it is unreadable or empty. */
export function readRedactionKey(options: AuditOptions): Buffer | undefined {
  if (options.redactionKeyFile === undefined) return undefined;
  let key: Buffer;
  try {
    key = fs.readFileSync(options.redactionKeyFile);
  } catch (error) {
    throw new Error(`cannot read --audit-redact-key-file ${options.redactionKeyFile}: ${(error as Error).message}`);
  }
  if (key.length < 16) throw new Error(`--audit-redact-key-file ${options.redactionKeyFile} contains ${key.length} bytes; give a key of at least 16 bytes`);
  return key;
}
