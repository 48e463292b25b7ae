// The identity figures of `make bench`: the cost of issuing one certificate with the embedded CA,
// and 1,000 identities re-issued under mutual-TLS load. The re-issue runs once with the embedded CA
// and once with the test Istio CA over gRPC (test/harness/istio-ca-server.ts, istiod's stand-in).

import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { IstioCaClient } from "../../agent/identity/istio-ca";
import { IstioCaServer } from "../harness/istio-ca-server";
import { benchIssue, type IssueFigures } from "./cert-issue";
import { measureRotation, ROTATION_FULL, ROTATION_QUICK, type RotationFigures } from "./cert-rotation";

export interface IdentityFigures {
  issue: IssueFigures;
  rotation_embedded: RotationFigures;
  rotation_istio_ca: RotationFigures;
}

const AGENT_IDENTITY = { trustDomain: "cluster.local", namespace: "istio-system", serviceAccount: "ambient-agent" };

export async function measureIdentity(quick: boolean, step: (message: string) => void): Promise<IdentityFigures> {
  const settings = quick ? ROTATION_QUICK : ROTATION_FULL;
  step("identity: timing certificate issuance");
  const issue = await benchIssue(quick ? 100 : 300);
  step(`identity: ${settings.identities} identities re-issued by the embedded CA under load`);
  const rotationEmbedded = await measureRotation(settings);
  step(`identity: ${settings.identities} identities re-issued by the test Istio CA over gRPC under load`);
  const rotationIstio = await withIstioCa((client) => measureRotation(settings, client));
  return { issue, rotation_embedded: rotationEmbedded, rotation_istio_ca: rotationIstio };
}

/** Runs `body` with a client of a test Istio CA on loopback, and removes both afterwards. */
async function withIstioCa<T>(body: (client: IstioCaClient) => Promise<T>): Promise<T> {
  const token = `bench-token-${process.pid}`;
  const server = await IstioCaServer.start({ tokens: { [token]: AGENT_IDENTITY }, trustedNodeAccounts: [AGENT_IDENTITY] });
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "aa-bench-istio-ca-"));
  let client: IstioCaClient | undefined;
  try {
    fs.writeFileSync(path.join(dir, "token"), token, { mode: 0o600 });
    fs.writeFileSync(path.join(dir, "root.pem"), server.tlsRootPem);
    client = new IstioCaClient({
      address: server.address,
      rootCertFile: path.join(dir, "root.pem"),
      tokenFile: path.join(dir, "token"),
      tlsServerName: "istiod.istio-system.svc",
    });
    return await body(client);
  } finally {
    client?.close();
    await server.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
