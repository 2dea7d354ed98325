//! Rate limits: token buckets, per connection and per key (user, publisher).
//!
//! A [`TokenBucket`] is pure arithmetic over instants the caller passes in,
//! so it is tested without clocks. A [`KeyedLimiter`] keeps one bucket per
//! key (a user id, a publishing key) behind a short `std` mutex and is
//! bounded in memory: a bucket that has refilled to its burst is exactly a
//! fresh bucket, so such idle buckets are dropped by a sweep at no cost to
//! anyone's allowance. When the map is still at its cap after a sweep, a
//! *new* key is refused (fail closed) while known keys keep their buckets:
//! the keys here are authenticated identities, so reaching the cap takes a
//! flood of credentials, and refusing the newcomers is the bounded answer
//! that never hands anyone a reset allowance.
//!
//! [`Limits`] is what a node shares through `AppState`: the per-user and
//! per-publisher limiters, typing throttling, and per-connection buckets,
//! each refusal counted in `subgate_rate_limited_total{scope}`.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus::IntCounter;

use crate::config::RatelimitSettings;
use crate::telemetry::metrics::Metrics;

/// A sustained rate and the burst allowed above it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_second: f64,
    /// Most tokens a bucket holds: how many requests may arrive at once.
    pub burst: u32,
}

impl Rate {
    pub fn new(per_second: f64, burst: u32) -> Self {
        // A zero burst would refuse everything forever, a non-positive rate
        // would never refill: both are configuration errors caught by
        // validation, so here they are only clamped to stay well defined.
        let per_second = if per_second.is_finite() && per_second > 0.0 {
            per_second
        } else {
            f64::MIN_POSITIVE
        };
        Self {
            per_second,
            burst: burst.max(1),
        }
    }

    /// One event per `interval`, no burst: a throttle.
    pub fn every(interval: Duration) -> Self {
        Self::new(1.0 / interval.as_secs_f64().max(1e-9), 1)
    }

    /// How long an empty bucket takes to refill completely; a bucket idle
    /// this long is indistinguishable from a new one.
    pub fn time_to_full(&self) -> Duration {
        Duration::from_secs_f64((self.burst as f64 / self.per_second).min(1e9))
    }
}

/// One token bucket: starts full, refills continuously at the rate, each
/// request takes one token.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: Rate,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket as of `now`.
    pub fn new(rate: Rate, now: Instant) -> Self {
        Self {
            rate,
            tokens: rate.burst as f64,
            updated: now,
        }
    }

    /// Takes one token, or says how long until one is available.
    ///
    /// `now` earlier than a previous call (instants read on other threads)
    /// counts as no time passing, never as a refund.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let missing = 1.0 - self.tokens;
            // Rounded up to whole milliseconds so that a client retrying
            // after exactly this long is admitted.
            let ms = (missing / self.rate.per_second * 1000.0).ceil().max(1.0);
            Err(Duration::from_millis(ms.min(u64::MAX as f64) as u64))
        }
    }

    /// Whether the bucket has refilled to its burst by `now`: dropping it
    /// then loses nothing.
    pub fn is_full(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens + elapsed * self.rate.per_second >= self.rate.burst as f64
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        if elapsed > 0.0 {
            self.tokens =
                (self.tokens + elapsed * self.rate.per_second).min(self.rate.burst as f64);
            self.updated = now;
        }
    }
}

/// One bucket per key, bounded to `max_keys` keys (see the module docs for
/// what happens at the cap).
pub struct KeyedLimiter<K> {
    rate: Rate,
    max_keys: usize,
    /// How often idle buckets are swept at most; a sweep is O(keys), so it
    /// is amortised over at least this much time.
    sweep_every: Duration,
    inner: Mutex<Buckets<K>>,
}

struct Buckets<K> {
    map: HashMap<K, TokenBucket>,
    next_sweep: Instant,
}

impl<K: Hash + Eq> KeyedLimiter<K> {
    pub fn new(rate: Rate, max_keys: usize) -> Self {
        Self::with_start(rate, max_keys, Instant::now())
    }

    fn with_start(rate: Rate, max_keys: usize, now: Instant) -> Self {
        // Sweeping more often than a bucket can refill finds nothing new;
        // at least once a second keeps a full map's refusals short.
        let sweep_every = rate
            .time_to_full()
            .clamp(Duration::from_millis(100), Duration::from_secs(1));
        Self {
            rate,
            max_keys: max_keys.max(1),
            sweep_every,
            inner: Mutex::new(Buckets {
                map: HashMap::new(),
                next_sweep: now + sweep_every,
            }),
        }
    }

