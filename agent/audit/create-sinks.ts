// Builds the sinks that the audit options name: the local file first, then the remote sinks in
// the order given.

import fs from "node:fs";
import type { Logger } from "../log";
import type { AuditOptions, RemoteSinkSpec } from "./config";
import type { AuditSink } from "./sink";
import { FileSink } from "./sinks/file";
import { OtlpLogsSink } from "./sinks/otlp";
import { StdoutSink } from "./sinks/stdout";
import { SyslogSink } from "./sinks/syslog";

export function createSinks(options: AuditOptions, node: string, logger: Logger): AuditSink[] {
  const sinks: AuditSink[] = [];
  if (options.file) {
    sinks.push(new FileSink({ ...options.file, fsync: options.fsync.mode === "always" }, logger.child({ sink: "file" })));
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
      return new StdoutSink(logger.child({ sink: "stdout" }));
    case "otlp":
      return new OtlpLogsSink({ endpoint: spec.endpoint, tls: spec.tls, headers: spec.headers, node }, logger.child({ sink: "otlp" }));
    case "syslog":
      return new SyslogSink(
        { host: spec.host, port: spec.port, tls: spec.tls, facility: spec.facility, sdId: spec.sdId, node },
        logger.child({ sink: "syslog" }),
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
  if (key.length < 16) throw new Error(`--audit-redact-key-file ${options.redactionKeyFile} holds ${key.length} bytes; give a key of at least 16 bytes`);
  return key;
}
