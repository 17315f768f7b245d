{{/* vim: set filetype=mustache: */}}

{{/* Chart name. */}}
{{- define "voxelflow.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Fully qualified app name (truncated so that "-<component>" suffixes still fit in 63 chars). */}}
{{- define "voxelflow.fullname" -}}
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

{{/* Chart label value. */}}
{{- define "voxelflow.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels shared by every resource of the release. */}}
{{- define "voxelflow.selectorLabels" -}}
app.kubernetes.io/name: {{ include "voxelflow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Common labels. */}}
{{- define "voxelflow.labels" -}}
helm.sh/chart: {{ include "voxelflow.chart" . }}
{{ include "voxelflow.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: voxelflow
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component. Usage: include "voxelflow.componentSelectorLabels" (dict "ctx" $ "component" "ingest-api") */}}
{{- define "voxelflow.componentSelectorLabels" -}}
{{ include "voxelflow.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Labels of one component. */}}
{{- define "voxelflow.componentLabels" -}}
{{ include "voxelflow.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Common annotations block (metadata.annotations), empty when none. */}}
{{- define "voxelflow.annotations" -}}
{{- $a := merge (deepCopy (.extra | default dict)) (.ctx.Values.commonAnnotations | default dict) -}}
{{- with $a }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Resource name of a component: <fullname>-<component>. */}}
{{- define "voxelflow.componentName" -}}
{{- printf "%s-%s" (include "voxelflow.fullname" .ctx) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* ServiceAccount name. */}}
{{- define "voxelflow.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "voxelflow.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Image of a voxelflow service. Usage: include "voxelflow.image" (dict "ctx" $ "imageName" "ingest" "gpu" false) */}}
{{- define "voxelflow.image" -}}
{{- $img := .ctx.Values.image -}}
{{- $registry := default $img.registry .ctx.Values.global.imageRegistry -}}
{{- $tag := default .ctx.Chart.AppVersion $img.tag -}}
{{- if .gpu }}{{ $tag = printf "%s%s" $tag $img.gpuTagSuffix }}{{ end -}}
{{- if $registry -}}
{{- printf "%s/%s/%s:%s" $registry $img.repositoryPrefix .imageName $tag -}}
{{- else -}}
{{- printf "%s/%s:%s" $img.repositoryPrefix .imageName $tag -}}
{{- end -}}
{{- end -}}

{{/* Image of a dependency: (dict "ctx" $ "image" .Values.postgresql.image) */}}
{{- define "voxelflow.depImage" -}}
{{- $registry := default .image.registry .ctx.Values.global.imageRegistry -}}
{{- if $registry -}}
{{- printf "%s/%s:%s" $registry .image.repository .image.tag -}}
{{- else -}}
{{- printf "%s:%s" .image.repository .image.tag -}}
{{- end -}}
{{- end -}}

{{/* imagePullSecrets block. */}}
{{- define "voxelflow.imagePullSecrets" -}}
{{- with .Values.global.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* StorageClass line for a PVC template: (dict "ctx" $ "persistence" .Values.x.persistence) */}}
{{- define "voxelflow.storageClass" -}}
{{- $sc := default .ctx.Values.global.storageClass .persistence.storageClass -}}
{{- if $sc }}
{{- if eq "-" $sc }}
storageClassName: ""
{{- else }}
storageClassName: {{ $sc | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
A generated secret value that survives upgrades: reuse the value already in the cluster (lookup), else
generate one. Under `helm template` (no cluster) lookup returns nothing and a fresh value is generated.
Usage: include "voxelflow.secretValue" (dict "ctx" $ "name" "secret-name" "key" "password" "length" 32)
Returns the base64-encoded value.
*/}}
{{- define "voxelflow.secretValue" -}}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace .name -}}
{{- if and $existing $existing.data (hasKey $existing.data .key) -}}
{{- index $existing.data .key -}}
{{- else -}}
{{- randAlphaNum (int (default 32 .length)) | b64enc -}}
{{- end -}}
{{- end -}}

{{/* ---------------------------------------------------------------- dependency endpoints and secrets */}}

{{- define "voxelflow.postgresql.fullname" -}}{{ include "voxelflow.componentName" (dict "ctx" . "component" "postgresql") }}{{- end -}}
{{- define "voxelflow.redis.fullname" -}}{{ include "voxelflow.componentName" (dict "ctx" . "component" "redis") }}{{- end -}}
{{- define "voxelflow.minio.fullname" -}}{{ include "voxelflow.componentName" (dict "ctx" . "component" "minio") }}{{- end -}}
{{- define "voxelflow.mlflow.fullname" -}}{{ include "voxelflow.componentName" (dict "ctx" . "component" "mlflow") }}{{- end -}}
{{- define "voxelflow.triton.fullname" -}}{{ include "voxelflow.componentName" (dict "ctx" . "component" "triton") }}{{- end -}}

{{/* PostgreSQL: secret name / key / host / port / user / database. */}}
{{- define "voxelflow.database.secretName" -}}
{{- if .Values.postgresql.enabled -}}
{{- default (include "voxelflow.postgresql.fullname" .) .Values.postgresql.auth.existingSecret -}}
{{- else -}}
{{- required "externalDatabase.existingSecret is required when postgresql.enabled=false" .Values.externalDatabase.existingSecret -}}
{{- end -}}
{{- end -}}
{{- define "voxelflow.database.secretKey" -}}
{{- if .Values.postgresql.enabled }}{{ .Values.postgresql.auth.passwordKey }}{{ else }}{{ .Values.externalDatabase.passwordKey }}{{ end -}}
{{- end -}}
{{- define "voxelflow.database.host" -}}
{{- if .Values.postgresql.enabled }}{{ include "voxelflow.postgresql.fullname" . }}{{ else }}{{ required "externalDatabase.host is required when postgresql.enabled=false" .Values.externalDatabase.host }}{{ end -}}
{{- end -}}
{{- define "voxelflow.database.port" -}}
{{- if .Values.postgresql.enabled }}5432{{ else }}{{ .Values.externalDatabase.port }}{{ end -}}
{{- end -}}
{{- define "voxelflow.database.user" -}}
{{- if .Values.postgresql.enabled }}{{ .Values.postgresql.auth.username }}{{ else }}{{ .Values.externalDatabase.username }}{{ end -}}
{{- end -}}
{{- define "voxelflow.database.name" -}}
{{- if .Values.postgresql.enabled }}{{ .Values.postgresql.auth.database }}{{ else }}{{ .Values.externalDatabase.database }}{{ end -}}
{{- end -}}
{{- define "voxelflow.database.query" -}}
{{- if and (not .Values.postgresql.enabled) .Values.externalDatabase.sslmode }}?sslmode={{ .Values.externalDatabase.sslmode }}{{ end -}}
{{- end -}}

{{/* Redis. */}}
{{- define "voxelflow.redis.secretName" -}}
{{- if .Values.redis.enabled -}}
{{- default (include "voxelflow.redis.fullname" .) .Values.redis.auth.existingSecret -}}
{{- else -}}
{{- required "externalRedis.existingSecret is required when redis.enabled=false" .Values.externalRedis.existingSecret -}}
{{- end -}}
{{- end -}}
{{- define "voxelflow.redis.secretKey" -}}
{{- if .Values.redis.enabled }}{{ .Values.redis.auth.passwordKey }}{{ else }}{{ .Values.externalRedis.passwordKey }}{{ end -}}
{{- end -}}
{{- define "voxelflow.redis.host" -}}
{{- if .Values.redis.enabled }}{{ include "voxelflow.redis.fullname" . }}{{ else }}{{ required "externalRedis.host is required when redis.enabled=false" .Values.externalRedis.host }}{{ end -}}
{{- end -}}
{{- define "voxelflow.redis.port" -}}
{{- if .Values.redis.enabled }}6379{{ else }}{{ .Values.externalRedis.port }}{{ end -}}
{{- end -}}
{{- define "voxelflow.redis.db" -}}
{{- if .Values.redis.enabled }}0{{ else }}{{ .Values.externalRedis.db }}{{ end -}}
{{- end -}}
{{- define "voxelflow.redis.scheme" -}}
{{- if and (not .Values.redis.enabled) .Values.externalRedis.tls }}rediss{{ else }}redis{{ end -}}
{{- end -}}

{{/* Object storage (MinIO or external S3). */}}
{{- define "voxelflow.s3.secretName" -}}
{{- if .Values.minio.enabled -}}
{{- default (include "voxelflow.minio.fullname" .) .Values.minio.auth.existingSecret -}}
{{- else -}}
{{- required "externalS3.existingSecret is required when minio.enabled=false" .Values.externalS3.existingSecret -}}
{{- end -}}
{{- end -}}
{{- define "voxelflow.s3.accessKeyKey" -}}
{{- if .Values.minio.enabled }}{{ .Values.minio.auth.accessKeyKey }}{{ else }}{{ .Values.externalS3.accessKeyKey }}{{ end -}}
{{- end -}}
{{- define "voxelflow.s3.secretKeyKey" -}}
{{- if .Values.minio.enabled }}{{ .Values.minio.auth.secretKeyKey }}{{ else }}{{ .Values.externalS3.secretKeyKey }}{{ end -}}
{{- end -}}
{{- define "voxelflow.s3.host" -}}
{{- if .Values.minio.enabled }}{{ include "voxelflow.minio.fullname" . }}{{ else }}{{ required "externalS3.host is required when minio.enabled=false" .Values.externalS3.host }}{{ end -}}
{{- end -}}
{{- define "voxelflow.s3.port" -}}
{{- if .Values.minio.enabled }}9000{{ else }}{{ .Values.externalS3.port }}{{ end -}}
{{- end -}}
{{- define "voxelflow.s3.secure" -}}
{{- if .Values.minio.enabled }}false{{ else }}{{ .Values.externalS3.secure }}{{ end -}}
{{- end -}}
{{- define "voxelflow.s3.bucket" -}}
{{- if .Values.minio.enabled }}{{ .Values.minio.bucket }}{{ else }}{{ .Values.externalS3.bucket }}{{ end -}}
{{- end -}}
{{- define "voxelflow.s3.mlflowBucket" -}}
{{- if .Values.minio.enabled }}{{ .Values.minio.mlflowBucket }}{{ else }}{{ .Values.externalS3.mlflowBucket }}{{ end -}}
{{- end -}}
{{- define "voxelflow.s3.region" -}}
{{- if .Values.minio.enabled }}us-east-1{{ else }}{{ .Values.externalS3.region }}{{ end -}}
{{- end -}}
{{- define "voxelflow.s3.endpointUrl" -}}
{{- printf "%s://%s:%s" (ternary "https" "http" (eq (include "voxelflow.s3.secure" .) "true")) (include "voxelflow.s3.host" .) (include "voxelflow.s3.port" .) -}}
{{- end -}}

{{/* MLflow tracking URI. */}}
{{- define "voxelflow.mlflow.trackingUri" -}}
{{- if .Values.mlflow.enabled }}http://{{ include "voxelflow.mlflow.fullname" . }}:5000{{ else }}{{ required "externalMlflow.trackingUri is required when mlflow.enabled=false" .Values.externalMlflow.trackingUri }}{{ end -}}
{{- end -}}

{{/* Application secret (de-identification key). */}}
{{- define "voxelflow.appSecretName" -}}
{{- default (printf "%s-app" (include "voxelflow.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{/*
Workload catalogue: every voxelflow Deployment the chart renders, as JSON (a map keyed by component name).
Fields: component, valuesKey, package, role, imageName, gpu (map or null), needs (list), values (the
workload's values), queue, site, exposed (bool). Used by deployments, services, PDBs, KEDA, network
policies and ServiceMonitors so that they can never disagree.
*/}}
{{- define "voxelflow.workloads" -}}
{{- $out := dict -}}
{{- /* What each service really connects to (its settings.py and code): env vars, access labels and egress follow. */ -}}
{{- $needs := dict
  "ingest" (list "postgresql" "redis" "minio" "pacs" "deid")
  "preprocessing" (list "postgresql" "redis" "minio")
  "training_worker" (list "postgresql" "redis" "minio")
  "aggregation" (list "postgresql" "redis" "minio" "mlflow")
  "model_registry" (list "postgresql" "minio" "mlflow")
  "inference" (list "postgresql" "redis" "minio" "mlflow" "triton" "pacs" "deid")
-}}
{{- /* HTTP APIs of other voxelflow services each one calls (NetworkPolicy: only these, nothing else).
The aggregator calls no voxelflow API: it sends round tasks through Redis and reads the sites' updates from
object storage, and the training workers take their tasks from Redis, so nobody calls a training worker. */ -}}
{{- $calls := dict
  "ingest" (list)
  "preprocessing" (list)
  "training_worker" (list)
  "aggregation" (list)
  "model_registry" (list)
  "inference" (list "ingest")
-}}
{{- $services := list
  (dict "key" "ingest" "package" "ingest" "prefix" "ingest")
  (dict "key" "preprocessing" "package" "preprocessing" "prefix" "preprocessing")
  (dict "key" "aggregation" "package" "aggregation" "prefix" "aggregation")
  (dict "key" "modelRegistry" "package" "model_registry" "prefix" "model-registry")
  (dict "key" "inference" "package" "inference" "prefix" "inference")
-}}
{{- range $s := $services -}}
{{- $sv := index $.Values $s.key -}}
{{- if $sv.enabled -}}
{{- range $role := list "api" "worker" "dimse" -}}
{{- $rv := index $sv $role -}}
{{- if and $rv $rv.enabled -}}
{{- $gpu := dict -}}
{{- if and (eq $role "worker") $sv.gpu $sv.gpu.enabled }}{{ $gpu = $sv.gpu }}{{ end -}}
{{- $exposed := and (has $s.key (list "ingest" "inference")) (eq $role "api") -}}
{{- $component := printf "%s-%s" $s.prefix $role -}}
{{- $_ := set $out $component (dict "component" $component "valuesKey" $s.key "package" $s.package "prefix" $s.prefix "role" $role "imageName" $sv.imageName "gpu" $gpu "needs" (index $needs $s.package) "calls" (index $calls $s.package) "settings" ($sv.settings | default dict) "values" $rv "queue" ($rv.queue | default "") "site" "" "exposed" $exposed "healthApp" false) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $tw := .Values.trainingWorker -}}
{{- if $tw.enabled -}}
{{- range $site := $tw.sites -}}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" $site.name) -}}
{{- fail (printf "trainingWorker.sites[].name %q must be a DNS label" $site.name) -}}
{{- end -}}
{{- $component := printf "training-worker-%s" $site.name -}}
{{- $v := dict
  "enabled" true
  "replicaCount" (ternary $site.replicaCount 1 (hasKey $site "replicaCount"))
  "concurrency" 1
  "pool" "solo"
  "resources" ($site.resources | default $tw.resources)
  "healthResources" $tw.health.resources
  "nodeSelector" ($site.nodeSelector | default dict)
  "tolerations" ($site.tolerations | default list)
  "affinity" ($site.affinity | default dict)
  "podAnnotations" ($site.podAnnotations | default dict)
  "extraEnv" (concat ($tw.extraEnv | default list) ($site.extraEnv | default list))
  "pdb" $tw.pdb
  "keda" $tw.keda
  "queue" (printf "training.%s" $site.name)
  "shmSizeLimit" $tw.shmSizeLimit
  "terminationGracePeriodSeconds" $tw.terminationGracePeriodSeconds
-}}
{{- $gpu := dict -}}
{{- if $tw.gpu.enabled }}{{ $gpu = $tw.gpu }}{{ end -}}
{{- $settings := merge (deepCopy ($site.settings | default dict)) ($tw.settings | default dict) -}}
{{- $_ := set $out $component (dict "component" $component "valuesKey" "trainingWorker" "package" "training_worker" "prefix" "training-worker" "role" "worker" "imageName" $tw.imageName "gpu" $gpu "needs" (index $needs "training_worker") "calls" (index $calls "training_worker") "settings" $settings "values" $v "queue" (printf "training.%s" $site.name) "site" $site.name "exposed" false "healthApp" true) -}}
{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/*
Environment of a voxelflow container: credentials only through secretKeyRef, URLs composed with $(VAR)
references so that no secret lands in a ConfigMap or a literal env value.
Usage: include "voxelflow.env" (dict "ctx" $ "w" $workload)
*/}}
{{- define "voxelflow.env" -}}
{{- $ := .ctx -}}
{{- $w := .w -}}
- name: VOXELFLOW_SERVICE
  value: {{ $w.package | quote }}
- name: VOXELFLOW_COMPONENT
  value: {{ $w.component | quote }}
- name: VOXELFLOW_POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- if has "postgresql" $w.needs }}
- name: VOXELFLOW_DATABASE_USER
  value: {{ include "voxelflow.database.user" $ | quote }}
- name: VOXELFLOW_DATABASE_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "voxelflow.database.secretName" $ }}
      key: {{ include "voxelflow.database.secretKey" $ }}
- name: VOXELFLOW_DATABASE_URL
  value: "postgresql+psycopg://$(VOXELFLOW_DATABASE_USER):$(VOXELFLOW_DATABASE_PASSWORD)@{{ include "voxelflow.database.host" $ }}:{{ include "voxelflow.database.port" $ }}/{{ include "voxelflow.database.name" $ }}{{ include "voxelflow.database.query" $ }}"
{{- end }}
{{- if has "redis" $w.needs }}
- name: VOXELFLOW_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "voxelflow.redis.secretName" $ }}
      key: {{ include "voxelflow.redis.secretKey" $ }}
- name: VOXELFLOW_BROKER_URL
  value: "{{ include "voxelflow.redis.scheme" $ }}://:$(VOXELFLOW_REDIS_PASSWORD)@{{ include "voxelflow.redis.host" $ }}:{{ include "voxelflow.redis.port" $ }}/{{ include "voxelflow.redis.db" $ }}"
{{- end }}
{{- if has "minio" $w.needs }}
- name: VOXELFLOW_S3_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "voxelflow.s3.secretName" $ }}
      key: {{ include "voxelflow.s3.accessKeyKey" $ }}
- name: VOXELFLOW_S3_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "voxelflow.s3.secretName" $ }}
      key: {{ include "voxelflow.s3.secretKeyKey" $ }}
