{{/* Names, labels and the wiring shared by several templates. */}}

{{- define "dispatcher.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "dispatcher.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* A resource name: the full name, a dash, a suffix; kept within 63 characters. */}}
{{- define "dispatcher.componentName" -}}
{{- $root := index . 0 -}}
{{- $suffix := index . 1 -}}
{{- printf "%s-%s" (include "dispatcher.fullname" $root | trunc (int (sub 62 (len $suffix)))) $suffix | trimSuffix "-" }}
{{- end }}

{{/* A model's name as a DNS label: lower case, dots, colons and underscores as dashes. */}}
{{- define "dispatcher.modelSlug" -}}
{{- . | lower | replace "." "-" | replace "_" "-" | replace ":" "-" | trunc 40 | trimSuffix "-" }}
{{- end }}

{{- define "dispatcher.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "dispatcher.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: llm-dispatcher
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component (sender, model, database, ...). Call with (list $ "component"). */}}
{{- define "dispatcher.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "dispatcher.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "dispatcher.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dispatcher.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* An image reference; an empty tag means the chart's appVersion. Call with (list $ .Values.x.image). */}}
{{- define "dispatcher.image" -}}
{{- $root := index . 0 }}
{{- $image := index . 1 }}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) }}
{{- end }}

{{/* The API groups the internal broker needs: the cluster operator's RabbitmqCluster, and the
     messaging-topology-operator's User (with Permission and TopicPermission) for the role users. */}}
{{- define "dispatcher.rabbitmqOperatorApis" -}}
rabbitmq.com/v1beta1/RabbitmqCluster: the RabbitMQ cluster operator
rabbitmq.com/v1beta1/User: the RabbitMQ messaging-topology-operator
{{- end }}

{{/* "true" when the chart creates the broker (a RabbitmqCluster), "" when the dispatcher uses the
     external broker of rabbitmq.urlSecret. rabbitmq.internal null (the default) decides from
     urlSecret alone, so an external broker is one value away; dispatcher.validate checks that the
     operators' APIs exist when the chart is to create it. */}}
{{- define "dispatcher.rabbitmqInternal" -}}
{{- $internal := .Values.rabbitmq.internal }}
{{- if kindIs "invalid" $internal }}
{{- if not .Values.rabbitmq.urlSecret }}true{{ end }}
{{- else if $internal }}true{{ end }}
{{- end }}

{{/* Checks of the values as a whole, made once (templates/validate.yaml) before anything is
     installed: each failure says what to change. */}}
{{- define "dispatcher.validate" -}}
{{- $rmq := .Values.rabbitmq }}
{{- if and (kindIs "invalid" $rmq.internal) (include "dispatcher.rabbitmqInternal" .) }}
{{- /* Chosen by default, not asked for: the operators must be there to act on it. */}}
{{- $missing := list }}
{{- $flags := list }}
{{- range $api, $who := include "dispatcher.rabbitmqOperatorApis" . | fromYaml }}
{{- if not ($.Capabilities.APIVersions.Has $api) }}
{{- $missing = append $missing (printf "%s (%s)" $api $who) }}
{{- $flags = append $flags (printf "--api-versions %s" $api) }}
{{- end }}
{{- end }}
{{- if $missing }}
{{- fail (printf "rabbitmq: no external broker is given (rabbitmq.urlSecret is empty), so the chart would create one, but this cluster lacks the API of %s. Install what is missing, or set rabbitmq.urlSecret to the Secret holding your broker's URLs. Rendering offline (helm template)? Pass %s, or set rabbitmq.internal=true." (join " and " $missing) (join " " $flags)) }}
{{- end }}
{{- end }}
{{- if include "dispatcher.rabbitmqInternal" . }}
{{- if regexMatch "(?m)^\\s*consumer_timeout\\s*=" (default "" $rmq.cluster.additionalConfig) }}
{{- fail "rabbitmq.cluster.additionalConfig sets consumer_timeout: set rabbitmq.consumerTimeoutSeconds instead" }}
{{- end }}
{{- $deadline := get .Values.sender.env "SENDER_DEADLINE_SECONDS" | default 600 | float64 }}
{{- if le (float64 $rmq.consumerTimeoutSeconds) $deadline }}
{{- fail (printf "rabbitmq.consumerTimeoutSeconds (%v) must exceed the longest generation, SENDER_DEADLINE_SECONDS (%v): the broker would take a request back from the consumer serving it (quorum queues enforce it)" $rmq.consumerTimeoutSeconds $deadline) }}
{{- end }}
{{- end }}
{{- $served := include "dispatcher.servedNames" .Values.models | fromJsonArray }}
{{- range $i, $name := $served }}
{{- if has $name (slice $served 0 $i) }}
{{- fail (printf "models: the name %s is served twice (a name, an alias or a LoRA adapter): each name is one queue, served by one model" $name) }}
{{- end }}
{{- end }}
{{- end }}

