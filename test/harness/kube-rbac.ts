// A Kubernetes RBAC authorizer for the tests, to decide whether rendered Role, ClusterRole,
// RoleBinding and ClusterRoleBinding objects allow the requests a client made. It reads a request
// into attributes as the API server's request-info resolver does (k8s.io/apiserver
// pkg/endpoints/request/requestinfo.go). It then matches them against the rules bound to the user,
// as the RBAC authorizer and its rule resolver do (kubernetes plugin/pkg/auth/authorizer/rbac and
// pkg/registry/rbac/validation/rule.go), with the default roles of every authenticated user.

/** What the authorizer decides on: a request as the API server's request-info resolver reads it. */
export interface RequestAttributes {
  /** Whether the path names a resource under /api/VERSION/ or /apis/GROUP/VERSION/, rather than discovery or another URL. */
  resourceRequest: boolean;
  verb: string;
  path: string;
  apiGroup: string;
  resource: string;
  subresource: string;
  /** "" for a cluster-scoped resource and for a request across all namespaces. */
  namespace: string;
  /** The object's name from the path, or from a fieldSelector metadata.name=NAME of a list or watch. */
  name: string;
}

/** One request: the method, the URL path, and its query parameters. */
export interface ApiRequest {
  method: string;
  path: string;
  query: Record<string, string>;
}

/** A rule of a Role or ClusterRole, as rbac.authorization.k8s.io/v1 writes it. */
export interface PolicyRule {
  verbs: string[];
  apiGroups?: string[];
  resources?: string[];
  resourceNames?: string[];
  nonResourceURLs?: string[];
}

interface Subject {
  kind: string;
  name: string;
  namespace?: string;
}

/** The fields of a Role, ClusterRole, RoleBinding or ClusterRoleBinding that RBAC reads. */
export interface RbacObject {
  kind: string;
  metadata: { name: string; namespace?: string };
  rules?: PolicyRule[];
  roleRef?: { kind: string; name: string };
  subjects?: Subject[];
}

/** An authenticated user: the name and groups that the API server's authenticator sets. */
export interface UserInfo {
  name: string;
  groups: string[];
}

/** The decision on one request, with the binding and role that allowed it or why none did. */
export interface Decision {
  allowed: boolean;
  reason: string;
}

const RBAC_KINDS = new Set(["Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"]);

/** Path segments that name a special verb instead of a resource, such as /api/v1/watch/pods. */
const SPECIAL_VERBS = new Set(["proxy", "watch"]);
/** Subresources of a namespace, which /api/v1/namespaces/NAME/SEGMENT names instead of a namespaced resource. */
const NAMESPACE_SUBRESOURCES = new Set(["status", "finalize"]);
const METHOD_VERBS: Record<string, string> = { POST: "create", GET: "get", HEAD: "get", PUT: "update", PATCH: "patch", DELETE: "delete" };

/** Returns the user that a ServiceAccount's token authenticates as. */
export function serviceAccountUser(namespace: string, name: string): UserInfo {
  return { name: `system:serviceaccount:${namespace}:${name}`, groups: ["system:serviceaccounts", `system:serviceaccounts:${namespace}`, "system:authenticated"] };
}

/** Reads a request into the attributes that RBAC decides on, as the API server does. */
export function requestAttributes(request: ApiRequest): RequestAttributes {
  const attributes: RequestAttributes = { resourceRequest: false, verb: request.method.toLowerCase(), path: request.path, apiGroup: "", resource: "", subresource: "", namespace: "", name: "" };
  let parts = request.path.split("/").filter((part) => part !== "");
  // A resource request is /api/VERSION/RESOURCE... or /apis/GROUP/VERSION/RESOURCE...; shorter paths are discovery.
  if (parts[0] === "api" && parts.length >= 3) {
    parts = parts.slice(2);
  } else if (parts[0] === "apis" && parts.length >= 4) {
    attributes.apiGroup = parts[1];
    parts = parts.slice(3);
  } else {
    return attributes;
  }
  attributes.resourceRequest = true;

  if (SPECIAL_VERBS.has(parts[0])) {
    if (parts.length < 2) throw new Error(`${request.method} ${request.path} names no resource after ${parts[0]}, and the API server rejects it`);
    attributes.verb = parts[0];
    parts = parts.slice(1);
  } else {
    attributes.verb = METHOD_VERBS[request.method.toUpperCase()] ?? "";
  }
  if (parts[0] === "namespaces" && parts.length > 1) {
    attributes.namespace = parts[1];
    if (parts.length > 2 && !NAMESPACE_SUBRESOURCES.has(parts[2])) parts = parts.slice(2);
  }
  // proxy takes no subresource: /proxy/RESOURCE/NAME/ANY/PATH.
  if (parts.length >= 3 && attributes.verb !== "proxy") attributes.subresource = parts[2];
  attributes.name = parts[1] ?? "";
  attributes.resource = parts[0] ?? "";

  if (attributes.name === "" && attributes.verb === "get") collectionVerb(attributes, request.query);
  if (attributes.name === "" && attributes.verb === "delete") attributes.verb = "deletecollection";
  return attributes;
}

