//! The root of trust in an HSM, reached over PKCS#11 (`cryptoki`).
//!
//! Why: with [`super::provider::SoftwareRoot`] the root key sits in process memory,
//! so a memory dump or a debugger attached to the vault yields it. Here the root is
//! an AES-256 secret key object generated *inside* the token with
//! `CKA_SENSITIVE=true` and `CKA_EXTRACTABLE=false`: its value never leaves the HSM,
//! not even wrapped. Wrapping and unwrapping the keystore's keys is AES-GCM run by
//! the HSM itself (`C_Encrypt`/`C_Decrypt` with `CKM_AES_GCM`); the vault only ever
//! sees the keys being wrapped, never the key wrapping them.
//!
//! Wire format of a wrapped key: `IV (12 bytes) || ciphertext || tag (16 bytes)`,
//! the same layout as the software root. The IV is fresh from the OS CSPRNG for
//! every wrap; an HSM that insists on generating the IV itself writes it back into
//! the parameter buffer, and that buffer is what is stored.
//!
//! The PKCS#11 library is initialized once per process (`C_Initialize` twice fails)
//! and cached per module path. A `cryptoki` session is not `Sync`, so each provider
//! keeps its session behind a mutex; HSM calls are serialized per provider.
//!
//! The user PIN is read from a file (a mounted secret), held in a zeroizing secret
//! type only until `C_Login`, and never appears in errors or `Debug` output.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::{AuthPin, Ulong};
use rand::RngCore;
use zeroize::Zeroizing;

use super::provider::{KeyProvider, ProviderError};
use crate::crypto::Key256;

/// How to reach the HSM. The key label lives in the keystore (it changes on
/// `keys rotate-root`); the PIN comes from a file, never from argv.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Settings {
    /// The PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so.
    pub module: PathBuf,
    /// Label of the token (slot) holding the root key.
    pub token_label: String,
    /// File holding the user PIN (a mounted secret).
    pub pin_file: PathBuf,
}

/// GCM IV length: 96 bits, the only length GCM handles without an extra GHASH.
const IV_LEN: usize = 12;
/// GCM tag length: the full 128 bits.
const TAG_LEN: usize = 16;
/// Length of a wrapped 256-bit key: IV || ciphertext || tag.
const WRAPPED_LEN: usize = IV_LEN + 32 + TAG_LEN;
/// Size of the root key generated in the HSM, in bytes (AES-256).
const ROOT_KEY_BYTES: u64 = 32;

/// One initialized PKCS#11 library per (canonical) module path, for the process.
static CONTEXTS: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();

/// A root key that lives in an HSM: a non-extractable AES-256 secret key object
/// found by its `CKA_LABEL`. Wrap and unwrap are AES-GCM inside the HSM.
pub struct Pkcs11Provider {
    /// Logged-in session on the token (`Session` is `Send` but not `Sync`).
    session: Mutex<Session>,
    /// Handle of the root key object, valid for as long as the session lives.
    key: ObjectHandle,
    /// `CKA_LABEL` of the root key, e.g. `tokenvault-root-1`.
    label: String,
}

