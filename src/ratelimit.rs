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
//! per-publisher limiters, typing throttling, per-connection buckets, the
//! per-address and per-email limits of `login` / `createUser`, the
//! per-address limit of failed publish authentications, and the bound on
//! concurrent password hashes, each refusal counted in
//! `subgate_rate_limited_total{scope}`.
//!
//! Some keys here are not authenticated identities (client addresses,
//! emails typed into `login`): the cap still bounds memory, and a flood of
//! new addresses is refused until idle buckets are swept, which is the
//! safe side for the unauthenticated operations they guard.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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

    /// Whether a token is available at `now`, taking none; else how long
    /// until one is.
    pub fn peek(&self, now: Instant) -> Result<(), Duration> {
        let mut copy = self.clone();
        copy.try_take(now)
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

    /// Whether `key` has a token now, taking none (an unknown key has a
    /// full bucket).
    pub fn peek<Q>(&self, key: &Q) -> Result<(), Duration>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.peek_at(key, Instant::now())
    }

    pub fn peek_at<Q>(&self, key: &Q, now: Instant) -> Result<(), Duration>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match inner.map.get(key) {
            Some(bucket) => bucket.peek(now),
            None => Ok(()),
        }
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
    /// `login` and `createUser` calls from one client address.
    Login,
    /// `login` attempts for one email address.
    LoginEmail,
    /// Password hashing at capacity (`auth.max_concurrent_password_hashes`).
    PasswordHash,
    /// Failed authentications on the publish API from one client address.
    PublishAuth,
    /// Large documents beyond the queue of those waiting to be checked
    /// (`graphql::limits::LARGE_WORK_QUEUE`).
    LargeDocument,
}

