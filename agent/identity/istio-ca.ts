// The client of Istio's CA: istiod's gRPC service istio.v1.auth.IstioCertificateService, which signs
// workload CSRs for a caller authenticated by its Kubernetes service-account token.

import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { performance } from "node:perf_hooks";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { AgentError } from "../errors";
import { silentLogger, type Logger } from "../log";
import type { Identity } from "../state/types";
import type { CertificateIssuer, IssuedCertificate } from "./certificate";
import { certificateMatchesKey, createCertificateRequest, leafIdentity, type CertificateRequest } from "./csr";
import { formatSpiffeId, sameIdentity } from "./spiffe";

export const DEFAULT_CA_ADDRESS = "istiod.istio-system.svc:15012";
/** The projected service-account token istiod expects, with audience istio-ca. */
export const DEFAULT_TOKEN_FILE = "/var/run/secrets/tokens/istio-token";
export const DEFAULT_CLUSTER_ID = "Kubernetes";
export const DEFAULT_CA_REQUEST_TIMEOUT_MS = 10_000;
/** The request metadata key that makes the CA sign for a workload other than the caller. */
export const IMPERSONATED_IDENTITY = "ImpersonatedIdentity";

/**
 * ca.proto stays in the source tree because tsc copies no .proto files to dist/. From
 * dist/agent/identity the source tree is three folders up.
 */
export const CA_PROTO_FILE = path.resolve(__dirname, "..", "..", "..", "agent", "identity", "proto", "ca.proto");

/** A peer certificate's notBefore may be this far in the future, for a CA whose clock runs ahead. */
const CLOCK_SKEW_MS = 60_000;

const PEM_CERTIFICATE = /-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g;

export interface IstioCaClientOptions {
  /** The CA's gRPC address, "host:port" or "[ipv6]:port", for example istiod.istio-system.svc:15012. */
  address: string;
  /** PEM file with the root(s) that the CA's TLS certificate must chain to. The TLS check is never skipped. */
  rootCertFile: string;
  /** Service-account token file, read again for every request because the kubelet rotates it. */
  tokenFile: string;
  /** Sent as the clusterid metadata: istiod validates the token with the API server of this cluster. Default "Kubernetes". */
  clusterId?: string;
  /**
   * The identity the token authenticates (the agent's own). Requests for any other identity carry
   * ImpersonatedIdentity. When absent, every request carries it, as ztunnel does in shared mode.
   */
  agentIdentity?: Identity;
  /** Deadline of one CreateCertificate call, milliseconds. Default 10 000. */
  requestTimeoutMs?: number;
  /** The name checked against the CA's TLS certificate. Default the host part of address. */
  tlsServerName?: string;
  logger?: Logger;
}

/** IstioCertificateRequest as proto-loader encodes it (keepCase; Struct values use camelCase). */
export interface CertificateRequestMessage {
  csr: string;
  validity_duration: number;
  metadata?: { fields: Record<string, { stringValue: string }> };
}

/** IstioCertificateResponse as proto-loader decodes it. */
export interface CertificateResponseMessage {
  cert_chain: string[];
}

/** The generated service definition of istio.v1.auth.IstioCertificateService. */
export type CertificateServiceConstructor = grpc.ServiceClientConstructor;

interface CertificateServiceClient extends grpc.Client {
  CreateCertificate(
    request: CertificateRequestMessage,
    metadata: grpc.Metadata,
    options: grpc.CallOptions,
    callback: (error: grpc.ServiceError | null, response?: CertificateResponseMessage) => void,
  ): grpc.ClientUnaryCall;
}

/**
 * Loads IstioCertificateService from ca.proto. Throws AgentError INTERNAL naming the path when the file
 * is missing, which means the installation lacks agent/identity/proto.
 */
export function loadCertificateService(protoFile: string = CA_PROTO_FILE): CertificateServiceConstructor {
  if (!fs.existsSync(protoFile)) {
    throw new AgentError(
      "INTERNAL",
      `the Istio CA protocol file ${protoFile} is missing: install agent/identity/proto/ca.proto next to dist/`,
    );
  }
  const definition = protoLoader.loadSync(protoFile, { keepCase: true, longs: Number, defaults: true, oneofs: true });
  const root = grpc.loadPackageDefinition(definition) as unknown as {
    istio: { v1: { auth: { IstioCertificateService: CertificateServiceConstructor } } };
  };
  return root.istio.v1.auth.IstioCertificateService;
}

