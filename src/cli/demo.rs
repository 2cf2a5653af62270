//! `tokenvault demo`: the first five minutes. Starts a dev vault and the PSP
//! simulator on free loopback ports in a temporary directory, walks the story a
//! call center lives (the IVR edge tokenizes, the CRM reads, a denied detokenize,
//! a phone charge with its CVV, a card-on-file renewal, a refund, a key rotation
//! and rewrap, the audit trail verified), prints each step, stops both and
//! removes the directory. Exit 0 when every step did what it should.

use super::exit;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::dev::Role;

struct Style {
    color: bool,
}

impl Style {
    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }
    fn step(&self, n: usize, title: &str) {
        println!("\n{} {}", self.paint("1;36", &format!("[{n}]")), self.paint("1", title));
    }
    fn ok(&self, text: &str) {
        println!("    {} {text}", self.paint("32", "✓"));
    }
    fn note(&self, text: &str) {
        println!("    {}", self.paint("2", text));
    }
}

/// Kills the children when the demo ends, however it ends.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free loopback port: {e}"))
}

pub(super) fn run() -> ExitCode {
    let style = Style {
        color: std::env::var_os("NO_COLOR").is_none() && std::io::IsTerminal::is_terminal(&std::io::stdout()),
    };
    match demo(&style) {
        Ok(()) => {
            println!(
                "\n{}",
                style.paint(
                    "1;32",
                    "The whole story ran. The card number lived only inside the vault."
                )
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("\n{} {e}", style.paint("1;31", "demo failed:"));
            ExitCode::from(exit::FAILED)
        }
    }
}

fn demo(style: &Style) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let psp_bin = exe.with_file_name("tokenvault-mock-psp");
    if !psp_bin.is_file() {
        return Err(format!(
            "the PSP simulator {} is missing: build it with `cargo build --bin tokenvault-mock-psp` (it is not part \
             of the production binary)",
            psp_bin.display()
        ));
    }
    let dir = tempdir()?;
    let result = walk(style, &exe, &psp_bin, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn tempdir() -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!(
        "tokenvault-demo-{}-{}",
        std::process::id(),
        hex::encode(rand::random::<[u8; 4]>())
    ));
    std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

fn walk(style: &Style, exe: &Path, psp_bin: &Path, dir: &Path) -> Result<(), String> {
    let (vault_port, psp_port) = (free_port()?, free_port()?);
    let data = dir.join("data");
    let psp_url = format!("http://127.0.0.1:{psp_port}");
    let url = format!("http://127.0.0.1:{vault_port}");
    let spawn = |cmd: &mut Command| cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn();
    let mut children = Children(Vec::new());
    children.0.push(
        spawn(Command::new(psp_bin).args(["--listen", &format!("127.0.0.1:{psp_port}")]))
            .map_err(|e| format!("cannot start the PSP simulator: {e}"))?,
    );
    children.0.push(
        spawn(Command::new(exe).args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{vault_port}"),
            "--data-dir",
            data.to_str().ok_or("temporary path is not UTF-8")?,
            "--psp-url",
            &psp_url,
        ]))
        .map_err(|e| format!("cannot start the vault: {e}"))?,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| e.to_string())?;
        wait_ready(&http, &format!("{url}/readyz")).await?;
        wait_ready(&http, &format!("{psp_url}/__received")).await?;
        println!(
            "{} a dev vault on {url} (sled in a temporary directory) and the PSP simulator on {psp_url}",
            style.paint("1", "tokenvault demo:")
        );
        let jwt = |role: Role| {
            crate::dev::mint_token(&data, role, "default", Duration::from_secs(600)).map_err(|e| e.to_string())
        };
        let (edge, crm, psp, officer) = (jwt(Role::Edge)?, jwt(Role::Crm)?, jwt(Role::Psp)?, jwt(Role::Officer)?);
        let call =
            |method: &'static str, path: String, token: String, body: Option<Value>, key: Option<&'static str>| {
                let http = http.clone();
                let url = url.clone();
                async move {
                    let mut req = match method {
                        "GET" => http.get(format!("{url}{path}")),
                        _ => http.post(format!("{url}{path}")),
                    }
                    .bearer_auth(token);
                    if let Some(b) = body {
                        req = req.json(&b);
                    }
                    if let Some(k) = key {
                        req = req.header("Idempotency-Key", k);
                    }
                    let res = req.send().await.map_err(|e| e.to_string())?;
                    let status = res.status().as_u16();
                    Ok::<_, String>((status, res.json::<Value>().await.unwrap_or(Value::Null)))
                }
            };
        let expect = |what: &str, got: u16, want: u16, body: &Value| {
            if got == want {
                Ok(())
            } else {
                Err(format!("{what}: HTTP {got}, expected {want}: {body}"))
            }
        };

        style.step(
            1,
            "The caller types the card on the keypad; the IVR edge tokenizes it (with its CVV)",
        );
        let (s, card) = call(
            "POST",
            "/v1/tokens".into(),
            edge.clone(),
            Some(json!({"pan": "4111111111111111", "exp_month": 12, "exp_year": 2031,
                        "cardholder_name": "Ada Lovelace", "cvv": "737"})),
            None,
        )
        .await?;
        expect("tokenize", s, 201, &card)?;
        let token = card["token"].as_str().unwrap_or_default().to_owned();
        style.ok(&format!(
            "token {token}: same length, BIN {} and last four {} kept, fails the Luhn check",
            card["bin"].as_str().unwrap_or(""),
            card["last4"].as_str().unwrap_or("")
        ));
        style.note("the CVV waits in memory only, for the next charge; the PAN is sealed under a per-record DEK");

        style.step(2, "The CRM reads the token's metadata");
        let (s, meta) = call("GET", format!("/v1/tokens/{token}"), crm.clone(), None, None).await?;
        expect("metadata", s, 200, &meta)?;
        style.ok(&format!(
            "{} ending {}, expires {:02}/{}: never the card number",
            meta["brand"].as_str().unwrap_or(""),
            meta["last4"].as_str().unwrap_or(""),
            meta["exp_month"].as_u64().unwrap_or(0),
            meta["exp_year"].as_u64().unwrap_or(0)
        ));

        style.step(3, "The CRM tries to detokenize");
        let (s, denied) = call(
            "POST",
            "/v1/detokenize".into(),
            crm.clone(),
            Some(json!({"token": token})),
            None,
        )
        .await?;
        expect("CRM detokenize", s, 403, &denied)?;
        style.ok("403 forbidden: only the PSP connector may, and the attempt is in the audit trail");

        style.step(
            4,
            "The agent's phone order: the PSP connector charges 19.99 EUR by token",
        );
        let (s, first) = call(
            "POST",
            "/v1/charges".into(),
            psp.clone(),
            Some(
                json!({"token": token, "amount": {"value": 1999, "currency": "EUR"}, "reference": "order-1001",
                        "shopper_interaction": "moto", "recurring": {"model": "subscription", "sequence": "first"}}),
            ),
            Some("demo-order-1001"),
        )
        .await?;
        expect("charge", s, 201, &first)?;
        style.ok(&format!(
            "{}: {} (CVV sent: {}); the vault opened the card, sent it to the PSP and zeroized it",
            first["id"].as_str().unwrap_or(""),
            first["status"].as_str().unwrap_or(""),
            first["cvv_sent"]
        ));

        style.step(5, "Next month: the billing job renews the subscription (card on file)");
        let (s, renewal) = call(
            "POST",
            "/v1/charges".into(),
            psp.clone(),
            Some(
                json!({"token": token, "amount": {"value": 1999, "currency": "EUR"}, "reference": "order-1002",
                        "shopper_interaction": "cont_auth",
                        "recurring": {"model": "subscription", "sequence": "subsequent"}}),
            ),
            Some("demo-order-1002"),
        )
        .await?;
        expect("renewal", s, 201, &renewal)?;
        style.ok(&format!(
            "{}: merchant-initiated, no CVV, network transaction id {} sent",
            renewal["status"].as_str().unwrap_or(""),
            renewal["network_transaction_id"].as_str().unwrap_or("")
        ));

        style.step(6, "The customer calls back: refund 5.00 EUR of the first charge");
        let id = first["id"].as_str().unwrap_or_default().to_owned();
        let (s, refund) = call(
            "POST",
            format!("/v1/charges/{id}/refunds"),
            psp.clone(),
            Some(json!({"amount": {"value": 500, "currency": "EUR"}, "reason": "damaged box"})),
            Some("demo-rma-1"),
        )
        .await?;
        expect("refund", s, 201, &refund)?;
        let (_, charge) = call("GET", format!("/v1/charges/{id}"), psp.clone(), None, None).await?;
        style.ok(&format!(
            "refund {}; the charge is now {} (refunded {} of {})",
            refund["status"].as_str().unwrap_or(""),
            charge["status"].as_str().unwrap_or(""),
            charge["refunded_amount"]["value"],
            charge["amount"]["value"]
        ));

        style.step(7, "A security officer rotates the KEK and rewraps the records online");
        let (s, rotated) = call("POST", "/v1/admin/keys/rotate".into(), officer.clone(), None, None).await?;
        expect("rotate", s, 200, &rotated)?;
        let (s, rewrap) = call(
            "POST",
            "/v1/admin/keys/rewrap".into(),
            officer.clone(),
            Some(json!({})),
            None,
        )
        .await?;
        expect("rewrap", s, 200, &rewrap)?;
        style.ok(&format!(
            "KEK v{} active; {} record(s) rewrapped, {} left under the old version",
            rotated["active"], rewrap["rewrapped"], rewrap["remaining"]
        ));
        let (s, again) = call(
            "POST",
            "/v1/detokenize".into(),
            psp.clone(),
            Some(json!({"token": token})),
            None,
        )
        .await?;
        expect("detokenize after the rewrap", s, 200, &Value::Null)?;
        if again["token"] != token.as_str() {
            return Err("the card did not open after the rewrap".into());
        }
        style.ok("the card still opens (for the PSP connector) under the new key");

        style.step(8, "Every step is in the tamper-evident audit trail");
        let (s, verify) = call("GET", "/v1/admin/audit/verify".into(), officer, None, None).await?;
        expect("audit verify", s, 200, &verify)?;
        if !verify["first_broken"].is_null() {
            return Err(format!("the audit trail does not verify: {verify}"));
        }
        style.ok(&format!(
            "{} records, the hash chain intact, {} MACs verified",
            verify["records"], verify["macs_checked"]
        ));
        Ok(())
    })
}

async fn wait_ready(http: &reqwest::Client, url: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if http.get(url).send().await.is_ok_and(|r| r.status().is_success()) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{url} never became ready"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