- name: VOXELFLOW_STORAGE_URL
  value: "s3://$(VOXELFLOW_S3_ACCESS_KEY):$(VOXELFLOW_S3_SECRET_KEY)@{{ include "voxelflow.s3.host" $ }}:{{ include "voxelflow.s3.port" $ }}/{{ include "voxelflow.s3.bucket" $ }}{{ if eq (include "voxelflow.s3.secure" $) "true" }}?secure=true{{ end }}"
{{- end }}
{{- if has "mlflow" $w.needs }}
{{- /* shared.registry reads VOXELFLOW_MLFLOW_TRACKING_URI; MLflow's own client code reads MLFLOW_TRACKING_URI. */}}
- name: VOXELFLOW_MLFLOW_TRACKING_URI
  value: {{ include "voxelflow.mlflow.trackingUri" $ | quote }}
- name: MLFLOW_TRACKING_URI
  value: {{ include "voxelflow.mlflow.trackingUri" $ | quote }}
{{- if and (not $.Values.mlflow.enabled) $.Values.externalMlflow.existingSecret }}
- name: MLFLOW_TRACKING_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ $.Values.externalMlflow.existingSecret }}
      key: {{ $.Values.externalMlflow.usernameKey }}
- name: MLFLOW_TRACKING_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $.Values.externalMlflow.existingSecret }}
      key: {{ $.Values.externalMlflow.passwordKey }}
{{- end }}
{{- end }}
{{- if has "deid" $w.needs }}
- name: VOXELFLOW_DEID_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "voxelflow.appSecretName" $ }}
      key: {{ $.Values.secrets.deidKeyKey }}
{{- end }}
{{- if eq $w.package "inference" }}
{{- $inf := $.Values.inference }}
{{- /* Backend: Triton when the chart deploys it, else ONNX Runtime in-process (services/inference/settings.py). */}}
- name: VOXELFLOW_BACKEND
  value: {{ ternary "triton" ($inf.backendWithoutTriton | default "onnxruntime") $.Values.triton.enabled | quote }}
{{- if $.Values.triton.enabled }}
- name: VOXELFLOW_TRITON_URL
  value: {{ printf "%s:8001" (include "voxelflow.triton.fullname" $) | quote }}
{{- /* poll: every replica of the shared Triton Deployment loads what the repository holds; the service only waits for a version (services/inference/backends.py). */}}
- name: VOXELFLOW_TRITON_MODEL_CONTROL
  value: {{ $.Values.triton.modelControlMode | quote }}
{{- if eq $.Values.triton.modelControlMode "poll" }}
- name: VOXELFLOW_TRITON_POLL_SETTLE_SECONDS
  value: {{ add $.Values.triton.repositoryPollSecs 5 | quote }}
{{- end }}
{{- end }}
{{- if $.Values.ingest.api.enabled }}
- name: VOXELFLOW_INGEST_URL
  value: {{ printf "http://%s:%v" (include "voxelflow.componentName" (dict "ctx" $ "component" "ingest-api")) $.Values.ingest.api.service.port | quote }}
{{- end }}
{{- with $inf.ingestToken.existingSecret }}
- name: VOXELFLOW_INGEST_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $inf.ingestToken.key }}
{{- end }}
{{- if $inf.pacs.url }}
- name: VOXELFLOW_PACS_URL
  value: {{ $inf.pacs.url | quote }}
{{- with $inf.pacs.existingSecret }}
- name: VOXELFLOW_PACS_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $inf.pacs.usernameKey }}
- name: VOXELFLOW_PACS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $inf.pacs.passwordKey }}
{{- end }}
{{- end }}
{{- end }}
{{- if and (has $w.package (list "ingest" "preprocessing")) $.Values.preprocessing.enabled }}
{{- /* ingest sends 'series ready' there, the preprocessing API enqueues builds there: the worker's queue. */}}
- name: VOXELFLOW_PREPROCESSING_QUEUE
  value: {{ $.Values.preprocessing.worker.queue | quote }}
{{- end }}
{{- if eq $w.package "aggregation" }}
{{- /* The API kicks runs onto the aggregator worker's queue; round tasks go to the queue each training-worker
site consumes ("training.<site>", fixed by the workload catalogue above). */}}
- name: VOXELFLOW_AGGREGATION_QUEUE
  value: {{ $.Values.aggregation.worker.queue | quote }}
