// The node-local admin API: readiness and a dump of what the agent serves. Bound to localhost by default.

import http from "node:http";
import type { Logger } from "../log";

/** Splits "host:port" (IPv6 in brackets) and checks the port. */
export function parseAddress(address: string): { host: string; port: number } {
  const match = /^(?:\[([^\]]+)\]|([^:]+)):(\d{1,5})$/.exec(address);
  const port = match ? Number(match[3]) : NaN;
  if (!match || port < 0 || port > 65535) {
    throw new Error(`invalid admin address "${address}": expected HOST:PORT, for example 127.0.0.1:15000`);
  }
  return { host: match[1] ?? match[2], port };
}

export class AdminServer {
  private readonly server: http.Server;

  constructor(
    private readonly address: string,
    private readonly configDump: () => unknown,
    private readonly logger: Logger,
  ) {
    this.server = http.createServer((request, response) => this.handle(request, response));
  }

  async start(): Promise<void> {
    const { host, port } = parseAddress(this.address);
    await new Promise<void>((resolve, reject) => {
      this.server.once("error", (error: NodeJS.ErrnoException) => {
        reject(new Error(`admin API could not listen on ${this.address}: ${error.code ?? error.message}; pass --admin with a free address`));
      });
      this.server.listen(port, host, () => resolve());
    });
  }

  async stop(): Promise<void> {
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private handle(request: http.IncomingMessage, response: http.ServerResponse): void {
    const path = (request.url ?? "/").split("?")[0];
    if (path === "/healthz/ready") {
      response.writeHead(200, { "content-type": "text/plain" }).end("ready\n");
    } else if (path === "/config_dump") {
      response.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify(this.configDump(), null, 2) + "\n");
    } else {
      response.writeHead(404, { "content-type": "text/plain" }).end("not found: try /healthz/ready or /config_dump\n");
    }
    this.logger.debug({ path, status: response.statusCode }, "admin request");
  }
}
