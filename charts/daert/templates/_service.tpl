{{/*
Every object of one service, for every service: ConfigMap, ServiceAccount, Deployment,
Service, NetworkPolicy, and optionally HorizontalPodAutoscaler, PodDisruptionBudget and
ServiceMonitor. Called once per enabled service by services.yaml with
(dict "root" $ "name" <service> "svc" <its values>).
*/}}
{{- define "daert.service" -}}
{{- $root := .root -}}
{{- $V := $root.Values -}}
{{- $name := .name -}}
{{- $svc := .svc -}}
{{- $fullname := printf "%s-%s" (include "daert.fullname" $root) $name -}}
{{- $ctx := dict "root" $root "component" $name -}}
{{- $prefix := printf "DAERT_%s_" (upper $name) -}}
{{- $http := eq $name "gateway" -}}
{{- $portName := ternary "http" "grpc" $http -}}
{{- $metrics := ge (int $svc.metricsPort) 0 -}}
{{- $config := default (dict) $svc.config -}}
{{- $secretEnv := default (dict) $svc.secretEnv -}}
{{- $deps := include "daert.deps" (dict "root" $root "name" $name "svc" $svc) | fromJsonArray -}}
{{- $serviceNames := include "daert.serviceNames" $root | fromJsonArray -}}
{{- $drain := int $V.gracePeriodSeconds -}}
{{- range $key := list "port" "metrics_port" "grace_period_s" -}}
{{- if hasKey $config $key -}}
{{- fail (printf "%s.config.%s is set by the chart: use %s.port, %s.metricsPort or gracePeriodSeconds" $name $key $name $name) -}}
{{- end -}}
{{- end -}}
{{- if and (eq $name "sandbox") $deps -}}
{{- fail "sandbox.dependsOn must be empty: the sandbox reaches nothing" -}}
{{- end -}}
{{- $saName := ternary (default $fullname $svc.serviceAccount.name) (default "default" $svc.serviceAccount.name) $svc.serviceAccount.create -}}

{{- /* The environment: DAERT_<SERVICE>_* from config, the wiring to other services and data
stores; secrets stay out (they are secretKeyRefs in the Deployment). */ -}}
{{- $env := dict -}}
{{- $_ := set $env (print $prefix "PORT") (toString $svc.port) -}}
{{- $_ := set $env (print $prefix "METRICS_PORT") (toString $svc.metricsPort) -}}
{{- $_ := set $env (print $prefix "GRACE_PERIOD_S") (toString $drain) -}}
{{- $_ := set $env (print $prefix "LOG_LEVEL") $V.logLevel -}}
{{- range $key, $value := $config -}}
{{- if hasKey $secretEnv $key -}}
{{- fail (printf "%s: %s is set both in config and in secretEnv" $name $key) -}}
{{- end -}}
{{- $_ := set $env (printf "%s%s" $prefix (upper $key)) (include "daert.envValue" $value) -}}
{{- end -}}
{{- range $key, $value := include "daert.llm.defaults" (dict "root" $root "name" $name "config" $config "secretEnv" $secretEnv) | fromJson -}}
{{- $_ := set $env (printf "%s%s" $prefix (upper $key)) (include "daert.envValue" $value) -}}
{{- end -}}
{{- range $dep := $deps -}}
{{- if has $dep $serviceNames -}}
{{- $depSvc := index $V $dep -}}
{{- if $depSvc.enabled -}}
{{- $_ := set $env (printf "DAERT_%s_TARGET" (upper $dep)) (printf "%s-%s:%d" (include "daert.fullname" $root) $dep (int $depSvc.port)) -}}
{{- end -}}
{{- else if and (eq $dep "postgresql") (not (hasKey $secretEnv "dsn")) -}}
{{- $_ := set $env (print $prefix "DSN") (include "daert.postgresql.dsn" $root) -}}
{{- else if and (eq $dep "redis") (include "daert.redis.host" $root) (not (hasKey $secretEnv "redis_url")) -}}
{{- $_ := set $env (print $prefix "REDIS_URL") (include "daert.redis.url" $root) -}}
{{- end -}}
{{- end -}}
{{- $configData := toYaml $env }}
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ $fullname }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "daert.labels" $ctx | nindent 4 }}
  {{- include "daert.annotations" (dict "root" $root) }}
data:
  {{- $configData | nindent 2 }}
{{- if $svc.serviceAccount.create }}
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ $saName }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "daert.labels" $ctx | nindent 4 }}
  {{- include "daert.annotations" (dict "root" $root "extra" $svc.serviceAccount.annotations) }}
