//! Receiving on Redis Cluster: sharded Pub/Sub (`SSUBSCRIBE`), a topic's
//! events heard from the shard that owns its slot only.
//!
//! The node holds one cluster connection of its own for Pub/Sub (RESP3,
//! redis-rs's `cluster-async`): one multiplexed connection per cluster
//! node, each subscription sent to the node that owns the topic's slot.
//! Every push comes to one bounded queue, drained by one task:
//!
//! - `smessage`: an event, into the hub;
//! - `ssubscribe` for a topic already confirmed and not being subscribed by
//!   this node: the client subscribed it again by itself (it reconnected
//!   to the node), so what was published meanwhile is read from history;
//! - `sunsubscribe` for a topic the hub still wants: the server ended the
//!   subscription (its slot moved to another shard, or the node became a
//!   replica); the topic is subscribed again, where the slot now lives
//!   (the client follows the MOVED answer), and its hole filled;
//! - `disconnection` (a node's connection dropped): every topic is
//!   subscribed again, and each one whose shard cannot be reached yet
//!   (its master died and no replica is promoted yet) is retried every
//!   2 s until it is; a topic that stays unsubscribed for longer than
//!   `redis.subscribe_timeout_seconds` rebuilds the whole connection from
//!   the seeds (a new view of the cluster), at most every 30 s.
//!
//! A full queue ends the connection (counted in
//! `subgate_pubsub_overflows_total`), as on one Redis: the node reconnects
//! and every stream reads what it missed from history.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use redis::cluster_async::ClusterConnection;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::{mpsc, Notify};

use super::subscriber::{AbortOnDrop, SubscriberTask};
use super::{Link, Shared};
use crate::event::SharedEvent;
use crate::infra::redis::slot_of;

/// Subscriptions sent at once.
const IN_FLIGHT: usize = 64;

/// The pushes of the Pub/Sub connection, into a bounded queue: a full queue
/// marks the connection as fallen behind instead of buffering.
struct Pushes {
    queue: mpsc::Sender<PushInfo>,
    overflowed: Arc<AtomicBool>,
    wake: Arc<Notify>,
}

impl redis::aio::AsyncPushSender for Pushes {
    fn send(&self, info: PushInfo) -> Result<(), redis::aio::SendError> {
        match self.queue.try_send(info) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !self.overflowed.swap(true, Ordering::SeqCst) {
                    self.wake.notify_one();
                }
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(redis::aio::SendError),
        }
    }
}

/// What the push reader tells the control task.
#[derive(Default)]
struct Signals {
    /// Topics to read from history: resubscribed by the client itself.
    resync: HashSet<String>,
    /// Topics whose subscription the server ended.
    ended: HashSet<String>,
    /// A node's connection dropped.
    disconnected: bool,
}

/// The control task's view of subscriptions on this connection.
#[derive(Default)]
struct State {
    /// Topics being subscribed now (their confirmation push is expected).
    pending: HashSet<String>,
}

/// A shard as `CLUSTER SHARDS` describes it: its master's address, its
/// slot ranges and the master's health.
#[derive(Debug, Clone)]
pub(super) struct Shard {
    pub(super) master: String,
    pub(super) slots: Vec<(u16, u16)>,
    pub(super) health: String,
}

impl Shard {
    fn serves(&self, slot: u16) -> bool {
        self.slots
            .iter()
            .any(|(lo, hi)| (*lo..=*hi).contains(&slot))
    }

    fn describe(&self) -> String {
        let ranges: Vec<String> = self
            .slots
            .iter()
            .map(|(lo, hi)| format!("{lo}-{hi}"))
            .collect();
        format!("redis shard {} (slots {})", self.master, ranges.join(","))
    }
}

/// How often topics that could not be subscribed are tried again.
const RETRY_EVERY: Duration = Duration::from_secs(2);

/// The least time between two rebuilds of the cluster connection for
/// topics that stay unsubscribed.
const REBUILD_EVERY: Duration = Duration::from_secs(30);

/// How long a wanted topic may stay unsubscribed before the node says it
/// is not ready (a reconnect or a slot move takes less).
const UNREADY_AFTER: Duration = Duration::from_secs(2);

