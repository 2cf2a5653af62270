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
    pub fn parse(s: &str) -> Result<AnomalyParams, String> {
        let mut p = AnomalyParams::production_defaults();
        for part in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("expected key=value, got {part:?}"))?;
            let dur = |v: &str| humantime::parse_duration(v.trim()).map_err(|_| format!("bad duration {v:?}"));
            match k.trim() {
                "window" => p.window = dur(v)?,
                "cooldown" => p.cooldown = dur(v)?,
                "factor" => p.factor = v.trim().parse().map_err(|_| format!("bad factor {v:?}"))?,
                "floor" => p.floor = v.trim().parse().map_err(|_| format!("bad floor {v:?}"))?,
                other => return Err(format!("unknown anomaly-guard key {other:?}")),
            }
        }
        if p.window.is_zero() || p.factor < 1.0 {
            return Err("window must be > 0 and factor ≥ 1".into());
        }
        Ok(p)
    }
}

/// What the guard decided for one detokenize.
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
        assert!(AnomalyParams::parse("window=1s,factor=4,floor=20,cooldown=3s").is_ok());
        assert!(AnomalyParams::parse("factor=0.5").is_err());
    }
}
