{{/*
"sidecar.container": the sidecar's container, one list item. Used by this chart's Deployment and, in
sidecar mode, by a backend chart that has this chart as a dependency:

  containers:
    - name: backend
      ...
    {{- include "sidecar.container" .Subcharts.sidecar | nindent 4 }}
  volumes:
    {{- include "sidecar.volumes" .Subcharts.sidecar | nindent 4 }}

In sidecar mode the ports are named sidecar-http, sidecar-admin (and sidecar-metrics), because port names must be unique
within a pod and a backend usually has its own "http".
*/}}
{{- define "sidecar.container" -}}
{{- if not (has .Values.mode (list "proxy" "decision" "both")) -}}
{{- fail "mode must be proxy, decision or both" -}}
{{- end -}}
{{- $prefix := ternary "sidecar-" "" (eq (toString .Values.sidecarMode.enabled) "true") -}}
- name: sidecar
  image: {{ include "sidecar.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args:
    - run
    - --config
    - /etc/sidecar/sidecar.yaml
    - --host
    - 0.0.0.0
    - --port
    - {{ .Values.containerPorts.http | quote }}
    - --admin-port
    - {{ .Values.containerPorts.admin | quote }}
    - --workers
    - {{ .Values.workers | quote }}
    - --log-format
    - {{ .Values.logging.format | quote }}
    - --log-level
    - {{ .Values.logging.level | quote }}
    {{- if gt (int .Values.metricsPort) 0 }}
    - --metrics-port
    - {{ .Values.metricsPort | quote }}
    {{- end }}
    {{- if ne .Values.mode "proxy" }}
    - --decision-port
    - {{ .Values.containerPorts.decision | quote }}
    {{- end }}
    {{- with .Values.extraArgs }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: {{ $prefix }}http
      containerPort: {{ .Values.containerPorts.http }}
      protocol: TCP
    - name: {{ $prefix }}admin
      containerPort: {{ .Values.containerPorts.admin }}
      protocol: TCP
    {{- if gt (int .Values.metricsPort) 0 }}
    - name: {{ $prefix }}metrics
      containerPort: {{ .Values.metricsPort }}
    {{- end }}
    {{- if ne .Values.mode "proxy" }}
    - name: {{ $prefix }}decision
      containerPort: {{ .Values.containerPorts.decision }}
      protocol: TCP
    {{- end }}
  env:
    - name: SIDECAR_ADMIN_HOST
      value: {{ .Values.adminHost | quote }}
    {{- if .Values.tracing.otlpEndpoint }}
    - name: OTEL_EXPORTER_OTLP_ENDPOINT
      value: {{ .Values.tracing.otlpEndpoint | quote }}
    - name: OTEL_EXPORTER_OTLP_PROTOCOL
      value: "http/protobuf"
    - name: OTEL_SERVICE_NAME
      value: {{ .Values.tracing.serviceName | quote }}
    - name: OTEL_TRACES_SAMPLER
      value: "parentbased_traceidratio"
    - name: OTEL_TRACES_SAMPLER_ARG
      value: {{ .Values.tracing.sampleRatio | quote }}
    {{- end }}
    {{- if ne .Values.mode "proxy" }}
    - name: SIDECAR_DECISION_HOST
      value: {{ .Values.decisionHost | quote }}
    {{- end }}
    - name: SIDECAR_CACHE_MAX_BYTES
      value: {{ mul (int .Values.memoryBudget.cacheMi) 1048576 | quote }}
    {{- with .Values.secrets.existingSecret }}
    {{- if $.Values.secrets.adminTokenKey }}
    - name: SIDECAR_ADMIN_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ . }}
          key: {{ $.Values.secrets.adminTokenKey }}
    {{- end }}
    {{- if $.Values.secrets.signingKeyKey }}
    - name: SIDECAR_SIGNING_KEY
      valueFrom:
        secretKeyRef:
          name: {{ . }}
          key: {{ $.Values.secrets.signingKeyKey }}
    {{- end }}
    {{- if $.Values.secrets.keysSecretKey }}
    - name: SIDECAR_KEYS_SECRET
      valueFrom:
        secretKeyRef:
          name: {{ . }}
          key: {{ $.Values.secrets.keysSecretKey }}
    {{- end }}
    {{- end }}
    {{- range .Values.secrets.webhookSecrets }}
    - name: {{ required "secrets.webhookSecrets[].env is required" .env }}
      valueFrom:
        secretKeyRef:
          name: {{ required "secrets.webhookSecrets[]: set secret or secrets.existingSecret" (.secret | default $.Values.secrets.existingSecret) }}
          key: {{ required "secrets.webhookSecrets[].key is required" .key }}
    {{- end }}
    {{- if .Values.redis.existingSecret }}
    - name: SIDECAR_REDIS_URL
      valueFrom:
        secretKeyRef:
          name: {{ .Values.redis.existingSecret }}
          key: {{ .Values.redis.existingSecretKey }}
    {{- else if include "sidecar.redisUrl" . }}
    - name: SIDECAR_REDIS_URL
      value: {{ include "sidecar.redisUrl" . | quote }}
    {{- end }}
    {{- with .Values.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: {{ .Values.containerPorts.admin }}
    initialDelaySeconds: {{ .Values.probes.liveness.initialDelaySeconds }}
    periodSeconds: {{ .Values.probes.liveness.periodSeconds }}
    timeoutSeconds: {{ .Values.probes.liveness.timeoutSeconds }}
    failureThreshold: {{ .Values.probes.liveness.failureThreshold }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: {{ .Values.containerPorts.admin }}
    initialDelaySeconds: {{ .Values.probes.readiness.initialDelaySeconds }}
    periodSeconds: {{ .Values.probes.readiness.periodSeconds }}
    timeoutSeconds: {{ .Values.probes.readiness.timeoutSeconds }}
    failureThreshold: {{ .Values.probes.readiness.failureThreshold }}
  {{- if gt (int .Values.preStopSleepSeconds) 0 }}
  lifecycle:
    preStop:
      exec:
        command: ["sleep", {{ .Values.preStopSleepSeconds | quote }}]
  {{- end }}
  {{- $resources := deepCopy (.Values.resources | default dict) }}
  {{- $limits := get $resources "limits" | default dict }}
  {{- if not (get $limits "memory") }}
  {{- $_ := set $limits "memory" (include "sidecar.memoryLimit" .) }}
  {{- end }}
  {{- $_ := set $resources "limits" $limits }}
  resources:
    {{- toYaml $resources | nindent 4 }}
  securityContext:
    runAsNonRoot: true
    {{- with .Values.securityContext.runAsUser }}
    runAsUser: {{ . }}
    {{- end }}
    {{- with .Values.securityContext.runAsGroup }}
    runAsGroup: {{ . }}
    {{- end }}
    readOnlyRootFilesystem: true
    allowPrivilegeEscalation: false
    privileged: false
    capabilities:
      drop:
        - ALL
    seccompProfile:
      type: RuntimeDefault
  volumeMounts:
    - name: sidecar-config
      mountPath: /etc/sidecar
      readOnly: true
    - name: sidecar-tmp
      mountPath: /tmp
    {{- with .Values.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/*
"sidecar.volumes": the volumes "sidecar.container" mounts (list items). The ConfigMap is mounted as a
directory, not with subPath, so edits reach the file and the sidecar reloads it.
*/}}
{{- define "sidecar.volumes" -}}
- name: sidecar-config
  configMap:
    name: {{ include "sidecar.configMapName" . }}
- name: sidecar-tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit | default "64Mi" | quote }}
{{- with .Values.extraVolumes }}
{{- toYaml . | nindent 0 }}
{{- end }}
{{- end }}

{{/*
"sidecar.configChecksum": a hash of the configuration, for a backend chart's pod annotation so that a
config change rolls its pods.
*/}}
{{- define "sidecar.configChecksum" -}}
{{- include "sidecar.configYaml" . | sha256sum }}
{{- end }}
