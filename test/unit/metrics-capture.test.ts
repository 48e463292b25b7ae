import test from "ava";
import { parseMapFdinfo } from "../../agent/capture/ebpf/usage";

// The fdinfo of a BPF map descriptor as Linux 6.x prints it.
const FDINFO = ["pos:\t0", "flags:\t02000002", "mnt_id:\t15", "ino:\t1057", "map_type:\t1", "key_size:\t8", "value_size:\t8", "max_entries:\t4096", "map_flags:\t0x0", "map_extra:\t0x0", "memlock:\t73728", "map_id:\t42", "frozen:\t0", ""].join("\n");

test("map fdinfo yields type, key size and capacity", (t) => {
  t.deepEqual(parseMapFdinfo(FDINFO), { mapType: 1, keySize: 8, maxEntries: 4096 });
});

test("map fdinfo without max_entries is rejected", (t) => {
  const error = t.throws(() => parseMapFdinfo(FDINFO.replace("max_entries:\t4096\n", "")));
  t.regex(error!.message, /no max_entries field/);
});
