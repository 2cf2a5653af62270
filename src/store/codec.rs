//! The encoding of a token record, shared by every backend (sled stores it as a
//! value, PostgreSQL in a `BYTEA` column beside the columns it is indexed by):
//! a version byte, then the postcard encoding of [`RecordV1`]. Compact on purpose
//! (disk per token).

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::{ChargeRecord, StoreError, StoredRecord};
use crate::domain::card::Brand;
use crate::domain::tenant::TenantId;
use crate::domain::token::{Token, TokenFormat};
use crate::keys::SealedCard;

const RECORD_V1: u8 = 1;
/// A record with an expiry (V1's fields, then `expires_at`); records without one
/// keep the V1 encoding byte for byte.
const RECORD_V2: u8 = 2;

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

#[derive(Serialize, Deserialize)]
struct RecordV2 {
    v1: RecordV1,
    expires_at: i64,
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
    let mut out;
    match r.expires_at {
        None => {
            out = vec![RECORD_V1];
            out.extend(postcard::to_stdvec(&v).map_err(|_| StoreError::Corrupt)?);
        }
        Some(expires_at) => {
            out = vec![RECORD_V2];
            out.extend(postcard::to_stdvec(&RecordV2 { v1: v, expires_at }).map_err(|_| StoreError::Corrupt)?);
        }
    }
    Ok(out)
}

pub(super) fn decode(token: &Token, bytes: &[u8]) -> Result<StoredRecord, StoreError> {
    let (&version, body) = bytes.split_first().ok_or(StoreError::Corrupt)?;
    let (v, expires_at) = match version {
        RECORD_V1 => (
            postcard::from_bytes::<RecordV1>(body).map_err(|_| StoreError::Corrupt)?,
            None,
        ),
        RECORD_V2 => {
            let v: RecordV2 = postcard::from_bytes(body).map_err(|_| StoreError::Corrupt)?;
            (v.v1, Some(v.expires_at))
        }
        _ => return Err(StoreError::Corrupt),
    };
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
        expires_at,
    })
}

/// A charge as written before captures, refunds and cancels existed (postcard is
/// positional: those records end after `created_at`).
#[derive(Deserialize)]
struct ChargeV0 {
    id: String,
    tenant: String,
    client: String,
    token: String,
    amount_value: u64,
    currency: String,
    reference: String,
    shopper_interaction: String,
    recurring: Option<(String, String)>,
    status: String,
    psp_reference: Option<String>,
    refusal_reason: Option<String>,
    network_transaction_id: Option<String>,
    cvv_sent: bool,
    created_at: i64,
}

/// Encodes a charge (every backend stores these bytes).
pub(super) fn encode_charge(c: &ChargeRecord) -> Result<Vec<u8>, StoreError> {
    postcard::to_stdvec(c).map_err(|_| StoreError::Corrupt)
}

/// What a [`super::Change::Read`] makes of the bytes stored under `token`: the
/// record when it is `tenant`'s and live at `at`, else the unit's outcome
/// (`Read(None)`, or `Unreadable` when the bytes do not decode). Both backends
/// answer the same way.
pub(super) fn read_live(
    token: &Token,
    bytes: &[u8],
    tenant: &TenantId,
    at: i64,
) -> Result<StoredRecord, super::Applied> {
    let record = decode(token, bytes).map_err(|_| super::Applied::Unreadable)?;
    if record.tenant != *tenant || record.expired_at(at) {
        return Err(super::Applied::Read(None));
    }
    Ok(record)
}

/// Decodes a charge, including one written before modifications existed (it
/// reads as an automatic-capture charge with none).
pub(super) fn decode_charge(bytes: &[u8]) -> Result<ChargeRecord, StoreError> {
    if let Ok(c) = postcard::from_bytes::<ChargeRecord>(bytes) {
        return Ok(c);
    }
    let v: ChargeV0 = postcard::from_bytes(bytes).map_err(|_| StoreError::Corrupt)?;
    Ok(ChargeRecord {
        id: v.id,
        tenant: v.tenant,
        client: v.client,
        token: v.token,
        amount_value: v.amount_value,
        currency: v.currency,
        reference: v.reference,
        shopper_interaction: v.shopper_interaction,
        recurring: v.recurring,
        status: v.status,
        psp_reference: v.psp_reference,
        refusal_reason: v.refusal_reason,
        network_transaction_id: v.network_transaction_id,
        cvv_sent: v.cvv_sent,
        created_at: v.created_at,
        capture: "automatic".into(),
        modifications: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A charge stored by an older vault (no capture mode, no modifications)
    /// still reads, as an automatic-capture charge.
    #[test]
    fn charges_written_before_modifications_still_decode() {
        #[derive(serde::Serialize)]
        struct Old<'a> {
            id: &'a str,
            tenant: &'a str,
            client: &'a str,
            token: &'a str,
            amount_value: u64,
            currency: &'a str,
            reference: &'a str,
            shopper_interaction: &'a str,
            recurring: Option<(String, String)>,
            status: &'a str,
            psp_reference: Option<&'a str>,
            refusal_reason: Option<&'a str>,
            network_transaction_id: Option<&'a str>,
            cvv_sent: bool,
            created_at: i64,
        }
        let old = postcard::to_stdvec(&Old {
            id: "ch_1",
            tenant: "t",
            client: "psp",
            token: "4111110000001112",
            amount_value: 1234,
            currency: "EUR",
            reference: "order-1",
            shopper_interaction: "moto",
            recurring: None,
            status: "authorised",
            psp_reference: Some("PSP1"),
            refusal_reason: None,
            network_transaction_id: None,
            cvv_sent: true,
            created_at: 7,
        })
        .unwrap();
        let c = decode_charge(&old).unwrap();
        assert_eq!(
            (c.id.as_str(), c.amount_value, c.status.as_str()),
            ("ch_1", 1234, "authorised")
        );
        assert_eq!(c.capture, "automatic");
        assert!(c.modifications.is_empty());
        // And a current one round-trips.
        let mut now = c.clone();
        now.capture = "manual".into();
        assert_eq!(decode_charge(&encode_charge(&now).unwrap()).unwrap(), now);
        assert!(
            decode_charge(&old[..old.len() - 3]).is_err(),
            "a truncated charge is corrupt"
        );
    }
}
