//! `tokenvault-mock-psp`: a local simulator of an Adyen-style Checkout `POST /payments` API.
//!
//! It is a **test tool**: outcomes are deterministic, and every request that passed the
//! API-key check is recorded (card data included) so a test can prove which card reached
//! the PSP. It never *logs* card data: a log line carries only the merchant reference, the
//! amount, the result and the idempotency key.
//!
//! # Endpoints
//!
//! | Method and path       | Auth        | Purpose                                                    |
//! |-----------------------|-------------|------------------------------------------------------------|
//! | `POST /payments`      | `X-API-Key` | authorise a card payment (below)                           |
//! | `GET /__received`     | none        | `{"requests":[...]}`: every recorded request, arrival order |
//! | `DELETE /__received`  | none        | forget the recorded requests (`204`); `seq` restarts at 1  |
//!
//! A `POST /payments` without the right `X-API-Key` gets `401` with
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
//! A malformed request (bad JSON; missing `reference`, `amount`, `amount.value`,
//! `amount.currency` or `paymentMethod.number`; a card number that is not 12–19 digits;
//! an unknown `shopperInteraction`) gets `422` with `errorCode` `702` and a message that
//! never repeats the card number; it is recorded with outcome `error-422`. Unknown fields
//! are ignored and `Content-Type` is not enforced.
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
//! # Recording
//!
//! Each entry of `GET /__received` is
//! `{"seq": n, "idempotency_key": "..."|null, "replay": bool, "outcome": "...", "request": <JSON as received>}`
//! (`outcome` is `pending` while a request waits for its idempotency key; an unparsable body is
//! recorded as a JSON string). The number of distinct charges is the number of entries with
//! `replay: false` and outcome `Authorised` or `Refused`.

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
    crate::telemetry::init(crate::config::LogFormat::Pretty);
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
}

impl MockPsp {
    fn new(api_key: String) -> MockPsp {
        MockPsp {
            api_key,
            recorder: Mutex::new(Recorder::default()),
            keys: Mutex::new(HashMap::new()),
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
    fn push(&mut self, idempotency_key: Option<String>, request: Value) -> u64 {
        self.next_id += 1;
        self.seq += 1;
        self.entries.push(Entry {
            id: self.next_id,
            seq: self.seq,
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
    idempotency_key: Option<String>,
    replay: bool,
    outcome: Outcome,
    request: Value,
}

impl Entry {
    fn to_json(&self) -> Value {
        json!({
            "seq": self.seq,
            "idempotency_key": self.idempotency_key,
            "replay": self.replay,
            "outcome": self.outcome.as_str(),
            "request": self.request,
        })
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
    request: Value,
    reply: Reply,
    /// What a replay is recorded as: the stored `resultCode`.
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
    Ok(Payment {
        reference,
        value,
        currency,
        declined_card,
        interaction,
        network_tx_reference,
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
        return (outcome, false, reply);
    };
    let slot = state.slot(key);
    let mut slot = slot.lock().await;
    if let Some(done) = &slot.completed {
        if without_cvc(&done.request) == without_cvc(request) {
            return (done.outcome, true, done.reply.clone());
        }
        return (Outcome::Error422, false, validation_error("704", CONFLICT_MESSAGE));
    }
    let (outcome, reply) = decide(payment, !slot.gateway_error_sent);
    match outcome {
        Outcome::Error502 => slot.gateway_error_sent = true,
        Outcome::Authorised | Outcome::Refused | Outcome::Timeout => {
            let stored = if outcome == Outcome::Timeout {
                Outcome::Authorised
            } else {
                outcome
            };
            slot.completed = Some(Completed {
                request: request.clone(),
                reply: reply.clone(),
                outcome: stored,
            });
        }
        Outcome::Pending | Outcome::Error422 | Outcome::Error500 | Outcome::NoAnswer => {}
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

async fn payments(req: HttpRequest, body: web::Bytes, state: web::Data<MockPsp>) -> HttpResponse {
    if !api_key_ok(&req, &state.api_key) {
        tracing::warn!("mock-psp: rejected a payment with a missing or wrong API key");
        let status = StatusCode::UNAUTHORIZED;
        return HttpResponse::build(status).json(error_body(
            status,
            "000",
            "HTTP Status Response - Unauthorized",
            "security",
        ));
    }
    // `Some(None)`: the header is present but unusable.
    let key: Option<Option<String>> = req.headers().get("Idempotency-Key").map(|v| {
        v.to_str()
            .ok()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    });
    let parsed = serde_json::from_slice::<Value>(&body);
    let request = match &parsed {
        Ok(v) => v.clone(),
        Err(_) => Value::String(String::from_utf8_lossy(&body).into_owned()),
    };
    let id = state.recorder().push(key.clone().flatten(), request);

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
}
