import { EventEmitter } from "node:events";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import test from "ava";
import { AgentError } from "../../agent/errors";
import { EmbeddedCa, initCa } from "../../agent/identity/ca";
import type { CertificateIssuer, IssuedCertificate } from "../../agent/identity/certificate";
import { CertManager, MAX_RETRY_MS, refreshTime, retryDelay, type CertManagerOptions } from "../../agent/identity/cert-manager";
import { silentLogger } from "../../agent/log";
import type { Identity } from "../../agent/state/types";

const sleep: Identity = { trustDomain: "cluster.local", namespace: "default", serviceAccount: "sleep" };
const echo: Identity = { trustDomain: "cluster.local", namespace: "apps", serviceAccount: "echo" };
const HOUR = 3600_000;

let ca: EmbeddedCa;

test.before(async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "aa-certmgr-"));
  await initCa(dir);
  ca = await EmbeddedCa.load(dir);
  fs.rmSync(dir, { recursive: true, force: true });
});

/**
 * Issues real certificates from the embedded CA, stamped with the fake clock's validity so that the
 * manager's timing can be driven. It can fail, hold requests until released, or sign for another identity.
 */
class FakeIssuer implements CertificateIssuer {
  calls = 0;
  order: string[] = [];
  failing = false;
  answerFor: Identity | undefined;
  inFlight = 0;
  maxInFlight = 0;
  #gate: Promise<void> | undefined;
  #open: () => void = () => undefined;

  constructor(private readonly clock: { now: number }) {}

  hold(): void {
    this.#gate = new Promise((resolve) => (this.#open = resolve));
  }

  release(): void {
    this.#gate = undefined;
    this.#open();
  }

  async issue(identity: Identity): Promise<IssuedCertificate> {
    this.calls += 1;
    this.order.push(identity.serviceAccount);
    this.inFlight += 1;
    this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
    try {
      await new Promise((resolve) => setTimeout(resolve, 5));
      while (this.#gate) await this.#gate;
      if (this.failing) throw new Error("CA unavailable");
      const issued = await ca.issue(this.answerFor ?? identity);
      return { ...issued, notBefore: new Date(this.clock.now), notAfter: new Date(this.clock.now + 24 * HOUR) };
    } finally {
      this.inFlight -= 1;
    }
  }
}

function setup(t: import("ava").ExecutionContext, options: CertManagerOptions = {}) {
  const clock = { now: Date.now() };
  const issuer = new FakeIssuer(clock);
  const manager = new CertManager(issuer, silentLogger(), { now: () => clock.now, ...options });
  t.teardown(() => manager.close());
  return { clock, issuer, manager };
}

const settle = (ms = 50): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** Waits until `condition` holds, checking every 10 ms; throws after timeoutMs. */
async function waitUntil(condition: () => boolean, what: string, timeoutMs = 3_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await settle(10);
  }
}

test.serial("get caches one certificate and one secure context per identity", async (t) => {
  const { issuer, manager } = setup(t);

  const first = await manager.get(sleep);
  const second = await manager.get({ ...sleep });
  const other = await manager.get(echo);

  t.is(first, second);
  t.is(first.secureContext, second.secureContext);
  t.not(first, other);
  t.is(issuer.calls, 2);
  t.is(manager.list().length, 2);
});

test.serial("concurrent gets share one request", async (t) => {
  const { issuer, manager } = setup(t);

  const results = await Promise.all([manager.get(sleep), manager.get(sleep), manager.get(sleep)]);

  t.is(issuer.calls, 1);
  t.is(results[0], results[1]);
  t.is(results[1], results[2]);
});

test.serial("a certificate is re-issued at half its lifetime while the current one serves", async (t) => {
  const { clock, issuer, manager } = setup(t);
  const first = await manager.get(sleep);

  clock.now += 11 * HOUR;
  t.is(await manager.get(sleep), first);
  t.is(issuer.calls, 1);

  clock.now += 2 * HOUR;
  t.is(await manager.get(sleep), first, "the current certificate is served while the new one is issued");
  await waitUntil(() => manager.list()[0] !== first, "the background refresh");
  const renewed = await manager.get(sleep);

  t.not(renewed, first);
  t.not(renewed.secureContext, first.secureContext);
  t.is(issuer.calls, 2);
});

test.serial("an expired certificate is never returned", async (t) => {
  const { clock, issuer, manager } = setup(t);
  const first = await manager.get(sleep);
  clock.now += 25 * HOUR;

  const second = await manager.get(sleep);

  t.not(second, first);
  t.is(issuer.calls, 2);
});

test.serial("get without a certificate times out with NO_CERTIFICATE", async (t) => {
  const { issuer, manager } = setup(t, { getTimeoutMs: 100 });
  issuer.failing = true;

  const error = await t.throwsAsync(manager.get(sleep), { instanceOf: AgentError });

  t.is(error?.code, "NO_CERTIFICATE");
  t.regex(error?.message ?? "", /spiffe:\/\/cluster\.local\/ns\/default\/sa\/sleep.*CA unavailable/);
  t.is(manager.status()[0].state, "failing");
});