/** Requests workload certificates from Istio's CA over gRPC with TLS, authenticated by a service-account token. */
export class IstioCaClient implements CertificateIssuer {
  readonly address: string;
  readonly #options: Required<Omit<IstioCaClientOptions, "agentIdentity" | "logger">> & { agentIdentity?: Identity };
  readonly #client: CertificateServiceClient;
  readonly #logger: Logger;

  constructor(options: IstioCaClientOptions) {
    const host = hostOf(options.address);
    this.address = options.address;
    this.#options = {
      address: options.address,
      rootCertFile: options.rootCertFile,
      tokenFile: options.tokenFile,
      clusterId: options.clusterId ?? DEFAULT_CLUSTER_ID,
      agentIdentity: options.agentIdentity,
      requestTimeoutMs: options.requestTimeoutMs ?? DEFAULT_CA_REQUEST_TIMEOUT_MS,
      tlsServerName: options.tlsServerName ?? host,
    };
    this.#logger = (options.logger ?? silentLogger()).child({ component: "istio-ca", ca: options.address });

    const credentials = grpc.credentials.createSsl(readRootCertificates(options.rootCertFile));
    const Service = loadCertificateService();
    // NOTE: grpc-js also sends this name as TLS SNI. An IP address there makes Node print a one-time
    // DEP0123 warning, and the IP is still checked against the certificate's IP SANs.
    this.#client = new Service(options.address, credentials, {
      "grpc.ssl_target_name_override": this.#options.tlsServerName,
      "grpc.default_authority": this.#options.tlsServerName,
    }) as unknown as CertificateServiceClient;
  }

  /** Creates a key and CSR for `identity`, has the CA sign it, and checks the response before returning it. */
  async issue(identity: Identity, ttlSeconds?: number): Promise<IssuedCertificate> {
    const started = performance.now();
    const spiffeId = formatSpiffeId(identity);
    try {
      const issued = await this.request(identity, ttlSeconds);
      this.#logger.debug({ identity: spiffeId, notAfter: issued.notAfter.toISOString(), durationMs: elapsedMs(started) }, "certificate issued");
      return issued;
    } catch (error) {
      // The caller retries and logs at its own level. No message contains the token, the key or the CSR.
      const code = error instanceof AgentError ? error.code : "INTERNAL";
      this.#logger.debug({ identity: spiffeId, code, error: (error as Error).message, durationMs: elapsedMs(started) }, "certificate request failed");
      throw error;
    }
  }

  /** Closes the channel; calls in flight fail with CANCELLED. */
  close(): void {
    this.#client.close();
  }

  private async request(identity: Identity, ttlSeconds: number | undefined): Promise<IssuedCertificate> {
    checkTtl(ttlSeconds);
    const metadata = this.buildMetadata(readToken(this.#options.tokenFile));
    const request = await createCertificateRequest(identity);
    const message = this.buildRequest(request, ttlSeconds);
    let response: CertificateResponseMessage;
    try {
      response = await this.createCertificate(message, metadata);
    } catch (error) {
      throw this.callError(formatSpiffeId(identity), error as grpc.ServiceError);
    }
    return parseCertificateResponse(request, response.cert_chain ?? [], this.address);
  }

  private buildMetadata(token: string): grpc.Metadata {
    const metadata = new grpc.Metadata();
    metadata.set("authorization", `Bearer ${token}`);
    metadata.set("clusterid", this.#options.clusterId);
    return metadata;
  }

  private buildRequest(request: CertificateRequest, ttlSeconds: number | undefined): CertificateRequestMessage {
    const message: CertificateRequestMessage = {
      csr: request.csrPem,
      // Zero requests the CA's default lifetime.
      validity_duration: ttlSeconds === undefined ? 0 : Math.ceil(ttlSeconds),
    };
    const agent = this.#options.agentIdentity;
    if (agent === undefined || !sameIdentity(agent, request.identity)) {
      // Without this key istiod signs for the token's own identity and ignores the CSR's SAN.
      message.metadata = { fields: { [IMPERSONATED_IDENTITY]: { stringValue: formatSpiffeId(request.identity) } } };
    }
    return message;
  }

  private createCertificate(message: CertificateRequestMessage, metadata: grpc.Metadata): Promise<CertificateResponseMessage> {
    const deadline = Date.now() + this.#options.requestTimeoutMs;
    return new Promise((resolve, reject) => {
      this.#client.CreateCertificate(message, metadata, { deadline }, (error, response) => {
        if (error) reject(error);
        else resolve(response ?? { cert_chain: [] });
      });
    });
  }

  /** Maps a gRPC failure to CA_UNAVAILABLE (try again later) or CA_REJECTED (fix the configuration). */
  private callError(spiffeId: string, error: grpc.ServiceError): AgentError {
    const { address, rootCertFile, tokenFile, tlsServerName, requestTimeoutMs, clusterId } = this.#options;
    const detail = error.details || error.message;
    const prefix = `Istio's CA at ${address} did not issue a certificate for ${spiffeId}`;
    switch (error.code) {
      case grpc.status.DEADLINE_EXCEEDED:
        return new AgentError(
          "CA_UNAVAILABLE",
          `${prefix}: no response within ${requestTimeoutMs} ms; check that istiod is running and reachable at ${address}`,
          { cause: error },
        );
      case grpc.status.UNAVAILABLE:
      case grpc.status.CANCELLED:
      case grpc.status.RESOURCE_EXHAUSTED:
      case grpc.status.ABORTED:
      case grpc.status.INTERNAL:
      case grpc.status.UNKNOWN:
        return new AgentError(
          "CA_UNAVAILABLE",
          `${prefix}: ${grpc.status[error.code]} (${detail}); check the address, that istiod is running, and that ` +
            `${rootCertFile} holds the root of the CA's TLS certificate issued for ${tlsServerName}`,
          { cause: error },
        );
      case grpc.status.UNAUTHENTICATED:
      case grpc.status.PERMISSION_DENIED:
        return new AgentError(
          "CA_REJECTED",
          `${prefix}: ${grpc.status[error.code]} (${detail}); check that the token in ${tokenFile} is current and has ` +
            `audience istio-ca, that cluster id ${clusterId} is right, and, for workloads, that the agent's service ` +
            `account may act for them (istiod's CA_TRUSTED_NODE_ACCOUNTS) and the workload runs on this node`,
          { cause: error },
        );
      default:
        return new AgentError(
          "CA_REJECTED",
          `${prefix}: ${grpc.status[error.code] ?? error.code} (${detail}); check the requested lifetime against the ` +
            `CA's maximum and that the CA accepts ECDSA P-256 requests`,
          { cause: error },
        );
    }
  }
}

