{{/*
The objects' base name: fixed, not the release name (see values.yaml).
*/}}
{{- define "topoproxy.name" -}}
{{- if eq .Values.mode "shadow" -}}topoproxy-shadow{{- else -}}topoproxy{{- end -}}
{{- end -}}

{{/*
The ConfigMap's name, as the overlays' nameSuffix renders it (topoproxy-config-shadow).
*/}}
{{- define "topoproxy.configName" -}}
{{- if eq .Values.mode "shadow" -}}topoproxy-config-shadow{{- else -}}topoproxy-config{{- end -}}
{{- end -}}

{{- define "topoproxy.checkMode" -}}
{{- if not (has .Values.mode (list "ipvs" "ebpf" "shadow")) -}}
{{- fail (printf "mode must be ipvs, ebpf or shadow, not %q" .Values.mode) -}}
{{- end -}}
{{- if and .Values.privileged (ne .Values.mode "ipvs") -}}
{{- fail "privileged: true is for IPVS mode only" -}}
{{- end -}}
{{- end -}}

{{/*
Labels every object gets, selectors included (the overlays' `labels` with includeSelectors).
*/}}
{{- define "topoproxy.selectorLabels" -}}
app.kubernetes.io/component: service-proxy
app.kubernetes.io/instance: {{ include "topoproxy.name" . }}
app.kubernetes.io/name: topoproxy
{{- end -}}

{{/*
Metadata labels: the selector labels plus Helm's own bookkeeping.
*/}}
{{- define "topoproxy.labels" -}}
{{ include "topoproxy.selectorLabels" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/*
The agent's config file as a dict: the mode's defaults (manifests/base/configmap.yaml and the
overlays' config patches), then .Values.config over them.
*/}}
{{- define "topoproxy.config" -}}
{{- $common := dict "min-sync-period" "1s" "sync-period" "30s" "service-proxy-name" "topoproxy" "log-format" "text" -}}
{{- $mode := dict -}}
{{- if eq .Values.mode "ipvs" -}}
{{- $mode = dict "proxy-mode" "ipvs" "healthz-bind-address" "0.0.0.0:10256" "metrics-bind-address" "127.0.0.1:10249" "ipvs-scheduler" "rr" "cluster-cidr" "" "masquerade-all" false "ipvs-exclude-cidrs" "" "ipvs-strict-arp" false "ipvs-drain-timeout" "15m" -}}
{{- else if eq .Values.mode "ebpf" -}}
{{- $mode = dict "proxy-mode" "ebpf" "healthz-bind-address" "0.0.0.0:10256" "metrics-bind-address" "127.0.0.1:10249" -}}
{{- else -}}
{{- $mode = dict "proxy-mode" "dry-run" "healthz-bind-address" "0.0.0.0:10266" "metrics-bind-address" "127.0.0.1:10269" "ipvs-scheduler" "rr" -}}
{{- end -}}
{{- $config := mergeOverwrite $common $mode (deepCopy (.Values.config | default dict)) -}}
{{- toYaml $config -}}
{{- end -}}

{{/*
The port of a bind address (host:port or [v6]:port).
*/}}
{{- define "topoproxy.port" -}}
{{- $parts := splitList ":" . -}}
{{- last $parts -}}
{{- end -}}

{{/*
The image reference: repository@digest when a digest is given (as kustomize's images
`digest:` renders it), else repository:tag.
*/}}
{{- define "topoproxy.image" -}}
{{- if .Values.image.digest -}}
{{- if not (hasPrefix "sha256:" .Values.image.digest) -}}
{{- fail (printf "image.digest must start with sha256:, not %q" .Values.image.digest) -}}
{{- end -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default (printf "v%s" .Chart.AppVersion) }}
{{- end -}}
{{- end -}}
