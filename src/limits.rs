//! Abuse resistance: per-client rate limits (token buckets from `governor`),
//! tighter for detokenize and charges than for tokenize. A caller over its limit
//! gets `429` with `Retry-After`; the refusal is counted in metrics.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Which budget a request draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitClass {
    Tokenize,
    Detokenize,
    Charges,
    Other,
}

impl LimitClass {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitClass::Tokenize => "tokenize",
            LimitClass::Detokenize => "detokenize",
            LimitClass::Charges => "charges",
            LimitClass::Other => "other",
        }
    }

    fn parse(s: &str) -> Option<LimitClass> {
        [
            LimitClass::Tokenize,
            LimitClass::Detokenize,
            LimitClass::Charges,
            LimitClass::Other,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
    }
}

/// Requests per second per client, by class (the burst equals one second's worth).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimits(pub HashMap<LimitClass, u32>);

impl RateLimits {
    /// Production defaults: detokenize and charges much tighter than tokenize.
    pub fn production_defaults() -> RateLimits {
        RateLimits(HashMap::from([
            (LimitClass::Tokenize, 200),
            (LimitClass::Detokenize, 50),
            (LimitClass::Charges, 20),
            (LimitClass::Other, 100),
        ]))
    }

    /// Parses `tokenize=200,detokenize=50,charges=20,other=100` (missing classes are unlimited).
    pub fn parse(s: &str) -> Result<RateLimits, String> {
        let mut map = HashMap::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("expected class=N, got {part:?}"))?;
            let class = LimitClass::parse(k.trim()).ok_or_else(|| format!("unknown rate-limit class {k:?}"))?;
            let n: u32 = v
                .trim()
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("bad rate {v:?}"))?;
            map.insert(class, n);
        }
        Ok(RateLimits(map))
    }
}

/// The limiter: one keyed token bucket per class, keyed by client `sub`.
pub struct Limiter {
    buckets: HashMap<LimitClass, DefaultKeyedRateLimiter<String>>,
}

impl Limiter {
    pub fn new(limits: &RateLimits) -> Limiter {
        let buckets = limits
            .0
            .iter()
            .filter_map(|(class, n)| {
                let n = NonZeroU32::new(*n)?;
                Some((*class, RateLimiter::keyed(Quota::per_second(n).allow_burst(n))))
            })
            .collect();
        Limiter { buckets }
    }

    /// `Err(wait)` if `client` is over its `class` budget.
    pub fn check(&self, class: LimitClass, client: &str) -> Result<(), Duration> {
        let Some(bucket) = self.buckets.get(&class) else {
            return Ok(());
        };
        bucket
            .check_key(&client.to_owned())
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_enforce() {
        let limits = RateLimits::parse("detokenize=3, charges=1").unwrap();
        let limiter = Limiter::new(&limits);
        for _ in 0..3 {
            assert!(limiter.check(LimitClass::Detokenize, "psp").is_ok());
        }
        let wait = limiter.check(LimitClass::Detokenize, "psp").unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
        assert!(
            limiter.check(LimitClass::Detokenize, "other-client").is_ok(),
            "per client"
        );
        assert!(
            limiter.check(LimitClass::Tokenize, "psp").is_ok(),
            "unlisted class is unlimited"
        );
        assert!(RateLimits::parse("nope=1").is_err());
        assert!(RateLimits::parse("tokenize=0").is_err());
        let d = RateLimits::production_defaults();
        assert!(d.0[&LimitClass::Detokenize] < d.0[&LimitClass::Tokenize]);
        assert!(d.0[&LimitClass::Charges] < d.0[&LimitClass::Detokenize]);
    }
}
