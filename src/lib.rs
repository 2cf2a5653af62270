//! tokenvault: a card tokenization vault.
//!
//! A masking/IVR edge submits a PAN and gets back a format-preserving token; CRM
//! systems read token metadata; only the PSP connector may detokenize. The PAN
//! exists in one place: encrypted inside the vault.
//!
//! How a request flows (imports point down):
//!
//! ```text
//! cli ─► startup ─► api (middleware: request id, access log, metrics)
//!                    ├─ auth      JWT → Principal; scope ∧ client registry ∧ tenant
//!                    ├─ extract   bounded JSON into zeroizing buffers
//!                    └─ handlers ─► service::Vault
//!                                    ├─ keys     envelope: DEK per record, KEK versions, fingerprints
//!                                    │   └─ crypto   AES-256-GCM, HKDF, HMAC (RustCrypto)
//!                                    └─ store    Store trait; sled backend with group commit
//!                                                  └─ domain  Pan, Expiry, Token, TenantId (no I/O)
//! ```
//!
//! `api` never touches `store` or raw keys; `store` never sees a `Pan`, only
//! sealed envelopes; `domain` and `crypto` do no I/O.

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
