import test from "ava";
import net from "node:net";
import type { PodNetwork } from "../../agent/proxy/pod-network";
import { connectTcp } from "../../agent/proxy/tcp";

/** A network whose connects never complete, as to a host that drops SYNs. */
const silentNetwork: PodNetwork = {
  listen: async () => undefined,
  connect: () => new net.Socket(),
};

test("connectTcp rejects when the pending socket is destroyed", async (t) => {
  let pending: net.Socket | undefined;
  const connecting = connectTcp(silentNetwork, "192.0.2.1", 80, 60_000, (socket) => (pending = socket));
  t.truthy(pending, "onSocket did not receive the socket at once");
  pending!.destroy();
  await t.throwsAsync(connecting, { message: /connect to 192\.0\.2\.1:80 was aborted/ });
});

test("connectTcp times out a connect that never completes", async (t) => {
  await t.throwsAsync(connectTcp(silentNetwork, "192.0.2.1", 80, 50), { message: /timed out after 50 ms/ });
});
