//! The README's curl walk-through, run as written against a real dev-mode server
//! (only the binary path and the port are substituted).

use std::process::Command;

use crate::helpers::*;

#[tokio::test]
async fn readme_walkthrough_works_as_written() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let script = readme_block(&readme, "walkthrough");
    assert!(script.contains("cargo run -q --release -- dev token --role edge"));
    assert!(script.contains("http://127.0.0.1:8080"));

    let app = TestApp::spawn().await;
    app.watch("4111111111111111");
    let script = script
        .replace("cargo run -q --release --", BIN)
        .replace("http://127.0.0.1:8080", &app.base);
    // The walk-through runs from the directory that holds ./data.
    let cwd = app.data_dir.parent().unwrap();
    let out = Command::new("bash")
        .arg("-euo")
        .arg("pipefail")
        .arg("-c")
        .arg(&script)
        .current_dir(cwd)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "walk-through failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    assert!(stdout.contains("HTTP/1.1 201 Created"), "{stdout}");
    let token_line = stdout.lines().find_map(|l| l.strip_prefix("token: ")).unwrap();
    assert_eq!(token_line.len(), 16);
    assert!(token_line.starts_with("411111") && token_line.ends_with("1111"));
    assert!(stdout.contains(&format!(
        "{{\"token\":\"{token_line}\",\"format\":\"bin6_last4\",\"brand\":\"visa\""
    )));
    assert!(stdout.contains("\"type\":\"urn:tokenvault:problem:forbidden\""));
    assert!(stdout.contains(
        "\"pan\":\"4111111111111111\",\"exp_month\":12,\"exp_year\":2030,\"cardholder_name\":\"Ada Lovelace\""
    ));
    let tail: Vec<&str> = stdout.lines().rev().take(3).collect();
    assert_eq!(tail[0], "404");
    assert!(tail[1].contains("urn:tokenvault:problem:not-found"));
    assert_eq!(tail[2], "204");

    // The key-management block, against the same vault (a shell keeps going after
    // the first officer's `destroy`, which exits 10 while it awaits approval).
    let keys = readme_block(&readme, "keys")
        .replace("cargo run -q --release --", BIN)
        .replace("http://127.0.0.1:8080", &app.base);
    let keys = format!("export TOKENVAULT_URL={}\n{keys}", app.base);
    let out = Command::new("bash")
        .arg("-c")
        .arg(&keys)
        .current_dir(cwd)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for expected in [
        "active KEK: v1",
        "rotated: v2 is now active",
        // The walk-through's first token is still held (its second one was deleted).
        "rewrapped 1 records",
        "v1 retired",
        "destruction of v1 requested by dev-officer",
        "v1 destroyed (crypto-shredded): requested by dev-officer, approved by dev-officer-2",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}\n{stderr}"
        );
    }
}

fn readme_block(readme: &str, name: &str) -> String {
    let start = readme.find(&format!("<!-- {name}:start -->")).unwrap();
    let end = readme.find(&format!("<!-- {name}:end -->")).unwrap();
    readme[start..end]
        .lines()
        .skip_while(|l| !l.starts_with("```bash"))
        .skip(1)
        .take_while(|l| !l.starts_with("```"))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[tokio::test]
async fn readme_charge_walkthrough_works_as_written() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let (app, psp) = crate::charges::vault_with_psp(&[]);
    app.watch("5555555555554444");
    let script = readme_block(&readme, "charges")
        .replace("cargo run -q --release --", BIN)
        .replace("http://127.0.0.1:8080", &app.base)
        .replace("http://127.0.0.1:8081", &psp.base);
    let cwd = app.data_dir.parent().unwrap();
    let out = Command::new("bash")
        .arg("-euo")
        .arg("pipefail")
        .arg("-c")
        .arg(&script)
        .current_dir(cwd)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    let first: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    let second: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
    assert_eq!(
        (first["status"].as_str(), first["cvv_sent"].as_bool()),
        (Some("authorised"), Some(true))
    );
    assert_eq!(
        (second["status"].as_str(), second["cvv_sent"].as_bool()),
        (Some("authorised"), Some(false))
    );
    assert_eq!(second["network_transaction_id"], first["network_transaction_id"]);
    assert!(
        lines[2].to_ascii_lowercase().starts_with("idempotent-replayed: true"),
        "{stdout}"
    );
    let received: serde_json::Value = serde_json::from_str(lines[3]).unwrap();
    let reqs = received["requests"].as_array().unwrap();
    assert_eq!(reqs.len(), 2, "the replay did not reach the PSP");
    assert_eq!(reqs[0]["request"]["paymentMethod"]["number"], "5555555555554444");
    assert_eq!(reqs[0]["request"]["paymentMethod"]["cvc"], "737");
    assert!(reqs[1]["request"]["paymentMethod"].get("cvc").is_none());
}

