{{/*
Names, labels and shared fragments.
*/}}

{{- define "pushgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pushgate.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "<fullname>-<suffix>", at most 63 characters. Call with (list $ "suffix"). */}}
{{- define "pushgate.componentName" -}}
{{- $root := index . 0 -}}
{{- $suffix := index . 1 -}}
{{- $full := include "pushgate.fullname" $root | trunc (int (sub 62 (len $suffix))) | trimSuffix "-" -}}
{{- printf "%s-%s" $full $suffix -}}
{{- end -}}

{{- define "pushgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels common to every resource. */}}
{{- define "pushgate.labels" -}}
helm.sh/chart: {{ include "pushgate.chart" . }}
app.kubernetes.io/name: {{ include "pushgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pushgate
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component. Call with (list $ "component"). */}}
{{- define "pushgate.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "pushgate.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* All labels of one component. Call with (list $ "component"). */}}
{{- define "pushgate.componentLabels" -}}
{{ include "pushgate.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/*
The six services: values key, component/binary name, TOML section, whether it needs the TLS
certificate, whether it talks to the internet (443).
*/}}
{{- define "pushgate.components" -}}
- {key: ingressApi, name: ingress-api, section: ingress, tls: true, internet: false}
- {key: router, name: router, section: router, tls: false, internet: false}
- {key: xmppEdge, name: xmpp-edge, section: edge, tls: true, internet: false}
- {key: nativePushBridge, name: native-push-bridge, section: bridge, tls: false, internet: true}
- {key: smsFallback, name: sms-fallback, section: sms, tls: false, internet: true}
- {key: receiptWebhook, name: receipt-webhook, section: webhook, tls: false, internet: true}
{{- end -}}

{{- define "pushgate.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "pushgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "pushgate.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "pushgate.secretName" -}}
{{- default (include "pushgate.fullname" .) .Values.secrets.existingSecret -}}
{{- end -}}

{{- define "pushgate.tlsSecretName" -}}
{{- if eq .Values.tls.source "certManager" -}}
{{- include "pushgate.componentName" (list . "tls") -}}
{{- else -}}
{{- default (include "pushgate.componentName" (list . "tls")) .Values.tls.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "pushgate.natsUrl" -}}
{{- if .Values.nats.internal.enabled -}}
{{- printf "nats://%s:4222" (include "pushgate.componentName" (list . "nats")) -}}
{{- else -}}
{{- required "nats.external.url is required when nats.internal.enabled is false" .Values.nats.external.url -}}
{{- end -}}
{{- end -}}

{{- define "pushgate.redisUrl" -}}
{{- if .Values.redis.internal.enabled -}}
{{- printf "redis://%s:6379" (include "pushgate.componentName" (list . "redis")) -}}
{{- else -}}
{{- required "redis.external.url is required when redis.internal.enabled is false" .Values.redis.external.url -}}
{{- end -}}
{{- end -}}

{{/* Topology spread constraints of one component. Call with (list $ "component" $svc). */}}
{{- define "pushgate.topologySpread" -}}
{{- $root := index . 0 -}}
{{- $name := index . 1 -}}
{{- $svc := index . 2 -}}
{{- if $svc.topologySpreadConstraints -}}
{{- toYaml $svc.topologySpreadConstraints -}}
{{- else if $root.Values.topologySpread.enabled -}}
{{- range $key := $root.Values.topologySpread.topologyKeys }}
- maxSkew: {{ $root.Values.topologySpread.maxSkew }}
  topologyKey: {{ $key }}
  whenUnsatisfiable: {{ $root.Values.topologySpread.whenUnsatisfiable }}
  labelSelector:
    matchLabels:
      {{- include "pushgate.selectorLabels" (list $root $name) | nindent 6 }}
  matchLabelKeys:
    - pod-template-hash
{{- end }}
{{- end -}}
{{- end -}}
