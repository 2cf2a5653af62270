//! Adapter for an Adyen-style Checkout `POST /payments` API.
//!
//! Safety rules for money movement: every request carries the PSP's
//! `Idempotency-Key`; a request that never left (connect error) may be retried;
//! a timeout or 5xx is retried once **with the same idempotency key**, so the PSP
//! de-duplicates it and the card is never charged twice; 4xx is never retried.
//! Card data goes only to an allow-listed host.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::PspSettings;
use super::{
    ModificationKind, ModificationRequest, PspCall, PspError, PspFuture, PspOutcome, PspRequest, PspSetupError,
    PspStatus, RecurringModel, ShopperInteraction, check_allowed,
};

/// The Checkout adapter.
pub struct AdyenPsp {
    client: reqwest::Client,
    endpoint: reqwest::Url,
    api_key: SecretString,
    merchant_account: String,
    allowed_hosts: Vec<String>,
}

impl std::fmt::Debug for AdyenPsp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AdyenPsp({}, [REDACTED])", self.endpoint)
    }
}

impl AdyenPsp {
    /// Builds the adapter; refuses a base URL whose host is not allow-listed.
    pub fn new(settings: &PspSettings) -> Result<AdyenPsp, PspSetupError> {
        check_allowed(&settings.base_url, &settings.allowed_hosts)?;
        let api_key = match &settings.dev_api_key {
            Some(k) => SecretString::from(k.clone()),
            None => {
                let text = Zeroizing::new(
                    std::fs::read_to_string(&settings.api_key_file)
                        .map_err(|e| PspSetupError::ApiKey(settings.api_key_file.clone(), e))?,
                );
                SecretString::from(text.trim().to_owned())
            }
        };
        let endpoint = reqwest::Url::parse(&format!("{}/payments", settings.base_url.trim_end_matches('/')))
            .map_err(|_| PspSetupError::NotAUrl)?;
        let client = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_millis(settings.connect_timeout_ms))
            .timeout(Duration::from_millis(settings.timeout_ms))
            // Card data must not follow a redirect to some other host.
            .redirect(reqwest::redirect::Policy::none())
            .https_only(!settings.base_url.starts_with("http://"))
            .build()
            .map_err(PspSetupError::Client)?;
        Ok(AdyenPsp {
            client,
            endpoint,
            api_key,
            merchant_account: settings.merchant_account.clone(),
            allowed_hosts: settings.allowed_hosts.clone(),
        })
    }

    /// One POST: the answer's body for a 2xx (and, with `accept_422`, for a 422,
    /// which a modification uses for a business refusal).
    async fn send_once(
        &self,
        url: &reqwest::Url,
        body: bytes::Bytes,
        idempotency_key: &str,
        accept_422: bool,
    ) -> Result<Answer, PspError> {
        // Defense in depth: re-check the destination right before anything leaves.
        let host = url.host_str().unwrap_or_default();
        if !self.allowed_hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
            return Err(PspError::NotAllowed);
        }
        let res = self
            .client
            .post(url.clone())
            .header("X-API-Key", self.api_key.expose_secret())
            .header("Idempotency-Key", idempotency_key)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            // A reference-counted view of the one zeroizing buffer: no copy per attempt.
            .body(body)
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    PspError::Timeout
                } else if e.is_connect() {
                    PspError::Connect
                } else {
                    PspError::Protocol
                }
            })?;
        let status = res.status().as_u16();
        let refused = match status {
            200..=299 => false,
            422 if accept_422 => true,
            500..=599 => return Err(PspError::Unavailable(status)),
            _ => return Err(PspError::Rejected(status)),
        };
        let bytes = res.bytes().await.map_err(|e| {
            if e.is_timeout() {
                PspError::Timeout
            } else {
                PspError::Protocol
            }
        })?;
        Ok(if refused {
            Answer::Unprocessable(bytes)
        } else {
            Answer::Ok(bytes)
        })
    }

    /// Sends `body` with the money-movement retry rules: a request that never left
    /// (connect error) is tried up to twice more; a timeout or 5xx once more with
    /// the same idempotency key (the PSP de-duplicates it); a 4xx never.
    async fn send(
        &self,
        url: &reqwest::Url,
        body: bytes::Bytes,
        idempotency_key: &str,
        accept_422: bool,
    ) -> (Result<Answer, PspError>, Vec<PspError>) {
        let mut failed_attempts = Vec::new();
        let mut connect_retries = 0;
        let mut unknown_retried = false;
        loop {
            match self.send_once(url, body.clone(), idempotency_key, accept_422).await {
                Err(PspError::Connect) if connect_retries < 2 => {
                    // Nothing was sent: safe to try again.
                    connect_retries += 1;
                    failed_attempts.push(PspError::Connect);
                    tokio::time::sleep(Duration::from_millis(100 * connect_retries)).await;
                }
                Err(e @ (PspError::Timeout | PspError::Unavailable(_))) if !unknown_retried => {
                    // Outcome unknown: retry once with the same idempotency key.
                    unknown_retried = true;
                    // Never the merchant reference: it is free text from the caller.
                    tracing::warn!(
                        kind = e.kind(),
                        "PSP call failed; retrying with the same idempotency key"
                    );
                    failed_attempts.push(e);
                }
                result => {
                    if let Err(e) = &result {
                        failed_attempts.push(e.clone());
                    }
                    return (result, failed_attempts);
                }
            }
        }
    }
}