impl Pkcs11Provider {
    /// Opens the token labelled `settings.token_label`, logs in as the user with the
    /// PIN from `settings.pin_file`, and finds the AES secret key labelled
    /// `key_label`. Fails if there is no such key, or more than one.
    pub fn open(settings: &Pkcs11Settings, key_label: &str) -> Result<Pkcs11Provider, ProviderError> {
        check_label(key_label)?;
        let session = login_session(settings, false)?;
        let found = session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Label(key_label.as_bytes().to_vec()),
            ])
            .map_err(|e| {
                device(format!(
                    "searching token '{}' for key '{key_label}': {e}",
                    settings.token_label
                ))
            })?;
        let key = match found.as_slice() {
            [key] => *key,
            [] => {
                return Err(device(format!(
                    "no AES secret key labelled '{key_label}' on token '{}'",
                    settings.token_label
                )));
            }
            many => {
                return Err(device(format!(
                    "{} AES secret keys labelled '{key_label}' on token '{}': the root key must be unambiguous",
                    many.len(),
                    settings.token_label
                )));
            }
        };
        warn_if_weak(&session, key, key_label)?;
        Ok(Pkcs11Provider {
            session: Mutex::new(session),
            key,
            label: key_label.to_owned(),
        })
    }

    /// Logs in like [`Pkcs11Provider::open`], then generates a new AES-256 root key
    /// inside the HSM labelled `key_label`: a token object, private, sensitive, not
    /// extractable, usable only to encrypt and decrypt. Refuses if any object with
    /// that label already exists on the token.
    pub fn generate(settings: &Pkcs11Settings, key_label: &str) -> Result<Pkcs11Provider, ProviderError> {
        check_label(key_label)?;
        let session = login_session(settings, true)?;
        let label = key_label.as_bytes().to_vec();
        let existing = session.find_objects(&[Attribute::Label(label.clone())]).map_err(|e| {
            device(format!(
                "searching token '{}' for key '{key_label}': {e}",
                settings.token_label
            ))
        })?;
        if !existing.is_empty() {
            return Err(device(format!(
                "an object labelled '{key_label}' already exists on token '{}'; refusing to generate another",
                settings.token_label
            )));
        }
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(Ulong::from(ROOT_KEY_BYTES)),
            Attribute::Label(label),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Sign(false),
            Attribute::Verify(false),
            Attribute::Derive(false),
        ];
        let key = session.generate_key(&Mechanism::AesKeyGen, &template).map_err(|e| {
            device(format!(
                "generating key '{key_label}' on token '{}': {e}",
                settings.token_label
            ))
        })?;
        tracing::info!(key_label, token = %settings.token_label, "generated a non-extractable AES-256 root key in the HSM");
        Ok(Pkcs11Provider {
            session: Mutex::new(session),
            key,
            label: key_label.to_owned(),
        })
    }

    /// The session, even if another thread panicked while holding it: a failed
    /// operation is terminated by the HSM, so the session stays usable.
    fn session(&self) -> MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for Pkcs11Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pkcs11Provider({}, [in HSM])", self.label)
    }
}

impl KeyProvider for Pkcs11Provider {
    fn kind(&self) -> &'static str {
        "pkcs11"
    }

    fn root_id(&self) -> String {
        self.label.clone()
    }

    fn wrap(&self, aad: &[u8], key: &Key256) -> Result<Vec<u8>, ProviderError> {
        let mut iv = [0u8; IV_LEN];
        rand::rngs::OsRng
            .try_fill_bytes(&mut iv)
            .map_err(|e| device(format!("OS random number generator failed: {e}")))?;
        let sealed = {
            // The HSM reads the IV from (and may write a generated IV back into) `iv`.
            let mechanism = Mechanism::AesGcm(gcm_params(&mut iv, aad)?);
            self.session()
                .encrypt(&mechanism, self.key, key.expose_bytes())
                .map_err(|e| device(format!("HSM encrypt with root key '{}' failed: {e}", self.label)))?
        };
        if sealed.len() != WRAPPED_LEN - IV_LEN {
            return Err(device(format!(
                "HSM returned {} bytes of AES-GCM output for a 32-byte key, expected {}",
                sealed.len(),
                WRAPPED_LEN - IV_LEN
            )));
        }
        let mut out = Vec::with_capacity(WRAPPED_LEN);
        out.extend_from_slice(&iv);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    fn unwrap(&self, aad: &[u8], wrapped: &[u8]) -> Result<Key256, ProviderError> {
        if wrapped.len() != WRAPPED_LEN {
            return Err(ProviderError::Unwrap);
        }
        let (iv, body) = wrapped.split_at(IV_LEN);
        let mut iv: [u8; IV_LEN] = iv.try_into().map_err(|_| ProviderError::Unwrap)?;
        let mechanism = Mechanism::AesGcm(gcm_params(&mut iv, aad)?);
        let plain = Zeroizing::new(
            self.session()
                .decrypt(&mechanism, self.key, body)
                .map_err(|e| decrypt_error(&self.label, e))?,
        );
        Key256::from_slice(&plain).ok_or(ProviderError::Unwrap)
    }
}

