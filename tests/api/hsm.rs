//! PKCS#11 against SoftHSM2, through the real binary: the key ceremony creates a
//! non-extractable root key in the HSM, the vault serves with it, `keys
//! rotate-root` moves every KEK under a new HSM key, and a restart still opens
//! every record. Skipped (loudly) when SoftHSM2 is not installed, unless
//! TOKENVAULT_REQUIRE_SOFTHSM=1 (as `.ci/run` sets it).

use serde_json::{Value, json};

use crate::helpers::*;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

fn softhsm_available() -> bool {
    if std::path::Path::new(MODULE).exists() {
        return true;
    }
    assert!(
        std::env::var("TOKENVAULT_REQUIRE_SOFTHSM").as_deref() != Ok("1"),
        "SoftHSM2 is required (TOKENVAULT_REQUIRE_SOFTHSM=1) but {MODULE} is missing"
    );
    eprintln!("SKIPPED: softhsm2 not installed ({MODULE} missing); apt-get install softhsm2");
    false
}

#[tokio::test]
async fn pkcs11_root_key_in_softhsm_with_root_rotation() {
    if !softhsm_available() {
        return;
    }
    let dev = TestApp::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("tokens")).unwrap();
    let conf = d.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}/tokens\nobjectstore.backend = file\nlog.level = ERROR\n",
            d.display()
        ),
    )
    .unwrap();
    let conf_s = conf.to_str().unwrap().to_owned();
    let env = [("SOFTHSM2_CONF", conf_s.as_str())];
    let out = std::process::Command::new("softhsm2-util")
        .args([
            "--init-token",
            "--free",
            "--label",
            "tokenvault",
            "--so-pin",
            "1234",
            "--pin",
            "5678",
        ])
        .envs(env)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(d.join("pin"), "5678\n").unwrap();
    std::fs::copy(
        dev.data_dir.join("dev/issuer-ed25519.pub.pem"),
        d.join("issuer.pub.pem"),
    )
    .unwrap();
    let dd = d.display();
    let config = format!(
        r#"
listen = "127.0.0.1:0"
data_dir = "{dd}/data"
allow_root = true

[auth]
issuer = "tokenvault-dev"
audience = "tokenvault"

[[auth.keys]]
kid = "dev-ed25519-1"
alg = "EdDSA"
public_key_file = "{dd}/issuer.pub.pem"

[[clients]]
sub = "dev-edge"
scopes = ["tokens:create"]
tenants = ["acme"]

[[clients]]
sub = "dev-psp"
scopes = ["tokens:detokenize"]
tenants = ["acme"]

[[clients]]
sub = "dev-officer"
scopes = ["keys:admin", "audit:read"]
tenants = ["acme"]
global_admin = true

[keystore]
path = "{dd}/keystore.json"
provider = "pkcs11"

[tls]
mode = "upstream"

[keystore.pkcs11]
module = "{MODULE}"
token_label = "tokenvault"
pin_file = "{dd}/pin"
"#
    );
    let cfg = d.join("tokenvault.toml");
    std::fs::write(&cfg, config).unwrap();
    let cfg_s = cfg.to_str().unwrap();

    let (code, out, err) = run_cli(
        &[
            "keys",
            "--config",
            cfg_s,
            "init",
            "--provider",
            "pkcs11",
            "--key-label",
            "root-1",
        ],
        &env,
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("non-extractable"), "{out}");
    let keystore = std::fs::read_to_string(d.join("keystore.json")).unwrap();
    assert!(keystore.contains("\"kind\": \"pkcs11\"") && keystore.contains("\"root_id\": \"root-1\""));

    let mut prod = TestApp::start_with_env(&["serve", "--config", cfg_s], &env, d.join("data"));
    let edge = dev.jwt("edge", "acme");
    let psp = dev.jwt("psp", "acme");
    let token_file = d.join("officer.jwt");
    std::fs::write(&token_file, dev.jwt("officer", "acme")).unwrap();
    prod.watch("5555555555554444");
    let res = prod
        .client
        .post(prod.url("/v1/tokens"))
        .bearer_auth(&edge)
        .json(&json!({"pan": "5555555555554444", "exp_month": 3, "exp_year": 2030}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201, "an HSM-backed vault serves at once (no unseal)");
    let token = res.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_owned();

    let keys = |args: &[&str]| {
        let mut full = vec![
            "keys",
            "--url",
            &prod.base,
            "--token-file",
            token_file.to_str().unwrap(),
        ];
        full.extend_from_slice(args);
        run_cli(&full, &env)
    };
    let before_rotation = std::fs::read(d.join("keystore.json")).unwrap();
    let (code, out, err) = keys(&["rotate-root", "--key-label", "root-2"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("root-2"), "{out}");
    let (code, out, _) = keys(&["rotate"]);
    assert_eq!(code, 0, "{out}");
    let (_, out, _) = keys(&["status", "--json"]);
    let status: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["provider"], "pkcs11");
    assert_eq!(status["root_id"], "root-2");
    let actions: Vec<&str> = status["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["init", "rotate-root", "rotate"]);

    // Restart: the keystore now names root-2; every record still opens.
    prod.kill();
    drop(prod);
    let prod = TestApp::start_with_env(&["serve", "--config", cfg_s], &env, d.join("data"));
    prod.watch("5555555555554444");
    let res = prod
        .client
        .post(prod.url("/v1/detokenize"))
        .bearer_auth(&psp)
        .json(&json!({"token": token}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap()["pan"], "5555555555554444");

    // rotate-root destroyed root-1 in the HSM: a keystore copy from before the
    // rotation (wrapped under root-1) can never be opened again.
    drop(prod);
    let current = std::fs::read(d.join("keystore.json")).unwrap();
    std::fs::write(d.join("keystore.json"), &before_rotation).unwrap();
    let (code, _, err) = run_cli(&["serve", "--config", cfg_s], &[env[0], ("RUST_LOG", "error")]);
    assert_ne!(code, 0);
    assert!(err.contains("no AES secret key labelled 'root-1'"), "{err}");
    std::fs::write(d.join("keystore.json"), &current).unwrap();

    // The keystore generation is also kept in the HSM: restoring the keystore and
    // the whole data directory together (an old backup) is refused as well.
    let backup = d.join("backup");
    copy_dir(&d.join("data"), &backup.join("data"));
    std::fs::copy(d.join("keystore.json"), backup.join("keystore.json")).unwrap();
    let mut prod = TestApp::start_with_env(&["serve", "--config", cfg_s], &env, d.join("data"));
    let (code, out, err) = run_cli(
        &[
            "keys",
            "--url",
            &prod.base,
            "--token-file",
            token_file.to_str().unwrap(),
            "rotate",
        ],
        &env,
    );
    assert_eq!(code, 0, "{out}{err}");
    prod.kill();
    drop(prod);
    let now_data = d.join("now");
    copy_dir(&d.join("data"), &now_data.join("data"));
    std::fs::copy(d.join("keystore.json"), now_data.join("keystore.json")).unwrap();
    std::fs::remove_dir_all(d.join("data")).unwrap();
    copy_dir(&backup.join("data"), &d.join("data"));
    std::fs::copy(backup.join("keystore.json"), d.join("keystore.json")).unwrap();
    let (code, _, err) = run_cli(&["serve", "--config", cfg_s], &[env[0], ("RUST_LOG", "error")]);
    assert_ne!(code, 0);
    assert!(
        err.contains("keystore rollback refused") && err.contains("HSM"),
        "{err}"
    );
    std::fs::remove_dir_all(d.join("data")).unwrap();
    copy_dir(&now_data.join("data"), &d.join("data"));
    std::fs::copy(now_data.join("keystore.json"), d.join("keystore.json")).unwrap();

    // A keystore pointed at a key the HSM does not hold does not start.
    let edited = std::fs::read_to_string(d.join("keystore.json"))
        .unwrap()
        .replace("\"root-2\"", "\"root-9\"");
    std::fs::write(d.join("keystore.json"), edited).unwrap();
    let (code, _, err) = run_cli(&["serve", "--config", cfg_s], &[env[0], ("RUST_LOG", "error")]);
    assert_ne!(code, 0);
    assert!(err.contains("root-9"), "{err}");
}
