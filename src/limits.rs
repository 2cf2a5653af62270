//! Abuse resistance: per-client rate limits (token buckets from `governor`),
//! tighter for detokenize and charges than for tokenize. A caller over its limit
//! gets `429` with `Retry-After`; the refusal is counted in metrics.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Which budget a request draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
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
        let limits = RateLimits(HashMap::from([(LimitClass::Detokenize, 3), (LimitClass::Charges, 1)]));
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
        let d = RateLimits::production_defaults();
        assert!(d.0[&LimitClass::Detokenize] < d.0[&LimitClass::Tokenize]);
        assert!(d.0[&LimitClass::Charges] < d.0[&LimitClass::Detokenize]);
    }
}

/// Parameters of the detokenize anomaly guard.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AnomalyParams {
    /// Length of one counting window.
    pub window: Duration,
    /// A window above `factor` × the client's average of recent windows is anomalous…
    pub factor: f64,
    /// …if it is also above this floor (so a quiet client may still burst a little).
    pub floor: u32,
    /// How long an anomalous client stays throttled.
    pub cooldown: Duration,
}

impl AnomalyParams {
    /// Production defaults: 10× the usual volume, at least 600 per minute, 15-minute cooldown.
    pub fn production_defaults() -> AnomalyParams {
        AnomalyParams {
            window: Duration::from_secs(60),
            factor: 10.0,
            floor: 600,
            cooldown: Duration::from_secs(900),
        }
    }