/// CKM_AES_GCM parameters: `iv`, `aad` and a 128-bit tag.
fn gcm_params<'a>(iv: &'a mut [u8; IV_LEN], aad: &'a [u8]) -> Result<GcmParams<'a>, ProviderError> {
    let tag_bits = Ulong::try_from(TAG_LEN * 8).map_err(|e| device(format!("GCM tag length: {e}")))?;
    GcmParams::new(iv, aad, tag_bits).map_err(|e| device(format!("GCM parameters: {e}")))
}

/// A failed `C_Decrypt` is a failed unwrap (wrong key, tampered bytes, wrong AAD),
/// unless it is plainly the device or session failing, or the operation never
/// started (`C_DecryptInit` does not see the ciphertext).
fn decrypt_error(label: &str, e: CkError) -> ProviderError {
    match e {
        CkError::Pkcs11(rv, Function::Decrypt) if !is_device_failure(rv) => ProviderError::Unwrap,
        e => device(format!("HSM decrypt with root key '{label}' failed: {e}")),
    }
}

fn is_device_failure(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::HostMemory
            | RvError::DeviceError
            | RvError::DeviceMemory
            | RvError::DeviceRemoved
            | RvError::SessionClosed
            | RvError::SessionHandleInvalid
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::CryptokiNotInitialized
            | RvError::UserNotLoggedIn
            | RvError::KeyHandleInvalid
            | RvError::OperationNotInitialized
            | RvError::FunctionCanceled
    )
}

fn device(message: String) -> ProviderError {
    ProviderError::Device(message)
}

fn check_label(key_label: &str) -> Result<(), ProviderError> {
    if key_label.is_empty() {
        return Err(device("the root key label must not be empty".to_owned()));
    }
    Ok(())
}

/// Opens a session on the configured token and logs in as the user.
fn login_session(settings: &Pkcs11Settings, read_write: bool) -> Result<Session, ProviderError> {
    let ctx = context(&settings.module)?;
    let slot = find_token(&ctx, &settings.token_label)?;
    let session = if read_write {
        ctx.open_rw_session(slot)
    } else {
        ctx.open_ro_session(slot)
    }
    .map_err(|e| device(format!("opening a session on token '{}': {e}", settings.token_label)))?;
    let pin = read_pin(&settings.pin_file)?;
    match session.login(UserType::User, Some(&pin)) {
        // Login state is per token and application: another provider in this
        // process is already logged in to the same token.
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
        Err(e) => Err(device(format!("login to token '{}' failed: {e}", settings.token_label))),
    }
}

/// The process-wide PKCS#11 context for `module`, loaded and initialized once.
fn context(module: &Path) -> Result<Pkcs11, ProviderError> {
    let path = fs::canonicalize(module).map_err(|e| device(format!("PKCS#11 module {}: {e}", module.display())))?;
    // A panic while holding this lock cannot leave the map half-updated.
    let mut cache = CONTEXTS
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(ctx) = cache.get(&path) {
        return Ok(ctx.clone());
    }
    let ctx = Pkcs11::new(&path).map_err(|e| device(format!("loading PKCS#11 module {}: {e}", path.display())))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        // Already initialized by someone else in this process: usable as is.
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(device(format!("initializing PKCS#11 module {}: {e}", path.display()))),
    }
    cache.insert(path, ctx.clone());
    Ok(ctx)
}

/// The one slot whose token carries `label`.
fn find_token(ctx: &Pkcs11, label: &str) -> Result<Slot, ProviderError> {
    let slots = ctx
        .get_slots_with_initialized_token()
        .map_err(|e| device(format!("listing PKCS#11 slots: {e}")))?;
    let mut found = Vec::new();
    for slot in slots {
        let info = ctx
            .get_token_info(slot)
            .map_err(|e| device(format!("reading token info of slot {slot}: {e}")))?;
        if info.label() == label {
            found.push(slot);
        }
    }
    match found.as_slice() {
        [slot] => Ok(*slot),
        [] => Err(device(format!("no initialized PKCS#11 token labelled '{label}'"))),
        many => Err(device(format!(
            "{} PKCS#11 tokens labelled '{label}': ambiguous",
            many.len()
        ))),
    }
}

