//! What a client may do: the scopes a JWT carries and the client registry grants.

use serde::{Deserialize, Serialize};

/// A permission a JWT may carry and the registry may grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Scope {
    #[serde(rename = "tokens:create")]
    TokensCreate,
    #[serde(rename = "tokens:read")]
    TokensRead,
    #[serde(rename = "tokens:delete")]
    TokensDelete,
    #[serde(rename = "tokens:detokenize")]
    TokensDetokenize,
    #[serde(rename = "keys:admin")]
    KeysAdmin,
    #[serde(rename = "charges:create")]
    ChargesCreate,
    #[serde(rename = "charges:read")]
    ChargesRead,
    /// Tokenize answers with the tenant's existing token for a known card (dedupe)
    /// and shows fingerprints. A separate grant: with it, a credential plus a token
    /// is a PAN oracle (bounded by the enumeration guard), so ordinary edges lack it.
    #[serde(rename = "tokens:dedupe")]
    TokensDedupe,
    /// Read (verify, export) the audit trail: the SIEM's grant, apart from key custody.
    #[serde(rename = "audit:read")]
    AuditRead,
    /// Capture a manual authorisation (all or part).
    #[serde(rename = "charges:capture")]
    ChargesCapture,
    /// Refund a captured charge. A separate grant: refunds are an insider's
    /// favourite fraud, so a production registry must give it explicitly.
    #[serde(rename = "charges:refund")]
    ChargesRefund,
    /// Cancel (void) an authorisation that is not captured.
    #[serde(rename = "charges:cancel")]
    ChargesCancel,
    /// Record a reissued card's new expiry (and name) under its token.
    #[serde(rename = "tokens:update")]
    TokensUpdate,
    /// Take an online backup of the store and keystore (every record, sealed).
    #[serde(rename = "vault:backup")]
    VaultBackup,
}

impl Scope {
    pub const ALL: [Scope; 14] = [
        Scope::TokensCreate,
        Scope::TokensRead,
        Scope::TokensDelete,
        Scope::TokensDetokenize,
        Scope::KeysAdmin,
        Scope::ChargesCreate,
        Scope::ChargesRead,
        Scope::TokensDedupe,
        Scope::AuditRead,
        Scope::ChargesCapture,
        Scope::ChargesRefund,
        Scope::ChargesCancel,
        Scope::TokensUpdate,
        Scope::VaultBackup,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::TokensCreate => "tokens:create",
            Scope::TokensRead => "tokens:read",
            Scope::TokensDelete => "tokens:delete",
            Scope::TokensDetokenize => "tokens:detokenize",
            Scope::KeysAdmin => "keys:admin",
            Scope::ChargesCreate => "charges:create",
            Scope::ChargesRead => "charges:read",
            Scope::TokensDedupe => "tokens:dedupe",
            Scope::AuditRead => "audit:read",
            Scope::ChargesCapture => "charges:capture",
            Scope::ChargesRefund => "charges:refund",
            Scope::ChargesCancel => "charges:cancel",
            Scope::TokensUpdate => "tokens:update",
            Scope::VaultBackup => "vault:backup",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|sc| sc.as_str() == s)
    }

    /// This scope's bit in a [`crate::auth::Principal`]'s grant set.
    pub fn bit(self) -> u32 {
        1 << (self as u32)
    }
}
