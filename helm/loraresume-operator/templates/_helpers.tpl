{{/* Chart name, or nameOverride. */}}
{{- define "loraresume-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's resources: fullnameOverride, or "<release>-<chart name>"
(just the release name when it already contains the chart name). 63 characters at most.
*/}}
{{- define "loraresume-operator.fullname" -}}
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

{{/* "<chart>-<version>" for the helm.sh/chart label. */}}
{{- define "loraresume-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the operator pod (never change them on upgrade: selectors are immutable). */}}
{{- define "loraresume-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loraresume-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Standard labels of every object of the release (except the CRD, rendered as generated). */}}
{{- define "loraresume-operator.labels" -}}
helm.sh/chart: {{ include "loraresume-operator.chart" . }}
{{ include "loraresume-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: loraresume
{{- end }}

{{/* Name of the operator's ServiceAccount. */}}
{{- define "loraresume-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "loraresume-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image reference: repository:tag, the tag defaulting to the chart's appVersion. */}}
{{- define "loraresume-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Namespaces watched in namespaced mode: watch.namespaces, or the release namespace. */}}
{{- define "loraresume-operator.watchedNamespaces" -}}
{{- if .Values.watch.namespaces }}
{{- toJson .Values.watch.namespaces }}
{{- else }}
{{- toJson (list .Release.Namespace) }}
{{- end }}
{{- end }}

{{/* Cross-field checks JSON Schema cannot express with a clear message. */}}
{{- define "loraresume-operator.validate" -}}
{{- if and .Values.watch.clusterWide .Values.watch.namespaces }}
{{- fail "watch.namespaces must be empty when watch.clusterWide is true (cluster-wide mode watches every namespace)" }}
{{- end }}
{{- if eq (int .Values.metrics.port) (int .Values.liveness.port) }}
{{- fail (printf "metrics.port and liveness.port must differ (both are %d)" (int .Values.metrics.port)) }}
{{- end }}
{{- end }}

{{/*
The operator's API rights: exactly operator/loraresume_operator/rbac.py (NAMESPACED_RULES,
CLUSTER_RULES), one resource per rule. tests/helm/test_chart.py compares them with
policy_rules(); change both together.
*/}}
{{- define "loraresume-operator.namespacedRules" -}}
# kopf watches LoraResumes and patches their finalizer and diff-base annotations; reconciles
# read them from the watch, and list one by name after a conflicting status write.
- apiGroups: ["loraresume.dev"]
  resources: ["loraresumes"]
  verbs: ["list", "watch", "patch"]
# The status is replaced with a resourceVersion precondition (optimistic concurrency),
# so two reconciles cannot both count an attempt's end.
- apiGroups: ["loraresume.dev"]
  resources: ["loraresumes/status"]
  verbs: ["update"]
# Trainer pods: one created per attempt, watched for their end (one the watch has not
# delivered yet is listed by name), removed with their LoraResume; one that never started
# (no spot capacity, an image that cannot be pulled) deleted; their accounting finalizer
# removed (patch) once the status counts their end.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch", "create", "delete", "deletecollection", "patch"]
# Relaunching, Preempted, Succeeded... events on the LoraResume (kopf posts its own too).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# The S3 credentials Secret named in spec.storage.credentialsSecret, to read progress and
# checkpoints from S3 (kept in memory for a minute, never copied, logged or written anywhere).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end }}

{{- /*
Cluster-wide mode only: kopf's runtime scanning of CRDs. (It would watch namespaces only for
namespace patterns, which the operator does not use; in namespaced mode scanning is off.)
*/}}
{{- define "loraresume-operator.clusterRules" -}}
# kopf notices the LoraResume CRD being installed or removed while it runs.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- end }}
