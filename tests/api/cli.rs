//! The CLI's refusals and production mode's explicit configuration.

use std::process::Command;
use std::time::Duration;

use crate::helpers::*;

#[test]
fn dev_token_refuses_a_non_dev_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args([
            "dev",
            "token",
            "--role",
            "edge",
            "--data-dir",
            dir.path().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a dev-mode data directory"));
    assert!(out.stdout.is_empty());
}

#[test]
fn dev_mode_refuses_a_non_loopback_address() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--data-dir",
            dir.path().join("d").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
    assert!(!dir.path().join("d").exists(), "nothing was created");
}

fn write_prod_config(dir: &std::path::Path, body: &str) -> std::path::PathBuf {
    let p = dir.join("tokenvault.toml");
    std::fs::write(&p, body).unwrap();
    p
}

/// A production layout: the dev issuer's public key (as the IdP key), and a
/// keystore from a real key ceremony (`keys init`, 2-of-3 custodian shares).
pub fn prod_layout(dev: &TestApp, dir: &std::path::Path) -> String {
    std::fs::copy(
        dev.data_dir.join("dev/issuer-ed25519.pub.pem"),
        dir.join("issuer.pub.pem"),
    )
    .unwrap();
    let keystore = dir.join("keystore.json");
    let shares = dir.join("shares");
    let (code, out, err) = run_cli(
        &[
            "keys",
            "init",
            "--shares",
            "3",
            "--threshold",
            "2",
            "--keystore",
            keystore.to_str().unwrap(),
            "--share-dir",
            shares.to_str().unwrap(),
            "--officer",
            "ceremony-officer",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("2 of 3 shares unseal it"), "{out}");
    assert!(!out.contains("tvs1."), "with --share-dir the shares are never printed");
    let d = dir.display();
    format!(
        r#"
listen = "127.0.0.1:0"
data_dir = "{d}/data"
# CI runs as root; production refuses that unless allowed.
allow_root = true

[auth]
issuer = "tokenvault-dev"
audience = "tokenvault"

[[auth.keys]]
kid = "dev-ed25519-1"
alg = "EdDSA"
public_key_file = "{d}/issuer.pub.pem"

[[clients]]
sub = "dev-edge"
scopes = ["tokens:create"]
tenants = ["acme"]

[[clients]]
sub = "dev-crm"
scopes = ["tokens:read"]
tenants = ["acme"]

[[clients]]
sub = "dev-officer"
scopes = ["keys:admin", "audit:read"]
tenants = ["acme"]
global_admin = true

[keystore]
path = "{d}/keystore.json"
provider = "sealed"

[tls]
mode = "upstream"
"#
    )
}

/// Submits custodian share `i` (1-based) with the real `tokenvault unseal`.
pub fn unseal_with(
    prod: &TestApp,
    dev: &TestApp,
    dir: &std::path::Path,
    share: &std::path::Path,
) -> (i32, String, String) {
    let token = dir.join("officer.jwt");
    std::fs::write(&token, dev.jwt("officer", "acme")).unwrap();
    let ca = dir.join("ca.pem");
    let mut args = vec![
        "unseal",
        "--url",
        &prod.base,
        "--token-file",
        token.to_str().unwrap(),
        "--share-file",
        share.to_str().unwrap(),
    ];
    if prod.base.starts_with("https://") {
        args.extend_from_slice(&["--ca-file", ca.to_str().unwrap()]);
    }
    run_cli(&args, &[])
}

#[tokio::test]
async fn production_mode_requires_explicit_config_and_enforces_the_registry() {
    let dev = TestApp::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let full = prod_layout(&dev, dir.path());

    // Each required piece removed in turn: refused at start, naming what is missing.
    let cut = |from: &str, to: &str| full.replace(from, to);
    let broken = [
        ("no config file", None, "not found"),
        (
            "no JWT keys",
            Some(cut(
                "[[auth.keys]]\nkid = \"dev-ed25519-1\"\nalg = \"EdDSA\"",
                "[auth.nokeys]\nkid = \"x\"\nalg = \"EdDSA\"",
            )),
            "keys",
        ),
        (
            "empty issuer",
            Some(cut("issuer = \"tokenvault-dev\"", "issuer = \"\"")),
            "issuer",
        ),
        ("no audience", Some(cut("audience = \"tokenvault\"", "")), "audience"),
        (
            "no clients",
            Some(full.split("[[clients]]").next().unwrap().to_owned() + &full[full.find("[keystore]").unwrap()..]),
            "clients",
        ),
        (
            "no keystore",
            Some(full[..full.find("[keystore]").unwrap()].to_owned()),
            "keystore",
        ),
        (
            "wildcard tenant",
            Some(cut("tenants = [\"acme\"]", "tenants = [\"*\"]")),
            "wildcard",
        ),
        (
            "unknown provider",
            Some(cut("provider = \"sealed\"", "provider = \"file\"")),
            "provider",
        ),
        (
            "pkcs11 without its section",
            Some(cut("provider = \"sealed\"", "provider = \"pkcs11\"")),
            "pkcs11",
        ),
        (
            "PSP host not allow-listed",
            Some(format!(
                "{full}\n[psp]\nbase_url = \"https://evil.example/v71\"\napi_key_file = \"/dev/null\"\nmerchant_account = \"M\"\nallowed_hosts = [\"checkout-test.adyen.com\"]\n"
            )),
            "not in allowed_hosts",
        ),
        (
            "plain-http PSP",
            Some(format!(
                "{full}\n[psp]\nbase_url = \"http://psp.internal/v71\"\napi_key_file = \"/dev/null\"\nmerchant_account = \"M\"\nallowed_hosts = [\"psp.internal\"]\n"
            )),
            "https",
        ),
        (
            "no TLS section",
            Some(full.replace("[tls]\nmode = \"upstream\"", "")),
            "requires a [tls] section",
        ),
        (
            "native TLS without a certificate",
            Some(full.replace("mode = \"upstream\"", "mode = \"native\"")),
            "cert_file",
        ),
        (
            "CVV TTL too long",
            Some(full.replace("[auth]", "cvv_ttl = \"2h\"\n\n[auth]")),
            "cvv_ttl",
        ),
        (
            "HMAC algorithm",
            Some(cut("alg = \"EdDSA\"", "alg = \"HS256\"")),
            "HS256",
        ),
    ];
    for (name, body, expect) in broken {
        let path = match body {
            Some(b) => write_prod_config(dir.path(), &b),
            None => dir.path().join("missing.toml"),
        };
        let out = Command::new(BIN)
            .args(["serve", "--config", path.to_str().unwrap()])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{name}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{name}: {err}");
    }

    // Root is refused in production unless explicitly allowed.
    if std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:\t0\t"))
    {
        let path = write_prod_config(dir.path(), &full.replace("allow_root = true", ""));
        let out = Command::new(BIN)
            .args(["serve", "--config", path.to_str().unwrap()])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to run as root"));
    }

    // A dev data directory is refused in production mode.
    let with_dev_dir = full.replace(
        &format!("{}/data", dir.path().display()),
        dev.data_dir.to_str().unwrap(),
    );
    let path = write_prod_config(dir.path(), &with_dev_dir);
    let out = Command::new(BIN)
        .args(["serve", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("dev-mode data directory"));

    // The complete config starts, logs JSON, and the registry's tenant list binds.
    let path = write_prod_config(dir.path(), &full);
    let prod = TestApp::start(&["serve", "--config", path.to_str().unwrap()], dir.path().join("data"));
    assert!(
        prod.logs()
            .lines()
            .any(|l| l.starts_with('{') && l.contains("\"level\"")),
        "JSON logs in production"
    );
    // It starts sealed; two of the three custodians unseal it.
    for share in [1, 3] {
        let share = dir.path().join(format!("shares/share-{share}.txt"));
        let (code, _, err) = unseal_with(&prod, &dev, dir.path(), &share);
        assert_eq!(code, 0, "{err}");
    }
    let edge = dev.jwt("edge", "acme");
    let body = serde_json::json!({"pan": "4111111111111111", "exp_month": 12, "exp_year": 2031});
    prod.watch("4111111111111111");
    let res = prod
        .client
        .post(prod.url("/v1/tokens"))
        .bearer_auth(&edge)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let token = res.json::<serde_json::Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    // Registry does not grant tenant "globex" to dev-edge, even with a valid JWT.
    let res = prod
        .client
        .post(prod.url("/v1/tokens"))
        .bearer_auth(dev.jwt("edge", "globex"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_problem(res, 403, "forbidden").await;
    // Registry grants dev-crm only tokens:read: a JWT claiming tokens:delete is not enough.
    let res = prod
        .client
        .delete(prod.url(&format!("/v1/tokens/{token}")))
        .bearer_auth(dev.jwt("crm", "acme"))
        .send()
        .await
        .unwrap();
    assert_problem(res, 403, "forbidden").await;
    // dev-psp is not in the production registry at all.
    let res = prod
        .client
        .post(prod.url("/v1/detokenize"))
        .bearer_auth(dev.jwt("psp", "acme"))
        .json(&serde_json::json!({"token": token}))
        .send()
        .await
        .unwrap();
    assert_problem(res, 403, "forbidden").await;
    let res = prod
        .client
        .get(prod.url(&format!("/v1/tokens/{token}")))
        .bearer_auth(dev.jwt("crm", "acme"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    // Revocation without a restart: dev-crm leaves the registry, SIGHUP re-reads it,
    // and the same (cached, still valid) JWT is refused from the next request on.
    let crm = dev.jwt("crm", "acme");
    let revoked = full.replace("sub = \"dev-crm\"", "sub = \"dev-crm-revoked\"");
    assert_ne!(revoked, full);
    std::fs::write(&path, &revoked).unwrap();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &prod.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let res = prod
            .client
            .get(prod.url(&format!("/v1/tokens/{token}")))
            .bearer_auth(&crm)
            .send()
            .await
            .unwrap();
        if res.status() == 403 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "SIGHUP did not revoke dev-crm");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(prod.log_shows("client registry reloaded (SIGHUP)").await);
    // A JWT living longer than auth.max_token_lifetime_secs (default 1 h) is refused.
    let mut claims = dev.claims("edge", "acme");
    claims["exp"] = serde_json::json!(now() + 2 * 3600);
    let long = dev.sign(&claims, Some("dev-ed25519-1"));
    let res = prod
        .client
        .post(prod.url("/v1/tokens"))
        .bearer_auth(long)
        .json(&body)
        .send()
        .await
        .unwrap();
    let problem = assert_problem(res, 401, "unauthenticated").await;
    assert_eq!(
        problem["detail"], "the bearer token is missing or not valid",
        "no reason to the caller"
    );
    assert_eq!(
        prod.metric("tokenvault_auth_failures_total{reason=\"lifetime\"}").await,
        1.0
    );
}

/// The PSP simulator records card numbers: it is its own binary, and none of it is
/// linked into the vault's binary (which is what the container image ships).
#[test]
fn the_vault_binary_carries_no_psp_simulator() {
    let vault = std::fs::read(BIN).unwrap();
    let mock = std::fs::read(MOCK_PSP_BIN).unwrap();
    let marker = b"mock-psp listening on";
    let holds = |bin: &[u8]| bin.windows(marker.len()).any(|w| w == marker);
    assert!(holds(&mock), "the simulator binary carries its own banner");
    assert!(!holds(&vault), "the vault binary must not contain the simulator");
    let out = std::process::Command::new(BIN).arg("mock-psp").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "no mock-psp subcommand");
}

/// `tokenvault demo` walks the whole story against its own dev vault and PSP
/// simulator and exits 0, leaving nothing behind; no card number is printed.
#[test]
fn the_demo_walks_the_whole_story() {
    let out = std::process::Command::new(BIN)
        .arg("demo")
        .env("NO_COLOR", "1")
        .env_remove("TOKENVAULT_DATA_DIR")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in 1..=8 {
        assert!(stdout.contains(&format!("[{step}]")), "step {step} missing:\n{stdout}");
    }
    assert_eq!(stdout.matches('✓').count(), 9, "{stdout}");
    assert!(
        stdout.contains("403 forbidden") && stdout.contains("partially_refunded"),
        "{stdout}"
    );
    assert!(stdout.contains("The whole story ran."));
    assert!(!stdout.contains("4111111111111111"), "a PAN was printed");
    assert!(!stdout.contains("\u{1b}["), "NO_COLOR is honoured");
}

/// A graceful stop (SIGTERM) drains the server, then signals every background task
/// (sweepers, rotations, the deletion epoch) and waits for each to finish its step:
/// the process exits 0 promptly and says every task stopped.
#[tokio::test]
async fn a_stopping_vault_stops_its_background_tasks() {
    let mut app = TestApp::spawn_with(&[
        "--deletion-epoch",
        "1h",
        "--cryptoperiod",
        "90d",
        "--retention",
        "default=400d",
    ]);
    let (status, _) = app.tokenize("default", "4111111111111111", None).await;
    assert_eq!(status, 201);
    let exit = app
        .terminate(Duration::from_secs(20))
        .expect("the vault did not stop within 20 s of SIGTERM");
    assert!(exit.success(), "{exit:?}");
    std::thread::sleep(Duration::from_millis(100));
    let logs = app.logs();
    // cvv sweeper, cryptoperiod and nonce-budget rotation, auth-failure summaries, token expiry,
    // retention, deletion epoch: 7 tasks in dev mode with these flags.
    let line = logs
        .lines()
        .find(|l| l.contains("background tasks stopped"))
        .unwrap_or_else(|| panic!("no stop line in the log:\n{logs}"));
    assert!(line.contains("stopped=7") && line.contains("total=7"), "{line}");
    assert!(!logs.contains("did not stop in time"), "{logs}");
}

/// Connection URLs may carry passwords: `--help` names their environment variables but never
/// prints the values set in them (clap shows `[env: NAME=value]` unless told not to).
#[test]
fn help_never_prints_a_secret_from_the_environment() {
    let env = [
        ("TOKENVAULT_CVV_REDIS", "redis://:redis-s3cret@cvv:6379"),
        ("TOKENVAULT_STORE", "postgres://u:db-s3cret@db/tokenvault"),
    ];
    for args in [
        &["serve", "--help"][..],
        &["keys", "--help"],
        &["keys", "status", "--help"],
        &["store", "migrate", "--help"],
    ] {
        let (code, out, err) = run_cli(args, &env);
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(out.contains("TOKENVAULT_"), "{args:?} names its variables:\n{out}");
        assert!(
            !out.contains("s3cret") && !err.contains("s3cret"),
            "{args:?} printed a secret:\n{out}"
        );
    }
}

/// sled's page cache is sized by `--sled-cache-mb` (`[store] cache_mb`): a vault with the
/// smallest cache stores and opens cards as any other; a size out of range is refused at
/// start, naming the setting, before anything is created.
#[tokio::test]
async fn sled_cache_size_is_set_and_checked() {
    let app = TestApp::spawn_with(&["--sled-cache-mb", "16", "--enumeration-guard", "off"]);
    let mut stored = Vec::new();
    for i in 0..200u32 {
        let pan = with_check_digit(&format!("411111{i:09}"));
        let (status, body) = app.tokenize("default", &pan, None).await;
        assert_eq!(status, 201, "{body}");
        stored.push((pan, body["token"].as_str().unwrap().to_owned()));
    }
    for (pan, token) in &stored {
        let res = app.detokenize("default", token).await;
        assert_eq!(res.status(), 200);
        let body: serde_json::Value = res.json().await.unwrap();
        assert_eq!(body["pan"], pan.as_str());
    }

    let dir = tempfile::tempdir().unwrap();
    for bad in ["8", "2000000"] {
        let out = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("d"))
            .args(["--sled-cache-mb", bad])
            .env_remove("TOKENVAULT_STORE")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--sled-cache-mb"), "{bad}: {err}");
        assert!(!dir.path().join("d").exists(), "nothing was created");
    }
    // The same range in a production file: refused at start, naming the setting.
    let dev = TestApp::spawn().await;
    let full = prod_layout(&dev, dir.path());
    let path = write_prod_config(dir.path(), &format!("{full}\n[store]\ncache_mb = 8\n"));
    let out = Command::new(BIN)
        .args(["serve", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("store.cache_mb"), "{err}");
}
