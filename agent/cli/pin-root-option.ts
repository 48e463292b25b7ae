// --node and --pin-root of the agentctl commands that work on a node's pinned capture.

import { canonicalPinRoot } from "../capture/pin-lock";
import { UsageError } from "./admin-client";

/** A Kubernetes node name, as --node takes it. */
const NODE_NAME = /^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$/;

/**
 * Returns the pin root that --pin-root names, else the agent's default for --node,
 * /sys/fs/bpf/ambient-agent/NODE, else undefined. An empty value counts as absent. Throws
 * UsageError for an invalid --node.
 */
export function pinRootOption(values: { node?: string; "pin-root"?: string }): string | undefined {
  if (values.node && !NODE_NAME.test(values.node)) {
    throw new UsageError(`invalid --node "${values.node}": use a Kubernetes node name (lowercase letters, digits, '-' and '.')`);
  }
  if (values["pin-root"]) return canonicalPinRoot(values["pin-root"]);
  return values.node ? canonicalPinRoot(`/sys/fs/bpf/ambient-agent/${values.node}`) : undefined;
}
