import test from "ava";
import fs from "node:fs";
import path from "node:path";
import { Writable } from "node:stream";
import v8 from "node:v8";
import vm from "node:vm";
import pino from "pino";
import { loggingPostRoutes } from "../../agent/admin/routes";
import {
  InvalidLogLevelError,
  LOG_COMPONENTS,
  LogLevels,
  accessLogger,
  createLevelledLogger,
  logLevelsOf,
  parseLogLevels,
  withLastComponentOnly,
  type Logger,
} from "../../agent/log";

/** Creates a logger tree that parses every line it writes into `lines`. */
function capture(levels: LogLevels): { root: Logger; lines: Record<string, unknown>[] } {
  const lines: Record<string, unknown>[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _encoding, done) {
      for (const line of chunk.toString().split("\n")) if (line !== "") lines.push(JSON.parse(line) as Record<string, unknown>);
      done();
    },
  });
  return { root: createLevelledLogger(levels, { node: "node-a" }, sink), lines };
}

/** pino's method for a disabled level: one shared no-op function. */
const DISABLED = pino({ level: "silent" }).info;

test("parse plain level", (t) => {
  t.deepEqual(parseLogLevels("debug"), { default: "debug", components: {} });
});

test("parse component pairs", (t) => {
  t.deepEqual(parseLogLevels("info,cni=debug,access=warn"), { default: "info", components: { cni: "debug", access: "warn" } });
  t.deepEqual(parseLogLevels("cni:debug, access:warn"), { components: { cni: "debug", access: "warn" } });
});

test("parse rejects unknown names", (t) => {
  const component = t.throws(() => parseLogLevels("info,bogus=debug"), { instanceOf: InvalidLogLevelError });
  t.regex(component?.message ?? "", /unknown log component "bogus"/);
  t.regex(component?.message ?? "", /valid components: access, admin, agent/);
  const level = t.throws(() => parseLogLevels("cni=verbose"), { instanceOf: InvalidLogLevelError });
  t.regex(level?.message ?? "", /unknown log level "verbose"; valid levels: fatal, error, warn, info, debug, trace, silent/);
  t.throws(() => parseLogLevels("loud"), { message: /unknown log level "loud"/ });
  t.throws(() => parseLogLevels(""), { message: /empty log level/ });
  t.throws(() => parseLogLevels(" , "), { message: /empty log level/ });
});

test("start-up levels per component", (t) => {
  const { root, lines } = capture(new LogLevels(parseLogLevels("warn,cni=debug")));
  const cni = root.child({ component: "cni" });
  const admin = root.child({ component: "admin" });
  cni.debug("cni debug");
  admin.info("admin info");
  root.info("root info");
  root.warn("root warn");
  t.deepEqual(
    lines.map((line) => line.msg),
    ["cni debug", "root warn"],
  );
});

test("change applies to existing children", (t) => {
  const levels = new LogLevels();
  const { root, lines } = capture(levels);
  const cni = root.child({ component: "cni" });
  const pod = cni.child({ pod: "shop/web" });
  t.is(pod.debug, DISABLED);
  levels.set(parseLogLevels("cni=debug"));
  pod.debug("pod debug");
  cni.debug("cni debug");
  root.debug("root debug");
  t.deepEqual(
    lines.map((line) => line.msg),
    ["pod debug", "cni debug"],
  );
});

test("change applies to new children", (t) => {
  const levels = new LogLevels();
  const { root, lines } = capture(levels);
  levels.set(parseLogLevels("enroll=debug"));
  root.child({ component: "enroll" }).child({ workload: "shop/web" }).debug("later child");
  t.deepEqual(
    lines.map((line) => line.msg),
    ["later child"],
  );
});

