{{/* A flat map as a TOML inline table: {a = 1, b = "60s"} (the schema allows only known keys and scalars). */}}
{{- define "tokenvault.inlineTable" -}}
{ {{- $first := true }}{{ range $k, $v := . }}{{ if not $first }},{{ end }}{{ $first = false }} {{ $k }} = {{ $v | toJson }}{{ end }} }
{{- end }}

{{/*
The production config file (TOML), read by `tokenvault serve --config`. Every path in it
is one the chart mounts; everything else comes from .Values.config.
*/}}
{{- define "tokenvault.configToml" -}}
{{- $c := .Values.config -}}
# Rendered by the tokenvault Helm chart from its values; read by
# `tokenvault serve --config {{ include "tokenvault.paths.configFile" . }}`.
# Secrets are files mounted from Kubernetes Secrets, never inline.
listen = {{ printf "%s:%v" (ternary (printf "[%s]" (trimAll "[]" $c.listenHost)) $c.listenHost (contains ":" $c.listenHost)) (int .Values.service.targetPort) | toJson }}
data_dir = {{ include "tokenvault.paths.dataDir" . | toJson }}
log_format = {{ $c.logFormat | toJson }}
mlockall = {{ .Values.mlockall.enabled }}
{{- with $c.workers }}
workers = {{ int . }}
{{- end }}
{{- if include "tokenvault.set" $c.maxBodyBytes }}
max_body_bytes = {{ int $c.maxBodyBytes }}
{{- end }}
{{- if include "tokenvault.set" $c.cvvTtl }}
cvv_ttl = {{ $c.cvvTtl | toString | toJson }}
{{- end }}
{{- if include "tokenvault.set" $c.idempotencyWindow }}
idempotency_window = {{ $c.idempotencyWindow | toString | toJson }}
{{- end }}
{{- with $c.rateLimits }}
rate_limits = {{ include "tokenvault.inlineTable" . }}
{{- end }}
{{- with $c.anomalyGuard }}
anomaly_guard = {{ include "tokenvault.inlineTable" . }}
{{- end }}
{{- if include "tokenvault.postgres" . }}
# Replicas share CVVs in a memory-only Redis; its URL is a mounted secret file.
cvv_redis_file = {{ printf "%s/url" (include "tokenvault.paths.redisDir" .) | toJson }}
{{- end }}
{{- if not $c.clients }}
clients = []  # the vault refuses to start until config.clients lists at least one client
{{- end }}

[auth]
issuer = {{ $c.auth.issuer | toString | toJson }}
audience = {{ $c.auth.audience | toString | toJson }}
{{- if include "tokenvault.set" $c.auth.leewaySecs }}
leeway_secs = {{ int $c.auth.leewaySecs }}
{{- end }}
{{- if $c.auth.allowRs256 }}
allow_rs256 = true
{{- end }}
{{- if include "tokenvault.set" $c.auth.cacheCapacity }}
cache_capacity = {{ int $c.auth.cacheCapacity }}
{{- end }}
{{- if not $c.auth.keys }}
keys = []  # the vault refuses to start until config.auth.keys lists a JWT verification key
{{- end }}
{{- range $c.auth.keys }}

[[auth.keys]]
kid = {{ .kid | toJson }}
alg = {{ .alg | toJson }}
public_key_file = {{ printf "%s/%s.pem" (include "tokenvault.paths.jwtDir" $) .kid | toJson }}
{{- end }}
{{- range $c.clients }}

[[clients]]
sub = {{ .sub | toJson }}
scopes = {{ .scopes | toJson }}
tenants = {{ .tenants | toJson }}
{{- with .certSha256 }}
cert_sha256 = {{ lower . | toJson }}
{{- end }}
{{- if .globalAdmin }}
global_admin = true
{{- end }}
{{- end }}

[keystore]
{{- if include "tokenvault.postgres" . }}
# No path: with a PostgreSQL store the keystore is in the database (every replica shares it).
{{- else }}
path = {{ include "tokenvault.paths.keystore" . | toJson }}
{{- end }}
provider = {{ $c.keystore.provider | toJson }}
{{- if include "tokenvault.set" $c.keystore.cryptoperiod }}
cryptoperiod = {{ $c.keystore.cryptoperiod | toString | toJson }}
{{- end }}
{{- if eq $c.keystore.provider "pkcs11" }}

[keystore.pkcs11]
module = {{ $c.keystore.pkcs11.module | toJson }}
token_label = {{ $c.keystore.pkcs11.tokenLabel | toJson }}
pin_file = {{ printf "%s/pin" (include "tokenvault.paths.hsmDir" .) | toJson }}
{{- end }}

[tls]
mode = {{ $c.tls.mode | toJson }}
{{- if eq $c.tls.mode "native" }}
cert_file = {{ printf "%s/tls.crt" (include "tokenvault.paths.tlsDir" .) | toJson }}
key_file = {{ printf "%s/tls.key" (include "tokenvault.paths.tlsDir" .) | toJson }}
{{- if $c.tls.clientCA.secretName }}
client_ca_file = {{ printf "%s/ca.crt" (include "tokenvault.paths.clientCADir" .) | toJson }}
require_client_cert = {{ $c.tls.requireClientCert }}
{{- end }}
{{- end }}
{{- if $c.psp.enabled }}

[psp]
base_url = {{ $c.psp.baseUrl | toJson }}
api_key_file = {{ printf "%s/api-key" (include "tokenvault.paths.pspDir" .) | toJson }}
merchant_account = {{ $c.psp.merchantAccount | toJson }}
allowed_hosts = {{ $c.psp.allowedHosts | toJson }}
{{- if include "tokenvault.set" $c.psp.connectTimeoutMs }}
connect_timeout_ms = {{ int $c.psp.connectTimeoutMs }}
{{- end }}
{{- if include "tokenvault.set" $c.psp.timeoutMs }}
timeout_ms = {{ int $c.psp.timeoutMs }}
{{- end }}
{{- end }}
{{- $sledCache := and (not (include "tokenvault.postgres" .)) (include "tokenvault.set" .Values.store.sled.cacheMb) }}
{{- if or (include "tokenvault.pgFiles" .) $sledCache }}

[store]
{{- if $sledCache }}
cache_mb = {{ int .Values.store.sled.cacheMb }}
{{- end }}
{{- end }}
{{- if include "tokenvault.pgFiles" . }}
{{- $pg := .Values.store.postgres }}
{{- if include "tokenvault.postgres" . }}
url = {{ include "tokenvault.pgUrl" . | toJson | replace "\\u0026" "&" }}
{{- else }}
# sled stays the store (no url). Named for `tokenvault store copy --config` in the
# maintenance pod: the target's password and CA files.
{{- end }}
password_file = {{ printf "%s/password" (include "tokenvault.paths.dbDir" .) | toJson }}
{{- if $pg.caSecret.name }}
ca_file = {{ printf "%s/ca.crt" (include "tokenvault.paths.dbCADir" .) | toJson }}
{{- end }}
{{- if include "tokenvault.set" $pg.poolSize }}
pool_size = {{ int $pg.poolSize }}
{{- end }}
{{- if include "tokenvault.set" $pg.statementTimeout }}
statement_timeout = {{ $pg.statementTimeout | toString | toJson }}
{{- end }}
{{- end }}
{{- end }}