/// The production config of the README (only the certificate-pin placeholders filled in).
fn readme_production_toml() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = &readme[readme.find("## Production mode").unwrap()..];
    section
        .lines()
        .skip_while(|l| !l.starts_with("```toml"))
        .skip(1)
        .take_while(|l| !l.starts_with("```"))
        .map(|l| format!("{}\n", l.replace("…64 hex…", &"ab".repeat(32))))
        .collect()
}

fn load_production(toml: &str) -> Result<tokenvault::config::Settings, String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenvault.toml");
    std::fs::write(&path, toml).unwrap();
    tokenvault::config::Settings::production(&path).map_err(|e| e.to_string())
}

/// Durations are humantime strings and the guards are TOML tables, typed by serde: a table
/// keeps the defaults of the keys it leaves out, `enabled = false` turns a guard off, and the
/// old `key=value,…` strings or a malformed duration are refused with the key named.
#[test]
fn production_config_durations_and_guard_tables_are_typed() {
    use std::time::Duration;
    use tokenvault::limits::LimitClass;
    let base = readme_production_toml();
    let with = |old: &str, new: &str| {
        assert!(base.contains(old), "the README config lacks {old:?}");
        load_production(&base.replacen(old, new, 1))
    };
    let s = with("tokenize = 200 ", "tokenize = 7 ").unwrap();
    let limits = s.rate_limits.unwrap();
    assert_eq!(limits.0[&LimitClass::Tokenize], 7);
    assert_eq!(limits.0[&LimitClass::Charges], 20);
    let s = with("[rate_limits]", "[rate_limits]\nenabled = false").unwrap();
    assert!(s.rate_limits.is_none());
    let s = with(
        "cooldown = \"15m\"              # enabled",
        "enabled = false\ncooldown = \"15m\" #",
    )
    .unwrap();
    assert!(s.anomaly_guard.is_none());
    let s = with("deletion_epoch = \"7d\"", "deletion_epoch = \"off\"").unwrap();
    assert_eq!(s.deletion_epoch, None);
    let s = with("cvv_ttl = \"15m\"", "cvv_ttl = \"90s\"").unwrap();
    assert_eq!(s.cvv_ttl, Duration::from_secs(90));
    assert_eq!(s.keystore.cryptoperiod, Some(Duration::from_secs(90 * 86_400)));
    // The old mini-language: a string where the table belongs.
    let (a, b) = (
        base.find("[rate_limits]").unwrap(),
        base.find("[anomaly_guard]").unwrap(),
    );
    let old_form = format!("rate_limits = \"tokenize=200\"\n{}{}", &base[..a], &base[b..]);
    let e = load_production(&old_form).expect_err("a rate_limits string was accepted");
    assert!(e.contains("configuration error") && e.contains("rate_limits"), "{e}");
    for (old, new, named) in [
        ("detokenize = 50", "detokenize = 0", "detokenize"),
        ("detokenize = 50", "detokenise = 50", "detokenise"),
        ("factor = 10 ", "factor = 0.5 ", "anomaly_guard"),
        ("cvv_ttl = \"15m\"", "cvv_ttl = \"15 minutes-ish\"", "cvv_ttl"),
        (
            "deletion_epoch = \"7d\"",
            "deletion_epoch = \"never\"",
            "deletion_epoch",
        ),
        ("cryptoperiod = \"90d\"", "cryptoperiod = \"0s\"", "cryptoperiod"),
        ("max_per_source = 1000", "max_per_source = 0", "auth_failures"),
    ] {
        let e = with(old, new).err().unwrap_or_else(|| panic!("{new:?} was accepted"));
        assert!(e.contains("configuration error") && e.contains(named), "{new:?}: {e}");
    }
}

