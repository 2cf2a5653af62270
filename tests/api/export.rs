//! The PCI-grade exit: a tenant's cards encrypted to a recipient's OpenPGP key
//! under dual control, fetched once, every step audited.

use pgp::composed::{
    ArmorOptions, EncryptionCaps, KeyType, Message, SecretKeyParamsBuilder, SignedPublicKey, SignedSecretKey,
    SubkeyParamsBuilder,
};
use pgp::crypto::ecc_curve::ECCCurve;
use pgp::types::KeyDetails;
use serde_json::{Value, json};

use crate::helpers::*;

/// A recipient's key pair (the new PSP's), as a test generates it.
fn recipient() -> (SignedSecretKey, String) {
    let mut enc = SubkeyParamsBuilder::default();
    enc.key_type(KeyType::ECDH(ECCCurve::Curve25519Legacy))
        .can_sign(false)
        .can_encrypt(EncryptionCaps::All)
        .can_authenticate(false);
    let mut params = SecretKeyParamsBuilder::default();
    params
        .key_type(KeyType::Ed25519Legacy)
        .can_certify(true)
        .can_sign(true)
        .can_encrypt(EncryptionCaps::None)
        .primary_user_id("New PSP <cards@newpsp.example>".into())
        .subkeys(vec![enc.build().unwrap()]);
    let secret = params.build().unwrap().generate(rand::thread_rng()).unwrap();
    let public = SignedPublicKey::from(secret.clone());
    let armored = public.to_armored_string(ArmorOptions::default()).unwrap();
    (secret, armored)
}

async fn admin(app: &TestApp, role: &str, method: &str, path: &str, body: Option<Value>) -> reqwest::Response {
    let url = app.url(path);
    let req = match method {
        "GET" => app.client.get(url),
        _ => app.client.post(url),
    }
    .bearer_auth(app.jwt(role, "acme"));
    match body {
        Some(b) => req.json(&b),
        None => req,
    }
    .send()
    .await
    .unwrap()
}

#[tokio::test]
async fn an_export_needs_two_officers_is_fetched_once_and_decrypts_to_every_card() {
    let app = TestApp::spawn().await;
    let edge = app.jwt("edge", "acme");
    let mut cards = Vec::new();
    for i in 0..30u64 {
        let pan = pan_for(900_000 + i);
        app.watch(&pan);
        let name = if i % 2 == 0 { "Ada Lovelace" } else { "Grace, Hopper" };
        let res = app
            .tokenize_as(
                &edge,
                json!({"pan": pan, "exp_month": 1 + i % 12, "exp_year": 2031, "cardholder_name": name}),
            )
            .await;
        assert_eq!(res.status(), 201);
        let token = res.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_owned();
        cards.push((token, pan, 1 + i % 12, name));
    }
    let (other, _) = app.tokenize("other", &pan_for(999_001), None).await;
    assert_eq!(other, 201);
    let (secret, armored) = recipient();
    let fingerprint = format!("{:X}", secret.fingerprint());

    // Bad requests and the wrong roles change nothing.
    let res = admin(
        &app,
        "officer",
        "POST",
        "/v1/admin/exports",
        Some(json!({"tenant": "acme", "recipient_key": "not a key"})),
    )
    .await;
    assert_problem(res, 422, "invalid-field").await;
    for role in ["crm", "psp", "edge"] {
        let res = admin(
            &app,
            role,
            "POST",
            "/v1/admin/exports",
            Some(json!({"tenant": "acme", "recipient_key": armored})),
        )
        .await;
        assert_problem(res, 403, "forbidden").await;
    }

    // Officer 1 requests.
    let res = admin(
        &app,
        "officer",
        "POST",
        "/v1/admin/exports",
        Some(json!({"tenant": "acme", "recipient_key": armored})),
    )
    .await;
    assert_eq!(res.status(), 201);
    let request: Value = res.json().await.unwrap();
    let id = request["id"].as_str().unwrap().to_owned();
    assert_eq!(
        (request["status"].as_str(), request["fingerprint"].as_str()),
        (Some("requested"), Some(fingerprint.as_str()))
    );
    let file = format!("/v1/admin/exports/{id}/file");
    // Not before a second officer approves; not by the requester himself.
    assert_problem(
        admin(&app, "officer", "GET", &file, None).await,
        409,
        "key-operation-refused",
    )
    .await;
    let approve = format!("/v1/admin/exports/{id}/approve");
    let p = assert_problem(
        admin(&app, "officer", "POST", &approve, None).await,
        409,
        "key-operation-refused",
    )
    .await;
    assert!(p["detail"].as_str().unwrap().contains("dual control"), "{p}");
    // Officer 2 approves; the file is fetched once.
    let res = admin(&app, "officer2", "POST", &approve, None).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap()["status"], "approved");
    let res = admin(&app, "officer", "GET", &file, None).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/pgp-encrypted");
    assert_eq!(res.headers()["x-export-cards"], "30");
    assert_eq!(res.headers()["cache-control"], "no-store");
    let encrypted = res.bytes().await.unwrap();
    for (_, pan, _, _) in &cards {
        assert!(
            !encrypted.windows(pan.len()).any(|w| w == pan.as_bytes()),
            "a PAN in clear"
        );
    }
    assert_problem(
        admin(&app, "officer", "GET", &file, None).await,
        409,
        "key-operation-refused",
    )
    .await;
    assert_problem(
        admin(&app, "officer2", "GET", &file, None).await,
        409,
        "key-operation-refused",
    )
    .await;
    assert_problem(
        admin(
            &app,
            "officer",
            "GET",
            "/v1/admin/exports/exp_000000000000000000000000/file",
            None,
        )
        .await,
        404,
        "not-found",
    )
    .await;

    // The recipient decrypts it and finds every card of the tenant, and no other.
    let message = Message::from_bytes(&encrypted[..]).unwrap();
    let mut clear = message.decrypt(&"".into(), &secret).unwrap();
    let text = clear.as_data_string().unwrap();
    let mut rows = csv::Reader::from_reader(text.as_bytes());
    assert_eq!(
        rows.headers().unwrap().iter().collect::<Vec<_>>(),
        ["token", "pan", "exp_month", "exp_year", "name"]
    );
    let got: Vec<Vec<String>> = rows
        .records()
        .map(|r| r.unwrap().iter().map(str::to_owned).collect())
        .collect();
    assert_eq!(got.len(), 30, "only the tenant's cards");
    for (token, pan, month, name) in &cards {
        let row = got.iter().find(|r| r[0] == *token).expect("every card");
        assert_eq!(
            (&row[1], &row[2], &row[3], &row[4]),
            (pan, &month.to_string(), &"2031".to_owned(), &name.to_string())
        );
    }

    // Every step is in the audit trail with the key's fingerprint and the count.
    let trail = app.audit_export();
    let step = |action: &str| {
        trail
            .iter()
            .find(|r| r["action"] == action && r["outcome"] == "ok")
            .cloned()
    };
    let requested = step("export.request").unwrap();
    assert_eq!(requested["principal"], "dev-officer");
    assert!(requested["detail"].as_str().unwrap().contains(&fingerprint));
    let approved = step("export.approve").unwrap();
    assert_eq!(approved["principal"], "dev-officer-2");
    let fetched = step("export.fetch").unwrap();
    assert!(fetched["detail"].as_str().unwrap().contains("30 cards"), "{fetched}");
    assert!(fetched["detail"].as_str().unwrap().contains(&fingerprint));
    assert!(
        trail
            .iter()
            .any(|r| r["action"] == "export.fetch" && r["outcome"] == "key-operation-refused")
    );
    app.assert_logs_clean();
}