test("innermost component wins", (t) => {
  const levels = new LogLevels();
  const { root, lines } = capture(levels);
  const proxy = root.child({ component: "proxy", workload: "shop/web" });
  const outbound = proxy.child({ component: "outbound" });
  const access = accessLogger(outbound);
  levels.set(parseLogLevels("proxy=debug"));
  outbound.debug("outbound follows proxy");
  // The access log keeps its own level, whichever proxy logger it comes from.
  access.debug("access debug hidden");
  levels.set(parseLogLevels("access=warn"));
  access.info("access info hidden");
  access.warn("access warn shown");
  outbound.debug("outbound still debug");
  t.deepEqual(
    lines.map((line) => line.msg),
    ["outbound follows proxy", "access warn shown", "outbound still debug"],
  );
  t.is(lines[1].component, "access");
  t.is(lines[1].workload, "shop/web");
});

test("one component key per line", (t) => {
  const raw: string[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _encoding, done) {
      raw.push(...chunk.toString().split("\n").filter((line) => line !== ""));
      done();
    },
  });
  const levels = new LogLevels(parseLogLevels("info,outbound=debug"));
  const root = createLevelledLogger(levels, { node: "node-a" }, sink);
  const proxy = root.child({ component: "proxy", workload: "shop/web" });
  const outbound = proxy.child({ component: "outbound" });
  accessLogger(outbound.child({ connection: "c1" })).info("connection complete");
  outbound.debug("outbound debug");
  root.info("root info");
  t.is(raw.length, 3);
  t.is(raw[0].match(/"component":/g)?.length, 1, raw[0]);
  t.is(raw[1].match(/"component":/g)?.length, 1, raw[1]);
  t.is(raw[2].match(/"component":/g), null, raw[2]);
  const access = JSON.parse(raw[0]) as Record<string, unknown>;
  t.is(access.component, "access");
  t.is(access.workload, "shop/web");
  t.is(access.connection, "c1");
  t.is((JSON.parse(raw[1]) as Record<string, unknown>).component, "outbound");
});

test("nested component binding kept", (t) => {
  const bindings = ',"pid":1,"component":"proxy","peer":{"name":"a,b","component":"x"},"note":"\\",\\"component\\":","component":"access"';
  t.is(withLastComponentOnly(bindings), ',"pid":1,"peer":{"name":"a,b","component":"x"},"note":"\\",\\"component\\":","component":"access"');
  t.is(withLastComponentOnly(',"pid":1,"component":"cni"'), ',"pid":1,"component":"cni"');
});

test("access logger made once per parent", (t) => {
  const { root } = capture(new LogLevels());
  const proxy = root.child({ component: "proxy" });
  t.is(accessLogger(proxy), accessLogger(proxy));
});

test("level for all clears component levels", (t) => {
  const levels = new LogLevels(parseLogLevels("info,cni=debug"));
  const { root } = capture(levels);
  const cni = root.child({ component: "cni" });
  t.true(cni.isLevelEnabled("debug"));
  const changes = levels.set(parseLogLevels("warn"));
  t.false(cni.isLevelEnabled("info"));
  t.is(levels.view().components.cni, "warn");
  t.true(changes.includes("cni: debug -> warn"));
  t.true(changes.includes("agent: info -> warn"));
});

test("reset returns to start-up levels", (t) => {
  const levels = new LogLevels(parseLogLevels("info,cni=debug"));
  const { root } = capture(levels);
  const cni = root.child({ component: "cni" });
  levels.set(parseLogLevels("error"));
  t.is(cni.info, DISABLED);
  levels.reset();
  t.true(cni.isLevelEnabled("debug"));
  t.is(root.debug, DISABLED);
  t.deepEqual(levels.view().default, "info");
});

test("disabled levels stay no-op functions", (t) => {
  const levels = new LogLevels();
  const { root } = capture(levels);
  const child = root.child({ component: "proxy" });
  levels.set(parseLogLevels("proxy=warn"));
  t.is(child.info, DISABLED);
  t.is(child.debug, DISABLED);
  t.not(child.warn, DISABLED);
});

