{{/*
Named templates that inject config-agent into any pod.

Every template here takes ONE context: a dict whose "Values" are this chart's
values. From an application chart that depends on this chart with
`alias: configAgent`:

    {{- $ca := dict "Values" .Values.configAgent }}
    initContainers:
      {{- include "config-agent.initContainers" $ca | nindent 8 }}

This chart's own root context (`.`) has the same shape, so its templates use
them too. See README.md for the complete Deployment snippet.
*/}}

{{/* Volume names, shared by the templates below. */}}
{{- define "config-agent.volumeName.output" -}}config-agent-output{{- end -}}
{{- define "config-agent.volumeName.run" -}}config-agent-run{{- end -}}
{{- define "config-agent.volumeName.state" -}}config-agent-state{{- end -}}
{{- define "config-agent.volumeName.tmp" -}}config-agent-tmp{{- end -}}
{{- define "config-agent.secretsDir" -}}/var/run/secrets/config-agent{{- end -}}

{{/* Directory of the Unix socket: the shared "run" emptyDir. */}}
{{- define "config-agent.runDir" -}}
{{- dir .Values.socket.path -}}
{{- end -}}

{{- define "config-agent.image" -}}
{{- $image := .Values.image -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository $image.tag -}}
{{- end -}}
{{- end -}}

{{/*
The hardened container securityContext of every config-agent container.
UID/GID 65532 match the image's USER.
*/}}
{{- define "config-agent.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/*
Suggested pod securityContext: fsGroup 65532 lets the app (any UID) use the
socket (mode 0660) and keeps the emptyDirs group-owned by the agent.
*/}}
{{- define "config-agent.podSecurityContext" -}}
fsGroup: 65532
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Labels to add to the injected pod's template; the PodMonitor selects them. */}}
{{- define "config-agent.podLabels" -}}
config-agent/role: agent
{{- end -}}

{{/* The optional Secret-file mounts of the agent: list of (volume, dir, secret). */}}
{{- define "config-agent.secretFiles" -}}
{{- $files := list -}}
{{- with .Values.database.passwordSecret -}}
{{- if .name }}{{ $files = append $files (dict "volume" "config-agent-db-password" "dir" "database" "secret" .) }}{{ end -}}
{{- end -}}
{{- with .Values.redis.passwordSecret -}}
{{- if .name }}{{ $files = append $files (dict "volume" "config-agent-redis-password" "dir" "redis" "secret" .) }}{{ end -}}
{{- end -}}
{{- with .Values.redis.caSecret -}}
{{- if .name }}{{ $files = append $files (dict "volume" "config-agent-redis-ca" "dir" "redis-ca" "secret" .) }}{{ end -}}
{{- end -}}
{{- toJson $files -}}
{{- end -}}

{{/* Environment of the agent, for `run` and `once`. URLs only via secretKeyRef. */}}
{{- define "config-agent.env" -}}
{{- $v := .Values -}}
{{- $secretsDir := include "config-agent.secretsDir" . -}}
- name: CONFIG_AGENT_ORG_ID
  value: {{ required "orgId is required: the tenant this agent serves (e.g. acme for namespace org-acme)" $v.orgId | quote }}
{{- with $v.services }}
- name: CONFIG_AGENT_SERVICES
  value: {{ join "," . | quote }}
{{- end }}
- name: CONFIG_AGENT_FLAG_SERVICES
  value: {{ join "," $v.flagServices | quote }}
- name: CONFIG_AGENT_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ $v.database.urlSecret.name }}
      key: {{ $v.database.urlSecret.key }}
{{- with $v.database.readUrlSecret }}{{ if .name }}
- name: CONFIG_AGENT_DATABASE_READ_URL
  valueFrom:
    secretKeyRef:
      name: {{ .name }}
      key: {{ .key }}
{{- end }}{{ end }}
{{- with $v.database.passwordSecret }}{{ if .name }}
- name: CONFIG_AGENT_DATABASE_PASSWORD_FILE
  value: {{ printf "%s/database/%s" $secretsDir .key | quote }}
{{- end }}{{ end }}
- name: CONFIG_AGENT_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $v.redis.urlSecret.name }}
      key: {{ $v.redis.urlSecret.key }}
{{- with $v.redis.passwordSecret }}{{ if .name }}
- name: CONFIG_AGENT_REDIS_PASSWORD_FILE
  value: {{ printf "%s/redis/%s" $secretsDir .key | quote }}
{{- end }}{{ end }}
{{- with $v.redis.caSecret }}{{ if .name }}
- name: CONFIG_AGENT_REDIS_CA_FILE
  value: {{ printf "%s/redis-ca/%s" $secretsDir .key | quote }}
{{- end }}{{ end }}
- name: CONFIG_AGENT_HTTP_HOST
  value: "127.0.0.1"