    /// Takes a token from `key`'s bucket now.
    pub fn check<Q>(&self, key: &Q) -> Result<(), Duration>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        self.check_at(key, Instant::now())
    }

    /// Takes a token from `key`'s bucket as of `now`.
    pub fn check_at<Q>(&self, key: &Q, now: Instant) -> Result<(), Duration>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if now >= inner.next_sweep {
            inner.sweep(now, self.sweep_every);
        }
        if let Some(bucket) = inner.map.get_mut(key) {
            return bucket.try_take(now);
        }
        if inner.map.len() >= self.max_keys {
            // Deliberate refusal: the map is full of buckets still in use
            // (the sweep above ran at most `sweep_every` ago). The newcomer
            // may retry once the next sweep can make room.
            return Err(inner
                .next_sweep
                .saturating_duration_since(now)
                .max(Duration::from_millis(1)));
        }
        let mut bucket = TokenBucket::new(self.rate, now);
        let taken = bucket.try_take(now);
        inner.map.insert(key.to_owned(), bucket);
        taken
    }

    /// Keys with a bucket right now (idle ones included until the next sweep).
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K: Hash + Eq> Buckets<K> {
    fn sweep(&mut self, now: Instant, every: Duration) {
        self.map.retain(|_, bucket| !bucket.is_full(now));
        self.next_sweep = now + every;
    }
}

/// What was limited: the label of `subgate_rate_limited_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Envelope messages on one connection.
    Connection,
    /// Envelope messages of one user across their connections on a node.
    User,
    /// Publishes by one API key or token subject.
    Publish,
    /// Typing indicators of one user in one channel.
    Typing,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Connection => "connection",
            Scope::User => "user",
            Scope::Publish => "publish",
            Scope::Typing => "typing",
        }
    }
}

/// A refusal: which limit, and when to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    pub scope: Scope,
    pub retry_after: Duration,
}

impl Limited {
    /// A refusal in `scope`, counted in `refused`.
    fn counted(scope: Scope, refused: &IntCounter, retry_after: Duration) -> Self {
        refused.inc();
        Limited { scope, retry_after }
    }

    /// `retry_after` in whole seconds, rounded up and at least 1: the value
    /// of an HTTP `Retry-After` header.
    pub fn retry_after_secs(&self) -> u64 {
        let d = self.retry_after;
        (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
    }

    /// `retry_after` in milliseconds, for a `retry_after_ms` field.
    pub fn retry_after_ms(&self) -> u64 {
        u64::try_from(self.retry_after.as_millis()).unwrap_or(u64::MAX)
    }
}

impl std::fmt::Display for Limited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} rate limit exceeded; retry after {} ms",
            self.scope.as_str(),
            self.retry_after.as_millis()
        )
    }
}

/// The node's shared limiters (`AppState::limits`).
pub struct Limits {
    connection_rate: Rate,
    connection_refused: IntCounter,
    users: ScopedLimiter,
    publishers: ScopedLimiter,
    typing: ScopedLimiter,
}

/// A keyed limiter whose refusals carry its scope and are counted in
/// `rate_limited_total{scope}`.
struct ScopedLimiter {
    limiter: KeyedLimiter<String>,
    scope: Scope,
    refused: IntCounter,
}

impl ScopedLimiter {
    fn new(scope: Scope, rate: Rate, max_keys: usize, metrics: &Metrics) -> Self {
        Self {
            limiter: KeyedLimiter::new(rate, max_keys),
            scope,
            refused: refusals(metrics, scope),
        }
    }

    fn check(&self, key: &str) -> Result<(), Limited> {
        self.limiter
            .check(key)
            .map_err(|retry_after| Limited::counted(self.scope, &self.refused, retry_after))
    }
}

/// The counter of `scope`'s refusals.
fn refusals(metrics: &Metrics, scope: Scope) -> IntCounter {
    metrics
        .rate_limited_total
        .with_label_values(&[scope.as_str()])
}