/**
 * Sets list or watch on a GET of a collection: watch unless the watch parameter is absent, "0" or
 * "false". A fieldSelector that requires metadata.name=NAME sets the name, which lets resourceNames
 * allow the request. An invalid fieldSelector makes the API server drop every parameter but watch.
 * NOTE: any other invalid list parameter (limit=abc, for one) drops the name as well, which this
 * reader does not check, so it may allow such a request where the API server denies it.
 */
function collectionVerb(attributes: RequestAttributes, query: Record<string, string>): void {
  const watch = query.watch;
  attributes.verb = watch !== undefined && watch !== "0" && watch.toLowerCase() !== "false" ? "watch" : "list";
  if (query.fieldSelector === undefined) return;
  const terms = parseFieldSelector(query.fieldSelector);
  const name = terms?.find((term) => term.field === "metadata.name" && term.operator !== "!=")?.value;
  // The name must be a valid path segment.
  if (name !== undefined && name !== "" && name !== "." && name !== ".." && !/[/%]/.test(name)) attributes.name = name;
}

interface FieldTerm {
  field: string;
  operator: "=" | "==" | "!=";
  value: string;
}

/**
 * Parses a fieldSelector such as `metadata.name=a,spec.nodeName!=b` as the API server does: terms
 * split at unescaped commas and sorted, each split at its first operator, values unescaped.
 * Returns undefined for a selector that the API server rejects.
 */
export function parseFieldSelector(selector: string): FieldTerm[] | undefined {
  const terms: FieldTerm[] = [];
  for (const raw of splitUnescaped(selector, ",").sort()) {
    if (raw === "") continue;
    // At each position the alternatives are tried in order, so "!=" and "==" win over "=".
    const match = /!=|==|=/.exec(raw);
    if (match === null) return undefined;
    const value = unescapeFieldValue(raw.slice(match.index + match[0].length));
    if (value === undefined) return undefined;
    terms.push({ field: raw.slice(0, match.index), operator: match[0] as FieldTerm["operator"], value });
  }
  return terms;
}

function splitUnescaped(text: string, separator: string): string[] {
  const parts: string[] = [];
  let current = "";
  for (let index = 0; index < text.length; index += 1) {
    if (text[index] === "\\" && index + 1 < text.length) {
      current += text[index] + text[index + 1];
      index += 1;
    } else if (text[index] === separator) {
      parts.push(current);
      current = "";
    } else {
      current += text[index];
    }
  }
  parts.push(current);
  return parts;
}

/** Removes the backslashes before `\`, `,` and `=`. Returns undefined on any other escape and on an unescaped `=`, which the API server rejects. */
function unescapeFieldValue(value: string): string | undefined {
  let result = "";
  for (let index = 0; index < value.length; index += 1) {
    const char = value[index];
    if (char === "\\") {
      const next = value[index + 1];
      if (next === undefined || !"\\,=".includes(next)) return undefined;
      result += next;
      index += 1;
    } else if (char === "=") {
      return undefined;
    } else {
      result += char;
    }
  }
  return result;
}

/** Returns whether `rule` allows the request, as RBAC matches one rule. */
export function ruleAllows(attributes: RequestAttributes, rule: PolicyRule): boolean {
  if (!rule.verbs.some((verb) => verb === "*" || verb === attributes.verb)) return false;
  if (!attributes.resourceRequest) {
    return (rule.nonResourceURLs ?? []).some((url) => url === "*" || url === attributes.path || (url.endsWith("*") && attributes.path.startsWith(url.replace(/\*+$/, ""))));
  }
  if (!(rule.apiGroups ?? []).some((group) => group === "*" || group === attributes.apiGroup)) return false;
  const combined = attributes.subresource === "" ? attributes.resource : `${attributes.resource}/${attributes.subresource}`;
  const resourceMatches = (rule.resources ?? []).some(
    (resource) => resource === "*" || resource === combined || (attributes.subresource !== "" && resource === `*/${attributes.subresource}`),
  );
  if (!resourceMatches) return false;
  const names = rule.resourceNames ?? [];
  return names.length === 0 || names.includes(attributes.name);
}

/**
 * The default ClusterRoles that Kubernetes binds to every authenticated user, from the bootstrap
 * policy (plugin/pkg/auth/authorizer/rbac/bootstrappolicy/policy.go): discovery, the health and
 * version endpoints, and reviews of the user's own access. Other defaults are left out, such as the
 * issuer discovery role of ServiceAccounts, so the authorizer may only deny more than a cluster does.
 */
