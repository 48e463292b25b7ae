import test from "ava";
import http from "node:http";
import net from "node:net";
import { AdminServer, addressedByIpOrLocalhost, type AdminPostRoute } from "../../agent/admin/server";
import { AgentError } from "../../agent/errors";
import { silentLogger } from "../../agent/log";

interface Reply {
  status: number;
  allow?: string;
  body: string;
}

function request(port: number, method: string, requestPath: string, headers: Record<string, string> = {}, body?: string): Promise<Reply> {
  return new Promise((resolve, reject) => {
    const outgoing = http.request({ host: "127.0.0.1", port, method, path: requestPath, headers }, (response) => {
      let text = "";
      response.setEncoding("utf8");
      response.on("data", (chunk) => (text += chunk));
      response.on("end", () => resolve({ status: response.statusCode ?? 0, allow: response.headers.allow, body: text }));
    });
    outgoing.on("error", reject);
    outgoing.setTimeout(5_000, () => outgoing.destroy(new Error(`${method} ${requestPath} timed out`)));
    outgoing.end(body);
  });
}

async function startServer(t: { teardown(fn: () => Promise<void>): void }): Promise<{ port: number; posts: string[] }> {
  const posts: string[] = [];
  const logging: AdminPostRoute = (query, remoteAddress) => {
    if (query.get("level") === "bad") throw new AgentError("INVALID_QUERY", `unknown log level "bad"`);
    posts.push(`${query.toString()} from ${remoteAddress}`);
    return { default: query.get("level") ?? "info", components: {} };
  };
  const server = new AdminServer("127.0.0.1:0", { "/status": () => ({ ok: true }), "/logging": () => ({ default: "info", components: {} }) }, silentLogger(), {
    "/logging": logging,
    "/post-only": () => ({ posted: true }),
  });
  await server.start();
  t.teardown(() => server.stop());
  return { port: server.listeningAddress()!.port, posts };
}

test("post to logging", async (t) => {
  const { port, posts } = await startServer(t);
  const reply = await request(port, "POST", "/logging?level=debug");
  t.is(reply.status, 200);
  t.deepEqual(JSON.parse(reply.body), { default: "debug", components: {} });
  t.deepEqual(posts, ["level=debug from 127.0.0.1"]);
});

test("post with json content type", async (t) => {
  const { port } = await startServer(t);
  const reply = await request(port, "POST", "/logging?level=debug", { "content-type": "application/json" }, "{}");
  t.is(reply.status, 200);
});

test("post with origin rejected", async (t) => {
  const { port, posts } = await startServer(t);
  const reply = await request(port, "POST", "/logging?level=debug", { origin: "https://attacker.example" });
  t.is(reply.status, 403);
  t.regex(reply.body, /Origin header/);
  t.deepEqual(posts, []);
});

test("post with form types rejected", async (t) => {
  const { port, posts } = await startServer(t);
  for (const type of ["application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/plain;charset=UTF-8", "Text/Plain"]) {
    const reply = await request(port, "POST", "/logging?level=debug", { "content-type": type }, "level=debug");
    t.is(reply.status, 403, type);
  }
  t.deepEqual(posts, []);
});

test("post bad query is 400", async (t) => {
  const { port } = await startServer(t);
  const reply = await request(port, "POST", "/logging?level=bad");
  t.is(reply.status, 400);
  t.deepEqual(JSON.parse(reply.body), { error: 'unknown log level "bad"', code: "INVALID_QUERY" });
});

test("post elsewhere is 405", async (t) => {
  const { port } = await startServer(t);
  const status = await request(port, "POST", "/status");
  t.is(status.status, 405);
  t.is(status.allow, "GET, HEAD");
  const unknown = await request(port, "POST", "/nothing");
  t.is(unknown.status, 405);
  t.is(unknown.allow, "GET, HEAD");
});

test("other methods on logging are 405", async (t) => {
  const { port } = await startServer(t);
  const reply = await request(port, "PUT", "/logging?level=debug");
  t.is(reply.status, 405);
  t.is(reply.allow, "GET, HEAD, POST");
});

test("get on post-only path is 405", async (t) => {
  const { port } = await startServer(t);
  const reply = await request(port, "GET", "/post-only");
  t.is(reply.status, 405);
  t.is(reply.allow, "POST");
});

test("get still served", async (t) => {
  const { port } = await startServer(t);
  t.is((await request(port, "GET", "/logging")).status, 200);
  // Only the routes given are served: the metrics server has no /healthz/ready.
  t.is((await request(port, "GET", "/healthz/ready")).status, 404);
});