/**
 * Checks a CreateCertificate response and turns it into an IssuedCertificate. cert_chain is the leaf,
 * then intermediates, then the root(s) in the last element, which may hold several concatenated
 * certificates. Every element may hold several certificates. The leaf must carry the requested
 * identity and key, chain through the intermediates to one of the returned roots, and be valid now.
 * Throws AgentError CA_REJECTED naming the check that failed.
 */
export function parseCertificateResponse(
  request: CertificateRequest,
  certChain: string[],
  address: string,
  now: Date = new Date(),
): IssuedCertificate {
  const spiffeId = formatSpiffeId(request.identity);
  const reject = (problem: string): AgentError =>
    new AgentError("CA_REJECTED", `the certificate for ${spiffeId} from Istio's CA at ${address} was rejected: ${problem}`);

  const elements = certChain.map((element, index) => splitPemCertificates(element, index, reject));
  if (elements.length < 2) {
    throw reject(`cert_chain has ${elements.length} element(s); expected the leaf and at least one root`);
  }
  const { leafPem, intermediatePems, rootPems } = classifyChain(elements);
  const leaf = new crypto.X509Certificate(leafPem);
  const intermediates = intermediatePems.map((pem) => new crypto.X509Certificate(pem));
  const roots = rootPems.map((pem) => new crypto.X509Certificate(pem));

  const presented = leafIdentity(leafPem);
  if (presented === undefined || !sameIdentity(presented, request.identity)) {
    const name = presented === undefined ? "no SPIFFE identity" : formatSpiffeId(presented);
    throw new AgentError(
      "IDENTITY_ERROR",
      `the certificate for ${spiffeId} from Istio's CA at ${address} was rejected: the leaf certificate is for ${name}, not the requested ${spiffeId}`,
    );
  }
  if (!certificateMatchesKey(leafPem, request.publicKeySpki)) {
    throw reject("the leaf certificate's public key is not the key of the request");
  }
  checkChain(leaf, intermediates, roots, reject);
  checkValidity(leaf, intermediates, now, reject);

  return {
    identity: { ...request.identity },
    certPem: leafPem,
    keyPem: request.keyPem,
    chainPem: [leafPem, ...intermediatePems].join(""),
    caRootsPem: rootPems.join(""),
    notBefore: new Date(leaf.validFrom),
    notAfter: new Date(leaf.validTo),
  };
}

