{{/*
Application name: the chart's name unless nameOverride replaces it.
*/}}
{{- define "ambient-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Name of every object of the release: fullnameOverride, else the release name when it already contains the
application name, else "<release>-<application name>". Kubernetes limits label values and many names to 63
characters.
*/}}
{{- define "ambient-agent.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "ambient-agent.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Labels that select the agent's pods. They never change across upgrades, because a DaemonSet's selector is immutable.
*/}}
{{- define "ambient-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ambient-agent.name" . | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
{{- end -}}

{{/*
Labels of every object of the release.
*/}}
{{- define "ambient-agent.labels" -}}
{{ include "ambient-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
app.kubernetes.io/part-of: ambient-agent
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" | quote }}
{{- end -}}

{{/*
Image reference: repository@digest when a digest is given, else repository:tag with the appVersion as default tag.
*/}}
{{- define "ambient-agent.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
The embedded CA mode: true when ca.secretName names the CA's Secret, false for istiod's CA.
*/}}
{{- define "ambient-agent.embeddedCa" -}}
{{- if .Values.ca.secretName -}}true{{- end -}}
{{- end -}}

{{/*
Checks the combinations of values that values.schema.json cannot express clearly, and fails with the values'
names and the fix.
*/}}
{{- define "ambient-agent.validate" -}}
{{- $ca := .Values.ca -}}
{{- if and $ca.address $ca.secretName -}}
{{- fail (printf "ca.address (%q) and ca.secretName (%q) are both set: set ca.address for istiod's CA, or ca.secretName for the embedded CA and ca.address to \"\"" $ca.address $ca.secretName) -}}
{{- end -}}
{{- if not (or $ca.address $ca.secretName) -}}
{{- fail "ca.address and ca.secretName are both empty: set ca.address to istiod's CA (for example istiod.istio-system.svc:15012), or ca.secretName to a Secret made from `agentctl ca init`" -}}
{{- end -}}
{{- if and $ca.secretName $ca.serverName -}}
{{- fail (printf "ca.serverName (%q) applies to istiod's CA only, but ca.secretName selects the embedded CA: set ca.serverName to \"\"" $ca.serverName) -}}
{{- end -}}
{{- if has "none" .Values.excludedNamespaces -}}
{{- fail "excludedNamespaces contains \"none\", but the release namespace is always excluded: give [] to exclude the release namespace only" -}}
{{- end -}}
{{- if and (has "none" .Values.probeSource) (gt (len .Values.probeSource) 1) -}}
{{- fail (printf "probeSource (%s) combines \"none\" with addresses: give [\"none\"] alone to exempt no address, or addresses only" (toJson .Values.probeSource)) -}}
{{- end -}}
{{- if and (not .Values.audit.file.enabled) (empty .Values.audit.sinks) -}}
{{- fail "audit.file.enabled is false and audit.sinks is empty: the agent needs an audit destination, so enable the file or add a sink such as stdout" -}}
{{- end -}}
{{- $stopSeconds := add1 (add 15 (ceil .Values.drainTimeoutSeconds)) -}}
{{- if lt (float64 .Values.terminationGracePeriodSeconds) (float64 $stopSeconds) -}}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be at least %v: the agent's stop may take drainTimeoutSeconds (%v) plus 15 s before it exits (the uninstall decision, then the rest of the stop)" .Values.terminationGracePeriodSeconds $stopSeconds .Values.drainTimeoutSeconds) -}}
{{- end -}}
{{- if and .Values.cni.enabled (not (has .Values.hostPaths.run (list "/run/ambient-agent" "/var/run/ambient-agent"))) -}}
{{- fail (printf "hostPaths.run (%q) must be /run/ambient-agent or /var/run/ambient-agent while cni.enabled is true: the CNI plugin on the host dials /var/run/ambient-agent/cni.sock" .Values.hostPaths.run) -}}
{{- end -}}
{{- range .Values.securityContext.extraCapabilities -}}
{{- if hasPrefix "CAP_" . -}}
{{- fail (printf "securityContext.extraCapabilities lists %q: give it without the CAP_ prefix (%s), as Kubernetes names capabilities" . (trimPrefix "CAP_" .)) -}}
{{- end -}}
{{- end -}}
{{- include "ambient-agent.validateUpdateStrategy" . -}}
{{- include "ambient-agent.validateExtraArgs" . -}}
{{- include "ambient-agent.validateSize" (list "limits.maxHeaderListSize" .Values.limits.maxHeaderListSize 4294967295) -}}
{{- include "ambient-agent.validateSize" (list "limits.maxBufferedBytes" .Values.limits.maxBufferedBytes 9007199254740991) -}}
{{- end -}}

{{/*
Fails for a size with a unit (the schema checks its form) above the agent's maximum in bytes. Takes a list of the
value's name, the value and the maximum. The product is a float64, which is exact at both maxima (a power of 2 times a
whole number below 2^53), and rounding never moves a larger size below them.
*/}}
{{- define "ambient-agent.validateSize" -}}
{{- $name := index . 0 -}}
{{- $value := index . 1 -}}
{{- $max := index . 2 -}}
{{- if kindIs "string" $value -}}
{{- $unit := get (dict "" 1 "kib" 1024 "mib" 1048576 "gib" 1073741824) (lower (regexFind "[A-Za-z]*$" $value)) -}}
{{- $bytes := mulf (float64 (regexFind "^[0-9]+" $value)) $unit -}}
{{- if gt $bytes (float64 $max) -}}
{{- fail (printf "%s (%q) is %.0f bytes, more than the agent's maximum of %.0f bytes: give a smaller size, for example %s" $name $value $bytes (float64 $max) (ternary "16KiB" "256MiB" (eq $name "limits.maxHeaderListSize"))) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Fails for a RollingUpdate that may neither start a new pod early nor stop one early, which the API server
rejects. Kubernetes defaults an absent maxSurge to 0 and an absent maxUnavailable to 1.
*/}}
{{- define "ambient-agent.validateUpdateStrategy" -}}
{{- $strategy := .Values.updateStrategy -}}
{{- if eq $strategy.type "RollingUpdate" -}}
{{- $rolling := $strategy.rollingUpdate | default dict -}}
{{- $surge := dig "maxSurge" 0 $rolling | toString -}}
{{- $unavailable := dig "maxUnavailable" 1 $rolling | toString -}}
{{- if and (has $surge (list "0" "0%")) (has $unavailable (list "0" "0%")) -}}
{{- fail (printf "updateStrategy.rollingUpdate.maxSurge (%s) and updateStrategy.rollingUpdate.maxUnavailable (%s) are both zero, which Kubernetes rejects: keep maxSurge 1 with maxUnavailable 0, which hands each node over with no failed connection" $surge $unavailable) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Fails when extraArgs gives an option that the chart sets from the release or ties to a volume it mounts,
or one of the kubelet probe options that the chart sets together from probeSource and probeSnat: on the
command line it would replace the ConfigMap's value. --replace, --idle-after-handover and --kubernetes
are left out, because a switch on the command line can only repeat the file's true. --probe-snat is not,
because the file lacks it when probeSnat is false or probeSource is ["none"]. The agent has no
--no-probe-snat, and the entry points to the value that turns the table off.
*/}}
{{- define "ambient-agent.validateExtraArgs" -}}
{{- $chartOptions := dict
  "config" "the agent reads the chart's ConfigMap from it, so set the chart's values instead"
  "node" "the chart gives the pod's node (spec.nodeName), which the agent serves"
  "daemonset" "the agent watches the chart's own DaemonSet to tell an uninstall from a restart, so another one would leave capture and the CNI entry on every node after helm uninstall"
  "excluded-namespaces" "set excludedNamespaces instead. The chart adds the release namespace to that list, and a list given here would drop it, so that a new agent pod could wait on the agent's own CNI plugin"
  "host-proc" "set hostPaths.proc, which the chart mounts at /host/proc"
  "cgroup" "set hostPaths.cgroup, which the chart mounts at /host/sys/fs/cgroup"
  "cni-conf-dir" "set cni.confDir or cni.enabled, which the chart mounts at /host/etc/cni/net.d"
  "cni-bin-dir" "set cni.binDir, which the chart mounts at /host/opt/cni/bin"
  "cni-socket" "the CNI plugin on the host dials /var/run/ambient-agent/cni.sock, under hostPaths.run"
  "audit-file" "set audit.file.enabled and hostPaths.auditLog, which the chart mounts at /var/log/ambient-agent"
  "ca-dir" "set ca.secretName, which the chart mounts at /etc/ambient-agent/ca"
  "ca-root-cert" "set ca.rootCertConfigMap, which the chart mounts at /var/run/secrets/istio"
  "ca-token-file" "set ca.tokenAudience, the audience of the token the chart mounts at /var/run/secrets/tokens"
  "probe-source" "set probeSource instead. The chart writes probe-snat only when probeSource is not [\"none\"], and a list given here would replace probeSource behind that decision"
  "probe-snat" "set probeSnat: true instead, which the chart leaves out when probeSource is [\"none\"]"
  "no-probe-snat" "set probeSnat: false instead"
  "host-netns" "the agent writes the probe SNAT table in the network namespace of the host's PID 1 under hostPaths.proc, which the chart mounts at /host/proc, so set hostPaths.proc instead"
-}}
{{- range $arg := .Values.extraArgs -}}
{{- if hasPrefix "--" $arg -}}
{{- /* --NAME and --NAME=VALUE name the same option. */ -}}
{{- $name := regexReplaceAll "(?s)=.*" (trimPrefix "--" $arg) "" -}}
{{- with get $chartOptions $name -}}
{{- fail (printf "extraArgs gives %q, but the chart controls --%s: %s" $arg $name .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
The agent's configuration file: the long option names of `ambient-agent run` without the dashes, and their values.
toYaml quotes every value, so no value can add keys.
*/}}
{{- define "ambient-agent.config" -}}
{{- $v := .Values -}}
{{- $config := dict
  "kubernetes" true
  "host-proc" "/host/proc"
  "cgroup" "/host/sys/fs/cgroup"
  "replace" true
  "idle-after-handover" true
  "daemonset" (printf "%s/%s" .Release.Namespace (include "ambient-agent.fullname" .))
  "excluded-namespaces" (uniq (concat $v.excludedNamespaces (list .Release.Namespace)))
  "root-namespace" $v.rootNamespace
  "trust-domain" $v.trustDomain
  "capture" $v.capture.mode
  "cert-ttl" $v.certTtlSeconds
  "audit-fsync" $v.audit.fsync
  "drain-timeout" $v.drainTimeoutSeconds
  "log-level" $v.logging.level
  "log-format" $v.logging.format
-}}
{{- if $v.capture.transparentSource -}}
{{- $_ := set $config "transparent-source" true -}}
{{- else -}}
{{- $_ := set $config "no-transparent-source" true -}}
{{- end -}}
{{- with $v.trustDomainAliases -}}
{{- $_ := set $config "trust-domain-alias" . -}}
{{- end -}}
{{- with $v.probeSource -}}
{{- $_ := set $config "probe-source" . -}}
{{- end -}}
{{- if and $v.probeSnat (not (has "none" $v.probeSource)) -}}
{{- $_ := set $config "probe-snat" true -}}
{{- end -}}
{{- if $v.cni.enabled -}}
{{- $_ := set $config "cni-conf-dir" "/host/etc/cni/net.d" -}}
{{- $_ := set $config "cni-bin-dir" "/host/opt/cni/bin" -}}
{{- $_ := set $config "cni-timeout" $v.cni.timeoutSeconds -}}
{{- end -}}
{{- if include "ambient-agent.embeddedCa" . -}}
{{- $_ := set $config "ca-dir" "/etc/ambient-agent/ca" -}}
{{- else -}}
{{- $_ := set $config "ca-address" $v.ca.address -}}
{{- $_ := set $config "ca-root-cert" "/var/run/secrets/istio/root-cert.pem" -}}
{{- $_ := set $config "ca-token-file" "/var/run/secrets/tokens/istio-token" -}}
{{- $_ := set $config "cluster-id" $v.ca.clusterId -}}
{{- with $v.ca.serverName -}}
{{- $_ := set $config "ca-server-name" . -}}
{{- end -}}
{{- end -}}
{{- if $v.audit.file.enabled -}}
{{- $_ := set $config "audit-file" "/var/log/ambient-agent/audit.log" -}}
{{- $_ := set $config "audit-file-max-size" $v.audit.file.maxSize -}}
{{- $_ := set $config "audit-file-max-age" $v.audit.file.maxAge -}}
{{- $_ := set $config "audit-file-max-files" $v.audit.file.maxFiles -}}
{{- else -}}
{{- $_ := set $config "audit-file" "none" -}}
{{- end -}}
{{- with $v.audit.sinks -}}
{{- $_ := set $config "audit-sink" . -}}
{{- end -}}
{{- with $v.audit.redact -}}
{{- $_ := set $config "audit-redact" . -}}
{{- end -}}
{{- $limits := dict
  "max-connections-per-pod" $v.limits.maxConnectionsPerPod
  "max-connections-per-peer" $v.limits.maxConnectionsPerPeer
  "max-streams-per-connection" $v.limits.maxStreamsPerConnection
  "max-streams-per-peer" $v.limits.maxStreamsPerPeer
  "max-header-list-size" $v.limits.maxHeaderListSize
  "max-buffered-bytes" $v.limits.maxBufferedBytes
-}}
{{- range $key, $value := $limits -}}
{{- /* Helm reads numbers as float64, which toYaml writes as 1e+06 from a million up: the schema allows only whole numbers here. */ -}}
{{- $_ := set $config $key (ternary (int64 $value) $value (kindIs "float64" $value)) -}}
{{- end -}}
{{- range $key, $value := dict "handshake-timeout" $v.limits.handshakeTimeoutSeconds "idle-timeout" $v.limits.idleTimeoutSeconds -}}
{{- /* Whole seconds as integers and fractions as plain decimals, because toYaml writes a float64 from a million up
with an exponent (1.5e+06), which the agent rejects. The agent keeps ms, so 3 decimals lose nothing. */ -}}
{{- $whole := eq (float64 (int64 $value)) (float64 $value) -}}
{{- $_ := set $config $key (ternary (int64 $value) (regexReplaceAll "\\.?0+$" (printf "%.3f" (float64 $value)) "") $whole) -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}