- name: CONFIG_AGENT_HTTP_PORT
  value: {{ $v.http.port | int | toString | quote }}
{{- if $v.socket.enabled }}
- name: CONFIG_AGENT_SOCKET_PATH
  value: {{ $v.socket.path | quote }}
- name: CONFIG_AGENT_SOCKET_MODE
  value: {{ $v.socket.mode | quote }}
{{- end }}
- name: CONFIG_AGENT_OUTPUT_DIR
  value: {{ $v.outputDir | quote }}
- name: CONFIG_AGENT_STATE_DIR
  value: {{ $v.stateDir | quote }}
- name: CONFIG_AGENT_METRICS_HOST
  value: {{ $v.metrics.host | quote }}
- name: CONFIG_AGENT_METRICS_PORT
  value: {{ $v.metrics.port | int | toString | quote }}
- name: CONFIG_AGENT_RECONCILE_INTERVAL
  value: {{ $v.reconcileInterval | toString | quote }}
- name: CONFIG_AGENT_FALLBACK_POLL_INTERVAL
  value: {{ $v.fallbackPollInterval | toString | quote }}
- name: CONFIG_AGENT_STALE_AFTER
  value: {{ $v.staleAfter | toString | quote }}
- name: CONFIG_AGENT_HEARTBEAT_INTERVAL
  value: {{ $v.heartbeatInterval | toString | quote }}
- name: CONFIG_AGENT_LAG_CHASE_TIMEOUT
  value: {{ $v.lagChaseTimeout | toString | quote }}
- name: CONFIG_AGENT_FETCH_JITTER
  value: {{ $v.fetchJitter | toString | quote }}
- name: CONFIG_AGENT_FLEET_REPORT_INTERVAL
  value: {{ $v.fleetReportInterval | toString | quote }}
- name: CONFIG_AGENT_AGENT_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: CONFIG_AGENT_AGENT_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: CONFIG_AGENT_DATABASE_POOL_MODE
  value: {{ $v.database.poolMode | default "session" | quote }}
- name: CONFIG_AGENT_REDIS_CHANNELS
  value: {{ $v.redis.channels | default "auto" | quote }}
- name: CONFIG_AGENT_LOG_FORMAT
  value: {{ $v.logFormat | quote }}
- name: CONFIG_AGENT_LOG_LEVEL
  value: {{ $v.logLevel | quote }}
{{- with $v.hooks }}
{{- if .exec }}
- name: CONFIG_AGENT_ON_CHANGE_EXEC
  value: {{ .exec | quote }}
{{- end }}
{{- if .signal.name }}
- name: CONFIG_AGENT_ON_CHANGE_SIGNAL
  value: {{ .signal.name | quote }}
- name: CONFIG_AGENT_SIGNAL_PIDFILE
  value: {{ required "hooks.signal.pidfile is required with hooks.signal.name" .signal.pidfile | quote }}
{{- end }}
{{- if .webhook }}
- name: CONFIG_AGENT_ON_CHANGE_WEBHOOK
  value: {{ .webhook | quote }}
{{- end }}
- name: CONFIG_AGENT_HOOK_DEBOUNCE
  value: {{ .debounce | toString | quote }}
- name: CONFIG_AGENT_HOOK_TIMEOUT
  value: {{ .timeout | toString | quote }}
{{- end }}
{{- with $v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Volume mounts of the agent container (read-write where it writes). */}}
{{- define "config-agent.agentVolumeMounts" -}}
- name: {{ include "config-agent.volumeName.output" . }}
  mountPath: {{ .Values.outputDir }}
- name: {{ include "config-agent.volumeName.run" . }}
  mountPath: {{ include "config-agent.runDir" . }}
- name: {{ include "config-agent.volumeName.state" . }}
  mountPath: {{ .Values.stateDir }}
