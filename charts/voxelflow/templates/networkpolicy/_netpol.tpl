{{/* Ports of each dependency, for egress rules. */}}
{{- define "voxelflow.netpol.depPorts" -}}
{{- $ := .ctx -}}
{{- if eq .dep "postgresql" }}[{{ include "voxelflow.database.port" $ }}]
{{- else if eq .dep "redis" }}[{{ include "voxelflow.redis.port" $ }}]
{{- else if eq .dep "minio" }}[{{ include "voxelflow.s3.port" $ }}]
{{- else if eq .dep "mlflow" }}{{ if $.Values.mlflow.enabled }}[5000]{{ else }}[80, 443, 5000]{{ end }}
{{- else if eq .dep "triton" }}[8000, 8001]
{{- else }}[]{{ end -}}
{{- end -}}

{{/*
Egress rules for a list of needs (postgresql, redis, minio, mlflow, triton, pacs).
Bundled dependencies: their pods only. External ones: networkPolicy.externalCidrs on their port.
*/}}
{{- define "voxelflow.netpol.egress" -}}
{{- $ := .ctx -}}
{{- $bundled := dict "postgresql" $.Values.postgresql.enabled "redis" $.Values.redis.enabled "minio" $.Values.minio.enabled "mlflow" $.Values.mlflow.enabled "triton" $.Values.triton.enabled -}}
{{- range $dep := .needs }}
{{- if has $dep (list "postgresql" "redis" "minio" "mlflow") }}
- to:
    {{- include "voxelflow.depPeer" (dict "ctx" $ "bundled" (index $bundled $dep) "component" $dep) | trim | nindent 4 }}
  ports:
    {{- range (include "voxelflow.netpol.depPorts" (dict "ctx" $ "dep" $dep) | fromYamlArray) }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
{{- else if and (eq $dep "triton") $.Values.triton.enabled }}
- to:
    {{- include "voxelflow.depPeer" (dict "ctx" $ "bundled" true "component" "triton") | trim | nindent 4 }}
  ports:
    - port: 8000
      protocol: TCP
    - port: 8001
      protocol: TCP
{{- else if and (eq $dep "pacs") $.Values.networkPolicy.pacsCidrs }}
- to:
    {{- range $.Values.networkPolicy.pacsCidrs }}
    - ipBlock:
        cidr: {{ . }}
    {{- end }}
  ports:
    {{- range $.Values.networkPolicy.pacsPorts }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Peer: Prometheus in the monitoring namespace. */}}
{{- define "voxelflow.netpol.monitoringPeer" -}}
- namespaceSelector:
    {{- toYaml .Values.networkPolicy.monitoringNamespaceSelector | nindent 4 }}
{{- end -}}

{{/* Peer: pods of this release that carry the access label for a dependency. */}}
{{- define "voxelflow.netpol.accessPeer" -}}
- podSelector:
    matchLabels:
      {{- include "voxelflow.selectorLabels" .ctx | nindent 6 }}
      voxelflow.io/access-{{ .dep }}: "true"
{{- end -}}
