// The capture set-up at agent start: choosing the mode (eBPF, or nftables when a kernel hook is
// missing and --capture allows it), attaching the chosen backend, and the probe-source exemptions.

import path from "node:path";

import type { Logger } from "../log";
import { EbpfCaptureBackend, NftCaptureBackend, type CaptureBackend } from "./backend";
import { DEFAULT_PROBE_SOURCES } from "./ebpf/exemptions";
import { useMarkOnlyAgentSockets } from "./native";
import { NftCapture } from "./nft/capture";
import { LOCK_DIRECTORY } from "./pin-lock";
import { HostNotReadyError } from "./preflight";
import { isHostSetupFeature, probeCaptureFeatures, selectCaptureMode, type CaptureSelection, type RequestedCaptureMode } from "./probe";

/** The agent options that capture reads. */
export interface CaptureOptions {
  node: string;
  /** bpffs folder holding this node's pinned maps and links. */
  pinRoot: string;
  cgroupPath: string;
  objectPath: string;
  /** Capture mode from --capture. Default auto. */
  capture?: RequestedCaptureMode;
  /** Source addresses of kubelet health probes. Default DEFAULT_PROBE_SOURCES. */
  probeSources?: readonly string[];
}

/**
 * Probes the kernel and chooses the capture mode. Throws HostNotReadyError when eBPF was
 * requested and a hook is missing, naming the hook and the kernel's error.
 */
export function selectCapture(options: CaptureOptions, logger: Logger): CaptureSelection {
  const requested = options.capture ?? "auto";
  // Without root every probe fails with EPERM, so it is skipped and checkHost reports the real problem.
  const probe = requested !== "nftables" && process.getuid?.() === 0;
  const features = probe ? probeCaptureFeatures({ pinRoot: options.pinRoot, cgroupPath: options.cgroupPath, objectPath: options.objectPath }) : [];
  const selection = selectCaptureMode(requested, features);
  // checkHost names the fix for a missing mount or object. This error is only for missing kernel hooks.
  const setupIncomplete = selection.missing.some((feature) => isHostSetupFeature(feature.feature));
  if (selection.mode === "ebpf" && selection.missing.length > 0 && !setupIncomplete) {
    throw new HostNotReadyError(
      selection.missing.map((feature) => ({
        what: `eBPF capture needs ${feature.feature}, which failed: ${feature.error ?? "unknown error"}`,
        fix: "start the agent with --capture nftables (or auto), or on a kernel that has this hook",
      })),
    );
  }
  logger.info(
    { capture: selection.mode, requested, reason: selection.reason, missing: selection.missing.map((feature) => feature.feature) },
    `capture mode ${selection.mode}: ${selection.reason}`,
  );
  return selection;
}

/** Attaches the backend of the selected mode, which logs through a child of `logger` with component "capture". */
export function attachCapture(selection: CaptureSelection, options: CaptureOptions, logger: Logger): CaptureBackend {
  const captureLogger = logger.child({ component: "capture" });
  if (selection.mode === "ebpf") {
    return EbpfCaptureBackend.attach({ pinRoot: options.pinRoot, cgroupPath: options.cgroupPath, objectPath: options.objectPath }, captureLogger);
  }
  // nftables rules tell the agent's sockets apart by their mark alone.
  useMarkOnlyAgentSockets();
  return new NftCaptureBackend(new NftCapture({ stateDirectory: nftStateDirectory(options.node) }, captureLogger));
}

/** Returns the folder that lists the node's pods with an nftables capture table, shared by the node's agents. */
export function nftStateDirectory(node: string): string {
  return path.join(LOCK_DIRECTORY, `nftables-${node}`);
}

/** Fills aa_probe_sources with the configured probe source addresses, replacing what an earlier run left. */
export function setProbeSources(capture: CaptureBackend, options: CaptureOptions, logger: Logger): void {
  const probeSources = options.probeSources ?? DEFAULT_PROBE_SOURCES;
  capture.exemptions.setProbeSources(probeSources);
  logger.info({ probeSources }, probeSources.length > 0 ? "kubelet probe sources exempt from inbound capture" : "no probe source is exempt from inbound capture");
}
