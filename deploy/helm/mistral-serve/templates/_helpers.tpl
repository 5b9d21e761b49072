{{/* Names and labels. */}}

{{- define "mistral-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every object; component suffixes (-frontend, -worker, -redis) keep names under 63. */}}
{{- define "mistral-serve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 48 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "mistral-serve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of one component: (dict "ctx" $ "component" "frontend"). */}}
{{- define "mistral-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mistral-serve.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* All labels of one component's objects: (dict "ctx" $ "component" "frontend"). */}}
{{- define "mistral-serve.labels" -}}
helm.sh/chart: {{ include "mistral-serve.chart" .ctx }}
{{ include "mistral-serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: mistral-serve
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- end }}

{{- define "mistral-serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mistral-serve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* An image reference: (dict "ctx" $ "image" .Values.frontend.image). */}}
{{- define "mistral-serve.image" -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) }}
{{- end }}

{{/* Redis. */}}

{{- define "mistral-serve.redisHost" -}}
{{- printf "%s-redis" (include "mistral-serve.fullname" .) }}
{{- end }}

{{/* The Secret holding the in-chart Redis's password: the user's, or the one the chart generates. */}}
{{- define "mistral-serve.redisAuthSecret" -}}
{{- default (printf "%s-redis-auth" (include "mistral-serve.fullname" .)) .Values.redis.internal.auth.existingSecret }}
{{- end }}

{{/*
The generated password Secret: (dict "ctx" $ "existing" <the Secret as it is in the cluster, or empty>).
The password is drawn once, at install; every later render keeps the one already stored, or an upgrade
would lock frontends and workers out of a Redis that still runs with the old one. The caller passes
`lookup`'s answer in, so that tests can hand it a stored Secret (Helm's offline render looks up nothing).
*/}}
{{- define "mistral-serve.redisAuthSecretManifest" -}}
{{- $ctx := .ctx }}
{{- $key := $ctx.Values.redis.internal.auth.key }}
{{- $stored := dig "data" $key "" (default dict .existing) }}
apiVersion: v1
kind: Secret
metadata:
  name: {{ include "mistral-serve.redisAuthSecret" $ctx }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "mistral-serve.labels" (dict "ctx" $ctx "component" "redis") | nindent 4 }}
type: Opaque
data:
  {{ $key }}: {{ $stored | default (randAlphaNum 32 | b64enc) | quote }}
{{- end }}

{{/* Where the Redis password comes from, for frontends, workers and KEDA: (secretName, key), or empty. */}}
{{- define "mistral-serve.redisPasswordRef" -}}
{{- if .Values.redis.internal.enabled }}
{{- toJson (dict "name" (include "mistral-serve.redisAuthSecret" .) "key" .Values.redis.internal.auth.key) }}
{{- else if .Values.redis.external.passwordSecret.name }}
{{- toJson .Values.redis.external.passwordSecret }}
{{- end }}
{{- end }}

{{- define "mistral-serve.redisDataClaim" -}}
{{- default (printf "%s-redis-data" (include "mistral-serve.fullname" .)) .Values.redis.internal.persistence.existingClaim }}
{{- end }}

{{- define "mistral-serve.redisCAPath" -}}
/etc/mistral-serve/redis-ca/ca.crt
{{- end }}

{{- define "mistral-serve.redisClientCertDir" -}}
/etc/mistral-serve/redis-client
{{- end }}

{{/* The URL both processes connect to (MISTRAL_SERVE_REDIS_URL). */}}
{{- define "mistral-serve.redisUrl" -}}
{{- if .Values.redis.internal.enabled }}
{{- printf "redis://%s:%d/0" (include "mistral-serve.redisHost" .) (int .Values.redis.internal.port) }}
{{- else }}
{{- .Values.redis.external.url }}
{{- end }}
{{- end }}

{{/* The rest of the one Redis settings block (common/.../settings.py): mode, TLS files, sentinels, WAIT. */}}
{{- define "mistral-serve.redisModeEnv" -}}
{{- $ext := .Values.redis.external }}
{{- if not .Values.redis.internal.enabled }}
- name: MISTRAL_SERVE_REDIS_MODE
  value: {{ $ext.mode | quote }}
{{- if $ext.tlsCASecret.name }}
- name: MISTRAL_SERVE_REDIS_TLS_CA_FILE
  value: {{ include "mistral-serve.redisCAPath" . | quote }}
{{- end }}
{{- if $ext.tlsClientCertSecret.name }}
- name: MISTRAL_SERVE_REDIS_TLS_CERT_FILE
  value: {{ printf "%s/tls.crt" (include "mistral-serve.redisClientCertDir" .) | quote }}
- name: MISTRAL_SERVE_REDIS_TLS_KEY_FILE
  value: {{ printf "%s/tls.key" (include "mistral-serve.redisClientCertDir" .) | quote }}
{{- end }}
{{- if eq $ext.mode "sentinel" }}
- name: MISTRAL_SERVE_REDIS_SENTINELS
  value: {{ required "redis.external.sentinel.addresses: sentinel mode needs the sentinels" (join "," $ext.sentinel.addresses) | quote }}
- name: MISTRAL_SERVE_REDIS_SENTINEL_MASTER
  value: {{ $ext.sentinel.masterName | quote }}
{{- if $ext.sentinel.passwordSecret.name }}
- name: MISTRAL_SERVE_REDIS_SENTINEL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $ext.sentinel.passwordSecret.name }}
      key: {{ $ext.sentinel.passwordSecret.key }}
{{- end }}
{{- end }}
{{- end }}
- name: MISTRAL_SERVE_REDIS_WAIT_REPLICAS
  value: {{ int .Values.redis.waitReplicas | quote }}
- name: MISTRAL_SERVE_REDIS_WAIT_TIMEOUT_MS
  value: {{ int .Values.redis.waitTimeoutMs | quote }}
{{- end }}

{{/* Environment both processes share: Redis, pool, logs, event retention, pod identity. */}}
{{- define "mistral-serve.commonEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: MISTRAL_SERVE_REDIS_URL
  value: {{ include "mistral-serve.redisUrl" . | quote }}
{{- with include "mistral-serve.redisPasswordRef" . }}
{{- $ref := fromJson . }}
- name: MISTRAL_SERVE_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $ref.name }}
      key: {{ $ref.key }}
{{- end }}
{{- include "mistral-serve.redisModeEnv" . }}
- name: MISTRAL_SERVE_POOL
  value: {{ .Values.pool | quote }}
- name: MISTRAL_SERVE_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
- name: MISTRAL_SERVE_EVENT_TTL_S
  value: {{ int .Values.eventTTLSeconds | quote }}
- name: MISTRAL_SERVE_DETACH_GRACE_S
  value: {{ int .Values.detachGraceSeconds | quote }}
{{- end }}

{{/* OpenTelemetry environment of one component: (dict "ctx" $ "component" "frontend"). */}}
{{- define "mistral-serve.otelEnv" -}}
{{- $otel := .ctx.Values.otel }}
{{- if $otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $otel.endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ $otel.protocol | quote }}
{{- end }}
- name: OTEL_SERVICE_NAME
  value: {{ printf "mistral-serve-%s" .component | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ $otel.sampler | quote }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $otel.samplerArg | quote }}
{{- $attrs := list "k8s.pod.name=$(POD_NAME)" "k8s.namespace.name=$(POD_NAMESPACE)" }}
{{- range $k, $v := $otel.resourceAttributes }}
{{- $attrs = append $attrs (printf "%s=%s" $k $v) }}
{{- end }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ join "," $attrs | quote }}
{{- end }}