export const DEFAULT_ROLES: readonly RbacObject[] = [
  defaultClusterRole("system:discovery", ["system:authenticated"], [
    { verbs: ["get"], nonResourceURLs: ["/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez", "/openapi", "/openapi/*", "/readyz", "/version", "/version/"] },
  ]),
  defaultClusterRole("system:public-info-viewer", ["system:authenticated", "system:unauthenticated"], [
    { verbs: ["get"], nonResourceURLs: ["/healthz", "/livez", "/readyz", "/version", "/version/"] },
  ]),
  defaultClusterRole("system:basic-user", ["system:authenticated"], [
    { verbs: ["create"], apiGroups: ["authorization.k8s.io"], resources: ["selfsubjectaccessreviews", "selfsubjectrulesreviews"] },
  ]),
].flat();

function defaultClusterRole(name: string, groups: string[], rules: PolicyRule[]): RbacObject[] {
  return [
    { kind: "ClusterRole", metadata: { name }, rules },
    { kind: "ClusterRoleBinding", metadata: { name }, roleRef: { kind: "ClusterRole", name }, subjects: groups.map((group) => ({ kind: "Group", name: group })) },
  ];
}

/** Decides requests against a set of RBAC objects, as an API server with only the RBAC authorizer does. */
export class RbacAuthorizer {
  readonly #objects: RbacObject[];

  /** Keeps the RBAC objects among `objects` (other kinds are ignored), together with DEFAULT_ROLES. */
  constructor(objects: readonly (RbacObject | { kind: string })[]) {
    this.#objects = [...(objects.filter((object) => RBAC_KINDS.has(object.kind)) as RbacObject[]), ...DEFAULT_ROLES];
  }

  /**
   * Allows the request when a rule of a role bound to `user` allows it: a ClusterRole through a
   * ClusterRoleBinding anywhere, a Role or ClusterRole through a RoleBinding only in the binding's namespace.
   */
  authorize(user: UserInfo, attributes: RequestAttributes): Decision {
    for (const binding of this.#bindings(attributes.namespace)) {
      const bindingNamespace = binding.kind === "RoleBinding" ? (binding.metadata.namespace ?? "") : "";
      if (!(binding.subjects ?? []).some((subject) => appliesTo(user, subject, bindingNamespace))) continue;
      const role = this.#role(binding, bindingNamespace);
      const rule = role?.rules?.find((candidate) => ruleAllows(attributes, candidate));
      if (role !== undefined && rule !== undefined) return { allowed: true, reason: `${binding.kind} ${binding.metadata.name} binds ${role.kind} ${role.metadata.name}` };
    }
    return { allowed: false, reason: `no rule bound to ${user.name} allows ${describeAttributes(attributes)}` };
  }

  /** Returns the ClusterRoleBindings and, for a namespaced request, the RoleBindings of its namespace. */
  #bindings(namespace: string): RbacObject[] {
    const clusterBindings = this.#objects.filter((object) => object.kind === "ClusterRoleBinding");
    const roleBindings = namespace === "" ? [] : this.#objects.filter((object) => object.kind === "RoleBinding" && object.metadata.namespace === namespace);
    return [...clusterBindings, ...roleBindings];
  }

  /** Returns the role a binding refers to. A ClusterRoleBinding that refers to a Role finds none, as in the API server. */
  #role(binding: RbacObject, bindingNamespace: string): RbacObject | undefined {
    const reference = binding.roleRef;
    if (reference === undefined) return undefined;
    if (reference.kind === "ClusterRole") return this.#objects.find((object) => object.kind === "ClusterRole" && object.metadata.name === reference.name);
    if (reference.kind === "Role" && binding.kind === "RoleBinding") {
      return this.#objects.find((object) => object.kind === "Role" && object.metadata.name === reference.name && object.metadata.namespace === bindingNamespace);
    }
    return undefined;
  }
}

/** Returns whether a binding's subject names `user`. A ServiceAccount subject without a namespace is in the binding's namespace. */
function appliesTo(user: UserInfo, subject: Subject, bindingNamespace: string): boolean {
  switch (subject.kind) {
    case "User":
      return user.name === subject.name;
    case "Group":
      return user.groups.includes(subject.name);
    case "ServiceAccount": {
      const namespace = subject.namespace || bindingNamespace;
      return namespace !== "" && user.name === `system:serviceaccount:${namespace}:${subject.name}`;
    }
    default:
      return false;
  }
}

/** Describes the attributes as RBAC reads them, for messages: "list apps/daemonsets "agent" in namespace kube-system". */
export function describeAttributes(attributes: RequestAttributes): string {
  if (!attributes.resourceRequest) return `${attributes.verb} ${attributes.path}`;
  const group = attributes.apiGroup === "" ? "" : `${attributes.apiGroup}/`;
  const resource = attributes.subresource === "" ? attributes.resource : `${attributes.resource}/${attributes.subresource}`;
  const name = attributes.name === "" ? "" : ` "${attributes.name}"`;
  const scope = attributes.namespace === "" ? "" : ` in namespace ${attributes.namespace}`;
  return `${attributes.verb} ${group}${resource}${name}${scope}`;
}