    /// Parses `window=60s,factor=10,floor=600,cooldown=15m` (missing keys keep the defaults).
    /// What a configuration must keep: a window, and a factor of at least 1.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.window.is_zero() || !(self.factor >= 1.0 && self.factor.is_finite()) {
            return Err("window must be > 0 and factor a number ≥ 1");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnomalyVerdict {
    Allow,
    /// This request pushed the client over: newly throttled (audit it).
    Flagged {
        count: u32,
        threshold: u32,
    },
    /// Already throttled; retry after this long.
    Throttled(Duration),
}

#[derive(Debug)]
struct ClientWindow {
    started: std::time::Instant,
    count: u32,
    history: std::collections::VecDeque<u32>,
    throttled_until: Option<std::time::Instant>,
}

/// Per-client detokenize volume against the client's own recent baseline.
pub struct AnomalyGuard {
    params: AnomalyParams,
    clients: std::sync::Mutex<HashMap<String, ClientWindow>>,
}

const HISTORY: usize = 30;

impl AnomalyGuard {
    pub fn new(params: AnomalyParams) -> AnomalyGuard {
        AnomalyGuard {
            params,
            clients: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// How long a flagged client stays throttled.
    pub fn cooldown(&self) -> Duration {
        self.params.cooldown
    }

    /// Counts one detokenize by `client` and decides.
    pub fn check(&self, client: &str) -> AnomalyVerdict {
        let now = std::time::Instant::now();
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let w = clients.entry(client.to_owned()).or_insert_with(|| ClientWindow {
            started: now,
            count: 0,
            history: std::collections::VecDeque::new(),
            throttled_until: None,
        });
        if let Some(until) = w.throttled_until {
            if now < until {
                return AnomalyVerdict::Throttled(until - now);
            }
            w.throttled_until = None;
        }
        // Roll the window forward (empty windows count as zero).
        while now.duration_since(w.started) >= self.params.window {
            w.history.push_back(w.count);
            if w.history.len() > HISTORY {
                w.history.pop_front();
            }
            w.count = 0;
            w.started += self.params.window;
        }
        w.count += 1;
        let baseline = if w.history.is_empty() {
            0.0
        } else {
            w.history.iter().map(|c| f64::from(*c)).sum::<f64>() / w.history.len() as f64
        };
        let threshold = ((baseline * self.params.factor).ceil() as u32).max(self.params.floor);
        if w.count > threshold {
            w.throttled_until = Some(now + self.params.cooldown);
            return AnomalyVerdict::Flagged {
                count: w.count,
                threshold,
            };
        }
        AnomalyVerdict::Allow
    }
}

#[cfg(test)]
mod anomaly_tests {
    use super::*;

    #[test]
    fn flags_a_burst_far_above_the_clients_own_baseline() {
        let p = AnomalyParams {
            window: Duration::from_millis(50),
            factor: 3.0,
            floor: 5,
            cooldown: Duration::from_millis(200),
        };
        let g = AnomalyGuard::new(p);
        for _ in 0..3 {
            for _ in 0..2 {
                assert_eq!(g.check("psp"), AnomalyVerdict::Allow);
            }
            std::thread::sleep(Duration::from_millis(55));
        }
        let verdicts: Vec<_> = (0..10).map(|_| g.check("psp")).collect();
        assert!(
            verdicts[..6].iter().all(|v| *v == AnomalyVerdict::Allow),
            "{verdicts:?}"
        );
        assert!(
            matches!(verdicts[6], AnomalyVerdict::Flagged { count: 7, threshold: 6 }),
            "{verdicts:?}"
        );
        assert!(verdicts[7..].iter().all(|v| matches!(v, AnomalyVerdict::Throttled(_))));
        assert_eq!(g.check("another-client"), AnomalyVerdict::Allow, "per client");
        std::thread::sleep(Duration::from_millis(210));
        assert_eq!(g.check("psp"), AnomalyVerdict::Allow, "cooldown over");
        assert!(p.check().is_ok());
        for bad in [0.5, f64::NAN, f64::INFINITY] {
            assert!(AnomalyParams { factor: bad, ..p }.check().is_err(), "{bad}");
        }
        assert!(
            AnomalyParams {
                window: Duration::ZERO,
                ..p
            }
            .check()
            .is_err()
        );
    }
}

/// Parameters of the tokenize enumeration guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnumerationParams {
    /// Distinct cards sharing one BIN and last four that one client may submit
    /// for one tenant within `window`.
    pub max_distinct: u32,
    pub window: Duration,
    /// How long a flagged client's tokenize requests are refused.
    pub cooldown: Duration,
}

impl Default for EnumerationParams {
    /// A handful: 5 distinct cards per BIN + last four per client and tenant an hour.
    /// Real traffic almost never repeats a BIN + last four with another card within
    /// an hour from one client; a walk of the middle digits does at once.
    fn default() -> Self {
        EnumerationParams {
            max_distinct: 5,
            window: Duration::from_secs(3600),
            cooldown: Duration::from_secs(900),
        }
    }
}

impl EnumerationParams {
    /// Parses `off` or `max=5,window=1h,cooldown=15m` (missing keys keep the defaults).
    /// What a configuration must keep: a positive count and window.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.max_distinct == 0 || self.window.is_zero() {
            return Err("max_distinct and window must be positive");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnumerationVerdict {
    Allow,
    /// This card pushed the client over: newly throttled (audit and alert).
    Flagged {
        distinct: u32,
    },
    /// Already throttled; retry after this long.
    Throttled(Duration),
}

#[derive(Clone)]
struct Seen {
    started: std::time::Instant,
    /// Short prefixes of the cards' keyed fingerprints (no card data).
    cards: Vec<[u8; 8]>,
}

/// Detects a walk over the hidden middle digits of a card whose BIN and last four
/// are known (from a token or its metadata): many *distinct* cards sharing one
/// BIN + last four from one client and tenant. Memory is bounded: both maps are
/// fixed-capacity caches, and each entry holds at most `max_distinct + 1`
/// fingerprint prefixes.
pub struct EnumerationGuard {
    params: EnumerationParams,
    seen: quick_cache::sync::Cache<[u8; 32], Seen>,
    throttled: quick_cache::sync::Cache<[u8; 32], std::time::Instant>,
    lock: std::sync::Mutex<()>,
}

impl EnumerationGuard {
    pub fn new(params: EnumerationParams) -> EnumerationGuard {
        EnumerationGuard {
            params,
            seen: quick_cache::sync::Cache::new(100_000),
            throttled: quick_cache::sync::Cache::new(10_000),
            lock: std::sync::Mutex::new(()),
        }
    }

    fn client_key(client: &str, tenant: &str) -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::new()
            .chain_update(client.as_bytes())
            .chain_update([0])
            .chain_update(tenant.as_bytes())
            .finalize()
            .into()
    }

    /// Counts one card (by its keyed fingerprint) for `client` in `tenant`, under
    /// its BIN and last four, and decides.
    pub fn check(
        &self,
        client: &str,
        tenant: &str,
        bin: &str,
        last4: &str,
        fingerprint: &[u8; 32],
    ) -> EnumerationVerdict {
        use sha2::Digest;
        let now = std::time::Instant::now();
        let who = Self::client_key(client, tenant);
        let _serial = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(until) = self.throttled.get(&who) {
            if now < until {
                return EnumerationVerdict::Throttled(until - now);
            }
            self.throttled.remove(&who);
        }
        let key: [u8; 32] = sha2::Sha256::new()
            .chain_update(who)
            .chain_update(bin.as_bytes())
            .chain_update([0])
            .chain_update(last4.as_bytes())
            .finalize()
            .into();
        let mut seen = match self.seen.get(&key) {
            Some(s) if now.duration_since(s.started) < self.params.window => s,
            _ => Seen {
                started: now,
                cards: Vec::new(),
            },
        };
        let mut prefix = [0u8; 8];
        prefix.copy_from_slice(&fingerprint[..8]);
        if !seen.cards.contains(&prefix) {
            seen.cards.push(prefix);
        }
        let distinct = seen.cards.len() as u32;
        if distinct > self.params.max_distinct {
            self.seen.remove(&key);
            self.throttled.insert(who, now + self.params.cooldown);
            return EnumerationVerdict::Flagged { distinct };
        }
        self.seen.insert(key, seen);
        EnumerationVerdict::Allow
    }

