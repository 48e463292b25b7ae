// Every TypeScript fuzz target, in the order `make fuzz` and the unit test run them.

import type { FuzzTarget } from "../runner";
import { auditFiles, auditLine, auditQuery } from "./audit";
import { hboneAuthority, hboneBaggage, hboneForwarded } from "./hbone";
import { cniRequest, configFile, kernelBytes } from "./host-input";
import { certificateSan, spiffeId } from "./identity";
import { kubeObjects, manifests } from "./manifests";

export const FUZZ_TARGETS: readonly FuzzTarget[] = [
  hboneAuthority,
  hboneForwarded,
  hboneBaggage,
  spiffeId,
  certificateSan,
  auditLine,
  auditFiles,
  auditQuery,
  manifests,
  kubeObjects,
  configFile,
  cniRequest,
  kernelBytes,
];
