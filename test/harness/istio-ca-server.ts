// A stand-in for istiod's CA: a real gRPC server for istio.v1.auth.IstioCertificateService over TLS,
// loaded from the agent's ca.proto, that authenticates, authorizes and signs as istiod does, records
// every request, and fails on demand. Every key and certificate is generated at start; nothing is on disk.
//
// What it does as istiod does: a bearer token authenticates a caller; without ImpersonatedIdentity the
// leaf is for the caller's own identity (the CSR's SAN is ignored); with it, the caller must be a trusted
// node account and the leaf is for the impersonated identity; validity_duration <= 0 gets the default
// lifetime and one above the maximum fails INVALID_ARGUMENT; the response is [leaf, intermediate?, roots].
// What it simplifies: tokens are opaque strings mapped to identities (istiod validates a JWT with the
// API server), and "a pod with that service account runs on the caller's node" is a configured set.

import "reflect-metadata";
import crypto from "node:crypto";
import * as grpc from "@grpc/grpc-js";
import * as x509 from "@peculiar/x509";
import { AgentError } from "../../agent/errors";
import { EC_KEY, SIGNING, verifyCertificateRequest } from "../../agent/identity/csr";
import {
  IMPERSONATED_IDENTITY,
  loadCertificateService,
  type CertificateRequestMessage,
  type CertificateResponseMessage,
} from "../../agent/identity/istio-ca";
import { formatSpiffeId, parseSpiffeId, sameIdentity } from "../../agent/identity/spiffe";
import type { Identity } from "../../agent/state/types";

type CryptoKeyPair = crypto.webcrypto.CryptoKeyPair;

x509.cryptoProvider.set(crypto.webcrypto as never);

const DAY_SECONDS = 24 * 3600;
/** Leaves start this much in the past, as istiod backdates its certificates for clock skew. */
const BACKDATE_MS = 60_000;

export interface IstioCaServerOptions {
  trustDomain?: string;
  /** Bearer token -> the service account it authenticates. */
  tokens: Record<string, Identity>;
  /** Callers allowed to send ImpersonatedIdentity; istiod's CA_TRUSTED_NODE_ACCOUNTS. */
  trustedNodeAccounts?: Identity[];
  /** Identities a trusted caller may impersonate; models "a pod with that service account runs on the caller's node". Default any. */
  impersonable?: Identity[];
  /** The clusterid value to require; any value is accepted when absent. */
  clusterId?: string;
  /** Sign leaves with an intermediate CA under the root. */
  intermediate?: boolean;
  /** Send every certificate as its own cert_chain element, as recent istiod releases do; default false: the roots share the last element. */
  splitRoots?: boolean;
  defaultTtlSeconds?: number;
  /** Longer requested lifetimes fail with INVALID_ARGUMENT, as istiod's MAX_WORKLOAD_CERT_TTL does. Default 90 days. */
  maxTtlSeconds?: number;
  /** DNS names of the serving certificate, besides IP 127.0.0.1. */
  serverNames?: string[];
}

/** One CreateCertificate call as the server saw it. */
export interface CaRequestRecord {
  /** The bearer token presented, or undefined when the header was missing or not "Bearer <token>". */
  token?: string;
  tokenOk: boolean;
  caller?: string;
  clusterId?: string;
  impersonatedIdentity?: string;
  /** The SPIFFE id in the CSR's SAN, when the CSR verified. */
  csrIdentity?: string;
  /** The number of names in the CSR's SAN extension. */
  csrNameCount?: number;
  csrPem: string;
  ttlSeconds: number;
  /** The SPIFFE id of the issued leaf. */
  issuedIdentity?: string;
  status: grpc.status;
  details?: string;
}

interface SigningCa {
  root: x509.X509Certificate;
  rootKeys: CryptoKeyPair;
  /** The certificate and keys leaves are signed with: the intermediate, or the root itself. */
  signer: x509.X509Certificate;
  signerKeys: CryptoKeyPair;
}

type Responder = (error: grpc.ServiceError | null, response?: CertificateResponseMessage) => void;

export class IstioCaServer {
  readonly requests: CaRequestRecord[] = [];
  /** The root that signed the serving certificate: the client's rootCertFile. */
  readonly tlsRootPem: string;
  address = "";
  readonly #options: IstioCaServerOptions;
  readonly #server = new grpc.Server();
  #ca: SigningCa;
  /** The roots sent in responses; the old and the new root while a rotation overlaps. */
  #bundle: x509.X509Certificate[];
  #failures: Array<{ status: grpc.status; details: string }> = [];
  #stall: number | "forever" | undefined;
  readonly #held = new Set<() => void>();
  #wrongIdentity = false;

