{{/*
The chart renders exactly what `kvmesh k8s manifests` prints for the same values (tests/test_helm.py), so
names and labels are kvmesh's fixed ones, not Helm's release-derived ones.
*/}}
{{- define "kvmesh.namespace" -}}
{{ .Values.namespace | default .Release.Namespace }}
{{- end }}

{{- define "kvmesh.labels" -}}
app.kubernetes.io/name: kvmesh
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: kvmesh
{{- end }}