automountServiceAccountToken: {{ $svc.serviceAccount.automountToken }}
{{- end }}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $fullname }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "daert.labels" $ctx | nindent 4 }}
  {{- include "daert.annotations" (dict "root" $root) }}
spec:
  {{- if not $svc.autoscaling.enabled }}
  replicas: {{ $svc.replicaCount }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "daert.selectorLabels" $ctx | nindent 6 }}
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 1
      maxUnavailable: 0
  template:
    metadata:
      labels:
        {{- include "daert.labels" $ctx | nindent 8 }}
        {{- with $svc.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        checksum/config: {{ $configData | sha256sum }}
        {{- with $svc.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ $saName }}
      automountServiceAccountToken: {{ $svc.serviceAccount.automountToken }}
      # No <SERVICE>_PORT=tcp://... variables from Services: they would collide with the
      # DAERT_<SERVICE>_PORT settings of a release named "daert".
      enableServiceLinks: false
      {{- if and (eq $name "sandbox") $svc.runtimeClassName }}
      runtimeClassName: {{ $svc.runtimeClassName }}
      {{- end }}
      {{- with $V.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      {{- with $V.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $V.podSecurityContext | nindent 8 }}
      # Longer than the server's own drain (DAERT_{{ upper $name }}_GRACE_PERIOD_S).
      terminationGracePeriodSeconds: {{ add $drain $V.terminationGraceMarginSeconds }}
      {{- if $V.topologySpread.enabled }}
      topologySpreadConstraints:
        {{- range $key := $V.topologySpread.topologyKeys }}
        - maxSkew: {{ $V.topologySpread.maxSkew }}
          topologyKey: {{ $key }}
          whenUnsatisfiable: {{ $V.topologySpread.whenUnsatisfiable }}
          labelSelector:
            matchLabels:
              {{- include "daert.selectorLabels" $ctx | nindent 14 }}
        {{- end }}
      {{- end }}
      {{- with (default $V.nodeSelector $svc.nodeSelector) }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with (default $V.tolerations $svc.tolerations) }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with (default $V.affinity $svc.affinity) }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ $name }}
          image: {{ include "daert.serviceImage" (dict "root" $root "svc" $svc) | quote }}
          imagePullPolicy: {{ default $V.image.pullPolicy (dig "pullPolicy" "" (default (dict) $svc.image)) }}
          args: ["serve", {{ $name | quote }}]
          ports:
            - name: {{ $portName }}
              containerPort: {{ $svc.port }}
              protocol: TCP
            {{- if $metrics }}
            - name: metrics
              containerPort: {{ $svc.metricsPort }}
              protocol: TCP
            {{- end }}
          envFrom:
            - configMapRef:
                name: {{ $fullname }}
            {{- range $svc.envFromSecrets }}
            - secretRef:
                name: {{ . }}
            {{- end }}
          {{- with (include "daert.service.env" (dict "root" $root "name" $name "svc" $svc "prefix" $prefix "secretEnv" $secretEnv "deps" $deps) | trim) }}
          env:
            {{- . | nindent 12 }}
          {{- end }}
          {{- $probes := mergeOverwrite (deepCopy $V.probes) (deepCopy (default (dict) $svc.probes)) }}
          {{- range $kind := list "startup" "liveness" "readiness" }}
          {{ $kind }}Probe:
            {{- if $http }}
            httpGet:
              path: {{ $svc.healthPath }}
              port: http
            {{- else }}
            grpc:
              port: {{ $svc.port }}
              {{- if eq $kind "liveness" }}
              # Answered SERVING while the process runs, whatever its backends.
              service: liveness
              {{- end }}
            {{- end }}
            {{- toYaml (index $probes $kind) | nindent 12 }}
          {{- end }}
          resources:
            {{- toYaml $svc.resources | nindent 12 }}
          securityContext:
            {{- toYaml $V.containerSecurityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            - name: cache
              mountPath: {{ $V.volumes.cacheMountPath }}
            {{- if has $name $V.modelCache.services }}
            - name: model-cache
              mountPath: {{ $V.modelCache.mountPath }}
              {{- if and (eq $V.modelCache.type "pvc") $V.modelCache.pvc.readOnly }}
              readOnly: true
              {{- end }}
            {{- end }}
      volumes:
        - name: tmp
          emptyDir:
            sizeLimit: {{ default $V.volumes.tmpSizeLimit $svc.tmpSizeLimit }}
        - name: cache
          emptyDir:
            sizeLimit: {{ $V.volumes.cacheSizeLimit }}
        {{- if has $name $V.modelCache.services }}
        - name: model-cache
          {{- if eq $V.modelCache.type "pvc" }}
          persistentVolumeClaim:
            claimName: {{ include "daert.modelCache.claimName" $root }}
          {{- else }}
          emptyDir:
            sizeLimit: {{ $V.modelCache.emptyDirSizeLimit }}
          {{- end }}
        {{- end }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ $fullname }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "daert.labels" $ctx | nindent 4 }}
  {{- include "daert.annotations" (dict "root" $root "extra" $svc.service.annotations) }}
spec:
  type: {{ $svc.service.type }}
  selector:
    {{- include "daert.selectorLabels" $ctx | nindent 4 }}
  ports:
    - name: {{ $portName }}
      port: {{ $svc.port }}
      targetPort: {{ $portName }}
      protocol: TCP
      appProtocol: {{ ternary "http" "grpc" $http }}
    {{- if $metrics }}
    - name: metrics
      port: {{ $svc.metricsPort }}
      targetPort: metrics
      protocol: TCP
      appProtocol: http
    {{- end }}
{{- if $svc.autoscaling.enabled }}
{{- if not (dig "requests" "cpu" "" (default (dict) $svc.resources)) }}
{{- fail (printf "%s.autoscaling needs %s.resources.requests.cpu (utilization is a share of it)" $name $name) }}
{{- end }}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ $fullname }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "daert.labels" $ctx | nindent 4 }}
  {{- include "daert.annotations" (dict "root" $root) }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ $fullname }}
  minReplicas: {{ $svc.autoscaling.minReplicas }}
  maxReplicas: {{ $svc.autoscaling.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $svc.autoscaling.targetCPUUtilizationPercentage }}
    {{- if gt (int $svc.autoscaling.targetMemoryUtilizationPercentage) 0 }}
    - type: Resource
      resource:
        name: memory
        target:
          type: Utilization
          averageUtilization: {{ $svc.autoscaling.targetMemoryUtilizationPercentage }}
    {{- end }}
{{- end }}
{{- if $svc.podDisruptionBudget.enabled }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ $fullname }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "daert.labels" $ctx | nindent 4 }}
  {{- include "daert.annotations" (dict "root" $root) }}