/// The README's production config parses and passes the vault's own validation
/// (only the certificate-pin placeholders are filled in).
#[test]
fn readme_production_config_is_accepted() {
    let toml = readme_production_toml();
    assert!(toml.contains("[enumeration_guard]") && toml.contains("global_admin = true"));
    let settings = load_production(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
    assert_eq!(settings.enumeration_guard.unwrap().max_distinct, 5);
    let limits = settings.rate_limits.as_ref().unwrap();
    assert_eq!(limits.0[&tokenvault::limits::LimitClass::Detokenize], 50);
    assert_eq!(settings.anomaly_guard.unwrap().floor, 600);
    assert_eq!(
        settings.deletion_epoch,
        Some(std::time::Duration::from_secs(7 * 24 * 3600))
    );
    assert_eq!(settings.auth.max_token_lifetime_secs, 3600);
    assert!(settings.metrics_listen.is_some());
    assert!(
        settings
            .clients
            .iter()
            .any(|c| c.sub == "officer-alice" && c.global_admin)
    );
}

/// The README's capture-and-refund walk-through, run as written.
#[tokio::test]
async fn readme_payments_walkthrough_works_as_written() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let (app, psp) = crate::charges::vault_with_psp(&[]);
    app.watch("4111111111111111");
    let script = readme_block(&readme, "payments")
        .replace("cargo run -q --release --", BIN)
        .replace("http://127.0.0.1:8080", &app.base)
        .replace("http://127.0.0.1:8081", &psp.base);
    let out = Command::new("bash")
        .arg("-euo")
        .arg("pipefail")
        .arg("-c")
        .arg(&script)
        .current_dir(app.data_dir.parent().unwrap())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(
        (lines[0]["type"].as_str(), lines[0]["status"].as_str()),
        (Some("capture"), Some("received"))
    );
    assert_eq!(
        (lines[1]["type"].as_str(), lines[1]["status"].as_str()),
        (Some("refund"), Some("received"))
    );
    let charge = &lines[2];
    assert_eq!(charge["status"], "partially_refunded");
    assert_eq!(charge["captured_amount"]["value"], 8000);
    assert_eq!(charge["refunded_amount"]["value"], 2500);
    assert_eq!(charge["history"].as_array().unwrap().len(), 2);
}

/// The README's voice-connector walk-through, run as written: a token, then one
/// charge for two identical requests.
#[tokio::test]
async fn readme_voice_walkthrough_works_as_written() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let (app, psp) = crate::charges::vault_with_psp(&[]);
    app.watch("4111111111111111");
    let script = readme_block(&readme, "voice")
        .replace("cargo run -q --release --", BIN)
        .replace("http://127.0.0.1:8080", &app.base);
    let out = Command::new("bash")
        .arg("-euo")
        .arg("pipefail")
        .arg("-c")
        .arg(&script)
        .current_dir(app.data_dir.parent().unwrap())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(
        lines[0]["token_id"].is_string() && lines[0]["error_code"].is_null(),
        "{stdout}"
    );
    assert!(lines[1]["charge_id"].as_str().unwrap().starts_with("ch_"), "{stdout}");
    assert_eq!(
        lines[1]["charge_id"], lines[2]["charge_id"],
        "the resend is the same charge"
    );
    let auths: Vec<serde_json::Value> = psp
        .received()
        .await
        .into_iter()
        .filter(|r| r["operation"] == "authorise" && r["replay"] == false)
        .collect();
    assert_eq!(auths.len(), 1);
    assert_eq!(
        auths[0]["request"]["amount"],
        serde_json::json!({"value": 1999, "currency": "USD"})
    );
}
