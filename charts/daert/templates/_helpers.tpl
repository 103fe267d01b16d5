{{/*
Names, labels and small shared pieces. The per-service objects are in _service.tpl.
*/}}

{{/* The services, in port order; the gateway last. */}}
{{- define "daert.serviceNames" -}}
{{- list "generation" "embedding" "retrieval" "rerank" "sandbox" "context" "lora" "gateway" | toJson -}}
{{- end -}}

{{- define "daert.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>-<chart>, or the release name alone when it already contains the chart name.
Cut to 40 characters: a service name and a suffix are appended to it. */}}
{{- define "daert.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "daert.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object; `component` names the part (a service, postgresql, ...). */}}
{{- define "daert.labels" -}}
{{- $root := .root -}}
helm.sh/chart: {{ include "daert.chart" $root }}
{{ include "daert.selectorLabels" . }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: daert
{{- with $root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "daert.selectorLabels" -}}
app.kubernetes.io/name: {{ include "daert.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* metadata.annotations (indented for metadata) from commonAnnotations plus `extra` (a
dict), or nothing. Include it right after the labels with `{{- include ... }}`. */}}
{{- define "daert.annotations" -}}
{{- $all := merge (deepCopy (default (dict) .extra)) (deepCopy (default (dict) .root.Values.commonAnnotations)) -}}
{{- with $all }}
  annotations:
    {{- toYaml . | nindent 4 }}
{{- end }}
{{- end -}}

{{/* Peers for "pods of this release" in NetworkPolicies. */}}
{{- define "daert.releasePeer" -}}
- podSelector:
    matchLabels:
      app.kubernetes.io/name: {{ include "daert.name" . }}
      app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* An image reference from a block {repository, tag, digest} with defaults. */}}
{{- define "daert.imageRef" -}}
{{- if .digest -}}
{{- printf "%s@%s" .repository .digest -}}
{{- else -}}
{{- printf "%s:%s" .repository (toString .tag) -}}
{{- end -}}
{{- end -}}

{{/* The image of a service: its own image block over the shared one, tag defaulting to
appVersion. Takes (dict "root" . "svc" $svc). */}}
{{- define "daert.serviceImage" -}}
{{- $g := .root.Values.image -}}
{{- $own := default (dict) .svc.image -}}
{{- $ref := dict "repository" (default $g.repository $own.repository) "tag" (default (default .root.Chart.AppVersion $g.tag) $own.tag) "digest" (default $g.digest $own.digest) -}}
{{- include "daert.imageRef" $ref -}}
{{- end -}}

{{/* Render a setting value as an environment string: lists and maps as JSON, whole numbers
without an exponent (YAML numbers arrive as float64: 1000000 would print as 1e+06). */}}
{{- define "daert.envValue" -}}
{{- $v := . -}}
{{- if or (kindIs "map" $v) (kindIs "slice" $v) -}}
{{- toJson $v -}}
{{- else if and (kindIs "float64" $v) (eq $v (floor $v)) -}}
{{- printf "%d" (int64 $v) -}}
{{- else -}}
{{- toString $v -}}
{{- end -}}
{{- end -}}

{{/* A password for a generated Secret: the one already in the cluster (so upgrades keep it),
else a new random one. `helm template` has no cluster: it always makes a new one.
Takes (dict "root" . "name" <secret name> "key" <key>); returns it base64-encoded. */}}
{{- define "daert.generatedPassword" -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .name -}}
{{- $current := dig "data" .key "" (default (dict) $existing) -}}
{{- if $current -}}
{{- $current -}}
{{- else -}}
{{- randAlphaNum 32 | b64enc -}}
{{- end -}}
{{- end -}}

{{/* PostgreSQL as the services see it: host, port, the password's Secret and key. */}}
{{- define "daert.postgresql.host" -}}
{{- if .Values.postgresql.enabled -}}
{{- printf "%s-postgresql" (include "daert.fullname" .) -}}
{{- else -}}
{{- required "postgresql.external.host is required when postgresql.enabled is false and a service uses PostgreSQL" .Values.postgresql.external.host -}}
{{- end -}}
{{- end -}}

{{- define "daert.postgresql.port" -}}
{{- if .Values.postgresql.enabled -}}{{ .Values.postgresql.port }}{{- else -}}{{ .Values.postgresql.external.port }}{{- end -}}
{{- end -}}

{{- define "daert.postgresql.secretName" -}}
{{- if .Values.postgresql.auth.existingSecret -}}
{{- .Values.postgresql.auth.existingSecret -}}
{{- else if .Values.postgresql.enabled -}}
{{- printf "%s-postgresql" (include "daert.fullname" .) -}}
{{- else -}}
{{- fail "postgresql.auth.existingSecret is required with an external PostgreSQL (the Secret holding its password)" -}}
{{- end -}}
{{- end -}}

{{/* The DSN without a password (libpq takes it from PGPASSWORD). */}}
{{- define "daert.postgresql.dsn" -}}
{{- $pg := .Values.postgresql -}}
{{- $dsn := printf "postgresql://%s@%s:%s/%s" $pg.auth.username (include "daert.postgresql.host" .) (include "daert.postgresql.port" .) $pg.auth.database -}}
{{- if not $pg.enabled -}}
{{- $dsn = printf "%s?sslmode=%s" $dsn $pg.external.sslmode -}}
{{- end -}}
{{- $dsn -}}
{{- end -}}

{{/* Redis as the services see it; empty host: no Redis configured. */}}
{{- define "daert.redis.host" -}}
{{- if .Values.redis.enabled -}}
{{- printf "%s-redis" (include "daert.fullname" .) -}}
{{- else -}}
{{- .Values.redis.external.host -}}
{{- end -}}
{{- end -}}