- name: VOXELFLOW_TRAINING_QUEUE_PREFIX
  value: "training."
{{- end }}
{{- if eq $w.package "training_worker" }}
{{- /* The same prefix as aggregation's (shared.contracts.tasks.training_queue): the worker consumes "training.<site>". */}}
- name: VOXELFLOW_TRAINING_QUEUE_PREFIX
  value: "training."
{{- end }}
{{- if $w.site }}
- name: VOXELFLOW_SITE
  value: {{ $w.site | quote }}
{{- end }}
{{- /* The service's own settings (values: <service>.settings, keys = field names of its settings.py). */}}
{{- range $k, $val := $w.settings }}
{{- if not (kindIs "invalid" $val) }}
- name: {{ printf "VOXELFLOW_%s" (upper $k) }}
  value: {{ ternary ($val | toJson) ($val | toString) (or (kindIs "slice" $val) (kindIs "map" $val)) | quote }}
{{- end }}
{{- end }}
{{- if ne $w.role "api" }}
- name: VOXELFLOW_METRICS_PORT
  value: {{ $.Values.metrics.workerPort | quote }}
{{- end }}
{{- if eq $w.role "worker" }}
- name: VOXELFLOW_CELERY_QUEUE
  value: {{ $w.queue | quote }}
- name: VOXELFLOW_CELERY_POOL
  value: {{ $w.values.pool | default "solo" | quote }}