test("host name requests rejected", async (t) => {
  const { port } = await startServer(t);
  // A DNS-rebinding page reaches 127.0.0.1 under its own host name.
  const rebound = await request(port, "GET", "/status", { host: `attacker.example:${port}` });
  t.is(rebound.status, 403);
  t.regex(rebound.body, /attacker\.example/);
  for (const host of [`127.0.0.1:${port}`, `localhost:${port}`, `[::1]:${port}`, "10.0.0.1"]) {
    t.is((await request(port, "GET", "/status", { host })).status, 200, host);
  }
});

test("addressed by ip or localhost", (t) => {
  t.true(addressedByIpOrLocalhost(undefined));
  t.true(addressedByIpOrLocalhost("LOCALHOST"));
  t.true(addressedByIpOrLocalhost("[fd00::1]:15000"));
  t.false(addressedByIpOrLocalhost("localhost.attacker.example"));
  t.false(addressedByIpOrLocalhost("127.0.0.1.nip.io:15000"));
  t.false(addressedByIpOrLocalhost(""));
});

test("absolute-form targets checked", async (t) => {
  const { port } = await startServer(t);
  const raw = (requestLine: string): Promise<string> =>
    new Promise((resolve, reject) => {
      const socket = net.connect(port, "127.0.0.1", () => socket.end(`${requestLine}\r\nHost: 127.0.0.1:${port}\r\nConnection: close\r\n\r\n`));
      let text = "";
      socket.setEncoding("utf8");
      socket.on("data", (chunk) => (text += chunk));
      socket.on("end", () => resolve(text.split("\r\n")[0]));
      socket.on("error", reject);
    });
  t.regex(await raw("GET http://evil.example/status HTTP/1.1"), / 403 /);
  t.regex(await raw(`GET http://127.0.0.1:${port}/status HTTP/1.1`), / 200 /);
  // A path that starts with "//" is a path, not a host.
  t.regex(await raw("GET //evil.example/status HTTP/1.1"), / 404 /);
});

test("invalid targets answer 400 and the server stays up", async (t) => {
  const { port } = await startServer(t);
  const raw = (requestLine: string): Promise<string> =>
    new Promise((resolve, reject) => {
      const socket = net.connect(port, "127.0.0.1", () => socket.end(`${requestLine}\r\nHost: 127.0.0.1:${port}\r\nConnection: close\r\n\r\n`));
      let text = "";
      socket.setEncoding("utf8");
      socket.on("data", (chunk) => (text += chunk));
      socket.on("end", () => resolve(text.split("\r\n")[0]));
      socket.on("error", reject);
    });
  for (const target of ["http://[zz/metrics", "http://%zz/status", "http://a:99999/"]) {
    t.regex(await raw(`GET ${target} HTTP/1.1`), / 400 /, target);
  }
  t.is((await request(port, "GET", "/status")).status, 200);
});

test("connections beyond the limits are dropped", async (t) => {
  const { port } = await startServer(t);
  const idle: net.Socket[] = [];
  t.teardown(() => idle.forEach((socket) => socket.destroy()));
  const open = (localAddress: string): Promise<net.Socket> =>
    new Promise((resolve, reject) => {
      const socket = net.connect({ port, host: "127.0.0.1", localAddress }, () => resolve(socket));
      socket.on("error", reject);
    });
  const closedSoon = (socket: net.Socket): Promise<boolean> =>
    new Promise((resolve) => {
      socket.on("close", () => resolve(true));
      setTimeout(() => resolve(false), 1_000);
    });
  // Connections from other addresses than the server's own: eight per address, the ninth is closed.
  for (let index = 0; index < 8; index++) idle.push(await open("127.0.0.2"));
  t.true(await closedSoon(await open("127.0.0.2")));
  // Sixty-four in all: with eight from each of eight addresses, a ninth address is closed.
  for (let host = 3; host <= 9; host++) for (let index = 0; index < 8; index++) idle.push(await open(`127.0.0.${host}`));
  t.true(await closedSoon(await open("127.0.0.10")));
  // A connection from the server's own address, as the kubelet's probe of a host-network pod, is served.
  t.is((await request(port, "GET", "/status")).status, 200);
  idle.splice(0).forEach((socket) => socket.destroy());
  await new Promise((resolve) => setTimeout(resolve, 100));
  t.false(await closedSoon(await open("127.0.0.2").then((socket) => (idle.push(socket), socket))), "a slot is free again");
});

test("CONNECT gets 405", async (t) => {
  const { port } = await startServer(t);
  const line = await new Promise<string>((resolve, reject) => {
    const socket = net.connect(port, "127.0.0.1", () => socket.write(`CONNECT 127.0.0.1:15000 HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\n\r\n`));
    let text = "";
    socket.setEncoding("utf8");
    socket.on("data", (chunk) => (text += chunk));
    socket.on("end", () => resolve(text.split("\r\n")[0]));
    socket.on("error", reject);
  });
  t.regex(line, / 405 /);
});