/// A PSP answer's body.
enum Answer {
    Ok(bytes::Bytes),
    /// HTTP 422 to a modification: refused, nothing changed.
    Unprocessable(bytes::Bytes),
}

fn parse_payment(bytes: &[u8]) -> Result<PspOutcome, PspError> {
    let parsed: PaymentResponse = serde_json::from_slice(bytes).map_err(|_| PspError::Protocol)?;
    let status = match parsed.result_code.as_str() {
        "Authorised" => PspStatus::Authorised,
        "Refused" | "Cancelled" => PspStatus::Refused,
        _ => PspStatus::Error,
    };
    Ok(PspOutcome {
        status,
        psp_reference: parsed.psp_reference,
        refusal_reason: parsed.refusal_reason,
        network_tx_reference: parsed.additional_data.and_then(|a| a.network_tx_reference),
    })
}

fn parse_modification(answer: Answer) -> Result<PspOutcome, PspError> {
    match answer {
        Answer::Ok(bytes) => {
            let parsed: ModificationResponse = serde_json::from_slice(&bytes).map_err(|_| PspError::Protocol)?;
            Ok(PspOutcome {
                status: if parsed.status.eq_ignore_ascii_case("received") {
                    PspStatus::Received
                } else {
                    PspStatus::Error
                },
                psp_reference: parsed.psp_reference,
                refusal_reason: None,
                network_tx_reference: None,
            })
        }
        Answer::Unprocessable(bytes) => {
            let parsed: ErrorResponse = serde_json::from_slice(&bytes).unwrap_or_default();
            // The PSP's own words, bounded: stored with the modification and shown.
            let reason: String = format!(
                "{} (PSP error {})",
                parsed.message.as_deref().unwrap_or("refused"),
                parsed.error_code.as_deref().unwrap_or("?")
            )
            .chars()
            .filter(|c| !c.is_control())
            .take(200)
            .collect();
            Ok(PspOutcome {
                status: PspStatus::Refused,
                psp_reference: None,
                refusal_reason: Some(reason),
                network_tx_reference: None,
            })
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ModificationResponse {
    #[serde(default)]
    psp_reference: Option<String>,
    status: String,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ErrorResponse {
    #[serde(default)]
    error_code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// Counts what a serializer writes (to size the zeroizing buffer up front).
struct ByteCounter(usize);

impl std::io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The serialized request as the owner of a `Bytes`: zeroized when the last
/// reference (ours or the HTTP client's) is dropped.
struct ZeroizingBody(Zeroizing<Vec<u8>>);

impl AsRef<[u8]> for ZeroizingBody {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PaymentRequest<'a> {
    merchant_account: &'a str,
    reference: &'a str,
    amount: AmountBody<'a>,
    payment_method: CardBody<'a>,
    shopper_interaction: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    recurring_processing_model: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    network_tx_reference: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    additional_data: Option<AdditionalDataOut>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AdditionalDataOut {
    /// Adyen's per-payment manual capture switch (a string, as Adyen sends it).
    manual_capture: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ModificationBody<'a> {
    merchant_account: &'a str,
    reference: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    amount: Option<AmountBody<'a>>,
}

#[derive(Serialize)]
struct AmountBody<'a> {
    value: u64,
    currency: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CardBody<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    number: &'a str,
    expiry_month: String,
    expiry_year: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    holder_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cvc: Option<&'a str>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PaymentResponse {
    #[serde(default)]
    psp_reference: Option<String>,
    result_code: String,
    #[serde(default)]
    refusal_reason: Option<String>,
    #[serde(default)]
    additional_data: Option<AdditionalData>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AdditionalData {
    #[serde(default)]
    network_tx_reference: Option<String>,
}

impl super::Psp for AdyenPsp {
    fn authorise<'a>(&'a self, req: PspRequest<'a>) -> PspFuture<'a> {
        Box::pin(async move {
            let body = PaymentRequest {
                merchant_account: &self.merchant_account,
                reference: req.reference,
                amount: AmountBody {
                    value: req.amount.value,
                    currency: &req.amount.currency,
                },
                payment_method: CardBody {
                    kind: "scheme",
                    number: req.card.pan.expose_digits(),
                    expiry_month: format!("{:02}", req.card.expiry.month()),
                    expiry_year: req.card.expiry.year().to_string(),
                    holder_name: req.card.name.as_ref().map(|n| n.expose()),
                    cvc: req.cvv.map(|c| c.expose()),
                },
                shopper_interaction: match req.interaction {
                    ShopperInteraction::Ecommerce => "Ecommerce",
                    ShopperInteraction::Moto => "Moto",
                    ShopperInteraction::ContAuth => "ContAuth",
                },
                recurring_processing_model: req.recurring.map(|r| match r.model {
                    RecurringModel::Subscription => "Subscription",
                    RecurringModel::Unscheduled => "UnscheduledCardOnFile",
                    RecurringModel::CardOnFile => "CardOnFile",
                }),
                network_tx_reference: req.network_tx_reference,
                additional_data: req
                    .manual_capture
                    .then_some(AdditionalDataOut { manual_capture: "true" }),
            };
            // Serialized once into a zeroizing buffer of exactly the right size (measured
            // first, so it never reallocates and leaves no unzeroized copy behind). The
            // buffer is then shared with the HTTP client by reference count: every
            // attempt sends the same bytes, and the last drop zeroizes them.
            let mut counter = ByteCounter(0);
            let mut buf = match serde_json::to_writer(&mut counter, &body) {
                Ok(()) => Zeroizing::new(Vec::with_capacity(counter.0)),
                Err(_) => {
                    return PspCall {
                        result: Err(PspError::Protocol),
                        failed_attempts: Vec::new(),
                    };
                }
            };
            if serde_json::to_writer(&mut *buf, &body).is_err() || buf.len() != buf.capacity() {
                return PspCall {
                    result: Err(PspError::Protocol),
                    failed_attempts: Vec::new(),
                };
            }
            let buf = bytes::Bytes::from_owner(ZeroizingBody(buf));
            let (answer, failed_attempts) = self.send(&self.endpoint, buf, req.idempotency_key, false).await;
            let result = answer.and_then(|a| match a {
                Answer::Ok(bytes) => parse_payment(&bytes),
                Answer::Unprocessable(_) => Err(PspError::Rejected(422)),
            });
            PspCall {
                result,
                failed_attempts,
            }
        })
    }

    fn modify<'a>(&'a self, req: ModificationRequest<'a>) -> PspFuture<'a> {
        Box::pin(async move {
            // The reference goes into the URL path: only what a PSP reference is.
            let r = req.payment_psp_reference;
            if r.is_empty() || r.len() > 64 || !r.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return PspCall {
                    result: Err(PspError::Protocol),
                    failed_attempts: Vec::new(),
                };
            }
            let op = match req.kind {
                ModificationKind::Capture => "captures",
                ModificationKind::Refund => "refunds",
                ModificationKind::Cancel => "cancels",
            };
            let Ok(url) = reqwest::Url::parse(&format!("{}/{r}/{op}", self.endpoint)) else {
                return PspCall {
                    result: Err(PspError::Protocol),
                    failed_attempts: Vec::new(),
                };
            };
            let body = ModificationBody {
                merchant_account: &self.merchant_account,
                reference: req.reference,
                amount: req.amount.map(|a| AmountBody {
                    value: a.value,
                    currency: &a.currency,
                }),
            };
            // No card data in a modification: a plain buffer.
            let Ok(bytes) = serde_json::to_vec(&body) else {
                return PspCall {
                    result: Err(PspError::Protocol),
                    failed_attempts: Vec::new(),
                };
            };
            let (answer, failed_attempts) = self.send(&url, bytes.into(), req.idempotency_key, true).await;
            PspCall {
                result: answer.and_then(parse_modification),
                failed_attempts,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str, hosts: &[&str]) -> PspSettings {
        PspSettings {
            base_url: url.into(),
            api_key_file: "/nonexistent".into(),
            merchant_account: "M".into(),
            allowed_hosts: hosts.iter().map(|s| s.to_string()).collect(),
            connect_timeout_ms: 100,
            timeout_ms: 100,
            dev_api_key: Some("k".into()),
        }
    }

    #[test]
    fn only_allow_listed_hosts() {
        assert!(
            AdyenPsp::new(&settings(
                "https://checkout-test.adyen.com/v71",
                &["checkout-test.adyen.com"]
            ))
            .is_ok()
        );
        let err = AdyenPsp::new(&settings("https://evil.example/v71", &["checkout-test.adyen.com"])).unwrap_err();
        assert!(
            matches!(&err, PspSetupError::HostNotAllowed(h) if h == "evil.example"),
            "{err}"
        );
        assert!(err.to_string().contains("not in allowed_hosts"), "{err}");
        assert!(matches!(
            AdyenPsp::new(&settings("ftp://checkout-test.adyen.com", &["checkout-test.adyen.com"])),
            Err(PspSetupError::Scheme)
        ));
        assert!(
            format!(
                "{:?}",
                AdyenPsp::new(&settings("http://127.0.0.1:1", &["127.0.0.1"])).unwrap()
            )
            .contains("REDACTED")
        );
    }
}
