// Manifest discovery: Kubernetes objects read from YAML or JSON files in one folder. This module
// is the entry point; parsing, field checks and the folder watcher live in the manifest-* files.

export { parseManifests } from "./manifest-parse";
export { formatManifestProblem, objectKey } from "./manifest-problem";
export type { ManifestProblem, ObjectKind, ParsedObject, ParseResult } from "./manifest-problem";
export { ManifestSource } from "./manifest-source";
