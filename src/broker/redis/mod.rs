//! The Redis broker: events cross the fleet through Redis Pub/Sub.
//!
//! Both halves reach Redis through the one layer ([`crate::infra::redis`]):
//! its settings, its key names, its timed call.
//!
//! - Publishing runs one script on a pooled connection: it
//!   appends the event to the topic's capped stream (which assigns the id,
//!   ordered per topic fleet-wide) and PUBLISHes the envelope, encoded once
//!   by the publisher, to the topic's channel, atomically.
//! - Receiving ([`subscriber`]) uses one dedicated Pub/Sub connection per
//!   node (pools cannot share Pub/Sub connections). A control task owns its command half and
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
//! - Every call has the layer's timeout; a publish that fails or times out
//!   is an error, never reported as success.
//! - A topic's history expires after `history.ttl_seconds` of silence, but
//!   not the lineage (epoch, last number) of a topic some node's
//!   subscribers read: each node renews those ([`keep_lineages`]), so a live
//!   subscriber never mistakes a long silence for a lost history.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{oneshot, Notify};

use super::{Broker, BrokerError, BrokerResult, EventSink, GapReason, History, HistoryLimits};
use crate::event::{topic, Event, NewEvent, Position, SharedEvent};
use crate::infra::redis::{slot_of, CallError, Keys, Redis, Script};
use crate::telemetry::metrics::Metrics;
use futures_util::StreamExt;

mod cluster;
mod subscriber;
#[cfg(test)]
pub(super) mod tests;

/// Numbers the event in its topic's history, appends it there and publishes
/// the envelope, as one atomic step, so that channel order is position order
/// and the position a subscriber sees is the one in the history.
/// KEYS[1] stream, KEYS[2] channel, KEYS[3] meta hash (epoch, seq), one
/// slot in a cluster (the topic is their hash tag);
/// ARGV[1] envelope head (`{"id":"`), ARGV[2] envelope tail (after the id),
/// ARGV[3] max length, ARGV[4] TTL ms, ARGV[5] an epoch for a new history,
/// ARGV[6] `PUBLISH`, or `SPUBLISH` (sharded Pub/Sub) in a cluster.
/// A history whose meta is gone (expired, or Redis restarted empty) starts a
/// new epoch, and its stream is cleared so that sequence numbers restart.
static PUBLISH: Script = Script::new(
    r#"
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
redis.call(ARGV[6], KEYS[2], ARGV[1] .. id .. ARGV[2])
return id
"#,
);

/// The head of every envelope: `id` is its first field.
const ENVELOPE_HEAD: &str = "{\"id\":\"";

enum Link {
    Connecting,
    Up,
    Down(String),
}

