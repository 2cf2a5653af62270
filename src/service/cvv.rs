//! CVVs in memory only (PCI DSS 3.3.1/3.3.2): sealed under a key that exists
//! only in this process, never written to the store, used by the next charge on
//! the token and then destroyed, or destroyed when the TTL runs out.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::crypto::{Key256, aad};
use crate::domain::card::Cvv;
use crate::domain::token::Token;

const AAD_CVV: &str = "tokenvault/v1/aad/cvv";

pub struct CvvCache {
    key: Key256,
    ttl: Duration,
    held: Mutex<HashMap<String, (Vec<u8>, Instant)>>,
}

impl CvvCache {
    pub fn new(ttl: Duration) -> CvvCache {
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
    pub fn put(&self, token: &Token, cvv: &Cvv) {
        let sealed = self
            .key
            .seal(&aad(AAD_CVV, &[token.as_str().as_bytes()]), cvv.expose().as_bytes());
        self.map()
            .insert(token.as_str().to_owned(), (sealed, Instant::now() + self.ttl));
    }

    /// Removes and returns the CVV for `token`, if one is held and not expired.
    pub fn take(&self, token: &Token) -> Option<Cvv> {
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
    pub fn holds(&self, token: &Token) -> bool {
        self.map()
            .get(token.as_str())
            .is_some_and(|(_, until)| Instant::now() < *until)
    }

    /// Drops every expired CVV; returns how many.
    pub fn purge_expired(&self) -> usize {
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
