{{/*
Names and labels.
*/}}
{{- define "tokenvault.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tokenvault.fullname" -}}
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

{{/* The headless Service: 54 characters leave room for "-headless". */}}
{{- define "tokenvault.headlessName" -}}
{{- printf "%s-headless" (include "tokenvault.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{- define "tokenvault.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tokenvault.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tokenvault.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tokenvault.labels" -}}
helm.sh/chart: {{ include "tokenvault.chart" . }}
{{ include "tokenvault.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tokenvault
{{- end }}

{{/* The vault pod (the maintenance pod has component "maintenance"). */}}
{{- define "tokenvault.vaultSelectorLabels" -}}
{{ include "tokenvault.selectorLabels" . }}
app.kubernetes.io/component: vault
{{- end }}

{{- define "tokenvault.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tokenvault.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tokenvault.claimName" -}}
{{- default (printf "%s-data" (include "tokenvault.fullname" .)) .Values.persistence.existingClaim }}
{{- end }}

{{/* image reference: a digest wins over a tag. Argument: dict with image and root. */}}
{{- define "tokenvault.imageRef" -}}
{{- $img := .image }}
{{- $repo := default .root.Values.image.repository $img.repository }}
{{- $digest := $img.digest | default "" }}
{{- if $digest }}
{{- printf "%s@%s" $repo $digest }}
{{- else }}
{{- printf "%s:%s" $repo (default .root.Chart.AppVersion $img.tag | toString) }}
{{- end }}
{{- end }}

{{/*
Fixed paths inside the pod. The config file refers to these; nothing else chooses them.
The data directory is a subdirectory of the volume: the vault creates it and makes it
private (0700), which it could not do on the volume's root, owned by root.
*/}}
{{- define "tokenvault.paths.configDir" -}}/etc/tokenvault/config{{- end }}
{{- define "tokenvault.paths.configFile" -}}/etc/tokenvault/config/tokenvault.toml{{- end }}
{{- define "tokenvault.paths.volume" -}}/var/lib/tokenvault{{- end }}
{{- define "tokenvault.paths.dataDir" -}}/var/lib/tokenvault/data{{- end }}
{{- define "tokenvault.paths.keystore" -}}/var/lib/tokenvault/data/keystore.json{{- end }}
{{- define "tokenvault.paths.jwtDir" -}}/etc/tokenvault/jwt{{- end }}
{{- define "tokenvault.paths.tlsDir" -}}/run/secrets/tokenvault/tls{{- end }}
{{- define "tokenvault.paths.clientCADir" -}}/etc/tokenvault/client-ca{{- end }}
{{- define "tokenvault.paths.pspDir" -}}/run/secrets/tokenvault/psp{{- end }}
{{- define "tokenvault.paths.hsmDir" -}}/run/secrets/tokenvault/hsm{{- end }}

{{/* Whether the vault itself terminates TLS. */}}
{{- define "tokenvault.nativeTls" -}}
{{- if eq .Values.config.tls.mode "native" }}true{{- end }}
{{- end }}

{{/* HTTP scheme the vault's port speaks. */}}
{{- define "tokenvault.scheme" -}}
{{- if include "tokenvault.nativeTls" . }}https{{- else }}http{{- end }}
{{- end }}

{{/* How kubelet probes the vault: "HTTPS", "HTTP" or "tcp". */}}
{{- define "tokenvault.probeKind" -}}
{{- $mode := .Values.probes.mode }}
{{- $native := include "tokenvault.nativeTls" . }}
{{- $mtlsOnly := and $native .Values.config.tls.clientCA.secretName .Values.config.tls.requireClientCert }}
{{- if eq $mode "tcp" }}tcp
{{- else if eq $mode "http" }}{{ if $native }}HTTPS{{ else }}HTTP{{ end }}
{{- else if $mtlsOnly }}tcp
{{- else if $native }}HTTPS
{{- else }}HTTP
{{- end }}
{{- end }}

{{/* TOML value: strings are JSON-quoted (a valid TOML basic string), the rest as is. */}}
{{- define "tokenvault.toml" -}}
{{- if kindIs "string" . }}{{ toJson . }}
{{- else if or (kindIs "slice" .) (kindIs "map" .) }}{{ toJson . }}
{{- else if kindIs "float64" . }}{{ int64 . }}
{{- else }}{{ . }}
{{- end }}
{{- end }}

{{/* Whether a value was given (not null, not an empty string). */}}
{{- define "tokenvault.set" -}}
{{- if and (not (kindIs "invalid" .)) (ne (toString .) "") }}true{{- end }}
{{- end }}

{{/*
Checks that fail the render on values the vault would refuse or that would weaken it.
The vault validates its config again at start; these catch mistakes at install time.
*/}}
{{- define "tokenvault.validate" -}}
{{- $v := .Values }}
{{- $c := $v.config }}
{{- if ne (int $v.replicaCount) 1 }}
{{- fail (printf "replicaCount must be 1 (got %v): tokenvault keeps its data in sled, an embedded single-writer store owned by one process; a second replica would have its own, different store. To stop the vault for offline work use maintenance.enabled=true." $v.replicaCount) }}
{{- end }}
{{- if or (eq (int $v.securityContext.runAsUser) 0) (eq (int $v.securityContext.runAsGroup) 0) (eq (int $v.securityContext.fsGroup) 0) }}
{{- fail "securityContext.runAsUser, runAsGroup and fsGroup must not be 0: the vault runs as an unprivileged user" }}
{{- end }}
{{- if not (has $c.tls.mode (list "native" "upstream")) }}
{{- fail (printf "config.tls.mode must be native or upstream (got %q)" $c.tls.mode) }}
{{- end }}
{{- if and (eq $c.tls.mode "native") (not $c.tls.secretName) }}
{{- fail "config.tls.secretName is required with config.tls.mode=native (an existing kubernetes.io/tls Secret)" }}
{{- end }}
{{- if and $c.tls.requireClientCert (not $c.tls.clientCA.secretName) }}
{{- fail "config.tls.requireClientCert needs config.tls.clientCA.secretName (mutual TLS)" }}
{{- end }}
{{- if not (has $v.probes.mode (list "auto" "http" "tcp")) }}
{{- fail (printf "probes.mode must be auto, http or tcp (got %q)" $v.probes.mode) }}
{{- end }}
{{- if not (has $c.logFormat (list "json" "pretty")) }}
{{- fail (printf "config.logFormat must be json or pretty (got %q)" $c.logFormat) }}
{{- end }}
{{- $kids := list }}
{{- range $i, $k := $c.auth.keys }}
{{- if or (not $k.kid) (not $k.alg) (not $k.secretName) (not $k.secretKey) }}
{{- fail (printf "config.auth.keys[%d] needs kid, alg, secretName and secretKey" $i) }}
{{- end }}
{{- if not (regexMatch "^[A-Za-z0-9._-]+$" $k.kid) }}
{{- fail (printf "config.auth.keys[%d].kid %q: only letters, digits, '.', '_' and '-' (it names a file)" $i $k.kid) }}
{{- end }}
{{- if has $k.kid $kids }}
{{- fail (printf "config.auth.keys: kid %q is listed twice" $k.kid) }}
{{- end }}
{{- $kids = append $kids $k.kid }}
{{- if not (has $k.alg (list "EdDSA" "ES256" "RS256")) }}
{{- fail (printf "config.auth.keys[%d].alg must be EdDSA, ES256 or RS256 (got %q)" $i $k.alg) }}
{{- end }}
{{- if and (eq $k.alg "RS256") (not $c.auth.allowRs256) }}
{{- fail "config.auth.keys: RS256 keys need config.auth.allowRs256=true" }}
{{- end }}
{{- end }}
{{- range $i, $cl := $c.clients }}
{{- if or (not $cl.sub) (not $cl.scopes) (not $cl.tenants) }}
{{- fail (printf "config.clients[%d] needs sub, scopes and tenants" $i) }}
{{- end }}
{{- if has "*" $cl.tenants }}
{{- fail (printf "config.clients[%d] (%s): the \"*\" tenant wildcard is refused in production; list tenants explicitly" $i $cl.sub) }}
{{- end }}
{{- if $cl.certSha256 }}
{{- if not (regexMatch "^[0-9a-fA-F]{64}$" $cl.certSha256) }}
{{- fail (printf "config.clients[%d].certSha256 must be 64 hex characters (SHA-256 of the certificate's SPKI)" $i) }}
{{- end }}
{{- if or (ne $c.tls.mode "native") (not $c.tls.clientCA.secretName) }}
{{- fail (printf "config.clients[%d] (%s) pins a certificate: that needs config.tls.mode=native and config.tls.clientCA.secretName (mutual TLS)" $i $cl.sub) }}
{{- end }}
{{- end }}
{{- end }}
{{- if not (has $c.keystore.provider (list "sealed" "pkcs11")) }}
{{- fail (printf "config.keystore.provider must be sealed or pkcs11 (got %q)" $c.keystore.provider) }}
{{- end }}
{{- if eq $c.keystore.provider "pkcs11" }}
{{- if or (not $c.keystore.pkcs11.module) (not $c.keystore.pkcs11.tokenLabel) (not $c.keystore.pkcs11.pinSecret.name) }}
{{- fail "config.keystore.provider=pkcs11 needs config.keystore.pkcs11.module, tokenLabel and pinSecret.name" }}
{{- end }}
{{- end }}
{{- if $c.psp.enabled }}
{{- if or (not $c.psp.baseUrl) (not $c.psp.merchantAccount) (not $c.psp.allowedHosts) (not $c.psp.apiKeySecret.name) }}
{{- fail "config.psp.enabled needs config.psp.baseUrl, merchantAccount, allowedHosts and apiKeySecret.name" }}
{{- end }}
{{- if not (hasPrefix "https://" $c.psp.baseUrl) }}
{{- fail "config.psp.baseUrl must be https:// (card data crosses the network)" }}
{{- end }}
{{- end }}
{{- range $e := $v.extraEnv }}
{{- if hasPrefix "TOKENVAULT_" (upper $e.name) }}
{{- fail (printf "extraEnv: %s is refused; set the vault's settings through config (the rendered tokenvault.toml) instead" $e.name) }}
{{- end }}
{{- end }}
{{- if $v.networkPolicy.enabled }}
{{- range $role, $peers := $v.networkPolicy.ingressFrom }}
{{- range $i, $p := $peers }}
{{- if not (or $p.ipBlock (and $p.podSelector (or $p.podSelector.matchLabels $p.podSelector.matchExpressions)) (and $p.namespaceSelector (or $p.namespaceSelector.matchLabels $p.namespaceSelector.matchExpressions))) }}
{{- fail (printf "networkPolicy.ingressFrom.%s[%d] would match every pod it can: give it a non-empty podSelector or namespaceSelector (or an ipBlock)" $role $i) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Pod pieces shared by the vault and the maintenance pod.
*/}}
{{- define "tokenvault.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ int .Values.securityContext.runAsUser }}
runAsGroup: {{ int .Values.securityContext.runAsGroup }}
fsGroup: {{ int .Values.securityContext.fsGroup }}
{{- with .Values.securityContext.fsGroupChangePolicy }}
fsGroupChangePolicy: {{ . }}
{{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "tokenvault.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ int .Values.securityContext.runAsUser }}
runAsGroup: {{ int .Values.securityContext.runAsGroup }}
privileged: false
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
seccompProfile:
  type: RuntimeDefault
capabilities:
  drop: ["ALL"]
  {{- if .Values.mlockall.enabled }}
  # mlockall = true: lock memory so secrets never reach swap (see README: "mlockall").
  add: ["IPC_LOCK"]
  {{- end }}
{{- end }}

{{- define "tokenvault.volumeMounts" -}}
- name: config
  mountPath: {{ include "tokenvault.paths.configDir" . }}
  readOnly: true
- name: data
  mountPath: {{ include "tokenvault.paths.volume" . }}
- name: tmp
  mountPath: /tmp
{{- if .Values.config.auth.keys }}
- name: jwt-keys
  mountPath: {{ include "tokenvault.paths.jwtDir" . }}
  readOnly: true
{{- end }}
{{- if include "tokenvault.nativeTls" . }}
- name: tls
  mountPath: {{ include "tokenvault.paths.tlsDir" . }}
  readOnly: true
{{- if .Values.config.tls.clientCA.secretName }}
- name: client-ca
  mountPath: {{ include "tokenvault.paths.clientCADir" . }}
  readOnly: true
{{- end }}
{{- end }}
{{- if .Values.config.psp.enabled }}
- name: psp-api-key
  mountPath: {{ include "tokenvault.paths.pspDir" . }}
  readOnly: true
{{- end }}
{{- if eq .Values.config.keystore.provider "pkcs11" }}
- name: hsm-pin
  mountPath: {{ include "tokenvault.paths.hsmDir" . }}
  readOnly: true
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Secret files are readable by the vault's group (fsGroup) only: 0440. */}}
{{- define "tokenvault.volumes" -}}
- name: config
  configMap:
    name: {{ include "tokenvault.fullname" . }}
    defaultMode: 0440
    items:
      - key: tokenvault.toml
        path: tokenvault.toml
- name: data
  persistentVolumeClaim:
    claimName: {{ include "tokenvault.claimName" . }}
- name: tmp
  emptyDir:
    sizeLimit: 16Mi
{{- if .Values.config.auth.keys }}
- name: jwt-keys
  projected:
    defaultMode: 0440
    sources:
      {{- range .Values.config.auth.keys }}
      - secret:
          name: {{ .secretName }}
          items:
            - key: {{ .secretKey }}
              path: {{ .kid }}.pem
      {{- end }}
{{- end }}
{{- if include "tokenvault.nativeTls" . }}
- name: tls
  secret:
    secretName: {{ .Values.config.tls.secretName }}
    defaultMode: 0440
    items:
      - key: {{ .Values.config.tls.certKey }}
        path: tls.crt
      - key: {{ .Values.config.tls.keyKey }}
        path: tls.key
{{- if .Values.config.tls.clientCA.secretName }}
- name: client-ca
  secret:
    secretName: {{ .Values.config.tls.clientCA.secretName }}
    defaultMode: 0440
    items:
      - key: {{ .Values.config.tls.clientCA.key }}
        path: ca.crt
{{- end }}
{{- end }}
{{- if .Values.config.psp.enabled }}
- name: psp-api-key
  secret:
    secretName: {{ .Values.config.psp.apiKeySecret.name }}
    defaultMode: 0440
    items:
      - key: {{ .Values.config.psp.apiKeySecret.key }}
        path: api-key
{{- end }}
{{- if eq .Values.config.keystore.provider "pkcs11" }}
- name: hsm-pin
  secret:
    secretName: {{ .Values.config.keystore.pkcs11.pinSecret.name }}
    defaultMode: 0440
    items:
      - key: {{ .Values.config.keystore.pkcs11.pinSecret.key }}
        path: pin
{{- end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "tokenvault.env" -}}
- name: RUST_LOG
  value: {{ .Values.config.logLevel | default "info" | quote }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "tokenvault.podScheduling" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
