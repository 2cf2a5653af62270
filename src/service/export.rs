//! The exit: a tenant's cards (token, PAN, expiry, name) encrypted to a new PSP's
//! or vault's OpenPGP key, under dual control. One officer requests the export
//! (tenant, recipient key); a second approves it; it is fetched once. The
//! requests live in the keystore (under its MAC, shared by replicas); the file is
//! built in zeroizing memory, encrypted (OpenPGP SEIPD v1, AES-256, the `pgp`
//! crate) and handed to the caller: the plaintext never touches disk or a log.

use std::io::Read;

use pgp::composed::{Deserializable, MessageBuilder, SignedPublicKey, SignedPublicSubKey};
use pgp::crypto::sym::SymmetricKeyAlgorithm;
use pgp::types::KeyDetails;
use serde::Serialize;
use time::OffsetDateTime;
use zeroize::Zeroizing;

use super::{Vault, VaultError};
use crate::domain::tenant::TenantId;
use crate::keys::keystore::{ExportRequest, KeystoreError};

/// How long an export request stays open (requested → approved → fetched).
const EXPORT_WINDOW: time::Duration = time::Duration::hours(24);
/// The longest recipient key accepted (ASCII armor).
pub const MAX_RECIPIENT_KEY: usize = 12 * 1024;
/// Records read per store call while building the file.
const PAGE: usize = 500;

/// An export request as officers see it (never the key material's secrets: there are none).
#[derive(Debug, Clone, Serialize)]
pub struct ExportView {
    pub id: String,
    pub tenant: String,
    pub fingerprint: String,
    pub requested_by: String,
    #[serde(with = "time::serde::rfc3339")]
    pub requested_at: OffsetDateTime,
    pub approved_by: Option<String>,
    /// `requested`, `approved` or `fetched`.
    pub status: &'static str,
}

impl From<&ExportRequest> for ExportView {
    fn from(r: &ExportRequest) -> Self {
        ExportView {
            id: r.id.clone(),
            tenant: r.tenant.clone(),
            fingerprint: r.fingerprint.clone(),
            requested_by: r.requested_by.clone(),
            requested_at: r.at,
            approved_by: r.approved_by.clone(),
            status: match (&r.approved_by, r.fetched) {
                (_, true) => "fetched",
                (Some(_), false) => "approved",
                (None, false) => "requested",
            },
        }
    }
}

/// The encrypted file of a fetched export.
pub struct ExportFile {
    pub request: ExportRequest,
    pub cards: u64,
    /// A binary OpenPGP message.
    pub ciphertext: Vec<u8>,
}

/// A recipient's certificate and the (sub)key the file is encrypted to.
struct Recipient {
    cert: SignedPublicKey,
    fingerprint: String,
}

impl Recipient {
    /// Parses an armored (or binary) public key whose bindings verify and that has
    /// a subkey for encryption.
    fn parse(armored: &str) -> Result<Recipient, RecipientError> {
        if armored.len() > MAX_RECIPIENT_KEY {
            return Err(RecipientError::TooLarge);
        }
        let (cert, _) =
            SignedPublicKey::from_reader_single(armored.as_bytes()).map_err(|_| RecipientError::NotAPublicKey)?;
        cert.verify_bindings().map_err(|_| RecipientError::Bindings)?;
        let recipient = Recipient {
            fingerprint: format!("{:X}", cert.fingerprint()),
            cert,
        };
        recipient.encryption_subkey()?;
        Ok(recipient)
    }

    /// The first subkey flagged (and able) to encrypt.
    fn encryption_subkey(&self) -> Result<&SignedPublicSubKey, RecipientError> {
        self.cert
            .public_subkeys
            .iter()
            .find(|k| {
                k.algorithm().can_encrypt()
                    && k.signatures.iter().any(|s| {
                        let f = s.key_flags();
                        f.encrypt_comms() || f.encrypt_storage()
                    })
            })
            .ok_or(RecipientError::NoEncryptionSubkey)
    }