/** Splits one cert_chain element into single PEM certificates, each parsed once to reject garbage early. */
function splitPemCertificates(element: string, index: number, reject: (problem: string) => AgentError): string[] {
  const pems = (element.match(PEM_CERTIFICATE) ?? []).map((pem) => pem.trim() + "\n");
  if (pems.length === 0) {
    throw reject(`cert_chain element ${index} contains no PEM certificate`);
  }
  for (const pem of pems) {
    try {
      new crypto.X509Certificate(pem);
    } catch (error) {
      throw reject(`cert_chain element ${index} contains an invalid certificate (${(error as Error).message})`);
    }
  }
  return pems;
}

/**
 * Picks the leaf (the first certificate), the roots (every certificate of the last element) and the
 * intermediates. Recent istiod releases split every element into single certificates, so a bundle of
 * several roots arrives as several elements: single self-signed CA certificates just before the last
 * element count as roots too.
 */
function classifyChain(elements: string[][]): { leafPem: string; intermediatePems: string[]; rootPems: string[] } {
  const [first, ...rest] = elements;
  const last = rest.pop() as string[];
  const rootPems = [...last];
  while (rest.length > 0 && rest[rest.length - 1].length === 1 && isSelfSignedCa(rest[rest.length - 1][0])) {
    rootPems.unshift((rest.pop() as string[])[0]);
  }
  return { leafPem: first[0], intermediatePems: [...first.slice(1), ...rest.flat()], rootPems };
}

function isSelfSignedCa(pem: string): boolean {
  return isSelfSignedCaCertificate(new crypto.X509Certificate(pem));
}

function isSelfSignedCaCertificate(certificate: crypto.X509Certificate): boolean {
  return certificate.ca && certificate.checkIssued(certificate) && certificate.verify(certificate.publicKey);
}

/** Walks leaf -> intermediates in order -> one of the roots, checking each issuer name and signature. */
function checkChain(
  leaf: crypto.X509Certificate,
  intermediates: crypto.X509Certificate[],
  roots: crypto.X509Certificate[],
  reject: (problem: string) => AgentError,
): void {
  for (const [index, root] of roots.entries()) {
    if (!isSelfSignedCaCertificate(root)) {
      throw reject(`root ${index + 1} (${root.subject}) is not a self-signed CA certificate`);
    }
  }
  if (leaf.ca) {
    throw reject("the leaf is a CA certificate (basicConstraints CA:true); a workload certificate has CA:false");
  }
  let current = leaf;
  for (const [index, intermediate] of intermediates.entries()) {
    if (!intermediate.ca) {
      throw reject(`intermediate ${index + 1} (${intermediate.subject}) is not a CA certificate`);
    }
    if (!isIssuedBy(current, intermediate)) {
      throw reject(`intermediate ${index + 1} (${intermediate.subject}) did not sign the certificate before it (${current.subject || "the leaf"})`);
    }
    current = intermediate;
  }
  if (!roots.some((root) => isIssuedBy(current, root))) {
    throw reject(`the chain does not end at any of the ${roots.length} root(s) in the response (last issuer: ${current.issuer})`);
  }
}

