// Warnings about the parts of an AuthorizationPolicy that an L4 proxy cannot enforce as written.
// Both cases make the policy stricter than written, never looser.

import type { AuthorizationPolicy, PolicyRule } from "../state/types";
import { hasL4OperationField, hasL4SourceField, httpOperationFields, httpSourceFields, isL4Condition } from "./l4-fields";

/** Returns one message per unenforceable part of the policy; empty when L4 enforces all of it. */
export function policyWarnings(policy: AuthorizationPolicy): string[] {
  if (policy.action === "AUDIT" || policy.action === "CUSTOM") {
    return [`${policy.uid}: action ${policy.action} is not supported at L4; the policy is ignored when deciding connections`];
  }
  const warnings: string[] = [];
  (policy.rules ?? []).forEach((rule, index) => {
    const fields = httpFieldsOf(rule);
    if (fields.length === 0) return;
    const prefix = `${policy.uid}: rules[${index}] uses HTTP attributes (${fields.join(", ")}) that an L4 proxy cannot check`;
    if (policy.action === "ALLOW") {
      warnings.push(`${prefix}; this ALLOW rule matches no connection, which is stricter than written; use a waypoint proxy for HTTP rules`);
      return;
    }
    const emptied = entriesWithoutL4(rule);
    if (emptied.length > 0) {
      warnings.push(`${prefix}; ${emptied.join(", ")} has no L4 field left, so this DENY rule never matches`);
    } else {
      warnings.push(`${prefix}; this DENY rule is enforced on its L4 fields only, which is stricter than written`);
    }
  });
  return warnings;
}

function httpFieldsOf(rule: PolicyRule): string[] {
  const fields = new Set<string>();
  for (const entry of rule.from ?? []) for (const field of httpSourceFields(entry.source)) fields.add(field);
  for (const entry of rule.to ?? []) for (const field of httpOperationFields(entry.operation)) fields.add(field);
  for (const condition of rule.when ?? []) if (!isL4Condition(condition)) fields.add(`when ${condition.key}`);
  return [...fields];
}

/**
 * Returns the sections that can no longer match after the HTTP fields are removed: a from or to
 * list whose every entry lost all its fields, or a condition on an HTTP key.
 */
function entriesWithoutL4(rule: PolicyRule): string[] {
  const emptied: string[] = [];
  if (rule.from !== undefined && rule.from.length > 0 && !rule.from.some((entry) => hasL4SourceField(entry.source))) {
    emptied.push("from");
  }
  if (rule.to !== undefined && rule.to.length > 0 && !rule.to.some((entry) => hasL4OperationField(entry.operation))) {
    emptied.push("to");
  }
  (rule.when ?? []).forEach((condition, index) => {
    if (!isL4Condition(condition)) emptied.push(`when[${index}]`);
  });
  return emptied;
}