/// Reads the user PIN: surrounding whitespace trimmed, every copy zeroized.
fn read_pin(path: &Path) -> Result<AuthPin, ProviderError> {
    let raw = Zeroizing::new(fs::read(path).map_err(|e| device(format!("reading PIN file {}: {e}", path.display())))?);
    let pin = std::str::from_utf8(raw.trim_ascii())
        .map_err(|_| device(format!("PIN file {} is not UTF-8", path.display())))?;
    if pin.is_empty() {
        return Err(device(format!("PIN file {} is empty", path.display())));
    }
    Ok(AuthPin::from(pin))
}

/// Refuses a root key found by label that could leave the HSM, ever could have, or
/// is not AES-256 (keys made by [`Pkcs11Provider::generate`] never are). A key
/// imported with `C_CreateObject`, or once extractable, can be marked sensitive
/// and non-extractable afterwards; `CKA_ALWAYS_SENSITIVE` and
/// `CKA_NEVER_EXTRACTABLE` (set by the HSM, not by the caller) tell the difference.
fn warn_if_weak(session: &Session, key: ObjectHandle, label: &str) -> Result<(), ProviderError> {
    let attrs = session
        .get_attributes(
            key,
            &[
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::AlwaysSensitive,
                AttributeType::NeverExtractable,
                AttributeType::ValueLen,
            ],
        )
        .map_err(|e| device(format!("reading attributes of key '{label}': {e}")))?;
    let mut seen = 0;
    for attr in attrs {
        match attr {
            Attribute::AlwaysSensitive(always) => {
                seen += 1;
                if !always {
                    return Err(device(format!(
                        "HSM root key '{label}' is not CKA_ALWAYS_SENSITIVE (it was imported or once readable); \
                         refusing it"
                    )));
                }
            }
            Attribute::NeverExtractable(never) => {
                seen += 1;
                if !never {
                    return Err(device(format!(
                        "HSM root key '{label}' is not CKA_NEVER_EXTRACTABLE (it was imported or once \
                         extractable); refusing it"
                    )));
                }
            }
            Attribute::Sensitive(false) => {
                return Err(device(format!(
                    "HSM root key '{label}' is not CKA_SENSITIVE; refusing it"
                )));
            }
            Attribute::Extractable(true) => {
                return Err(device(format!(
                    "HSM root key '{label}' is CKA_EXTRACTABLE; refusing it"
                )));
            }
            Attribute::ValueLen(len) if *len != ROOT_KEY_BYTES => {
                return Err(device(format!("HSM root key '{label}' is not AES-256; refusing it")));
            }
            _ => {}
        }
    }
    if seen != 2 {
        return Err(device(format!(
            "the HSM does not report CKA_ALWAYS_SENSITIVE and CKA_NEVER_EXTRACTABLE for '{label}'; refusing it"
        )));
    }
    Ok(())
}

const GENERATION_LABEL: &[u8] = b"tokenvault-keystore-generation";

/// The keystore generation recorded in the HSM (0 when none is): data objects on
/// the token, outside the keystore file and the vault's data directory, so that
/// restoring both together (an old backup) cannot roll the keystore back. The
/// highest value wins (a crash while replacing one leaves two).
pub fn hsm_generation(settings: &Pkcs11Settings) -> Result<u64, ProviderError> {
    let session = login_session(settings, false)?;
    Ok(generation_objects(&session)?
        .into_iter()
        .map(|(_, g)| g)
        .max()
        .unwrap_or(0))
}

/// Records `generation` in the HSM. Tokens may not let an application modify a
/// data object's value, so a new object is created first and the older ones are
/// destroyed after it: the recorded value never goes down, even across a crash.
pub fn set_hsm_generation(settings: &Pkcs11Settings, generation: u64) -> Result<(), ProviderError> {
    let session = login_session(settings, true)?;
    let older = generation_objects(&session)?;
    session
        .create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Label(GENERATION_LABEL.to_vec()),
            Attribute::Application(b"tokenvault".to_vec()),
            Attribute::Value(generation.to_be_bytes().to_vec()),
        ])
        .map_err(|e| device(format!("recording the keystore generation: {e}")))?;
    for (object, g) in older {
        if g < generation {
            session
                .destroy_object(object)
                .map_err(|e| device(format!("removing an older keystore generation: {e}")))?;
        }
    }
    Ok(())
}

