//! tokenvault: a card tokenization vault.
//!
//! A masking/IVR edge submits a PAN and gets back a format-preserving token; CRM
//! systems read token metadata; only the PSP connector may detokenize. The PAN
//! exists in one place: encrypted inside the vault.
//!
//! How a request flows (imports point down):
//!
//! ```text
//! cli ─► startup (hardening, tls) ─► api (middleware: request id, access log, metrics, audit flush)
//!          ├─ auth      JWT → Principal; scope ∧ client registry ∧ tenant ∧ certificate pin
//!          ├─ limits    per-client rate limits, detokenize anomaly guard
//!          ├─ extract   bounded JSON into zeroizing buffers
//!          ├─ audit     hash-chained, MACed trail, durable before the response
//!          └─ handlers ─► service::Vault (tokens, charges, key administration, CVVs in memory)
//!                          ├─ psp      Psp trait; Adyen-style adapter (allow-listed hosts); mock PSP
//!                          ├─ keys     envelope (DEK per record, KEK versions, fingerprints), keystore,
//!                          │   │       KeyManager (sealed/unsealed), root of trust: Shamir shares or PKCS#11
//!                          │   └─ crypto   AES-256-GCM, HKDF, HMAC (RustCrypto)
//!                          └─ store    Store trait; sled backend with group commit and its anchor
//!                                        └─ domain  Pan, Cvv, Expiry, Token, TenantId (no I/O)
//! ```
//!
//! Layers, lowest first (a module uses only lower layers; `tests/api/layering.rs`
//! fails the build on an upward import): `domain` `crypto` `limits` `metrics` <
//! `keys` < `store` < `audit` < `psp` < `config` < `telemetry` `tls` < `service` <
//! `dev` < `auth` `hardening` < `api` < `startup` < `cli`. `store` never sees a
//! `Pan`, only sealed envelopes; `domain` and `crypto` do no I/O; `keys` and `psp`
//! own their settings types (config carries them). `api` never touches raw keys; it
//! still names the store's charge records and errors (service views to come).

#![forbid(unsafe_code)]

pub mod api;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod dev;
pub mod domain;
pub mod hardening;
pub mod keys;
pub mod limits;
pub mod metrics;
pub mod psp;
pub mod service;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod tls;
