//! Builds the application from [`Settings`] and binds its listener, exposing the
//! bound address so tests can start the real server on port 0.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::middleware::from_fn;
use actix_web::{App, HttpServer, web};

use crate::api::{self, AppState};
use crate::auth::{AuthConfigError, Authenticator};
use crate::config::{KeystoreSettings, ProviderKind};
use crate::config::{Mode, Settings};
use crate::keys::keystore::{Keystore, KeystoreAt, KeystoreError, RootKey};
use crate::keys::manager::KeyManager;
use crate::metrics::Metrics;
use crate::service::{Vault, VaultError};
use crate::store::StoreError;

/// Why the server could not start. Messages name files and causes, never secrets.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Keystore(#[from] KeystoreError),
    #[error(transparent)]
    Auth(#[from] AuthConfigError),
    #[error("cannot start the vault: {0}")]
    Vault(#[from] VaultError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("{0} is a dev-mode data directory; production mode refuses it")]
    DevDataDir(std::path::PathBuf),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("audit trail: {0}")]
    Audit(#[from] crate::audit::AuditError),
    #[error(
        "the audit trail's head does not verify: the trail or its anchor was altered; investigate (tokenvault \
         audit verify, the SIEM's copy) before starting"
    )]
    HeadUnverified(#[source] crate::audit::HeadError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("PSP connector: {0}")]
    Psp(#[from] crate::psp::PspSetupError),
    #[error("cannot prepare data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// An unseal refused because the trail's head does not verify (the cause is the source).
#[derive(Debug, thiserror::Error)]
#[error("the audit trail's head does not verify")]
struct HeadUnverified(#[source] crate::audit::HeadError);

/// Where this configuration's keystore lives: in the store when the store keeps
/// one (PostgreSQL: every replica shares it, `tv_keystore`), else the configured
/// file beside a sled store.
pub fn keystore_at(ks: &KeystoreSettings, store: &Arc<dyn crate::store::Store>) -> KeystoreAt {
    if store.holds_keystore() {
        KeystoreAt::Shared(Arc::new(crate::store::StoreKeystore(store.clone())))
    } else {
        KeystoreAt::File(ks.path.clone())
    }
}

/// Dev mode over a shared database: the data directory's dev keystore seeds the
/// database's the first time. Replicas started with the same data directory import
/// the same file; the first import wins and the others find it there. (Production
/// keystores reach the database by `tokenvault keys init` or `tokenvault store copy`.)
fn seed_dev_keystore(ks: &KeystoreSettings, at: &KeystoreAt) -> Result<(), KeystoreError> {
    if ks.dev_root_key_file.is_none() || matches!(at, KeystoreAt::File(_)) || at.exists()? {
        return Ok(());
    }
    let bytes = KeystoreAt::File(ks.path.clone()).read_bytes()?;
    match at.write_new(&bytes) {
        Ok(()) => {
            tracing::info!(from = %ks.path.display(), to = %at, "dev keystore placed in the database");
            Ok(())
        }
        Err(_) if at.exists()? => Ok(()),
        Err(e) => Err(e),
    }
}

/// Opens the keys as configured, from `at` ([`keystore_at`]): dev root file
/// (auto-unsealed), custodian shares (starts sealed) or an HSM key (PKCS#11).
pub fn open_keys(ks: &KeystoreSettings, at: KeystoreAt) -> Result<KeyManager, StartupError> {
    seed_dev_keystore(ks, &at)?;
    if let Some(file) = &ks.dev_root_key_file {
        let root = RootKey::load(file)?;
        let keystore = Keystore::open(&at, crate::dev::dev_provider(&root))?;
        return Ok(KeyManager::unsealed(keystore)?);
    }
    if !at.exists()? {
        let hint = match &at {
            KeystoreAt::Shared(_) if ks.path.exists() => format!(
                "; the keystore file {} is not used with a PostgreSQL store: `tokenvault store copy` moves a sled \
                 vault (keystore included) into the database",
                ks.path.display()
            ),
            _ => String::new(),
        };
        return Err(StartupError::Keystore(KeystoreError::Refused(format!(
            "no keystore in {at}; create one with `tokenvault keys init`{hint}"
        ))));
    }
    match ks.provider {
        ProviderKind::Sealed => {
            if Keystore::peek(&at)?.shamir.is_none() {
                return Err(StartupError::Keystore(KeystoreError::Refused(
                    "the keystore is not protected by custodian shares (provider mismatch)".into(),
                )));
            }
            Ok(KeyManager::sealed(at)?)
        }
        ProviderKind::Pkcs11 => {
            let Some(hsm) = &ks.pkcs11 else {
                return Err(StartupError::Keystore(KeystoreError::Refused(
                    "missing [keystore.pkcs11]".into(),
                )));
            };
            let info = Keystore::peek(&at)?;
            let provider = crate::keys::open_pkcs11(hsm, &info.root_id, false).map_err(KeystoreError::from)?;
            let keystore = Keystore::open(&at, provider)?;
            Ok(KeyManager::unsealed(keystore)?)
        }
    }
}

/// The keystore rollback guard: the highest keystore generation the vault has seen
/// lives in the store, outside the keystore file.
pub struct StoreGenerationGuard(pub Arc<dyn crate::store::Store>);

impl crate::keys::manager::GenerationGuard for StoreGenerationGuard {
    fn check(&self, generation: u64) -> Result<(), KeystoreError> {
        let seen = self
            .0
            .keystore_generation()
            .map_err(|e| KeystoreError::Refused(format!("cannot read the keystore generation: {e}")))?;
        if generation < seen {
            return Err(KeystoreError::Refused(format!(
                "keystore rollback refused: the keystore is generation {generation}, but this vault has already \
                 used generation {seen}. An older keystore file was restored; it may bring back destroyed keys. \
                 Put the current keystore back (see SECURITY.md, key destruction and backups)"
            )));
        }
        if generation > seen {
            self.0
                .set_keystore_generation(generation)
                .map_err(|e| KeystoreError::Refused(format!("cannot record the keystore generation: {e}")))?;
        }
        Ok(())
    }
}

/// The same rollback guard kept in the HSM (pkcs11 provider): survives restoring
/// the keystore and the data directory together.
pub struct HsmGenerationGuard(pub crate::config::Pkcs11Settings);

impl crate::keys::manager::GenerationGuard for HsmGenerationGuard {
    fn check(&self, generation: u64) -> Result<(), KeystoreError> {
        let seen = crate::keys::pkcs11::hsm_generation(&self.0)?;
        if generation < seen {
            return Err(KeystoreError::Refused(format!(
                "keystore rollback refused: the keystore is generation {generation}, but the HSM records \
                 generation {seen}. An older keystore (or a whole older backup) was restored; it may bring back \
                 destroyed keys"
            )));
        }
        if generation > seen {
            crate::keys::pkcs11::set_hsm_generation(&self.0, generation)?;
        }
        Ok(())
    }
}

/// Every guard must agree (the store's, and the HSM's for the pkcs11 provider).
struct AllGuards(Vec<Arc<dyn crate::keys::manager::GenerationGuard>>);

impl crate::keys::manager::GenerationGuard for AllGuards {
    fn check(&self, generation: u64) -> Result<(), KeystoreError> {
        self.0.iter().try_for_each(|g| g.check(generation))
    }
}

/// The keystore rollback guard for this configuration: the store always; the HSM
/// too with the pkcs11 provider.
pub fn generation_guard(
    ks: &KeystoreSettings,
    store: Arc<dyn crate::store::Store>,
) -> Arc<dyn crate::keys::manager::GenerationGuard> {
    let mut guards: Vec<Arc<dyn crate::keys::manager::GenerationGuard>> = vec![Arc::new(StoreGenerationGuard(store))];
    if ks.provider == ProviderKind::Pkcs11
        && ks.dev_root_key_file.is_none()
        && let Some(hsm) = &ks.pkcs11
    {
        guards.push(Arc::new(HsmGenerationGuard(hsm.clone())));
    }
    Arc::new(AllGuards(guards))
}

/// How long a stopping vault waits for a background task to finish its step.
const BACKGROUND_STOP: Duration = Duration::from_secs(30);

/// A background task's view of the vault stopping.
struct StopSignal(tokio::sync::watch::Receiver<bool>);

impl StopSignal {
    /// Waits `d`: true to go on, false once the vault is stopping.
    async fn pause(&mut self, d: Duration) -> bool {
        if *self.0.borrow() {
            return false;
        }
        tokio::select! {
            () = actix_web::rt::time::sleep(d) => true,
            () = self.stopped() => false,
        }
    }

    /// Resolves once the vault is stopping.
    async fn stopped(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

/// The vault's background tasks (sweepers, rotations, the deletion epoch, registry
/// reloads). Each looks for the stop signal only between its steps, so a stopping vault
/// never cuts one in the middle; [`Background::stop`] waits for all of them.
struct Background {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<(&'static str, actix_web::rt::task::JoinHandle<()>)>,
}

impl Background {
    fn new() -> Background {
        Background {
            stop: tokio::sync::watch::channel(false).0,
            tasks: Vec::new(),
        }
    }

    fn spawn<F, Fut>(&mut self, name: &'static str, task: F)
    where
        F: FnOnce(StopSignal) -> Fut,
        Fut: std::future::Future<Output = ()> + 'static,
    {
        let signal = StopSignal(self.stop.subscribe());
        self.tasks.push((name, actix_web::rt::spawn(task(signal))));
    }

    /// Signals every task and waits for each (at most [`BACKGROUND_STOP`] in all).
    async fn stop(self) {
        self.stop.send_replace(true);
        let deadline = tokio::time::Instant::now() + BACKGROUND_STOP;
        let total = self.tasks.len();
        let mut stopped = 0;
        for (name, task) in self.tasks {
            match tokio::time::timeout_at(deadline, task).await {
                Ok(_) => stopped += 1,
                Err(_) => tracing::warn!(task = name, "a background task did not stop in time"),
            }
        }
        tracing::info!(stopped, total, "background tasks stopped");
    }
}

/// Deletes tokens whose `ttl`/`expires_at` has passed (at start, then every
/// second): each deletion is audited (`token.expire`) with it and counted, and a
/// waiting CVV goes too. Reads already treat an expired token as absent; this
/// removes the record, its fingerprint entry and its index entries. Every replica
/// sweeps; a token deleted by one is skipped by the others.
fn spawn_token_expiry(bg: &mut Background, state: web::Data<AppState>) {
    bg.spawn("token expiry", |mut stop| async move {
        loop {
            if state.vault.parts().1.is_sealed() {
                if !stop.pause(Duration::from_secs(1)).await {
                    return;
                }
                continue;
            }
            loop {
                match state.vault.sweep_expired(500).await {
                    Ok(n) => {
                        state.metrics.expired.inc_by(n as u64);
                        if n > 0 {
                            tracing::info!(count = n, "expired tokens deleted");
                        }
                        if n < 500 {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "expired-token sweep failed");
                        break;
                    }
                }
            }
            if !stop.pause(Duration::from_secs(1)).await {
                return;
            }
        }
    });
}

/// Deletes cards their tenant's retention period says were unused too long (at
/// start, then every `every`): each deletion audited (`token.retention`) with it
/// and counted. Every replica sweeps; a card deleted by one is skipped by the others.
fn spawn_retention(bg: &mut Background, state: web::Data<AppState>, every: Duration) {
    bg.spawn("retention", |mut stop| async move {
        loop {
            if !state.vault.parts().1.is_sealed() {
                match state.vault.sweep_retention().await {
                    Ok(n) => {
                        state.metrics.retention_deleted.inc_by(n as u64);
                        if n > 0 {
                            tracing::info!(count = n, "unused cards deleted by retention");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "retention sweep failed"),
                }
            }
            if !stop.pause(every).await {
                return;
            }
        }
    });
}

/// Destroys CVVs whose TTL ran out, even if no charge ever came.
fn spawn_cvv_sweeper(bg: &mut Background, vault: Vault, ttl: Duration) {
    let every = (ttl / 4).clamp(Duration::from_millis(250), Duration::from_secs(30));
    bg.spawn("cvv sweeper", |mut stop| async move {
        while stop.pause(every).await {
            let n = vault.purge_expired_cvvs();
            if n > 0 {
                tracing::info!(count = n, "expired CVVs destroyed");
            }
        }
    });
}

/// Seconds a graceful stop waits for in-flight requests: longer than the worst
/// PSP call (two connect retries, then a timeout retried once), plus a margin.
pub fn drain_secs(psp: Option<&crate::config::PspSettings>) -> u64 {
    let worst_ms = psp.map_or(0, |p| 3 * p.connect_timeout_ms + 300 + 2 * p.timeout_ms);
    (worst_ms.div_ceil(1000) + 5).max(10)
}

/// Runs the deletion epoch: rotate when due, rewrap, destroy versions that wrap
/// nothing live; every key change is audited as `system:deletion-epoch`.
fn spawn_deletion_epoch(bg: &mut Background, state: web::Data<AppState>, epoch: Duration) {
    let every = (epoch / 10).clamp(Duration::from_millis(500), Duration::from_secs(60));
    bg.spawn("deletion epoch", |mut stop| async move {
        while stop.pause(every).await {
            let step = match state.vault.deletion_epoch_step(epoch).await {
                Ok(step) => step,
                Err(e) => {
                    tracing::error!(error = %e, "deletion epoch step failed");
                    continue;
                }
            };
            let mut events = Vec::new();
            if let Some(v) = step.rotated_to {
                state.metrics.key_ops.with_label_values(&["rotate"]).inc();
                events.push(("key.rotate", format!("v{v} active (deletion epoch)")));
            }
            if step.rewrapped > 0 {
                state.metrics.rewrapped.inc_by(step.rewrapped);
                events.push(("key.rewrap", format!("{} records (deletion epoch)", step.rewrapped)));
            }
            for v in &step.destroyed {
                state.metrics.key_ops.with_label_values(&["destroy"]).inc();
                tracing::warn!(version = v, "deletion epoch: KEK destroyed (it wrapped no live record)");
                events.push(("key.destroy", format!("v{v} crypto-shredded (deletion epoch)")));
            }
            for (action, detail) in events {
                let event = crate::audit::AuditEvent {
                    action,
                    outcome: "ok".into(),
                    principal: Some(crate::service::EPOCH_OFFICER.into()),
                    detail: Some(detail),
                    ..Default::default()
                };
                if let Err(e) = state.audit.record(event).await {
                    tracing::error!(error = %e, "cannot audit a deletion-epoch step");
                }
            }
        }
    });
}

/// Writes the aggregated auth-failure records as their windows end.
fn spawn_failure_summaries(bg: &mut Background, state: web::Data<AppState>) {
    let every = (state.failures.window() / 4).clamp(Duration::from_millis(250), Duration::from_secs(15));
    bg.spawn("auth-failure summaries", |mut stop| async move {
        while stop.pause(every).await {
            state.flush_failure_summaries(false).await;
        }
    });
}

/// Re-reads the client registry from the config file on SIGHUP: a revoked or
/// changed client takes effect without a restart (and without dropping the
/// verified-token cache's protection: registry checks run on every request).
fn spawn_registry_reload(bg: &mut Background, state: web::Data<AppState>, file: std::path::PathBuf) {
    bg.spawn("registry reload", |mut stop| async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
            tracing::error!("cannot listen for SIGHUP: registry reload disabled");
            return;
        };
        loop {
            tokio::select! {
                got = hup.recv() => if got.is_none() { return },
                () = stop.stopped() => return,
            }
            match crate::config::Settings::production(&file) {
                Ok(fresh) => {
                    let n = state.auth.reload_registry(&fresh.clients);
                    tracing::warn!(clients = n, "client registry reloaded (SIGHUP)");
                    let event = crate::audit::AuditEvent {
                        action: "registry.reload",
                        outcome: "ok".into(),
                        detail: Some(format!("{n} clients")),
                        ..Default::default()
                    };
                    if let Err(e) = state.audit.record(event).await {
                        tracing::error!(error = %e, "cannot audit the registry reload");
                    }
                }
                Err(e) => tracing::error!(error = %e, "SIGHUP: config refused; the registry is unchanged"),
            }
        }
    });
}

/// Replicas over one database share the keystore (`tv_keystore`): a rotation,
/// retire or destroy made through one takes effect on the others within a second
/// (polling its generation: no LISTEN/NOTIFY). A change made here builds on the
/// newest keystore first and saves by compare-and-set (`KeyManager::update`).
fn spawn_keystore_refresh(bg: &mut Background, vault: Vault) {
    bg.spawn("keystore refresh", |mut stop| async move {
        while stop.pause(KEYSTORE_REFRESH).await {
            let keys = vault.parts().1;
            match tokio::task::spawn_blocking(move || keys.refresh()).await {
                Ok(Ok(Some(generation))) => {
                    tracing::info!(
                        generation,
                        "keystore changed by another replica: its keys are in force here now"
                    );
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "cannot take the shared keystore's new generation"),
                Err(_) => tracing::error!("keystore refresh task failed"),
            }
        }
    });
}

/// How often a replica looks for a keystore another replica changed.
const KEYSTORE_REFRESH: Duration = Duration::from_millis(500);

/// Rotates the KEK before its random-nonce budget runs out.
fn spawn_budget_rotation(bg: &mut Background, vault: Vault) {
    bg.spawn("nonce-budget rotation", |mut stop| async move {
        while stop.pause(Duration::from_secs(1)).await {
            match vault.rotate_if_budget_spent().await {
                Ok(Some(v)) => tracing::warn!(version = v, "KEK rotated automatically: wrap (nonce) budget reached"),
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "automatic KEK rotation (nonce budget) failed"),
            }
        }
    });
}

/// Rotates the KEK whenever the active one outlives the cryptoperiod.
fn spawn_auto_rotation(bg: &mut Background, vault: Vault, period: Duration) {
    let every = (period / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
    bg.spawn("cryptoperiod rotation", |mut stop| async move {
        while stop.pause(every).await {
            match vault.rotate_if_due().await {
                Ok(Some(v)) => tracing::warn!(version = v, "KEK rotated automatically: cryptoperiod reached"),
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "automatic KEK rotation failed"),
            }
        }
    });
}

/// Raises the alarm for a damaged store (log and audit trail), and audits an
/// operator's acceptance of a loss since the last start.
fn report_store_state(store: &dyn crate::store::Store, audit: &crate::audit::AuditLog) {
    let mut events = Vec::new();
    if let Some(from) = store.reanchored_from() {
        tracing::warn!(
            moved_back_from = from,
            "the store's anchor was moved back by `tokenvault store reanchor` (loss accepted)"
        );
        events.push(crate::audit::AuditEvent {
            action: "store.reanchor",
            outcome: "accepted".into(),
            detail: Some(match from {
                u64::MAX => "anchor (missing or unreadable) reset by an operator".to_owned(),
                from => format!("anchor moved back from audit record {from} by an operator"),
            }),
            ..Default::default()
        });
    }
    if let Some(damage) = store.damage() {
        tracing::error!(
            kind = damage.kind(),
            damage = %damage,
            "STORE DAMAGED: acknowledged writes may be missing. Lookups of missing tokens fail closed, new cards \
             and charges are refused. Restore the data directory from backup, or accept the loss with \
             `tokenvault store reanchor`"
        );
        events.push(crate::audit::AuditEvent {
            action: "store.damage",
            outcome: damage.kind().into(),
            detail: Some(damage.to_string()),
            ..Default::default()
        });
    }
    if events.is_empty() {
        return;
    }
    for event in events {
        if let Err(e) = audit.append(event) {
            tracing::error!(error = %e, "cannot audit the store's state");
        }
    }
    let durable = store.commit();
    actix_web::rt::spawn(async move {
        if let Err(e) = durable.await {
            tracing::error!(error = %e, "cannot make the store-state audit record durable");
        }
    });
}

/// Creates the data directory if needed and makes it private to the vault's user.
fn private_dir(dir: &std::path::Path) -> Result<(), StartupError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)
        .and_then(|_| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|source| StartupError::DataDir {
            path: dir.to_owned(),
            source,
        })
}

/// A built, bound server.
pub struct Application {
    addr: SocketAddr,
    server: Server,
    tls: bool,
    ops: Option<(SocketAddr, Server)>,
    background: Background,
}

impl Application {
    /// Opens the store, unlocks the keys, binds the listener and builds the server.
    /// Must run inside an actix/tokio runtime.
    pub fn build(settings: &Settings) -> Result<Application, StartupError> {
        if settings.mode == Mode::Production && crate::dev::is_dev_dir(&settings.data_dir) {
            return Err(StartupError::DevDataDir(settings.data_dir.clone()));
        }
        private_dir(&settings.data_dir)?;
        let location = settings.store.location(&settings.data_dir)?;
        let store = location.open()?;
        tracing::info!(store = %location.describe(), "store opened");
        let keystore_at = keystore_at(&settings.keystore, &store);
        let keys = Arc::new(open_keys(&settings.keystore, keystore_at)?);
        keys.set_generation_guard(generation_guard(&settings.keystore, store.clone()))?;
        if keys.is_sealed() {
            tracing::warn!("the vault is SEALED: data endpoints answer 503 until custodians run `tokenvault unseal`");
        }
        let cryptoperiod = settings.keystore.cryptoperiod;
        let psp = match &settings.psp {
            Some(p) => Some(Arc::new(crate::psp::adyen::AdyenPsp::new(p)?) as Arc<dyn crate::psp::Psp>),
            None => None,
        };
        let cvv_redis = settings.cvv_redis_url()?;
        let options = crate::service::VaultOptions {
            cryptoperiod,
            cvv_ttl: settings.cvv_ttl,
            idempotency_window: settings.idempotency_window,
            psp,
            enumeration: settings.enumeration_guard,
            kek_wrap_limit: settings.kek_wrap_limit,
            cvv_redis: cvv_redis.clone(),
            lifecycle: settings.lifecycle.clone(),
            spool_dir: settings.data_dir.clone(),
        };
        if matches!(location, crate::store::StoreLocation::Postgres(_)) && cvv_redis.is_none() {
            tracing::warn!(
                "CVVs are held in this replica's memory: a charge that lands on another replica goes without one \
                 (set cvv_redis to share them)"
            );
        }
        let audit = crate::audit::AuditLog::open(store.clone(), keys.clone())?;
        // The trail's head must verify against the anchor's keyed mark before the
        // vault chains anything onto it: now if the keys are here, else at unseal.
        let head_check = |ring: &crate::keys::Keyring, audit: &crate::audit::AuditLog| {
            audit.verify_head(&ring.audit_key()).map(|c| {
                if let crate::audit::HeadCheck::Verified { keyed_seq, after } = c {
                    tracing::info!(
                        keyed_seq,
                        after,
                        "audit trail head verified against the anchor's keyed mark"
                    );
                }
            })
        };
        if let Some(ring) = keys.ring() {
            head_check(&ring, &audit).map_err(StartupError::HeadUnverified)?;
        }
        let unseal_audit = audit.clone();
        keys.set_unseal_check(Arc::new(move |ring| {
            head_check(ring, &unseal_audit)
                .map_err(|e| Box::new(HeadUnverified(e)) as Box<dyn std::error::Error + Send + Sync>)
        }));
        let vault = Vault::new(store.clone(), keys, audit.clone(), options)?;
        report_store_state(&*store, &audit);
        let mut background = Background::new();
        let bg = &mut background;
        spawn_cvv_sweeper(bg, vault.clone(), settings.cvv_ttl);
        if let Some(period) = cryptoperiod {
            spawn_auto_rotation(bg, vault.clone(), period);
        }
        spawn_budget_rotation(bg, vault.clone());
        if matches!(location, crate::store::StoreLocation::Postgres(_)) {
            spawn_keystore_refresh(bg, vault.clone());
        }
        let auth = Authenticator::new(&settings.auth, &settings.clients)?;
        let limiter = crate::limits::Limiter::new(
            &settings
                .rate_limits
                .clone()
                .unwrap_or(crate::limits::RateLimits(std::collections::HashMap::new())),
        );
        let metrics = Metrics::new();
        let (unit_seconds, unit_failures) = vault.unit_metrics();
        metrics.register(Box::new(unit_seconds));
        metrics.register(Box::new(unit_failures));
        metrics.store_damaged.set(i64::from(vault.store_damage().is_some()));
        let state = web::Data::new(AppState {
            vault,
            limiter,
            anomaly: settings.anomaly_guard.map(crate::limits::AnomalyGuard::new),
            failures: crate::limits::FailureTracker::new(settings.auth_failures),
            audit,
            pkcs11: settings.keystore.pkcs11.clone(),
            auth: std::sync::Arc::new(auth),
            metrics,
            max_body_bytes: settings.max_body_bytes,
            basic_checks: tokio::sync::Semaphore::new(2),
            backups: std::sync::Arc::new(tokio::sync::Semaphore::new(1)),
        });
        spawn_failure_summaries(bg, state.clone());
        spawn_token_expiry(bg, state.clone());
        if let Some(every) = state.vault.retention_interval() {
            spawn_retention(bg, state.clone(), every);
        }
        if let Some(epoch) = settings.deletion_epoch {
            spawn_deletion_epoch(bg, state.clone(), epoch);
        }
        if let Some(file) = &settings.config_file {
            spawn_registry_reload(bg, state.clone(), file.clone());
        }
        let ops_listener = match settings.metrics_listen {
            Some(addr) => Some(TcpListener::bind(addr).map_err(|source| StartupError::Bind { addr, source })?),
            None => None,
        };
        let ops_here = ops_listener.is_none();
        let bind_err = |source| StartupError::Bind {
            addr: settings.listen,
            source,
        };
        let listener = TcpListener::bind(settings.listen).map_err(bind_err)?;
        let addr = listener.local_addr().map_err(bind_err)?;
        let tls_config = match &settings.tls {
            Some(t) if t.mode == crate::config::TlsMode::Native => Some(crate::tls::server_config(t)?),
            _ => None,
        };
        let ops_state = state.clone();
        let mut server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .app_data(web::QueryConfig::default().error_handler(|_, _| api::problem::ApiError::Malformed.into()))
                .wrap(api::security_headers())
                .wrap(from_fn(api::middleware))
                .configure(|cfg| api::configure_with(cfg, ops_here))
        })
        // Slow or idle clients cannot hold connections open.
        .client_request_timeout(Duration::from_secs(5))
        .client_disconnect_timeout(Duration::from_secs(1))
        .keep_alive(Duration::from_secs(30))
        // A drain outlasts the slowest PSP call, so a stop never cuts a charge
        // between the PSP's authorisation and the stored outcome.
        .shutdown_timeout(drain_secs(settings.psp.as_ref()))
        // Client certificates are hashed once per connection for registry pins.
        .on_connect(|conn, ext| {
            use actix_tls::accept::rustls_0_23::TlsStream;
            if let Some(tls) = conn.downcast_ref::<TlsStream<actix_web::rt::net::TcpStream>>()
                && let Some(cert) = tls.get_ref().1.peer_certificates().and_then(|c| c.first())
                && let Some(hash) = crate::tls::spki_sha256(cert.as_ref())
            {
                ext.insert(crate::tls::PeerSpki(hash));
            }
        });
        server = match tls_config {
            Some(config) => server.listen_rustls_0_23(listener, config).map_err(bind_err)?,
            None => server.listen(listener).map_err(bind_err)?,
        };
        if let Some(n) = settings.workers {
            server = server.workers(n.max(1));
        }
        let tls = settings
            .tls
            .as_ref()
            .is_some_and(|t| t.mode == crate::config::TlsMode::Native);
        let ops = match ops_listener {
            Some(listener) => {
                let ops_addr = listener.local_addr().map_err(bind_err)?;
                let ops_state = ops_state.clone();
                let server = HttpServer::new(move || {
                    App::new()
                        .app_data(ops_state.clone())
                        .wrap(api::security_headers())
                        .configure(api::configure_ops)
                })
                .workers(1)
                .shutdown_timeout(1)
                .listen(listener)
                .map_err(bind_err)?
                .run();
                Some((ops_addr, server))
            }
            None => None,
        };
        Ok(Application {
            addr,
            server: server.run(),
            tls,
            ops,
            background,
        })
    }

    /// The internal operational listener's address, when configured.
    pub fn ops_addr(&self) -> Option<SocketAddr> {
        self.ops.as_ref().map(|(a, _)| *a)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL clients use.
    pub fn base_url(&self) -> String {
        format!("{}://{}", if self.tls { "https" } else { "http" }, self.addr)
    }

    /// Serves until SIGINT/SIGTERM, then drains connections gracefully and stops the
    /// background tasks (each finishes the step it is in: a sweep, a rewrap batch and
    /// their audit records).
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let result = match self.ops {
            None => self.server.await,
            Some((_, ops)) => {
                let handle = ops.handle();
                let ops_task = actix_web::rt::spawn(ops);
                let result = self.server.await;
                handle.stop(true).await;
                let _ = ops_task.await;
                result
            }
        };
        self.background.stop().await;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drain_outlasts_the_slowest_psp_call() {
        assert_eq!(drain_secs(None), 10);
        let psp = crate::config::PspSettings {
            base_url: "https://psp.example".into(),
            api_key_file: "/nonexistent".into(),
            merchant_account: "M".into(),
            allowed_hosts: vec!["psp.example".into()],
            connect_timeout_ms: 2_000,
            timeout_ms: 10_000,
            dev_api_key: None,
        };
        // Worst call: three connects (two retried) + 300 ms of back-off + a timeout retried once.
        let worst = Duration::from_millis(3 * 2_000 + 300 + 2 * 10_000);
        assert!(Duration::from_secs(drain_secs(Some(&psp))) > worst);
    }
}
