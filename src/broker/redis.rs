//! The Redis broker: events cross the fleet through Redis Pub/Sub.
//!
//! - Publishing runs one script on a pooled connection (deadpool-redis): it
//!   appends the event to the topic's capped stream (which assigns the id,
//!   ordered per topic fleet-wide) and PUBLISHes the envelope, encoded once
//!   by the publisher, to the topic's channel, atomically.
//! - Receiving uses one dedicated Pub/Sub connection per node (pools cannot
//!   share Pub/Sub connections). A control task owns its command half and
//!   reconciles what Redis has with what the hub wants ([`EventSink::topics`]):
//!   SUBSCRIBE while a topic has a local subscriber, UNSUBSCRIBE after the
//!   last one leaves, in batches. A reader task owns the message half and
//!   drains it at once into the hub (whose dispatch never blocks), so redis-rs's
//!   internal buffer stays empty.
//! - When the connection is lost, the node keeps its clients, reconnects
//!   with capped, jittered backoff and resubscribes every wanted topic by
//!   construction (nothing is subscribed on a new connection, everything is
//!   wanted). A connection that silently stops delivering is caught by a
//!   probe: a message published to a node-private channel every
//!   `probe_interval` must come back within two intervals, or the connection
//!   is restarted. Redis killing a slow Pub/Sub client
//!   (`client-output-buffer-limit pubsub`) is just another lost connection.
//! - Every call has a timeout; a publish that fails or times out is an error,
//!   never reported as success.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt;
use rand::Rng;
use tokio::sync::{oneshot, Notify};

use super::{Broker, BrokerError, EventSink, GapReason, History};
use crate::event::{topic, Event, NewEvent, Position, SharedEvent};
use crate::telemetry::metrics::Metrics;

/// How many channels one SUBSCRIBE or UNSUBSCRIBE names.
const BATCH: usize = 1000;

/// Tunables of the Redis broker.
#[derive(Debug, Clone)]
pub struct RedisBrokerOptions {
    pub url: String,
    pub prefix: String,
    /// Bound on every Redis command.
    pub command_timeout: Duration,
    /// How long a local subscribe waits for Redis to confirm.
    pub subscribe_timeout: Duration,
    /// How often the Pub/Sub connection is probed.
    pub probe_interval: Duration,
    /// Longest wait between reconnect attempts.
    pub max_backoff: Duration,
    /// Events kept per topic stream (approximate, `MAXLEN ~`).
    pub history_size: usize,
    /// Time a topic stream lives after its last event.
    pub history_ttl: Duration,
    /// Publishing connections.
    pub pool_size: usize,
}

/// Numbers the event in its topic's history, appends it there and publishes
/// the envelope, as one atomic step, so that channel order is position order
/// and the position a subscriber sees is the one in the history.
/// KEYS[1] stream, KEYS[2] channel, KEYS[3] meta hash (epoch, seq);
/// ARGV[1] envelope head (`{"id":"`), ARGV[2] envelope tail (after the id),
/// ARGV[3] max length, ARGV[4] TTL ms, ARGV[5] an epoch for a new history.
/// A history whose meta is gone (expired, or Redis restarted empty) starts a
/// new epoch, and its stream is cleared so that sequence numbers restart.
const PUBLISH_SCRIPT: &str = r#"
local epoch = redis.call('HGET', KEYS[3], 'epoch')
if not epoch then
  epoch = ARGV[5]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[3], 'epoch', epoch)
end
local seq = redis.call('HINCRBY', KEYS[3], 'seq', 1)
local id = epoch .. ':' .. seq
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], seq .. '-1', 't', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[3], ARGV[4])
redis.call('PUBLISH', KEYS[2], ARGV[1] .. id .. ARGV[2])
return id
"#;

/// The head of every envelope: `id` is its first field.
const ENVELOPE_HEAD: &str = "{\"id\":\"";

enum Link {
    Connecting,
    Up,
    Down(String),
}