spec:
  {{- if hasKey $svc.podDisruptionBudget "minAvailable" }}
  minAvailable: {{ $svc.podDisruptionBudget.minAvailable }}
  {{- else }}
  maxUnavailable: {{ $svc.podDisruptionBudget.maxUnavailable }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "daert.selectorLabels" $ctx | nindent 6 }}
{{- end }}
{{- if $V.networkPolicy.enabled }}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ $fullname }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "daert.labels" $ctx | nindent 4 }}
  {{- include "daert.annotations" (dict "root" $root) }}
spec:
  podSelector:
    matchLabels:
      {{- include "daert.selectorLabels" $ctx | nindent 6 }}
  policyTypes:
    - Ingress
    - Egress
  ingress:
    # Its {{ $portName }} port, from the pods of this release and the extra peers{{ if eq $name "sandbox" }} named for the sandbox{{ end }}.
    - from:
        {{- include "daert.releasePeer" $root | nindent 8 }}
        {{- if ne $name "sandbox" }}
        {{- with $V.networkPolicy.extraIngressFrom }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- else }}
        {{- with (dig "networkPolicy" "clientsFrom" (list) $svc) }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- end }}
      ports:
        - port: {{ $svc.port }}
          protocol: TCP
    {{- if and $metrics (or (ne $name "sandbox") (dig "networkPolicy" "allowMetricsScrape" false $svc)) }}
    # Metrics, from the monitoring namespace.
    - from:
        {{- toYaml $V.networkPolicy.metricsFrom | nindent 8 }}
      ports:
        - port: {{ $svc.metricsPort }}
          protocol: TCP
    {{- end }}
    {{- if ne $name "sandbox" }}
    {{- with (dig "networkPolicy" "extraIngress" (list) $svc) }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- end }}
  {{- if eq $name "sandbox" }}
  # No egress at all: code run here reaches no network, not even DNS.
  egress: []
  {{- else }}
  egress:
    - to:
        {{- toYaml $V.networkPolicy.dns | nindent 8 }}
      ports:
        - port: 53
          protocol: UDP
        - port: 53
          protocol: TCP
    {{- range $dep := $deps }}
    {{- if has $dep $serviceNames }}
    {{- $depSvc := index $V $dep }}
    {{- if $depSvc.enabled }}
    # The {{ $dep }} service.
    - to:
        - podSelector:
            matchLabels:
              {{- include "daert.selectorLabels" (dict "root" $root "component" $dep) | nindent 14 }}
      ports:
        - port: {{ $depSvc.port }}
          protocol: TCP
    {{- end }}
    {{- else if eq $dep "postgresql" }}
    # PostgreSQL.
    - to:
        {{- if $V.postgresql.enabled }}
        - podSelector:
            matchLabels:
              {{- include "daert.selectorLabels" (dict "root" $root "component" "postgresql") | nindent 14 }}
        {{- else }}
        {{- range $V.postgresql.external.cidrs }}
        - ipBlock:
            cidr: {{ . }}
        {{- end }}
        {{- end }}
      ports:
        - port: {{ include "daert.postgresql.port" $root }}
          protocol: TCP
    {{- else if and (eq $dep "redis") (include "daert.redis.host" $root) }}
    # Redis.
    - to:
        {{- if $V.redis.enabled }}
        - podSelector:
            matchLabels:
              {{- include "daert.selectorLabels" (dict "root" $root "component" "redis") | nindent 14 }}
        {{- else }}
        {{- range $V.redis.external.cidrs }}
        - ipBlock:
            cidr: {{ . }}
        {{- end }}
        {{- end }}
      ports:
        - port: {{ include "daert.redis.port" $root }}
          protocol: TCP
    {{- else if eq $dep "llm" }}
    # The llm workload (llama-server, HTTP).
    - to:
        - podSelector:
            matchLabels:
              {{- include "daert.selectorLabels" (dict "root" $root "component" "llm") | nindent 14 }}
      ports:
        - port: {{ $V.llm.port }}
          protocol: TCP
    {{- else if eq $dep "weaviate" }}
    # Weaviate (REST and gRPC).
    - ports:
        {{- range $V.retrieval.weaviate.ports }}
        - port: {{ . }}
          protocol: TCP
        {{- end }}
      {{- with $V.retrieval.weaviate.to }}
      to:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    {{- end }}
    {{- end }}
    {{- with (dig "networkPolicy" "extraEgress" (list) $svc) }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
{{- end }}
{{- if and $metrics $V.metrics.serviceMonitor.enabled }}
---
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata:
  name: {{ $fullname }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "daert.labels" $ctx | nindent 4 }}
    {{- with $V.metrics.serviceMonitor.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- include "daert.annotations" (dict "root" $root) }}
