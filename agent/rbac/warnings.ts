// How an AuthorizationPolicy is enforced, and warnings about the parts that an L4 proxy cannot
// enforce as written. A dropped ALLOW rule and a DENY rule cut to its L4 fields are stricter than
// written. A DENY rule with no L4 part left never matches, which is looser: ztunnel behaves so too.

import type { AuthorizationPolicy, PolicyRule } from "../state/types";
import { hasL4OperationField, hasL4SourceField, httpOperationFields, httpSourceFields, isL4Condition } from "./l4-fields";

export interface PolicyStatus {
  /**
   * enforced: decides connections; dry-run: evaluated and reported only (istio.io/dry-run);
   * rejected: takes no part in decisions, and `message` gives the reason.
   */
  state: "enforced" | "dry-run" | "rejected";
  message?: string;
  warnings: string[];
}

/** Returns how the policy takes part in decisions, with its warnings. */
export function policyStatus(policy: AuthorizationPolicy): PolicyStatus {
  if (policy.action === "AUDIT" || policy.action === "CUSTOM") {
    const reason = policy.action === "CUSTOM" ? "CUSTOM delegates to an external authorizer" : "AUDIT only marks requests for an HTTP audit log";
    return {
      state: "rejected",
      message: `AuthorizationPolicy ${policy.uid}: spec.action ${policy.action} is not supported by an L4 proxy (${reason}), as in Istio's ztunnel; the policy takes no part in decisions. Use ALLOW or DENY, or a waypoint proxy`,
      warnings: [],
    };
  }
  return { state: policy.dryRun ? "dry-run" : "enforced", warnings: policyWarnings(policy) };
}

/** Returns one message per unenforceable part of the policy; empty when L4 enforces all of it. */
export function policyWarnings(policy: AuthorizationPolicy): string[] {
  if (policy.action === "AUDIT" || policy.action === "CUSTOM") return [];
  const warnings: string[] = [];
  (policy.rules ?? []).forEach((rule, index) => {
    for (const field of spiffePrefixedPrincipals(rule)) {
      warnings.push(
        `AuthorizationPolicy ${policy.uid}: spec.rules[${index}].${field} starts with "spiffe://", but Istio compares principals without that prefix, so this value never matches a peer; write "cluster.local/ns/NAMESPACE/sa/ACCOUNT"`,
      );
    }
    const fields = httpFieldsOf(rule);
    if (fields.length === 0) return;
    const prefix = `AuthorizationPolicy ${policy.uid}: spec.rules[${index}] uses HTTP attributes (${fields.join(", ")}) that an L4 proxy cannot check`;
    if (policy.action === "ALLOW") {
      warnings.push(`${prefix}; this ALLOW rule matches no connection, which is stricter than written; use a waypoint proxy for HTTP rules`);
      return;
    }
    const emptied = entriesWithoutL4(rule);
    if (emptied.length > 0) {
      warnings.push(`${prefix}; ${emptied.join(", ")} has no L4 field left, so this DENY rule never matches, which is looser than written; use a waypoint proxy for HTTP rules`);
    } else {
      warnings.push(`${prefix}; this DENY rule is enforced on its L4 fields only, which is stricter than written`);
    }
  });
  return warnings;
}

/** Returns the paths of principal values written as SPIFFE URIs, which Istio never matches. */
function spiffePrefixedPrincipals(rule: PolicyRule): string[] {
  const paths: string[] = [];
  (rule.from ?? []).forEach((entry, index) => {
    for (const field of ["principals", "notPrincipals"] as const) {
      (entry.source[field] ?? []).forEach((value, item) => {
        if (value.startsWith("spiffe://")) paths.push(`from[${index}].source.${field}[${item}]`);
      });
    }
  });
  (rule.when ?? []).forEach((condition, index) => {
    if (condition.key !== "source.principal") return;
    for (const field of ["values", "notValues"] as const) {
      (condition[field] ?? []).forEach((value, item) => {
        if (value.startsWith("spiffe://")) paths.push(`when[${index}].${field}[${item}]`);
      });
    }
  });
  return paths;
}

/** Returns the paths of the HTTP-only fields of a rule, relative to the rule: "to[0].operation.methods". */
function httpFieldsOf(rule: PolicyRule): string[] {
  const fields: string[] = [];
  (rule.from ?? []).forEach((entry, index) => {
    for (const field of httpSourceFields(entry.source)) fields.push(`from[${index}].source.${field}`);
  });
  (rule.to ?? []).forEach((entry, index) => {
    for (const field of httpOperationFields(entry.operation)) fields.push(`to[${index}].operation.${field}`);
  });
  (rule.when ?? []).forEach((condition, index) => {
    if (!isL4Condition(condition)) fields.push(`when[${index}].key ${condition.key}`);
  });
  return fields;
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