- name: {{ include "config-agent.volumeName.tmp" . }}
  mountPath: /tmp
{{- range (include "config-agent.secretFiles" . | fromJsonArray) }}
- name: {{ .volume }}
  mountPath: {{ printf "%s/%s" (include "config-agent.secretsDir" $) .dir }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* Fields shared by the `run` container (both modes) and the `once` init container. */}}
{{- define "config-agent.containerBase" -}}
image: {{ include "config-agent.image" . | quote }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
env:
  {{- include "config-agent.env" . | nindent 2 }}
resources:
  {{- toYaml .Values.resources | nindent 2 }}
securityContext:
  {{- include "config-agent.containerSecurityContext" . | nindent 2 }}
volumeMounts:
  {{- include "config-agent.agentVolumeMounts" . | nindent 2 }}
{{- end -}}

{{/*
The long-running agent container (`config-agent run`) with its probes. The HTTP
API binds 127.0.0.1, which the kubelet cannot reach, so every probe uses the
metrics port, which also serves /healthz and /readyz.
*/}}
{{- define "config-agent.sidecarContainer" -}}
name: config-agent
args:
  - run
{{- if eq .Values.mode "native" }}
restartPolicy: Always
{{- end }}
{{ include "config-agent.containerBase" . }}
ports:
  - name: agent-metrics
    containerPort: {{ .Values.metrics.port | int }}
    protocol: TCP
startupProbe:
  httpGet:
    path: /readyz
    port: agent-metrics
  periodSeconds: {{ .Values.probes.startup.periodSeconds }}
  failureThreshold: {{ .Values.probes.startup.failureThreshold }}
  timeoutSeconds: 1
readinessProbe:
  httpGet:
    path: /readyz
    port: agent-metrics
  periodSeconds: {{ .Values.probes.readiness.periodSeconds }}
  failureThreshold: {{ .Values.probes.readiness.failureThreshold }}
  timeoutSeconds: 2
livenessProbe:
  httpGet:
    path: /healthz
    port: agent-metrics
  periodSeconds: {{ .Values.probes.liveness.periodSeconds }}
  failureThreshold: {{ .Values.probes.liveness.failureThreshold }}
  timeoutSeconds: 2
{{- end -}}

{{/* Classic mode only: `config-agent once` writes the files before the app starts. */}}
{{- define "config-agent.onceContainer" -}}
name: config-agent-init
args:
  - once
{{ include "config-agent.containerBase" . }}
{{- end -}}

{{/*
Items for the pod's initContainers list.
native:  the agent itself (restartPolicy Always + startupProbe on /readyz, so
         the app containers start only once the first load is written).
classic: the `once` init container.
Put it first so that the app's own init containers can read the files too.
*/}}
{{- define "config-agent.initContainers" -}}
{{- if eq .Values.mode "native" -}}
- {{ include "config-agent.sidecarContainer" . | nindent 2 | trim }}
{{- else -}}
- {{ include "config-agent.onceContainer" . | nindent 2 | trim }}
{{- end -}}
{{- end -}}

{{/* Items for the pod's containers list: the agent in classic mode, nothing in native mode. */}}
{{- define "config-agent.containers" -}}
{{- if eq .Values.mode "classic" -}}
- {{ include "config-agent.sidecarContainer" . | nindent 2 | trim }}
{{- end -}}
{{- end -}}

{{/* Items for the pod's volumes list. */}}
{{- define "config-agent.volumes" -}}
- name: {{ include "config-agent.volumeName.output" . }}
  emptyDir:
    {{- /* tmpfs: the file set is small, and a swap's fsyncs cost nothing there. */}}
    medium: Memory
    sizeLimit: {{ .Values.emptyDirSizeLimit }}
- name: {{ include "config-agent.volumeName.run" . }}
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
- name: {{ include "config-agent.volumeName.state" . }}
  emptyDir:
    sizeLimit: {{ .Values.emptyDirSizeLimit }}
- name: {{ include "config-agent.volumeName.tmp" . }}
  emptyDir:
    sizeLimit: {{ .Values.emptyDirSizeLimit }}
{{- range (include "config-agent.secretFiles" . | fromJsonArray) }}
- name: {{ .volume }}
  secret:
    secretName: {{ .secret.name }}
    defaultMode: {{ $.Values.secretFileMode | int }}
    items:
      - key: {{ .secret.key }}
        path: {{ .secret.key }}
{{- end }}
{{- end -}}

{{/*
Items for the app container's volumeMounts: the file set read-only at
outputDir, and the socket directory (read-only, or read-write when the signal
hook needs the app to write its pidfile there).
*/}}
{{- define "config-agent.appVolumeMounts" -}}
- name: {{ include "config-agent.volumeName.output" . }}
  mountPath: {{ .Values.outputDir }}
  readOnly: true
- name: {{ include "config-agent.volumeName.run" . }}
  mountPath: {{ include "config-agent.runDir" . }}
  readOnly: {{ not .Values.hooks.signal.name }}
{{- end -}}

{{/*
Items for the app container's env: where to find the agent. Deliberately not
prefixed CONFIG_AGENT_ (that prefix configures the agent itself).
*/}}
{{- define "config-agent.appEnv" -}}
- name: CONFIG_URL
  value: {{ printf "http://127.0.0.1:%d" (.Values.http.port | int) | quote }}
- name: CONFIG_DIR
  value: {{ .Values.outputDir | quote }}
{{- if .Values.socket.enabled }}
- name: CONFIG_SOCKET
  value: {{ .Values.socket.path | quote }}
{{- end }}
{{- end -}}