    pub fn cooldown(&self) -> Duration {
        self.params.cooldown
    }
}

#[cfg(test)]
mod enumeration_tests {
    use super::*;

    #[test]
    fn flags_many_distinct_cards_behind_one_bin_and_last_four() {
        let g = EnumerationGuard::new(EnumerationParams {
            max_distinct: 3,
            window: Duration::from_secs(60),
            cooldown: Duration::from_millis(100),
        });
        let fp = |i: u8| [i; 32];
        // The same card again and again is not a walk.
        for _ in 0..10 {
            assert_eq!(
                g.check("edge", "t", "411111", "1111", &fp(1)),
                EnumerationVerdict::Allow
            );
        }
        // Other BIN/last-four pairs and other clients count apart.
        for i in 0..10 {
            assert_eq!(
                g.check("edge", "t", "411111", &format!("{i:04}"), &fp(50 + i as u8)),
                EnumerationVerdict::Allow
            );
        }
        assert_eq!(
            g.check("edge", "t", "411111", "1111", &fp(2)),
            EnumerationVerdict::Allow
        );
        assert_eq!(
            g.check("edge", "t", "411111", "1111", &fp(3)),
            EnumerationVerdict::Allow
        );
        assert_eq!(
            g.check("other", "t", "411111", "1111", &fp(4)),
            EnumerationVerdict::Allow
        );
        assert_eq!(
            g.check("edge", "u", "411111", "1111", &fp(4)),
            EnumerationVerdict::Allow
        );
        assert_eq!(
            g.check("edge", "t", "411111", "1111", &fp(4)),
            EnumerationVerdict::Flagged { distinct: 4 }
        );
        assert!(matches!(
            g.check("edge", "t", "999999", "0000", &fp(9)),
            EnumerationVerdict::Throttled(_)
        ));
        std::thread::sleep(Duration::from_millis(120));
        assert_eq!(
            g.check("edge", "t", "411111", "1111", &fp(5)),
            EnumerationVerdict::Allow
        );
    }
}

/// Unauthenticated-flood defences: a per-source budget of failed requests per
/// window, and the window over which failures are aggregated in the audit trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailureParams {
    /// Failed authentications one source may make per window; past it, the source
    /// is refused (429) before any JWT is parsed, until the window ends.
    pub max_per_source: u32,
    pub window: Duration,
}

impl Default for FailureParams {
    fn default() -> Self {
        FailureParams {
            max_per_source: 1000,
            window: Duration::from_secs(60),
        }
    }
}

/// What the tracker decided for one failed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureVerdict {
    /// The first failure of this source in the window: audit it individually.
    First,
    /// Counted toward the source's aggregated record.
    Counted,
}

/// One source's failures in a window that has ended: written as one audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureSummary {
    pub source: String,
    pub total: u64,
    /// Failures by fixed reason label, plus `blocked` for refusals before authentication.
    pub reasons: Vec<(&'static str, u64)>,
    pub window_secs: u64,
}

struct SourceWindow {
    started: std::time::Instant,
    total: u64,
    reasons: Vec<(&'static str, u64)>,
}

/// Sources tracked at once; beyond this, new sources share one overflow entry,
/// so a flood from many addresses cannot grow memory without bound.
const MAX_SOURCES: usize = 10_000;
const OVERFLOW_SOURCE: &str = "(other sources)";

/// Per-source failed-authentication accounting (bounded memory).
pub struct FailureTracker {
    params: FailureParams,
    sources: std::sync::Mutex<HashMap<String, SourceWindow>>,
}

impl FailureTracker {
    pub fn new(params: FailureParams) -> FailureTracker {
        FailureTracker {
            params,
            sources: std::sync::Mutex::new(HashMap::new()),
        }
    }

    pub fn window(&self) -> Duration {
        self.params.window
    }

    fn entry<'a>(
        map: &'a mut HashMap<String, SourceWindow>,
        source: &str,
        now: std::time::Instant,
    ) -> (&'a mut SourceWindow, bool) {
        let key = if map.contains_key(source) || map.len() < MAX_SOURCES {
            source
        } else {
            OVERFLOW_SOURCE
        };
        let mut fresh = false;
        let w = map.entry(key.to_owned()).or_insert_with(|| {
            fresh = true;
            SourceWindow {
                started: now,
                total: 0,
                reasons: Vec::new(),
            }
        });
        (w, fresh)
    }

