{{/*
Names and labels. Every helper takes the chart's own context; a backend chart passes
.Subcharts.<alias> (Helm 3.7+), which is that context.
*/}}

{{- define "sidecar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sidecar.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := include "sidecar.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "sidecar.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sidecar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "sidecar.labels" -}}
helm.sh/chart: {{ include "sidecar.chart" . }}
{{- include "sidecar.selectorLabels" . | nindent 0 }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{- toYaml . | nindent 0 }}
{{- end }}
{{- end }}

{{- define "sidecar.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sidecar.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "sidecar.configMapName" -}}
{{- printf "%s-config" (include "sidecar.fullname" . | trunc 56 | trimSuffix "-") }}
{{- end }}

{{- define "sidecar.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}

{{/*
The configuration file's text: .Values.config as given when it is a string, else rendered as YAML.
*/}}
{{- define "sidecar.configYaml" -}}
{{- if kindIs "string" .Values.config }}
{{- .Values.config }}
{{- else }}
{{- toYaml .Values.config }}
{{- end }}
{{- end }}

{{/*
SIDECAR_REDIS_URL built from .Values.redis (empty when Redis is not configured). URL forms (rediss with tls):
  standalone  redis://host:6379/0
  sentinel    redis+sentinel://host:26379/mymaster/0
  cluster     redis+cluster://host:6379
*/}}
{{- define "sidecar.redisUrl" -}}
{{- $r := .Values.redis }}
{{- if $r.url }}
{{- $r.url }}
{{- else if $r.mode }}
{{- $host := required (printf "redis.host is required with redis.mode %s" $r.mode) $r.host }}
{{- $scheme := ternary "rediss" "redis" (eq (toString $r.tls) "true") }}
{{- if eq $r.mode "standalone" }}
{{- printf "%s://%s:%d/%d" $scheme $host (int ($r.port | default 6379)) (int $r.db) }}
{{- else if eq $r.mode "sentinel" }}
{{- printf "%s+sentinel://%s:%d/%s/%d" $scheme $host (int ($r.port | default 26379)) $r.sentinelMaster (int $r.db) }}
{{- else if eq $r.mode "cluster" }}
{{- printf "%s+cluster://%s:%d" $scheme $host (int ($r.port | default 6379)) }}
{{- else }}
{{- fail (printf "redis.mode must be standalone, sentinel or cluster, not %q" $r.mode) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
True (non-empty) when more than one sidecar process may run, which needs Redis for shared state.
*/}}
{{- define "sidecar.scalesOut" -}}
{{- if or (gt (int .Values.workers) 1) .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1) }}true{{ end }}
{{- end }}

{{/*
The container's memory limit when resources.limits.memory is not set: workers × (workerMi + cacheMi × 3/2 +
inFlightMi), plus supervisorMi when there is more than one worker (values.yaml, memoryBudget).
*/}}
{{- define "sidecar.memoryLimit" -}}
{{- $budget := .Values.memoryBudget -}}
{{- $workers := int .Values.workers -}}
{{- $perWorker := add (int $budget.workerMi) (div (mul (int $budget.cacheMi) 3) 2) (int $budget.inFlightMi) -}}
{{- $total := mul $workers $perWorker -}}
{{- if gt $workers 1 -}}
{{- $total = add $total (int $budget.supervisorMi) -}}
{{- end -}}
{{- printf "%dMi" $total -}}
{{- end }}
