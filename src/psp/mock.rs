//! `tokenvault-mock-psp`: a local simulator of an Adyen-style Checkout API: `POST /payments`
//! and the payment modifications (captures, refunds, cancels).
//!
//! It is a **test tool**: outcomes are deterministic, and every request that passed the
//! API-key check is recorded (card data included) so a test can prove which card reached
//! the PSP. It never *logs* card data: a log line carries only the operation, the merchant
//! or payment reference, the amount, the result and the idempotency key.
//!
//! # Endpoints
//!
//! | Method and path                          | Auth        | Purpose                                                    |
//! |------------------------------------------|-------------|------------------------------------------------------------|
//! | `POST /payments`                         | `X-API-Key` | authorise a card payment (below)                           |
//! | `POST /payments/{pspReference}/captures` | `X-API-Key` | capture a manual-capture payment ([modifications](#modifications)) |
//! | `POST /payments/{pspReference}/refunds`  | `X-API-Key` | refund (part of) the captured amount                       |
//! | `POST /payments/{pspReference}/cancels`  | `X-API-Key` | cancel an authorisation that was not captured              |
//! | `GET /__received`                        | none        | `{"requests":[...]}`: every recorded request, arrival order |
//! | `DELETE /__received`                     | none        | forget the recorded requests (`204`); `seq` restarts at 1  |
//!
//! A `POST` without the right `X-API-Key` gets `401` with
//! `{"status":401,"errorCode":"000","message":"HTTP Status Response - Unauthorized","errorType":"security"}`
//! and is not recorded.
//!
//! # Deterministic outcomes
//!
//! A valid request is decided by `amount.value % 1000` first, then by the card number:
//!
//! | Rule                                   | HTTP | Result                                                                        | Recorded `outcome` |
//! |----------------------------------------|------|-------------------------------------------------------------------------------|--------------------|
//! | `amount.value % 1000 == 500`           | 500  | `errorCode` `905` "Payment details are not supported", on **every** attempt   | `error-500`        |
//! | `amount.value % 1000 == 502`           | 502  | first attempt for an `Idempotency-Key` (always, without a key); later attempts with the same key fall through to the rules below | `error-502` |
//! | `amount.value % 1000 == 151`           | 200  | `Refused`, `refusalReason` "Insufficient funds"                               | `Refused`          |
//! | `amount.value % 1000 == 105`           | 200  | `Refused`, `refusalReason` "Do not honor"                                     | `Refused`          |
//! | `amount.value % 1000 == 504`           | 200  | `Authorised`, but only after **30 seconds** (clients time out first)          | `timeout`          |
//! | `amount.value % 1000 == 508`           | 504  | after **30 seconds**, on **every** attempt; never stored (a PSP that never answers) | `no-answer`   |
//! | card number `4000000000000002`         | 200  | `Refused`, `refusalReason` "Card declined"                                    | `Refused`          |
//! | anything else                          | 200  | `Authorised`                                                                  | `Authorised`       |
//!
//! An `Authorised` answer to an `Ecommerce` or `Moto` request (also the default when
//! `shopperInteraction` is absent) carries `additionalData.networkTxReference` = `"NTI"` +
//! 15 random digits; one to a `ContAuth` request echoes the request's `networkTxReference`
//! (none if the request had none). `pspReference` is 16 random uppercase alphanumerics.
//!
//! A request with `"additionalData": {"manualCapture": "true"}` (the string, or the boolean
//! `true`) is a *manual-capture* payment: its authorisation must be captured with
//! `/captures`. Any other request is captured automatically, in full, when authorised.
//!
//! A malformed request (bad JSON; missing `reference`, `amount`, `amount.value`,
//! `amount.currency` or `paymentMethod.number`; a card number that is not 12–19 digits;
//! an unknown `shopperInteraction`) gets `422` with `errorCode` `702` and a message that
//! never repeats the card number; it is recorded with outcome `error-422`. Unknown fields
//! are ignored and `Content-Type` is not enforced.
//!
//! # Modifications
//!
//! The simulator remembers every payment it answered `Authorised` (by its `pspReference`;
//! a replay does not add a second one): its amount, currency and capture mode, and then the
//! captured total (an automatically captured payment counts as captured in full), the
//! refunded total, whether it was captured (a payment is captured at most once, in full or
//! in part) and whether it was cancelled.
//!
//! The body of a capture or a refund is
//! `{"merchantAccount": "...", "amount": {"value": n, "currency": "EUR"}, "reference": "..."}`;
//! that of a cancel is `{"merchantAccount": "...", "reference": "..."}` (an `amount` there is
//! ignored). `merchantAccount` and `reference` are optional strings. An accepted modification
//! gets `201` (recorded `received`):
//! `{"merchantAccount": <echo or null>, "paymentPspReference": "<path ref>", "pspReference": "<16 random uppercase alphanumerics>", "reference": <echo or null>, "status": "received", "amount": {"value": n, "currency": "..."}}`
//! (no `amount` for a cancel). As with Adyen, `received` only acknowledges the request. Every
//! refusal is a `422` with `errorType` `validation` (recorded `error-422`); the rules apply in
//! this order (the *stored* column: see [Idempotency](#idempotency)):
//!
//! | # | Rule                                                                | HTTP | `errorCode` and message                                      | Stored |
//! |---|---------------------------------------------------------------------|------|--------------------------------------------------------------|--------|
//! | 1 | bad JSON; capture/refund without a valid `amount` (`value` a positive integer, `currency` three letters); a `merchantAccount` or `reference` that is not a string | 422 | `702` | no |
//! | 2 | unknown payment `pspReference`                                      | 422  | `167` "Original pspReference required: unknown payment"      | no     |
//! | 3 | `amount.currency` differs from the payment's                        | 422  | `137` "Invalid amount specified: ..."                        | yes    |
//! | 4 | `amount.value % 1000 == 151`                                        | 422  | `901` "Refused by the acquirer (simulated)"                  | no     |
//! | 5 | `amount.value % 1000 == 504`                                        | 201  | decided by rules 6–9 and stored at once, but a `201` is only sent after **30 seconds** (recorded `timeout`) | yes |
//! | 6 | capture: automatically captured payment                             | 422  | `905` "Payment already captured automatically"               | yes    |
//! |   | capture: payment cancelled, or already captured                     | 422  | `905` "Payment was cancelled: ..." / "Payment already captured" | yes |
//! |   | capture: `amount.value` above the authorised amount                 | 422  | `137` "Invalid amount specified: capture exceeds the authorised amount" | yes |
//! | 7 | refund: nothing captured (manual and not captured, or cancelled)    | 422  | `905` "Payment not captured: nothing to refund"              | yes    |
//! |   | refund: refunded total + `amount.value` above the captured total    | 422  | `137` "Invalid amount specified: refund exceeds the captured amount" | yes |
//! | 8 | cancel: already cancelled                                           | 422  | `905` "Payment already cancelled"                            | yes    |
//! |   | cancel: captured (automatically or not)                             | 422  | `905` "cannot cancel a captured payment: refund it"          | yes    |
//! | 9 | anything else                                                       | 201  | `received`; the payment's state is updated                   | yes    |
//!
//! Rules 3–5 concern the amount, so a cancel skips them. A `504` modification that rules 6–8
//! refuse is answered (`422`) at once: the delay only holds back an accepted one, whose state
//! change is applied before the wait.
//!
//! # Idempotency
//!
//! As with Adyen, the first *completed* answer (`Authorised`/`Refused`, including the
//! delayed `504` authorisation) for an `Idempotency-Key` is stored. A later request with
//! the same key and the same JSON body (compared without `paymentMethod.cvc`, which a PSP
//! cannot keep after authorisation) gets the identical stored answer (same
//! `pspReference`) and is recorded with `replay: true` (its `outcome` is the stored
//! `resultCode`); the same key with a different body gets `422`, `errorCode` `704`.
//! Requests sharing a key are serialized, so concurrent duplicates are processed once and
//! the others replay. `500` and `502` answers are never stored, so a retry is processed
//! afresh. The delayed `504` authorisation is stored *before* the 30-second wait, so a
//! client that timed out and retries with the same key gets the replay at once.
//!
//! Modifications follow the same rules, in the same key namespace (Adyen keys are per
//! merchant account): the request compared is the operation, the path's `pspReference` and
//! the JSON body, so a key first used for a payment (or a capture) and then for anything
//! else gets `704`. The stored answers are those of the *Stored* column above (replays are
//! recorded with the stored outcome: `received` or `error-422`); answers to rules 1, 2 and 4
//! are not stored, so a retry is processed afresh. A malformed body gets `702` before the
//! key is looked at (as for payments); a stored answer is replayed before rules 2–9 run.
//! A `504` modification is stored (and applied) before the 30-second wait.
//!
//! # Recording
//!
//! Each entry of `GET /__received` is
//! `{"seq": n, "idempotency_key": "..."|null, "replay": bool, "outcome": "...", "operation": "authorise", "request": <JSON as received>}`
//! (`outcome` is `pending` while a request waits for its idempotency key; an unparsable body is
//! recorded as a JSON string). A modification's entry has `operation` `capture`, `refund` or
//! `cancel` and one more field, `"payment_psp_reference": "<path ref>"`; its outcome is
//! `received`, `timeout` (the delayed `504` rule) or `error-422`. The number of distinct
//! charges is the number of entries with `replay: false` and outcome `Authorised` or `Refused`.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::http::StatusCode;
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use rand::Rng;
use serde_json::{Map, Value, json};
use subtle::ConstantTimeEq;

