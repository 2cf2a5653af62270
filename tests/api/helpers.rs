//! Test harness: each test gets the real `tokenvault` binary as a child process,
//! with its own data directory, on an ephemeral port. All of its logs (stdout and
//! stderr, at debug level) are captured; when the harness is dropped it fails the
//! test if any PAN the test submitted appears in them.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_tokenvault");
/// The PSP simulator, a separate binary (never part of the vault's production binary).
pub(crate) const MOCK_PSP_BIN: &str = env!("CARGO_BIN_EXE_tokenvault-mock-psp");

/// Which backend the suite's vaults use: `TOKENVAULT_TEST_STORE=postgres` gives every
/// vault started in a fresh data directory its own fresh PostgreSQL database (on
/// `TOKENVAULT_TEST_PG`, default the machine's server), kept with that directory
/// across restarts and CLI runs; otherwise sled in the data directory.
pub(crate) fn on_postgres() -> bool {
    std::env::var("TOKENVAULT_TEST_STORE").is_ok_and(|s| s == "postgres")
}

static STORES: Mutex<Vec<(PathBuf, String)>> = Mutex::new(Vec::new());

/// The store URL bound to a data directory (PostgreSQL runs only).
pub(crate) fn store_of(dir: &Path) -> Option<String> {
    STORES
        .lock()
        .unwrap()
        .iter()
        .find(|(d, _)| d == dir)
        .map(|(_, u)| u.clone())
}