    /// Encrypts what `plaintext` reads to this recipient (SEIPD v1, AES-256).
    fn encrypt(&self, plaintext: impl Read) -> Result<Vec<u8>, RecipientError> {
        let subkey = self.encryption_subkey()?;
        let mut rng = rand::rngs::OsRng;
        let mut builder =
            MessageBuilder::from_reader("cards.csv", plaintext).seipd_v1(&mut rng, SymmetricKeyAlgorithm::AES256);
        builder
            .encrypt_to_key(&mut rng, subkey)
            .map_err(|_| RecipientError::Encrypt)?;
        builder.to_vec(rng).map_err(|_| RecipientError::Encrypt)
    }
}

/// Why a recipient key is refused, or an export cannot be encrypted to it. (The OpenPGP
/// library's own errors are not kept: they may quote the key material they choke on.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecipientError {
    #[error("the recipient key is larger than 12 KiB")]
    TooLarge,
    #[error("the recipient key is not an OpenPGP public key")]
    NotAPublicKey,
    #[error("the recipient key's self-signatures do not verify")]
    Bindings,
    #[error("the recipient key has no subkey for encryption")]
    NoEncryptionSubkey,
    #[error("cannot encrypt the export to the recipient key")]
    Encrypt,
}

/// Reads a sequence of zeroizing chunks as one stream (no copy of the whole).
struct Chunks<'a> {
    chunks: &'a [Zeroizing<Vec<u8>>],
    at: usize,
    pos: usize,
}

