//! The encoding of a token record, shared by every backend (sled stores it as a
//! value, PostgreSQL in a `BYTEA` column beside the columns it is indexed by):
//! a version byte, then the postcard encoding of [`RecordV1`]. Compact on purpose
//! (disk per token).

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::{StoreError, StoredRecord};
use crate::domain::card::Brand;
use crate::domain::tenant::TenantId;
use crate::domain::token::{Token, TokenFormat};
use crate::keys::SealedCard;

const RECORD_V1: u8 = 1;

#[derive(Serialize, Deserialize)]
struct RecordV1 {
    tenant: String,
    format: u8,
    brand: u8,
    bin: String,
    last4: String,
    fingerprint: [u8; 32],
    created_at: i64,
    key_version: u32,
    wrapped_dek: Vec<u8>,
    ciphertext: Vec<u8>,
    network_tx_id: Option<String>,
}

pub(super) fn encode(r: &StoredRecord) -> Result<Vec<u8>, StoreError> {
    let v = RecordV1 {
        tenant: r.tenant.as_str().to_owned(),
        format: r.format.to_u8(),
        brand: r.brand.to_u8(),
        bin: r.bin.clone(),
        last4: r.last4.clone(),
        fingerprint: r.fingerprint,
        created_at: r.created_at.unix_timestamp(),
        key_version: r.sealed.key_version,
        wrapped_dek: r.sealed.wrapped_dek.clone(),
        ciphertext: r.sealed.ciphertext.clone(),
        network_tx_id: r.network_tx_id.clone(),
    };
    let mut out = vec![RECORD_V1];
    out.extend(postcard::to_stdvec(&v).map_err(|_| StoreError::Corrupt)?);
    Ok(out)
}

pub(super) fn decode(token: &Token, bytes: &[u8]) -> Result<StoredRecord, StoreError> {
    let (&version, body) = bytes.split_first().ok_or(StoreError::Corrupt)?;
    if version != RECORD_V1 {
        return Err(StoreError::Corrupt);
    }
    let v: RecordV1 = postcard::from_bytes(body).map_err(|_| StoreError::Corrupt)?;
    Ok(StoredRecord {
        tenant: TenantId::parse(&v.tenant).ok_or(StoreError::Corrupt)?,
        token: token.clone(),
        format: TokenFormat::from_u8(v.format).ok_or(StoreError::Corrupt)?,
        brand: Brand::from_u8(v.brand).ok_or(StoreError::Corrupt)?,
        bin: v.bin,
        last4: v.last4,
        fingerprint: v.fingerprint,
        created_at: OffsetDateTime::from_unix_timestamp(v.created_at).map_err(|_| StoreError::Corrupt)?,
        sealed: SealedCard {
            key_version: v.key_version,
            wrapped_dek: v.wrapped_dek,
            ciphertext: v.ciphertext,
        },
        network_tx_id: v.network_tx_id,
    })
}
