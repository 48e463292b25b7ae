// Checks rendered Kubernetes objects against the API's OpenAPI schemas, as an API server would on
// create. Two parts: the ajv validators of kubernetes-models check types, required fields and
// enums, and a walk over @kubernetes/client-node's model type maps reports keys that the type does
// not have. The second part is needed because those validators accept unknown keys, and an API
// server that is not asked for strict field validation drops them with a warning at most (a
// misspelt mountPropagation would then mean no propagation).

import { ClusterRole } from "kubernetes-models/rbac.authorization.k8s.io/v1/ClusterRole";
import { ClusterRoleBinding } from "kubernetes-models/rbac.authorization.k8s.io/v1/ClusterRoleBinding";
import { Role } from "kubernetes-models/rbac.authorization.k8s.io/v1/Role";
import { RoleBinding } from "kubernetes-models/rbac.authorization.k8s.io/v1/RoleBinding";
import { ConfigMap } from "kubernetes-models/v1/ConfigMap";
import { ServiceAccount } from "kubernetes-models/v1/ServiceAccount";
import { DaemonSet } from "kubernetes-models/apps/v1/DaemonSet";

/** A problem in an object: its JSON path (such as `spec.template.spec.containers[0].image`) and a message. */
export interface SchemaProblem {
  path: string;
  message: string;
}

/** A kubernetes-models class: validate() throws a ValidationError that lists ajv's errors. */
interface ModelClass {
  new (data: never): { validate(): void };
}

interface AjvError {
  instancePath: string;
  message?: string;
  params?: Record<string, unknown>;
}

/** One entry of a client-node model's attributeTypeMap: `baseName` is the JSON key, `type` its TypeScript type. */
interface AttributeType {
  baseName: string;
  type: string;
}

/** The kinds the chart renders: the kubernetes-models class and the client-node model of each. */
const KINDS: Record<string, { model: ModelClass; typeName: string }> = {
  "apps/v1 DaemonSet": { model: DaemonSet as unknown as ModelClass, typeName: "V1DaemonSet" },
  "v1 ConfigMap": { model: ConfigMap as unknown as ModelClass, typeName: "V1ConfigMap" },
  "v1 ServiceAccount": { model: ServiceAccount as unknown as ModelClass, typeName: "V1ServiceAccount" },
  "rbac.authorization.k8s.io/v1 ClusterRole": { model: ClusterRole as unknown as ModelClass, typeName: "V1ClusterRole" },
  "rbac.authorization.k8s.io/v1 ClusterRoleBinding": { model: ClusterRoleBinding as unknown as ModelClass, typeName: "V1ClusterRoleBinding" },
  "rbac.authorization.k8s.io/v1 Role": { model: Role as unknown as ModelClass, typeName: "V1Role" },
  "rbac.authorization.k8s.io/v1 RoleBinding": { model: RoleBinding as unknown as ModelClass, typeName: "V1RoleBinding" },
};

/** Types of client-node's type maps whose values have no keys to check. */
const LEAF_TYPES = new Set(["string", "number", "boolean", "Date", "any", "object", "IntOrString"]);

const ARRAY_TYPE = /^Array<(.+)>$/;
const MAP_TYPE = /^\{ \[key: string\]: (.+); \}$/;

// client-node 1.x is an ES module, which Node 20 loads through require().
const clientModels = require("@kubernetes/client-node") as Record<string, unknown>;

/** Checks one object against the schema of its apiVersion and kind. Returns no problem when it is valid. */
export function validateObject(object: { apiVersion?: unknown; kind?: unknown; [key: string]: unknown }): SchemaProblem[] {
  const key = `${object.apiVersion} ${object.kind}`;
  const kind = KINDS[key];
  if (kind === undefined) {
    return [{ path: "", message: `no schema for apiVersion ${object.apiVersion} kind ${object.kind}: add it to KINDS in test/harness/kube-schema.ts` }];
  }
  return [...schemaProblems(kind.model, object), ...unknownFields(object, kind.typeName)];
}

/** Runs the kubernetes-models validator (types, required fields, enums, formats). */
function schemaProblems(model: ModelClass, object: unknown): SchemaProblem[] {
  try {
    new model(object as never).validate();
    return [];
  } catch (error) {
    const errors = (error as { errors?: AjvError[] }).errors;
    if (!Array.isArray(errors)) throw error;
    return errors.map((ajvError) => ({ path: pointerToPath(ajvError.instancePath), message: `${ajvError.message ?? "invalid"} ${JSON.stringify(ajvError.params ?? {})}` }));
  }
}

/** Converts a JSON pointer (`/spec/containers/0/name`) into a JSON path (`spec.containers[0].name`). */
function pointerToPath(pointer: string): string {
  const segments = pointer.split("/").slice(1).map((segment) => segment.replace(/~1/g, "/").replace(/~0/g, "~"));
  return segments.reduce((joined, segment) => (/^\d+$/.test(segment) ? `${joined}[${segment}]` : joinPath(joined, segment)), "");
}

function joinPath(parent: string, key: string): string {
  const name = /^[A-Za-z_][A-Za-z0-9_]*$/.test(key) ? key : JSON.stringify(key);
  return parent === "" ? name : `${parent}.${name}`;
}

/**
 * Lists the keys of `value` that client-node's model `typeName` (for example V1DaemonSet) and the
 * types below it do not have, with their JSON paths.
 */
export function unknownFields(value: unknown, typeName: string, at = ""): SchemaProblem[] {
  if (value === null || value === undefined || LEAF_TYPES.has(typeName)) return [];

  const arrayItem = ARRAY_TYPE.exec(typeName);
  if (arrayItem !== null) {
    if (!Array.isArray(value)) return [];
    return value.flatMap((item, index) => unknownFields(item, arrayItem[1], `${at}[${index}]`));
  }

  const mapValue = MAP_TYPE.exec(typeName);
  if (mapValue !== null) {
    if (typeof value !== "object") return [];
    return Object.entries(value).flatMap(([key, item]) => unknownFields(item, mapValue[1], joinPath(at, key)));
  }

  const attributes = attributeTypes(typeName);
  // A value of the wrong type is the validator's to report.
  if (typeof value !== "object" || Array.isArray(value)) return [];
  const problems: SchemaProblem[] = [];
  for (const [key, item] of Object.entries(value)) {
    const attribute = attributes.find((candidate) => candidate.baseName === key);
    if (attribute === undefined) {
      problems.push({ path: joinPath(at, key), message: `unknown field "${key}" of ${typeName}` });
      continue;
    }
    problems.push(...unknownFields(item, attribute.type, joinPath(at, key)));
  }
  return problems;
}

function attributeTypes(typeName: string): AttributeType[] {
  const model = clientModels[typeName] as { attributeTypeMap?: AttributeType[] } | undefined;
  if (model === undefined || !Array.isArray(model.attributeTypeMap)) {
    throw new Error(`@kubernetes/client-node has no model ${typeName}: add the type to LEAF_TYPES in test/harness/kube-schema.ts if its values have no keys`);
  }
  return model.attributeTypeMap;
}