- name: VOXELFLOW_CELERY_CONCURRENCY
  value: {{ $w.values.concurrency | quote }}
{{- end }}
{{- if eq $w.role "dimse" }}
- name: VOXELFLOW_DIMSE_HOST
  value: "0.0.0.0"
- name: VOXELFLOW_DIMSE_AE_TITLE
  value: {{ $w.values.aeTitle | quote }}
- name: VOXELFLOW_DIMSE_PORT
  value: {{ $w.values.port | quote }}
{{- end }}
{{- with $.Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- with $w.values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Pod-level scheduling: workload value, else GPU extras, else global defaults. */}}
{{- define "voxelflow.scheduling" -}}
{{- $ := .ctx -}}
{{- $v := .values -}}
{{- $gpu := .gpu | default dict -}}
{{- $component := .component -}}
{{- $ns := merge (deepCopy ($v.nodeSelector | default dict)) ($gpu.nodeSelector | default dict) ($.Values.nodeSelector | default dict) -}}
{{- with $ns }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $tol := concat ($v.tolerations | default $.Values.tolerations | default list) ($gpu.tolerations | default list) -}}
{{- with $tol }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with ($v.affinity | default $.Values.affinity) }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $.Values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- range . }}
  - {{ toYaml (merge (deepCopy .) (dict "labelSelector" (dict "matchLabels" (fromYaml (include "voxelflow.componentSelectorLabels" (dict "ctx" $ "component" $component)))))) | nindent 4 | trim }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* Volumes every voxelflow pod gets: an emptyDir /tmp (root filesystem is read-only). */}}
{{- define "voxelflow.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
{{- end -}}

{{/* A NetworkPolicy peer list for a dependency (bundled: pod selector; external: CIDRs). */}}
{{- define "voxelflow.depPeer" -}}
{{- $ := .ctx -}}
{{- if .bundled }}
- podSelector:
    matchLabels:
      {{- include "voxelflow.componentSelectorLabels" (dict "ctx" $ "component" .component) | nindent 6 }}
{{- else }}
{{- range $.Values.networkPolicy.externalCidrs }}
- ipBlock:
    cidr: {{ . }}
{{- end }}
{{- end }}
{{- end -}}