/// How long the `504` rule waits before answering.
const TIMEOUT_DELAY: Duration = Duration::from_secs(30);
/// The test card that is always refused.
const DECLINED_CARD: &str = "4000000000000002";
/// Message of the `704` idempotency conflict.
const CONFLICT_MESSAGE: &str = "request already processed or in progress with different body";

/// The `tokenvault-mock-psp` binary: reads the API key (default: the dev key),
/// then serves until stopped.
pub fn run(listen: SocketAddr, api_key_file: Option<std::path::PathBuf>) -> std::process::ExitCode {
    use std::process::ExitCode;
    let key = match api_key_file {
        Some(f) => match std::fs::read_to_string(&f) {
            Ok(k) => k.trim().to_owned(),
            Err(e) => {
                eprintln!("error: cannot read {}: {e}", f.display());
                return ExitCode::from(2);
            }
        },
        None => super::DEV_API_KEY.to_owned(),
    };
    match actix_web::rt::System::new().block_on(serve(listen, key)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Serves the simulator until the process is stopped. Prints exactly one line to stdout when bound:
/// `mock-psp listening on http://<ip>:<port>` (tests parse it; port 0 allowed).
pub async fn serve(listen: SocketAddr, api_key: String) -> std::io::Result<()> {
    let (addr, server) = start(listen, api_key)?;
    println!("mock-psp listening on http://{addr}");
    server.await
}

/// For in-process use: binds, returns the bound address and the server future/handle.
///
/// Must be called inside an actix runtime; the returned [`Server`] serves once it is
/// awaited or spawned.
pub fn start(listen: SocketAddr, api_key: String) -> std::io::Result<(SocketAddr, Server)> {
    let listener = TcpListener::bind(listen)?;
    let addr = listener.local_addr()?;
    let state = web::Data::new(MockPsp::new(api_key));
    let server = HttpServer::new(move || App::new().app_data(state.clone()).configure(routes))
        .workers(2)
        .shutdown_timeout(1)
        .listen(listener)?
        .run();
    Ok((addr, server))
}

fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/payments").route(web::post().to(payments)))
        .service(web::resource("/payments/{psp_reference}/captures").route(web::post().to(captures)))
        .service(web::resource("/payments/{psp_reference}/refunds").route(web::post().to(refunds)))
        .service(web::resource("/payments/{psp_reference}/cancels").route(web::post().to(cancels)))
        .service(
            web::resource("/__received")
                .route(web::get().to(received))
                .route(web::delete().to(clear_received)),
        );
}

/// Shared simulator state.
struct MockPsp {
    api_key: String,
    recorder: Mutex<Recorder>,
    keys: Mutex<HashMap<String, Arc<tokio::sync::Mutex<KeySlot>>>>,
    /// Every payment answered `Authorised`, by `pspReference`.
    authorisations: Mutex<HashMap<String, Authorisation>>,
}

impl MockPsp {
    fn new(api_key: String) -> MockPsp {
        MockPsp {
            api_key,
            recorder: Mutex::new(Recorder::default()),
            keys: Mutex::new(HashMap::new()),
            authorisations: Mutex::new(HashMap::new()),
        }
    }

    fn authorisations(&self) -> MutexGuard<'_, HashMap<String, Authorisation>> {
        self.authorisations.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers an `Authorised` answer (once: a replay carries the same `pspReference`).
    fn remember(&self, payment: &Payment, reply: &Reply) {
        if let Some(psp_reference) = reply.body.get("pspReference").and_then(Value::as_str) {
            self.authorisations()
                .entry(psp_reference.to_owned())
                .or_insert_with(|| Authorisation::new(payment));
        }
    }

    fn recorder(&self) -> MutexGuard<'_, Recorder> {
        self.recorder.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The per-key lock and state for an idempotency key.
    fn slot(&self, key: &str) -> Arc<tokio::sync::Mutex<KeySlot>> {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        keys.entry(key.to_owned()).or_default().clone()
    }
}

/// What `GET /__received` shows.
#[derive(Default)]
struct Recorder {
    /// Internal id of the next entry; never reset, so an in-flight request cannot
    /// update an entry recorded after a clear.
    next_id: u64,
    /// Last `seq` handed out; reset by `DELETE /__received`.
    seq: u64,
    entries: Vec<Entry>,
}

impl Recorder {
    fn push(
        &mut self,
        operation: Operation,
        payment_psp_reference: Option<String>,
        idempotency_key: Option<String>,
        request: Value,
    ) -> u64 {
        self.next_id += 1;
        self.seq += 1;
        self.entries.push(Entry {
            id: self.next_id,
            seq: self.seq,
            operation,
            payment_psp_reference,
            idempotency_key,
            replay: false,
            outcome: Outcome::Pending,
            request,
        });
        self.next_id
    }

    fn finish(&mut self, id: u64, outcome: Outcome, replay: bool) {
        if let Some(e) = self.entries.iter_mut().rev().find(|e| e.id == id) {
            e.outcome = outcome;
            e.replay = replay;
        }
    }
}

struct Entry {
    id: u64,
    seq: u64,
    operation: Operation,
    /// The path's payment reference, for a modification.
    payment_psp_reference: Option<String>,
    idempotency_key: Option<String>,
    replay: bool,
    outcome: Outcome,
    request: Value,
}

impl Entry {
    fn to_json(&self) -> Value {
        let mut v = json!({
            "seq": self.seq,
            "idempotency_key": self.idempotency_key,
            "replay": self.replay,
            "outcome": self.outcome.as_str(),
            "operation": self.operation.as_str(),
            "request": self.request,
        });
        if let (Some(r), Some(obj)) = (&self.payment_psp_reference, v.as_object_mut()) {
            obj.insert("payment_psp_reference".into(), Value::String(r.clone()));
        }
        v
    }
}

/// State behind one idempotency key (guarded by its async mutex).
#[derive(Default)]
struct KeySlot {
    /// The `502` rule already answered this key once.
    gateway_error_sent: bool,
    /// The first completed answer and the body that produced it.
    completed: Option<Completed>,
}

struct Completed {
    /// The request as compared for a replay: see [`fingerprint`].
    request: Value,
    reply: Reply,
    /// What a replay is recorded as: the stored `resultCode` (or `received`/`error-422`).
    outcome: Outcome,
}

#[derive(Clone)]
struct Reply {
    status: StatusCode,
    body: Value,
}

impl Reply {
    fn to_response(&self) -> HttpResponse {
        HttpResponse::build(self.status).json(&self.body)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Pending,
    Authorised,
    Refused,
    Timeout,
    Error422,
    Error500,
    Error502,
    /// Never answers in time and never stores anything: every attempt times out.
    NoAnswer,
    /// A modification acknowledged with `201`.
    Received,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Pending => "pending",
            Outcome::Authorised => "Authorised",
            Outcome::Refused => "Refused",
            Outcome::Timeout => "timeout",
            Outcome::Error422 => "error-422",
            Outcome::Error500 => "error-500",
            Outcome::Error502 => "error-502",
            Outcome::NoAnswer => "no-answer",
            Outcome::Received => "received",
        }
    }
}

/// What a request asks for: the authorisation itself, or a modification of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Operation {
    Authorise,
    Capture,
    Refund,
    Cancel,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Operation::Authorise => "authorise",
            Operation::Capture => "capture",
            Operation::Refund => "refund",
            Operation::Cancel => "cancel",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Interaction {
    Ecommerce,
    Moto,
    ContAuth,
}

/// The validated fields the decision needs. The card number itself is not kept.
struct Payment {
    reference: String,
    value: u64,
    currency: String,
    declined_card: bool,
    interaction: Interaction,
    network_tx_reference: Option<String>,
    /// `additionalData.manualCapture` is `"true"` (or `true`).
    manual_capture: bool,
}

/// What the simulator keeps of a payment it authorised.
struct Authorisation {
    value: u64,
    currency: String,
    manual_capture: bool,
    /// Captured total: the whole amount at once for an automatically captured payment.
    captured: u64,
    /// A capture happened (automatically, or one `/captures`): a payment is captured once.
    captured_once: bool,
    refunded: u64,
    cancelled: bool,
}

