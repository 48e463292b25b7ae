// The cgroup v2 folder the agent and `agentctl doctor` take for --cgroup, on cgroup v2, hybrid and
// cgroup v1 hosts, with the filesystem check replaced by a fixed set of cgroup v2 folders.

import test from "ava";
import { cgroupV2Root, DEFAULT_CGROUP_PATH } from "../../agent/cli/ambient-agent";

/** Returns a check that finds cgroup v2 exactly at `folders`. */
function cgroup2At(...folders: string[]): (directory: string) => boolean {
  return (directory) => folders.includes(directory);
}

test("cgroup v2 host keeps the folder", (t) => {
  t.is(cgroupV2Root(DEFAULT_CGROUP_PATH, cgroup2At("/sys/fs/cgroup")), "/sys/fs/cgroup");
  t.is(cgroupV2Root("/host/sys/fs/cgroup", cgroup2At("/host/sys/fs/cgroup", "/host/sys/fs/cgroup/unified")), "/host/sys/fs/cgroup");
});

test("hybrid host takes the unified subfolder", (t) => {
  t.is(cgroupV2Root(DEFAULT_CGROUP_PATH, cgroup2At("/sys/fs/cgroup/unified")), "/sys/fs/cgroup/unified");
  // The Helm chart's pod mounts the host's /sys/fs/cgroup at /host/sys/fs/cgroup.
  t.is(cgroupV2Root("/host/sys/fs/cgroup", cgroup2At("/host/sys/fs/cgroup/unified")), "/host/sys/fs/cgroup/unified");
  t.is(cgroupV2Root("/host/sys/fs/cgroup/", cgroup2At("/host/sys/fs/cgroup/unified")), "/host/sys/fs/cgroup/unified");
});

test("unified folder given is kept", (t) => {
  t.is(cgroupV2Root("/sys/fs/cgroup/unified", cgroup2At("/sys/fs/cgroup/unified")), "/sys/fs/cgroup/unified");
});

test("cgroup v1 host keeps the folder", (t) => {
  // The host check then reports the folder and names both fixes.
  t.is(cgroupV2Root(DEFAULT_CGROUP_PATH, cgroup2At()), "/sys/fs/cgroup");
  t.is(cgroupV2Root("/host/sys/fs/cgroup", cgroup2At("/sys/fs/cgroup/unified")), "/host/sys/fs/cgroup");
});

test("default check reads the filesystem", (t) => {
  // /proc is procfs, and it has no unified subfolder.
  t.is(cgroupV2Root("/proc"), "/proc");
});
