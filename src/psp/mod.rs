//! The outbound PSP connector: a [`Psp`] trait, the Adyen-style Checkout adapter
//! ([`adyen`]) and a local simulator ([`mock`]). Card data leaves the vault only
//! through here, and only to an allow-listed host.

pub mod adyen;
pub mod mock;

use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

use crate::domain::card::{CardPayload, Cvv};

/// The API key the dev vault (`serve --psp-url`) and `tokenvault-mock-psp` share by
/// default. Dev only: production reads `psp.api_key_file`.
pub const DEV_API_KEY: &str = "tokenvault-dev-mock-psp-key";

/// How the shopper took part (card-scheme rules differ for CIT and MIT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShopperInteraction {
    /// Customer-initiated, online.
    Ecommerce,
    /// Customer-initiated, mail/telephone order (the call center).
    Moto,
    /// Merchant-initiated (continuous authority: recurring billing).
    ContAuth,
}

impl ShopperInteraction {
    pub fn is_customer_initiated(self) -> bool {
        !matches!(self, ShopperInteraction::ContAuth)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecurringModel {
    Subscription,
    Unscheduled,
    CardOnFile,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sequence {
    First,
    Subsequent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recurring {
    pub model: RecurringModel,
    pub sequence: Sequence,
}

/// An amount in minor units of an ISO 4217 currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Amount {
    #[serde(deserialize_with = "crate::domain::json::integral")]
    pub value: u64,
    pub currency: String,
}

/// One authorisation to send.
pub struct PspRequest<'a> {
    pub card: &'a CardPayload,
    pub cvv: Option<&'a Cvv>,
    pub amount: &'a Amount,
    pub reference: &'a str,
    pub interaction: ShopperInteraction,
    pub recurring: Option<Recurring>,
    pub network_tx_reference: Option<&'a str>,
    /// Sent as the PSP's idempotency key: a retry can never charge twice.
    pub idempotency_key: &'a str,
    /// Authorise only: the funds are captured later by a capture call (or released
    /// by a cancel). Otherwise the PSP captures at once.
    pub manual_capture: bool,
}

/// A change to an authorised payment, made on its PSP reference (never the card).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModificationKind {
    Capture,
    Refund,
    Cancel,
}

impl ModificationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ModificationKind::Capture => "capture",
            ModificationKind::Refund => "refund",
            ModificationKind::Cancel => "cancel",
        }
    }
}

/// One modification to send.
pub struct ModificationRequest<'a> {
    pub kind: ModificationKind,
    /// The PSP reference of the authorisation it changes.
    pub payment_psp_reference: &'a str,
    /// Captures and refunds: how much (a cancel releases the whole authorisation).
    pub amount: Option<&'a Amount>,
    pub reference: &'a str,
    pub idempotency_key: &'a str,
}

/// The PSP's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PspStatus {
    Authorised,
    Refused,
    Error,
    /// A modification acknowledged (Adyen's `received`): accepted for processing,
    /// not yet confirmed by the PSP's notification.
    Received,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PspOutcome {
    pub status: PspStatus,
    pub psp_reference: Option<String>,
    pub refusal_reason: Option<String>,
    pub network_tx_reference: Option<String>,
}

/// Why no verdict came back. Never carries card data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PspError {
    #[error("the PSP did not answer in time")]
    Timeout,
    #[error("the PSP answered HTTP {0}")]
    Unavailable(u16),
    #[error("the PSP rejected the request (HTTP {0})")]
    Rejected(u16),
    #[error("could not connect to the PSP")]
    Connect,
    #[error("the PSP's answer was not understood")]
    Protocol,
    #[error("refusing to send card data to a host that is not allow-listed")]
    NotAllowed,
}

impl PspError {
    /// The PSP may have processed the request (it was sent and no verdict came
    /// back): only a resend under the same idempotency key tells.
    pub fn outcome_unknown(&self) -> bool {
        matches!(self, PspError::Timeout | PspError::Unavailable(_) | PspError::Protocol)
    }

    /// A fixed label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            PspError::Timeout => "timeout",
            PspError::Unavailable(_) => "5xx",
            PspError::Rejected(_) => "4xx",
            PspError::Connect => "connect",
            PspError::Protocol => "protocol",
            PspError::NotAllowed => "not_allowed",
        }
    }
}

/// The result of one authorisation, with every attempt that failed on the way
/// (a timeout recovered by the safe retry is still a timeout to count).
#[derive(Debug)]
pub struct PspCall {
    pub result: Result<PspOutcome, PspError>,
    pub failed_attempts: Vec<PspError>,
}

pub type PspFuture<'a> = Pin<Box<dyn Future<Output = PspCall> + Send + 'a>>;

/// A payment service provider the vault forwards cards to.
pub trait Psp: Send + Sync {
    fn authorise<'a>(&'a self, request: PspRequest<'a>) -> PspFuture<'a>;
    /// A capture, refund or cancel. `Ok` with [`PspStatus::Received`] when the PSP
    /// acknowledged it, [`PspStatus::Refused`] (with the PSP's reason) when it
    /// refused it as a business rule (HTTP 422): nothing changed at the PSP.
    fn modify<'a>(&'a self, request: ModificationRequest<'a>) -> PspFuture<'a>;
}

/// Why the PSP connector cannot be set up (the cause is kept as the error's source).
#[derive(Debug, thiserror::Error)]
pub enum PspSetupError {
    #[error("base_url is not a URL")]
    NotAUrl,
    #[error("base_url must be http(s)")]
    Scheme,
    #[error("base_url has no host")]
    NoHost,
    #[error("host {0} is not in allowed_hosts")]
    HostNotAllowed(String),
    #[error("cannot read psp.api_key_file {}", .0.display())]
    ApiKey(std::path::PathBuf, #[source] std::io::Error),
    #[error("cannot build the PSP client")]
    Client(#[source] reqwest::Error),
}

/// Checks that `base_url` is http(s) and its host is on the allow-list.
pub fn check_allowed(base_url: &str, allowed_hosts: &[String]) -> Result<String, PspSetupError> {
    let url = reqwest::Url::parse(base_url).map_err(|_| PspSetupError::NotAUrl)?;
    if !matches!(url.scheme(), "https" | "http") {
        return Err(PspSetupError::Scheme);
    }
    let host = url.host_str().ok_or(PspSetupError::NoHost)?.to_ascii_lowercase();
    if !allowed_hosts.iter().any(|h| h.eq_ignore_ascii_case(&host)) {
        return Err(PspSetupError::HostNotAllowed(host));
    }
    Ok(host)
}

/// The outbound PSP connector (Adyen-style Checkout API).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PspSettings {
    /// e.g. https://checkout-test.adyen.com/v71 (the connector POSTs to {base_url}/payments).
    pub base_url: String,
    /// File holding the PSP API key (a mounted secret).
    pub api_key_file: std::path::PathBuf,
    pub merchant_account: String,
    /// The only hosts card data may be sent to; base_url's host must be one of them.
    pub allowed_hosts: Vec<String>,
    #[serde(default = "default_connect_ms")]
    pub connect_timeout_ms: u64,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Dev only: the API key itself (the mock PSP's default).
    #[serde(skip)]
    pub dev_api_key: Option<String>,
}

fn default_connect_ms() -> u64 {
    2_000
}

fn default_timeout_ms() -> u64 {
    10_000
}