impl Authorisation {
    fn new(p: &Payment) -> Authorisation {
        Authorisation {
            value: p.value,
            currency: p.currency.clone(),
            manual_capture: p.manual_capture,
            captured: if p.manual_capture { 0 } else { p.value },
            captured_once: !p.manual_capture,
            refunded: 0,
            cancelled: false,
        }
    }

    /// Rules 6–9 of a modification: refuses it, or applies it to the payment's state.
    fn apply(&mut self, op: Operation, value: u64) -> Result<(), Reply> {
        match op {
            Operation::Authorise => {}
            Operation::Capture => {
                if !self.manual_capture {
                    return Err(validation_error("905", "Payment already captured automatically"));
                }
                if self.cancelled {
                    return Err(validation_error("905", "Payment was cancelled: it cannot be captured"));
                }
                if self.captured_once {
                    return Err(validation_error("905", "Payment already captured"));
                }
                if value > self.value {
                    return Err(validation_error(
                        "137",
                        "Invalid amount specified: capture exceeds the authorised amount",
                    ));
                }
                self.captured = value;
                self.captured_once = true;
            }
            Operation::Refund => {
                if self.cancelled || self.captured == 0 {
                    return Err(validation_error("905", "Payment not captured: nothing to refund"));
                }
                if self.refunded.saturating_add(value) > self.captured {
                    return Err(validation_error(
                        "137",
                        "Invalid amount specified: refund exceeds the captured amount",
                    ));
                }
                self.refunded += value;
            }
            Operation::Cancel => {
                if self.cancelled {
                    return Err(validation_error("905", "Payment already cancelled"));
                }
                if self.captured_once {
                    return Err(validation_error("905", "cannot cancel a captured payment: refund it"));
                }
                self.cancelled = true;
            }
        }
        Ok(())
    }
}

/// The validated fields of a modification request.
struct Modification {
    merchant_account: Value,
    reference: Value,
    /// `(value, currency)`: required for a capture or a refund, ignored for a cancel.
    amount: Option<(u64, String)>,
}

fn error_body(status: StatusCode, code: &str, message: &str, kind: &str) -> Value {
    json!({"status": status.as_u16(), "errorCode": code, "message": message, "errorType": kind})
}

fn validation_error(code: &str, message: &str) -> Reply {
    let status = StatusCode::UNPROCESSABLE_ENTITY;
    Reply {
        status,
        body: error_body(status, code, message, "validation"),
    }
}

/// Checks the request shape. Messages are fixed texts: they never echo request values.
fn validate(v: &Value) -> Result<Payment, String> {
    let Some(obj) = v.as_object() else {
        return Err("Structure of the request is invalid: expected a JSON object".into());
    };
    let reference = match obj.get("reference") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        None | Some(Value::Null) => return Err("Required field 'reference' is not provided.".into()),
        Some(_) => return Err("Field 'reference' must be a non-empty string.".into()),
    };
    let amount = match obj.get("amount") {
        Some(Value::Object(a)) => a,
        None | Some(Value::Null) => return Err("Required field 'amount' is not provided.".into()),
        Some(_) => return Err("Field 'amount' must be an object.".into()),
    };
    let value = match amount.get("value") {
        None | Some(Value::Null) => return Err("Required field 'amount.value' is not provided.".into()),
        Some(v) => v
            .as_u64()
            .ok_or_else(|| "Field 'amount.value' must be a non-negative integer.".to_owned())?,
    };
    let currency = match amount.get("currency") {
        Some(Value::String(c)) if c.len() == 3 && c.bytes().all(|b| b.is_ascii_alphabetic()) => c.clone(),
        None | Some(Value::Null) => return Err("Required field 'amount.currency' is not provided.".into()),
        Some(_) => return Err("Field 'amount.currency' must be a three-letter ISO 4217 code.".into()),
    };
    let method = match obj.get("paymentMethod") {
        Some(Value::Object(m)) => m,
        None | Some(Value::Null) => return Err("Required field 'paymentMethod' is not provided.".into()),
        Some(_) => return Err("Field 'paymentMethod' must be an object.".into()),
    };
    let declined_card = match method.get("number") {
        Some(Value::String(n)) if (12..=19).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_digit()) => {
            n == DECLINED_CARD
        }
        None | Some(Value::Null) => return Err("Required field 'paymentMethod.number' is not provided.".into()),
        Some(_) => return Err("Field 'paymentMethod.number' is not a valid card number.".into()),
    };
    let interaction = match obj.get("shopperInteraction") {
        None | Some(Value::Null) => Interaction::Ecommerce,
        Some(Value::String(s)) if s == "Ecommerce" => Interaction::Ecommerce,
        Some(Value::String(s)) if s == "Moto" => Interaction::Moto,
        Some(Value::String(s)) if s == "ContAuth" => Interaction::ContAuth,
        Some(_) => return Err("Field 'shopperInteraction' must be Ecommerce, Moto or ContAuth.".into()),
    };
    let network_tx_reference = match obj.get("networkTxReference") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err("Field 'networkTxReference' must be a string.".into()),
    };
    let manual_capture = match obj.get("additionalData").and_then(|d| d.get("manualCapture")) {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s == "true",
        _ => false,
    };
    Ok(Payment {
        reference,
        value,
        currency,
        declined_card,
        interaction,
        network_tx_reference,
        manual_capture,
    })
}

/// Rule 1 for a modification. Messages are fixed texts.
fn validate_modification(op: Operation, v: &Value) -> Result<Modification, String> {
    let Some(obj) = v.as_object() else {
        return Err("Structure of the request is invalid: expected a JSON object".into());
    };
    let optional_string = |field: &str| match obj.get(field) {
        None | Some(Value::Null) => Ok(Value::Null),
        Some(s @ Value::String(_)) => Ok(s.clone()),
        Some(_) => Err(format!("Field '{field}' must be a string.")),
    };
    let merchant_account = optional_string("merchantAccount")?;
    let reference = optional_string("reference")?;
    let amount = match op {
        Operation::Authorise | Operation::Cancel => None,
        Operation::Capture | Operation::Refund => {
            let amount = match obj.get("amount") {
                Some(Value::Object(a)) => a,
                None | Some(Value::Null) => return Err("Required field 'amount' is not provided.".into()),
                Some(_) => return Err("Field 'amount' must be an object.".into()),
            };
            let value = match amount.get("value") {
                None | Some(Value::Null) => return Err("Required field 'amount.value' is not provided.".into()),
                Some(v) => v
                    .as_u64()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| "Field 'amount.value' must be a positive integer.".to_owned())?,
            };
            let currency = match amount.get("currency") {
                Some(Value::String(c)) if c.len() == 3 && c.bytes().all(|b| b.is_ascii_alphabetic()) => c.clone(),
                None | Some(Value::Null) => return Err("Required field 'amount.currency' is not provided.".into()),
                Some(_) => return Err("Field 'amount.currency' must be a three-letter ISO 4217 code.".into()),
            };
            Some((value, currency))
        }
    };
    Ok(Modification {
        merchant_account,
        reference,
        amount,
    })
}

fn random_string(len: usize, alphabet: &[u8]) -> String {
    let mut rng = rand::thread_rng();
    (0..len)
        .map(|_| char::from(alphabet[rng.gen_range(0..alphabet.len())]))
        .collect()
}