{{- define "dispatcher.rabbitmqName" -}}
{{- include "dispatcher.componentName" (list . "rabbitmq") }}
{{- end }}

{{/* Host of the internal broker's Service, as the cluster operator names it. */}}
{{- define "dispatcher.rabbitmqHost" -}}
{{- printf "%s.%s.svc" (include "dispatcher.rabbitmqName" .) .Release.Namespace }}
{{- end }}

{{/* The Secret of a role's broker user (sender, consumer, autoscaler) on the internal broker. */}}
{{- define "dispatcher.rabbitmqUserSecret" -}}
{{- include "dispatcher.componentName" (list (index . 0) (printf "rabbitmq-user-%s" (index . 1))) }}
{{- end }}

{{/* Key of a role's URL in rabbitmq.urlSecret (external broker): its own key, or the sender's. */}}
{{- define "dispatcher.rabbitmqUrlKey" -}}
{{- $root := index . 0 }}
{{- $role := index . 1 }}
{{- $own := get (dict "consumer" $root.Values.rabbitmq.consumerUrlSecretKey "autoscaler" $root.Values.rabbitmq.kedaUrlSecretKey) $role }}
{{- default $root.Values.rabbitmq.urlSecretKey $own }}
{{- end }}

{{- define "dispatcher.rabbitmqCaDir" -}}/etc/llm-dispatcher/rabbitmq-ca{{- end }}

{{/* RABBITMQ_URL (and the broker CA) of a role, sender or consumer. Call with (list $ "sender").
     With the internal broker it is built from the role's own user Secret, so the password never
     appears in a manifest; with an external one it is the role's key of rabbitmq.urlSecret. */}}
{{- define "dispatcher.rabbitmqEnv" -}}
{{- $root := index . 0 }}
{{- $role := index . 1 }}
{{- $tls := $root.Values.rabbitmq.tls }}
- name: {{ $role | upper }}_QUEUE_TYPE
  value: {{ $root.Values.rabbitmq.queueType | quote }}
{{- if include "dispatcher.rabbitmqInternal" $root }}
- name: RABBITMQ_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ include "dispatcher.rabbitmqUserSecret" (list $root $role) }}
      key: username
- name: RABBITMQ_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "dispatcher.rabbitmqUserSecret" (list $root $role) }}
      key: password
- name: RABBITMQ_URL
  value: {{ printf "%s://$(RABBITMQ_USERNAME):$(RABBITMQ_PASSWORD)@%s:%d/" (ternary "amqps" "amqp" $tls.enabled) (include "dispatcher.rabbitmqHost" $root) (ternary 5671 5672 $tls.enabled) | quote }}
{{- else }}
- name: RABBITMQ_URL
  valueFrom:
    secretKeyRef:
      name: {{ required "rabbitmq.urlSecret is required when rabbitmq.internal is false: create a Secret with the broker URL and name it here" $root.Values.rabbitmq.urlSecret }}
      key: {{ include "dispatcher.rabbitmqUrlKey" (list $root $role) }}
{{- end }}
{{- if and $tls.enabled $tls.caSecret }}
- name: {{ upper $role }}_RABBITMQ_CA_FILE
  value: {{ printf "%s/%s" (include "dispatcher.rabbitmqCaDir" $root) $tls.caSecretKey | quote }}
{{- end }}
{{- end }}