function isIssuedBy(certificate: crypto.X509Certificate, issuer: crypto.X509Certificate): boolean {
  return certificate.checkIssued(issuer) && certificate.verify(issuer.publicKey);
}

function checkValidity(
  leaf: crypto.X509Certificate,
  intermediates: crypto.X509Certificate[],
  now: Date,
  reject: (problem: string) => AgentError,
): void {
  if (Date.parse(leaf.validFrom) > now.getTime() + CLOCK_SKEW_MS) {
    throw reject(`the leaf certificate is not valid before ${leaf.validFrom}; check the clocks of this node and the CA`);
  }
  for (const certificate of [leaf, ...intermediates]) {
    if (Date.parse(certificate.validTo) <= now.getTime()) {
      throw reject(`the certificate ${certificate.subject || "(the leaf)"} expired at ${certificate.validTo}`);
    }
  }
}

/** Reads the token file; the error names the file and never its content. */
function readToken(tokenFile: string): string {
  let token: string;
  try {
    token = fs.readFileSync(tokenFile, "utf8").trim();
  } catch (error) {
    throw new AgentError(
      "CA_REJECTED",
      `cannot read the service-account token file ${tokenFile} (${(error as NodeJS.ErrnoException).code ?? String(error)}): ` +
        "mount a projected token with audience istio-ca there, or point --ca-token-file at one",
    );
  }
  if (token === "") {
    throw new AgentError("CA_REJECTED", `the service-account token file ${tokenFile} is empty: expected a JWT with audience istio-ca`);
  }
  return token;
}

/** Reads the PEM roots that verify the CA's TLS certificate. */
function readRootCertificates(rootCertFile: string): Buffer {
  let pem: Buffer;
  try {
    pem = fs.readFileSync(rootCertFile);
  } catch (error) {
    throw new AgentError(
      "CA_UNAVAILABLE",
      `cannot read the CA root certificate file ${rootCertFile} (${(error as NodeJS.ErrnoException).code ?? String(error)}): ` +
        "point --ca-root-cert at the PEM root of istiod's TLS certificate (the istio-ca-root-cert ConfigMap's root-cert.pem)",
    );
  }
  const certificates = pem.toString("utf8").match(PEM_CERTIFICATE) ?? [];
  try {
    certificates.forEach((certificate) => new crypto.X509Certificate(certificate));
  } catch (error) {
    throw new AgentError("CA_UNAVAILABLE", `the CA root certificate file ${rootCertFile} contains an invalid certificate; give the PEM root of the CA's TLS certificate (root-cert.pem of the istio-ca-root-cert ConfigMap)`, { cause: error });
  }
  if (certificates.length === 0) {
    throw new AgentError("CA_UNAVAILABLE", `the CA root certificate file ${rootCertFile} contains no PEM certificate; give the PEM root of the CA's TLS certificate (root-cert.pem of the istio-ca-root-cert ConfigMap)`);
  }
  return pem;
}

function elapsedMs(started: number): number {
  return Math.round((performance.now() - started) * 10) / 10;
}

function checkTtl(ttlSeconds: number | undefined): void {
  if (ttlSeconds !== undefined && !(Number.isFinite(ttlSeconds) && ttlSeconds > 0)) {
    throw new AgentError("CA_REJECTED", `invalid certificate lifetime ${ttlSeconds} s: expected a positive number of seconds`);
  }
}

/** Returns the host of "host:port" or "[ipv6]:port"; throws when the port is missing. */
function hostOf(address: string): string {
  const match = /^(?:\[([^\]]+)\]|([^:]+)):(\d+)$/.exec(address);
  if (!match) {
    throw new AgentError("CA_UNAVAILABLE", `invalid CA address ${JSON.stringify(address)}: expected host:port, for example ${DEFAULT_CA_ADDRESS}`);
  }
  return match[1] ?? match[2];
}
