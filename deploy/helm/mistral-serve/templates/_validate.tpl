{{/*
Rules that span several values (values.schema.json checks each value alone). Each failure names the
values to change. Included once, from deployment-frontend.yaml, so every render runs it.
*/}}
{{- define "mistral-serve.validate" -}}
{{- $v := .Values }}

{{- if and $v.redis.internal.enabled $v.redis.external.url }}
{{- fail "redis: set either redis.internal.enabled=true (trials) or redis.external.url (production), not both" }}
{{- end }}
{{- if and (not $v.redis.internal.enabled) (not $v.redis.external.url) }}
{{- fail "redis: set redis.external.url, or redis.internal.enabled=true for a trial" }}
{{- end }}
{{- if $v.redis.external.url }}
{{- $u := urlParse $v.redis.external.url }}
{{- if contains ":" $u.userinfo }}
{{- fail "redis.external.url must not carry a password: put it in a Secret named by redis.external.passwordSecret" }}
{{- end }}
{{- if and $v.redis.external.tlsCASecret.name (ne $u.scheme "rediss") }}
{{- fail "redis.external.tlsCASecret needs a rediss:// URL" }}
{{- end }}
{{- end }}

{{- $gpuName := $v.worker.gpuResourceName }}
{{- $tp := int $v.worker.engine.tensorParallelSize }}
{{- range $section := list "limits" "requests" }}
{{- $set := index (default dict $v.worker.resources) $section }}
{{- if and $set (hasKey $set $gpuName) (ne (int (index $set $gpuName)) $tp) }}
{{- fail (printf "worker.resources.%s[%s] is %v but worker.engine.tensorParallelSize is %d: leave the GPU count out of worker.resources, the chart takes it from the tensor parallel size" $section $gpuName (index $set $gpuName) $tp) }}
{{- end }}
{{- end }}

{{- if and $v.keda.enabled (eq $v.keda.trigger "pendingEntriesCount") }}
{{- if ge (int $v.keda.target) (int $v.worker.maxInflight) }}
{{- fail (printf "keda.target (%d) must be below worker.maxInflight (%d) with trigger pendingEntriesCount: a worker never holds more pending entries than it runs" (int $v.keda.target) (int $v.worker.maxInflight)) }}
{{- end }}
{{- end }}
{{- if and $v.keda.enabled (gt (int $v.keda.minReplicaCount) (int $v.keda.maxReplicaCount)) }}
{{- fail "keda.minReplicaCount must not exceed keda.maxReplicaCount" }}
{{- end }}
{{- if and $v.frontend.autoscaling.enabled (gt (int $v.frontend.autoscaling.minReplicas) (int $v.frontend.autoscaling.maxReplicas)) }}
{{- fail "frontend.autoscaling.minReplicas must not exceed frontend.autoscaling.maxReplicas" }}
{{- end }}
{{- if and $v.frontend.autoscaling.enabled (not (dig "requests" "cpu" "" (default dict $v.frontend.resources))) }}
{{- fail "frontend.autoscaling needs frontend.resources.requests.cpu: the HPA targets a share of it" }}
{{- end }}

{{- if and $v.frontend.service.headless (ne $v.frontend.service.type "ClusterIP") }}
{{- fail "frontend.service.headless needs frontend.service.type=ClusterIP" }}
{{- end }}
{{- if and $v.frontend.tls.enabled (not $v.frontend.tls.existingSecret) }}
{{- fail "frontend.tls.enabled needs frontend.tls.existingSecret (a kubernetes.io/tls Secret)" }}
{{- end }}
{{- if and $v.frontend.tls.clientCA.existingSecret (not $v.frontend.tls.enabled) }}
{{- fail "frontend.tls.clientCA (mTLS) needs frontend.tls.enabled" }}
{{- end }}
{{- $fePorts := list (int $v.frontend.grpcPort) (int $v.frontend.httpPort) (int $v.frontend.metricsPort) }}
{{- if $v.frontend.tls.enabled }}
{{- $fePorts = append $fePorts (int $v.frontend.healthPort) }}
{{- end }}
{{- if ne (len $fePorts) (len (uniq $fePorts)) }}
{{- fail (printf "frontend ports must differ: grpcPort, httpPort, metricsPort%s are %v" (ternary " and healthPort (TLS)" "" $v.frontend.tls.enabled) $fePorts) }}
{{- end }}
{{- if and (eq $v.frontend.probes.protocol "http") $v.frontend.tls.clientCA.existingSecret }}
{{- fail "frontend.probes.protocol=http cannot pass mTLS (frontend.tls.clientCA): the kubelet has no client certificate; use protocol grpc, which probes the plain-text frontend.healthPort" }}
{{- end }}
{{- if eq (int $v.worker.healthPort) (int $v.worker.metricsPort) }}
{{- fail "worker.healthPort and worker.metricsPort must differ" }}
{{- end }}
{{- end }}
