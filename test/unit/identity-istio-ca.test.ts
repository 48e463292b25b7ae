import crypto from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import * as grpc from "@grpc/grpc-js";
import test, { type ExecutionContext } from "ava";
import pino from "pino";
import { AgentError } from "../../agent/errors";
import { withSecureContext, type IssuedCertificate } from "../../agent/identity/certificate";
import { certificateMatchesKey, createCertificateRequest, isLeafFor } from "../../agent/identity/csr";
import {
  IstioCaClient,
  loadCertificateService,
  parseCertificateResponse,
  type IstioCaClientOptions,
} from "../../agent/identity/istio-ca";
import { formatSpiffeId } from "../../agent/identity/spiffe";
import type { Identity } from "../../agent/state/types";
import { createUnrelatedRootPem, IstioCaServer, type IstioCaServerOptions } from "../harness/istio-ca-server";

const agent: Identity = { trustDomain: "cluster.local", namespace: "istio-system", serviceAccount: "ztunnel" };
const sleep: Identity = { trustDomain: "cluster.local", namespace: "default", serviceAccount: "sleep" };
const AGENT_TOKEN = "agent-token-5f1e2d3c";
const ROTATED_TOKEN = "agent-token-rotated-9a8b7c";
const SLEEP_TOKEN = "sleep-token-0d9c8b";

interface Setup {
  server: IstioCaServer;
  dir: string;
  tokenFile: string;
  rootCertFile: string;
  client: (overrides?: Partial<IstioCaClientOptions>) => IstioCaClient;
}

