{{/* Pod + container securityContext of a dependency running as `uid`. */}}
{{- define "voxelflow.dep.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
runAsGroup: {{ .uid }}
fsGroup: {{ .uid }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}
{{- define "voxelflow.dep.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
runAsGroup: {{ .uid }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
{{/* Dependency pod template labels: selector labels + part-of. */}}
{{- define "voxelflow.dep.podLabels" -}}
{{ include "voxelflow.componentSelectorLabels" (dict "ctx" .ctx "component" .component) }}
app.kubernetes.io/part-of: voxelflow
{{- range .access }}
voxelflow.io/access-{{ . }}: "true"
{{- end }}
{{- end -}}
