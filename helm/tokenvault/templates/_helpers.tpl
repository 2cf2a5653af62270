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

{{/* Store backend: "true" with store.backend=postgres. */}}
{{- define "tokenvault.postgres" -}}
{{- if eq .Values.store.backend "postgres" }}true{{- end }}
{{- end }}

{{/* The replica count: replicaCount, or when null 1 (sled) / 2 (postgres). */}}
{{- define "tokenvault.replicas" -}}
{{- if include "tokenvault.set" .Values.replicaCount }}{{ int .Values.replicaCount }}
{{- else if include "tokenvault.postgres" . }}2
{{- else }}1
{{- end }}
{{- end }}

{{/*
sled mode in maintenance with store.postgres named: the maintenance pod gets the database
password (and CA) and the config their file keys, for `tokenvault store copy`. The store
itself stays sled (the config names no store url).
*/}}
{{- define "tokenvault.pgMigration" -}}
{{- if and (not (include "tokenvault.postgres" .)) .Values.maintenance.enabled .Values.store.postgres.passwordSecret.name }}true{{- end }}
{{- end }}

{{/* Whether the pods mount the database's password (and CA) files. */}}
{{- define "tokenvault.pgFiles" -}}
{{- if or (include "tokenvault.postgres" .) (include "tokenvault.pgMigration" .) }}true{{- end }}
{{- end }}

