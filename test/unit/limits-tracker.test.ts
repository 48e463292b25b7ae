import test from "ava";
import { LimitTracker, resolveLimitOptions } from "../../agent/proxy/limit-tracker";
import { DEFAULT_LIMITS } from "../../agent/proxy/limits";
import { createLogger } from "../../agent/log";

const LIMITS = { ...DEFAULT_LIMITS, maxConnectionsPerPod: 2, maxConnectionsPerPeer: 1, maxStreamsPerPeer: 3, maxBufferedBytes: 100 };

test("pod limit refuses past the maximum", (t) => {
  const tracker = new LimitTracker(LIMITS);
  const first = tracker.acquire("default/a", "outbound");
  const second = tracker.acquire("default/a", "outbound");
  t.truthy(first);
  t.truthy(second);
  t.is(tracker.acquire("default/a", "outbound"), undefined);
  t.is(tracker.podCount("default/a", "outbound"), 2);
  first!();
  t.truthy(tracker.acquire("default/a", "outbound"));
});

test("pod directions and pods count apart", (t) => {
  const tracker = new LimitTracker(LIMITS);
  tracker.acquire("default/a", "outbound");
  tracker.acquire("default/a", "outbound");
  t.truthy(tracker.acquire("default/a", "inbound"));
  t.truthy(tracker.acquire("default/b", "outbound"));
});

test("release is idempotent", (t) => {
  const tracker = new LimitTracker(LIMITS);
  const release = tracker.acquire("default/a", "inbound")!;
  tracker.acquire("default/a", "inbound");
  release();
  release();
  t.is(tracker.podCount("default/a", "inbound"), 1);
});

test("released keys leave the maps", (t) => {
  const tracker = new LimitTracker(LIMITS);
  const releases = [
    tracker.acquire("default/a", "inbound"),
    tracker.acquirePeer("default/a", "inbound", "10.232.0.5"),
    tracker.acquirePeer("default/a", "inbound_plaintext", "10.232.0.5"),
    tracker.acquirePeerStream("default/a", "spiffe://cluster.local/ns/default/sa/b"),
  ];
  t.is(tracker.keyCount(), 4);
  for (const release of releases) release!();
  t.is(tracker.keyCount(), 0);
});

test("peer limit is per pod, listener and IP", (t) => {
  const tracker = new LimitTracker(LIMITS);
  t.truthy(tracker.acquirePeer("default/a", "inbound", "10.232.0.5"));
  t.is(tracker.acquirePeer("default/a", "inbound", "10.232.0.5"), undefined);
  t.truthy(tracker.acquirePeer("default/a", "inbound_plaintext", "10.232.0.5"));
  t.truthy(tracker.acquirePeer("default/a", "inbound", "10.232.0.6"));
  t.truthy(tracker.acquirePeer("default/b", "inbound", "10.232.0.5"));
});

test("peer stream limit is per pod and identity", (t) => {
  const tracker = new LimitTracker(LIMITS);
  const identity = "spiffe://cluster.local/ns/default/sa/b";
  for (let i = 0; i < 3; i += 1) t.truthy(tracker.acquirePeerStream("default/a", identity));
  t.is(tracker.acquirePeerStream("default/a", identity), undefined);
  t.truthy(tracker.acquirePeerStream("default/a", "spiffe://cluster.local/ns/default/sa/c"));
  t.truthy(tracker.acquirePeerStream("default/c", identity));
});

test("buffered bytes exceed only above the maximum", (t) => {
  const tracker = new LimitTracker(LIMITS);
  tracker.buffered.add(100);
  t.false(tracker.buffered.exceeded);
  tracker.buffered.add(1);
  t.true(tracker.buffered.exceeded);
  tracker.buffered.subtract(101);
  t.is(tracker.buffered.bytes, 0);
  t.false(tracker.buffered.exceeded);
});

test("missing limit options get a private tracker", (t) => {
  const logger = createLogger({}, "silent");
  const { tracker, refusals } = resolveLimitOptions({ limits: LIMITS }, "aalim-n1", logger);
  t.is(tracker.limits.maxConnectionsPerPod, 2);
  refusals.refuse({ listener: "outbound", port: 15001, src: { addr: "10.232.0.2:1" }, reason: "connections_per_pod", message: "test" });
  t.deepEqual(refusals.totals(), [{ listener: "outbound", reason: "connections_per_pod", count: 1 }]);
  const shared = new LimitTracker(LIMITS);
  t.is(resolveLimitOptions({ limitTracker: shared }, "aalim-n1", logger).tracker, shared);
});