async function setup(t: ExecutionContext, serverOptions: Partial<IstioCaServerOptions> = {}): Promise<Setup> {
  const server = await IstioCaServer.start({
    tokens: { [AGENT_TOKEN]: agent, [ROTATED_TOKEN]: agent, [SLEEP_TOKEN]: sleep },
    trustedNodeAccounts: [agent],
    ...serverOptions,
  });
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "ambient-istio-ca-test-"));
  const tokenFile = path.join(dir, "istio-token");
  const rootCertFile = path.join(dir, "root-cert.pem");
  fs.writeFileSync(tokenFile, AGENT_TOKEN + "\n");
  fs.writeFileSync(rootCertFile, server.tlsRootPem);
  const clients: IstioCaClient[] = [];
  t.teardown(async () => {
    clients.forEach((client) => client.close());
    await server.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  const client = (overrides: Partial<IstioCaClientOptions> = {}): IstioCaClient => {
    const created = new IstioCaClient({
      address: server.address,
      rootCertFile,
      tokenFile,
      agentIdentity: agent,
      tlsServerName: "istiod.istio-system.svc",
      requestTimeoutMs: 5000,
      ...overrides,
    });
    clients.push(created);
    return created;
  };
  return { server, dir, tokenFile, rootCertFile, client };
}

async function issueError(t: ExecutionContext, promise: Promise<unknown>): Promise<AgentError> {
  const error = await t.throwsAsync(promise, { instanceOf: AgentError });
  return error as AgentError;
}

function publicKeySpkiOf(keyPem: string): Buffer {
  return crypto.createPublicKey(keyPem).export({ type: "spki", format: "der" });
}

function certificatesIn(pem: string): crypto.X509Certificate[] {
  return (pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? []).map((one) => new crypto.X509Certificate(one));
}

test("issue returns a verified workload certificate", async (t) => {
  const { server, client } = await setup(t);

  const issued = await client().issue(sleep, 3600);

  t.deepEqual(issued.identity, sleep);
  t.true(isLeafFor(issued.certPem, sleep));
  t.true(certificateMatchesKey(issued.certPem, publicKeySpkiOf(issued.keyPem)));
  t.is(issued.chainPem, issued.certPem);
  t.is(issued.caRootsPem, server.rootsPem);
  const lifetimeSeconds = (issued.notAfter.getTime() - Date.now()) / 1000;
  t.true(lifetimeSeconds > 3500 && lifetimeSeconds <= 3600, `lifetime ${lifetimeSeconds} s`);
  t.notThrows(() => withSecureContext(issued));
});

test("issue sends token, cluster id, impersonation and ttl", async (t) => {
  const { server, client } = await setup(t);

  await client({ clusterId: "east" }).issue(sleep, 3600);

  t.is(server.requests.length, 1);
  const [seen] = server.requests;
  t.is(seen.token, AGENT_TOKEN);
  t.true(seen.tokenOk);
  t.is(seen.clusterId, "east");
  t.is(seen.impersonatedIdentity, formatSpiffeId(sleep));
  t.is(seen.ttlSeconds, 3600);
  t.is(seen.csrIdentity, formatSpiffeId(sleep));
  t.is(seen.csrNameCount, 1);
  t.is(seen.issuedIdentity, formatSpiffeId(sleep));
  t.is(seen.status, grpc.status.OK);
});

test("issue defaults cluster id and ttl", async (t) => {
  const { server, client } = await setup(t);

  const issued = await client().issue(sleep);

  t.is(server.requests[0].clusterId, "Kubernetes");
  t.is(server.requests[0].ttlSeconds, 0);
  const lifetimeHours = (issued.notAfter.getTime() - issued.notBefore.getTime()) / 3_600_000;
  t.true(lifetimeHours > 23.9 && lifetimeHours < 24.1, `lifetime ${lifetimeHours} h`);
});

test("issue for own identity omits impersonation", async (t) => {
  const { server, client } = await setup(t);

  const issued = await client().issue(agent, 600);

  t.is(server.requests[0].impersonatedIdentity, undefined);
  t.true(isLeafFor(issued.certPem, agent));
});

test("issue without agent identity always impersonates", async (t) => {
  const { server, client } = await setup(t);

  const issued = await client({ agentIdentity: undefined }).issue(agent, 600);

  t.is(server.requests[0].impersonatedIdentity, formatSpiffeId(agent));
  t.true(isLeafFor(issued.certPem, agent));
});

test("caller without impersonation gets its own identity", async (t) => {
  // istiod ignores the CSR's SAN when no ImpersonatedIdentity is sent and signs for the token's identity,
  // so a client that wrongly believes it is the workload receives a leaf it must reject.
  const { server, client } = await setup(t);

  const error = await issueError(t, client({ agentIdentity: sleep }).issue(sleep, 600));

  t.is(error.code, "IDENTITY_ERROR");
  t.is(server.requests[0].issuedIdentity, formatSpiffeId(agent));
  t.true(error.message.includes(formatSpiffeId(agent)));
  t.true(error.message.includes(formatSpiffeId(sleep)));
});

test("wrong token is rejected", async (t) => {
  const { server, tokenFile, client } = await setup(t);
  fs.writeFileSync(tokenFile, "not-a-known-token");

  const error = await issueError(t, client().issue(sleep, 600));

  t.is(error.code, "CA_REJECTED");
  t.regex(error.message, /UNAUTHENTICATED/);
  t.true(error.message.includes(tokenFile));
  t.false(error.message.includes("not-a-known-token"));
  t.false(server.requests[0].tokenOk);
  t.is(server.requests[0].status, grpc.status.UNAUTHENTICATED);
});

test("missing token file is a clear error", async (t) => {
  const { server, dir, client } = await setup(t);
  const missing = path.join(dir, "no-such-token");

  const error = await issueError(t, client({ tokenFile: missing }).issue(sleep, 600));

  t.is(error.code, "CA_REJECTED");
  t.true(error.message.includes(missing));
  t.regex(error.message, /ENOENT/);
  t.is(server.requests.length, 0);
});

test("empty token file is a clear error", async (t) => {
  const { server, tokenFile, client } = await setup(t);
  fs.writeFileSync(tokenFile, "\n");

  const error = await issueError(t, client().issue(sleep, 600));

  t.is(error.code, "CA_REJECTED");
  t.true(error.message.includes(tokenFile));
  t.regex(error.message, /empty/);
  t.is(server.requests.length, 0);
});

test("rotated token file is read again", async (t) => {
  const { server, tokenFile, client } = await setup(t);
  const caClient = client();

  await caClient.issue(sleep, 600);
  fs.writeFileSync(tokenFile, ROTATED_TOKEN);
  await caClient.issue(sleep, 600);

  t.is(server.requests[0].token, AGENT_TOKEN);
  t.is(server.requests[1].token, ROTATED_TOKEN);
});

test("unavailable CA maps to CA_UNAVAILABLE", async (t) => {
  const { server, client } = await setup(t);
  const caClient = client();
  server.failNext(1, grpc.status.UNAVAILABLE, "istiod is restarting");

  const error = await issueError(t, caClient.issue(sleep, 600));

  t.is(error.code, "CA_UNAVAILABLE");
  t.regex(error.message, /UNAVAILABLE \(istiod is restarting\)/);
  t.true(error.message.includes(server.address));
  const issued = await caClient.issue(sleep, 600);
  t.true(isLeafFor(issued.certPem, sleep));
});

test("permission denied maps to CA_REJECTED", async (t) => {
  const { server, client } = await setup(t);
  server.failNext(1, grpc.status.PERMISSION_DENIED, "denied");

  const error = await issueError(t, client().issue(sleep, 600));

  t.is(error.code, "CA_REJECTED");
  t.regex(error.message, /PERMISSION_DENIED.*CA_TRUSTED_NODE_ACCOUNTS/);
});

test("impersonation by untrusted caller is rejected", async (t) => {
  const { server, tokenFile, client } = await setup(t);
  fs.writeFileSync(tokenFile, SLEEP_TOKEN);

  const error = await issueError(t, client({ agentIdentity: sleep }).issue(agent, 600));

  t.is(error.code, "CA_REJECTED");
  t.is(server.requests[0].impersonatedIdentity, formatSpiffeId(agent));
  t.is(server.requests[0].status, grpc.status.UNAUTHENTICATED);
});

test("impersonation outside the allowed set is rejected", async (t) => {
  const { server, client } = await setup(t, { impersonable: [agent] });

  const error = await issueError(t, client().issue(sleep, 600));

  t.is(error.code, "CA_REJECTED");
  t.is(server.requests[0].status, grpc.status.UNAUTHENTICATED);
});

test("lifetime above the maximum is rejected", async (t) => {
  const { server, client } = await setup(t, { maxTtlSeconds: 3600 });

  const error = await issueError(t, client().issue(sleep, 7200));

  t.is(error.code, "CA_REJECTED");
  t.regex(error.message, /INVALID_ARGUMENT/);
  t.is(server.requests[0].ttlSeconds, 7200);
});

// Serial tests run before the concurrent ones, so the deadline measures the CA's stall and not a busy machine.
test.serial("stalled CA times out at the deadline", async (t) => {
  const { server, client } = await setup(t);
  const caClient = client({ requestTimeoutMs: 300 });
  await caClient.issue(sleep, 600);
  server.stall("forever");
  const started = Date.now();

  const error = await issueError(t, caClient.issue(sleep, 600));

  const elapsed = Date.now() - started;
  t.is(error.code, "CA_UNAVAILABLE");
  t.regex(error.message, /no response within 300 ms/);
  t.true(elapsed >= 250 && elapsed < 2000, `failed after ${elapsed} ms`);
  t.is(server.requests.length, 2);
});

test("short stall within the deadline succeeds", async (t) => {
  const { server, client } = await setup(t);
  server.stall(100);

  const issued = await client({ requestTimeoutMs: 3000 }).issue(sleep, 600);

  t.true(isLeafFor(issued.certPem, sleep));
});

test("leaf for another identity is rejected", async (t) => {
  const { server, client } = await setup(t);
  server.wrongIdentity(true);

  const error = await issueError(t, client().issue(sleep, 600));

  t.is(error.code, "IDENTITY_ERROR");
  t.true(error.message.includes("spiffe://cluster.local/ns/default/sa/sleep-other"));
  t.true(error.message.includes(`not the requested ${formatSpiffeId(sleep)}`));
});

test("untrusted CA TLS certificate is rejected", async (t) => {
  const { server, dir, client } = await setup(t);
  const unrelated = path.join(dir, "unrelated-root.pem");
  fs.writeFileSync(unrelated, await createUnrelatedRootPem());

  const error = await issueError(t, client({ rootCertFile: unrelated }).issue(sleep, 600));

  t.is(error.code, "CA_UNAVAILABLE");
  t.true(error.message.includes(unrelated));
  t.is(server.requests.length, 0);
});

test("CA TLS name mismatch is rejected", async (t) => {
  const { server, client } = await setup(t);

  const error = await issueError(t, client({ tlsServerName: "istiod.other.svc" }).issue(sleep, 600));

  t.is(error.code, "CA_UNAVAILABLE");
  t.true(error.message.includes("istiod.other.svc"));
  t.is(server.requests.length, 0);
});

test("default TLS name is the address host", async (t) => {
  const { client } = await setup(t);

  const issued = await client({ tlsServerName: undefined }).issue(sleep, 600);

  t.true(isLeafFor(issued.certPem, sleep));
});

for (const splitRoots of [false, true]) {
  const form = splitRoots ? "split" : "joined";

  test(`rotated roots are both returned (${form})`, async (t) => {
    const { server, client } = await setup(t, { splitRoots });
    const caClient = client();
    const before = await caClient.issue(sleep, 600);
    await server.rotateRoot();

    const during = await caClient.issue(sleep, 600);
    server.endRootOverlap();
    const after = await caClient.issue(sleep, 600);

    t.is(certificatesIn(before.caRootsPem).length, 1);
    const [oldRoot, newRoot] = certificatesIn(during.caRootsPem);
    t.is(certificatesIn(during.caRootsPem).length, 2);
    t.is(oldRoot.fingerprint256, certificatesIn(before.caRootsPem)[0].fingerprint256);
    t.true(new crypto.X509Certificate(during.certPem).verify(newRoot.publicKey));
    t.is(certificatesIn(after.caRootsPem).length, 1);
    t.is(certificatesIn(after.caRootsPem)[0].fingerprint256, newRoot.fingerprint256);
    t.is(during.chainPem, during.certPem);
  });

  test(`intermediate is in the chain (${form})`, async (t) => {
    const { server, client } = await setup(t, { splitRoots, intermediate: true });
    const caClient = client();
    await server.rotateRoot();

    const issued = await caClient.issue(sleep, 600);

    t.is(issued.chainPem, issued.certPem + server.intermediatePem);
    t.is(certificatesIn(issued.chainPem).length, 2);
    t.is(issued.caRootsPem, server.rootsPem);
    t.is(certificatesIn(issued.caRootsPem).length, 2);
    t.notThrows(() => withSecureContext(issued));
  });
}

test("response checks reject malformed chains", async (t) => {
  const request = await createCertificateRequest(sleep);
  const other = await createCertificateRequest(sleep);
  const { server, client } = await setup(t);
  const issued = await client().issue(sleep, 600);
  const unrelatedRoot = await createUnrelatedRootPem();
  const cases: Array<{ name: string; chain: string[]; pattern: RegExp; forRequest?: typeof request; now?: Date }> = [
    { name: "empty", chain: [], pattern: /0 element/ },
    { name: "leaf only", chain: [issued.certPem], pattern: /1 element/ },
    { name: "garbage", chain: ["not a certificate", server.rootsPem], pattern: /element 0 contains no PEM certificate/ },
    { name: "other key", chain: [issued.certPem, server.rootsPem], pattern: /public key/, forRequest: other },
    { name: "other root", chain: [issued.certPem, unrelatedRoot], pattern: /does not end at any of the 1 root/ },
    { name: "leaf as root", chain: [issued.certPem, issued.certPem], pattern: /root 1 .* is not a self-signed CA certificate/ },
    { name: "expired", chain: [issued.certPem, server.rootsPem], pattern: /expired/, now: new Date(Date.now() + 3600_000) },
    { name: "not yet valid", chain: [issued.certPem, server.rootsPem], pattern: /not valid before/, now: new Date(Date.now() - 3600_000) },
  ];
  // The issued certificate belongs to the client's own request; rebuild a request with the same key for the checks.
  const sameKey = { ...request, publicKeySpki: publicKeySpkiOf(issued.keyPem), keyPem: issued.keyPem };

  for (const { name, chain, pattern, forRequest, now } of cases) {
    const error = t.throws(() => parseCertificateResponse(forRequest ?? sameKey, chain, "ca.test:15012", now), { instanceOf: AgentError }, name);
    t.is((error as AgentError).code, "CA_REJECTED", name);
    t.regex((error as AgentError).message, pattern, name);
  }
});

test("client rejects bad configuration", async (t) => {
  const { dir, tokenFile, rootCertFile } = await setup(t);
  const missingRoot = path.join(dir, "missing-root.pem");

  const noRoot = t.throws(() => new IstioCaClient({ address: "127.0.0.1:1", rootCertFile: missingRoot, tokenFile }), { instanceOf: AgentError });
  const badAddress = t.throws(() => new IstioCaClient({ address: "istiod", rootCertFile, tokenFile }), { instanceOf: AgentError });
  const noProto = t.throws(() => loadCertificateService(path.join(dir, "ca.proto")), { instanceOf: AgentError });

  t.true(noRoot?.message.includes(missingRoot));
  t.regex(badAddress?.message ?? "", /expected host:port/);
  t.true(noProto?.message.includes(path.join(dir, "ca.proto")));
});

test.serial("no secret in errors or logs", async (t) => {
  const { server, tokenFile, client } = await setup(t);
  const lines: string[] = [];
  const logger = pino({ level: "trace" }, { write: (line: string) => lines.push(line) });
  const caClient = client({ logger, requestTimeoutMs: 1000 });
  const messages: string[] = [];
  const capture = async (promise: Promise<IssuedCertificate>): Promise<void> => {
    try {
      await promise;
    } catch (error) {
      messages.push(String((error as Error).message), String((error as Error).stack), JSON.stringify(error));
    }
  };

  const issued = await caClient.issue(sleep, 600);
  server.failNext(1, grpc.status.UNAVAILABLE);
  await capture(caClient.issue(sleep, 600));
  server.failNext(1, grpc.status.UNAUTHENTICATED);
  await capture(caClient.issue(sleep, 600));
  server.wrongIdentity(true);
  await capture(caClient.issue(sleep, 600));
  server.wrongIdentity(false);
  server.stall("forever");
  await capture(caClient.issue(sleep, 600));
  server.release();
  fs.writeFileSync(tokenFile, "unknown-token-7f7f7f");
  await capture(caClient.issue(sleep, 600));

  t.true(lines.length >= 6, `${lines.length} log lines`);
  t.is(messages.length, 15);
  const secrets = [AGENT_TOKEN, "unknown-token-7f7f7f", base64Body(issued.keyPem), ...server.requests.map((seen) => base64Body(seen.csrPem))];
  for (const text of [...lines, ...messages]) {
    for (const secret of secrets) {
      t.false(text.includes(secret), `secret found in: ${text.slice(0, 200)}`);
    }
  }
});

/** Returns the second base64 line of a PEM block, which comes after the ASN.1 headers that every P-256 key and CSR share. */
function base64Body(pem: string): string {
  return pem.split("\n")[2];
}