{{/* The broker CA's volume and mount, when rabbitmq.tls names a CA Secret. */}}
{{- define "dispatcher.rabbitmqCaVolume" -}}
{{- if and .Values.rabbitmq.tls.enabled .Values.rabbitmq.tls.caSecret }}
- name: rabbitmq-ca
  secret:
    secretName: {{ .Values.rabbitmq.tls.caSecret }}
    items:
      - {key: {{ .Values.rabbitmq.tls.caSecretKey }}, path: {{ .Values.rabbitmq.tls.caSecretKey }}}
{{- end }}
{{- end }}

{{- define "dispatcher.rabbitmqCaMount" -}}
{{- if and .Values.rabbitmq.tls.enabled .Values.rabbitmq.tls.caSecret }}
- {name: rabbitmq-ca, mountPath: {{ include "dispatcher.rabbitmqCaDir" . }}, readOnly: true}
{{- end }}
{{- end }}

{{/* vLLM's API key: the given Secret, or the one the chart generates. Returns "name key". */}}
{{- define "dispatcher.vllmApiKeySecret" -}}
{{- default (include "dispatcher.componentName" (list . "vllm-api-key")) .Values.vllm.apiKey.existingSecret }}
{{- end }}

{{- define "dispatcher.databaseSecretName" -}}
{{- if .Values.database.internal }}
{{- include "dispatcher.componentName" (list . "database") }}
{{- else }}
{{- required "database.urlSecret is required when database.internal is false: create a Secret with the database URL and name it here" .Values.database.urlSecret }}
{{- end }}
{{- end }}

{{- define "dispatcher.databaseEnv" -}}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "dispatcher.databaseSecretName" . }}
      key: {{ if .Values.database.internal }}url{{ else }}{{ .Values.database.urlSecretKey }}{{ end }}
{{- end }}

{{/* The Secret of the token pepper: the operator's (tokenPepper.secretName), else the generated one, else none. */}}
{{- define "dispatcher.tokenPepperSecret" -}}
{{- if .Values.tokenPepper.secretName }}
{{- .Values.tokenPepper.secretName }}
{{- else if .Values.tokenPepper.generate }}
{{- include "dispatcher.componentName" (list . "token-pepper") }}
{{- end }}
{{- end }}

{{/* The token pepper, when a Secret holds one: the senders and the db-init Job hash alike. */}}
{{- define "dispatcher.tokenPepperEnv" -}}
{{- with include "dispatcher.tokenPepperSecret" . }}
- name: SENDER_TOKEN_PEPPER
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.tokenPepper.secretKey }}
{{- end }}
{{- end }}

{{/* A copy of the map (index 0) with the keys of the map (index 1) set over it. Unlike merge, a zero
     or false override is kept. Returns YAML: use with fromYaml. */}}
{{- define "dispatcher.overlay" -}}
{{- $out := deepCopy (default dict (index . 0)) }}
{{- range $key, $value := (default dict (index . 1)) }}
{{- $_ := set $out $key $value }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/* Settings given as a map, as container environment variables (values quoted: env values are strings). */}}
{{- define "dispatcher.envMap" -}}
{{- range $name, $value := . }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/* Scrape annotations for Prometheus without the operator. Call with (list $ port). Only one path
     per pod: a model pod's annotations scrape the consumer; vLLM's metrics need the ServiceMonitor. */}}
{{- define "dispatcher.scrapeAnnotations" -}}
{{- $root := index . 0 -}}
{{- if $root.Values.metrics.enabled }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ index . 1 | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}

{{/* The models' names, comma-separated: the sender's SENDER_MODELS. */}}
{{- define "dispatcher.modelNames" -}}
{{- join "," (include "dispatcher.servedNames" .Values.models | fromJsonArray) }}
{{- end }}

{{/* Every name the models serve (each name, then its aliases and LoRA adapters), as a JSON array. */}}
{{- define "dispatcher.servedNames" -}}
{{- $names := list }}
{{- range . }}
{{- $names = append $names .name }}
{{- range .aliases }}{{ $names = append $names . }}{{ end }}
{{- range .loraModules }}{{ $names = append $names .name }}{{ end }}
{{- end }}
{{- toJson $names }}
{{- end }}