impl Limits {
    pub fn new(settings: &RatelimitSettings, metrics: &Metrics) -> Self {
        let s = settings;
        Self {
            connection_rate: Rate::new(s.messages_per_second, s.messages_burst),
            connection_refused: refusals(metrics, Scope::Connection),
            users: ScopedLimiter::new(
                Scope::User,
                Rate::new(s.user_messages_per_second, s.user_messages_burst),
                s.max_keys,
                metrics,
            ),
            publishers: ScopedLimiter::new(
                Scope::Publish,
                Rate::new(s.publish_per_second, s.publish_burst),
                s.max_keys,
                metrics,
            ),
            typing: ScopedLimiter::new(
                Scope::Typing,
                Rate::every(Duration::from_secs_f64(s.typing_interval_seconds)),
                s.max_keys,
                metrics,
            ),
        }
    }

    /// A bucket for one connection's envelope messages; the connection owns
    /// it, so it needs no lock and goes away with the connection.
    pub fn connection(&self) -> ConnectionLimiter {
        ConnectionLimiter {
            bucket: TokenBucket::new(self.connection_rate, Instant::now()),
            refused: self.connection_refused.clone(),
        }
    }

    /// One envelope message of `user_id`, counted against their allowance
    /// across all their connections on this node.
    pub fn user_message(&self, user_id: &str) -> Result<(), Limited> {
        self.users.check(user_id)
    }

    /// One publish by `publisher` (an API key or a token's subject).
    pub fn publish(&self, publisher: &str) -> Result<(), Limited> {
        self.publishers.check(publisher)
    }

    /// Whether `user_id`'s typing indicator in `channel_id` may be broadcast
    /// now: at most one per `ratelimit.typing_interval_seconds`.
    pub fn typing(&self, user_id: &str, channel_id: &str) -> Result<(), Limited> {
        // A separator that cannot occur in either id keeps pairs distinct.
        self.typing.check(&format!("{user_id}\u{0}{channel_id}"))
    }
}

/// One connection's message bucket, counting its refusals.
pub struct ConnectionLimiter {
    bucket: TokenBucket,
    refused: IntCounter,
}

impl ConnectionLimiter {
    /// One envelope message on this connection, now.
    pub fn check(&mut self) -> Result<(), Limited> {
        self.check_at(Instant::now())
    }

