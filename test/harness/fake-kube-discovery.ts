// Discovery documents of the fake Kubernetes API server (/version, /api, /apis and one resource
// list per group version), which kubectl and client-go read before they list or watch.

import { RESOURCES, apiVersionOf, type ResourceType } from "./fake-kube-resources";

/** The Kubernetes version the fake server reports; nothing in it depends on that version. */
const VERSION = { major: "1", minor: "31", gitVersion: "v1.31.0-fake", platform: "linux/amd64" };

const VERBS = ["get", "list", "watch", "patch"];

/** The short names of the built-in kinds, so that `kubectl get ns` resolves. */
const SHORT_NAMES: Partial<Record<string, string[]>> = { namespaces: ["ns"], pods: ["po"], services: ["svc"] };

function singular(type: ResourceType): string {
  return type.kind.toLowerCase();
}

function groupVersions(): Map<string, ResourceType[]> {
  const byGroupVersion = new Map<string, ResourceType[]>();
  for (const type of RESOURCES) {
    const key = apiVersionOf(type);
    byGroupVersion.set(key, [...(byGroupVersion.get(key) ?? []), type]);
  }
  return byGroupVersion;
}

function resourceList(groupVersion: string, types: ResourceType[]): unknown {
  const resources = types.flatMap((type) => {
    const entry = { name: type.name, singularName: singular(type), namespaced: type.namespaced, kind: type.kind, verbs: VERBS, shortNames: SHORT_NAMES[type.name] ?? [] };
    const status = { name: `${type.name}/status`, singularName: "", namespaced: type.namespaced, kind: type.kind, verbs: ["get", "patch"] };
    return [entry, status];
  });
  return { kind: "APIResourceList", apiVersion: "v1", groupVersion, resources };
}

function groupList(): unknown {
  const groups = [...groupVersions().keys()]
    .filter((groupVersion) => groupVersion.includes("/"))
    .map((groupVersion) => {
      const [name, version] = groupVersion.split("/");
      const entry = { groupVersion, version };
      return { name, versions: [entry], preferredVersion: entry };
    });
  return { kind: "APIGroupList", apiVersion: "v1", groups };
}

/** Returns the discovery document at `pathname`, or undefined when the path is no discovery path. */
export function discoveryDocument(pathname: string, serverAddress: string): unknown {
  const path = pathname.replace(/\/+$/, "");
  if (path === "/version") return VERSION;
  if (path === "/api") {
    return { kind: "APIVersions", versions: ["v1"], serverAddressByClientCIDRs: [{ clientCIDR: "0.0.0.0/0", serverAddress }] };
  }
  if (path === "/apis") return groupList();
  const match = /^\/(?:api\/(v1)|apis\/([^/]+\/[^/]+))$/.exec(path);
  if (!match) return undefined;
  const groupVersion = match[1] ?? match[2];
  const types = groupVersions().get(groupVersion);
  return types ? resourceList(groupVersion, types) : undefined;
}