fn generation_objects(session: &Session) -> Result<Vec<(ObjectHandle, u64)>, ProviderError> {
    let found = session
        .find_objects(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Label(GENERATION_LABEL.to_vec()),
        ])
        .map_err(|e| device(format!("searching for the keystore generation: {e}")))?;
    let mut out = Vec::with_capacity(found.len());
    for object in found {
        let attrs = session
            .get_attributes(object, &[AttributeType::Value])
            .map_err(|e| device(format!("reading the keystore generation: {e}")))?;
        let value = attrs.into_iter().find_map(|a| match a {
            Attribute::Value(v) => <[u8; 8]>::try_from(v.as_slice()).ok().map(u64::from_be_bytes),
            _ => None,
        });
        let g = value.ok_or_else(|| device("an HSM keystore generation object is malformed".into()))?;
        out.push((object, g));
    }
    Ok(out)
}

/// Destroys the root key labelled `key_label` in the HSM (after `rotate-root` has
/// moved every keystore key under another one): old keystore copies wrapped under
/// it can then never be opened again.
pub fn destroy_root_key(settings: &Pkcs11Settings, key_label: &str) -> Result<(), ProviderError> {
    check_label(key_label)?;
    let session = login_session(settings, true)?;
    let found = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Label(key_label.as_bytes().to_vec()),
        ])
        .map_err(|e| device(format!("searching for key '{key_label}': {e}")))?;
    let [key] = found.as_slice() else {
        return Err(device(format!(
            "expected exactly one key labelled '{key_label}', found {}",
            found.len()
        )));
    };
    session
        .destroy_object(*key)
        .map_err(|e| device(format!("destroying key '{key_label}': {e}")))?;
    tracing::warn!(key_label, token = %settings.token_label, "old HSM root key destroyed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::sync::Arc;

    use cryptoki::object::AttributeInfo;

    use super::*;

    const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
    const TOKEN: &str = "tokenvault-test";
    const SO_PIN: &str = "1234";
    const PIN: &str = "5678";
    const WRONG_PIN: &str = "97531864";
    /// Set by the outer test for the child process: the temporary SoftHSM2 home.
    const DIR_ENV: &str = "TOKENVAULT_SOFTHSM_TEST_DIR";
    const INNER: &str = "keys::pkcs11::tests::softhsm_scenarios_inner";

    #[test]
    fn provider_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Pkcs11Provider>();
    }

    /// Sets up a throwaway SoftHSM2 token and runs [`softhsm_scenarios_inner`] in a
    /// child test process with `SOFTHSM2_CONF` pointing at it: SoftHSM reads that
    /// variable once, at `C_Initialize`, and this crate may not call `set_var`.
    #[test]
    fn softhsm_scenarios() {
        if !Path::new(MODULE).exists() {
            assert!(
                std::env::var("TOKENVAULT_REQUIRE_SOFTHSM").as_deref() != Ok("1"),
                "TOKENVAULT_REQUIRE_SOFTHSM=1 but {MODULE} does not exist"
            );
            eprintln!("\n********************************************************");
            eprintln!("*** SKIPPED: softhsm2 not installed ({MODULE} missing) ***");
            eprintln!("********************************************************\n");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        fs::create_dir(&tokens).unwrap();
        let conf = dir.path().join("softhsm2.conf");
        fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        let init = Command::new("softhsm2-util")
            .args([
                "--init-token",
                "--free",
                "--label",
                TOKEN,
                "--so-pin",
                SO_PIN,
                "--pin",
                PIN,
            ])
            .env("SOFTHSM2_CONF", &conf)
            .output()
            .expect("softhsm2-util runs");
        assert!(
            init.status.success(),
            "softhsm2-util --init-token failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );

        let child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", INNER, "--nocapture", "--include-ignored", "--test-threads=1"])
            .env("SOFTHSM2_CONF", &conf)
            .env(DIR_ENV, dir.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&child.stdout);
        let stderr = String::from_utf8_lossy(&child.stderr);
        eprintln!("--- child stdout ---\n{stdout}\n--- child stderr ---\n{stderr}");
        assert!(child.status.success(), "SoftHSM scenarios failed in the child process");
        assert!(stdout.contains("1 passed"), "the child process did not run {INNER}");
    }

    fn settings(dir: &Path, pin_file: &str) -> Pkcs11Settings {
        Pkcs11Settings {
            module: PathBuf::from(MODULE),
            token_label: TOKEN.to_owned(),
            pin_file: dir.join(pin_file),
        }
    }

    fn device_error(result: Result<Pkcs11Provider, ProviderError>) -> String {
        match result {
            Err(ProviderError::Device(msg)) => {
                assert!(
                    !msg.contains(PIN) && !msg.contains(WRONG_PIN),
                    "PIN leaked into error: {msg}"
                );
                msg
            }
            other => panic!("expected a Device error, got {other:?}"),
        }
    }

    fn assert_unwrap_fails(p: &Pkcs11Provider, aad: &[u8], wrapped: &[u8]) {
        assert!(
            matches!(p.unwrap(aad, wrapped), Err(ProviderError::Unwrap)),
            "unwrap should fail closed"
        );
    }

    /// A fresh session on the test token, logged in (or sharing an existing login).
    fn raw_session(rw: bool) -> Session {
        let ctx = context(Path::new(MODULE)).unwrap();
        let slot = find_token(&ctx, TOKEN).unwrap();
        let session = if rw {
            ctx.open_rw_session(slot)
        } else {
            ctx.open_ro_session(slot)
        }
        .unwrap();
        match session.login(UserType::User, Some(&AuthPin::from(PIN))) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => session,
            Err(e) => panic!("login: {e}"),
        }
    }

    #[test]
    #[ignore = "runs only inside softhsm_scenarios, which sets SOFTHSM2_CONF"]
    fn softhsm_scenarios_inner() {
        let Ok(dir) = std::env::var(DIR_ENV) else {
            eprintln!("{INNER}: not run directly; `softhsm_scenarios` runs it with a throwaway token");
            return;
        };
        let dir = PathBuf::from(dir);
        let conf = std::env::var("SOFTHSM2_CONF").unwrap();
        assert!(
            Path::new(&conf).starts_with(&dir),
            "SOFTHSM2_CONF must point into the throwaway directory"
        );
        // Surrounding whitespace in the PIN file is trimmed.
        fs::write(dir.join("pin"), format!("  {PIN} \n")).unwrap();
        fs::write(dir.join("wrong-pin"), format!("{WRONG_PIN}\n")).unwrap();
        fs::write(dir.join("empty-pin"), " \n").unwrap();
        let good = settings(&dir, "pin");
        let wrong = settings(&dir, "wrong-pin");
        let label1 = "tokenvault-root-1";
        let label2 = "tokenvault-root-2";

        // Setup errors, before anyone is logged in: Device, and never the PIN.
        let msg = device_error(Pkcs11Provider::generate(&wrong, label1));
        assert!(msg.contains("login"), "{msg}");
        device_error(Pkcs11Provider::open(&wrong, label1));
        device_error(Pkcs11Provider::open(&settings(&dir, "empty-pin"), label1));
        device_error(Pkcs11Provider::open(&settings(&dir, "no-such-pin-file"), label1));
        device_error(Pkcs11Provider::open(
            &Pkcs11Settings {
                token_label: "no-such-token".into(),
                ..good.clone()
            },
            label1,
        ));
        device_error(Pkcs11Provider::open(
            &Pkcs11Settings {
                module: dir.join("no-such-module.so"),
                ..good.clone()
            },
            label1,
        ));
        device_error(Pkcs11Provider::generate(&good, ""));

        // Generate, then round trips.
        let p1 = Pkcs11Provider::generate(&good, label1).unwrap();
        assert_eq!(p1.kind(), "pkcs11");
        assert_eq!(p1.root_id(), label1);
        let debug = format!("{p1:?}");
        assert!(debug.contains(label1) && !debug.contains(PIN), "{debug}");

        let aad = b"tokenvault/v1/aad/kek|v=1";
        let key = Key256::random();
        let wrapped = p1.wrap(aad, &key).unwrap();
        assert_eq!(wrapped.len(), WRAPPED_LEN);
        assert_eq!(p1.unwrap(aad, &wrapped).unwrap(), key);
        let again = p1.wrap(aad, &key).unwrap();
        assert_ne!(again[..IV_LEN], wrapped[..IV_LEN], "every wrap uses a fresh IV");
        assert_eq!(p1.unwrap(aad, &again).unwrap(), key);
        let no_aad = p1.wrap(b"", &key).unwrap();
        assert_eq!(p1.unwrap(b"", &no_aad).unwrap(), key);

        // Different AAD, any flipped bit (IV, ciphertext, tag), wrong length: Unwrap.
        assert_unwrap_fails(&p1, b"tokenvault/v1/aad/kek|v=2", &wrapped);
        assert_unwrap_fails(&p1, b"", &wrapped);
        for i in 0..wrapped.len() {
            let mut bad = wrapped.clone();
            bad[i] ^= 0x01;
            assert_unwrap_fails(&p1, aad, &bad);
        }
        assert_unwrap_fails(&p1, aad, &wrapped[..wrapped.len() - 1]);
        assert_unwrap_fails(&p1, aad, &[wrapped.as_slice(), &[0]].concat());
        assert_unwrap_fails(&p1, aad, &wrapped[..IV_LEN + TAG_LEN]);
        assert_unwrap_fails(&p1, aad, &[]);

        // An existing label is never overwritten or duplicated.
        let msg = device_error(Pkcs11Provider::generate(&good, label1));
        assert!(msg.contains("already exists"), "{msg}");
        assert_eq!(p1.unwrap(aad, &wrapped).unwrap(), key);

        // Open by label: the same key, both ways.
        let p1b = Pkcs11Provider::open(&good, label1).unwrap();
        assert_eq!(p1b.root_id(), label1);
        assert_eq!(p1b.unwrap(aad, &wrapped).unwrap(), key);
        assert_eq!(p1.unwrap(aad, &p1b.wrap(aad, &key).unwrap()).unwrap(), key);
        let msg = device_error(Pkcs11Provider::open(&good, "tokenvault-root-missing"));
        assert!(msg.contains("no AES secret key"), "{msg}");

        // A different HSM key cannot unwrap, in either direction.
        let p2 = Pkcs11Provider::generate(&good, label2).unwrap();
        assert_unwrap_fails(&p2, aad, &wrapped);
        assert_unwrap_fails(&p1, aad, &p2.wrap(aad, &key).unwrap());

        // Non-extractable, checked with cryptoki directly.
        {
            let session = raw_session(false);
            let found = session
                .find_objects(&[Attribute::Label(label1.as_bytes().to_vec())])
                .unwrap();
            assert_eq!(found.len(), 1);
            let root = found[0];
            let attrs = session
                .get_attributes(
                    root,
                    &[
                        AttributeType::Extractable,
                        AttributeType::Sensitive,
                        AttributeType::NeverExtractable,
                        AttributeType::AlwaysSensitive,
                        AttributeType::Token,
                        AttributeType::Private,
                        AttributeType::ValueLen,
                    ],
                )
                .unwrap();
            for expected in [
                Attribute::Extractable(false),
                Attribute::Sensitive(true),
                Attribute::NeverExtractable(true),
                Attribute::AlwaysSensitive(true),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::ValueLen(Ulong::from(ROOT_KEY_BYTES)),
            ] {
                assert!(attrs.contains(&expected), "missing {expected:?} in {attrs:?}");
            }
            // CKA_VALUE: reported sensitive, and never returned.
            let info = session.get_attribute_info(root, &[AttributeType::Value]).unwrap();
            assert!(matches!(info.as_slice(), [AttributeInfo::Sensitive]), "{info:?}");
            match session.get_attributes(root, &[AttributeType::Value]) {
                Ok(values) => assert!(
                    !values.iter().any(|a| matches!(a, Attribute::Value(_))),
                    "CKA_VALUE of the root key was returned"
                ),
                Err(e) => eprintln!("reading CKA_VALUE failed as expected: {e}"),
            }
            // Nor can it be exported wrapped under another key.
            let wrapping = session
                .generate_key(
                    &Mechanism::AesKeyGen,
                    &[
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::KeyType(KeyType::AES),
                        Attribute::ValueLen(Ulong::from(32)),
                        Attribute::Token(false),
                        Attribute::Wrap(true),
                    ],
                )
                .unwrap();
            let export = session.wrap_key(&Mechanism::AesKeyWrap, wrapping, root);
            assert!(
                matches!(export, Err(CkError::Pkcs11(RvError::KeyUnextractable, _))),
                "C_WrapKey of the root key must fail: {export:?}"
            );
        }

        // An imported key (C_CreateObject with a known value), even marked sensitive and
        // non-extractable, is neither always-sensitive nor never-extractable: refused.
        {
            let session = raw_session(true);
            session
                .create_object(&[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::Value(vec![7u8; 32]),
                    Attribute::Label(b"tokenvault-root-imported".to_vec()),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(true),
                ])
                .unwrap();
            let msg = device_error(Pkcs11Provider::open(&good, "tokenvault-root-imported"));
            assert!(
                msg.contains("CKA_ALWAYS_SENSITIVE") || msg.contains("CKA_NEVER_EXTRACTABLE"),
                "{msg}"
            );
        }

        // A destroyed root key is gone for good.
        {
            let doomed = Pkcs11Provider::generate(&good, "tokenvault-root-doomed").unwrap();
            drop(doomed);
            destroy_root_key(&good, "tokenvault-root-doomed").unwrap();
            let msg = device_error(Pkcs11Provider::open(&good, "tokenvault-root-doomed"));
            assert!(msg.contains("no AES secret key labelled"), "{msg}");
            assert!(destroy_root_key(&good, "tokenvault-root-doomed").is_err());
        }

        // Two keys under one label: `open` refuses rather than guess.
        {
            let session = raw_session(true);
            for _ in 0..2 {
                session
                    .generate_key(
                        &Mechanism::AesKeyGen,
                        &[
                            Attribute::Class(ObjectClass::SECRET_KEY),
                            Attribute::KeyType(KeyType::AES),
                            Attribute::ValueLen(Ulong::from(32)),
                            Attribute::Label(b"tokenvault-root-dup".to_vec()),
                            Attribute::Token(true),
                            Attribute::Private(true),
                            Attribute::Sensitive(true),
                            Attribute::Extractable(false),
                            Attribute::Encrypt(true),
                            Attribute::Decrypt(true),
                        ],
                    )
                    .unwrap();
            }
            let msg = device_error(Pkcs11Provider::open(&good, "tokenvault-root-dup"));
            assert!(msg.contains("2 AES secret keys"), "{msg}");
        }

        // Shared across threads (one session, serialized by the mutex).
        let shared = Arc::new(p1b);
        let workers: Vec<_> = (0..8)
            .map(|t| {
                let p = Arc::clone(&shared);
                std::thread::spawn(move || {
                    for i in 0..20u32 {
                        let aad = format!("thread={t}|i={i}");
                        let k = Key256::random();
                        let w = p.wrap(aad.as_bytes(), &k).unwrap();
                        assert_eq!(p.unwrap(aad.as_bytes(), &w).unwrap(), k);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }

        // Everything closed (token logged out): the wrong PIN still fails, and the
        // key persists on the token for a later `open`.
        drop((p1, p2, shared));
        device_error(Pkcs11Provider::open(&wrong, label1));
        let reopened = Pkcs11Provider::open(&good, label1).unwrap();
        assert_eq!(reopened.unwrap(aad, &wrapped).unwrap(), key);
        eprintln!("{INNER}: all SoftHSM scenarios passed");
    }
}