{{- define "daert.redis.port" -}}
{{- if .Values.redis.enabled -}}{{ .Values.redis.port }}{{- else -}}{{ .Values.redis.external.port }}{{- end -}}
{{- end -}}

{{- define "daert.redis.url" -}}
{{- $scheme := ternary "rediss" "redis" (and (not .Values.redis.enabled) .Values.redis.external.tls) -}}
{{- printf "%s://%s:%s/%d" $scheme (include "daert.redis.host" .) (include "daert.redis.port" .) (int .Values.redis.database) -}}
{{- end -}}

{{- define "daert.redis.secretName" -}}
{{- if .Values.redis.auth.existingSecret -}}
{{- .Values.redis.auth.existingSecret -}}
{{- else if .Values.redis.enabled -}}
{{- printf "%s-redis" (include "daert.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* Whether services get a Redis password: auth on, and a Secret to read it from. */}}
{{- define "daert.redis.auth" -}}
{{- if and .Values.redis.auth.enabled (include "daert.redis.secretName" .) -}}true{{- end -}}
{{- end -}}

{{/* The dependencies of a service: its dependsOn plus, for retrieval, the store its backend
needs, and for generation and context the llm workload when it is on (generation serves it,
context counts tokens with it). Takes (dict "root" $ "name" $name "svc" $svc); returns a
JSON list. */}}
{{- define "daert.deps" -}}
{{- $deps := list -}}
{{- range (default (list) .svc.dependsOn) -}}
{{- $deps = append $deps . -}}
{{- end -}}
{{- if eq .name "retrieval" -}}
{{- $backend := dig "backend" "pgvector" (default (dict) .svc.config) -}}
{{- if eq $backend "pgvector" -}}
{{- $deps = append $deps "postgresql" -}}
{{- else -}}
{{- $deps = append $deps "weaviate" -}}
{{- end -}}
{{- end -}}
{{- if and (has .name (include "daert.llm.clients" .root | fromJsonArray)) .root.Values.llm.enabled -}}
{{- $deps = append $deps "llm" -}}
{{- end -}}
{{- $deps | uniq | toJson -}}
{{- end -}}

{{/* The services that call the llm workload. */}}
{{- define "daert.llm.clients" -}}
{{- list "generation" "context" | toJson -}}
{{- end -}}

{{/* The llm workload's base URL as the pods of the release call it. */}}
{{- define "daert.llm.url" -}}
{{- printf "http://%s-llm:%d" (include "daert.fullname" .) (int .Values.llm.port) -}}
{{- end -}}

{{/* Settings a service gets from the llm workload when the user leaves them unset: generation's
`models` (the llm as its one model) and context's `tokenizers` (the llm's tokenizer). Without
the llm there is nothing to default to, and the chart says which values to set. A setting
given in config or secretEnv is the user's and is used as it is. Takes
(dict "root" $ "name" $name "config" $config "secretEnv" $secretEnv); returns a JSON map of
setting -> value. */}}
{{- define "daert.llm.defaults" -}}
{{- $l := .root.Values.llm -}}
{{- $out := dict -}}
{{- $key := dict "generation" "models" "context" "tokenizers" | dig .name "" -}}
{{- if and $key (not (hasKey .config $key)) (not (hasKey .secretEnv $key)) -}}
{{- if not $l.enabled -}}
{{- if eq .name "generation" -}}
{{- fail "generation.config.models is not set and llm.enabled is false: list your LLM servers in generation.config.models (e.g. [{name: llama, backend: openai, url: \"http://vllm:8000\"}]) or set llm.enabled=true to serve the chart's llama.cpp server" -}}
{{- else -}}
{{- fail "context.config.tokenizers is not set and llm.enabled is false: list the tokenizers of your models in context.config.tokenizers (e.g. [{name: llama, kind: llama_cpp, url: \"http://llama-cpp:8080\"}] or kind huggingface with a path) or set llm.enabled=true" -}}
{{- end -}}
{{- end -}}
{{- $url := include "daert.llm.url" .root -}}
{{- if eq .name "generation" -}}
{{- /* One shared KV cache: a request may fill the whole context; else each slot has its share. */ -}}
{{- $window := ternary (int $l.contextSize) (div (int $l.contextSize) (int $l.parallel)) (eq (toString $l.kvUnified) "true") -}}
{{- $_ := set $out "models" (list (dict "name" $l.alias "backend" "openai" "url" $url "upstream_model" $l.alias "context_length" $window)) -}}
{{- else -}}
{{- $_ := set $out "tokenizers" (list (dict "name" $l.alias "kind" "llama_cpp" "url" $url)) -}}
{{- end -}}
{{- end -}}
{{- $out | toJson -}}
{{- end -}}

{{/* Whether any enabled service uses a data store (the argument's `store`). */}}
{{- define "daert.storeUsed" -}}
{{- $root := .root -}}
{{- $store := .store -}}
{{- range $name := include "daert.serviceNames" $root | fromJsonArray -}}
{{- $svc := index $root.Values $name -}}
{{- if and $svc.enabled (has $store (include "daert.deps" (dict "root" $root "name" $name "svc" $svc) | fromJsonArray)) -}}true{{- end -}}
{{- end -}}
{{- end -}}

{{/* The restricted security contexts for the data stores and hook pods, with a uid. */}}
{{- define "daert.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
runAsGroup: {{ .uid }}
fsGroup: {{ .uid }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "daert.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
runAsGroup: {{ .uid }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "daert.modelCache.claimName" -}}
{{- default (printf "%s-model-cache" (include "daert.fullname" .)) .Values.modelCache.pvc.existingClaim -}}
{{- end -}}
