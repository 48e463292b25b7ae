// The close of an open inbound connection that the mesh state no longer allows. Both inbound
// servers keep the RbacConnection each connection passed authorization with, evaluate it again
// after every configuration change, and close the ones now denied with this record and error.

import { AgentError } from "../errors";
import { formatSpiffeId } from "../identity/spiffe";
import type { AuthorizationResult, RbacConnection } from "../rbac/types";
import { denialError, type ConnectionRecord } from "./connection-record";

/** The audit reason of a connection closed because a newer configuration denies it. */
export const POLICY_CHANGE_REASON = "policy_change";

/**
 * Marks an open connection's record as closed by a configuration change: the new decision, policy
 * and rule from `result` (a denial), reason policy_change and a POLICY_CHANGED error. Returns that
 * error, so the caller can reset the connection with it.
 */
export function recordPolicyChange(record: ConnectionRecord, connection: RbacConnection, result: AuthorizationResult): AgentError {
  const client = connection.sourceIdentity ? formatSpiffeId(connection.sourceIdentity) : `plaintext client ${record.src.addr}`;
  const denial = denialError(result, client, record.dst.addr);
  const error = new AgentError("POLICY_CHANGED", `closed: policy change: ${denial.message}`);
  record.authorized(result);
  record.reason = POLICY_CHANGE_REASON;
  record.fail(error);
  return error;
}
