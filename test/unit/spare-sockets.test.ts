// The spare-socket reserve with a fake socket maker. The fake hands out descriptors of /dev/null,
// so that the reserve can close them like sockets, and counts how often it was called.
import test from "ava";
import fs from "node:fs";

import { registerAgentSocketMap, unregisterAgentSocketMap } from "../../agent/capture/native";
import { SPARE_SOCKET_BATCH, SpareSockets, type SocketMaker } from "../../agent/capture/spare-sockets";

interface FakeMaker extends SocketMaker {
  batches: number;
  singles: number;
  failBatch: boolean;
  /** Descriptors handed out and not yet closed by the reserve or the test. */
  open: Set<number>;
}

function fakeMaker(): FakeMaker {
  const maker: FakeMaker = {
    batches: 0,
    singles: 0,
    failBatch: false,
    open: new Set(),
    batch(count: number): number[] {
      maker.batches++;
      if (maker.failBatch) throw new Error("batch failed with EMFILE");
      return Array.from({ length: count }, () => openFd(maker));
    },
    one(): number {
      maker.singles++;
      return openFd(maker);
    },
  };
  return maker;
}

function openFd(maker: FakeMaker): number {
  const fd = fs.openSync("/dev/null", "r");
  maker.open.add(fd);
  return fd;
}

/** Counts the maker's descriptors that are still open in this process. */
function stillOpen(maker: FakeMaker): number {
  let count = 0;
  for (const fd of maker.open) {
    try {
      fs.fstatSync(fd);
      count++;
    } catch {
      maker.open.delete(fd);
    }
  }
  return count;
}

/** Closes descriptors that the test took from the reserve, as a connect would hand them to a socket. */
function release(maker: FakeMaker, fds: number[]): void {
  for (const fd of fds) {
    fs.closeSync(fd);
    maker.open.delete(fd);
  }
}

test("take refills one batch", (t) => {
  const maker = fakeMaker();
  const spares = new SpareSockets(maker);
  const taken = [spares.take(), spares.take()];
  t.is(maker.batches, 1);
  t.is(maker.singles, 0);
  t.is(spares.count, SPARE_SOCKET_BATCH - 2);
  t.is(new Set(taken).size, 2);
  release(maker, taken);
  spares.close();
  t.is(stillOpen(maker), 0);
});

test("take past a batch refills again", (t) => {
  const maker = fakeMaker();
  const spares = new SpareSockets(maker);
  const taken: number[] = [];
  for (let index = 0; index < SPARE_SOCKET_BATCH + 1; index++) taken.push(spares.take());
  t.is(maker.batches, 2);
  t.is(spares.count, SPARE_SOCKET_BATCH - 1);
  release(maker, taken);
  spares.close();
  t.is(stillOpen(maker), 0);
});

test("failed batch falls back to one", (t) => {
  const maker = fakeMaker();
  maker.failBatch = true;
  const spares = new SpareSockets(maker);
  const fd = spares.take();
  t.is(maker.batches, 1);
  t.is(maker.singles, 1);
  t.is(spares.count, 0);
  release(maker, [fd]);
});

test("close drops spares, then one per take", (t) => {
  const maker = fakeMaker();
  const spares = new SpareSockets(maker);
  release(maker, [spares.take()]);
  t.is(stillOpen(maker), SPARE_SOCKET_BATCH - 1);
  spares.close();
  t.is(spares.count, 0);
  t.is(stillOpen(maker), 0);

  const late = spares.take();
  t.is(maker.singles, 1);
  t.is(maker.batches, 1);
  t.is(spares.count, 0);
  release(maker, [late]);
  t.notThrows(() => spares.close());
});

test("new agent socket map drops spares", (t) => {
  const maker = fakeMaker();
  const spares = new SpareSockets(maker);
  release(maker, [spares.take()]);

  // Registering and unregistering a map bumps agentSocketMapVersion(), as a Capture attach does.
  registerAgentSocketMap(-1);
  unregisterAgentSocketMap(-1);
  const fresh = spares.take();
  t.is(maker.batches, 2);
  t.is(stillOpen(maker), SPARE_SOCKET_BATCH);
  release(maker, [fresh]);
  spares.close();
  t.is(stillOpen(maker), 0);
});
