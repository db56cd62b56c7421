{{/*
Named templates for your own chart. Add this chart as a dependency (name it
`vellum-sidecar`, no alias) and, in your workload's pod template:

  metadata:
    labels:
      {{- include "vellum-sidecar.podLabels" . | nindent 8 }}
    annotations:
      {{- include "vellum-sidecar.podAnnotations" . | nindent 8 }}
  spec:
    initContainers:
      {{- include "vellum-sidecar.initContainer" . | nindent 8 }}
      # ... your own init containers after it
    volumes:
      {{- include "vellum-sidecar.volumes" . | nindent 8 }}
      # ... your own volumes

Each takes the root context (`.`) of your chart or of this one and reads this
chart's values (`.Values.vellum-sidecar` from your chart). The container is the
kustomize Component's (deploy/kubernetes/components/sidecar), field for field:
tests/test_helm.py renders both and compares them.
*/}}

{{/* This chart's values, from this chart or from a parent that depends on it. */}}
{{- define "vellum-sidecar.values" -}}
{{- if hasKey .Values "vellum-sidecar" -}}
{{- index .Values "vellum-sidecar" | toJson -}}
{{- else -}}
{{- .Values | toJson -}}
{{- end -}}
{{- end -}}

{{/* Resource names: <release>-vellum-sidecar[-suffix], 63 characters at most. */}}
{{- define "vellum-sidecar.fullname" -}}
{{- printf "%s-vellum-sidecar" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "vellum-sidecar.labels" -}}
app.kubernetes.io/name: vellum-sidecar
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
{{- end -}}

{{/* The pods of this release that run the sidecar (what every option selects). */}}
{{- define "vellum-sidecar.selector" -}}
vellum-sidecar/injected: "true"
vellum-sidecar/release: {{ .Release.Name | quote }}
{{- end -}}

{{- define "vellum-sidecar.podLabels" -}}
{{ include "vellum-sidecar.selector" . }}
{{- end -}}

{{/* A change of the settings rolls the pods. */}}
{{- define "vellum-sidecar.podAnnotations" -}}
{{- $v := include "vellum-sidecar.values" . | fromJson -}}
checksum/vellum-sidecar-config: {{ $v.config | toJson | sha256sum | quote }}
{{- end -}}

{{- define "vellum-sidecar.initContainer" -}}
{{- $v := include "vellum-sidecar.values" . | fromJson -}}
{{- if not $v.config.VELLUM_TENANT_ID -}}
{{- fail "vellum-sidecar: set config.VELLUM_TENANT_ID (the tenant this sidecar serves)" -}}
{{- end -}}
- name: vellum-sidecar
  image: {{ printf "%s:%s" $v.image.repository $v.image.tag | quote }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  # A native sidecar: started (and past its startup probe) before the app's
  # containers, stopped after them, restarted if it exits.
  restartPolicy: Always
  args: ["serve"]
  envFrom:
    - configMapRef:
        name: {{ include "vellum-sidecar.fullname" . }}
  env:
    # Secrets come from files (re-read when Kubernetes rotates them).
    - name: VELLUM_API_KEY_FILE
      value: /var/run/secrets/vellum/api-key
    - name: VELLUM_WEBHOOK_SECRETS_FILE
      value: /var/run/secrets/vellum/webhook-secrets
    - name: SIDECAR_REDIS_URL_FILE
      value: /var/run/secrets/vellum/redis-url
    # The local API stays on the pod's loopback: never in a Service.
    - name: SIDECAR_LISTEN
      value: 127.0.0.1:8700
    {{- if $v.snapshot.enabled }}
    # Warm start: the in-process layer saved on the vellum-sidecar-state emptyDir
    # and loaded at start (a restarted container answers what it had cached).
    - name: SIDECAR_SNAPSHOT_FILE
      value: /var/lib/vellum-sidecar/snapshot.json
    {{- end }}
  ports:
    - name: vellum-webhooks
      containerPort: 8701
      protocol: TCP
    - name: vellum-ops
      containerPort: 9700
      protocol: TCP
  startupProbe:
    httpGet:
      path: /readyz
      port: vellum-ops
    periodSeconds: 1
    failureThreshold: 30
  livenessProbe:
    httpGet:
      path: /healthz
      port: vellum-ops
    periodSeconds: 10
    timeoutSeconds: 2
    failureThreshold: 3
  readinessProbe:
    httpGet:
      path: /readyz
      port: vellum-ops
    periodSeconds: 5
    timeoutSeconds: 2
    failureThreshold: 2
  resources:
    {{- toYaml $v.resources | nindent 4 }}
  securityContext:
    runAsNonRoot: true
    runAsUser: 10001
    runAsGroup: 10001
    readOnlyRootFilesystem: true
    allowPrivilegeEscalation: false
    privileged: false
    capabilities:
      drop: ["ALL"]
    seccompProfile:
      type: RuntimeDefault
  terminationMessagePolicy: FallbackToLogsOnError
  volumeMounts:
    - name: vellum-sidecar-secrets
      mountPath: /var/run/secrets/vellum
      readOnly: true
    - name: vellum-sidecar-tmp
      mountPath: /tmp
    {{- if $v.snapshot.enabled }}
    - name: vellum-sidecar-state
      mountPath: /var/lib/vellum-sidecar
    {{- end }}
{{- end -}}

{{- define "vellum-sidecar.volumes" -}}
{{- $v := include "vellum-sidecar.values" . | fromJson -}}
- name: vellum-sidecar-secrets
  secret:
    secretName: {{ $v.secretName | quote }}
    # Readable by uid 10001 without a pod-level fsGroup; only the sidecar mounts it.
    defaultMode: 0444
    items:
      - key: api-key
        path: api-key
      - key: webhook-secrets
        path: webhook-secrets
      - key: redis-url
        path: redis-url
# SIDECAR_WORKERS > 1: the supervisor's unix sockets live in /tmp.
- name: vellum-sidecar-tmp
  emptyDir:
    sizeLimit: 16Mi
{{- if $v.snapshot.enabled }}
# SIDECAR_SNAPSHOT_FILE: lives as long as the pod (docs/operations.md).
- name: vellum-sidecar-state
  emptyDir:
    sizeLimit: {{ $v.snapshot.sizeLimit }}
{{- end }}
{{- end -}}
