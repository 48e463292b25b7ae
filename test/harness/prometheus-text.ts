// A parser for the Prometheus text exposition format (version 0.0.4), enough to read an agent's
// /metrics in tests. It returns the samples with their labels and values, and skips comments (HELP, TYPE).

export interface MetricSample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

const SAMPLE_NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*/;
const LABEL_NAME = /^[a-zA-Z_][a-zA-Z0-9_]*/;

/** Parses every sample line of `text`. Throws naming the line for a line that is not a valid sample. */
export function parsePrometheusText(text: string): MetricSample[] {
  const samples: MetricSample[] = [];
  text.split("\n").forEach((line, index) => {
    const trimmed = line.trim();
    if (trimmed === "" || trimmed.startsWith("#")) return;
    try {
      samples.push(parseSample(trimmed));
    } catch (error) {
      throw new Error(`invalid Prometheus sample on line ${index + 1} (${JSON.stringify(line)}): ${(error as Error).message}`);
    }
  });
  return samples;
}

function parseSample(line: string): MetricSample {
  const name = SAMPLE_NAME.exec(line)?.[0];
  if (name === undefined) throw new Error("missing metric name");
  let rest = line.slice(name.length);
  const labels: Record<string, string> = {};
  if (rest.startsWith("{")) {
    rest = rest.slice(1);
    for (;;) {
      rest = rest.trimStart();
      if (rest.startsWith("}")) break;
      const label = LABEL_NAME.exec(rest)?.[0];
      if (label === undefined) throw new Error("missing label name");
      rest = rest.slice(label.length);
      if (!rest.startsWith('="')) throw new Error(`missing =" after label ${label}`);
      const { value, length } = readQuoted(rest.slice(2));
      labels[label] = value;
      rest = rest.slice(2 + length).trimStart();
      if (rest.startsWith(",")) rest = rest.slice(1);
      else if (!rest.startsWith("}")) throw new Error(`expected , or } after label ${label}`);
    }
    rest = rest.slice(1);
  }
  // The value may be followed by a timestamp in milliseconds, which the tests do not need.
  const [valueText] = rest.trim().split(/\s+/);
  return { name, labels, value: parseValue(valueText) };
}

/** Reads a label value up to its closing quote; returns the value and the characters read, quote included. */
function readQuoted(text: string): { value: string; length: number } {
  let value = "";
  for (let index = 0; index < text.length; index += 1) {
    const character = text[index];
    if (character === '"') return { value, length: index + 1 };
    if (character === "\\") {
      const escaped = text[index + 1];
      if (escaped === "n") value += "\n";
      else if (escaped === "\\" || escaped === '"') value += escaped;
      else throw new Error(`invalid escape \\${escaped ?? ""} in a label value`);
      index += 1;
    } else {
      value += character;
    }
  }
  throw new Error("unterminated label value");
}

function parseValue(text: string | undefined): number {
  if (text === undefined || text === "") throw new Error("missing value");
  // Prometheus reads these with Go's strconv.ParseFloat, which ignores case, and prom-client writes "Nan".
  const special = text.toLowerCase();
  if (special === "+inf" || special === "inf") return Infinity;
  if (special === "-inf") return -Infinity;
  if (special === "nan") return NaN;
  const value = Number(text);
  if (Number.isNaN(value)) throw new Error(`invalid value ${JSON.stringify(text)}`);
  return value;
}

/** Returns the samples named `name` whose labels include every entry of `labels`. */
export function samplesOf(samples: readonly MetricSample[], name: string, labels: Record<string, string> = {}): MetricSample[] {
  return samples.filter((sample) => sample.name === name && Object.entries(labels).every(([key, value]) => sample.labels[key] === value));
}

/** Returns the sum of the values of samplesOf(samples, name, labels); 0 when none matches. */
export function sumOf(samples: readonly MetricSample[], name: string, labels: Record<string, string> = {}): number {
  return samplesOf(samples, name, labels).reduce((total, sample) => total + sample.value, 0);
}