test.serial("a failed refresh keeps the current certificate and waits for its backoff", async (t) => {
  const { clock, issuer, manager } = setup(t);
  const first = await manager.get(sleep);
  issuer.failing = true;
  clock.now += 13 * HOUR;

  t.is(await manager.get(sleep), first);
  await settle();
  t.is(await manager.get(sleep), first);
  await settle();

  t.is(issuer.calls, 2, "gets during the backoff do not ask the CA again");
  const status = manager.status()[0];
  t.is(status.state, "failing");
  t.is(status.failures, 1);
  t.regex(status.lastError ?? "", /CA unavailable/);
});

test.serial("a failed refresh is retried in the background after its backoff", async (t) => {
  const { clock, issuer, manager } = setup(t, { random: () => 0 });
  const first = await manager.get(sleep);
  issuer.failing = true;
  clock.now += 13 * HOUR;
  await manager.get(sleep);
  await waitUntil(() => manager.status()[0].failures === 1, "the failed refresh");
  issuer.failing = false;

  // The first retry comes 0.8 s later: 1 s with the largest downward jitter.
  await waitUntil(() => manager.status()[0].state === "valid", "the retry", 3_000);

  t.is(issuer.calls, 3);
  t.not(await manager.get(sleep), first);
  t.is(manager.status()[0].state, "valid");
});

test.serial("the refresh point counts from the certificate's arrival when its notBefore is dated back", (t) => {
  const now = Date.parse("2026-12-05T00:00:00Z");
  t.is(refreshTime({ notBefore: new Date(now - 60_000), notAfter: new Date(now + 40_000) }, now), now + 20_000);
  t.is(refreshTime({ notBefore: new Date(now), notAfter: new Date(now + 24 * HOUR) }, now - 5_000), now + 12 * HOUR);
});

test.serial("retry delays double from 1 s to 150 s with 20% jitter", (t) => {
  t.is(retryDelay(1, 0.5), 1_000);
  t.is(retryDelay(2, 0.5), 2_000);
  t.is(retryDelay(5, 0.5), 16_000);
  t.is(retryDelay(8, 0.5), 128_000);
  t.is(retryDelay(9, 0.5), MAX_RETRY_MS);
  t.is(retryDelay(40, 0.5), MAX_RETRY_MS);
  t.is(retryDelay(1, 0), 800);
  t.is(retryDelay(1, 0.999999), 1_200);
  t.true(retryDelay(20, 0.999999) <= MAX_RETRY_MS);
  t.is(retryDelay(20, 0), 120_000);
});

test.serial("a response for another identity is rejected", async (t) => {
  const { issuer, manager } = setup(t, { getTimeoutMs: 100 });
  issuer.answerFor = echo;

  const error = await t.throwsAsync(manager.get(sleep), { instanceOf: AgentError });

  t.is(error?.code, "NO_CERTIFICATE");
  t.regex(manager.status()[0].lastError ?? "", /certificate for spiffe:\/\/cluster\.local\/ns\/apps\/sa\/echo when spiffe:\/\/cluster\.local\/ns\/default\/sa\/sleep was requested/);
  t.is(manager.list().length, 0);
});

test.serial("at most 8 requests reach the CA at once", async (t) => {
  const { issuer, manager } = setup(t);
  issuer.hold();
  const identities = Array.from({ length: 20 }, (_, index) => ({ ...sleep, serviceAccount: `sa-${index}` }));
  for (const identity of identities) manager.retain(identity, `default/pod-${identity.serviceAccount}`);
  await settle();

  t.is(issuer.inFlight, 8);
  t.deepEqual(manager.queue, { waiting: 12, inFlight: 8 });
  issuer.release();
  await Promise.all(identities.map((identity) => manager.get(identity)));

  t.is(issuer.maxInFlight, 8);
  t.is(issuer.calls, 20);
});

test.serial("a waiting connection goes before a new workload, which goes before a refresh", async (t) => {
  const { clock, issuer, manager } = setup(t, { maxInFlight: 1 });
  const refreshed = { ...sleep, serviceAccount: "refreshed" };
  await manager.get(refreshed);
  issuer.hold();
  manager.retain({ ...sleep, serviceAccount: "blocker" }, "default/blocker");
  await settle();

  clock.now += 13 * HOUR;
  void manager.get(refreshed);
  manager.retain({ ...sleep, serviceAccount: "arrived" }, "default/arrived");
  const connection = manager.get({ ...sleep, serviceAccount: "connection" });
  issuer.release();
  await connection;
  await settle(100);

  t.deepEqual(issuer.order, ["refreshed", "blocker", "connection", "arrived", "refreshed"]);
});