{{/*
The PostgreSQL URL: hosts (a port added where missing), database, user, sslmode and
target_session_attrs. Never a password: that is `[store] password_file`.
*/}}
{{- define "tokenvault.pgUrl" -}}
{{- $pg := .Values.store.postgres }}
{{- $hosts := list }}
{{- range $pg.hosts }}
{{- if regexMatch ":[0-9]+$" (regexReplaceAll "^\\[[^\\]]*\\]" . "") }}
{{- $hosts = append $hosts . }}
{{- else }}
{{- $hosts = append $hosts (printf "%s:%d" . (int $pg.port)) }}
{{- end }}
{{- end }}
{{- printf "postgres://%s@%s/%s?sslmode=%s&target_session_attrs=%s" $pg.user (join "," $hosts) $pg.database $pg.sslmode $pg.targetSessionAttrs }}
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
{{- define "tokenvault.paths.dbDir" -}}/run/secrets/tokenvault/db{{- end }}
{{- define "tokenvault.paths.dbCADir" -}}/etc/tokenvault/db-ca{{- end }}
{{- define "tokenvault.paths.redisDir" -}}/run/secrets/tokenvault/redis{{- end }}

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
{{- $replicas := int (include "tokenvault.replicas" .) }}
{{- if not (has $v.store.backend (list "sled" "postgres")) }}
{{- fail (printf "store.backend must be sled or postgres (got %q)" $v.store.backend) }}
{{- end }}
{{- if include "tokenvault.postgres" . }}
{{- if lt $replicas 2 }}
{{- fail (printf "replicaCount must be at least 2 with store.backend=postgres (got %d): the replicas share the database, and one replica would be a single point of failure. For a single vault use store.backend=sled; to stop the vault use maintenance.enabled=true." $replicas) }}
{{- end }}
{{- include "tokenvault.validatePostgres" . }}
{{- if not $v.store.redis.urlSecret.name }}
{{- fail "store.backend=postgres needs store.redis.urlSecret.name (an existing Secret holding the URL of a memory-only Redis): replicas share CVVs there, or a charge landing on another replica than its tokenize call would find no CVV" }}
{{- end }}
{{- if $v.autoscaling.enabled }}
{{- if eq $c.keystore.provider "sealed" }}
{{- fail "autoscaling.enabled needs config.keystore.provider=pkcs11 (HSM auto-unseal): with the sealed provider every replica starts sealed and waits for its custodians, so replicas the HorizontalPodAutoscaler adds would never become ready. Use a fixed replicaCount with the sealed provider." }}
{{- end }}
{{- $min := int (include "tokenvault.hpaMinReplicas" .) }}
{{- if lt $min 2 }}
{{- fail (printf "autoscaling.minReplicas must be at least 2 (got %d)" $min) }}
{{- end }}
{{- if lt (int $v.autoscaling.maxReplicas) $min }}
{{- fail (printf "autoscaling.maxReplicas (%d) must be at least autoscaling.minReplicas (%d)" (int $v.autoscaling.maxReplicas) $min) }}
{{- end }}
{{- end }}
{{- if $v.networkPolicy.enabled }}
{{- if not $v.networkPolicy.egress.database.to }}
{{- fail "networkPolicy.egress.database.to is empty: with store.backend=postgres the NetworkPolicy must let the vault reach its database (list its ipBlock CIDRs or pod/namespace selectors)" }}
{{- end }}
{{- if not $v.networkPolicy.egress.redis.to }}
{{- fail "networkPolicy.egress.redis.to is empty: with store.backend=postgres the NetworkPolicy must let the vault reach the CVV Redis (list its ipBlock CIDRs or pod/namespace selectors)" }}
{{- end }}
{{- end }}
{{- else }}
{{- if ne $replicas 1 }}
{{- fail (printf "replicaCount must be 1 (got %v): tokenvault keeps its data in sled, an embedded single-writer store owned by one process; a second replica would have its own, different store. For several replicas use store.backend=postgres; to stop the vault for offline work use maintenance.enabled=true." $v.replicaCount) }}
{{- end }}
{{- if $v.autoscaling.enabled }}
{{- fail "autoscaling.enabled needs store.backend=postgres: with sled the vault runs exactly one replica" }}
{{- end }}
{{- if include "tokenvault.pgMigration" . }}
{{- include "tokenvault.validatePostgres" . }}
{{- if and $v.networkPolicy.enabled (not $v.networkPolicy.egress.database.to) }}
{{- fail "networkPolicy.egress.database.to is empty: the maintenance pod could not reach the database named by store.postgres (for tokenvault store copy); list its ipBlock CIDRs or pod/namespace selectors" }}
{{- end }}
{{- end }}
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
{{- range $role := list "database" "redis" }}
{{- range $i, $p := (get $v.networkPolicy.egress $role).to }}
{{- if not (or $p.ipBlock (and $p.podSelector (or $p.podSelector.matchLabels $p.podSelector.matchExpressions)) (and $p.namespaceSelector (or $p.namespaceSelector.matchLabels $p.namespaceSelector.matchExpressions))) }}
{{- fail (printf "networkPolicy.egress.%s.to[%d] would match every pod it can: give it a non-empty podSelector or namespaceSelector (or an ipBlock)" $role $i) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* store.postgres: what the URL needs, and what the vault's production check demands. */}}
{{- define "tokenvault.validatePostgres" -}}
{{- $pg := .Values.store.postgres }}
{{- if or (not $pg.hosts) (not $pg.database) (not $pg.user) (not $pg.passwordSecret.name) }}
{{- fail "store.postgres needs hosts, database, user and passwordSecret.name (an existing Secret holding the database password; it is mounted as a file, never put in the URL)" }}
{{- end }}
{{- if not (has $pg.sslmode (list "require" "disable")) }}
{{- fail (printf "store.postgres.sslmode must be require or disable (got %q)" $pg.sslmode) }}
{{- end }}
{{- if not (has $pg.targetSessionAttrs (list "read-write" "any")) }}
{{- fail (printf "store.postgres.targetSessionAttrs must be read-write or any (got %q)" $pg.targetSessionAttrs) }}
{{- end }}
{{- range $i, $h := $pg.hosts }}
{{- if not (regexMatch "^([A-Za-z0-9._-]+|\\[[0-9A-Fa-f:.]+\\])(:[0-9]{1,5})?$" $h) }}
{{- fail (printf "store.postgres.hosts[%d] %q: a host name or IP address, optionally with :port (IPv6 in brackets)" $i $h) }}
{{- end }}
{{- if and (eq $pg.sslmode "disable") (not (regexMatch "^(localhost|127\\.[0-9.]+|\\[::1\\])(:[0-9]+)?$" $h)) }}
{{- fail (printf "store.postgres.sslmode=disable with the remote host %q: the vault refuses a remote database without TLS (sslmode=require)" $h) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The HPA's minimum: autoscaling.minReplicas, or the replica count. */}}
{{- define "tokenvault.hpaMinReplicas" -}}
{{- if include "tokenvault.set" .Values.autoscaling.minReplicas }}{{ int .Values.autoscaling.minReplicas }}
{{- else }}{{ include "tokenvault.replicas" . }}
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
{{- if include "tokenvault.pgFiles" . }}
- name: db-password
  mountPath: {{ include "tokenvault.paths.dbDir" . }}
  readOnly: true
{{- if .Values.store.postgres.caSecret.name }}
- name: db-ca
  mountPath: {{ include "tokenvault.paths.dbCADir" . }}
  readOnly: true
{{- end }}
{{- end }}
{{- if include "tokenvault.postgres" . }}
- name: redis-url
  mountPath: {{ include "tokenvault.paths.redisDir" . }}
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
{{- if include "tokenvault.postgres" . }}
# postgres mode: the database holds everything; the data directory keeps nothing durable.
- name: data
  emptyDir:
    sizeLimit: 64Mi
{{- else }}
- name: data
  persistentVolumeClaim:
    claimName: {{ include "tokenvault.claimName" . }}
{{- end }}
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
{{- if include "tokenvault.pgFiles" . }}
- name: db-password
  secret:
    secretName: {{ .Values.store.postgres.passwordSecret.name }}
    defaultMode: 0440
    items:
      - key: {{ .Values.store.postgres.passwordSecret.key }}
        path: password
{{- if .Values.store.postgres.caSecret.name }}
- name: db-ca
  secret:
    secretName: {{ .Values.store.postgres.caSecret.name }}
    defaultMode: 0440
    items:
      - key: {{ .Values.store.postgres.caSecret.key }}
        path: ca.crt
{{- end }}
{{- end }}
{{- if include "tokenvault.postgres" . }}
- name: redis-url
  secret:
    secretName: {{ .Values.store.redis.urlSecret.name }}
    defaultMode: 0440
    items:
      - key: {{ .Values.store.redis.urlSecret.key }}
        path: url
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

{{/*
The vault pod (template of the StatefulSet in sled mode, of the Deployment in postgres mode).
*/}}
{{- define "tokenvault.vaultPod" -}}
{{- $probe := include "tokenvault.probeKind" . -}}
metadata:
  # No chart or app version here: a chart upgrade that changes nothing in the pod must
  # not restart (and so reseal) the vault.
  labels:
    {{- include "tokenvault.vaultSelectorLabels" . | nindent 4 }}
    app.kubernetes.io/part-of: tokenvault
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    # A config change restarts the vault (it reads its config once, at start).
    checksum/config: {{ include "tokenvault.configToml" . | sha256sum }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "tokenvault.serviceAccountName" . }}
  automountServiceAccountToken: false
  # No TOKENVAULT_* service-link variables: the vault reads TOKENVAULT_* overrides.
  enableServiceLinks: false
  terminationGracePeriodSeconds: {{ int .Values.terminationGracePeriodSeconds }}
  securityContext:
    {{- include "tokenvault.podSecurityContext" . | nindent 4 }}
  {{- with include "tokenvault.podScheduling" . | trim }}{{ . | nindent 2 }}{{- end }}
  {{- with include "tokenvault.topologySpread" . | trim }}{{ . | nindent 2 }}{{- end }}
  containers:
    - name: tokenvault
      image: {{ include "tokenvault.imageRef" (dict "image" .Values.image "root" .) | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      command:
        {{- toYaml .Values.image.command | nindent 8 }}
      args: ["serve", "--config", {{ include "tokenvault.paths.configFile" . | quote }}]
      env:
        {{- include "tokenvault.env" . | nindent 8 }}
      ports:
        # The one listener: API, /healthz, /readyz and /metrics.
        - name: api
          containerPort: {{ int .Values.service.targetPort }}
          protocol: TCP
      {{- if eq $probe "tcp" }}
      # Mutual TLS is required for every connection, and kubelet presents no client
      # certificate: the probes can only check that the port accepts connections.
      startupProbe:
        tcpSocket:
          port: api
        {{- toYaml .Values.probes.startup | nindent 8 }}
      livenessProbe:
        tcpSocket:
          port: api
        {{- toYaml .Values.probes.liveness | nindent 8 }}
      readinessProbe:
        tcpSocket:
          port: api
        {{- toYaml .Values.probes.readiness | nindent 8 }}
      {{- else }}
      startupProbe:
        httpGet:
          path: /healthz
          port: api
          scheme: {{ $probe }}
        {{- toYaml .Values.probes.startup | nindent 8 }}
      # /healthz answers 200 while the process serves, sealed or not: a sealed vault is
      # alive and must not be restarted (a restart would discard the shares received).
      livenessProbe:
        httpGet:
          path: /healthz
          port: api
          scheme: {{ $probe }}
        {{- toYaml .Values.probes.liveness | nindent 8 }}
      # /readyz answers 503 while the vault is sealed or its store or keys are unusable
      # (PostgreSQL: while the database is unreachable).
      readinessProbe:
        httpGet:
          path: /readyz
          port: api
          scheme: {{ $probe }}
        {{- toYaml .Values.probes.readiness | nindent 8 }}
      {{- end }}
      resources:
        {{- toYaml .Values.resources | nindent 8 }}
      securityContext:
        {{- include "tokenvault.containerSecurityContext" . | nindent 8 }}
      volumeMounts:
        {{- include "tokenvault.volumeMounts" . | nindent 8 }}
  volumes:
    {{- include "tokenvault.volumes" . | nindent 4 }}
{{- end }}

{{/*
postgres mode: spread the replicas over nodes and zones (the sled pod is alone).
*/}}
{{- define "tokenvault.topologySpread" -}}
{{- $ts := .Values.topologySpread }}
{{- if and (include "tokenvault.postgres" .) $ts.enabled }}
topologySpreadConstraints:
  - maxSkew: {{ int $ts.maxSkew }}
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: {{ $ts.nodes }}
    labelSelector:
      matchLabels:
        {{- include "tokenvault.vaultSelectorLabels" . | nindent 8 }}
  {{- if $ts.zones }}
  - maxSkew: {{ int $ts.maxSkew }}
    topologyKey: topology.kubernetes.io/zone
    whenUnsatisfiable: {{ $ts.zones }}
    labelSelector:
      matchLabels:
        {{- include "tokenvault.vaultSelectorLabels" . | nindent 8 }}
  {{- end }}
{{- end }}
{{- end }}