/// A fresh PostgreSQL database for `dir`, bound to it for later starts.
pub(crate) fn bind_fresh_database(dir: &Path) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let admin =
        std::env::var("TOKENVAULT_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let name = format!("tv_api_{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
    for sql in [
        format!("DROP DATABASE IF EXISTS {name}"),
        format!("CREATE DATABASE {name}"),
    ] {
        let out = Command::new("psql")
            .args([admin.as_str(), "-q", "-v", "ON_ERROR_STOP=1", "-c", &sql])
            .output()
            .expect("psql");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
    let url = format!("{base}/{name}?sslmode=disable");
    STORES.lock().unwrap().push((dir.to_owned(), url.clone()));
    url
}

/// PANs used across the suite; none may ever appear in a log.
pub(crate) const TEST_PANS: &[&str] = &[
    "4111111111111111",
    "5555555555554444",
    "378282246310005",
    "6011111111111117",
    "4012888888881881",
];

pub(crate) fn luhn_valid(s: &str) -> bool {
    let sum: u32 = s
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if i % 2 == 1 {
                if d * 2 > 9 { d * 2 - 9 } else { d * 2 }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// Appends the Luhn check digit to `body`.
pub(crate) fn with_check_digit(body: &str) -> String {
    (0..10).map(|d| format!("{body}{d}")).find(|c| luhn_valid(c)).unwrap()
}

/// A distinct, valid 16-digit Visa-range PAN for index `i` (unknown to any network).
pub(crate) fn pan_for(i: u64) -> String {
    with_check_digit(&format!("49{:013}", i))
}

pub(crate) fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

pub struct TestApp {
    pub base: String,
    pub data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    child: Option<Child>,
    logs: Arc<Mutex<String>>,
    pub client: reqwest::Client,
    pans: Mutex<Vec<String>>,
    signing: Option<EncodingKey>,
}

impl TestApp {
    /// A dev-mode vault in a fresh data directory.
    pub async fn spawn() -> TestApp {
        TestApp::spawn_with(&[])
    }

    /// A dev-mode vault in a fresh data directory, with extra `serve` flags.
    pub fn spawn_with(extra: &[&str]) -> TestApp {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let dir_arg = dir.to_str().unwrap().to_owned();
        if on_postgres() {
            bind_fresh_database(&dir);
        }
        let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--data-dir", &dir_arg];
        args.extend_from_slice(extra);
        let mut app = TestApp::start(&args, dir);
        app._tmp = Some(tmp);
        app
    }

    /// A dev-mode vault on an existing data directory (a restart).
    pub fn restart_on(dir: &Path) -> TestApp {
        TestApp::start(
            &["serve", "--listen", "127.0.0.1:0", "--data-dir", dir.to_str().unwrap()],
            dir.to_owned(),
        )
    }

    /// A dev-mode vault on an existing data directory, with extra `serve` flags.
    pub fn restart_on_with(dir: &Path, extra: &[&str]) -> TestApp {
        let d = dir.to_str().unwrap().to_owned();
        let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--data-dir", &d];
        args.extend_from_slice(extra);
        TestApp::start(&args, dir.to_owned())
    }

    /// Starts the binary with `args` and waits for it to listen.
    pub fn start(args: &[&str], data_dir: PathBuf) -> TestApp {
        TestApp::start_with_env(args, &[], data_dir)
    }

    /// Like [`TestApp::start`], with extra environment variables.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)], data_dir: PathBuf) -> TestApp {
        let mut child = Command::new(BIN);
        child.env_remove("TOKENVAULT_STORE");
        if let Some(url) = store_of(&data_dir) {
            child.env("TOKENVAULT_STORE", url);
        }
        let mut child = child
            .args(args)
            .env_remove("TOKENVAULT_LISTEN")
            .env_remove("TOKENVAULT_DATA_DIR")
            .envs(env.iter().copied())
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tokenvault");
        let logs = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel::<String>();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let logs = logs.clone();
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if let Some(addr) = line.strip_prefix("tokenvault listening on ") {
                        let _ = tx.send(addr.trim().to_owned());
                    }
                    let mut l = logs.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        let base = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(b) => b,
            Err(_) => {
                let _ = child.kill();
                panic!("server did not start; logs:\n{}", logs.lock().unwrap());
            }
        };
        let signing = std::fs::read(data_dir.join("dev/issuer-ed25519.pem"))
            .ok()
            .map(|pem| EncodingKey::from_ed_pem(&pem).unwrap());
        TestApp {
            base,
            data_dir,
            _tmp: None,
            child: Some(child),
            logs,
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
            pans: Mutex::new(Vec::new()),
            signing,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Everything the server logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// Waits (up to 10 s) until the server's log holds `needle`. Lines reach the test
    /// through a pipe reader thread, so a line written just before a response may
    /// trail that response by a moment.
    pub async fn log_shows(&self, needle: &str) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if self.logs().contains(needle) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Registers a PAN that must never appear in the logs.
    pub fn watch(&self, pan: &str) {
        self.pans.lock().unwrap().push(pan.to_owned());
    }

    /// Signs arbitrary claims with the dev issuer key (for attack tests).
    pub fn sign(&self, claims: &Value, kid: Option<&str>) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, self.signing.as_ref().expect("dev issuer key")).unwrap()
    }

    /// Standard claims for a dev role.
    pub fn claims(&self, role: &str, tenant: &str) -> Value {
        let (sub, scope) = match role {
            "edge" => ("dev-edge", "tokens:create tokens:update"),
            "crm" => ("dev-crm", "tokens:read tokens:delete"),
            "psp" => (
                "dev-psp",
                "tokens:detokenize charges:create charges:read charges:capture charges:refund charges:cancel",
            ),
            "officer" => ("dev-officer", "keys:admin audit:read"),
            "officer2" => ("dev-officer-2", "keys:admin audit:read"),
            "importer" => ("dev-importer", "tokens:create tokens:dedupe"),
            "siem" => ("dev-siem", "audit:read"),
            "operator" => ("dev-operator", "vault:backup"),
            other => panic!("unknown role {other}"),
        };
        let n = now();
        json!({"iss": "tokenvault-dev", "aud": "tokenvault", "sub": sub, "scope": scope,
               "tenant": tenant, "iat": n, "nbf": n, "exp": n + 600})
    }

    /// A valid JWT for a dev role and tenant.
    pub fn jwt(&self, role: &str, tenant: &str) -> String {
        self.sign(&self.claims(role, tenant), Some("dev-ed25519-1"))
    }

    /// A JWT minted by the real CLI (`tokenvault dev token`).
    pub fn cli_jwt(&self, role: &str, tenant: &str) -> String {
        let out = Command::new(BIN)
            .args([
                "dev",
                "token",
                "--role",
                role,
                "--tenant",
                tenant,
                "--data-dir",
                self.data_dir.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// Writes a JWT for `role`/`tenant` to a file (for the CLI's --token-file).
    pub fn token_file(&self, role: &str, tenant: &str) -> PathBuf {
        let path = self.data_dir.with_file_name(format!("{role}-{tenant}.jwt"));
        std::fs::write(&path, self.jwt(role, tenant)).unwrap();
        path
    }

    /// Runs `tokenvault keys <args>` against this server as `role`; returns (exit code, stdout, stderr).
    pub fn keys_cli(&self, role: &str, args: &[&str]) -> (i32, String, String) {
        let token = self.token_file(role, "default");
        let mut full = vec!["keys", "--url", &self.base, "--token-file", token.to_str().unwrap()];
        full.extend_from_slice(args);
        run_cli(&full, &[])
    }

    pub async fn tokenize_as(&self, jwt: &str, body: Value) -> reqwest::Response {
        if let Some(pan) = body.get("pan").and_then(Value::as_str).filter(|p| p.len() >= 12) {
            self.watch(pan);
        }
        self.client
            .post(self.url("/v1/tokens"))
            .bearer_auth(jwt)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// Tokenizes as the edge of `tenant`; returns (status, body).
    pub async fn tokenize(&self, tenant: &str, pan: &str, format: Option<&str>) -> (u16, Value) {
        self.tokenize_by("edge", tenant, pan, format).await
    }

    /// Tokenizes as `role` (e.g. `importer`, which holds tokens:dedupe); returns (status, body).
    pub async fn tokenize_by(&self, role: &str, tenant: &str, pan: &str, format: Option<&str>) -> (u16, Value) {
        let mut body = json!({"pan": pan, "exp_month": 12, "exp_year": 2031, "cardholder_name": "Test Holder"});
        if let Some(f) = format {
            body["format"] = json!(f);
        }
        let res = self.tokenize_as(&self.jwt(role, tenant), body).await;
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    pub async fn read(&self, tenant: &str, token: &str) -> reqwest::Response {
        self.client
            .get(self.url(&format!("/v1/tokens/{token}")))
            .bearer_auth(self.jwt("crm", tenant))
            .send()
            .await
            .unwrap()
    }

    pub async fn detokenize(&self, tenant: &str, token: &str) -> reqwest::Response {
        self.client
            .post(self.url("/v1/detokenize"))
            .bearer_auth(self.jwt("psp", tenant))
            .json(&json!({"token": token}))
            .send()
            .await
            .unwrap()
    }

    pub async fn delete(&self, tenant: &str, token: &str) -> reqwest::Response {
        self.client
            .delete(self.url(&format!("/v1/tokens/{token}")))
            .bearer_auth(self.jwt("crm", tenant))
            .send()
            .await
            .unwrap()
    }

    /// The value of a metric line (exact series match), or 0.
    pub async fn metric(&self, series: &str) -> f64 {
        self.metric_via(&self.client, series).await
    }

    /// Like [`TestApp::metric`], with a given client (e.g. one that trusts a test CA).
    pub async fn metric_via(&self, client: &reqwest::Client, series: &str) -> f64 {
        let text = client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0.0)
    }

    /// The whole audit trail, exported through the CLI as an officer.
    pub fn audit_export(&self) -> Vec<Value> {
        let token_file = self.token_file("officer", "default");
        let (code, out, err) = run_cli(
            &[
                "audit",
                "--url",
                &self.base,
                "--token-file",
                token_file.to_str().unwrap(),
                "export",
            ],
            &[],
        );
        assert_eq!(code, 0, "{err}");
        out.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()).collect()
    }

    /// Hands over the temporary directory, so the data outlives this server.
    pub fn keep_data(&mut self) -> Option<tempfile::TempDir> {
        self._tmp.take()
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGTERM, the graceful stop: waits up to `within` for the process to exit and
    /// returns its status (None: still running).
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .ok()?;
        assert!(sent.success(), "kill -TERM failed");
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: no graceful shutdown, no final flush.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Scans the captured logs for every watched PAN and the suite's test PANs.
    pub fn assert_logs_clean(&self) {
        let logs = self.logs();
        // Every digit string of PAN length found anywhere in the logs, in one pass.
        let mut seen = std::collections::HashSet::new();
        for run in logs.split(|c: char| !c.is_ascii_digit()).filter(|r| r.len() >= 12) {
            for len in 12..=run.len().min(19) {
                for start in 0..=run.len() - len {
                    seen.insert(&run[start..start + len]);
                }
            }
        }
        let watched = self.pans.lock().unwrap().clone();
        for pan in watched.iter().map(String::as_str).chain(TEST_PANS.iter().copied()) {
            assert!(!seen.contains(pan), "test PAN {pan} appeared in the server logs");
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.kill();
        if !std::thread::panicking() {
            // Give the reader threads a moment to drain the pipes.
            std::thread::sleep(Duration::from_millis(20));
            self.assert_logs_clean();
        }
    }
}

/// Runs the CLI; returns (exit code, stdout, stderr).
pub(crate) fn run_cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.env_remove("TOKENVAULT_STORE");
    // An offline command on a data directory whose vault keeps its data in PostgreSQL.
    if let Some(url) = args
        .iter()
        .position(|a| *a == "--data-dir")
        .and_then(|i| args.get(i + 1))
        .and_then(|d| store_of(Path::new(d)))
    {
        cmd.env("TOKENVAULT_STORE", url);
    }
    let out = cmd
        .args(args)
        .env_remove("TOKENVAULT_URL")
        .env_remove("TOKENVAULT_TOKEN_FILE")
        .env_remove("TOKENVAULT_DATA_DIR")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Asserts an RFC 9457 problem response with the given status and code; returns it.
pub(crate) async fn assert_problem(res: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(res.status().as_u16(), status, "status for expected {code}");
    let ct = res.headers().get("content-type").unwrap().to_str().unwrap().to_owned();
    assert_eq!(ct, "application/problem+json");
    let header_id = res.headers().get("x-request-id").unwrap().to_str().unwrap().to_owned();
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["type"], format!("urn:tokenvault:problem:{code}"), "{body}");
    assert_eq!(body["status"], status);
    assert!(body["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert_eq!(
        body["request_id"].as_str(),
        Some(header_id.as_str()),
        "problem carries the request id"
    );
    body
}

/// Copies a directory tree (a stopped vault's data, a backup).
pub(crate) fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Tokenizes `n` cards (PANs `pan_for(from..)`) as the edge, 32 at a time; returns (token, PAN) pairs.
pub(crate) async fn seed(app: &TestApp, tenant: &str, from: u64, n: u64) -> Vec<(String, String)> {
    let edge = app.jwt("edge", tenant);
    futures_util::stream::iter(from..from + n)
        .map(|i| {
            let (app, edge) = (app, edge.clone());
            async move {
                let pan = pan_for(i);
                let res = app
                    .tokenize_as(&edge, json!({"pan": pan, "exp_month": 12, "exp_year": 2031}))
                    .await;
                assert_eq!(res.status(), 201);
                (
                    res.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_owned(),
                    pan,
                )
            }
        })
        .buffer_unordered(32)
        .collect()
        .await
}