{{/* Volumes and mounts for the external Redis CA bundle. */}}
{{- define "mistral-serve.redisCAVolume" -}}
{{- if and (not .Values.redis.internal.enabled) .Values.redis.external.tlsCASecret.name }}
- name: redis-ca
  secret:
    secretName: {{ .Values.redis.external.tlsCASecret.name }}
    items:
      - key: {{ .Values.redis.external.tlsCASecret.key }}
        path: ca.crt
{{- end }}
{{- if and (not .Values.redis.internal.enabled) .Values.redis.external.tlsClientCertSecret.name }}
- name: redis-client-cert
  secret:
    secretName: {{ .Values.redis.external.tlsClientCertSecret.name }}
{{- end }}
{{- end }}

{{- define "mistral-serve.redisCAVolumeMount" -}}
{{- if and (not .Values.redis.internal.enabled) .Values.redis.external.tlsCASecret.name }}
- name: redis-ca
  mountPath: {{ include "mistral-serve.redisCAPath" . | dir }}
  readOnly: true
{{- end }}
{{- if and (not .Values.redis.internal.enabled) .Values.redis.external.tlsClientCertSecret.name }}
- name: redis-client-cert
  mountPath: {{ include "mistral-serve.redisClientCertDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/* A gRPC probe: (dict "port" 50051 "service" "" "timing" .Values.frontend.probes.liveness). */}}
{{- define "mistral-serve.grpcProbe" -}}
grpc:
  port: {{ .port }}
  service: {{ .service | quote }}
{{ toYaml .timing }}
{{- end }}

{{/*
An HTTP probe on the frontend's HTTP port: (dict "path" "/health/live" "tls" true "timing" ...). The HTTP
port speaks the gRPC port's TLS; the kubelet's HTTPS probe does not verify the certificate.
*/}}
{{- define "mistral-serve.httpProbe" -}}
httpGet:
  path: {{ .path }}
  port: http
  {{- if .tls }}
  scheme: HTTPS
  {{- end }}
{{ toYaml .timing }}
{{- end }}

{{/* Frontend. */}}

{{- define "mistral-serve.frontendTerminationGrace" -}}
{{- add .Values.frontend.preStopSleepSeconds .Values.frontend.drainGraceSeconds .Values.frontend.terminationGraceMarginSeconds }}
{{- end }}

{{/* The kubelet's gRPC probe speaks no TLS: with TLS on, probes use the plain-text health port. */}}
{{- define "mistral-serve.frontendProbePort" -}}
{{- if .Values.frontend.tls.enabled }}
{{- .Values.frontend.healthPort }}
{{- else }}
{{- .Values.frontend.grpcPort }}
{{- end }}
{{- end }}

{{- define "mistral-serve.apiKeysSecret" -}}
{{- default (printf "%s-api-keys" (include "mistral-serve.fullname" .)) .Values.frontend.auth.existingSecret }}
{{- end }}

{{/* Worker. */}}

{{- define "mistral-serve.workerTerminationGrace" -}}
{{- add .Values.worker.drainGraceSeconds .Values.worker.terminationGraceMarginSeconds }}
{{- end }}

{{/* Worker resources with the GPU count taken from the tensor parallel size, so they never disagree. */}}
{{- define "mistral-serve.workerResources" -}}
{{- $gpus := dict .Values.worker.gpuResourceName (int .Values.worker.engine.tensorParallelSize) }}
{{- $res := deepCopy .Values.worker.resources }}
{{- $_ := set $res "limits" (merge (deepCopy $gpus) (default dict $res.limits)) }}
{{- $_ = set $res "requests" (merge (deepCopy $gpus) (default dict $res.requests)) }}
{{- toYaml $res }}
{{- end }}

{{- define "mistral-serve.modelCacheClaim" -}}
{{- default (printf "%s-model-cache" (include "mistral-serve.fullname" .)) .Values.worker.modelCache.pvc.existingClaim }}
{{- end }}

{{/*
The pool's request streams, one per priority band, highest first, as the Python code names them
(common/mistral_serve/common/keys.py `request_streams`; the chart tests check the two agree): a JSON
list of {"band", "stream"}. The normal band keeps the plain name.
*/}}
{{- define "mistral-serve.requestStreams" -}}
{{- $streams := list }}
{{- range $band := list "high" "normal" "low" }}
{{- $name := printf "mistral_serve:{%s}:requests" $.Values.pool }}
{{- if ne $band "normal" }}
{{- $name = printf "%s:%s" $name $band }}
{{- end }}
{{- $streams = append $streams (dict "band" $band "stream" $name) }}
{{- end }}
{{- toJson $streams }}
{{- end }}

{{/* Each band's list of waiting requests (common/keys.py waiting_count), highest band first. */}}
{{- define "mistral-serve.waitingCounts" -}}
{{- $lists := list }}
{{- range $band := list "high" "normal" "low" }}
{{- $lists = append $lists (dict "band" $band "list" (printf "mistral_serve:{%s}:waiting:%s" $.Values.pool $band)) }}
{{- end }}
{{- toJson $lists }}
{{- end }}

{{/* KEDA: where its redis-streams scaler finds the stream. */}}

{{- define "mistral-serve.kedaAddress" -}}
{{- if .Values.redis.internal.enabled }}
{{- printf "%s.%s.svc:%d" (include "mistral-serve.redisHost" .) .Release.Namespace (int .Values.redis.internal.port) }}
{{- else }}
{{- $u := urlParse .Values.redis.external.url }}
{{- if contains ":" $u.host }}
{{- $u.host }}
{{- else }}
{{- printf "%s:6379" $u.host }}
{{- end }}
{{- end }}
{{- end }}

{{- define "mistral-serve.kedaDatabase" -}}
{{- if .Values.redis.internal.enabled }}
{{- "0" }}
{{- else }}
{{- default "0" (trimPrefix "/" (urlParse .Values.redis.external.url).path) }}
{{- end }}
{{- end }}

{{/* "true" when the external Redis speaks TLS. */}}
{{- define "mistral-serve.redisTLS" -}}
{{- if and (not .Values.redis.internal.enabled) (eq (urlParse .Values.redis.external.url).scheme "rediss") }}
{{- "true" }}
{{- end }}
{{- end }}

{{/* KEDA needs a TriggerAuthentication for a password (the in-chart Redis always has one) or a private CA. */}}
{{- define "mistral-serve.kedaNeedsAuth" -}}
{{- if or (include "mistral-serve.redisPasswordRef" .) (and (not .Values.redis.internal.enabled) .Values.redis.external.tlsCASecret.name) }}
{{- "true" }}
{{- end }}
{{- end }}

{{/* A Deployment strategy; rollingUpdate only with RollingUpdate (the API refuses it with Recreate). */}}
{{- define "mistral-serve.strategy" -}}
type: {{ .type }}
{{- if and (eq .type "RollingUpdate") .rollingUpdate }}
rollingUpdate:
  {{- toYaml .rollingUpdate | nindent 2 }}
{{- end }}
{{- end }}