  private constructor(options: IstioCaServerOptions, ca: SigningCa) {
    this.#options = options;
    this.#ca = ca;
    this.#bundle = [ca.root];
    this.tlsRootPem = pemOf(ca.root);
  }

  /** Starts a server on 127.0.0.1 with a fresh root and a serving certificate for istiod.istio-system.svc. */
  static async start(options: IstioCaServerOptions): Promise<IstioCaServer> {
    const trustDomain = options.trustDomain ?? "cluster.local";
    const server = new IstioCaServer(options, await createSigningCa(trustDomain, options.intermediate ?? false));
    await server.listen();
    return server;
  }

  /** Makes the next n calls fail with `status`. */
  failNext(n: number, status: grpc.status, details = "injected failure"): void {
    for (let i = 0; i < n; i += 1) this.#failures.push({ status, details });
  }

  /** Delays responses by `ms`, or holds them until release() for "forever". undefined stops stalling. */
  stall(duration: number | "forever" | undefined): void {
    this.#stall = duration;
  }

  /** Sends the response to every held call and stops stalling. */
  release(): void {
    this.#stall = undefined;
    for (const answer of [...this.#held]) answer();
  }

  /** While on, leaves are signed for another service account in the requested namespace. */
  wrongIdentity(on: boolean): void {
    this.#wrongIdentity = on;
  }

  /** Switches signing to a new root; responses carry the old and the new root until endRootOverlap(). */
  async rotateRoot(): Promise<void> {
    const previous = this.#ca.root;
    this.#ca = await createSigningCa(this.#options.trustDomain ?? "cluster.local", this.#options.intermediate ?? false);
    this.#bundle = [previous, this.#ca.root];
  }

  /** Ends a rotation's overlap: responses carry the new root only. */
  endRootOverlap(): void {
    this.#bundle = [this.#ca.root];
  }

  /** The PEM roots that responses currently carry. */
  get rootsPem(): string {
    return this.#bundle.map(pemOf).join("");
  }

  /** The PEM intermediate leaves are signed with, or undefined when the root signs them. */
  get intermediatePem(): string | undefined {
    return this.#ca.signer === this.#ca.root ? undefined : pemOf(this.#ca.signer);
  }

  async close(): Promise<void> {
    this.release();
    await new Promise<void>((resolve) => this.#server.tryShutdown(() => resolve()));
    this.#server.forceShutdown();
  }

  private async listen(): Promise<void> {
    const serving = await createServingCertificate(this.#ca, this.#options.serverNames ?? ["istiod.istio-system.svc", "localhost"]);
    const credentials = grpc.ServerCredentials.createSsl(null, [{ private_key: Buffer.from(serving.keyPem), cert_chain: Buffer.from(serving.chainPem) }], false);
    const Service = loadCertificateService();
    this.#server.addService(Service.service, {
      CreateCertificate: (call: grpc.ServerUnaryCall<CertificateRequestMessage, CertificateResponseMessage>, callback: Responder) => {
        this.handle(call, callback);
      },
    });
    const port = await new Promise<number>((resolve, reject) => {
      this.#server.bindAsync("127.0.0.1:0", credentials, (error, bound) => (error ? reject(error) : resolve(bound)));
    });
    this.address = `127.0.0.1:${port}`;
  }

  private handle(call: grpc.ServerUnaryCall<CertificateRequestMessage, CertificateResponseMessage>, callback: Responder): void {
    const record = this.recordOf(call);
    this.requests.push(record);
    const answer = (): void => {
      this.#held.delete(answer);
      this.answer(call.request, record).then(
        (response) => callback(null, response),
        (error: grpc.ServiceError) => callback(error),
      );
    };
    const stall = this.#stall;
    if (stall === undefined) {
      answer();
      return;
    }
    this.#held.add(answer);
    call.on("cancelled", () => this.#held.delete(answer));
    if (stall !== "forever") setTimeout(() => this.#held.has(answer) && answer(), stall).unref();
  }

  private recordOf(call: grpc.ServerUnaryCall<CertificateRequestMessage, CertificateResponseMessage>): CaRequestRecord {
    const authorization = String(call.metadata.get("authorization")[0] ?? "");
    const token = /^Bearer (.+)$/.exec(authorization)?.[1];
    const caller = token === undefined ? undefined : this.#options.tokens[token];
    const impersonated = call.request.metadata?.fields?.[IMPERSONATED_IDENTITY]?.stringValue;
    const clusterId = call.metadata.get("clusterid")[0];
    return {
      token,
      tokenOk: caller !== undefined,
      caller: caller === undefined ? undefined : formatSpiffeId(caller),
      clusterId: clusterId === undefined ? undefined : String(clusterId),
      impersonatedIdentity: impersonated === "" ? undefined : impersonated,
      csrPem: call.request.csr,
      ttlSeconds: Number(call.request.validity_duration),
      status: grpc.status.OK,
    };
  }

  /** Authenticates, authorizes and signs in istiod's order; a failure rejects with a gRPC status. */
  private async answer(request: CertificateRequestMessage, record: CaRequestRecord): Promise<CertificateResponseMessage> {
    const fail = (status: grpc.status, details: string): grpc.ServiceError => {
      record.status = status;
      record.details = details;
      return Object.assign(new Error(details), { code: status, details, metadata: new grpc.Metadata() });
    };
    const injected = this.#failures.shift();
    if (injected) throw fail(injected.status, injected.details);

    if (!record.tokenOk) throw fail(grpc.status.UNAUTHENTICATED, "request authenticate failure");
    if (this.#options.clusterId !== undefined && record.clusterId !== this.#options.clusterId) {
      throw fail(grpc.status.UNAUTHENTICATED, "request authenticate failure");
    }
    const caller = parseSpiffeId(record.caller as string);
    let verified;
    try {
      verified = await verifyCertificateRequest(request.csr);
    } catch (error) {
      throw fail(grpc.status.INVALID_ARGUMENT, `CSR signing error (${(error as AgentError).message})`);
    }
    record.csrIdentity = formatSpiffeId(verified.identity);
    const san = verified.csr.extensions.find((extension) => extension instanceof x509.SubjectAlternativeNameExtension) as
      | x509.SubjectAlternativeNameExtension
      | undefined;
    record.csrNameCount = san?.names.items.length ?? 0;

    const subject = this.authorizeSubject(caller, record, verified.identity, fail);
    const ttlSeconds = this.lifetimeOf(record.ttlSeconds, fail);
    const issuedFor = this.#wrongIdentity ? { ...subject, serviceAccount: `${subject.serviceAccount}-other` } : subject;
    const leaf = await signLeaf(this.#ca, verified.publicKey, issuedFor, ttlSeconds);
    record.issuedIdentity = formatSpiffeId(issuedFor);
    return { cert_chain: this.chainOf(leaf) };
  }

  /** Returns the identity to sign for: the caller's own, or an impersonated one the caller may act for. */
  private authorizeSubject(
    caller: Identity,
    record: CaRequestRecord,
    csrIdentity: Identity,
    fail: (status: grpc.status, details: string) => grpc.ServiceError,
  ): Identity {
    if (record.impersonatedIdentity === undefined) return caller;
    const trusted = (this.#options.trustedNodeAccounts ?? []).some((account) => sameIdentity(account, caller));
    if (!trusted) throw fail(grpc.status.UNAUTHENTICATED, "request impersonation authentication failure");
    let impersonated: Identity;
    try {
      impersonated = parseSpiffeId(record.impersonatedIdentity);
    } catch {
      throw fail(grpc.status.UNAUTHENTICATED, "request impersonation authentication failure");
    }
    const allowed = this.#options.impersonable;
    if (allowed !== undefined && !allowed.some((identity) => sameIdentity(identity, impersonated))) {
      throw fail(grpc.status.UNAUTHENTICATED, "request impersonation authentication failure");
    }
    if (!sameIdentity(impersonated, csrIdentity)) {
      throw fail(grpc.status.INVALID_ARGUMENT, "the CSR's SAN differs from ImpersonatedIdentity");
    }
    return impersonated;
  }

  private lifetimeOf(requested: number, fail: (status: grpc.status, details: string) => grpc.ServiceError): number {
    const maximum = this.#options.maxTtlSeconds ?? 90 * DAY_SECONDS;
    if (requested > maximum) {
      throw fail(grpc.status.INVALID_ARGUMENT, `requested TTL ${requested}s is greater than the max allowed TTL ${maximum}s`);
    }
    return requested > 0 ? requested : (this.#options.defaultTtlSeconds ?? DAY_SECONDS);
  }

  private chainOf(leaf: x509.X509Certificate): string[] {
    const intermediates = this.#ca.signer === this.#ca.root ? [] : [pemOf(this.#ca.signer)];
    const roots = this.#bundle.map(pemOf);
    if (this.#options.splitRoots) return [pemOf(leaf), ...intermediates, ...roots];
    return [pemOf(leaf), ...intermediates, roots.join("")];
  }
}

async function createSigningCa(trustDomain: string, withIntermediate: boolean): Promise<SigningCa> {
  const rootKeys = await generateKeys();
  const now = Date.now();
  const root = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: randomSerialNumber(),
    name: `CN=test istiod root ${now}, O=${trustDomain}`,
    notBefore: new Date(now - BACKDATE_MS),
    notAfter: new Date(now + 365 * DAY_SECONDS * 1000),
    keys: rootKeys,
    signingAlgorithm: SIGNING,
    extensions: caExtensions(),
  });
  if (!withIntermediate) return { root, rootKeys, signer: root, signerKeys: rootKeys };

  const signerKeys = await generateKeys();
  const signer = await x509.X509CertificateGenerator.create({
    serialNumber: randomSerialNumber(),
    subject: `CN=test istiod intermediate ${now}, O=${trustDomain}`,
    issuer: root.subject,
    notBefore: new Date(now - BACKDATE_MS),
    notAfter: new Date(now + 180 * DAY_SECONDS * 1000),
    publicKey: signerKeys.publicKey,
    signingKey: rootKeys.privateKey,
    signingAlgorithm: SIGNING,
    extensions: [...caExtensions(), await x509.AuthorityKeyIdentifierExtension.create(root.publicKey)],
  });
  return { root, rootKeys, signer, signerKeys };
}

function caExtensions(): x509.Extension[] {
  return [
    new x509.BasicConstraintsExtension(true, undefined, true),
    new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
  ];
}

async function signLeaf(ca: SigningCa, publicKey: x509.PublicKey, identity: Identity, ttlSeconds: number): Promise<x509.X509Certificate> {
  const now = Date.now();
  return x509.X509CertificateGenerator.create({
    serialNumber: randomSerialNumber(),
    subject: "",
    issuer: ca.signer.subject,
    notBefore: new Date(now - BACKDATE_MS),
    notAfter: new Date(now + ttlSeconds * 1000),
    publicKey,
    signingKey: ca.signerKeys.privateKey,
    signingAlgorithm: SIGNING,
    extensions: [
      new x509.BasicConstraintsExtension(false, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature | x509.KeyUsageFlags.keyEncipherment, true),
      new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.serverAuth, x509.ExtendedKeyUsage.clientAuth]),
      new x509.SubjectAlternativeNameExtension([{ type: "url", value: formatSpiffeId(identity) }], true),
    ],
  });
}

/** Signs the gRPC serving certificate with the signing CA, as istiod's DNS certificate is signed by the mesh CA. */
async function createServingCertificate(ca: SigningCa, dnsNames: string[]): Promise<{ keyPem: string; chainPem: string }> {
  const keys = await generateKeys();
  const now = Date.now();
  const certificate = await x509.X509CertificateGenerator.create({
    serialNumber: randomSerialNumber(),
    subject: "CN=istiod",
    issuer: ca.signer.subject,
    notBefore: new Date(now - BACKDATE_MS),
    notAfter: new Date(now + 30 * DAY_SECONDS * 1000),
    publicKey: keys.publicKey,
    signingKey: ca.signerKeys.privateKey,
    signingAlgorithm: SIGNING,
    extensions: [
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
      new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.serverAuth]),
      new x509.SubjectAlternativeNameExtension([...dnsNames.map((value) => ({ type: "dns" as const, value })), { type: "ip", value: "127.0.0.1" }]),
    ],
  });
  const der = await crypto.webcrypto.subtle.exportKey("pkcs8", keys.privateKey);
  const intermediates = ca.signer === ca.root ? "" : pemOf(ca.signer);
  return { keyPem: x509.PemConverter.encode(der, "PRIVATE KEY") + "\n", chainPem: pemOf(certificate) + intermediates };
}

/** Creates a self-signed root that signed nothing here, for clients that must fail the CA's TLS check. */
export async function createUnrelatedRootPem(): Promise<string> {
  const keys = await generateKeys();
  const root = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: randomSerialNumber(),
    name: "CN=unrelated root",
    keys,
    signingAlgorithm: SIGNING,
    extensions: caExtensions(),
  });
  return pemOf(root);
}

async function generateKeys(): Promise<CryptoKeyPair> {
  return (await crypto.webcrypto.subtle.generateKey(EC_KEY, true, ["sign", "verify"])) as CryptoKeyPair;
}

function pemOf(certificate: x509.X509Certificate): string {
  return certificate.toString("pem") + "\n";
}

function randomSerialNumber(): string {
  const bytes = crypto.randomBytes(16);
  bytes[0] &= 0x7f;
  bytes[0] |= 0x01;
  return bytes.toString("hex");
}