test("view lists every component", (t) => {
  const levels = new LogLevels(parseLogLevels("info,proxy=debug"));
  const { root } = capture(levels);
  root.child({ component: "proxy" }).child({ component: "outbound" });
  const view = levels.view();
  t.is(view.default, "info");
  for (const component of LOG_COMPONENTS) t.truthy(view.components[component], component);
  // outbound has been seen under proxy, so it reports the level it inherits.
  t.is(view.components.outbound, "debug");
  t.is(view.components.cni, "info");
});

test("levels reachable from any logger", (t) => {
  const levels = new LogLevels();
  const { root } = capture(levels);
  t.is(logLevelsOf(root.child({ component: "cni" }).child({ pod: "x" })), levels);
  t.is(logLevelsOf(pino()), undefined);
});

test("children without component not registered", (t) => {
  const levels = new LogLevels();
  const { root, lines } = capture(levels);
  const cni = root.child({ component: "cni" });
  const before = levels.liveLoggers();
  const requests = Array.from({ length: 100 }, (_, index) => cni.child({ request: index }));
  t.is(levels.liveLoggers(), before);
  levels.set(parseLogLevels("cni=debug"));
  requests[99].debug("inherited");
  t.deepEqual(
    lines.map((line) => line.msg),
    ["inherited"],
  );
});

test("collected children leave the registry", async (t) => {
  v8.setFlagsFromString("--expose-gc");
  const gc = vm.runInNewContext("gc") as () => void;
  const levels = new LogLevels();
  const { root } = capture(levels);
  const before = levels.liveLoggers();
  (() => {
    for (let index = 0; index < 1000; index++) root.child({ component: "cni", index });
  })();
  t.is(levels.liveLoggers(), before + 1000);
  for (let attempt = 0; attempt < 10 && levels.liveLoggers() > before; attempt++) {
    await new Promise((resolve) => setImmediate(resolve));
    gc();
  }
  t.is(levels.liveLoggers(), before);
});

test("components cover the source", (t) => {
  const root = path.resolve(__dirname, "..", "..", "..", "agent");
  const found = new Set<string>();
  const walk = (dir: string): void => {
    for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
      const file = path.join(dir, entry.name);
      if (entry.isDirectory()) walk(file);
      else if (entry.name.endsWith(".ts")) {
        for (const match of fs.readFileSync(file, "utf8").matchAll(/(?:child|createLogger)\(\{ component: "([a-z-]+)"/g)) found.add(match[1]);
      }
    }
  };
  walk(root);
  t.true(found.size > 5);
  for (const component of found) t.true(LOG_COMPONENTS.includes(component), `component "${component}" is missing from LOG_COMPONENTS`);
});

test("access level independent of proxy", (t) => {
  const levels = new LogLevels(parseLogLevels("info"));
  const { root, lines } = capture(levels);
  const inbound = root.child({ component: "proxy", workload: "shop/web" }).child({ component: "inbound" });
  const access = accessLogger(inbound);
  levels.set(parseLogLevels("inbound=warn,proxy=error"));
  access.info("connection complete");
  t.is(lines.filter((line) => line.msg === "connection complete").length, 1);
  levels.set({ components: { access: "warn" } });
  access.info("connection complete");
  t.is(lines.filter((line) => line.msg === "connection complete").length, 1);
  t.is(levels.view().components.access, "warn");
});

test("silencing admin still logs the change", (t) => {
  const levels = new LogLevels(parseLogLevels("info"));
  const { root, lines } = capture(levels);
  const post = loggingPostRoutes(levels, root.child({ component: "admin" }))["/logging"];
  post(new URLSearchParams("level=silent"), "127.0.0.1");
  const changed = lines.filter((line) => line.msg === "log levels changed");
  t.is(changed.length, 1);
  t.is(changed[0].remoteAddress, "127.0.0.1");
  t.throws(() => post(new URLSearchParams("reset=false"), "127.0.0.1"), { message: /invalid reset="false"/ });
});