    /// `Some(wait)` when `source` has spent its failure budget for this window:
    /// refuse it before authentication. The refusal is counted (as `blocked`).
    pub fn blocked(&self, source: &str) -> Option<Duration> {
        let now = std::time::Instant::now();
        let mut map = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let w = map.get_mut(source)?;
        let elapsed = now.duration_since(w.started);
        if elapsed >= self.params.window || w.total < u64::from(self.params.max_per_source) {
            return None;
        }
        w.total += 1;
        bump(&mut w.reasons, "blocked");
        Some(self.params.window - elapsed)
    }

    /// Counts one failed authentication from `source` for `reason`: the first of
    /// each reason per source and window is audited on its own (a bounded number:
    /// the reasons are a fixed vocabulary), the rest only counted.
    pub fn record(&self, source: &str, reason: &'static str) -> FailureVerdict {
        let now = std::time::Instant::now();
        let mut map = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let (w, _) = Self::entry(&mut map, source, now);
        w.total += 1;
        let first = !w.reasons.iter().any(|(r, _)| *r == reason);
        bump(&mut w.reasons, reason);
        if first {
            FailureVerdict::First
        } else {
            FailureVerdict::Counted
        }
    }

    /// Removes windows that have ended and returns the ones with more than their
    /// first (already audited) failure, for one aggregated audit record each.
    /// `force` ends every window (at shutdown).
    pub fn drain_ended(&self, force: bool) -> Vec<FailureSummary> {
        let now = std::time::Instant::now();
        let mut map = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let ended: Vec<String> = map
            .iter()
            .filter(|(_, w)| force || now.duration_since(w.started) >= self.params.window)
            .map(|(k, _)| k.clone())
            .collect();
        ended
            .into_iter()
            .filter_map(|k| {
                let w = map.remove(&k)?;
                let individually = w.reasons.iter().filter(|(r, _)| *r != "blocked").count() as u64;
                (w.total > individually).then_some(FailureSummary {
                    source: k,
                    total: w.total,
                    reasons: w.reasons,
                    window_secs: self.params.window.as_secs(),
                })
            })
            .collect()
    }

    /// Sources currently tracked (for tests and metrics).
    pub fn tracked(&self) -> usize {
        self.sources.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

fn bump(reasons: &mut Vec<(&'static str, u64)>, reason: &'static str) {
    match reasons.iter_mut().find(|(r, _)| *r == reason) {
        Some((_, n)) => *n += 1,
        None => reasons.push((reason, 1)),
    }
}

#[cfg(test)]
mod failure_tests {
    use super::*;

    #[test]
    fn first_failure_audited_rest_aggregated_and_sources_blocked() {
        let t = FailureTracker::new(FailureParams {
            max_per_source: 3,
            window: Duration::from_millis(150),
        });
        assert_eq!(t.record("10.0.0.1", "malformed"), FailureVerdict::First);
        assert_eq!(
            t.record("10.0.0.1", "signature"),
            FailureVerdict::First,
            "first of its reason"
        );
        assert_eq!(t.blocked("10.0.0.1"), None, "under budget");
        assert_eq!(t.record("10.0.0.1", "malformed"), FailureVerdict::Counted);
        assert!(t.blocked("10.0.0.1").is_some(), "budget spent");
        assert_eq!(t.blocked("10.0.0.2"), None, "per source");
        assert_eq!(t.record("10.0.0.2", "missing"), FailureVerdict::First);
        assert!(t.drain_ended(false).is_empty(), "windows still open");
        std::thread::sleep(Duration::from_millis(160));
        assert_eq!(t.blocked("10.0.0.1"), None, "window over");
        let mut summaries = t.drain_ended(false);
        summaries.sort_by(|a, b| a.source.cmp(&b.source));
        assert_eq!(summaries.len(), 1, "a source with only first failures needs no summary");
        assert_eq!(summaries[0].source, "10.0.0.1");
        assert_eq!(summaries[0].total, 4);
        assert_eq!(
            summaries[0].reasons,
            vec![("malformed", 2), ("signature", 1), ("blocked", 1)]
        );
        assert_eq!(t.tracked(), 0);
        // Bounded: past MAX_SOURCES, new sources share one entry.
        for i in 0..(MAX_SOURCES + 50) {
            t.record(&format!("s{i}"), "missing");
        }
        assert_eq!(t.tracked(), MAX_SOURCES + 1);
    }
}
