//! CVVs in memory only (PCI DSS 3.3.1/3.3.2), never written to the store, used
//! by the next charge on the token and then destroyed, or destroyed when the TTL
//! runs out. One vault process keeps them in its own memory, sealed under a key
//! that exists only in that process ([`CvvCache`]); replicas over one database
//! share a Redis that keeps nothing on disk ([`RedisCvv`]): sealed there under a
//! vault key, stored with its TTL, taken with an atomic GETDEL.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::crypto::{Key256, aad};
use crate::domain::card::Cvv;
use crate::domain::token::Token;
use crate::keys::manager::KeyManager;
use crate::store::StoreError;

const AAD_CVV: &str = "tokenvault/v1/aad/cvv";

/// Where CVVs wait for their charge.
pub(super) enum CvvHold {
    Local(CvvCache),
    Redis(RedisCvv),
}

impl CvvHold {
    /// Holds `cvv` for `token` (replacing any earlier one) until the TTL.
    pub(super) async fn put(&self, token: &Token, cvv: &Cvv) -> Result<(), StoreError> {
        match self {
            CvvHold::Local(c) => {
                c.put(token, cvv);
                Ok(())
            }
            CvvHold::Redis(r) => r.put(token, cvv).await,
        }
    }

    /// Removes and returns the CVV for `token`, if one is held and not expired.
    pub(super) async fn take(&self, token: &Token) -> Result<Option<Cvv>, StoreError> {
        match self {
            CvvHold::Local(c) => Ok(c.take(token)),
            CvvHold::Redis(r) => r.take(token).await,
        }
    }

    /// Whether a live CVV is held for `token` (false if that cannot be told).
    pub(super) async fn holds(&self, token: &Token) -> bool {
        match self {
            CvvHold::Local(c) => c.holds(token),
            CvvHold::Redis(r) => r.holds(token).await.unwrap_or(false),
        }
    }

    /// Drops every expired CVV (Redis expires them itself); returns how many.
    pub(super) fn purge_expired(&self) -> usize {
        match self {
            CvvHold::Local(c) => c.purge_expired(),
            CvvHold::Redis(_) => 0,
        }
    }
}

/// CVVs in a Redis shared by vault replicas. The Redis must keep nothing on disk
/// (no RDB snapshots, no AOF): [`RedisCvv::connect`] refuses one that does. Keys
/// are keyed HMACs of the token (Redis never sees a token), values AES-256-GCM
/// under the keyring's CVV-hold key with the token as associated data, so Redis
/// holds nothing usable without the vault's keys.
pub(super) struct RedisCvv {
    client: redis::Client,
    conn: tokio::sync::OnceCell<redis::aio::ConnectionManager>,
    keys: Arc<KeyManager>,
    ttl: Duration,
}

fn redis_err(e: redis::RedisError) -> StoreError {
    // Connection trouble is "unavailable"; the detail names no key or value.
    StoreError::Unavailable(format!("Redis: {}", e.category()))
}

impl RedisCvv {
    /// Checks the Redis (reachable, persistence off) and prepares the connection.
    pub(super) fn connect(url: &str, keys: Arc<KeyManager>, ttl: Duration) -> Result<RedisCvv, StoreError> {
        let client =
            redis::Client::open(url).map_err(|_| StoreError::Backend("the CVV Redis URL does not parse".into()))?;
        let mut conn = client
            .get_connection_with_timeout(Duration::from_secs(5))
            .map_err(|e| StoreError::Backend(format!("cannot reach the CVV Redis: {}", e.category())))?;
        let config = |name: &str, conn: &mut redis::Connection| -> Option<String> {
            let v: Vec<String> = redis::cmd("CONFIG").arg("GET").arg(name).query(conn).ok()?;
            v.get(1).cloned()
        };
        match (config("appendonly", &mut conn), config("save", &mut conn)) {
            (Some(aof), Some(save)) => {
                if aof != "no" || !save.trim().is_empty() {
                    return Err(StoreError::Backend(format!(
                        "the CVV Redis persists to disk (appendonly={aof}, save=\"{save}\"): CVVs must stay in \
                         memory only (PCI DSS 3.3.2). Turn persistence off (appendonly no, save \"\")"
                    )));
                }
            }
            _ => tracing::warn!(
                "cannot read the CVV Redis's persistence settings (CONFIG is disabled): make sure it keeps \
                 nothing on disk (no RDB snapshots, no AOF), or CVVs reach its disk"
            ),
        }
        Ok(RedisCvv {
            client,
            conn: tokio::sync::OnceCell::new(),
            keys,
            ttl,
        })
    }