impl Scope {
    /// Every scope: each label value exists from the start.
    pub const ALL: [Scope; 9] = [
        Scope::Connection,
        Scope::User,
        Scope::Publish,
        Scope::Typing,
        Scope::Login,
        Scope::LoginEmail,
        Scope::PasswordHash,
        Scope::PublishAuth,
        Scope::LargeDocument,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Connection => "connection",
            Scope::User => "user",
            Scope::Publish => "publish",
            Scope::Typing => "typing",
            Scope::Login => "login",
            Scope::LoginEmail => "login_email",
            Scope::PasswordHash => "password_hash",
            Scope::PublishAuth => "publish_auth",
            Scope::LargeDocument => "large_document",
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
    login_addresses: ScopedLimiter,
    login_emails: ScopedLimiter,
    publish_auth_failures: ScopedLimiter,
    password_hashes: PasswordSlots,
}

/// How long a password operation waits for a free hashing slot before it
/// is refused: long enough to ride out a short burst (a hash takes tens of
/// milliseconds), short enough that nobody waits long.
pub const PASSWORD_HASH_WAIT: Duration = Duration::from_secs(1);

/// How many callers may wait for a hashing slot, per slot: a few sign-ups
/// at once are served in turn, a storm beyond this is refused at once.
pub const PASSWORD_HASH_WAITERS_PER_SLOT: usize = 4;

/// When a caller refused for want of a hashing slot should try again.
const PASSWORD_HASH_RETRY: Duration = Duration::from_secs(1);

/// The bound on concurrent password hashes, and on the callers waiting
/// for one.
struct PasswordSlots {
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_waiting: usize,
    refused: IntCounter,
}

/// One caller counted in `PasswordSlots::waiting` until dropped.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The key of a client address: an IPv4 address, or an IPv6 address's /64
/// (one host usually holds a whole /64, so counting single IPv6 addresses
/// would hand it 2^64 allowances).
pub fn address_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                format!("{}/64", std::net::Ipv6Addr::from(prefix))
            }
        },
    }
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

    fn peek(&self, key: &str) -> Result<(), Limited> {
        self.limiter
            .peek(key)
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
    /// The limits of `settings`, with `password_hashes` hashing slots.
    pub fn new(settings: &RatelimitSettings, password_hashes: usize, metrics: &Metrics) -> Self {
        let s = settings;
        let limiter = |scope, rate| ScopedLimiter::new(scope, rate, s.max_keys, metrics);
        Self {
            connection_rate: Rate::new(s.messages_per_second, s.messages_burst),
            connection_refused: refusals(metrics, Scope::Connection),
            users: limiter(
                Scope::User,
                Rate::new(s.user_messages_per_second, s.user_messages_burst),
            ),
            publishers: limiter(
                Scope::Publish,
                Rate::new(s.publish_per_second, s.publish_burst),
            ),
            typing: limiter(
                Scope::Typing,
                Rate::every(Duration::from_secs_f64(s.typing_interval_seconds)),
            ),
            login_addresses: limiter(Scope::Login, Rate::new(s.login_per_second, s.login_burst)),
            login_emails: limiter(
                Scope::LoginEmail,
                Rate::new(s.login_email_per_second, s.login_email_burst),
            ),
            publish_auth_failures: limiter(
                Scope::PublishAuth,
                Rate::new(
                    s.publish_auth_failures_per_second,
                    s.publish_auth_failures_burst,
                ),
            ),
            password_hashes: PasswordSlots {
                slots: Arc::new(Semaphore::new(password_hashes.max(1))),
                waiting: AtomicUsize::new(0),
                max_waiting: password_hashes.max(1) * PASSWORD_HASH_WAITERS_PER_SLOT,
                refused: refusals(metrics, Scope::PasswordHash),
            },
        }
    }

    /// One `login` or `createUser` call from `client`.
    pub fn login_address(&self, client: IpAddr) -> Result<(), Limited> {
        self.login_addresses.check(&address_key(client))
    }

    /// One `login` attempt for `email` (compared case-insensitively).
    pub fn login_email(&self, email: &str) -> Result<(), Limited> {
        self.login_emails.check(&email.trim().to_lowercase())
    }

    /// Whether `client` may still try to authenticate on the publish API;
    /// takes nothing (see [`Limits::publish_auth_failed`]).
    pub fn publish_auth_allowed(&self, client: IpAddr) -> Result<(), Limited> {
        self.publish_auth_failures.peek(&address_key(client))
    }

    /// One failed authentication on the publish API from `client`.
    pub fn publish_auth_failed(&self, client: IpAddr) -> Result<(), Limited> {
        self.publish_auth_failures.check(&address_key(client))
    }

    /// A password hashing slot: at once when one is free; else, when
    /// fewer than [`PASSWORD_HASH_WAITERS_PER_SLOT`] callers per slot are
    /// already waiting, after at most [`PASSWORD_HASH_WAIT`]; else refused
    /// at once. The permit is owned so that it can travel with the hash
    /// onto its blocking thread and be released only when the hash is
    /// done, even if the request that asked for it has gone.
    pub async fn password_hash(&self) -> Result<OwnedSemaphorePermit, Limited> {
        let slots = &self.password_hashes;
        let refused = || Limited::counted(Scope::PasswordHash, &slots.refused, PASSWORD_HASH_RETRY);
        if let Ok(permit) = slots.slots.clone().try_acquire_owned() {
            return Ok(permit);
        }
        if slots.waiting.fetch_add(1, Ordering::AcqRel) >= slots.max_waiting {
            slots.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(refused());
        }
        let _waiting = Waiting(&slots.waiting);
        match tokio::time::timeout(PASSWORD_HASH_WAIT, slots.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            // Timed out (or, never in practice, the semaphore was closed).
            _ => Err(refused()),
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
    fn peeking_takes_nothing() {
        let (l, t0) = keyed(1.0, 2, 10);
        assert!(
            l.peek_at("ann", t0).is_ok(),
            "an unknown key has a full bucket"
        );
        assert_eq!(l.len(), 0, "and peeking does not make one");
        l.check_at("ann", t0).unwrap();
        for _ in 0..5 {
            assert!(l.peek_at("ann", t0).is_ok());
        }
        l.check_at("ann", t0).unwrap();
        assert_eq!(l.peek_at("ann", t0), Err(ms(1000)));
        assert!(l.peek_at("ann", t0 + ms(1000)).is_ok());
    }

    #[test]
    fn ipv6_clients_count_by_their_64() {
        let key = |s: &str| address_key(s.parse().unwrap());
        assert_eq!(key("192.0.2.1"), "192.0.2.1");
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:bbbb::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:192.0.2.1"), "192.0.2.1");
    }

    #[tokio::test(start_paused = true)]
    async fn password_hashing_slots_are_bounded_and_so_are_their_waiters() {
        let metrics = Arc::new(Metrics::new());
        let limits = Arc::new(Limits::new(&RatelimitSettings::default(), 2, &metrics));
        let first = limits.password_hash().await.unwrap();
        let _second = limits.password_hash().await.unwrap();
        // Eight callers (four per slot) may wait; a ninth is refused at once.
        let waiters: Vec<_> = (0..8)
            .map(|_| {
                let limits = limits.clone();
                tokio::spawn(async move { limits.password_hash().await.map(drop) })
            })
            .collect();
        tokio::task::yield_now().await;
        let refused = limits.password_hash().await.unwrap_err();
        assert_eq!(refused.scope, Scope::PasswordHash);
        assert!(refused.retry_after >= Duration::from_secs(1));
        // A slot freed within the wait serves the waiters in turn (each
        // drops its permit at once); none waits past PASSWORD_HASH_WAIT.
        drop(first);
        for waiter in waiters {
            assert!(waiter.await.unwrap().is_ok());
        }
        assert!(metrics
            .render()
            .contains("subgate_rate_limited_total{scope=\"password_hash\"} 1"));
        // With both slots held past the wait, a waiter is refused in time.
        let _first = limits.password_hash().await.unwrap();
        let started = tokio::time::Instant::now();
        assert!(limits.password_hash().await.is_err());
        assert_eq!(started.elapsed(), PASSWORD_HASH_WAIT);
    }

    #[test]
    fn every_scope_is_exported_from_the_start() {
        let text = Metrics::new().render();
        for scope in Scope::ALL {
            assert!(
                text.contains(&format!(
                    "subgate_rate_limited_total{{scope=\"{}\"}} 0",
                    scope.as_str()
                )),
                "{scope:?}"
            );
        }
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
            login_per_second: 1.0,
            login_burst: 1,
            login_email_per_second: 1.0,
            login_email_burst: 1,
            publish_auth_failures_per_second: 1.0,
            publish_auth_failures_burst: 1,
            max_keys: 10,
        };
        let limits = Limits::new(&settings, 1, &metrics);
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
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(limits.login_address(ip).is_ok());
        assert_eq!(limits.login_address(ip).unwrap_err().scope, Scope::Login);
        assert!(limits.login_email("Ann@example.com").is_ok());
        assert_eq!(
            limits.login_email(" ann@EXAMPLE.com").unwrap_err().scope,
            Scope::LoginEmail,
            "one email however it is typed"
        );
        assert!(limits.publish_auth_allowed(ip).is_ok());
        assert!(limits.publish_auth_failed(ip).is_ok());
        assert_eq!(
            limits.publish_auth_allowed(ip).unwrap_err().scope,
            Scope::PublishAuth
        );
        let text = metrics.render();
        for scope in [
            "connection",
            "user",
            "publish",
            "typing",
            "login",
            "login_email",
            "publish_auth",
        ] {
            assert!(
                text.contains(&format!(
                    "subgate_rate_limited_total{{scope=\"{scope}\"}} 1"
                )),
                "{scope}: {text}"
            );
        }
    }
}