spec:
  selector:
    matchLabels:
      {{- include "daert.selectorLabels" $ctx | nindent 6 }}
  namespaceSelector:
    matchNames:
      - {{ $root.Release.Namespace }}
  endpoints:
    - port: metrics
      path: /metrics
      interval: {{ $V.metrics.serviceMonitor.interval }}
      scrapeTimeout: {{ $V.metrics.serviceMonitor.scrapeTimeout }}
{{- end }}
{{- end -}}

{{/* The container's env entries that come from Secrets (and extraEnv): never values in a
ConfigMap. Takes the dict built in "daert.service". */}}
{{- define "daert.service.env" -}}
{{- range $key, $ref := $.secretEnv }}
- name: {{ printf "%s%s" $.prefix (upper $key) }}
  valueFrom:
    secretKeyRef:
      name: {{ required (printf "%s.secretEnv.%s.name is required" $.name $key) $ref.name }}
      key: {{ required (printf "%s.secretEnv.%s.key is required" $.name $key) $ref.key }}
{{- end }}
{{- if and (has "postgresql" $.deps) (not (hasKey $.secretEnv "dsn")) }}
# libpq reads the password from PGPASSWORD: the DSN in the ConfigMap has none.
- name: PGPASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "daert.postgresql.secretName" $.root }}
      key: {{ $.root.Values.postgresql.auth.passwordKey }}
{{- end }}
{{- if and (has "redis" $.deps) (include "daert.redis.auth" $.root) (not (hasKey $.secretEnv "redis_password")) }}
- name: {{ print $.prefix "REDIS_PASSWORD" }}
  valueFrom:
    secretKeyRef:
      name: {{ include "daert.redis.secretName" $.root }}
      key: {{ $.root.Values.redis.auth.passwordKey }}
{{- end }}
{{- with $.svc.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}
