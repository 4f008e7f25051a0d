{{/*
Helpers for the resources this chart creates itself (relay, migration Job,
monitoring). They take the chart's root context.
*/}}

{{- define "config-agent.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-scoped name: "<release>-config-agent", or the release name if it already says so. */}}
{{- define "config-agent.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "config-agent.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "config-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: pass (dict "root" $ "component" "relay"). */}}
{{- define "config-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "config-agent.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "config-agent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "config-agent.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
Pod-level part of the chart's own pods; pass (dict "root" $ "hook" bool). A pre-install hook
runs before the release's ServiceAccount exists, so hooks (hook=true) use the
namespace's default account unless an existing one is named.
*/}}
{{- define "config-agent.ownPodSpec" -}}
{{- $root := .root -}}
{{- if and .hook $root.Values.serviceAccount.create }}
serviceAccountName: default
{{- else }}
serviceAccountName: {{ include "config-agent.serviceAccountName" $root }}
{{- end }}
automountServiceAccountToken: {{ $root.Values.serviceAccount.automountServiceAccountToken }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- include "config-agent.podSecurityContext" $root | nindent 2 }}
{{- end -}}

{{/* The injector's serving certificate Secret (made by cert-manager, or given). */}}
{{- define "config-agent.injectorTlsSecret" -}}
{{- default (printf "%s-injector-tls" (include "config-agent.fullname" .)) .Values.injector.tls.secretName -}}
{{- end -}}