struct Shared {
    sink: OnceLock<Arc<dyn EventSink>>,
    /// Topics subscribed on the live Pub/Sub connection.
    confirmed: Mutex<HashSet<String>>,
    /// Local subscribes waiting for Redis to confirm their topic.
    waiters: Mutex<HashMap<String, Vec<oneshot::Sender<()>>>>,
    /// Topics whose subscription may need to change since the last reconcile.
    dirty: Mutex<HashSet<String>>,
    /// Wakes the control task to reconcile.
    wake: Notify,
    link: Mutex<Link>,
    /// Highest probe sequence number seen coming back.
    probe_seen: AtomicU64,
    metrics: Arc<Metrics>,
}

impl Shared {
    fn set_link(&self, link: Link) {
        *self.link.lock().unwrap_or_else(|p| p.into_inner()) = link;
    }

    fn confirmed(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.confirmed.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn waiters(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<oneshot::Sender<()>>>> {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks `topic` for the next reconcile and wakes the control task.
    fn touch(&self, topic: &str) {
        self.dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(topic.to_owned());
        self.wake.notify_one();
    }
}

pub struct RedisBroker {
    opts: RedisBrokerOptions,
    pool: deadpool_redis::Pool,
    client: redis::Client,
    script: redis::Script,
    shared: Arc<Shared>,
    node_id: String,
}

impl RedisBroker {
    /// Builds the broker; nothing connects until [`Broker::start`], and a
    /// Redis that is down at start is waited for, not fatal.
    pub fn new(opts: RedisBrokerOptions, metrics: Arc<Metrics>) -> Result<Self, String> {
        let client = redis::Client::open(opts.url.as_str()).map_err(|e| e.to_string())?;
        // The command timeout bounds every call (waiting for a connection
        // included); the client's own shorter response timeout is turned off
        // so that the configured one is the one that applies.
        let connection = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(opts.command_timeout))
            .set_response_timeout(None);
        let manager = deadpool_redis::Manager::new_with_config(opts.url.as_str(), connection)
            .map_err(|e| e.to_string())?;
        let pool = deadpool_redis::Pool::builder(manager)
            .max_size(opts.pool_size.max(1))
            .wait_timeout(Some(opts.command_timeout))
            .create_timeout(Some(opts.command_timeout))
            .recycle_timeout(Some(opts.command_timeout))
            .runtime(deadpool_redis::Runtime::Tokio1)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            opts,
            pool,
            client,
            script: redis::Script::new(PUBLISH_SCRIPT),
            shared: Arc::new(Shared {
                sink: OnceLock::new(),
                confirmed: Mutex::new(HashSet::new()),
                waiters: Mutex::new(HashMap::new()),
                dirty: Mutex::new(HashSet::new()),
                wake: Notify::new(),
                link: Mutex::new(Link::Connecting),
                probe_seen: AtomicU64::new(0),
                metrics,
            }),
            node_id: crate::store::new_id(),
        })
    }

    fn channel(&self, topic: &str) -> String {
        channel_name(&self.opts.prefix, topic)
    }

    fn probe_channel(&self) -> String {
        format!("{}probe:{}", self.opts.prefix, self.node_id)
    }

    /// Runs `f` on a pooled connection under the command timeout.
    async fn with_conn<T, F, Fut>(&self, command: &'static str, f: F) -> Result<T, BrokerError>
    where
        F: FnOnce(deadpool_redis::Connection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let started = Instant::now();
        let result = tokio::time::timeout(self.opts.command_timeout, async {
            let conn = self
                .pool
                .get()
                .await
                .map_err(|e| BrokerError::Unavailable(e.to_string()))?;
            f(conn)
                .await
                .map_err(|e| BrokerError::Unavailable(e.to_string()))
        })
        .await
        .unwrap_or_else(|_| {
            Err(BrokerError::Unavailable(format!(
                "redis {command} timed out"
            )))
        });
        self.shared
            .metrics
            .redis_command_duration_seconds
            .with_label_values(&[command])
            .observe(started.elapsed().as_secs_f64());
        result
    }
}

/// The Pub/Sub channel of a topic.
pub fn channel_name(prefix: &str, topic: &str) -> String {
    format!("{prefix}topic:{topic}")
}

/// The history stream of a topic: entry `SEQ-1` holds the envelope's tail.
pub fn stream_key(prefix: &str, topic: &str) -> String {
    format!("{prefix}history:{topic}")
}

/// The history's epoch and last sequence number.
pub fn meta_key(prefix: &str, topic: &str) -> String {
    format!("{prefix}history-meta:{topic}")
}

#[async_trait]
impl Broker for RedisBroker {
    fn start(&self, sink: Arc<dyn EventSink>) {
        if self.shared.sink.set(sink).is_err() {
            return;
        }
        let task = SubscriberTask {
            client: self.client.clone(),
            shared: self.shared.clone(),
            prefix: self.opts.prefix.clone(),
            probe_channel: self.probe_channel(),
            opts: self.opts.clone(),
            pool: self.pool.clone(),
        };
        tokio::spawn(task.run());
    }

