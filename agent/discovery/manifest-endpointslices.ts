// Reader for discovery.k8s.io/v1 EndpointSlice: the endpoints of a Service as the Kubernetes
// EndpointSlice controller (or another manager, for Services without a selector) publishes them.
// A slice from a manifest folder and one from the API server go through the same checks.

import net from "node:net";
import { canonicalIp } from "../state/ip";
import type {
  EndpointSlice,
  EndpointSliceAddressType,
  EndpointSliceEndpoint,
  EndpointSlicePort,
  EndpointTargetRef,
  ObjectSource,
} from "../state/types";
import { describeValue, type FieldPath, type ObjectReader } from "./manifest-reader";
import { readMetadata } from "./manifest-workloads";

/** The label that names the Service an EndpointSlice belongs to. */
export const SERVICE_NAME_LABEL = "kubernetes.io/service-name";

/** The top-level fields of an EndpointSlice, which has no spec. */
export const ENDPOINT_SLICE_FIELDS: readonly string[] = ["apiVersion", "kind", "metadata", "addressType", "endpoints", "ports"];

const ADDRESS_TYPES: readonly EndpointSliceAddressType[] = ["IPv4", "IPv6", "FQDN"];

/** Maximum list sizes of a discovery.k8s.io/v1 EndpointSlice, which the API server enforces. */
const MAX_ENDPOINTS = 1000;
const MAX_PORTS = 100;
const MAX_ADDRESSES = 100;

const ENDPOINT_FIELDS = ["addresses", "conditions", "hostname", "targetRef", "nodeName", "zone", "hints", "deprecatedTopology"];
const CONDITION_FIELDS = ["ready", "serving", "terminating"];
const PORT_FIELDS = ["name", "port", "protocol", "appProtocol"];

/** DNS-1123 label: the syntax of EndpointSlice port names, as of Service port names. */
const DNS_LABEL = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/;

/** DNS-1123 subdomain: the syntax of FQDN addresses. */
const DNS_SUBDOMAIN = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$/;

export function readEndpointSlice(reader: ObjectReader, source: ObjectSource): EndpointSlice | undefined {
  const metadata = readMetadata(reader, "EndpointSlice", true);
  if (metadata === undefined || metadata.namespace === undefined) return undefined;
  const addressType = readAddressType(reader);
  if (addressType === undefined) return undefined;

  return {
    uid: `${metadata.namespace}/${metadata.name}`,
    name: metadata.name,
    namespace: metadata.namespace,
    service: metadata.labels[SERVICE_NAME_LABEL] ?? "",
    addressType,
    endpoints: readEndpoints(reader, addressType, metadata.namespace),
    ports: readSlicePorts(reader),
    source,
  };
}

function readAddressType(reader: ObjectReader): EndpointSliceAddressType | undefined {
  const value = reader.requiredString(["addressType"]);
  if (value === undefined) return undefined;
  const addressType = ADDRESS_TYPES.find((candidate) => candidate === value);
  if (addressType === undefined) {
    reader.reject(["addressType"], `invalid addressType ${describeValue(value)}; use ${ADDRESS_TYPES.join(", ")}`);
  }
  return addressType;
}

function readEndpoints(reader: ObjectReader, addressType: EndpointSliceAddressType, namespace: string): EndpointSliceEndpoint[] {
  const items = reader.list(["endpoints"]) ?? [];
  if (items.length > MAX_ENDPOINTS) {
    reader.reject(["endpoints"], `${items.length} endpoints; an EndpointSlice holds at most ${MAX_ENDPOINTS}, so split them over several slices`);
    return [];
  }
  const endpoints: EndpointSliceEndpoint[] = [];
  items.forEach((_, index) => {
    const endpoint = readEndpoint(reader, ["endpoints", index], addressType, namespace);
    if (endpoint !== undefined) endpoints.push(endpoint);
  });
  return endpoints;
}

function readEndpoint(
  reader: ObjectReader,
  path: FieldPath,
  addressType: EndpointSliceAddressType,
  namespace: string,
): EndpointSliceEndpoint | undefined {
  if (reader.mapping(path) === undefined) return undefined;
  reader.knownFields(path, ENDPOINT_FIELDS);
  const addresses = readAddresses(reader, [...path, "addresses"], addressType);

  // Kubernetes semantics: an absent ready or serving condition is true, an absent terminating one is false.
  const conditions = [...path, "conditions"];
  reader.mapping(conditions);
  reader.knownFields(conditions, CONDITION_FIELDS);
  const endpoint: EndpointSliceEndpoint = {
    addresses,
    ready: reader.boolean([...conditions, "ready"], true),
    serving: reader.boolean([...conditions, "serving"], true),
    terminating: reader.boolean([...conditions, "terminating"], false),
  };

  const nodeName = reader.string([...path, "nodeName"]);
  if (nodeName !== undefined && nodeName !== "") endpoint.nodeName = nodeName;
  const targetRef = readTargetRef(reader, [...path, "targetRef"], namespace);
  if (targetRef !== undefined) endpoint.targetRef = targetRef;
  return endpoint;
}

