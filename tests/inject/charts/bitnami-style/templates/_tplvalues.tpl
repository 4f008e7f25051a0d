{{/*
bitnami/common's common.tplvalues.render (charts/common/templates/_tplvalues.tpl):
a value that is not a string is rendered with toYaml, and through tpl when it
holds a template.
*/}}
{{- define "common.tplvalues.render" -}}
{{- $value := typeIs "string" .value | ternary .value (.value | toYaml) }}
{{- if contains "{{" (toJson .value) }}
  {{- tpl $value .context }}
{{- else }}
    {{- $value }}
{{- end }}
{{- end -}}