    async fn conn(&self) -> Result<redis::aio::ConnectionManager, StoreError> {
        self.conn
            .get_or_try_init(|| async {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(2)))
                    .set_response_timeout(Some(Duration::from_secs(2)))
                    .set_number_of_retries(1);
                redis::aio::ConnectionManager::new_with_config(self.client.clone(), config).await
            })
            .await
            .cloned()
            .map_err(redis_err)
    }

    fn key(&self) -> Result<Key256, StoreError> {
        self.keys
            .ring()
            .map(|r| r.cvv_hold_key())
            .ok_or_else(|| StoreError::Unavailable("the vault is sealed".into()))
    }

    /// The Redis key for a token: a keyed HMAC, so Redis never learns tokens.
    fn name(key: &Key256, token: &Token) -> String {
        format!("tv:cvv:{}", hex::encode(key.hmac(token.as_str().as_bytes())))
    }

    async fn put(&self, token: &Token, cvv: &Cvv) -> Result<(), StoreError> {
        let key = self.key()?;
        let sealed = key.seal(&aad(AAD_CVV, &[token.as_str().as_bytes()]), cvv.expose().as_bytes());
        let ms = self.ttl.as_millis().max(1) as u64;
        let mut conn = self.conn().await?;
        redis::cmd("SET")
            .arg(Self::name(&key, token))
            .arg(sealed)
            .arg("PX")
            .arg(ms)
            .query_async::<()>(&mut conn)
            .await
            .map_err(redis_err)
    }

    async fn take(&self, token: &Token) -> Result<Option<Cvv>, StoreError> {
        let key = self.key()?;
        let mut conn = self.conn().await?;
        // Atomic: of two replicas charging at once, one gets it, the other nothing.
        let sealed: Option<Vec<u8>> = redis::cmd("GETDEL")
            .arg(Self::name(&key, token))
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        let Some(sealed) = sealed else { return Ok(None) };
        let plain = key
            .open(&aad(AAD_CVV, &[token.as_str().as_bytes()]), &sealed)
            .map_err(|_| StoreError::Corrupt)?;
        Ok(std::str::from_utf8(&plain).ok().and_then(Cvv::from_trusted))
    }

    async fn holds(&self, token: &Token) -> Result<bool, StoreError> {
        let key = self.key()?;
        let mut conn = self.conn().await?;
        redis::cmd("EXISTS")
            .arg(Self::name(&key, token))
            .query_async::<bool>(&mut conn)
            .await
            .map_err(redis_err)
    }
}

pub(super) struct CvvCache {
    key: Key256,
    ttl: Duration,
    held: Mutex<HashMap<String, (Vec<u8>, Instant)>>,
}

impl CvvCache {
    pub(super) fn new(ttl: Duration) -> CvvCache {
        CvvCache {
            key: Key256::random(),
            ttl,
            held: Mutex::new(HashMap::new()),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Vec<u8>, Instant)>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds `cvv` for `token` (replacing any earlier one) until the TTL.
    pub(super) fn put(&self, token: &Token, cvv: &Cvv) {
        let sealed = self
            .key
            .seal(&aad(AAD_CVV, &[token.as_str().as_bytes()]), cvv.expose().as_bytes());
        self.map()
            .insert(token.as_str().to_owned(), (sealed, Instant::now() + self.ttl));
    }

    /// Removes and returns the CVV for `token`, if one is held and not expired.
    pub(super) fn take(&self, token: &Token) -> Option<Cvv> {
        let (sealed, until) = self.map().remove(token.as_str())?;
        if Instant::now() >= until {
            return None;
        }
        let plain = self
            .key
            .open(&aad(AAD_CVV, &[token.as_str().as_bytes()]), &sealed)
            .ok()?;
        Cvv::from_trusted(std::str::from_utf8(&plain).ok()?)
    }

    /// Whether a live CVV is held for `token` (metadata shows only this).
    pub(super) fn holds(&self, token: &Token) -> bool {
        self.map()
            .get(token.as_str())
            .is_some_and(|(_, until)| Instant::now() < *until)
    }

    /// Drops every expired CVV; returns how many.
    pub(super) fn purge_expired(&self) -> usize {
        let now = Instant::now();
        let mut map = self.map();
        let before = map.len();
        map.retain(|_, (_, until)| now < *until);
        before - map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::card::Brand;

    #[test]
    fn used_once_then_gone_and_expires() {
        let cache = CvvCache::new(Duration::from_millis(200));
        let t = Token::parse("4111110000001112").unwrap();
        let other = Token::parse("4111110000002112").unwrap();
        cache.put(&t, &Cvv::parse("737", Brand::Visa).unwrap());
        assert!(cache.holds(&t));
        assert!(!cache.holds(&other));
        assert!(cache.take(&other).is_none());
        assert_eq!(cache.take(&t).unwrap().expose(), "737");
        assert!(cache.take(&t).is_none(), "destroyed after one use");
        assert!(!cache.holds(&t));
        cache.put(&t, &Cvv::parse("123", Brand::Visa).unwrap());
        std::thread::sleep(Duration::from_millis(250));
        assert!(!cache.holds(&t));
        assert_eq!(cache.purge_expired(), 1);
        assert!(cache.take(&t).is_none());
    }
}