fn psp_reference() -> String {
    random_string(16, b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
}

fn authorised(p: &Payment) -> Reply {
    let nti = match p.interaction {
        Interaction::Ecommerce | Interaction::Moto => Some(format!("NTI{}", random_string(15, b"0123456789"))),
        Interaction::ContAuth => p.network_tx_reference.clone(),
    };
    let mut body = Map::new();
    body.insert("pspReference".into(), Value::String(psp_reference()));
    body.insert("resultCode".into(), Value::String("Authorised".into()));
    if let Some(nti) = nti {
        body.insert("additionalData".into(), json!({ "networkTxReference": nti }));
    }
    Reply {
        status: StatusCode::OK,
        body: Value::Object(body),
    }
}

fn refused(reason: &str) -> Reply {
    Reply {
        status: StatusCode::OK,
        body: json!({"pspReference": psp_reference(), "resultCode": "Refused", "refusalReason": reason}),
    }
}

/// The outcome table. `gateway_error` is true when the `502` rule should still fire.
fn decide(p: &Payment, gateway_error: bool) -> (Outcome, Reply) {
    match p.value % 1000 {
        500 => {
            let status = StatusCode::INTERNAL_SERVER_ERROR;
            let body = error_body(status, "905", "Payment details are not supported", "internal");
            (Outcome::Error500, Reply { status, body })
        }
        502 if gateway_error => {
            let status = StatusCode::BAD_GATEWAY;
            let body = error_body(status, "000", "Bad Gateway: the acquirer did not answer", "internal");
            (Outcome::Error502, Reply { status, body })
        }
        151 => (Outcome::Refused, refused("Insufficient funds")),
        105 => (Outcome::Refused, refused("Do not honor")),
        504 => (Outcome::Timeout, authorised(p)),
        508 => {
            let status = StatusCode::GATEWAY_TIMEOUT;
            let body = error_body(
                status,
                "000",
                "Gateway timeout: the acquirer never answered",
                "internal",
            );
            (Outcome::NoAnswer, Reply { status, body })
        }
        _ if p.declined_card => (Outcome::Refused, refused("Card declined")),
        _ => (Outcome::Authorised, authorised(p)),
    }
}

/// Applies the idempotency rules around [`decide`]. Returns the outcome, whether it is a
/// replay, and the answer.
async fn process(state: &MockPsp, payment: &Payment, request: &Value, key: Option<&str>) -> (Outcome, bool, Reply) {
    let Some(key) = key else {
        let (outcome, reply) = decide(payment, true);
        if matches!(outcome, Outcome::Authorised | Outcome::Timeout) {
            state.remember(payment, &reply);
        }
        return (outcome, false, reply);
    };
    let request = fingerprint(Operation::Authorise, None, &without_cvc(request));
    let slot = state.slot(key);
    let mut slot = slot.lock().await;
    if let Some(done) = &slot.completed {
        if done.request == request {
            return (done.outcome, true, done.reply.clone());
        }
        return (Outcome::Error422, false, validation_error("704", CONFLICT_MESSAGE));
    }
    let (outcome, reply) = decide(payment, !slot.gateway_error_sent);
    if matches!(outcome, Outcome::Authorised | Outcome::Timeout) {
        state.remember(payment, &reply);
    }
    match outcome {
        Outcome::Error502 => slot.gateway_error_sent = true,
        Outcome::Authorised | Outcome::Refused | Outcome::Timeout => {
            let stored = if outcome == Outcome::Timeout {
                Outcome::Authorised
            } else {
                outcome
            };
            slot.completed = Some(Completed {
                request,
                reply: reply.clone(),
                outcome: stored,
            });
        }
        Outcome::Pending | Outcome::Error422 | Outcome::Error500 | Outcome::NoAnswer | Outcome::Received => {}
    }
    (outcome, false, reply)
}

/// What an idempotency key is bound to: the operation, the payment it modifies (for a
/// modification) and the body. One key namespace serves payments and modifications.
fn fingerprint(op: Operation, payment_psp_reference: Option<&str>, body: &Value) -> Value {
    json!({"operation": op.as_str(), "paymentPspReference": payment_psp_reference, "body": body})
}

/// Rules 2–9 of a modification. Returns the outcome, the answer and whether the answer is
/// stored for the idempotency key.
fn decide_modification(state: &MockPsp, op: Operation, payment_ref: &str, m: &Modification) -> (Outcome, Reply, bool) {
    let mut authorisations = state.authorisations();
    let Some(payment) = authorisations.get_mut(payment_ref) else {
        let reply = validation_error("167", "Original pspReference required: unknown payment");
        return (Outcome::Error422, reply, false);
    };
    let mut delayed = false;
    if let Some((value, currency)) = &m.amount {
        if *currency != payment.currency {
            let reply = validation_error("137", "Invalid amount specified: currency differs from the payment's");
            return (Outcome::Error422, reply, true);
        }
        if value % 1000 == 151 {
            return (
                Outcome::Error422,
                validation_error("901", "Refused by the acquirer (simulated)"),
                false,
            );
        }
        delayed = value % 1000 == 504;
    }
    if let Err(reply) = payment.apply(op, m.amount.as_ref().map_or(0, |(value, _)| *value)) {
        return (Outcome::Error422, reply, true);
    }
    let mut body = Map::new();
    body.insert("merchantAccount".into(), m.merchant_account.clone());
    body.insert("paymentPspReference".into(), Value::String(payment_ref.to_owned()));
    body.insert("pspReference".into(), Value::String(psp_reference()));
    body.insert("reference".into(), m.reference.clone());
    body.insert("status".into(), Value::String("received".into()));
    if let Some((value, currency)) = &m.amount {
        body.insert("amount".into(), json!({"value": value, "currency": currency}));
    }
    let reply = Reply {
        status: StatusCode::CREATED,
        body: Value::Object(body),
    };
    let outcome = if delayed { Outcome::Timeout } else { Outcome::Received };
    (outcome, reply, true)
}

/// Applies the idempotency rules around [`decide_modification`]. Returns the outcome,
/// whether it is a replay, and the answer.
async fn process_modification(
    state: &MockPsp,
    op: Operation,
    psp_reference: &str,
    m: &Modification,
    request: &Value,
    key: Option<&str>,
) -> (Outcome, bool, Reply) {
    let Some(key) = key else {
        let (outcome, reply, _) = decide_modification(state, op, psp_reference, m);
        return (outcome, false, reply);
    };
    let request = fingerprint(op, Some(psp_reference), request);
    let slot = state.slot(key);
    let mut slot = slot.lock().await;
    if let Some(done) = &slot.completed {
        if done.request == request {
            return (done.outcome, true, done.reply.clone());
        }
        return (Outcome::Error422, false, validation_error("704", CONFLICT_MESSAGE));
    }
    let (outcome, reply, store) = decide_modification(state, op, psp_reference, m);
    if store {
        slot.completed = Some(Completed {
            request,
            reply: reply.clone(),
            outcome: if outcome == Outcome::Timeout {
                Outcome::Received
            } else {
                outcome
            },
        });
    }
    (outcome, false, reply)
}

/// The request as compared for a replay: without `paymentMethod.cvc`. A PSP may not
/// keep a CVC after authorisation (PCI DSS 3.3.1), so it cannot compare it; and a
/// resend after the caller's crash no longer has the (single-use) CVC.
fn without_cvc(request: &Value) -> Value {
    let mut r = request.clone();
    if let Some(pm) = r.get_mut("paymentMethod").and_then(Value::as_object_mut) {
        pm.remove("cvc");
    }
    r
}

fn api_key_ok(req: &HttpRequest, expected: &str) -> bool {
    req.headers()
        .get("X-API-Key")
        .is_some_and(|v| bool::from(v.as_bytes().ct_eq(expected.as_bytes())))
}

fn unauthorized() -> HttpResponse {
    let status = StatusCode::UNAUTHORIZED;
    HttpResponse::build(status).json(error_body(
        status,
        "000",
        "HTTP Status Response - Unauthorized",
        "security",
    ))
}

/// The `Idempotency-Key` header; `Some(None)`: the header is present but unusable.
fn idempotency_key(req: &HttpRequest) -> Option<Option<String>> {
    req.headers().get("Idempotency-Key").map(|v| {
        v.to_str()
            .ok()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    })
}

async fn payments(req: HttpRequest, body: web::Bytes, state: web::Data<MockPsp>) -> HttpResponse {
    if !api_key_ok(&req, &state.api_key) {
        tracing::warn!("mock-psp: rejected a payment with a missing or wrong API key");
        return unauthorized();
    }
    let key = idempotency_key(&req);
    let parsed = serde_json::from_slice::<Value>(&body);
    let request = match &parsed {
        Ok(v) => v.clone(),
        Err(_) => Value::String(String::from_utf8_lossy(&body).into_owned()),
    };
    let id = state
        .recorder()
        .push(Operation::Authorise, None, key.clone().flatten(), request);

    let checked = match (&key, parsed) {
        (Some(None), _) => Err("Field 'Idempotency-Key' header must be a non-empty ASCII string.".to_owned()),
        (_, Err(e)) => Err(format!(
            "Structure of the request is invalid: malformed JSON at line {} column {}",
            e.line(),
            e.column()
        )),
        (_, Ok(v)) => validate(&v).map(|p| (p, v)),
    };
    let (payment, request) = match checked {
        Ok(ok) => ok,
        Err(message) => {
            state.recorder().finish(id, Outcome::Error422, false);
            tracing::info!(result = "error-422", "mock-psp payment rejected as invalid");
            return validation_error("702", &message).to_response();
        }
    };

    let key = key.flatten();
    let (outcome, replay, reply) = process(&state, &payment, &request, key.as_deref()).await;
    state.recorder().finish(id, outcome, replay);
    tracing::info!(
        reference = %payment.reference,
        amount = payment.value,
        currency = %payment.currency,
        result = outcome.as_str(),
        idempotency_key = key.as_deref().unwrap_or("-"),
        replay,
        "mock-psp payment"
    );
    if matches!(outcome, Outcome::Timeout | Outcome::NoAnswer) {
        actix_web::rt::time::sleep(TIMEOUT_DELAY).await;
    }
    reply.to_response()
}

async fn captures(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<MockPsp>,
) -> HttpResponse {
    modification(Operation::Capture, req, path.into_inner(), body, state).await
}

async fn refunds(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<MockPsp>,
) -> HttpResponse {
    modification(Operation::Refund, req, path.into_inner(), body, state).await
}

async fn cancels(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<MockPsp>,
) -> HttpResponse {
    modification(Operation::Cancel, req, path.into_inner(), body, state).await
}

/// `POST /payments/{pspReference}/captures|refunds|cancels`.
async fn modification(
    op: Operation,
    req: HttpRequest,
    psp_reference: String,
    body: web::Bytes,
    state: web::Data<MockPsp>,
) -> HttpResponse {
    if !api_key_ok(&req, &state.api_key) {
        tracing::warn!(
            operation = op.as_str(),
            "mock-psp: rejected a modification with a missing or wrong API key"
        );
        return unauthorized();
    }
    let key = idempotency_key(&req);
    let parsed = serde_json::from_slice::<Value>(&body);
    let request = match &parsed {
        Ok(v) => v.clone(),
        Err(_) => Value::String(String::from_utf8_lossy(&body).into_owned()),
    };
    let id = state
        .recorder()
        .push(op, Some(psp_reference.clone()), key.clone().flatten(), request);

    let checked = match (&key, parsed) {
        (Some(None), _) => Err("Field 'Idempotency-Key' header must be a non-empty ASCII string.".to_owned()),
        (_, Err(e)) => Err(format!(
            "Structure of the request is invalid: malformed JSON at line {} column {}",
            e.line(),
            e.column()
        )),
        (_, Ok(v)) => validate_modification(op, &v).map(|m| (m, v)),
    };
    let (m, request) = match checked {
        Ok(ok) => ok,
        Err(message) => {
            state.recorder().finish(id, Outcome::Error422, false);
            tracing::info!(
                operation = op.as_str(),
                payment_psp_reference = %psp_reference,
                result = "error-422",
                "mock-psp modification rejected as invalid"
            );
            return validation_error("702", &message).to_response();
        }
    };

    let key = key.flatten();
    let (outcome, replay, reply) = process_modification(&state, op, &psp_reference, &m, &request, key.as_deref()).await;
    state.recorder().finish(id, outcome, replay);
    let (amount, currency) = match &m.amount {
        Some((value, currency)) => (Some(*value), currency.as_str()),
        None => (None, "-"),
    };
    tracing::info!(
        operation = op.as_str(),
        payment_psp_reference = %psp_reference,
        amount,
        currency,
        result = outcome.as_str(),
        idempotency_key = key.as_deref().unwrap_or("-"),
        replay,
        "mock-psp modification"
    );
    if outcome == Outcome::Timeout {
        actix_web::rt::time::sleep(TIMEOUT_DELAY).await;
    }
    reply.to_response()
}

async fn received(state: web::Data<MockPsp>) -> HttpResponse {
    let requests: Vec<Value> = state.recorder().entries.iter().map(Entry::to_json).collect();
    HttpResponse::Ok().json(json!({ "requests": requests }))
}

async fn clear_received(state: web::Data<MockPsp>) -> HttpResponse {
    let mut recorder = state.recorder();
    recorder.entries.clear();
    recorder.seq = 0;
    HttpResponse::NoContent().finish()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use actix_web::dev::ServerHandle;
    use serde_json::{Value, json};

    use super::start;

    const KEY: &str = "test-api-key";
    const PAN: &str = "4111111111111111";

    struct Sim {
        base: String,
        client: reqwest::Client,
        handle: ServerHandle,
    }

    impl Sim {
        async fn start() -> Sim {
            let (addr, server) = start("127.0.0.1:0".parse().unwrap(), KEY.to_owned()).unwrap();
            let handle = server.handle();
            actix_web::rt::spawn(server);
            Sim {
                base: format!("http://{addr}"),
                client: reqwest::Client::builder().no_proxy().build().unwrap(),
                handle,
            }
        }

        async fn pay_raw(&self, api_key: Option<&str>, idem: Option<&str>, body: Vec<u8>) -> (u16, Value) {
            let mut req = self
                .client
                .post(format!("{}/payments", self.base))
                .header("Content-Type", "application/json")
                .body(body);
            if let Some(k) = api_key {
                req = req.header("X-API-Key", k);
            }
            if let Some(k) = idem {
                req = req.header("Idempotency-Key", k);
            }
            let res = req.send().await.unwrap();
            let status = res.status().as_u16();
            let text = res.text().await.unwrap();
            (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
        }

        async fn pay(&self, idem: Option<&str>, body: &Value) -> (u16, Value) {
            self.pay_raw(Some(KEY), idem, serde_json::to_vec(body).unwrap()).await
        }

        /// `op` is the path's last segment: `captures`, `refunds` or `cancels`.
        async fn modify_raw(
            &self,
            api_key: Option<&str>,
            op: &str,
            psp_ref: &str,
            idem: Option<&str>,
            body: Vec<u8>,
        ) -> (u16, Value) {
            let mut req = self
                .client
                .post(format!("{}/payments/{psp_ref}/{op}", self.base))
                .header("Content-Type", "application/json")
                .body(body);
            if let Some(k) = api_key {
                req = req.header("X-API-Key", k);
            }
            if let Some(k) = idem {
                req = req.header("Idempotency-Key", k);
            }
            let res = req.send().await.unwrap();
            let status = res.status().as_u16();
            let text = res.text().await.unwrap();
            (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
        }

        async fn modify(&self, op: &str, psp_ref: &str, idem: Option<&str>, body: &Value) -> (u16, Value) {
            self.modify_raw(Some(KEY), op, psp_ref, idem, serde_json::to_vec(body).unwrap())
                .await
        }

        /// Authorises a payment of `value` EUR cents and returns its `pspReference`.
        async fn authorise(&self, value: u64, manual_capture: bool) -> String {
            let mut req = payment(value, PAN, "Ecommerce");
            if manual_capture {
                req["additionalData"] = json!({"manualCapture": "true"});
            }
            let (status, body) = self.pay(None, &req).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["resultCode"], "Authorised", "{body}");
            body["pspReference"].as_str().unwrap().to_owned()
        }

        async fn received(&self) -> Vec<Value> {
            let v: Value = self
                .client
                .get(format!("{}/__received", self.base))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["requests"].as_array().unwrap().clone()
        }

        async fn stop(self) {
            self.handle.stop(false).await;
        }
    }

    fn payment(value: u64, number: &str, interaction: &str) -> Value {
        json!({
            "merchantAccount": "TokenvaultDev",
            "reference": format!("order-{value}"),
            "amount": {"value": value, "currency": "EUR"},
            "paymentMethod": {"type": "scheme", "number": number, "expiryMonth": "12", "expiryYear": "2030",
                              "holderName": "Ada Lovelace", "cvc": "737"},
            "shopperInteraction": interaction,
            "unknownField": {"ignored": true}
        })
    }

    fn amount_body(value: u64, reference: &str) -> Value {
        json!({"merchantAccount": "TokenvaultDev", "amount": {"value": value, "currency": "EUR"},
               "reference": reference})
    }

    fn cancel_body(reference: &str) -> Value {
        json!({"merchantAccount": "TokenvaultDev", "reference": reference})
    }

    fn assert_error(status: u16, body: &Value, code: &str) {
        assert_eq!(status, 422, "{body}");
        assert_eq!(body["status"], 422, "{body}");
        assert_eq!(body["errorCode"], code, "{body}");
        assert_eq!(body["errorType"], "validation", "{body}");
    }

    fn assert_received(status: u16, body: &Value, psp_ref: &str) {
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["status"], "received");
        assert_eq!(body["paymentPspReference"], psp_ref);
        assert_eq!(body["merchantAccount"], "TokenvaultDev");
        assert_psp_reference(body);
        assert_ne!(body["pspReference"], psp_ref);
    }

    fn assert_psp_reference(body: &Value) {
        let r = body["pspReference"].as_str().unwrap();
        assert_eq!(r.len(), 16, "{r}");
        assert!(r.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit()), "{r}");
    }

    #[actix_web::test]
    async fn rejects_missing_or_wrong_api_key_without_recording() {
        let sim = Sim::start().await;
        let body = serde_json::to_vec(&payment(1000, PAN, "Ecommerce")).unwrap();
        for key in [None, Some("wrong-key"), Some("")] {
            let (status, json) = sim.pay_raw(key, None, body.clone()).await;
            assert_eq!(status, 401);
            assert_eq!(
                json,
                json!({"status": 401, "errorCode": "000", "message": "HTTP Status Response - Unauthorized",
                       "errorType": "security"})
            );
        }
        assert!(sim.received().await.is_empty());
        sim.stop().await;
    }

    #[actix_web::test]
    async fn authorises_with_nti_for_ecommerce_and_moto_and_records_the_card() {
        let sim = Sim::start().await;
        for interaction in ["Ecommerce", "Moto"] {
            let (status, body) = sim.pay(None, &payment(1000, PAN, interaction)).await;
            assert_eq!(status, 200);
            assert_eq!(body["resultCode"], "Authorised");
            assert!(body.get("refusalReason").is_none());
            assert_psp_reference(&body);
            let nti = body["additionalData"]["networkTxReference"].as_str().unwrap();
            assert_eq!(nti.len(), 18);
            assert!(
                nti.starts_with("NTI") && nti[3..].bytes().all(|b| b.is_ascii_digit()),
                "{nti}"
            );
        }
        let got = sim.received().await;
        assert_eq!(got.len(), 2);
        assert_eq!(got[0]["seq"], 1);
        assert_eq!(got[1]["seq"], 2);
        assert_eq!(got[0]["idempotency_key"], Value::Null);
        assert_eq!(got[0]["replay"], false);
        assert_eq!(got[0]["outcome"], "Authorised");
        assert_eq!(got[0]["request"], payment(1000, PAN, "Ecommerce"));
        assert_eq!(got[1]["request"]["paymentMethod"]["number"], PAN);
        sim.stop().await;
    }

    #[actix_web::test]
    async fn contauth_echoes_the_network_tx_reference() {
        let sim = Sim::start().await;
        let mut req = payment(2000, PAN, "ContAuth");
        req["recurringProcessingModel"] = json!("Subscription");
        req["networkTxReference"] = json!("NTI123456789012345");
        let (status, body) = sim.pay(Some("k-contauth"), &req).await;
        assert_eq!(status, 200);
        assert_eq!(body["resultCode"], "Authorised");
        assert_eq!(body["additionalData"]["networkTxReference"], "NTI123456789012345");

        let (status, body) = sim.pay(None, &payment(2000, PAN, "ContAuth")).await;
        assert_eq!(status, 200);
        assert_eq!(body["resultCode"], "Authorised");
        assert!(body.get("additionalData").is_none(), "{body}");
        sim.stop().await;
    }

    #[actix_web::test]
    async fn refusals_carry_their_reasons() {
        let sim = Sim::start().await;
        for (value, number, reason) in [
            (1151, PAN, "Insufficient funds"),
            (151, PAN, "Insufficient funds"),
            (2105, PAN, "Do not honor"),
            (1000, "4000000000000002", "Card declined"),
        ] {
            let (status, body) = sim.pay(None, &payment(value, number, "Ecommerce")).await;
            assert_eq!(status, 200);
            assert_eq!(body["resultCode"], "Refused");
            assert_eq!(body["refusalReason"], reason);
            assert!(body.get("additionalData").is_none());
            assert_psp_reference(&body);
        }
        let got = sim.received().await;
        assert!(got.iter().all(|e| e["outcome"] == "Refused" && e["replay"] == false));
        sim.stop().await;
    }

    #[actix_web::test]
    async fn error_500_on_every_attempt() {
        let sim = Sim::start().await;
        let req = payment(1500, PAN, "Ecommerce");
        for _ in 0..3 {
            let (status, body) = sim.pay(Some("k-500"), &req).await;
            assert_eq!(status, 500);
            assert_eq!(
                body,
                json!({"status": 500, "errorCode": "905", "message": "Payment details are not supported",
                       "errorType": "internal"})
            );
        }
        let (status, _) = sim.pay(None, &req).await;
        assert_eq!(status, 500);
        let got = sim.received().await;
        assert_eq!(got.len(), 4);
        assert!(got.iter().all(|e| e["outcome"] == "error-500" && e["replay"] == false));
        sim.stop().await;
    }

    #[actix_web::test]
    async fn error_502_once_per_key_then_authorised() {
        let sim = Sim::start().await;
        let req = payment(3502, PAN, "Ecommerce");
        let (status, body) = sim.pay(Some("k-502"), &req).await;
        assert_eq!(status, 502);
        assert_eq!(body["status"], 502);
        let (status, body) = sim.pay(Some("k-502"), &req).await;
        assert_eq!(status, 200);
        assert_eq!(body["resultCode"], "Authorised");
        // A third attempt replays the stored authorisation.
        let (status, again) = sim.pay(Some("k-502"), &req).await;
        assert_eq!(status, 200);
        assert_eq!(again, body);
        // Without a key: always 502.
        for _ in 0..2 {
            let (status, _) = sim.pay(None, &req).await;
            assert_eq!(status, 502);
        }
        let got = sim.received().await;
        let summary: Vec<(String, bool)> = got
            .iter()
            .map(|e| {
                (
                    e["outcome"].as_str().unwrap().to_owned(),
                    e["replay"].as_bool().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("error-502".to_owned(), false),
                ("Authorised".to_owned(), false),
                ("Authorised".to_owned(), true),
                ("error-502".to_owned(), false),
                ("error-502".to_owned(), false),
            ]
        );
        assert_eq!(got[0]["idempotency_key"], "k-502");
        assert_eq!(got[1]["idempotency_key"], "k-502");
        sim.stop().await;
    }

    #[actix_web::test]
    async fn idempotent_replay_and_conflict() {
        let sim = Sim::start().await;
        let req = payment(1000, PAN, "Ecommerce");
        let (s1, first) = sim.pay(Some("k-idem"), &req).await;
        // Same JSON, different key order and whitespace: still the same body.
        let same = serde_json::to_string_pretty(&req).unwrap().into_bytes();
        let (s2, second) = sim.pay_raw(Some(KEY), Some("k-idem"), same).await;
        assert_eq!((s1, s2), (200, 200));
        assert_eq!(first, second);
        assert_psp_reference(&first);

        let mut other = req.clone();
        other["amount"]["value"] = json!(2000);
        let (status, body) = sim.pay(Some("k-idem"), &other).await;
        assert_eq!(status, 422);
        assert_eq!(body["errorCode"], "704");
        assert_eq!(
            body["message"],
            "request already processed or in progress with different body"
        );
        assert_eq!(body["errorType"], "validation");

        // A refusal is stored too.
        let declined = payment(1151, PAN, "Ecommerce");
        let (_, r1) = sim.pay(Some("k-refused"), &declined).await;
        let (_, r2) = sim.pay(Some("k-refused"), &declined).await;
        assert_eq!(r1, r2);

        let got = sim.received().await;
        let summary: Vec<(&str, bool)> = got
            .iter()
            .map(|e| (e["outcome"].as_str().unwrap(), e["replay"].as_bool().unwrap()))
            .collect();
        assert_eq!(
            summary,
            [
                ("Authorised", false),
                ("Authorised", true),
                ("error-422", false),
                ("Refused", false),
                ("Refused", true),
            ]
        );
        let charges = got
            .iter()
            .filter(|e| e["replay"] == false && (e["outcome"] == "Authorised" || e["outcome"] == "Refused"))
            .count();
        assert_eq!(charges, 2);
        sim.stop().await;
    }

    #[actix_web::test]
    async fn concurrent_requests_with_one_key_charge_once() {
        let sim = Sim::start().await;
        let req = payment(4200, PAN, "Ecommerce");
        let calls = (0..10).map(|_| sim.pay(Some("k-concurrent"), &req));
        let results = futures_util::future::join_all(calls).await;
        assert_eq!(results.len(), 10);
        for (status, body) in &results {
            assert_eq!(*status, 200);
            assert_eq!(body, &results[0].1);
        }
        assert_eq!(results[0].1["resultCode"], "Authorised");
        let got = sim.received().await;
        assert_eq!(got.len(), 10);
        assert_eq!(got.iter().filter(|e| e["replay"] == false).count(), 1);
        assert_eq!(got.iter().filter(|e| e["replay"] == true).count(), 9);
        assert!(got.iter().all(|e| e["outcome"] == "Authorised"));
        sim.stop().await;
    }

    #[actix_web::test]
    async fn invalid_requests_get_422_without_echoing_the_card() {
        let sim = Sim::start().await;
        let bad_pan = "41111111x1111111";
        let mut missing_amount = payment(1000, PAN, "Ecommerce");
        missing_amount.as_object_mut().unwrap().remove("amount");
        let mut missing_number = payment(1000, PAN, "Ecommerce");
        missing_number["paymentMethod"]
            .as_object_mut()
            .unwrap()
            .remove("number");
        let mut missing_reference = payment(1000, PAN, "Ecommerce");
        missing_reference.as_object_mut().unwrap().remove("reference");
        let mut bad_interaction = payment(1000, PAN, "Ecommerce");
        bad_interaction["shopperInteraction"] = json!("Pos");
        let cases: Vec<Vec<u8>> = vec![
            serde_json::to_vec(&missing_amount).unwrap(),
            serde_json::to_vec(&missing_number).unwrap(),
            serde_json::to_vec(&missing_reference).unwrap(),
            serde_json::to_vec(&payment(1000, bad_pan, "Ecommerce")).unwrap(),
            serde_json::to_vec(&bad_interaction).unwrap(),
            format!(r#"{{"reference":"x","paymentMethod":{{"number":"{PAN}""#).into_bytes(),
            format!(
                r#"{{"reference":"x","amount":{{"value":1,"currency":"EUR"}},"paymentMethod":{{"number":{PAN}}}}}"#
            )
            .into_bytes(),
        ];
        for body in cases {
            let (status, json) = sim.pay_raw(Some(KEY), Some("k-bad"), body).await;
            assert_eq!(status, 422, "{json}");
            assert_eq!(json["status"], 422);
            assert_eq!(json["errorCode"], "702");
            assert_eq!(json["errorType"], "validation");
            let text = json.to_string();
            assert!(
                !text.contains(PAN) && !text.contains(bad_pan) && !text.contains("411111"),
                "{text}"
            );
        }
        let got = sim.received().await;
        assert_eq!(got.len(), 7);
        assert!(got.iter().all(|e| e["outcome"] == "error-422" && e["replay"] == false));
        // Unparsable bodies are recorded verbatim, as a string.
        assert!(got[5]["request"].as_str().unwrap().contains(PAN));
        // Invalid requests do not consume the idempotency key.
        let (status, _) = sim.pay(Some("k-bad"), &payment(1000, PAN, "Ecommerce")).await;
        assert_eq!(status, 200);
        sim.stop().await;
    }

    #[actix_web::test]
    async fn delete_received_clears_and_restarts_seq() {
        let sim = Sim::start().await;
        sim.pay(None, &payment(1000, PAN, "Ecommerce")).await;
        sim.pay(None, &payment(1000, PAN, "Ecommerce")).await;
        assert_eq!(sim.received().await.len(), 2);
        let res = sim
            .client
            .delete(format!("{}/__received", sim.base))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), 204);
        assert!(sim.received().await.is_empty());
        sim.pay(None, &payment(1000, PAN, "Ecommerce")).await;
        let got = sim.received().await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["seq"], 1);
        sim.stop().await;
    }

    #[actix_web::test]
    async fn timeout_rule_outlasts_the_client_and_a_retry_replays() {
        let sim = Sim::start().await;
        let req = payment(1504, PAN, "Ecommerce");
        let res = sim
            .client
            .post(format!("{}/payments", sim.base))
            .header("X-API-Key", KEY)
            .header("Idempotency-Key", "k-timeout")
            .json(&req)
            .timeout(Duration::from_millis(300))
            .send()
            .await;
        assert!(res.as_ref().is_err_and(reqwest::Error::is_timeout), "{res:?}");
        // The PSP did authorise it: a retry with the same key gets the stored answer at once.
        let (status, body) = sim.pay(Some("k-timeout"), &req).await;
        assert_eq!(status, 200);
        assert_eq!(body["resultCode"], "Authorised");
        let got = sim.received().await;
        assert_eq!(got.len(), 2);
        assert_eq!(got[0]["outcome"], "timeout");
        assert_eq!(got[0]["replay"], false);
        assert_eq!(got[1]["outcome"], "Authorised");
        assert_eq!(got[1]["replay"], true);
        sim.stop().await;
    }

    #[actix_web::test]
    async fn capture_then_refunds_up_to_the_captured_amount() {
        let sim = Sim::start().await;
        let payment_ref = sim.authorise(10_000, true).await;

        let (status, body) = sim
            .modify("captures", &payment_ref, None, &amount_body(6_000, "cap-1"))
            .await;
        assert_received(status, &body, &payment_ref);
        assert_eq!(body["reference"], "cap-1");
        assert_eq!(body["amount"], json!({"value": 6000, "currency": "EUR"}));

        let (status, body) = sim
            .modify("refunds", &payment_ref, None, &amount_body(2_500, "ref-1"))
            .await;
        assert_received(status, &body, &payment_ref);
        assert_eq!(body["amount"]["value"], 2500);
        // The rest of the captured amount, exactly.
        let (status, body) = sim
            .modify("refunds", &payment_ref, None, &amount_body(3_500, "ref-2"))
            .await;
        assert_received(status, &body, &payment_ref);
        let (status, body) = sim
            .modify("refunds", &payment_ref, None, &amount_body(1, "ref-3"))
            .await;
        assert_error(status, &body, "137");
        assert!(body["message"].as_str().unwrap().contains("exceeds"), "{body}");

        let got = sim.received().await;
        let summary: Vec<(&str, &str, bool)> = got
            .iter()
            .map(|e| {
                (
                    e["operation"].as_str().unwrap(),
                    e["outcome"].as_str().unwrap(),
                    e["replay"].as_bool().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("authorise", "Authorised", false),
                ("capture", "received", false),
                ("refund", "received", false),
                ("refund", "received", false),
                ("refund", "error-422", false),
            ]
        );
        assert!(got[0].get("payment_psp_reference").is_none());
        assert!(
            got[1..]
                .iter()
                .all(|e| e["payment_psp_reference"] == payment_ref.as_str())
        );
        assert_eq!(got[1]["request"], amount_body(6_000, "cap-1"));
        assert_eq!(got[2]["seq"], 3);
        sim.stop().await;
    }

    #[actix_web::test]
    async fn cancel_capture_and_refund_follow_the_payment_state() {
        let sim = Sim::start().await;
        // Manual capture: a cancel is acknowledged; nothing can follow it.
        let manual = sim.authorise(5_000, true).await;
        let (status, body) = sim.modify("cancels", &manual, None, &cancel_body("cancel-1")).await;
        assert_received(status, &body, &manual);
        assert_eq!(body["reference"], "cancel-1");
        assert!(body.get("amount").is_none(), "{body}");
        let (status, body) = sim.modify("captures", &manual, None, &amount_body(5_000, "c")).await;
        assert_error(status, &body, "905");
        let (status, body) = sim.modify("refunds", &manual, None, &amount_body(1_000, "r")).await;
        assert_error(status, &body, "905");
        let (status, body) = sim.modify("cancels", &manual, None, &cancel_body("cancel-2")).await;
        assert_error(status, &body, "905");

        // Automatic capture: no cancel, no capture; a full refund is fine.
        let auto = sim.authorise(7_000, false).await;
        let (status, body) = sim.modify("cancels", &auto, None, &cancel_body("x")).await;
        assert_error(status, &body, "905");
        assert_eq!(body["message"], "cannot cancel a captured payment: refund it");
        let (status, body) = sim.modify("captures", &auto, None, &amount_body(7_000, "c")).await;
        assert_error(status, &body, "905");
        assert_eq!(body["message"], "Payment already captured automatically");
        let (status, body) = sim.modify("refunds", &auto, None, &amount_body(7_000, "r")).await;
        assert_received(status, &body, &auto);

        // Manual capture (boolean flag): no refund before the capture, one capture at most,
        // never more than authorised, in the payment's currency only; then no cancel.
        let mut req = payment(3_000, PAN, "Ecommerce");
        req["additionalData"] = json!({"manualCapture": true});
        let (_, body) = sim.pay(None, &req).await;
        let flagged = body["pspReference"].as_str().unwrap();
        let (status, body) = sim.modify("refunds", flagged, None, &amount_body(1_000, "r")).await;
        assert_error(status, &body, "905");
        let (status, body) = sim.modify("captures", flagged, None, &amount_body(3_001, "c")).await;
        assert_error(status, &body, "137");
        let mut usd = amount_body(1_000, "c");
        usd["amount"]["currency"] = json!("USD");
        let (status, body) = sim.modify("captures", flagged, None, &usd).await;
        assert_error(status, &body, "137");
        let (status, body) = sim.modify("captures", flagged, None, &amount_body(3_000, "c")).await;
        assert_received(status, &body, flagged);
        let (status, body) = sim.modify("captures", flagged, None, &amount_body(1, "c2")).await;
        assert_error(status, &body, "905");
        let (status, body) = sim.modify("cancels", flagged, None, &cancel_body("x")).await;
        assert_error(status, &body, "905");
        assert_eq!(body["message"], "cannot cancel a captured payment: refund it");
        sim.stop().await;
    }

    #[actix_web::test]
    async fn modification_idempotency_replays_and_conflicts() {
        let sim = Sim::start().await;
        let payment_ref = sim.authorise(10_000, true).await;
        let (status, capture) = sim
            .modify("captures", &payment_ref, Some("k-cap"), &amount_body(4_000, "cap"))
            .await;
        assert_received(status, &capture, &payment_ref);
        // The replay is the stored answer and does not capture again.
        let (status, again) = sim
            .modify("captures", &payment_ref, Some("k-cap"), &amount_body(4_000, "cap"))
            .await;
        assert_eq!(status, 201);
        assert_eq!(again, capture);

        // Same key, other body; same key and body, other operation: 704.
        let (status, body) = sim
            .modify("captures", &payment_ref, Some("k-cap"), &amount_body(4_001, "cap"))
            .await;
        assert_error(status, &body, "704");
        assert_eq!(
            body["message"],
            "request already processed or in progress with different body"
        );
        let (status, body) = sim
            .modify("refunds", &payment_ref, Some("k-cap"), &amount_body(4_000, "cap"))
            .await;
        assert_error(status, &body, "704");

        // A refund replayed twice is counted once: the rest of the capture remains refundable.
        let (status, refund) = sim
            .modify("refunds", &payment_ref, Some("k-ref"), &amount_body(3_000, "ref"))
            .await;
        assert_received(status, &refund, &payment_ref);
        let (_, again) = sim
            .modify("refunds", &payment_ref, Some("k-ref"), &amount_body(3_000, "ref"))
            .await;
        assert_eq!(again, refund);
        let (status, body) = sim
            .modify("refunds", &payment_ref, None, &amount_body(1_000, "rest"))
            .await;
        assert_received(status, &body, &payment_ref);

        // A business refusal is stored too, and replayed.
        let (status, refused) = sim
            .modify("refunds", &payment_ref, Some("k-too-much"), &amount_body(1, "more"))
            .await;
        assert_error(status, &refused, "137");
        let (_, again) = sim
            .modify("refunds", &payment_ref, Some("k-too-much"), &amount_body(1, "more"))
            .await;
        assert_eq!(again, refused);

        // One key namespace: a payment's key cannot be reused for a capture.
        let mut req = payment(2_000, PAN, "Ecommerce");
        req["additionalData"] = json!({"manualCapture": "true"});
        let (_, paid) = sim.pay(Some("k-shared"), &req).await;
        let other_ref = paid["pspReference"].as_str().unwrap();
        let (status, body) = sim
            .modify("captures", other_ref, Some("k-shared"), &amount_body(2_000, "c"))
            .await;
        assert_error(status, &body, "704");
        // The payment's replay still works (and adds no second payment).
        let (_, replayed) = sim.pay(Some("k-shared"), &req).await;
        assert_eq!(replayed, paid);
        let (status, body) = sim
            .modify("captures", other_ref, Some("k-shared-cap"), &amount_body(2_000, "c"))
            .await;
        assert_received(status, &body, other_ref);

        let got = sim.received().await;
        let summary: Vec<(&str, &str, bool)> = got
            .iter()
            .map(|e| {
                (
                    e["operation"].as_str().unwrap(),
                    e["outcome"].as_str().unwrap(),
                    e["replay"].as_bool().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("authorise", "Authorised", false),
                ("capture", "received", false),
                ("capture", "received", true),
                ("capture", "error-422", false),
                ("refund", "error-422", false),
                ("refund", "received", false),
                ("refund", "received", true),
                ("refund", "received", false),
                ("refund", "error-422", false),
                ("refund", "error-422", true),
                ("authorise", "Authorised", false),
                ("capture", "error-422", false),
                ("authorise", "Authorised", true),
                ("capture", "received", false),
            ]
        );
        assert_eq!(got[2]["idempotency_key"], "k-cap");
        sim.stop().await;
    }

    #[actix_web::test]
    async fn modification_timeout_rule_outlasts_the_client_and_a_retry_replays() {
        let sim = Sim::start().await;
        let payment_ref = sim.authorise(10_000, true).await;
        let req = amount_body(1_504, "cap-slow");
        let res = sim
            .client
            .post(format!("{}/payments/{payment_ref}/captures", sim.base))
            .header("X-API-Key", KEY)
            .header("Idempotency-Key", "k-slow")
            .json(&req)
            .timeout(Duration::from_millis(300))
            .send()
            .await;
        assert!(res.as_ref().is_err_and(reqwest::Error::is_timeout), "{res:?}");
        // The PSP did take the capture: a retry with the same key gets the stored answer at once.
        let (status, body) = sim.modify("captures", &payment_ref, Some("k-slow"), &req).await;
        assert_received(status, &body, &payment_ref);
        assert_eq!(body["amount"]["value"], 1504);
        // ... and the capture was applied: no second one, and it can be refunded.
        let (status, body) = sim
            .modify("captures", &payment_ref, None, &amount_body(1_000, "again"))
            .await;
        assert_error(status, &body, "905");
        let (status, body) = sim
            .modify("refunds", &payment_ref, None, &amount_body(1_504, "r"))
            .await;
        assert_received(status, &body, &payment_ref);
        let got = sim.received().await;
        assert_eq!(got.len(), 5);
        assert_eq!(got[1]["outcome"], "timeout");
        assert_eq!(got[1]["replay"], false);
        assert_eq!(got[2]["outcome"], "received");
        assert_eq!(got[2]["replay"], true);
        sim.stop().await;
    }

    #[actix_web::test]
    async fn modification_refusal_rule_is_not_stored() {
        let sim = Sim::start().await;
        let payment_ref = sim.authorise(10_000, true).await;
        for _ in 0..2 {
            let (status, body) = sim
                .modify("captures", &payment_ref, Some("k-151"), &amount_body(1_151, "c"))
                .await;
            assert_error(status, &body, "901");
            assert_eq!(body["message"], "Refused by the acquirer (simulated)");
        }
        // The key is still free and the payment still uncaptured.
        let (status, body) = sim
            .modify("captures", &payment_ref, Some("k-151"), &amount_body(2_000, "c"))
            .await;
        assert_received(status, &body, &payment_ref);
        let got = sim.received().await;
        let outcomes: Vec<(&str, bool)> = got[1..]
            .iter()
            .map(|e| (e["outcome"].as_str().unwrap(), e["replay"].as_bool().unwrap()))
            .collect();
        assert_eq!(
            outcomes,
            [("error-422", false), ("error-422", false), ("received", false)]
        );
        sim.stop().await;
    }

    #[actix_web::test]
    async fn unknown_payments_and_malformed_modifications_get_422() {
        let sim = Sim::start().await;
        for _ in 0..2 {
            let (status, body) = sim
                .modify("refunds", "NOSUCHPAYMENT123", Some("k-unknown"), &amount_body(100, "r"))
                .await;
            assert_error(status, &body, "167");
            assert!(body["message"].as_str().unwrap().contains("unknown payment"), "{body}");
        }
        let payment_ref = sim.authorise(10_000, true).await;
        let mut no_amount = amount_body(100, "r");
        no_amount.as_object_mut().unwrap().remove("amount");
        let mut bad_currency = amount_body(100, "r");
        bad_currency["amount"]["currency"] = json!("EU");
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("captures", b"{\"amount\":".to_vec()),
            ("captures", serde_json::to_vec(&no_amount).unwrap()),
            ("refunds", serde_json::to_vec(&no_amount).unwrap()),
            ("captures", serde_json::to_vec(&bad_currency).unwrap()),
            ("refunds", serde_json::to_vec(&amount_body(0, "r")).unwrap()),
            ("captures", br#"{"amount":{"value":-5,"currency":"EUR"}}"#.to_vec()),
            ("cancels", b"[]".to_vec()),
            ("cancels", br#"{"reference":7}"#.to_vec()),
        ];
        for (op, body) in cases {
            let (status, json) = sim.modify_raw(Some(KEY), op, &payment_ref, Some("k-bad"), body).await;
            assert_error(status, &json, "702");
        }
        // None of these consumed the key; a bare cancel body is valid.
        let (status, body) = sim.modify("cancels", &payment_ref, Some("k-bad"), &json!({})).await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["merchantAccount"], Value::Null);
        assert_eq!(body["reference"], Value::Null);
        let got = sim.received().await;
        assert_eq!(got.len(), 12);
        assert_eq!(got[0]["outcome"], "error-422");
        assert_eq!(got[0]["operation"], "refund");
        assert_eq!(got[0]["payment_psp_reference"], "NOSUCHPAYMENT123");
        assert_eq!(got[3]["request"], "{\"amount\":");
        sim.stop().await;
    }

    #[actix_web::test]
    async fn modifications_reject_a_wrong_api_key_without_recording() {
        let sim = Sim::start().await;
        let payment_ref = sim.authorise(10_000, true).await;
        for op in ["captures", "refunds", "cancels"] {
            for key in [None, Some("wrong-key")] {
                let body = serde_json::to_vec(&amount_body(100, "x")).unwrap();
                let (status, json) = sim.modify_raw(key, op, &payment_ref, Some("k-auth"), body).await;
                assert_eq!(status, 401);
                assert_eq!(json["errorType"], "security");
            }
        }
        let got = sim.received().await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["operation"], "authorise");
        // The payment was not modified.
        let (status, body) = sim
            .modify("captures", &payment_ref, Some("k-auth"), &amount_body(100, "x"))
            .await;
        assert_received(status, &body, &payment_ref);
        sim.stop().await;
    }
}