test.serial("retain fetches before any connection; the last release drops the certificate", async (t) => {
  const { issuer, manager } = setup(t);

  manager.retain(sleep, "default/sleep-1");
  manager.retain(sleep, "default/sleep-2");
  await settle();
  t.is(issuer.calls, 1);
  t.is(manager.list().length, 1);
  t.deepEqual(manager.status()[0].workloads, ["default/sleep-1", "default/sleep-2"]);

  manager.release(sleep, "default/sleep-1");
  t.is(manager.list().length, 1, "another workload still runs as the identity");
  manager.release(sleep, "default/sleep-2");
  t.is(manager.list().length, 0);

  await manager.get(sleep);
  t.is(issuer.calls, 2);
});

test.serial("expected pods keep their certificate through a failed start", async (t) => {
  const { issuer, manager } = setup(t);

  manager.expectPods(new Map([["default/sleep-1", sleep]]));
  await settle();
  t.is(issuer.calls, 1);
  t.deepEqual(manager.status()[0].workloads, ["default/sleep-1"]);

  // The pod's listeners start and fail: its proxies retain and release the identity.
  manager.retain(sleep, "default/sleep-1#proxies");
  manager.release(sleep, "default/sleep-1#proxies");
  t.is(manager.list().length, 1, "the pod is still to be enrolled");

  manager.expectPods(new Map([["default/sleep-1", sleep]]));
  await settle();
  t.is(issuer.calls, 1, "an unchanged expectation requests nothing");

  manager.expectPods(new Map());
  t.is(manager.list().length, 0);
});

test.serial("rotation listeners hear each new certificate until they unsubscribe", async (t) => {
  const { clock, manager } = setup(t);
  const seen: string[] = [];
  const stop = manager.onRotation(sleep, (certificate) => seen.push(certificate.certPem));
  manager.onRotation(echo, () => t.fail("another identity's listener is not called"));

  const first = await manager.get(sleep);
  clock.now += 13 * HOUR;
  await manager.get(sleep);
  await waitUntil(() => seen.length === 2, "the rotation");
  const second = await manager.get(sleep);
  stop();
  clock.now += 13 * HOUR;
  await manager.get(sleep);
  await settle();

  t.deepEqual(seen, [first.certPem, second.certPem]);
});

/** A trust bundle stand-in: the CA's roots plus extra roots set by the test. */
class FakeTrust extends EventEmitter {
  caRoots = "";
  extra = "";
  pem(): string {
    return this.caRoots + this.extra;
  }
  setCaRoots(pem: string): void {
    if (pem === this.caRoots) return;
    this.caRoots = pem;
    this.emit("change");
  }
  setExtra(pem: string): void {
    this.extra = pem;
    this.emit("change");
  }
}

test.serial("trust change rebuilds each context once", async (t) => {
  const trust = new FakeTrust();
  const { manager } = setup(t, { trust });
  const sleepCert = await manager.get(sleep);
  const echoCert = await manager.get(echo);
  t.is(sleepCert.rootPem, ca.rootPem);
  const rotations: string[] = [];
  manager.onRotation(sleep, () => rotations.push("sleep"));
  manager.onRotation(echo, () => rotations.push("echo"));

  trust.setExtra(ca.rootPem);
  const rebuilt = await manager.get(sleep);

  t.deepEqual(rotations.sort(), ["echo", "sleep"]);
  t.not(rebuilt.secureContext, sleepCert.secureContext);
  t.is(rebuilt.certPem, sleepCert.certPem, "the key and chain stay");
  t.is(rebuilt.rootPem, trust.pem());
  t.not((await manager.get(echo)).secureContext, echoCert.secureContext);
});

test.serial("roots the trust bundle refuses fail the request, not the agent", async (t) => {
  const trust = new FakeTrust();
  trust.setCaRoots = () => {
    throw new Error("the CA's roots hold a certificate that is not a CA");
  };
  const { issuer, manager } = setup(t, { trust, getTimeoutMs: 200 });

  const error = await t.throwsAsync(manager.get(sleep), { instanceOf: AgentError });

  t.is(error?.code, "NO_CERTIFICATE");
  t.is(issuer.calls, 1);
  t.regex(manager.status()[0].lastError ?? "", /not a CA/);
  t.is(manager.list().length, 0);
});

test.serial("status carries no key material", async (t) => {
  const { manager } = setup(t);
  const certificate = await manager.get(sleep);

  const text = JSON.stringify(manager.status());

  t.false(text.includes("PRIVATE KEY"));
  t.false(text.includes(certificate.keyPem.split("\n")[1]));
  t.true(text.includes(sleep.serviceAccount));
});

test.serial("a dropped identity fails its waiting callers", async (t) => {
  const { issuer, manager } = setup(t);
  issuer.hold();
  manager.retain(sleep, "default/sleep");
  const waiting = manager.get(sleep);

  manager.release(sleep, "default/sleep");
  issuer.release();

  const error = await t.throwsAsync(waiting, { instanceOf: AgentError });
  t.regex(error?.message ?? "", /dropped/);
  await settle();
  t.is(manager.list().length, 0, "the answer for a dropped identity is not stored");
});