/** Reads the addresses of one endpoint: 1 to 100 of the slice's address type, IPs in canonical form. */
function readAddresses(reader: ObjectReader, path: FieldPath, addressType: EndpointSliceAddressType): string[] {
  const values = reader.stringList(path);
  if (values === undefined || values.length === 0) {
    reader.reject(path, "missing addresses; list at least one address of the slice's addressType");
    return [];
  }
  if (values.length > MAX_ADDRESSES) {
    reader.reject(path, `${values.length} addresses; an endpoint has at most ${MAX_ADDRESSES}`);
    return [];
  }
  const addresses: string[] = [];
  values.forEach((value, index) => {
    const address = checkAddress(value, addressType);
    if (address === undefined) {
      reader.reject([...path, index], `invalid ${addressType} address ${describeValue(value)}; an ${addressType} slice lists only ${describeAddressType(addressType)}`);
    } else {
      addresses.push(address);
    }
  });
  return addresses;
}

/** Returns the address in canonical form when it has the slice's address type, undefined otherwise. */
function checkAddress(value: string, addressType: EndpointSliceAddressType): string | undefined {
  switch (addressType) {
    case "IPv4":
      return net.isIPv4(value) ? value : undefined;
    case "IPv6": {
      // An IPv4-mapped IPv6 address is an IPv4 address in canonical form, so it has no place here.
      if (!net.isIPv6(value)) return undefined;
      const ip = canonicalIp(value);
      return net.isIPv6(ip) ? ip : undefined;
    }
    case "FQDN":
      return value.length <= 253 && DNS_SUBDOMAIN.test(value) ? value : undefined;
  }
}

function describeAddressType(addressType: EndpointSliceAddressType): string {
  if (addressType === "FQDN") return "lowercase DNS names";
  return `${addressType} addresses`;
}

/** Reads targetRef (an ObjectReference); a reference without a name is dropped. The namespace defaults to the slice's. */
function readTargetRef(reader: ObjectReader, path: FieldPath, namespace: string): EndpointTargetRef | undefined {
  if (reader.mapping(path) === undefined) return undefined;
  const name = reader.string([...path, "name"]);
  if (name === undefined || name === "") return undefined;
  const kind = reader.string([...path, "kind"]) ?? "";
  const refNamespace = reader.string([...path, "namespace"]);
  return { kind, namespace: refNamespace === undefined || refNamespace === "" ? namespace : refNamespace, name };
}

function readSlicePorts(reader: ObjectReader): EndpointSlicePort[] {
  const items = reader.list(["ports"]) ?? [];
  if (items.length > MAX_PORTS) {
    reader.reject(["ports"], `${items.length} ports; an EndpointSlice holds at most ${MAX_PORTS}`);
    return [];
  }
  const ports: EndpointSlicePort[] = [];
  const names = new Set<string>();
  items.forEach((_, index) => {
    const path = ["ports", index];
    if (reader.mapping(path) === undefined) return;
    reader.knownFields(path, PORT_FIELDS);
    const port = readSlicePort(reader, path);
    if (port === undefined) return;
    if (names.has(port.name)) {
      reader.reject([...path, "name"], `duplicate port name ${describeValue(port.name)}; each port of a slice needs its own name`);
      return;
    }
    names.add(port.name);
    ports.push(port);
  });
  return ports;
}

function readSlicePort(reader: ObjectReader, path: FieldPath): EndpointSlicePort | undefined {
  const name = reader.string([...path, "name"]) ?? "";
  if (name !== "" && (name.length > 63 || !DNS_LABEL.test(name))) {
    reader.reject([...path, "name"], `invalid port name ${describeValue(name)}; use at most 63 lowercase letters, digits and '-'`);
    return undefined;
  }
  const protocolValue = reader.string([...path, "protocol"]) ?? "TCP";
  if (protocolValue !== "TCP" && protocolValue !== "UDP" && protocolValue !== "SCTP") {
    reader.reject([...path, "protocol"], `invalid protocol ${describeValue(protocolValue)}; use TCP, UDP or SCTP`);
    return undefined;
  }
  const portValue = reader.value([...path, "port"]);
  if (portValue === undefined || portValue === null) return { name, protocol: protocolValue };
  const port = reader.port([...path, "port"]);
  return port === undefined ? undefined : { name, port, protocol: protocolValue };
}
