import tls from "node:tls";
import test from "ava";
import { AgentError } from "../../agent/errors";
import { CertManager, type CertificateIssuer, type WorkloadCertificate } from "../../agent/identity/cert-manager";
import { silentLogger } from "../../agent/log";
import type { Identity } from "../../agent/state/types";

const sleep: Identity = { trustDomain: "cluster.local", namespace: "default", serviceAccount: "sleep" };
const echo: Identity = { trustDomain: "cluster.local", namespace: "apps", serviceAccount: "echo" };
const HOUR = 3600_000;

/** An issuer that counts calls, stamps certificates with the fake clock, and can be made to fail. */
class FakeIssuer implements CertificateIssuer {
  calls = 0;
  failing = false;
  constructor(private readonly clock: { now: number }) {}

  async issue(identity: Identity): Promise<WorkloadCertificate> {
    this.calls += 1;
    await new Promise((resolve) => setTimeout(resolve, 10));
    if (this.failing) {
      throw new Error("CA unavailable");
    }
    return {
      identity,
      certPem: `cert ${this.calls}`,
      keyPem: "",
      chainPem: "",
      rootPem: "",
      caRootsPem: "",
      notBefore: new Date(this.clock.now),
      notAfter: new Date(this.clock.now + 24 * HOUR),
      secureContext: tls.createSecureContext(),
    };
  }
}

function setup(t: import("ava").ExecutionContext) {
  const clock = { now: Date.parse("2026-01-01T00:00:00Z") };
  const issuer = new FakeIssuer(clock);
  const manager = new CertManager(issuer, silentLogger(), { now: () => clock.now });
  t.teardown(() => manager.close());
  return { clock, issuer, manager };
}

test("get caches per identity", async (t) => {
  const { issuer, manager } = setup(t);

  const first = await manager.get(sleep);
  const second = await manager.get({ ...sleep });
  const other = await manager.get(echo);

  t.is(first, second);
  t.not(first, other);
  t.is(issuer.calls, 2);
  t.is(manager.list().length, 2);
});

test("concurrent gets share one issuance", async (t) => {
  const { issuer, manager } = setup(t);

  const results = await Promise.all([manager.get(sleep), manager.get(sleep), manager.get(sleep)]);

  t.is(issuer.calls, 1);
  t.is(results[0], results[1]);
  t.is(results[1], results[2]);
});

test("get re-issues past half lifetime", async (t) => {
  const { clock, issuer, manager } = setup(t);
  const first = await manager.get(sleep);

  clock.now += 11 * HOUR;
  t.is(await manager.get(sleep), first);
  t.is(issuer.calls, 1);

  clock.now += 2 * HOUR;
  t.is(await manager.get(sleep), first, "the current certificate is served while the new one is issued");
  await new Promise((resolve) => setTimeout(resolve, 50));
  const renewed = await manager.get(sleep);

  t.not(renewed, first);
  t.is(issuer.calls, 2);
});

test("get issues anew after expiry", async (t) => {
  const { clock, issuer, manager } = setup(t);
  const first = await manager.get(sleep);
  clock.now += 25 * HOUR;

  const second = await manager.get(sleep);

  t.not(second, first);
  t.is(issuer.calls, 2);
});

test("failed issuance throws NO_CERTIFICATE", async (t) => {
  const { issuer, manager } = setup(t);
  issuer.failing = true;

  const error = await t.throwsAsync(manager.get(sleep), { instanceOf: AgentError });

  t.is(error?.code, "NO_CERTIFICATE");
  t.regex(error?.message ?? "", /spiffe:\/\/cluster\.local\/ns\/default\/sa\/sleep.*CA unavailable/);
});

test("failed refresh keeps the current certificate", async (t) => {
  const { clock, issuer, manager } = setup(t);
  const first = await manager.get(sleep);
  issuer.failing = true;
  clock.now += 13 * HOUR;

  t.is(await manager.get(sleep), first);
  await new Promise((resolve) => setTimeout(resolve, 50));

  t.is(await manager.get(sleep), first);
  t.is(issuer.calls, 2, "a retry waits for its backoff delay");
});

test("forget drops the certificate", async (t) => {
  const { issuer, manager } = setup(t);
  await manager.get(sleep);

  manager.forget(sleep);
  await manager.get(sleep);

  t.is(issuer.calls, 2);
});