    async fn publish(&self, event: NewEvent) -> Result<Arc<SharedEvent>, BrokerError> {
        if !topic::is_valid(&event.topic) {
            return Err(BrokerError::InvalidTopic(event.topic));
        }
        let channel = self.channel(&event.topic);
        if event.ephemeral {
            // Live only: straight to the channel, nothing numbered or kept.
            let shared = SharedEvent::new(event.stamp_ephemeral());
            let text = shared.json.get().to_owned();
            self.with_conn("publish", |mut conn| async move {
                redis::cmd("PUBLISH")
                    .arg(&channel)
                    .arg(text)
                    .query_async::<i64>(&mut conn)
                    .await
            })
            .await?;
            return Ok(shared);
        }
        let stream = stream_key(&self.opts.prefix, &event.topic);
        let meta = meta_key(&self.opts.prefix, &event.topic);
        let unstamped = Event {
            id: String::new(),
            kind: event.kind,
            topic: event.topic,
            payload: event.payload,
            timestamp: crate::event::timestamp_now(),
        };
        // Encoded once, by the publisher; the id is spliced in by the script.
        let encoded = serde_json::to_string(&unstamped)
            .map_err(|e| BrokerError::Unavailable(e.to_string()))?;
        let tail = encoded
            .strip_prefix(ENVELOPE_HEAD)
            .and_then(|rest| rest.strip_prefix('"'))
            .map(|rest| format!("\"{rest}"))
            .ok_or_else(|| {
                BrokerError::Unavailable("the envelope did not start with its id".into())
            })?;
        let max_len = self.opts.history_size.max(1);
        let ttl_ms = self.opts.history_ttl.as_millis().max(1) as u64;
        let script = &self.script;
        let id: String = self
            .with_conn("publish", |mut conn| async move {
                script
                    .key(stream)
                    .key(channel)
                    .key(meta)
                    .arg(ENVELOPE_HEAD)
                    .arg(&tail)
                    .arg(max_len)
                    .arg(ttl_ms)
                    .arg(Position::new_epoch())
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        let mut event = unstamped;
        event.id = id;
        Ok(SharedEvent::new(event))
    }

    async fn subscribe(&self, topic: &str) -> Result<(), BrokerError> {
        if self.shared.confirmed().contains(topic) {
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        self.shared
            .waiters()
            .entry(topic.to_owned())
            .or_default()
            .push(tx);
        // Confirmed between the check and the registration: done.
        if self.shared.confirmed().contains(topic) {
            return Ok(());
        }
        self.shared.touch(topic);
        match tokio::time::timeout(self.opts.subscribe_timeout, rx).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(BrokerError::Unavailable(format!(
                "redis did not confirm the subscription within {:?}",
                self.opts.subscribe_timeout
            ))),
        }
    }

    fn release(&self, topic: &str) {
        // The control task compares what Redis has with what the hub wants.
        self.shared.touch(topic);
    }

    async fn history(
        &self,
        topic: &str,
        after: &Position,
        limit: usize,
    ) -> Result<History, BrokerError> {
        let stream = stream_key(&self.opts.prefix, topic);
        let meta = meta_key(&self.opts.prefix, topic);
        let limit = limit.max(1);
        let from = format!("{}-0", after.seq.saturating_add(1));
        // One atomic read: the epoch, the last number, the oldest retained
        // entry and the entries after the position.
        type Entries = Vec<(String, HashMap<String, String>)>;
        let (epoch, last, oldest, after_entries): (Option<String>, Option<u64>, Entries, Entries) =
            self.with_conn("history", |mut conn| async move {
                redis::pipe()
                    .atomic()
                    .cmd("HGET")
                    .arg(&meta)
                    .arg("epoch")
                    .cmd("HGET")
                    .arg(&meta)
                    .arg("seq")
                    .cmd("XRANGE")
                    .arg(&stream)
                    .arg("-")
                    .arg("+")
                    .arg("COUNT")
                    .arg(limit)
                    .cmd("XRANGE")
                    .arg(&stream)
                    .arg(&from)
                    .arg("+")
                    .arg("COUNT")
                    .arg(limit)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        let Some(epoch) = epoch else {
            return Ok(History::Gap {
                reason: GapReason::EpochChanged,
                retained: Vec::new(),
            });
        };
        let decode = |entries: Entries| -> Vec<Arc<SharedEvent>> {
            entries
                .into_iter()
                .filter_map(|(id, fields)| {
                    let seq = id.split('-').next()?.parse::<u64>().ok()?;
                    let tail = fields.get("t")?;
                    let text = format!("{ENVELOPE_HEAD}{epoch}:{seq}{tail}");
                    SharedEvent::decode(&text).ok()
                })
                .collect()
        };
        if after.epoch != epoch {
            return Ok(History::Gap {
                reason: GapReason::EpochChanged,
                retained: decode(oldest),
            });
        }
        if after.seq > last.unwrap_or(0) {
            return Ok(History::Gap {
                reason: GapReason::Malformed,
                retained: Vec::new(),
            });
        }
        let first = oldest
            .first()
            .and_then(|(id, _)| id.split('-').next()?.parse::<u64>().ok())
            .unwrap_or(last.unwrap_or(0) + 1);
        if after.seq + 1 < first {
            return Ok(History::Gap {
                reason: GapReason::Expired,
                retained: decode(oldest),
            });
        }
        Ok(History::Complete(decode(after_entries)))
    }

    async fn head(&self, topic: &str) -> Result<Option<Position>, BrokerError> {
        let meta = meta_key(&self.opts.prefix, topic);
        let (epoch, seq): (Option<String>, Option<u64>) = self
            .with_conn("head", |mut conn| async move {
                redis::cmd("HMGET")
                    .arg(&meta)
                    .arg("epoch")
                    .arg("seq")
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(match (epoch, seq) {
            (Some(epoch), Some(seq)) if seq > 0 => Some(Position::new(epoch, seq)),
            _ => None,
        })
    }

    fn readiness(&self) -> Result<(), String> {
        match &*self.shared.link.lock().unwrap_or_else(|p| p.into_inner()) {
            Link::Up => Ok(()),
            Link::Connecting => Err("connecting to redis".into()),
            Link::Down(why) => Err(format!("redis unreachable: {why}")),
        }
    }
}

struct SubscriberTask {
    client: redis::Client,
    shared: Arc<Shared>,
    prefix: String,
    probe_channel: String,
    opts: RedisBrokerOptions,
    pool: deadpool_redis::Pool,
}

impl SubscriberTask {
    async fn run(self) {
        let mut attempt: u32 = 0;
        loop {
            let reason = match self.connect_and_serve(&mut attempt).await {
                Ok(()) => return,
                Err(reason) => reason,
            };
            self.shared.confirmed().clear();
            self.shared.metrics.redis_subscribed_channels.set(0);
            self.shared.set_link(Link::Down(reason.clone()));
            self.shared.metrics.redis_reconnects_total.inc();
            // Capped exponential backoff with full jitter, so a fleet does
            // not reconnect in lockstep.
            let cap = self.opts.max_backoff.as_millis().max(1) as u64;
            let exp = 50u64.saturating_mul(1u64 << attempt.min(16)).min(cap);
            let delay = rand::thread_rng().gen_range(exp / 2..=exp);
            // Loud on the first failure, then once in a while: an outage
            // must not flood the log.
            if attempt.is_multiple_of(20) {
                tracing::warn!(%reason, attempt, delay_ms = delay, "redis pub/sub connection lost; reconnecting");
            } else {
                tracing::debug!(%reason, attempt, delay_ms = delay, "redis pub/sub reconnect failed");
            }
            attempt = attempt.saturating_add(1);
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
    }

    /// Serves one Pub/Sub connection until it fails; `Err` says why.
    async fn connect_and_serve(&self, attempt: &mut u32) -> Result<(), String> {
        let pubsub =
            tokio::time::timeout(self.opts.command_timeout, self.client.get_async_pubsub())
                .await
                .map_err(|_| "connect timed out".to_owned())?
                .map_err(|e| e.to_string())?;
        let (mut sink, mut stream) = pubsub.split();
        self.timed(sink.subscribe(&self.probe_channel)).await?;
        self.shared.set_link(Link::Up);
        *attempt = 0;
        tracing::info!("redis pub/sub connected");

        // The reader drains the connection into the hub and reports its end.
        let (ended_tx, mut ended_rx) = oneshot::channel::<()>();
        let reader = {
            let shared = self.shared.clone();
            let probe_channel = self.probe_channel.clone();
            tokio::spawn(async move {
                while let Some(msg) = stream.next().await {
                    let channel = msg.get_channel_name();
                    if channel == probe_channel {
                        if let Ok(seq) = std::str::from_utf8(msg.get_payload_bytes())
                            .unwrap_or("")
                            .parse::<u64>()
                        {
                            shared.probe_seen.fetch_max(seq, Ordering::SeqCst);
                        }
                        continue;
                    }
                    let Ok(text) = std::str::from_utf8(msg.get_payload_bytes()) else {
                        shared
                            .metrics
                            .events_dropped_total
                            .with_label_values(&["undecodable"])
                            .inc();
                        continue;
                    };
                    match SharedEvent::decode(text) {
                        Ok(event) => {
                            if let Some(sink) = shared.sink.get() {
                                sink.dispatch(event);
                            }
                        }
                        Err(_) => shared
                            .metrics
                            .events_dropped_total
                            .with_label_values(&["undecodable"])
                            .inc(),
                    }
                }
                let _ = ended_tx.send(());
            })
        };
        let _abort_reader = AbortOnDrop(reader);

        let mut probe = tokio::time::interval(self.opts.probe_interval);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut probe_sent: u64 = self.shared.probe_seen.load(Ordering::SeqCst);
        let mut probe_sent_at: Option<Instant> = None;
        // Everything the hub wants is missing on a new connection.
        self.reconcile(&mut sink, true).await?;
        loop {
            tokio::select! {
                _ = &mut ended_rx => return Err("the connection closed".into()),
                _ = self.shared.wake.notified() => self.reconcile(&mut sink, false).await?,
                _ = probe.tick() => {
                    let seen = self.shared.probe_seen.load(Ordering::SeqCst);
                    if let Some(at) = probe_sent_at {
                        if seen < probe_sent && at.elapsed() >= self.opts.probe_interval * 2 {
                            self.shared.metrics.redis_probe_failures_total.inc();
                            return Err("the probe did not come back: pub/sub is silent".into());
                        }
                    }
                    if seen >= probe_sent {
                        probe_sent += 1;
                        probe_sent_at = Some(Instant::now());
                        let channel = self.probe_channel.clone();
                        let seq = probe_sent;
                        let sent = tokio::time::timeout(self.opts.command_timeout, async {
                            let mut conn = self.pool.get().await.map_err(|e| e.to_string())?;
                            redis::cmd("PUBLISH").arg(&channel).arg(seq).query_async::<i64>(&mut conn).await.map_err(|e| e.to_string())
                        }).await;
                        if !matches!(sent, Ok(Ok(_))) {
                            // Publishing is down too; the probe is retried
                            // next tick rather than counted as silence.
                            probe_sent -= 1;
                            probe_sent_at = None;
                        }
                    }
                }
            }
        }
    }

    async fn timed<T>(
        &self,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, String> {
        tokio::time::timeout(self.opts.command_timeout, fut)
            .await
            .map_err(|_| "redis command timed out".to_owned())?
            .map_err(|e| e.to_string())
    }

    /// Subscribes what the hub wants and Redis lacks; unsubscribes the rest.
    /// `full` compares everything (a new connection); otherwise only the
    /// topics touched since the last pass are looked at, so the cost of a
    /// pass is the size of the change, not of the node.
    async fn reconcile(&self, sink: &mut redis::aio::PubSubSink, full: bool) -> Result<(), String> {
        let Some(hub) = self.shared.sink.get() else {
            return Ok(());
        };
        let dirty: Vec<String> =
            std::mem::take(&mut *self.shared.dirty.lock().unwrap_or_else(|p| p.into_inner()))
                .into_iter()
                .collect();
        let (to_add, to_remove): (Vec<String>, Vec<String>) = if full {
            let wanted: HashSet<String> = hub.topics().into_iter().collect();
            let confirmed = self.shared.confirmed();
            (
                wanted
                    .iter()
                    .filter(|t| !confirmed.contains(*t))
                    .cloned()
                    .collect(),
                confirmed
                    .iter()
                    .filter(|t| !wanted.contains(*t))
                    .cloned()
                    .collect(),
            )
        } else {
            let confirmed = self.shared.confirmed();
            let mut add = Vec::new();
            let mut remove = Vec::new();
            for topic in dirty {
                match (hub.wants(&topic), confirmed.contains(&topic)) {
                    (true, false) => add.push(topic),
                    (false, true) => remove.push(topic),
                    _ => {}
                }
            }
            (add, remove)
        };
        for chunk in to_add.chunks(BATCH) {
            let channels: Vec<String> = chunk
                .iter()
                .map(|t| channel_name(&self.prefix, t))
                .collect();
            self.timed(sink.subscribe(channels)).await?;
            let mut waiters = self.shared.waiters();
            let mut confirmed = self.shared.confirmed();
            for topic in chunk {
                confirmed.insert(topic.clone());
                for waiter in waiters.remove(topic).unwrap_or_default() {
                    let _ = waiter.send(());
                }
            }
        }
        for chunk in to_remove.chunks(BATCH) {
            let channels: Vec<String> = chunk
                .iter()
                .map(|t| channel_name(&self.prefix, t))
                .collect();
            self.timed(sink.unsubscribe(channels)).await?;
            let mut confirmed = self.shared.confirmed();
            for topic in chunk {
                confirmed.remove(topic);
            }
        }
        // Waiters whose topic is now confirmed are answered; those whose
        // topic the hub no longer wants (the subscriber left before the
        // confirmation) are dropped, and their receivers see an error.
        {
            let confirmed = self.shared.confirmed();
            let mut waiters = self.shared.waiters();
            waiters.retain(|topic, list| {
                if confirmed.contains(topic) {
                    for waiter in list.drain(..) {
                        let _ = waiter.send(());
                    }
                    return false;
                }
                hub.wants(topic)
            });
        }
        let count = self.shared.confirmed().len();
        self.shared
            .metrics
            .redis_subscribed_channels
            .set(count as i64);
        Ok(())
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::hub::Hub;

    pub use crate::test_support::RedisServer as TestRedis;

    /// Runs one command on `redis` and returns its reply.
    pub fn cmd(redis: &TestRedis, args: &[&str]) -> redis::Value {
        let client = redis::Client::open(redis.url()).unwrap();
        let mut conn = client.get_connection().unwrap();
        let mut c = redis::cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        c.query(&mut conn).unwrap()
    }

    fn node(url: &str) -> Arc<Hub> {
        super::tests_support::node_with_metrics(url).0
    }

    fn numsub(redis: &TestRedis, topic: &str) -> i64 {
        match cmd(redis, &["PUBSUB", "NUMSUB", &channel_name("t:", topic)]) {
            redis::Value::Array(v) => match &v[1] {
                redis::Value::Int(n) => *n,
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn events_cross_nodes_in_order_and_channels_follow_local_subscribers() {
        let redis = TestRedis::start();
        let a = node(&redis.url());
        let b = node(&redis.url());
        assert_eq!(numsub(&redis, "posts"), 0);
        let mut sub = a.subscribe("posts", "test", None).await.unwrap();
        assert_eq!(
            numsub(&redis, "posts"),
            1,
            "only the node with a subscriber subscribes"
        );
        let mut ids = Vec::new();
        for i in 0..50 {
            let e = b
                .publish(NewEvent::new(
                    "posts",
                    "post.created",
                    serde_json::json!({ "i": i }),
                ))
                .await
                .unwrap();
            ids.push(e.event.id.clone());
        }
        for (i, id) in ids.iter().enumerate() {
            let got = tokio::time::timeout(Duration::from_secs(2), sub.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&got.event.id, id);
            assert_eq!(got.event.payload["i"], i);
        }
        drop(sub);
        let deadline = Instant::now() + Duration::from_secs(2);
        while numsub(&redis, "posts") != 0 {
            assert!(
                Instant::now() < deadline,
                "the node did not unsubscribe after its last subscriber left"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn history_resumes_exactly_and_says_expired_or_lost() {
        let redis = TestRedis::start();
        let a = node(&redis.url());
        let mut ids = Vec::new();
        for i in 0..5 {
            ids.push(
                a.publish(NewEvent::new("t", "x", serde_json::json!({ "i": i })))
                    .await
                    .unwrap(),
            );
        }
        let pos = |e: &Arc<SharedEvent>| e.position.clone().unwrap();
        assert_eq!(
            ids.iter().map(|e| pos(e).seq).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
        match a.broker().history("t", &pos(&ids[1]), 100).await.unwrap() {
            History::Complete(events) => {
                let got: Vec<_> = events.iter().map(|e| e.event.clone()).collect();
                let want: Vec<_> = ids[2..].iter().map(|e| e.event.clone()).collect();
                assert_eq!(
                    got, want,
                    "the history holds the very envelopes that were published"
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            a.broker().head("t").await.unwrap(),
            Some(pos(&ids[4])),
            "the head is the latest position"
        );
        assert_eq!(a.broker().head("never").await.unwrap(), None);
        // The history is capped (approximately: Redis trims whole nodes).
        for i in 0..400 {
            a.publish(NewEvent::new("t", "x", serde_json::json!({ "i": i })))
                .await
                .unwrap();
        }
        assert!(matches!(
            a.broker().history("t", &pos(&ids[0]), 100).await.unwrap(),
            History::Gap {
                reason: GapReason::Expired,
                ..
            }
        ));
        // Redis restarted empty: the old positions belong to a lost epoch.
        cmd(&redis, &["FLUSHALL"]);
        let fresh = a
            .publish(NewEvent::new("t", "x", serde_json::json!({})))
            .await
            .unwrap();
        assert_eq!(pos(&fresh).seq, 1);
        assert_ne!(pos(&fresh).epoch, pos(&ids[0]).epoch);
        assert!(matches!(
            a.broker().history("t", &pos(&ids[4]), 100).await.unwrap(),
            History::Gap {
                reason: GapReason::EpochChanged,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn a_restarted_redis_is_resubscribed_and_publishes_fail_while_it_is_down() {
        let mut redis = TestRedis::start();
        let port = redis.port();
        let a = node(&redis.url());
        let mut sub = a.subscribe("user:1", "test", None).await.unwrap();
        assert!(a.broker().readiness().is_ok());
        drop(redis);
        let err = a
            .publish(NewEvent::new(
                "user:1",
                "user.updated",
                serde_json::json!({}),
            ))
            .await;
        assert!(err.is_err(), "a publish with Redis down must fail");
        let deadline = Instant::now() + Duration::from_secs(3);
        while a.broker().readiness().is_ok() {
            assert!(
                Instant::now() < deadline,
                "readiness did not notice the outage"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        redis = TestRedis::start_on(port);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if a.broker().readiness().is_ok() && numsub(&redis, "user:1") == 1 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the node did not resubscribe after Redis came back"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let sent = a
            .publish(NewEvent::new(
                "user:1",
                "user.updated",
                serde_json::json!({"n": 1}),
            ))
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(2), sub.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.event.id, sent.event.id);
    }
}

#[cfg(test)]
mod fault_tests {
    use super::tests_support::*;
    use super::*;

    #[tokio::test]
    async fn twenty_thousand_topics_are_resubscribed_after_redis_drops_the_connection() {
        let redis = TestRedis::start();
        let (hub, metrics) = node_with_metrics(&redis.url());
        let mut subs = Vec::new();
        let names: Vec<String> = (0..20_000).map(|i| format!("channel:{i}")).collect();
        let opened =
            futures_util::future::join_all(names.iter().map(|n| hub.subscribe(n, "test", None)))
                .await;
        for sub in opened {
            subs.push(sub.unwrap());
        }
        assert_eq!(metrics.redis_subscribed_channels.get(), 20_000);
        // What Redis does to a Pub/Sub client over its output buffer limit.
        super::tests::cmd(&redis, &["CLIENT", "KILL", "TYPE", "pubsub"]);
        let killed = Instant::now();
        // Generous: this checks that every topic comes back; the time it
        // takes is printed (a target for benchmarks, not a timed test).
        let deadline = killed + Duration::from_secs(30);
        while metrics.redis_reconnects_total.get() == 0
            || metrics.redis_subscribed_channels.get() != 20_000
        {
            assert!(
                Instant::now() < deadline,
                "the node did not resubscribe its 20,000 topics"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        eprintln!(
            "20,000 topics resubscribed {:?} after the connection was killed",
            killed.elapsed()
        );
        // Delivery works again. Under a loaded machine the probe may restart
        // the connection once more, so an event may be lost in that window
        // (these are plain, not resumable, subscriptions): publish until one
        // arrives.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let sent = hub
                .publish(NewEvent::new(
                    "channel:19999",
                    "message.created",
                    serde_json::json!({}),
                ))
                .await;
            if let (Ok(sent), Ok(Some(got))) = (
                sent,
                tokio::time::timeout(Duration::from_millis(500), subs[19_999].recv()).await,
            ) {
                assert_eq!(got.event.topic, sent.event.topic);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no event reached a resubscribed topic"
            );
        }
    }

    #[tokio::test]
    async fn a_silent_pubsub_connection_is_detected_by_the_probe_and_restarted() {
        let redis = TestRedis::start();
        let proxy = FreezableProxy::start(redis.port()).await;
        let (hub, metrics) = node_with_metrics(&proxy.url());
        let mut sub = hub.subscribe("posts", "test", None).await.unwrap();
        // From now on the proxy keeps the existing connections open but
        // forwards nothing from Redis to the node: publishes succeed on new
        // connections while the Pub/Sub connection hears nothing.
        proxy.freeze_existing();
        let deadline = Instant::now() + Duration::from_secs(10);
        while metrics.redis_probe_failures_total.get() == 0 {
            assert!(
                Instant::now() < deadline,
                "the silent connection was not detected"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while metrics.redis_subscribed_channels.get() != 1 || hub.broker().readiness().is_err() {
            assert!(
                Instant::now() < deadline,
                "the node did not resubscribe after the probe failed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let sent = hub
            .publish(NewEvent::new(
                "posts",
                "post.created",
                serde_json::json!({}),
            ))
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(2), sub.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.event.id, sent.event.id);
    }
}

#[cfg(test)]
mod tests_support {
    use super::*;
    use crate::hub::Hub;
    use std::sync::atomic::AtomicBool;

    pub use super::tests::TestRedis;

    pub fn node_with_metrics(url: &str) -> (Arc<Hub>, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let broker = RedisBroker::new(
            RedisBrokerOptions {
                url: url.to_owned(),
                prefix: "t:".into(),
                command_timeout: Duration::from_millis(1000),
                subscribe_timeout: Duration::from_secs(30),
                probe_interval: Duration::from_millis(400),
                max_backoff: Duration::from_millis(200),
                history_size: 100,
                history_ttl: Duration::from_secs(60),
                pool_size: 4,
            },
            metrics.clone(),
        )
        .unwrap();
        (Hub::new(Arc::new(broker), metrics.clone(), 64), metrics)
    }

    /// A TCP proxy to Redis whose existing connections can be made silent
    /// (kept open, nothing forwarded from Redis), as a Pub/Sub connection
    /// behaves after some failovers.
    pub struct FreezableProxy {
        port: u16,
        frozen: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl FreezableProxy {
        pub async fn start(redis_port: u16) -> Self {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let frozen: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
            let registry = frozen.clone();
            let task = tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", redis_port)).await
                    else {
                        continue;
                    };
                    let flag = Arc::new(AtomicBool::new(false));
                    registry.lock().unwrap().push(flag.clone());
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut cr, &mut sw).await;
                    });
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match sr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if flag.load(Ordering::SeqCst) {
                                continue;
                            }
                            if cw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            });
            Self { port, frozen, task }
        }

        pub fn url(&self) -> String {
            format!("redis://127.0.0.1:{}", self.port)
        }

        pub fn freeze_existing(&self) {
            for flag in self.frozen.lock().unwrap().iter() {
                flag.store(true, Ordering::SeqCst);
            }
        }
    }

    impl Drop for FreezableProxy {
        fn drop(&mut self) {
            self.task.abort();
        }
    }
}
