//! Several vault replicas over one PostgreSQL database (issue #10): dev replicas
//! started with the same data directory (dev root key, dev JWT issuer) and the
//! same `--store`. Outside CI these skip when PostgreSQL is unreachable; in CI
//! they must run.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use crate::charges::{MockPsp, charge, charge_body, tokenize_with_cvv};
use crate::helpers::*;

/// Whether the machine's PostgreSQL answers (a failure in CI).
fn postgres_reachable() -> bool {
    let admin =
        std::env::var("TOKENVAULT_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let ok = std::process::Command::new("psql")
        .args([admin.as_str(), "-qAtc", "SELECT 1"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "PostgreSQL unreachable in CI ({admin})"
        );
        eprintln!("skipped: PostgreSQL unreachable at {admin}");
    }
    ok
}

/// `n` dev replicas over one fresh database, sharing one data directory.
fn replicas(n: usize) -> (Vec<TestApp>, tempfile::TempDir) {
    replicas_with(n, &[])
}

/// Like [`replicas`], with extra `serve` flags.
fn replicas_with(n: usize, extra: &[&str]) -> (Vec<TestApp>, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    bind_fresh_database(&dir);
    let d = dir.to_str().unwrap().to_owned();
    let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--data-dir", &d];
    args.extend_from_slice(extra);
    // The first creates the dev keys; the others find them.
    let apps = (0..n).map(|_| TestApp::start(&args, dir.clone())).collect();
    (apps, tmp)
}

/// Verifies the whole trail through the CLI (online, against `app`); returns its output.
fn audit_verify(app: &TestApp) -> String {
    let tf = app.token_file("officer", "default");
    let (code, out, err) = run_cli(
        &[
            "audit",
            "--url",
            &app.base,
            "--token-file",
            tf.to_str().unwrap(),
            "verify",
        ],
        &[],
    );
    assert_eq!(code, 0, "audit verify failed: {out}{err}");
    out
}

/// The same cards tokenized concurrently through three replicas by a deduplicating
/// client: one token per card, one `201` per card, and one audit chain.
#[tokio::test]
async fn same_card_through_every_replica_gives_one_token() {
    if !postgres_reachable() {
        return;
    }
    let (apps, _tmp) = replicas(3);
    let pans: Vec<String> = (0..6).map(|i| pan_for(700_000 + i)).collect();
    let mut futs = Vec::new();
    for pan in &pans {
        for app in &apps {
            for _ in 0..3 {
                futs.push(async move { (pan.clone(), app.tokenize_by("importer", "default", pan, None).await) });
            }
        }
    }
    let results = futures_util::future::join_all(futs).await;
    let mut per_card: BTreeMap<String, (BTreeSet<String>, usize)> = BTreeMap::new();
    for (pan, (status, body)) in &results {
        assert!(*status == 201 || *status == 200, "{status} {body}");
        let e = per_card.entry(pan.clone()).or_default();
        e.0.insert(body["token"].as_str().unwrap().to_owned());
        e.1 += usize::from(*status == 201);
    }
    for (i, (_, (tokens, created))) in per_card.iter().enumerate() {
        assert_eq!(tokens.len(), 1, "card {i}: one token across the replicas: {tokens:?}");
        assert_eq!(*created, 1, "card {i}: stored once");
    }
    // Every replica opens every token.
    for (tokens, _) in per_card.values() {
        let token = tokens.iter().next().unwrap();
        for app in &apps {
            assert_eq!(app.detokenize("default", token).await.status(), 200);
        }
    }
    let out = audit_verify(&apps[2]);
    println!(
        "replicas: {} requests over 3 replicas, {} cards, {out}",
        results.len(),
        pans.len()
    );
}

/// Mixed load through two replicas, one SIGKILLed midway: the other keeps
/// serving, every acknowledged token opens (on the survivor and on a restarted
/// replica), every acknowledged delete stays deleted, and the audit trail written
/// by both is one chain that verifies.
#[tokio::test]
async fn replica_sigkilled_under_load_loses_nothing_and_the_trail_verifies() {
    if !postgres_reachable() {
        return;
    }
    let (mut apps, _tmp) = replicas(2);
    let acked: Arc<std::sync::Mutex<Vec<(String, String)>>> = Default::default();
    let deleted: Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    let (jwt_edge, jwt_psp, jwt_crm) = (
        apps[0].jwt("edge", "default"),
        apps[0].jwt("psp", "default"),
        apps[0].jwt("crm", "default"),
    );
    let bases: Vec<String> = apps.iter().map(|a| a.base.clone()).collect();
    for w in 0..8 {
        // A load balancer's view: a worker whose replica stops answering moves to the other.
        let bases = bases.clone();
        let mut base = bases[w % 2].clone();
        let (acked, deleted, stop) = (acked.clone(), deleted.clone(), stop.clone());
        let (jwt_edge, jwt_psp, jwt_crm) = (jwt_edge.clone(), jwt_psp.clone(), jwt_crm.clone());
        workers.push(tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap();
            let (mut sent, mut errors) = (0u64, 0u64);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let pan = pan_for(800_000 + w as u64 * 100_000 + i);
                sent += 1;
                let res = client
                    .post(format!("{base}/v1/tokens"))
                    .bearer_auth(&jwt_edge)
                    .json(&json!({"pan": pan, "exp_month": 12, "exp_year": 2031}))
                    .send()
                    .await;
                let Ok(res) = res else {
                    errors += 1;
                    base = bases.iter().find(|b| **b != base).unwrap().clone();
                    continue;
                };
                if res.status() != 201 {
                    errors += 1;
                    continue;
                }
                let token = res.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_owned();
                // Every fifth card is deleted again; the rest are read back.
                if i.is_multiple_of(5) {
                    let del = client
                        .delete(format!("{base}/v1/tokens/{token}"))
                        .bearer_auth(&jwt_crm)
                        .send()
                        .await;
                    if del.is_ok_and(|r| r.status() == 204) {
                        deleted.lock().unwrap().push(token);
                    } else {
                        // Unacknowledged: either way is right; not checked.
                    }
                    continue;
                }
                let _ = client
                    .post(format!("{base}/v1/detokenize"))
                    .bearer_auth(&jwt_psp)
                    .json(&json!({ "token": token }))
                    .send()
                    .await;
                acked.lock().unwrap().push((token, pan));
            }
            (sent, errors)
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    apps[1].kill();
    let killed_at = acked.lock().unwrap().len();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut sent, mut errors) = (0, 0);
    for w in workers {
        let (s, e) = w.await.unwrap();
        sent += s;
        errors += e;
    }
    let acked = acked.lock().unwrap().clone();
    let deleted = deleted.lock().unwrap().clone();
    assert!(
        acked.len() > killed_at + 20,
        "the survivor kept serving: {} acknowledged, {killed_at} at the kill",
        acked.len()
    );
    // A replacement replica joins over the same database.
    let dir = apps[0].data_dir.clone();
    apps[1] = TestApp::restart_on(&dir);
    let mut lost = 0;
    for (i, (token, pan)) in acked.iter().enumerate() {
        let app = &apps[i % 2];
        let res = app.detokenize("default", token).await;
        if res.status() != 200 {
            lost += 1;
            continue;
        }
        assert_eq!(res.json::<Value>().await.unwrap()["pan"], pan.as_str());
    }
    assert_eq!(lost, 0, "acknowledged tokens lost");
    for token in &deleted {
        assert_eq!(apps[0].read("default", token).await.status(), 404, "a delete came back");
    }
    // The database holds no card number in clear (records, index, audit trail).
    let url = store_of(&dir).unwrap();
    let dump = std::process::Command::new("pg_dump")
        .args(["--data-only", url.split('?').next().unwrap()])
        .output()
        .unwrap();
    assert!(dump.status.success(), "{}", String::from_utf8_lossy(&dump.stderr));
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(dump.contains("tv_tokens"), "the dump holds the tables");
    let in_clear = acked.iter().filter(|(_, pan)| dump.contains(pan.as_str())).count();
    assert_eq!(in_clear, 0, "PANs in clear in the database dump");
    let out = audit_verify(&apps[1]);
    println!(
        "replicas: {sent} tokenize requests over 2 replicas (one SIGKILLed after {killed_at} acknowledged), \
         {} acknowledged and read back, {} deletes kept, {errors} failed as the replica died (the workers then moved to the survivor), lost 0, {} PANs searched in a {} KB database dump: 0 found; {out}",
        acked.len(),
        deleted.len(),
        acked.len(),
        dump.len() / 1024
    );
    for app in &apps {
        app.assert_logs_clean();
    }
}

/// The same `Idempotency-Key` sent to two replicas at once: one PSP authorisation
/// per key, and every answer names the same charge.
#[tokio::test]
async fn one_idempotency_key_on_two_replicas_authorises_once() {
    if !postgres_reachable() {
        return;
    }
    let psp = MockPsp::spawn();
    let (apps, _tmp) = replicas_with(2, &["--psp-url", &psp.base]);
    let tok = tokenize_with_cvv(&apps[0], "5555555555554444", "737").await;
    let token = tok["token"].as_str().unwrap().to_owned();
    let keys = 10;
    for k in 0..keys {
        let body = charge_body(&token, 1000 + k, "moto", None);
        let key = format!("order-replicas-{k}");
        let sends = apps
            .iter()
            .cycle()
            .take(6)
            .map(|app| charge(app, "psp", "default", Some(&key), &body));
        let answers = futures_util::future::join_all(sends).await;
        let mut ids = BTreeSet::new();
        for res in answers {
            assert_eq!(res.status(), 201);
            let v: Value = res.json().await.unwrap();
            assert_eq!(v["status"], "authorised", "{v}");
            ids.insert(v["id"].as_str().unwrap().to_owned());
        }
        assert_eq!(ids.len(), 1, "key {k}: one charge across the replicas: {ids:?}");
    }
    let seen = psp.received().await;
    let originals = seen.iter().filter(|r| r["replay"] == false).count();
    assert_eq!(originals, keys as usize, "one PSP authorisation per key: {seen:#?}");
    let cvvs = seen
        .iter()
        .filter(|r| r["request"]["paymentMethod"].get("cvc").is_some())
        .count();
    assert_eq!(cvvs, 1, "the CVV went once, with the first charge");
    println!(
        "replicas: {} concurrent charge requests over 2 replicas, {keys} keys, {originals} PSP authorisations, \
         {} PSP replays",
        keys * 6,
        seen.len() - originals
    );
    apps[0].watch("5555555555554444");
}

/// A replica SIGKILLed while the PSP authorises; the caller retries the same key
/// on another replica: still one authorisation (the reservation, durable before
/// the PSP call, carries the PSP idempotency key every replica resends).
#[tokio::test]
async fn replica_killed_mid_charge_then_retry_on_another_charges_once() {
    if !postgres_reachable() {
        return;
    }
    let psp = MockPsp::spawn();
    let (mut apps, _tmp) = replicas_with(2, &["--psp-url", &psp.base, "--psp-timeout", "20s"]);
    let tok = tokenize_with_cvv(&apps[0], "5555555555554444", "737").await;
    let token = tok["token"].as_str().unwrap().to_owned();
    // Amount ending 504: the mock stores its authorisation, then answers only after 30 s.
    let body = charge_body(&token, 8504, "moto", None);
    let (client, url, jwt, sent) = (
        apps[0].client.clone(),
        apps[0].url("/v1/charges"),
        apps[0].jwt("psp", "default"),
        body.clone(),
    );
    let in_flight = tokio::spawn(async move {
        client
            .post(url)
            .bearer_auth(jwt)
            .header("Idempotency-Key", "order-8504")
            .json(&sent)
            .send()
            .await
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while psp.received().await.is_empty() {
        assert!(std::time::Instant::now() < deadline, "the PSP never saw the charge");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    apps[0].kill();
    assert!(in_flight.await.unwrap().is_err(), "the caller never got an answer");
    let res = charge(&apps[1], "psp", "default", Some("order-8504"), &body).await;
    assert_eq!(res.status(), 201);
    let outcome: Value = res.json().await.unwrap();
    assert_eq!(outcome["status"], "authorised", "{outcome}");
    let seen = psp.received().await;
    assert_eq!(seen.iter().filter(|r| r["replay"] == false).count(), 1, "{seen:?}");
    assert_eq!(
        seen.len(),
        2,
        "the original and the other replica's replayed resend: {seen:?}"
    );
    assert_eq!(
        seen[1]["idempotency_key"],
        format!("tv-{}", outcome["id"].as_str().unwrap())
    );
    apps[1].watch("5555555555554444");
}

/// The active KEK version a replica reports (through its admin API).
fn status_of(app: &TestApp) -> Value {
    let (code, out, err) = app.keys_cli("officer", &["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

/// How long until `app` reports `pred` (at most 5 s).
fn until(app: &TestApp, pred: impl Fn(&Value) -> bool) -> Duration {
    let start = std::time::Instant::now();
    loop {
        if pred(&status_of(app)) {
            return start.elapsed();
        }
        assert!(start.elapsed() < Duration::from_secs(5), "never: {}", status_of(app));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A rotation, an online rewrap and a retire made through one replica hold on the
/// other within 2 s; the other then wraps new cards under the new version only,
/// and both agree on the key status.
#[tokio::test]
async fn key_changes_through_one_replica_hold_on_the_other_within_two_seconds() {
    if !postgres_reachable() {
        return;
    }
    let (apps, _tmp) = replicas(2);
    let before = seed(&apps[1], "default", 900_000, 20).await;
    assert_eq!(apps[0].keys_cli("officer", &["rotate"]).0, 0);
    let took = until(&apps[1], |s| s["active"] == 2);
    assert!(took < Duration::from_secs(2), "rotation seen after {took:?}");
    // New cards through the other replica: under v2 only.
    let after = seed(&apps[1], "default", 910_000, 10).await;
    let s = status_of(&apps[0]);
    let records = |s: &Value, v: u64| {
        s["versions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["version"] == v)
            .map_or(0, |x| x["records"].as_u64().unwrap())
    };
    assert_eq!((records(&s, 1), records(&s, 2)), (20, 10), "{s}");
    // Rewrap through the first replica while the second serves; both agree after.
    let (code, out, err) = apps[0].keys_cli("officer", &["rewrap"]);
    assert_eq!(code, 0, "{out}{err}");
    for app in &apps {
        let s = status_of(app);
        assert_eq!((records(&s, 1), records(&s, 2)), (0, 30), "{s}");
    }
    assert_eq!(apps[0].keys_cli("officer", &["retire", "1"]).0, 0);
    let took_retire = until(&apps[1], |s| {
        s["versions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["version"] == 1 && x["state"] == "retired")
    });
    assert!(
        took_retire < Duration::from_secs(2),
        "retire seen after {took_retire:?}"
    );
    // Dual control across replicas: one officer asks through the first replica, a
    // second officer approves through the other (the request is in the shared
    // keystore, under its MAC); the same officer cannot approve on either.
    let (code, out, err) = apps[0].keys_cli("officer", &["destroy", "v1"]);
    assert_eq!(code, 10, "pending approval: {out}{err}");
    until(&apps[1], |s| {
        s["pending_destroy"].as_array().is_some_and(|p| p.len() == 1)
    });
    let (code, _, err) = apps[1].keys_cli("officer", &["destroy", "v1"]);
    assert_eq!(code, 1, "the requester approved their own request");
    assert!(err.contains("different officer"), "{err}");
    let (code, out, err) = apps[1].keys_cli("officer2", &["destroy", "v1"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("requested by dev-officer, approved by dev-officer-2"),
        "{out}"
    );
    let took_destroy = until(&apps[0], |s| {
        s["versions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["version"] == 1 && x["state"] == "destroyed")
    });
    assert!(
        took_destroy < Duration::from_secs(2),
        "destroy seen after {took_destroy:?}"
    );
    let destroy = status_of(&apps[0])["events"]
        .as_array()
        .unwrap()
        .iter()
        .rfind(|e| e["action"] == "destroy")
        .cloned()
        .unwrap();
    assert_eq!(destroy["officers"], json!(["dev-officer", "dev-officer-2"]));
    // The keystore replicas use is the database's: the data directory's dev seed
    // was never changed (it still has v1 active).
    let seed_file = std::fs::read_to_string(apps[0].data_dir.join("keys/keystore.json")).unwrap();
    assert!(!seed_file.contains("destroyed"), "the file keystore was written to");
    // Every card opens on both replicas.
    for (i, (token, pan)) in before.iter().chain(&after).enumerate() {
        let res = apps[i % 2].detokenize("default", token).await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.json::<Value>().await.unwrap()["pan"], pan.as_str());
    }
    audit_verify(&apps[1]);
    println!(
        "replicas: rotation seen by the other replica after {took:?}, retire after {took_retire:?}, \
         destroy (requested on one, approved on the other) after {took_destroy:?}"
    );
}

/// A directory no other test of this run uses (tests run in parallel: a clock in
/// seconds is not enough, two clusters made in the same second collided).
fn unique_dir(prefix: &str) -> std::path::PathBuf {
    use std::sync::atomic::AtomicU32;
    static N: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "{prefix}-{}-{}-{}",
        std::process::id(),
        now(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A PostgreSQL cluster of the test's own (Debian's binaries, run as `postgres`),
/// on a free port, that the test can stop and start.
struct Cluster {
    dir: std::path::PathBuf,
    bin: std::path::PathBuf,
    port: u16,
    /// Extra server settings (`-c name=value`), e.g. for a standby.
    extra: String,
}

impl Cluster {
    /// `None` (a skip outside CI) without Debian's PostgreSQL binaries or root.
    fn create() -> Option<Cluster> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|b| b.join("initdb").exists())
            .max();
        let is_root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        let Some(bin) = bin.filter(|_| is_root) else {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI needs PostgreSQL's binaries and root"
            );
            eprintln!("skipped: no PostgreSQL binaries (or not root) to build a cluster");
            return None;
        };
        let dir = unique_dir("tv-pg");
        std::fs::create_dir_all(&dir).unwrap();
        let run = |args: &[&str]| {
            let out = std::process::Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .args(args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let owned = std::process::Command::new("chown")
            .args(["postgres", dir.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(owned.success());
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let c = Cluster {
            dir,
            bin,
            port,
            extra: String::new(),
        };
        run(&[
            c.bin.join("initdb").to_str().unwrap(),
            "-D",
            c.data().to_str().unwrap(),
            "-A",
            "trust",
            "-U",
            "postgres",
        ]);
        c.start();
        Some(c)
    }

    fn data(&self) -> std::path::PathBuf {
        self.dir.join("pgdata")
    }

    fn ctl(&self, args: &[&str]) {
        let data = self.data();
        let log = self.dir.join("log");
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 {}",
            self.port,
            self.dir.display(),
            self.extra
        );
        let out = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--", self.bin.join("pg_ctl").to_str().unwrap()])
            .args([
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-o",
                &opts,
                "-w",
            ])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start(&self) {
        self.ctl(&["start"]);
    }

    /// Stops the server the hard way (no shutdown checkpoint: a crash).
    fn crash(&self) {
        self.ctl(&["stop", "-m", "immediate"]);
    }

    fn as_postgres(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .args(args)
            .output()
            .unwrap()
    }

    fn sql(&self, sql: &str) -> String {
        let out = std::process::Command::new("psql")
            .args([self.url().as_str(), "-qAtc", sql])
            .output()
            .unwrap();
        assert!(out.status.success(), "{sql}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A hot standby of this cluster, streaming from it (`pg_basebackup -R`), started.
    fn standby(&self) -> Cluster {
        let dir = unique_dir("tv-pg-standby");
        std::fs::create_dir_all(&dir).unwrap();
        assert!(
            std::process::Command::new("chown")
                .args(["postgres", dir.to_str().unwrap()])
                .status()
                .unwrap()
                .success()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let s = Cluster {
            dir,
            bin: self.bin.clone(),
            port,
            // Once promoted it must not wait for a standby of its own.
            extra: "-c synchronous_standby_names=".into(),
        };
        let out = self.as_postgres(&[
            self.bin.join("pg_basebackup").to_str().unwrap(),
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
            "-D",
            s.data().to_str().unwrap(),
            "-R",
            "-X",
            "stream",
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        s.start();
        s
    }

    fn promote(&self) {
        self.ctl(&["promote"]);
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--", self.bin.join("pg_ctl").to_str().unwrap()])
            .args(["-D", self.data().to_str().unwrap(), "stop", "-m", "immediate"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The database crashes under a running vault: while it is down the vault answers
/// `503 store-unavailable` (with `Retry-After`) at once, never a hang or a wrong
/// answer, and `/readyz` follows; once the database is back the vault serves
/// again by itself (no restart), and every write acknowledged before is there.
#[tokio::test]
async fn database_crash_answers_503_then_the_vault_recovers_by_itself() {
    let Some(cluster) = Cluster::create() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let d = dir.to_str().unwrap().to_owned();
    let url = cluster.url();
    let app = TestApp::start(
        &["serve", "--listen", "127.0.0.1:0", "--data-dir", &d, "--store", &url],
        dir.clone(),
    );
    let before = seed(&app, "default", 950_000, 20).await;
    cluster.crash();
    let down = std::time::Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..5 {
        let t = std::time::Instant::now();
        let (status, body) = app.tokenize("default", &pan_for(960_000 + i), None).await;
        slowest = slowest.max(t.elapsed());
        assert_eq!(status, 503, "{body}\n{}", app.logs());
        assert_eq!(body["type"], "urn:tokenvault:problem:store-unavailable");
        let res = app.detokenize("default", &before[0].0).await;
        assert_eq!(res.status(), 503);
        assert_eq!(res.headers()["retry-after"], "1");
    }
    assert!(slowest < Duration::from_secs(6), "an answer took {slowest:?}");
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503, "readiness follows the database");
    cluster.start();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let recovered = loop {
        let (status, _) = app.tokenize("default", &pan_for(970_000), None).await;
        if status == 201 {
            break down.elapsed();
        }
        assert_eq!(status, 503);
        assert!(std::time::Instant::now() < deadline, "the vault never recovered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for (token, pan) in &before {
        let res = app.detokenize("default", token).await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.json::<Value>().await.unwrap()["pan"], pan.as_str());
    }
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    // Metrics count the outage and the writer's reconnection.
    let unavailable = app.metric("tokenvault_store_unavailable_total").await;
    let reconnects = app.metric("tokenvault_store_reconnects_total").await;
    assert!(unavailable >= 10.0, "{unavailable}");
    assert!(reconnects >= 1.0, "{reconnects}");
    audit_verify(&app);
    println!(
        "database crash: 5 tokenize and 5 detokenize requests answered 503 while it was down (slowest {slowest:?}); \
         serving again {recovered:?} after the crash, without a restart; 20/20 earlier tokens open; metrics: \
         {unavailable} store calls unavailable, {reconnects} writer reconnects"
    );
}

/// Keys in one Redis logical database (the test's own).
fn redis_keys(db: u8) -> Vec<String> {
    let client = redis::Client::open(format!("redis://127.0.0.1:6379/{db}")).unwrap();
    let mut conn = client.get_connection().unwrap();
    redis::cmd("KEYS").arg("*").query(&mut conn).unwrap()
}

fn redis_reachable(db: u8) -> bool {
    let ok = redis::Client::open(format!("redis://127.0.0.1:6379/{db}"))
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
        .and_then(|mut c| redis::cmd("FLUSHDB").query::<()>(&mut c))
        .is_ok();
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "Redis unreachable in CI (127.0.0.1:6379)"
        );
        eprintln!("skipped: Redis unreachable at 127.0.0.1:6379");
    }
    ok
}

/// A CVV given to one replica is used by the first charge on the other, exactly
/// once; the next charge sends none; Redis held it only sealed, under a name that
/// is not the token, with its TTL, and holds nothing of it afterwards.
#[tokio::test]
async fn cvv_given_to_one_replica_is_sent_once_by_the_other_and_then_gone() {
    const DB: u8 = 7;
    if !postgres_reachable() || !redis_reachable(DB) {
        return;
    }
    let psp = MockPsp::spawn();
    let redis_url = format!("redis://127.0.0.1:6379/{DB}");
    let (apps, _tmp) = replicas_with(
        2,
        &["--psp-url", &psp.base, "--cvv-redis", &redis_url, "--cvv-ttl", "10m"],
    );
    let tok = tokenize_with_cvv(&apps[0], "4012888888881881", "418").await;
    assert_eq!(tok["cvv_held"], true, "{tok}");
    let token = tok["token"].as_str().unwrap().to_owned();
    // In Redis: one key, not the token; the value sealed; a TTL of at most 10 minutes.
    let keys = redis_keys(DB);
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(!keys[0].contains(&token) && keys[0].starts_with("tv:cvv:"), "{keys:?}");
    let client = redis::Client::open(redis_url.as_str()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let value: Vec<u8> = redis::cmd("GET").arg(&keys[0]).query(&mut conn).unwrap();
    assert!(!value.windows(3).any(|w| w == b"418"), "the CVV is sealed in Redis");
    let ttl: i64 = redis::cmd("PTTL").arg(&keys[0]).query(&mut conn).unwrap();
    assert!(ttl > 0 && ttl <= 600_000, "TTL {ttl} ms");
    // The other replica sees it held, and its first charge sends it.
    let res = charge(
        &apps[1],
        "psp",
        "default",
        Some("cvv-replica-1"),
        &charge_body(&token, 2100, "moto", None),
    )
    .await;
    assert_eq!(res.status(), 201);
    let first: Value = res.json().await.unwrap();
    assert_eq!(first["cvv_sent"], true, "{first}");
    assert!(redis_keys(DB).is_empty(), "taken once, nothing left in Redis");
    let res = charge(
        &apps[0],
        "psp",
        "default",
        Some("cvv-replica-2"),
        &charge_body(&token, 2200, "moto", None),
    )
    .await;
    assert_eq!(res.status(), 201);
    let second: Value = res.json().await.unwrap();
    assert_eq!(second["cvv_sent"], false, "{second}");
    let seen = psp.received().await;
    let with_cvv: Vec<_> = seen
        .iter()
        .filter(|r| r["request"]["paymentMethod"].get("cvc").is_some())
        .collect();
    assert_eq!(with_cvv.len(), 1, "the CVV reached the PSP exactly once: {seen:?}");
    assert_eq!(with_cvv[0]["request"]["paymentMethod"]["cvc"], "418");
    assert!(redis_keys(DB).is_empty());
    for app in &apps {
        app.watch("4012888888881881");
        assert!(!app.logs().contains("\"418\""), "the CVV never reaches a log");
    }
}

/// A Redis that snapshots to disk is refused: CVVs must stay in memory only.
#[tokio::test]
async fn a_redis_that_persists_is_refused_for_cvvs() {
    if !postgres_reachable() {
        return;
    }
    let Ok(server) = std::process::Command::new("redis-server").arg("--version").output() else {
        assert!(std::env::var_os("CI").is_none(), "CI needs redis-server");
        return;
    };
    assert!(server.status.success());
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut redis = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "60 1",
            "--appendonly",
            "no",
        ])
        .args(["--dir", dir.path().to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    bind_fresh_database(&data);
    let url = format!("redis://127.0.0.1:{port}");
    let out = std::process::Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
            "--cvv-redis",
            &url,
        ])
        .env("TOKENVAULT_STORE", store_of(&data).unwrap())
        .output()
        .unwrap();
    let _ = redis.kill();
    let _ = redis.wait();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("persists to disk"), "{err}");
}

/// Database failover, for real: a primary and a synchronous hot standby built
/// here, vault replicas on a multi-host URL (`target_session_attrs=read-write`),
/// a mixed load; the primary is SIGKILLed (an immediate stop) and the standby
/// promoted. During the gap the vaults answer 503 (never a wrong answer, never
/// past their timeout), they recover by themselves, and every write acknowledged
/// before, during and after is there; the audit trail verifies.
#[tokio::test]
async fn failover_to_a_synchronous_standby_loses_no_acknowledged_write() {
    let Some(primary) = Cluster::create() else { return };
    let standby = primary.standby();
    primary.sql("ALTER SYSTEM SET synchronous_standby_names = '*'");
    primary.sql("SELECT pg_reload_conf()");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while primary.sql("SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'") != "1" {
        assert!(
            std::time::Instant::now() < deadline,
            "the standby never became synchronous"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?sslmode=disable&target_session_attrs=read-write",
        primary.port, standby.port
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let d = dir.to_str().unwrap().to_owned();
    let args = ["serve", "--listen", "127.0.0.1:0", "--data-dir", &d, "--store", &url];
    let apps = [TestApp::start(&args, dir.clone()), TestApp::start(&args, dir.clone())];
    let jwt = apps[0].jwt("edge", "default");
    let acked: Arc<std::sync::Mutex<Vec<(String, String, u8)>>> = Default::default();
    let statuses: Arc<std::sync::Mutex<BTreeMap<u16, u64>>> = Default::default();
    // (first 503, last 503) and the slowest answer.
    type Gap = (Option<std::time::Instant>, Option<std::time::Instant>, Duration);
    let gap: Arc<std::sync::Mutex<Gap>> = Arc::new(std::sync::Mutex::new((None, None, Duration::ZERO)));
    let phase = Arc::new(std::sync::atomic::AtomicU8::new(0)); // 0 before, 1 during, 2 after
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..6u64 {
        let base = apps[(w % 2) as usize].base.clone();
        let (jwt, acked, statuses, gap, phase, stop) = (
            jwt.clone(),
            acked.clone(),
            statuses.clone(),
            gap.clone(),
            phase.clone(),
            stop.clone(),
        );
        workers.push(tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(15))
                .build()
                .unwrap();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let pan = pan_for(1_000_000 + w * 100_000 + i);
                let p = phase.load(Ordering::Relaxed);
                let t = std::time::Instant::now();
                let res = client
                    .post(format!("{base}/v1/tokens"))
                    .bearer_auth(&jwt)
                    .json(&json!({"pan": pan, "exp_month": 12, "exp_year": 2031}))
                    .send()
                    .await
                    .expect("the vault answers (never a dropped connection)");
                let status = res.status().as_u16();
                {
                    let mut g = gap.lock().unwrap();
                    g.2 = g.2.max(t.elapsed());
                    if status == 503 {
                        let now = std::time::Instant::now();
                        g.0.get_or_insert(now);
                        g.1 = Some(now);
                    }
                }
                *statuses.lock().unwrap().entry(status).or_default() += 1;
                if status == 201 {
                    let token = res.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_owned();
                    acked.lock().unwrap().push((token, pan, p));
                } else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    phase.store(1, Ordering::Relaxed);
    primary.crash();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    standby.promote();
    phase.store(2, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let statuses = statuses.lock().unwrap().clone();
    let (first, last, slowest) = *gap.lock().unwrap();
    let others: u64 = statuses
        .iter()
        .filter(|(s, _)| **s != 201 && **s != 503)
        .map(|(_, n)| n)
        .sum();
    assert_eq!(others, 0, "only 201 and 503 answers: {statuses:?}");
    assert!(slowest < Duration::from_secs(11), "an answer took {slowest:?}");
    let after = acked.iter().filter(|(_, _, p)| *p == 2).count();
    assert!(after > 0, "the vaults serve again after the failover: {statuses:?}");
    // Every acknowledged write is on the promoted standby.
    let mut lost = 0;
    for (i, (token, pan, _)) in acked.iter().enumerate() {
        let res = apps[i % 2].detokenize("default", token).await;
        if res.status() != 200 {
            lost += 1;
            continue;
        }
        assert_eq!(res.json::<Value>().await.unwrap()["pan"], pan.as_str());
    }
    assert_eq!(lost, 0, "acknowledged writes lost");
    let out = audit_verify(&apps[1]);
    let window = match (first, last) {
        (Some(a), Some(b)) => b - a,
        _ => Duration::ZERO,
    };
    println!(
        "failover: {} requests {statuses:?}; acknowledged {} ({} before, {} during, {after} after the kill), lost 0; \
         longest 503 window {window:?}, slowest answer {slowest:?}; {out}",
        statuses.values().sum::<u64>(),
        acked.len(),
        acked.iter().filter(|(_, _, p)| *p == 0).count(),
        acked.iter().filter(|(_, _, p)| *p == 1).count(),
    );
}

/// `store copy`: a stopped sled vault (two KEK versions, deletions, charges, its
/// audit trail) into PostgreSQL, killed midway and run again; the vault then
/// starts on the copy: every token opens, deleted ones stay gone, charges are
/// there and the audit trail verifies.
#[tokio::test]
async fn store_copy_moves_a_sled_vault_to_postgres_resumably() {
    if !postgres_reachable() {
        return;
    }
    let psp = MockPsp::spawn();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let d = dir.to_str().unwrap().to_owned();
    let mut app = TestApp::start(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &d,
            "--psp-url",
            &psp.base,
        ],
        dir.clone(),
    );
    let mut cards = seed(&app, "default", 1_200_000, 1500).await;
    assert_eq!(app.keys_cli("officer", &["rotate"]).0, 0);
    cards.extend(seed(&app, "default", 1_300_000, 300).await);
    let deleted: Vec<String> = cards.drain(..20).map(|(t, _)| t).collect();
    for t in &deleted {
        assert_eq!(app.delete("default", t).await.status(), 204);
    }
    let mut charges = Vec::new();
    for (i, (token, _)) in cards.iter().take(3).enumerate() {
        let body = charge_body(token, 3000 + i as u64, "moto", None);
        let res = charge(&app, "psp", "default", Some(&format!("copy-{i}")), &body).await;
        assert_eq!(res.status(), 201);
        charges.push(res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned());
    }
    app.kill();
    drop(app);

    let url = bind_fresh_database(&dir);
    let copy_args = [
        "store",
        "copy",
        "--from",
        &format!("sled:{d}/sled"),
        "--to",
        &url,
        "--data-dir",
        &d,
    ];
    // Killed midway (if it is not done by then), then run again to the end.
    let mut first = std::process::Command::new(BIN)
        .args(copy_args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let _ = first.kill();
    let _ = first.wait();
    let query = |sql: &str| -> u64 {
        std::process::Command::new("psql")
            .args([url.split('?').next().unwrap(), "-qAtc", sql])
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(0)
    };
    // The killed copy's server sessions end (a COMMIT it sent may still land) before
    // the count: otherwise a loaded machine counts a batch too early.
    let settle = std::time::Instant::now();
    while query("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")
        > 0
        && settle.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let partial = query("SELECT count(*) FROM tv_tokens");
    let (code, out, err) = run_cli(&copy_args, &[]);
    assert_eq!(code, 0, "{out}{err}");
    let total = cards.len() as u64;
    assert!(out.contains(&format!("copied and verified: {total} records")), "{out}");
    assert!(
        out.contains(&format!("{} new in this run, {total} opened", total - partial)),
        "{out}"
    );
    // Once more: nothing new, still verified.
    let (code, again, err) = run_cli(&copy_args, &[]);
    assert_eq!(code, 0);
    assert!(again.contains("(0 new in this run"), "{again}");
    assert!(err.contains("keystore already in"), "{err}");
    // The keystore came along, byte for byte (rotated: v2 active), before any vault
    // ran on the database.
    let in_db = std::process::Command::new("psql")
        .args([
            url.split('?').next().unwrap(),
            "-qAtc",
            "SELECT convert_from(body, 'UTF8') FROM tv_keystore",
        ])
        .output()
        .unwrap();
    let file = std::fs::read_to_string(dir.join("keys/keystore.json")).unwrap();
    assert_eq!(String::from_utf8_lossy(&in_db.stdout).trim(), file.trim());

    // The vault on the copy (the data directory is bound to the database now).
    let app = TestApp::restart_on(&dir);
    assert!(app.log_shows("store=postgres").await, "runs on PostgreSQL");
    for (token, pan) in &cards {
        let res = app.detokenize("default", token).await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.json::<Value>().await.unwrap()["pan"], pan.as_str());
    }
    for t in &deleted {
        assert_eq!(app.read("default", t).await.status(), 404);
    }
    for id in &charges {
        let res = app
            .client
            .get(app.url(&format!("/v1/charges/{id}")))
            .bearer_auth(app.jwt("psp", "default"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.json::<Value>().await.unwrap()["status"], "authorised");
    }
    let verified = audit_verify(&app);
    println!(
        "store copy: {total} records (killed after {partial}, then resumed), {} charges; {out} {verified}",
        charges.len()
    );
}

/// `tokenvault store migrate` creates the schema ahead of a rollout (the vaults
/// find it done), and refuses a database whose schema is newer than the binary.
#[tokio::test]
async fn store_migrate_prepares_the_schema_and_refuses_a_newer_one() {
    if !postgres_reachable() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let url = bind_fresh_database(&tmp.path().join("unused"));
    let (code, out, err) = run_cli(&["store", "migrate", "--store", &url], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("schema at version"), "{out}");
    let psql = |sql: &str| {
        let o = std::process::Command::new("psql")
            .args([url.split('?').next().unwrap(), "-qAtc", sql])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    };
    let version: u64 = psql("SELECT version FROM tv_schema").parse().unwrap();
    assert!(out.contains(&format!("version {version} ")), "{out}");
    assert_eq!(
        psql("SELECT count(*) FROM tv_keystore"),
        "0",
        "no keystore yet: keys init makes it"
    );
    // Again: nothing to do, same answer.
    assert_eq!(run_cli(&["store", "migrate", "--store", &url], &[]).0, 0);
    psql("UPDATE tv_schema SET version = version + 1");
    let (code, _, err) = run_cli(&["store", "migrate", "--store", &url], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("newer than this vault knows"), "{err}");
    // A sled URL needs no migration: a usage error, not a silent success.
    let (code, _, err) = run_cli(&["store", "migrate", "--store", "sled:/tmp/x"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("postgres://"), "{err}");
}

/// Production replicas over one database, as the chart's postgres mode runs them:
/// the key ceremony (`keys --config init`) writes the keystore into the database
/// (the config names no keystore file), each replica starts sealed and is unsealed
/// by two custodians, and both then serve one vault; the CVV Redis URL comes from
/// a file (`cvv_redis_file`).
#[tokio::test]
async fn production_replicas_keep_the_keystore_in_the_database() {
    if !postgres_reachable() || !redis_reachable(4) {
        return;
    }
    let dev = TestApp::spawn().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let url = bind_fresh_database(&dir.join("r0"));
    let layout = crate::cli::prod_layout(&dev, dir);
    let file_keystore = dir.join("keystore.json");
    std::fs::remove_file(&file_keystore).unwrap();
    std::fs::write(dir.join("redis-url"), "redis://127.0.0.1:6379/4\n").unwrap();
    let config = layout
        .replace(&format!("path = \"{}\"\n", file_keystore.display()), "")
        .replace(
            "allow_root = true",
            &format!("allow_root = true\ncvv_redis_file = \"{}/redis-url\"", dir.display()),
        )
        .replace("[keystore]", &format!("[store]\nurl = \"{url}\"\n\n[keystore]"));
    assert!(!config.contains("keystore.json"), "{config}");
    let cfg = dir.join("pg.toml");
    std::fs::write(&cfg, &config).unwrap();
    let shares = dir.join("pg-shares");
    let (code, out, err) = run_cli(
        &[
            "keys",
            "--config",
            cfg.to_str().unwrap(),
            "init",
            "--shares",
            "3",
            "--threshold",
            "2",
            "--share-dir",
            shares.to_str().unwrap(),
            "--officer",
            "ceremony-officer",
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("keystore created in the database"), "{out}");
    assert!(!file_keystore.exists(), "no keystore file was written");
    // A second ceremony never overwrites it.
    let again = run_cli(
        &[
            "keys",
            "--config",
            cfg.to_str().unwrap(),
            "init",
            "--share-dir",
            shares.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(again.0, 2, "{}", again.2);
    assert!(again.2.contains("already holds a keystore"), "{}", again.2);

    let apps: Vec<TestApp> = (0..2)
        .map(|i| {
            let data = dir.join(format!("r{i}"));
            let d = data.to_str().unwrap().to_owned();
            TestApp::start(&["serve", "--config", cfg.to_str().unwrap(), "--data-dir", &d], data)
        })
        .collect();
    for app in &apps {
        assert!(app.log_shows("SEALED").await, "a production replica starts sealed");
        for share in [1, 2] {
            let share = shares.join(format!("share-{share}.txt"));
            let (code, _, err) = crate::cli::unseal_with(app, &dev, dir, &share);
            assert_eq!(code, 0, "{err}");
        }
    }
    // One vault: a card tokenized through one replica, its metadata read by the CRM
    // through the other.
    let edge = dev.jwt("edge", "acme");
    let body = json!({"pan": "4111111111111111", "exp_month": 12, "exp_year": 2031});
    apps[0].watch("4111111111111111");
    apps[1].watch("4111111111111111");
    let res = apps[0]
        .client
        .post(apps[0].url("/v1/tokens"))
        .bearer_auth(&edge)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let token = res.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_owned();
    let res = apps[1]
        .client
        .get(apps[1].url(&format!("/v1/tokens/{token}")))
        .bearer_auth(dev.jwt("crm", "acme"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap()["last4"], "1111");
    assert!(
        !apps[0].logs().contains("CVVs are held in this replica's memory"),
        "cvv_redis_file was read: CVVs are shared"
    );
}

/// Refunds racing on two replicas over one charge: each is decided against what
/// the others already reserved (compare-and-set on the charge row), so their sum
/// never exceeds the capture, and each key reaches the PSP once.
#[tokio::test]
async fn concurrent_refunds_on_two_replicas_never_exceed_the_capture() {
    if !postgres_reachable() {
        return;
    }
    let psp = MockPsp::spawn();
    let (apps, _tmp) = replicas_with(2, &["--psp-url", &psp.base]);
    let (status, meta) = apps[0].tokenize("default", "4111111111111111", None).await;
    assert_eq!(status, 201);
    let body = charge_body(meta["token"].as_str().unwrap(), 10_000, "moto", None);
    let res = charge(&apps[0], "psp", "default", Some("refund-race"), &body).await;
    assert_eq!(res.status(), 201);
    let id = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    // 16 refunds of 15.00 (and each sent twice, once per replica) against 100.00.
    let sends = (0..32).map(|i| {
        let app = &apps[i % 2];
        let key = format!("rma-{}", i / 2);
        let url = app.url(&format!("/v1/charges/{id}/refunds"));
        let jwt = app.jwt("psp", "default");
        async move {
            let res = app
                .client
                .post(url)
                .bearer_auth(jwt)
                .header("Idempotency-Key", key)
                .json(&json!({"amount": {"value": 1500, "currency": "EUR"}}))
                .send()
                .await
                .unwrap();
            let status = res.status().as_u16();
            (status, res.json::<Value>().await.unwrap())
        }
    });
    let answers = futures_util::future::join_all(sends).await;
    let accepted: BTreeSet<String> = answers
        .iter()
        .filter(|(s, _)| *s == 201)
        .map(|(_, v)| v["id"].as_str().unwrap().to_owned())
        .collect();
    for (s, v) in &answers {
        assert!(
            *s == 201 || (*s == 422 && v["type"].as_str().unwrap().ends_with("amount-not-allowed")),
            "{s} {v}"
        );
    }
    assert_eq!(accepted.len(), 6, "6 × 15.00 fit in 100.00, a 7th does not");
    let charge: Value = apps[1]
        .client
        .get(apps[1].url(&format!("/v1/charges/{id}")))
        .bearer_auth(apps[1].jwt("psp", "default"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(charge["refunded_amount"]["value"], 9_000, "{charge}");
    assert_eq!(charge["status"], "partially_refunded");
    let refunds: Vec<Value> = psp
        .received()
        .await
        .into_iter()
        .filter(|r| r["operation"] == "refund" && r["replay"] == false)
        .collect();
    assert_eq!(refunds.len(), 6, "one PSP refund per accepted key");
    println!(
        "replicas: 32 refund requests (16 keys, each on both replicas) against one 100.00 capture: 6 accepted, \
         refunded 90.00, {} PSP refunds",
        refunds.len()
    );
}
