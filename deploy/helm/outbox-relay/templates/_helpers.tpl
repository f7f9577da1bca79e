{{- define "outbox-relay.name" -}}
{{- printf "%s-outbox-relay" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "outbox-relay.labels" -}}
app.kubernetes.io/name: outbox-relay
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "outbox-relay.selector" -}}
app.kubernetes.io/name: outbox-relay
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- /* shutdown_timeout in seconds, for the grace period */ -}}
{{- define "outbox-relay.graceSeconds" -}}
{{- $t := .Values.relay.shutdownTimeout | toString -}}
{{- if hasSuffix "s" $t -}}{{- add (trimSuffix "s" $t | int) 10 -}}{{- else -}}60{{- end -}}
{{- end -}}

{{- /* The relay container. In a sidecar it is a native sidecar (restartPolicy
Always) with liveness only: a sidecar's readiness counts for the application's
pod, and /readyz fails while Kafka is away. Standalone, its readiness is its own. */ -}}
{{- define "outbox-relay.container" -}}
name: outbox-relay
image: "{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}"
imagePullPolicy: {{ .Values.image.pullPolicy }}
{{- if eq .Values.mode "sidecar" }}
restartPolicy: Always
{{- end }}
args: ["--config", "/etc/outbox-relay/outbox-relay.toml", "run"]
env:
  - name: OUTBOX_RELAY__RELAY__ID
    valueFrom:
      fieldRef:
        fieldPath: metadata.name
ports:
  - name: metrics
    containerPort: {{ .Values.metrics.port }}
livenessProbe:
  httpGet: { path: /healthz, port: metrics }
  periodSeconds: 10
  failureThreshold: 6
{{- if ne .Values.mode "sidecar" }}
readinessProbe:
  httpGet: { path: /readyz, port: metrics }
  periodSeconds: 10
{{- end }}
resources: {{- toYaml .Values.resources | nindent 2 }}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  runAsNonRoot: true
  runAsUser: 10001
  capabilities:
    drop: ["ALL"]
volumeMounts:
  - name: outbox-relay-config
    mountPath: /etc/outbox-relay
    readOnly: true
  - name: outbox-relay-secrets
    mountPath: /run/secrets/outbox-relay
    readOnly: true
{{- end -}}

{{- define "outbox-relay.volumes" -}}
- name: outbox-relay-config
  configMap:
    name: {{ include "outbox-relay.name" . }}
- name: outbox-relay-secrets
  secret:
    secretName: {{ .Values.secret.name }}
{{- end -}}
