//! Crash suite: 20 SIGKILLs at random moments under mixed tokenize, detokenize,
//! delete, key-rotation and rewrap load. After every restart: no acknowledged
//! write is lost (every acknowledged token opens to its PAN, every acknowledged
//! delete stays deleted) and no record fails to open.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::*;

/// Small deterministic PRNG (xorshift), seeded from the clock and printed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[derive(Default)]
struct Ledger {
    /// Acknowledged and not (possibly) deleted since: token → PAN.
    alive: BTreeMap<String, String>,
    /// Acknowledged deletes.
    deleted: BTreeSet<String>,
    next_pan: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sigkills_lose_nothing_acknowledged() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("crash suite seed: {seed}");
    let mut rng = Rng(seed);
    let mut first = TestApp::spawn().await;
    let keep = first.keep_data();
    let dir = first.data_dir.clone();
    first.kill();
    drop(first);
    let ledger = Arc::new(Mutex::new(Ledger {
        next_pan: 500_000,
        ..Ledger::default()
    }));
    let mut total_acked_writes = 0u64;

    for round in 0..20 {
        let app = Arc::new(TestApp::restart_on(&dir));
        // A crash is not damage: the store's anchor never runs ahead of the store.
        assert_eq!(
            app.metric("tokenvault_store_damaged").await,
            0.0,
            "round {round} (seed {seed}): a crash flagged the store as damaged"
        );
        // Everything acknowledged so far is there.
        let (alive, deleted) = {
            let l = ledger.lock().unwrap();
            (l.alive.clone(), l.deleted.clone())
        };
        for (token, pan) in &alive {
            app.watch(pan);
            let res = app.detokenize("default", token).await;
            assert_eq!(
                res.status(),
                200,
                "round {round} (seed {seed}): acknowledged token {token} lost"
            );
            assert_eq!(res.json::<Value>().await.unwrap()["pan"], pan.as_str());
        }
        for token in &deleted {
            assert_eq!(
                app.detokenize("default", token).await.status(),
                404,
                "round {round}: deleted {token} is back"
            );
        }

        // Mixed load, killed at a random moment.
        let stop_at = Instant::now() + Duration::from_millis(100 + rng.next() % 300);
        let mut workers = Vec::new();
        for w in 0..6u64 {
            let (app, ledger) = (app.clone(), ledger.clone());
            let mut wrng = Rng(rng.next() | 1);
            workers.push(tokio::spawn(async move {
                let mut acked = 0u64;
                while Instant::now() < stop_at {
                    let pick = wrng.next() % 10;
                    if w == 0 && pick == 0 {
                        let _ = app
                            .client
                            .post(app.url("/v1/admin/keys/rotate"))
                            .bearer_auth(app.jwt("officer", "default"))
                            .send()
                            .await;
                    } else if w == 0 {
                        let _ = app
                            .client
                            .post(app.url("/v1/admin/keys/rewrap"))
                            .bearer_auth(app.jwt("officer", "default"))
                            .json(&json!({"batch": 50}))
                            .send()
                            .await;
                    } else if pick < 5 {
                        let pan = {
                            let mut l = ledger.lock().unwrap();
                            l.next_pan += 1;
                            pan_for(l.next_pan)
                        };
                        app.watch(&pan);
                        let sent = app
                            .client
                            .post(app.url("/v1/tokens"))
                            .bearer_auth(app.jwt("edge", "default"))
                            .json(&json!({"pan": pan, "exp_month": 5, "exp_year": 2033}))
                            .send()
                            .await;
                        // A connection cut by the kill is simply not acknowledged.
                        if let Ok(res) = sent
                            && res.status() == 201
                            && let Ok(body) = res.json::<Value>().await
                        {
                            let token = body["token"].as_str().unwrap().to_owned();
                            ledger.lock().unwrap().alive.insert(token, pan);
                            acked += 1;
                        }
                    } else if pick < 8 {
                        let target = ledger
                            .lock()
                            .unwrap()
                            .alive
                            .iter()
                            .nth((wrng.next() % 50) as usize)
                            .map(|(t, p)| (t.clone(), p.clone()));
                        if let Some((token, pan)) = target {
                            let sent = app
                                .client
                                .post(app.url("/v1/detokenize"))
                                .bearer_auth(app.jwt("psp", "default"))
                                .json(&json!({"token": token}))
                                .send()
                                .await;
                            if let Ok(res) = sent
                                && res.status() == 200
                                && let Ok(body) = res.json::<Value>().await
                            {
                                assert_eq!(body["pan"], pan.as_str(), "never a wrong PAN");
                            }
                        }
                    } else {
                        // Take the token out of "alive" first: an unacknowledged delete may or may not land.
                        let target = {
                            let mut l = ledger.lock().unwrap();
                            let t = l.alive.keys().nth((wrng.next() % 50) as usize).cloned();
                            if let Some(t) = &t {
                                l.alive.remove(t);
                            }
                            t
                        };
                        let url = target.as_ref().map(|t| app.url(&format!("/v1/tokens/{t}")));
                        let sent = match &url {
                            Some(u) => Some(app.client.delete(u).bearer_auth(app.jwt("crm", "default")).send().await),
                            None => None,
                        };
                        if let (Some(token), Some(Ok(res))) = (target, sent)
                            && res.status() == 204
                        {
                            ledger.lock().unwrap().deleted.insert(token);
                            acked += 1;
                        }
                    }
                }
                acked
            }));
        }
        tokio::time::sleep(stop_at.saturating_duration_since(Instant::now())).await;
        // SIGKILL while requests are in flight.
        let app = match Arc::try_unwrap(app) {
            Ok(mut a) => {
                a.kill();
                a
            }
            Err(shared) => {
                // Workers still hold it: kill through a raw signal to the child.
                let pid = shared.pid();
                std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status()
                    .unwrap();
                for w in workers.drain(..) {
                    total_acked_writes += w.await.unwrap_or(0);
                }
                Arc::try_unwrap(shared).ok().unwrap()
            }
        };
        for w in workers {
            total_acked_writes += w.await.unwrap_or(0);
        }
        drop(app);
    }

    // Final check, then every record must open: rotate and rewrap everything.
    let app = TestApp::restart_on(&dir);
    let (alive, deleted) = {
        let l = ledger.lock().unwrap();
        (l.alive.clone(), l.deleted.len())
    };
    for (token, pan) in &alive {
        app.watch(pan);
        let res = app.detokenize("default", token).await;
        assert_eq!(res.status(), 200, "(seed {seed}) acknowledged token {token} lost");
        assert_eq!(res.json::<Value>().await.unwrap()["pan"], pan.as_str());
    }
    assert_eq!(app.keys_cli("officer", &["rotate"]).0, 0);
    let (code, out, err) = app.keys_cli("officer", &["rewrap", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let rewrap: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rewrap["failed"], 0, "records that fail to open: {rewrap}");
    let token_file = app.token_file("officer", "default");
    let (code, out, _) = run_cli(
        &[
            "audit",
            "--url",
            &app.base,
            "--token-file",
            token_file.to_str().unwrap(),
            "verify",
        ],
        &[],
    );
    assert_eq!(code, 0, "audit trail after 20 crashes: {out}");
    eprintln!(
        "crash suite: 20 SIGKILLs, {total_acked_writes} acknowledged writes, {} live tokens and {} deletes verified, {} records rewrapped, 0 lost, 0 failed to open",
        alive.len(),
        deleted,
        rewrap["rewrapped"]
    );
    drop(app);
    drop(keep);
}
