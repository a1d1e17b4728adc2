{{/* Names, labels and shared pieces of the API and worker pods. */}}

{{- define "gpufn.name" -}}
{{- .Values.nameOverride | default .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The prefix of every object: the release name alone when it already says gpufn. Short enough that
     "<fullname>-api-headless" stays a valid DNS label. */}}
{{- define "gpufn.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains (include "gpufn.name" .) .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "gpufn.name" .) | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "gpufn.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gpufn.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "gpufn.labels" -}}
{{ include "gpufn.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "gpufn.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "gpufn.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{- define "gpufn.secretName" -}}
{{- .Values.secrets.existingSecret | default (printf "%s-secrets" (include "gpufn.fullname" .)) -}}
{{- end -}}

{{- define "gpufn.image" -}}
{{- $repository := required "image.repository is required: gpufn publishes no image, build one with deploy/Dockerfile" .Values.image.repository -}}
{{- printf "%s:%s" $repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "gpufn.apiScheme" -}}
{{- if .Values.api.tls.secretName }}https{{ else }}http{{ end -}}
{{- end -}}

{{/* The API replicas' base URLs: StatefulSet pods are <statefulset>-<ordinal>, and the headless Service
     gives each its own DNS name. */}}
{{- define "gpufn.gatewayUrls" -}}
{{- if .Values.worker.gatewayUrls -}}
{{- toJson .Values.worker.gatewayUrls -}}
{{- else -}}
{{- $full := include "gpufn.fullname" . -}}
{{- $scheme := include "gpufn.apiScheme" . -}}
{{- $urls := list -}}
{{- range $i := until (int .Values.api.replicas) -}}
{{- $urls = append $urls (printf "%s://%s-api-%d.%s-api-headless.%s.svc:%d" $scheme $full $i $full $.Release.Namespace (int $.Values.api.port)) -}}
{{- end -}}
{{- toJson $urls -}}
{{- end -}}
{{- end -}}

{{- define "gpufn.kubeconfigPaths" -}}
{{- $paths := list -}}
{{- if .Values.inCluster.enabled -}}
{{- $paths = append $paths "/etc/gpufn/in-cluster/kubeconfig" -}}
{{- end -}}
{{- range .Values.kubeconfigs.files -}}
{{- $paths = append $paths (printf "%s/%s" (trimSuffix "/" $.Values.kubeconfigs.mountPath) .) -}}
{{- end -}}
{{- toJson $paths -}}
{{- end -}}

{{/* Pods restart when their settings change. The Secret's checksum is over the values that make it, not
     over its rendering, which holds freshly generated keys whenever `lookup` cannot see the live ones. */}}
{{- define "gpufn.podAnnotations" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
checksum/secret: {{ toJson (list .Values.secrets .Values.registry.credentials) | sha256sum }}
{{- end -}}

{{- define "gpufn.envFrom" -}}
- configMapRef:
    name: {{ include "gpufn.fullname" . }}-config
- secretRef:
    name: {{ include "gpufn.secretName" . }}
{{- end -}}

{{- define "gpufn.volumeMounts" -}}
- name: state
  mountPath: {{ .Values.stateDir }}
- name: tmp
  mountPath: /tmp
{{- if .Values.inCluster.enabled }}
- name: in-cluster-kubeconfig
  mountPath: /etc/gpufn/in-cluster
  readOnly: true
{{- end }}
{{- if .Values.kubeconfigs.secretName }}
- name: kubeconfigs
  mountPath: {{ .Values.kubeconfigs.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "gpufn.volumes" -}}
- name: state
  emptyDir: {}
- name: tmp
  emptyDir: {}
{{- if .Values.inCluster.enabled }}
- name: in-cluster-kubeconfig
  configMap:
    name: {{ include "gpufn.fullname" . }}-in-cluster-kubeconfig
{{- end }}
{{- if .Values.kubeconfigs.secretName }}
- name: kubeconfigs
  secret:
    secretName: {{ .Values.kubeconfigs.secretName }}
{{- end }}
{{- end -}}

{{/* Pod-level fields the API and the workers share. */}}
{{- define "gpufn.podSpecCommon" -}}
serviceAccountName: {{ include "gpufn.serviceAccountName" . }}
{{- /* Only the in-cluster backend talks to this cluster's API; without it the pods need no token. */}}
automountServiceAccountToken: {{ .Values.inCluster.enabled }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