/// `/readyz` on a cluster: each shard whose master is not online, and each
/// shard holding topics this node could not subscribe for a while.
pub(super) fn readiness(shared: &Shared, keys: &crate::infra::redis::Keys) -> Result<(), String> {
    let shards = lock(&shared.shards).clone();
    if shards.is_empty() {
        return Err("redis cluster: no shard serves slots yet (CLUSTER SHARDS)".into());
    }
    let covered: u32 = shards
        .iter()
        .flat_map(|s| s.slots.iter())
        .map(|(lo, hi)| u32::from(hi.saturating_sub(*lo)) + 1)
        .sum();
    let mut problems: Vec<String> = Vec::new();
    if covered < 16384 {
        problems.push(format!(
            "redis cluster: {} of 16384 slots have no master",
            16384 - covered
        ));
    }
    problems.extend(
        shards
            .iter()
            .filter(|s| s.health != "online")
            .map(|s| format!("{} is {}", s.describe(), s.health)),
    );
    let mut stuck: HashMap<String, usize> = HashMap::new();
    for (topic, since) in lock(&shared.lost).iter() {
        if since.elapsed() < UNREADY_AFTER {
            continue;
        }
        let slot = slot_of(&keys.history(topic));
        let shard = shards
            .iter()
            .find(|s| s.serves(slot))
            .map(Shard::describe)
            .unwrap_or_else(|| format!("redis slot {slot} (no shard known)"));
        *stuck.entry(shard).or_default() += 1;
    }
    let mut stuck: Vec<_> = stuck.into_iter().collect();
    stuck.sort();
    problems.extend(
        stuck
            .into_iter()
            .map(|(shard, n)| format!("{shard}: {n} topics cannot be subscribed")),
    );
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Reads `CLUSTER SHARDS` and publishes the per-shard metrics.
async fn refresh_shards(task: &SubscriberTask) {
    let shared = &task.shared;
    let reply: Result<Value, _> = task
        .redis
        .call(
            "cluster_shards",
            &redis::cmd("CLUSTER").arg("SHARDS").clone(),
        )
        .await;
    // Unanswered, the shards are unknown: the node says so in /readyz
    // rather than trusting an old view.
    let shards = reply.map(|reply| parse_shards(&reply)).unwrap_or_default();
    let keys = task.redis.keys();
    let shard_of = |topic: &str| {
        let slot = slot_of(&keys.history(topic));
        shards
            .iter()
            .find(|s| s.serves(slot))
            .map(|s| s.master.clone())
    };
    let mut subscribed: HashMap<String, i64> = HashMap::new();
    for topic in shared.confirmed().iter() {
        if let Some(master) = shard_of(topic) {
            *subscribed.entry(master).or_default() += 1;
        }
    }
    let mut lost: HashMap<String, i64> = HashMap::new();
    for topic in lock(&shared.lost).keys() {
        if let Some(master) = shard_of(topic) {
            *lost.entry(master).or_default() += 1;
        }
    }
    let m = &shared.metrics;
    m.redis_shard_subscribed_channels.reset();
    m.redis_shard_unsubscribed_topics.reset();
    m.redis_shard_up.reset();
    for shard in &shards {
        let label = [shard.master.as_str()];
        m.redis_shard_subscribed_channels
            .with_label_values(&label)
            .set(subscribed.get(&shard.master).copied().unwrap_or(0));
        m.redis_shard_unsubscribed_topics
            .with_label_values(&label)
            .set(lost.get(&shard.master).copied().unwrap_or(0));
        m.redis_shard_up
            .with_label_values(&label)
            .set(i64::from(shard.health == "online"));
    }
    *lock(&shared.shards) = shards;
}

/// The shards of a `CLUSTER SHARDS` reply (RESP2 flat pairs or RESP3
/// maps): the master of each, with its slot ranges.
fn parse_shards(reply: &Value) -> Vec<Shard> {
    fn pairs(v: &Value) -> Vec<(String, &Value)> {
        match v {
            Value::Map(entries) => entries
                .iter()
                .filter_map(|(k, v)| text(k).map(|k| (k, v)))
                .collect(),
            Value::Array(items) => items
                .chunks(2)
                .filter_map(|kv| match kv {
                    [k, v] => text(k).map(|k| (k, v)),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    }
    fn text(v: &Value) -> Option<String> {
        match v {
            Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
            Value::SimpleString(s) => Some(s.clone()),
            Value::VerbatimString { text, .. } => Some(text.clone()),
            Value::Int(n) => Some(n.to_string()),
            _ => None,
        }
    }
    let Value::Array(shards) = reply else {
        return Vec::new();
    };
    shards
        .iter()
        .filter_map(|shard| {
            let fields = pairs(shard);
            let get = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| *v);
            let slots: Vec<u16> = match get("slots")? {
                Value::Array(bounds) => bounds
                    .iter()
                    .filter_map(|b| text(b)?.parse().ok())
                    .collect(),
                _ => Vec::new(),
            };
            let Value::Array(nodes) = get("nodes")? else {
                return None;
            };
            let master = nodes.iter().map(pairs).find(|node| {
                node.iter()
                    .any(|(k, v)| k == "role" && text(v).as_deref() == Some("master"))
            })?;
            let field = |name: &str| {
                master
                    .iter()
                    .find(|(k, _)| k == name)
                    .and_then(|(_, v)| text(v))
            };
            let host = field("endpoint")
                .filter(|e| !e.is_empty() && e != "?")
                .or_else(|| field("ip"))?;
            let port = field("port").or_else(|| field("tls-port"))?;
            Some(Shard {
                master: format!("{host}:{port}"),
                slots: slots
                    .chunks(2)
                    .filter_map(|r| Some((r[0], *r.get(1)?)))
                    .collect(),
                health: field("health").unwrap_or_else(|| "unknown".into()),
            })
        })
        .filter(|s| !s.slots.is_empty())
        .collect()
}

/// Serves one cluster Pub/Sub connection until it must be rebuilt; `Err`
/// says why.
pub(super) async fn serve(
    task: &SubscriberTask,
    attempt: &mut u32,
    reconnecting: bool,
) -> Result<(), String> {
    let shared = &task.shared;
    let queued = task.redis.config().pubsub_queue.max(1);
    let (queue_tx, mut queue_rx) = mpsc::channel::<PushInfo>(queued);
    let overflowed = Arc::new(AtomicBool::new(false));
    let wake = Arc::new(Notify::new());
    let conn = task
        .redis
        .cluster_pubsub(Pushes {
            queue: queue_tx,
            overflowed: overflowed.clone(),
            wake: wake.clone(),
        })
        .await
        .map_err(|e| e.cause().to_owned())?;
    // A client made while no shard serves slots (the cluster's nodes up,
    // the cluster not made yet) does not recover by itself once it is
    // made: connect again later instead.
    refresh_shards(task).await;
    if lock(&shared.shards).is_empty() {
        return Err("no shard of the cluster serves slots yet".into());
    }
    shared.set_link(Link::Up);
    *attempt = 0;
    tracing::info!("redis cluster sharded pub/sub connected");

    let signals = Arc::new(Mutex::new(Signals::default()));
    let state = Arc::new(Mutex::new(State::default()));
    let reader = {
        let (shared, signals, state, wake) =
            (shared.clone(), signals.clone(), state.clone(), wake.clone());
        let keys = task.redis.keys().clone();
        AbortOnDrop(tokio::spawn(async move {
            while let Some(push) = queue_rx.recv().await {
                shared.metrics.pubsub_queue.set(queue_rx.len() as i64);
                read_push(push, &keys, &shared, &signals, &state, &wake);
            }
            shared.metrics.pubsub_queue.set(0);
        }))
    };

    let mut control = Control {
        task,
        conn,
        retried: Instant::now(),
        signals,
        state,
    };
    // Everything the hub wants is missing on a new connection; after a
    // reconnect, whatever was published meanwhile is in history.
    control.reconcile(true, reconnecting).await;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let within = task.redis.config().subscribe_timeout;
    let refresh_every = task.redis.config().probe_interval;
    let mut last_refresh = Instant::now();
    loop {
        tokio::select! {
            _ = shared.wake.notified() => control.reconcile(false, false).await,
            _ = wake.notified() => {}
            _ = tick.tick() => {}
        }
        if overflowed.load(Ordering::SeqCst) {
            shared.metrics.pubsub_overflows_total.inc();
            tracing::warn!(
                queued,
                "redis pub/sub: the node fell behind its bus; reconnecting to catch up from history"
            );
            return Err("the node fell behind its bus".into());
        }
        if reader.0.is_finished() {
            return Err("the connection closed".into());
        }
        control.follow_signals().await;
        if last_refresh.elapsed() >= refresh_every {
            refresh_shards(task).await;
            last_refresh = Instant::now();
        }
        // A view of the cluster gone stale is rebuilt, at most every
        // REBUILD_EVERY: a shard that is down for good costs retries of its
        // own topics, not a rebuild of every subscription over and over.
        let stale = lock(&shared.lost)
            .values()
            .any(|since| since.elapsed() >= within);
        let due = lock(&shared.rebuilt).is_none_or(|at| at.elapsed() >= REBUILD_EVERY);
        if stale && due {
            *lock(&shared.rebuilt) = Some(Instant::now());
            return Err(format!(
                "topics stayed unsubscribed for {within:?}: rebuilding the view of the cluster"
            ));
        }
    }
}

/// Reads one push: events into the hub, the rest into signals.
fn read_push(
    push: PushInfo,
    keys: &crate::infra::redis::Keys,
    shared: &Arc<Shared>,
    signals: &Mutex<Signals>,
    state: &Mutex<State>,
    wake: &Notify,
) {
    let channel = |data: &[Value]| match data.first() {
        Some(Value::BulkString(bytes)) => std::str::from_utf8(bytes).ok().map(str::to_owned),
        Some(Value::SimpleString(text)) => Some(text.clone()),
        _ => None,
    };
    match push.kind {
        PushKind::SMessage | PushKind::Message => {
            let text = match push.data.get(1) {
                Some(Value::BulkString(bytes)) => std::str::from_utf8(bytes).ok(),
                _ => None,
            };
            match text.map(SharedEvent::decode) {
                Some(Ok(event)) => {
                    if let Some(sink) = shared.sink.get() {
                        sink.dispatch(event);
                    }
                }
                _ => shared
                    .metrics
                    .events_dropped_total
                    .with_label_values(&["undecodable"])
                    .inc(),
            }
        }
        PushKind::SSubscribe => {
            let Some(topic) = channel(&push.data).and_then(|c| keys.topic_of_channel(&c)) else {
                return;
            };
            let ours = lock(state).pending.contains(&topic);
            if !ours && shared.confirmed().contains(&topic) {
                lock(signals).resync.insert(topic);
                wake.notify_one();
            }
        }
        PushKind::SUnsubscribe => {
            let Some(topic) = channel(&push.data).and_then(|c| keys.topic_of_channel(&c)) else {
                return;
            };
            let wanted = shared.sink.get().is_some_and(|hub| hub.wants(&topic));
            if wanted && shared.confirmed().contains(&topic) {
                lock(signals).ended.insert(topic);
                wake.notify_one();
            }
        }
        PushKind::Disconnection => {
            lock(signals).disconnected = true;
            wake.notify_one();
        }
        _ => {}
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Control<'a> {
    task: &'a SubscriberTask,
    conn: ClusterConnection,
    /// When unsubscribed topics were last tried again.
    retried: Instant,
    signals: Arc<Mutex<Signals>>,
    state: Arc<Mutex<State>>,
}

impl Control<'_> {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Acts on what the push reader saw.
    async fn follow_signals(&mut self) {
        let signals = std::mem::take(&mut *lock(&self.signals));
        let shared = &self.task.shared;
        let mut again: Vec<String> = Vec::new();
        if signals.disconnected {
            // Which shard dropped is not said: every topic is confirmed
            // again (a no-op where the subscription stands).
            tracing::info!(
                "redis cluster: a node's connection dropped; confirming every subscription"
            );
            shared.metrics.redis_reconnects_total.inc();
            again.extend(shared.confirmed().iter().cloned());
        }
        for topic in signals.ended {
            tracing::info!(%topic, "redis cluster: the server ended a subscription (slot moved?); subscribing again");
            again.push(topic);
        }
        if !again.is_empty() {
            {
                let mut confirmed = shared.confirmed();
                let mut lost = lock(&shared.lost);
                for topic in &again {
                    confirmed.remove(topic);
                    lost.entry(topic.clone()).or_insert_with(Instant::now);
                }
            }
            self.reconcile(false, false).await;
        } else if !lock(&shared.lost).is_empty() && self.retried.elapsed() >= RETRY_EVERY {
            self.retried = Instant::now();
            self.reconcile(false, false).await;
        }
        if !signals.resync.is_empty() {
            let topics: Vec<String> = signals.resync.into_iter().collect();
            self.resync(topics);
        }
    }

    /// Subscribes what the hub wants and is not subscribed (new topics, and
    /// lost ones again); unsubscribes what it no longer wants. `full`
    /// compares everything (a new connection); `reconnected`: every topic
    /// subscribed is read from history afterwards.
    async fn reconcile(&mut self, full: bool, reconnected: bool) {
        let shared = &self.task.shared;
        let Some(hub) = shared.sink.get().cloned() else {
            return;
        };
        let dirty: Vec<String> =
            std::mem::take(&mut *shared.dirty.lock().unwrap_or_else(|p| p.into_inner()))
                .into_iter()
                .collect();
        let (to_add, to_remove) = {
            let mut confirmed = shared.confirmed();
            let mut state = self.state();
            let mut add: HashSet<String> = HashSet::new();
            let mut remove: Vec<String> = Vec::new();
            if full {
                add.extend(hub.topics());
            } else {
                for topic in dirty {
                    match (hub.wants(&topic), confirmed.contains(&topic)) {
                        (true, false) => {
                            add.insert(topic);
                        }
                        (false, true) => remove.push(topic),
                        _ => {}
                    }
                }
            }
            // Lost topics are retried while wanted, forgotten when not.
            let mut lost = lock(&shared.lost);
            lost.retain(|topic, _| hub.wants(topic));
            add.extend(lost.keys().cloned());
            drop(lost);
            for topic in &remove {
                confirmed.remove(topic);
            }
            state.pending.extend(add.iter().cloned());
            (add.into_iter().collect::<Vec<_>>(), remove)
        };
        let keys = self.task.redis.keys().clone();
        let redis = self.task.redis.clone();
        let subscribes = to_add.into_iter().map(|topic| {
            let (mut conn, redis, channel) =
                (self.conn.clone(), redis.clone(), keys.topic_channel(&topic));
            async move {
                let done = redis.bounded(conn.ssubscribe(channel)).await;
                (topic, done)
            }
        });
        let mut subscribes = futures_util::stream::iter(subscribes).buffer_unordered(IN_FLIGHT);
        let mut refilled = Vec::new();
        let mut failed = 0usize;
        let mut last_error = None;
        while let Some((topic, done)) = subscribes.next().await {
            let mut waiters = shared.waiters();
            let mut confirmed = shared.confirmed();
            let mut state = self.state();
            state.pending.remove(&topic);
            match done {
                Ok(()) => {
                    if lock(&shared.lost).remove(&topic).is_some() {
                        refilled.push(topic.clone());
                        let slot = slot_of(&keys.history(&topic));
                        if let Some(shard) = lock(&shared.shards).iter().find(|s| s.serves(slot)) {
                            shared
                                .metrics
                                .redis_shard_resubscribes_total
                                .with_label_values(&[shard.master.as_str()])
                                .inc();
                        }
                    } else if reconnected {
                        refilled.push(topic.clone());
                    }
                    for waiter in waiters.remove(&topic).unwrap_or_default() {
                        let _ = waiter.send(());
                    }
                    confirmed.insert(topic);
                }
                Err(e) => {
                    failed += 1;
                    last_error = Some(e.to_string());
                    lock(&shared.lost).entry(topic).or_insert_with(Instant::now);
                }
            }
        }
        drop(subscribes);
        if failed > 0 {
            tracing::warn!(
                failed,
                error = last_error.as_deref().unwrap_or(""),
                "redis cluster: topics could not be subscribed; retrying every 2 s"
            );
        }
        let unsubscribes = to_remove.into_iter().map(|topic| {
            let (mut conn, redis, channel) =
                (self.conn.clone(), redis.clone(), keys.topic_channel(&topic));
            async move { redis.bounded(conn.sunsubscribe(channel)).await }
        });
        let mut unsubscribes = futures_util::stream::iter(unsubscribes).buffer_unordered(IN_FLIGHT);
        while unsubscribes.next().await.is_some() {}
        drop(unsubscribes);
        shared.settle_waiters(hub.as_ref());
        if !refilled.is_empty() {
            self.resync(refilled);
        }
    }

    /// Hands out the latest event of each of `topics` again, as a resync
    /// point: each stream compares it with where it stands and reads what
    /// it missed from history.
    fn resync(&self, topics: Vec<String>) {
        let redis = self.task.redis.clone();
        let shared = self.task.shared.clone();
        // Detached: bounded by the topics this node serves, and a second
        // resync of a topic only repeats a resync point.
        tokio::spawn(async move {
            match super::latest_events(&redis, &topics).await {
                Ok(events) => {
                    if let Some(sink) = shared.sink.get() {
                        for event in events {
                            sink.dispatch(event.resync());
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "redis: could not resync topics after their subscription returned");
                }
            }
        });
    }
}