impl Read for Chunks<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while let Some(chunk) = self.chunks.get(self.at) {
            if self.pos < chunk.len() {
                let n = buf.len().min(chunk.len() - self.pos);
                buf[..n].copy_from_slice(&chunk[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            self.at += 1;
            self.pos = 0;
        }
        Ok(0)
    }
}

/// Checks a recipient key as an export request would: its fingerprint, or why
/// it is refused (not a public key, bindings that do not verify, no encryption subkey).
pub fn check_recipient_key(armored: &str) -> Result<String, RecipientError> {
    Recipient::parse(armored).map(|r| r.fingerprint)
}

/// Keystore refusals of an export step, as the API reports them.
fn refused(e: KeystoreError) -> VaultError {
    match e {
        KeystoreError::Refused(why) if why.starts_with("no open export") => VaultError::NotFound,
        KeystoreError::Refused(why) => VaultError::KeyRefused(why),
        other => VaultError::Keystore(other),
    }
}

impl Vault {
    /// Officer 1: asks for `tenant`'s cards to be exported to `recipient_key`.
    pub async fn request_export(
        &self,
        officer: &str,
        tenant: TenantId,
        recipient_key: String,
    ) -> Result<ExportView, VaultError> {
        let recipient = Recipient::parse(&recipient_key).map_err(|e| VaultError::KeyRefused(e.to_string()))?;
        let request = ExportRequest {
            id: format!("exp_{}", hex::encode(rand::random::<[u8; 12]>())),
            tenant: tenant.to_string(),
            fingerprint: recipient.fingerprint,
            recipient_key,
            requested_by: officer.to_owned(),
            at: OffsetDateTime::now_utc(),
            approved_by: None,
            fetched: false,
        };
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let view = ExportView::from(&request);
            this.keys.update(
                |_| Ok::<(), VaultError>(()),
                |ks| ks.request_export(request, OffsetDateTime::now_utc(), EXPORT_WINDOW),
            )?;
            Ok(view)
        })
        .await
        .map_err(|_| VaultError::Task)?
    }

    /// Officer 2 (not the requester): approves an export.
    pub async fn approve_export(&self, officer: &str, id: &str) -> Result<ExportView, VaultError> {
        let (this, officer, id) = (self.clone(), officer.to_owned(), id.to_owned());
        tokio::task::spawn_blocking(move || {
            let mut out = None;
            this.keys.update(
                |_| Ok::<(), VaultError>(()),
                |ks| {
                    out = Some(ks.approve_export(&id, &officer, OffsetDateTime::now_utc(), EXPORT_WINDOW));
                    Ok(())
                },
            )?;
            out.ok_or(VaultError::Task)?
                .map(|r| ExportView::from(&r))
                .map_err(refused)
        })
        .await
        .map_err(|_| VaultError::Task)?
    }

    /// The open export requests.
    pub fn exports(&self) -> Vec<ExportView> {
        self.keys
            .export_requests(EXPORT_WINDOW)
            .iter()
            .map(ExportView::from)
            .collect()
    }

    /// Fetches an approved export, once: marked fetched durably first, then every
    /// live card of the tenant is opened into zeroizing memory as CSV
    /// (`token,pan,exp_month,exp_year,name`) and encrypted to the recipient.
    pub async fn fetch_export(&self, officer: &str, id: &str) -> Result<ExportFile, VaultError> {
        let (this, officer, id) = (self.clone(), officer.to_owned(), id.to_owned());
        tokio::task::spawn_blocking(move || {
            let mut taken = None;
            this.keys.update(
                |_| Ok::<(), VaultError>(()),
                |ks| {
                    taken = Some(ks.take_export(&id, &officer, OffsetDateTime::now_utc(), EXPORT_WINDOW));
                    Ok(())
                },
            )?;
            let request = taken.ok_or(VaultError::Task)?.map_err(refused)?;
            let recipient =
                Recipient::parse(&request.recipient_key).map_err(|e| VaultError::KeyRefused(e.to_string()))?;
            let tenant = TenantId::parse(&request.tenant).ok_or(VaultError::Integrity)?;
            let ring = this.keys.ring().ok_or(VaultError::Sealed)?;
            let now = OffsetDateTime::now_utc().unix_timestamp();
            let mut chunks = vec![Zeroizing::new(b"token,pan,exp_month,exp_year,name\n".to_vec())];
            let (mut after, mut cards) = (None, 0u64);
            loop {
                let page = this.store.tenant_records(&tenant, after.as_ref(), PAGE, None)?;
                let Some((last, _)) = page.last() else { break };
                after = Some(last.token.clone());
                // Sized for the page up front: the buffer never reallocates (a
                // reallocation would free an unzeroized copy).
                // A line is at most ≈ 350 bytes (64-byte token, 19 digits, a 128-character
                // name with every character a doubled quote).
                let mut chunk = Zeroizing::new(Vec::with_capacity(page.len() * 512));
                for (record, _) in &page {
                    if record.expired_at(now) {
                        continue;
                    }
                    let card = ring.open(&tenant, &record.token, &record.metadata_binding(), &record.sealed)?;
                    let name = card.name.as_ref().map(|n| n.expose()).unwrap_or("");
                    // Written straight into the zeroizing chunk: no intermediate string
                    // (whose growth would free unzeroized copies of the card).
                    chunk.extend_from_slice(record.token.as_str().as_bytes());
                    chunk.push(b',');
                    chunk.extend_from_slice(card.pan.expose_digits().as_bytes());
                    chunk.extend_from_slice(format!(",{},{},", card.expiry.month(), card.expiry.year()).as_bytes());
                    csv_field(&mut chunk, name);
                    chunk.push(b'\n');
                    cards += 1;
                }
                chunks.push(chunk);
                if page.len() < PAGE {
                    break;
                }
            }
            let ciphertext = recipient
                .encrypt(Chunks {
                    chunks: &chunks,
                    at: 0,
                    pos: 0,
                })
                .map_err(|e| VaultError::KeyRefused(e.to_string()))?;
            Ok(ExportFile {
                request,
                cards,
                ciphertext,
            })
        })
        .await
        .map_err(|_| VaultError::Task)?
    }
}

/// Appends a CSV field: quoted when it holds a comma, a quote or a line break.
fn csv_field(out: &mut Vec<u8>, s: &str) {
    if !s.contains([',', '"', '\n', '\r']) {
        out.extend_from_slice(s.as_bytes());
        return;
    }
    out.push(b'"');
    for b in s.bytes() {
        if b == b'"' {
            out.push(b'"');
        }
        out.push(b);
    }
    out.push(b'"');
}
