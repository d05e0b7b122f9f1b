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

{{- define "dispatcher.rabbitmqName" -}}
{{- include "dispatcher.componentName" (list . "rabbitmq") }}
{{- end }}

{{/* Host of the internal broker's Service, as the cluster operator names it. */}}
{{- define "dispatcher.rabbitmqHost" -}}
{{- printf "%s.%s.svc" (include "dispatcher.rabbitmqName" .) .Release.Namespace }}
{{- end }}

{{/* RABBITMQ_URL for the sender and the consumers. With the internal broker it is built from the
     operator's default-user Secret, so the password never appears in a manifest. */}}
{{- define "dispatcher.rabbitmqEnv" -}}
{{- if .Values.rabbitmq.internal }}
- name: RABBITMQ_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ include "dispatcher.rabbitmqName" . }}-default-user
      key: username
- name: RABBITMQ_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "dispatcher.rabbitmqName" . }}-default-user
      key: password
- name: RABBITMQ_URL
  value: {{ printf "amqp://$(RABBITMQ_USERNAME):$(RABBITMQ_PASSWORD)@%s:5672/" (include "dispatcher.rabbitmqHost" .) | quote }}
{{- else }}
- name: RABBITMQ_URL
  valueFrom:
    secretKeyRef:
      name: {{ required "rabbitmq.urlSecret is required when rabbitmq.internal is false: create a Secret with the broker URL and name it here" .Values.rabbitmq.urlSecret }}
      key: {{ .Values.rabbitmq.urlSecretKey }}
{{- end }}
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

{{/* The token pepper, when a Secret holds one: the senders and the db-init Job hash alike. */}}
{{- define "dispatcher.tokenPepperEnv" -}}
{{- with .Values.tokenPepper.secretName }}
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

{{/* Scrape annotations for Prometheus without the operator. Call with (list $ port). */}}
{{- define "dispatcher.scrapeAnnotations" -}}
{{- $root := index . 0 -}}
{{- if $root.Values.metrics.enabled }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ index . 1 | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}