    pub fn check_at(&mut self, now: Instant) -> Result<(), Limited> {
        self.bucket
            .try_take(now)
            .map_err(|retry_after| Limited::counted(Scope::Connection, &self.refused, retry_after))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A keyed limiter of `per_second` with `burst`, holding at most
    /// `max_keys`, and the instant it starts at.
    fn keyed(per_second: f64, burst: u32, max_keys: usize) -> (KeyedLimiter<String>, Instant) {
        let t0 = Instant::now();
        let limiter = KeyedLimiter::with_start(Rate::new(per_second, burst), max_keys, t0);
        (limiter, t0)
    }

    #[test]
    fn a_bucket_allows_its_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(Rate::new(10.0, 3), t0);
        for _ in 0..3 {
            assert_eq!(b.try_take(t0), Ok(()));
        }
        // Empty: one token takes 100 ms at 10 per second.
        assert_eq!(b.try_take(t0), Err(ms(100)));
        assert_eq!(b.try_take(t0 + ms(40)), Err(ms(60)));
        assert_eq!(b.try_take(t0 + ms(100)), Ok(()));
        assert!(b.try_take(t0 + ms(100)).is_err());
        // A long pause refills to the burst, never beyond.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(b.try_take(later), Ok(()));
        }
        assert!(b.try_take(later).is_err());
    }

    #[test]
    fn time_going_backwards_refunds_nothing() {
        let t0 = Instant::now() + Duration::from_secs(1);
        let mut b = TokenBucket::new(Rate::new(1.0, 1), t0);
        assert_eq!(b.try_take(t0), Ok(()));
        assert!(b.try_take(t0 - ms(500)).is_err());
        assert_eq!(b.try_take(t0), Err(ms(1000)));
    }

    #[test]
    fn retry_after_admits_the_retry() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(Rate::new(3.0, 1), t0);
        b.try_take(t0).unwrap();
        let wait = b.try_take(t0).unwrap_err();
        assert_eq!(wait, ms(334));
        assert_eq!(b.try_take(t0 + wait), Ok(()));
    }

    #[test]
    fn a_throttle_allows_one_per_interval() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(Rate::every(ms(2000)), t0);
        assert_eq!(b.try_take(t0), Ok(()));
        assert_eq!(b.try_take(t0 + ms(500)), Err(ms(1500)));
        assert_eq!(b.try_take(t0 + ms(2000)), Ok(()));
    }

    #[test]
    fn keys_have_separate_buckets() {
        let (l, t0) = keyed(1.0, 2, 10);
        assert!(l.check_at("ann", t0).is_ok());
        assert!(l.check_at("ann", t0).is_ok());
        assert!(l.check_at("ann", t0).is_err());
        assert!(l.check_at("bob", t0).is_ok());
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn idle_keys_are_swept_and_come_back_with_a_full_bucket() {
        let (l, t0) = keyed(10.0, 2, 100);
        for i in 0..50 {
            l.check_at(format!("k{i}").as_str(), t0).unwrap();
        }
        // One key stays busy; the rest refill (0.2 s) and are swept.
        let t1 = t0 + Duration::from_secs(1);
        l.check_at("k0", t1).unwrap();
        l.check_at("k0", t1).unwrap();
        assert_eq!(l.len(), 1, "only the key still below its burst is kept");
        assert!(l.check_at("k0", t1).is_err());
        // A swept key starts again with its whole burst, as it would have.
        assert!(l.check_at("k7", t1).is_ok());
        assert!(l.check_at("k7", t1).is_ok());
    }

    #[test]
    fn at_the_cap_new_keys_are_refused_and_known_keys_are_not() {
        let (l, t0) = keyed(1.0, 5, 3);
        for key in ["a", "b", "c"] {
            l.check_at(key, t0).unwrap();
        }
        let refused = l.check_at("d", t0).unwrap_err();
        assert!(
            refused > Duration::ZERO && refused <= Duration::from_secs(1),
            "{refused:?}"
        );
        assert!(l.check_at("a", t0).is_ok(), "a known key keeps its bucket");
        assert_eq!(l.len(), 3);
        // Once the others have refilled, a sweep makes room.
        let later = t0 + Duration::from_secs(10);
        assert!(l.check_at("d", later).is_ok());
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn the_map_never_exceeds_its_cap() {
        let (l, t0) = keyed(0.001, 1, 1000);
        for i in 0..10_000u64 {
            let _ = l.check_at(format!("k{i}").as_str(), t0 + ms(i));
        }
        assert_eq!(l.len(), 1000);
    }

    #[test]
    fn retry_after_rounds_up_for_http() {
        let limited = |ms| Limited {
            scope: Scope::Publish,
            retry_after: Duration::from_millis(ms),
        };
        assert_eq!(limited(1).retry_after_secs(), 1);
        assert_eq!(limited(1000).retry_after_secs(), 1);
        assert_eq!(limited(1001).retry_after_secs(), 2);
        assert_eq!(limited(250).retry_after_ms(), 250);
    }

    #[test]
    fn refusals_are_counted_by_scope() {
        let metrics = Metrics::new();
        let settings = RatelimitSettings {
            messages_per_second: 1.0,
            messages_burst: 1,
            user_messages_per_second: 1.0,
            user_messages_burst: 1,
            publish_per_second: 1.0,
            publish_burst: 1,
            typing_interval_seconds: 2.0,
            max_keys: 10,
        };
        let limits = Limits::new(&settings, &metrics);
        let mut conn = limits.connection();
        let t0 = Instant::now();
        assert!(conn.check_at(t0).is_ok());
        assert_eq!(conn.check_at(t0).unwrap_err().scope, Scope::Connection);
        assert!(limits.user_message("u1").is_ok());
        assert_eq!(limits.user_message("u1").unwrap_err().scope, Scope::User);
        assert!(limits.publish("key").is_ok());
        assert_eq!(limits.publish("key").unwrap_err().scope, Scope::Publish);
        assert!(limits.typing("u1", "c1").is_ok());
        assert!(
            limits.typing("u1", "c2").is_ok(),
            "typing is throttled per channel"
        );
        assert_eq!(limits.typing("u1", "c1").unwrap_err().scope, Scope::Typing);
        let text = metrics.render();
        for scope in ["connection", "user", "publish", "typing"] {
            assert!(
                text.contains(&format!(
                    "subgate_rate_limited_total{{scope=\"{scope}\"}} 1"
                )),
                "{scope}: {text}"
            );
        }
    }
}