/// The same through `tokenvault export` (what officers run): request, approve,
/// fetch to a file (once), decrypt.
#[tokio::test]
async fn the_export_cli_walks_the_dual_control() {
    let app = TestApp::spawn().await;
    let (status, meta) = app.tokenize("acme", "4111111111111111", None).await;
    assert_eq!(status, 201);
    let dir = tempfile::tempdir().unwrap();
    let (secret, armored) = recipient();
    let key = dir.path().join("newpsp.asc");
    std::fs::write(&key, armored).unwrap();
    let cli = |role: &str, args: &[&str]| {
        let token = app.token_file(role, "acme");
        let mut all = vec!["export", "--url", &app.base, "--token-file", token.to_str().unwrap()];
        all.extend_from_slice(args);
        run_cli(&all, &[])
    };
    let (code, out, err) = cli(
        "officer",
        &[
            "--json",
            "request",
            "--tenant",
            "acme",
            "--recipient-key",
            key.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let id = serde_json::from_str::<Value>(&out).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let file = dir.path().join("cards.csv.pgp");
    let (code, _, err) = cli("officer", &["fetch", &id, "--out", file.to_str().unwrap()]);
    assert_eq!(code, 1, "refused before approval");
    assert!(err.contains("not approved"), "{err}");
    assert!(!file.exists());
    let (code, out, err) = cli("officer2", &["approve", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("approved by dev-officer-2"), "{out}");
    let (code, out, err) = cli("officer2", &["fetch", &id, "--out", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("1 cards written"), "{out}");
    let (code, _, err) = cli(
        "officer2",
        &["fetch", &id, "--out", dir.path().join("again.pgp").to_str().unwrap()],
    );
    assert_eq!(code, 1);
    assert!(err.contains("fetched once"), "{err}");
    let bytes = std::fs::read(&file).unwrap();
    let text = Message::from_bytes(&bytes[..])
        .unwrap()
        .decrypt(&"".into(), &secret)
        .unwrap()
        .as_data_string()
        .unwrap();
    assert!(
        text.contains(&format!("{},4111111111111111,", meta["token"].as_str().unwrap())),
        "{text}"
    );
}