/// What the broker and its subscriber task share.
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
    /// Redis Cluster: topics wanted and not subscribed now, since when.
    lost: Mutex<HashMap<String, std::time::Instant>>,
    /// Redis Cluster: the shards as last read (`CLUSTER SHARDS`).
    shards: Mutex<Vec<cluster::Shard>>,
    /// Redis Cluster: when the connection was last rebuilt for topics that
    /// stayed unsubscribed.
    rebuilt: Mutex<Option<std::time::Instant>>,
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

    /// After a reconcile pass: waiters whose topic is confirmed are
    /// answered; those whose topic the hub no longer wants (the subscriber
    /// left before the confirmation) are dropped, and their receivers see
    /// an error. The subscribed-channels gauge is set.
    fn settle_waiters(&self, hub: &dyn EventSink) {
        {
            let confirmed = self.confirmed();
            let mut waiters = self.waiters();
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
        let count = self.confirmed().len();
        self.metrics.redis_subscribed_channels.set(count as i64);
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
    redis: Redis,
    history: HistoryLimits,
    shared: Arc<Shared>,
    node_id: String,
}

impl RedisBroker {
    /// The broker on `redis`; nothing connects until [`Broker::start`], and
    /// a Redis that is down at start is waited for, not fatal.
    pub fn new(redis: Redis, history: HistoryLimits, metrics: Arc<Metrics>) -> Self {
        Self {
            redis,
            history,
            shared: Arc::new(Shared {
                sink: OnceLock::new(),
                confirmed: Mutex::new(HashSet::new()),
                waiters: Mutex::new(HashMap::new()),
                dirty: Mutex::new(HashSet::new()),
                wake: Notify::new(),
                link: Mutex::new(Link::Connecting),
                probe_seen: AtomicU64::new(0),
                lost: Mutex::new(HashMap::new()),
                shards: Mutex::new(Vec::new()),
                rebuilt: Mutex::new(None),
                metrics,
            }),
            node_id: crate::store::new_id(),
        }
    }
}

/// Topics whose meta one lineage pass renews per round trip.
const LINEAGE_BATCH: usize = 1000;

/// Round trips of one batch operation in flight at once on a cluster.
const CLUSTER_FAN_OUT: usize = 32;

/// `topics` in batches of at most `max` that one pipeline may carry: any
/// `max` on one Redis; in a cluster, topics of one hash slot only (a
/// pipeline goes to the node of its first key).
fn batches(keys: &Keys, topics: &[String], max: usize) -> Vec<Vec<String>> {
    if !keys.tagged() {
        return topics.chunks(max).map(<[String]>::to_vec).collect();
    }
    let mut by_slot: HashMap<u16, Vec<String>> = HashMap::new();
    for topic in topics {
        by_slot
            .entry(slot_of(&keys.history(topic)))
            .or_default()
            .push(topic.clone());
    }
    by_slot
        .into_values()
        .flat_map(|group| {
            group
                .chunks(max)
                .map(<[String]>::to_vec)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The command that publishes to a topic's channel: sharded in a cluster.
fn publish_verb(keys: &Keys) -> &'static str {
    if keys.tagged() {
        "SPUBLISH"
    } else {
        "PUBLISH"
    }
}

/// Keeps the lineage (the meta hash: epoch and last number) of every topic
/// this node's subscribers read from expiring with its history: every
/// quarter of `history.ttl_seconds` (at most hourly) the meta of each
/// subscribed topic gets the TTL anew. A topic silent for longer than the
/// TTL then loses its events but not its epoch, so its live subscribers
/// take the next event as the next, not as a new history (a gap); a topic
/// nobody reads still expires whole.
async fn keep_lineages(redis: Redis, shared: Arc<Shared>, ttl: Duration) {
    let every = (ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(3600));
    let ttl_ms = ttl.as_millis().max(1) as u64;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let topics: Vec<String> = shared.confirmed().iter().cloned().collect();
        let renewals = batches(redis.keys(), &topics, LINEAGE_BATCH)
            .into_iter()
            .map(|chunk| {
                let redis = redis.clone();
                async move {
                    let mut renew = redis::pipe();
                    for topic in &chunk {
                        renew
                            .cmd("PEXPIRE")
                            .arg(redis.keys().history_meta(topic))
                            .arg(ttl_ms)
                            .ignore();
                    }
                    redis.call::<()>("lineage", &renew).await
                }
            });
        let mut renewals = futures_util::stream::iter(renewals).buffer_unordered(CLUSTER_FAN_OUT);
        while let Some(renewed) = renewals.next().await {
            // A failure is Redis being away; the next pass renews again.
            if let Err(e) = renewed {
                tracing::debug!(error = %e, "renewing history lineages failed");
                break;
            }
        }
    }
}

/// The entries of a stream read, as `XRANGE` answers.
type Entries = Vec<(String, HashMap<String, String>)>;

/// The events of `entries`, numbered in `epoch`.
fn decode_entries(epoch: &str, entries: Entries) -> Vec<Arc<SharedEvent>> {
    entries
        .into_iter()
        .filter_map(|(id, fields)| {
            let seq = id.split('-').next()?.parse::<u64>().ok()?;
            let tail = fields.get("t")?;
            let text = format!("{ENVELOPE_HEAD}{epoch}:{seq}{tail}");
            SharedEvent::decode(&text).ok()
        })
        .collect()
}

/// The latest event of each of `topics` that has a history: one round trip
/// on one Redis; on a cluster one per hash slot, a few at a time.
async fn latest_events(
    redis: &Redis,
    topics: &[String],
) -> Result<Vec<Arc<SharedEvent>>, CallError> {
    if !redis.keys().tagged() {
        return latest_events_of_batch(redis, topics).await;
    }
    let reads = batches(redis.keys(), topics, topics.len().max(1))
        .into_iter()
        .map(|batch| async move { latest_events_of_batch(redis, &batch).await });
    let mut reads = futures_util::stream::iter(reads).buffer_unordered(CLUSTER_FAN_OUT);
    let mut events = Vec::new();
    while let Some(read) = reads.next().await {
        events.extend(read?);
    }
    Ok(events)
}

/// The latest event of each of `topics`, read in one round trip (a topic's
/// epoch and last entry are read together).
async fn latest_events_of_batch(
    redis: &Redis,
    topics: &[String],
) -> Result<Vec<Arc<SharedEvent>>, CallError> {
    let keys = redis.keys();
    let mut read = redis::pipe();
    for topic in topics {
        read.cmd("HGET")
            .arg(keys.history_meta(topic))
            .arg("epoch")
            .cmd("XREVRANGE")
            .arg(keys.history(topic))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1);
    }
    let replies: Vec<redis::Value> = redis.call("resync", &read).await?;
    let mut events = Vec::new();
    let mut replies = replies.into_iter();
    while let (Some(epoch), Some(last)) = (replies.next(), replies.next()) {
        let epoch: Option<String> = redis::from_redis_value(epoch).unwrap_or(None);
        let last: Entries = redis::from_redis_value(last).unwrap_or_default();
        if let Some(epoch) = epoch {
            events.extend(decode_entries(&epoch, last));
        }
    }
    Ok(events)
}

impl From<CallError> for BrokerError {
    fn from(e: CallError) -> Self {
        BrokerError::Unavailable(e.to_string())
    }
}

#[async_trait]
impl Broker for RedisBroker {
    fn start(&self, sink: Arc<dyn EventSink>) {
        if self.shared.sink.set(sink).is_err() {
            return;
        }
        let probe_channel = self.redis.keys().probe_channel(&self.node_id);
        let redis = self.redis.clone();
        let shared = self.shared.clone();
        let restarts = self.shared.metrics.task_restarts_total.clone();
        // A new run starts from a new connection: the hub's wanted topics
        // are resubscribed by construction.
        crate::supervise::spawn("redis_subscriber", restarts.clone(), move || {
            subscriber::SubscriberTask {
                probe_channel: probe_channel.clone(),
                redis: redis.clone(),
                shared: shared.clone(),
            }
            .run()
        })
        .detach();
        let (redis, shared, ttl) = (self.redis.clone(), self.shared.clone(), self.history.ttl);
        crate::supervise::spawn("redis_lineage", restarts, move || {
            keep_lineages(redis.clone(), shared.clone(), ttl)
        })
        .detach();
    }

    async fn publish(&self, event: NewEvent) -> BrokerResult<Arc<SharedEvent>> {
        if !topic::is_valid(&event.topic) {
            return Err(BrokerError::InvalidTopic(event.topic));
        }
        let keys = self.redis.keys();
        let channel = keys.topic_channel(&event.topic);
        if event.ephemeral {
            // Live only: straight to the channel, nothing numbered or kept.
            let shared = SharedEvent::new(event.stamp_ephemeral());
            let mut publish = redis::cmd(publish_verb(keys));
            publish.arg(&channel).arg(shared.json.get());
            let _: i64 = self.redis.call("publish", &publish).await?;
            return Ok(shared);
        }
        let stream = keys.history(&event.topic);
        let meta = keys.history_meta(&event.topic);
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
        let max_len = self.history.size.max(1);
        let ttl_ms = self.history.ttl.as_millis().max(1) as u64;
        let mut inv = PUBLISH.invocation();
        inv.key(stream)
            .key(channel)
            .key(meta)
            .arg(ENVELOPE_HEAD)
            .arg(&tail)
            .arg(max_len)
            .arg(ttl_ms)
            .arg(Position::new_epoch())
            .arg(publish_verb(keys));
        let id: String = self.redis.call("publish", &inv).await?;
        let mut event = unstamped;
        event.id = id;
        Ok(SharedEvent::new(event))
    }

    async fn subscribe(&self, topic: &str) -> BrokerResult<()> {
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
        let within = self.redis.config().subscribe_timeout;
        match tokio::time::timeout(within, rx).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(BrokerError::Unavailable(format!(
                "redis did not confirm the subscription within {within:?}"
            ))),
        }
    }

    fn release(&self, topic: &str) {
        // The control task compares what Redis has with what the hub wants.
        self.shared.touch(topic);
    }

    async fn history(&self, topic: &str, after: &Position, limit: usize) -> BrokerResult<History> {
        let stream = self.redis.keys().history(topic);
        let meta = self.redis.keys().history_meta(topic);
        let limit = limit.max(1);
        let from = format!("{}-0", after.seq.saturating_add(1));
        // One atomic read: the epoch, the last number, the oldest retained
        // entry and the entries after the position.
        let mut read = redis::pipe();
        read.atomic()
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
            .arg(limit);
        let (epoch, last, oldest, after_entries): (Option<String>, Option<u64>, Entries, Entries) =
            self.redis.call("history", &read).await?;
        let Some(epoch) = epoch else {
            return Ok(History::Gap {
                reason: GapReason::EpochChanged,
                retained: Vec::new(),
            });
        };
        let decode = |entries: Entries| decode_entries(&epoch, entries);
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

    async fn head(&self, topic: &str) -> BrokerResult<Option<Position>> {
        let mut read = redis::cmd("HMGET");
        read.arg(self.redis.keys().history_meta(topic))
            .arg("epoch")
            .arg("seq");
        let (epoch, seq): (Option<String>, Option<u64>) = self.redis.call("head", &read).await?;
        Ok(match (epoch, seq) {
            (Some(epoch), Some(seq)) if seq > 0 => Some(Position::new(epoch, seq)),
            _ => None,
        })
    }

    fn describe(&self) -> Option<String> {
        let shards = self.shared.shards.lock().unwrap_or_else(|p| p.into_inner());
        if shards.is_empty() {
            return Some(self.redis.describe());
        }
        let masters: Vec<&str> = shards.iter().map(|s| s.master.as_str()).collect();
        Some(format!(
            "{}, {} shards: {}",
            self.redis.describe(),
            masters.len(),
            masters.join(", ")
        ))
    }

    fn readiness(&self) -> Result<(), String> {
        match &*self.shared.link.lock().unwrap_or_else(|p| p.into_inner()) {
            Link::Up if self.redis.keys().tagged() => {
                cluster::readiness(&self.shared, self.redis.keys())
            }
            Link::Up => Ok(()),
            Link::Connecting => Err("connecting to redis".into()),
            Link::Down(why) => Err(format!("redis unreachable: {why}")),
        }
    }
}
