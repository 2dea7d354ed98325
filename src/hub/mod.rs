//! The node-local hub: topic -> local subscribers.
//!
//! The broker hands each event to [`Hub::dispatch`] once; the hub passes the
//! same `Arc` to every local subscriber's bounded queue with `try_send`, so
//! it never waits on a client. The topics are spread over [`SHARDS`] maps,
//! each with a lock of its own: a dispatch holds one topic's shard for a few
//! `try_send`s, never every topic, and never across an await. A subscriber whose queue is full is cut off:
//! its queue is closed, its connection's [`Cutoff`] fires (the transport
//! closes with the slow-consumer code) and it is counted. A subscription's
//! [`Subscription`] releases its place synchronously in `Drop`; the last one
//! out of a topic removes the topic and releases it at the broker.

pub mod resume;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use futures_util::Stream;
use tokio::sync::{mpsc, Notify};

use crate::broker::{Broker, BrokerError, EventSink, History};
use crate::event::{NewEvent, SharedEvent};
use crate::telemetry::metrics::Metrics;

/// Why a connection is being cut off by the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutoffReason {
    /// A subscription queue overflowed.
    SlowConsumer,
}

/// A per-connection signal the hub fires to make the transport close the
/// connection (with the code for the reason).
#[derive(Default)]
pub struct Cutoff {
    reason: OnceLock<CutoffReason>,
    notify: Notify,
}

impl Cutoff {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Fires the signal; the first reason wins.
    pub fn cut(&self, reason: CutoffReason) {
        if self.reason.set(reason).is_ok() {
            self.notify.notify_waiters();
            self.notify.notify_one();
        }
    }

    /// Resolves when the signal fires.
    pub async fn fired(&self) -> CutoffReason {
        loop {
            let notified = self.notify.notified();
            if let Some(reason) = self.reason.get() {
                return *reason;
            }
            notified.await;
        }
    }

    pub fn reason(&self) -> Option<CutoffReason> {
        self.reason.get().copied()
    }
}

struct Subscriber {
    tx: mpsc::Sender<Arc<SharedEvent>>,
    cutoff: Option<Arc<Cutoff>>,
    transport: &'static str,
}

/// How many independently locked maps the topics are spread over.
pub const SHARDS: usize = 64;

type Topics = HashMap<String, TopicSubs>;

/// One topic's local subscribers, and where its live stream stands.
#[derive(Default)]
struct TopicSubs {
    subs: HashMap<u64, Subscriber>,
    /// The position of the last event handed out.
    last: Option<crate::event::Position>,
    /// While a hole is being filled from history: the events that arrived
    /// meanwhile, handed out after the fill, in order.
    filling: Option<Vec<Arc<SharedEvent>>>,
}

pub struct Hub {
    /// Most events one history read returns.
    history_limit: usize,
    shards: Box<[Mutex<Topics>]>,
    /// Which shard a topic is in.
    hasher: std::hash::RandomState,
    /// Topics with local subscribers, over every shard.
    topic_count: std::sync::atomic::AtomicI64,
    next_id: AtomicU64,
    capacity: usize,
    broker: Arc<dyn Broker>,
    metrics: Arc<Metrics>,
    /// Itself, for the fills it spawns.
    me: OnceLock<std::sync::Weak<Hub>>,
}

impl Hub {
    /// Builds the hub and attaches it to `broker` as its sink.
    pub fn new(broker: Arc<dyn Broker>, metrics: Arc<Metrics>, capacity: usize) -> Arc<Self> {
        let hub = Arc::new(Self {
            // One read replays at most this much; a longer absence is
            // caught up by the next hole fill, read by read.
            history_limit: 1000,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: std::hash::RandomState::new(),
            topic_count: std::sync::atomic::AtomicI64::new(0),
            next_id: AtomicU64::new(1),
            capacity: capacity.max(1),
            broker: broker.clone(),
            metrics,
            me: OnceLock::new(),
        });
        let _ = hub.me.set(Arc::downgrade(&hub));
        broker.start(hub.clone());
        hub
    }

    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    /// Subscribes to `topic`; resolves once the broker delivers its events.
    /// `cutoff` is the connection to cut when this subscriber falls behind.
    pub async fn subscribe(
        self: &Arc<Self>,
        topic: &str,
        transport: &'static str,
        cutoff: Option<Arc<Cutoff>>,
    ) -> Result<Subscription, BrokerError> {
        let (tx, rx) = mpsc::channel(self.capacity);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let known = {
            let mut topics = self.lock(topic);
            let entry = match topics.get_mut(topic) {
                Some(entry) => entry,
                None => {
                    self.counted_topics(1);
                    topics.entry(topic.to_owned()).or_default()
                }
            };
            entry.subs.insert(
                id,
                Subscriber {
                    tx,
                    cutoff,
                    transport,
                },
            );
            entry.last.clone()
        };
        // Constructed before the await so that a cancelled or failed
        // subscribe still releases its place.
        let mut subscription = Subscription {
            rx,
            start: known,
            guard: SubscriptionGuard {
                hub: self.clone(),
                topic: topic.to_owned(),
                id,
            },
        };
        if subscription.start.is_none() {
            // Where the topic stands, read before the bus subscription is
            // made: an event published between the two is a hole before
            // the next one, filled from history, and an event handed out
            // again after a lost link (a resync point) is compared with
            // it instead of being taken for an old one.
            if let Ok(Some(head)) = self.broker.head(topic).await {
                if let Some(entry) = self.lock(topic).get_mut(topic) {
                    if entry.last.is_none() {
                        entry.last = Some(head.clone());
                    }
                }
                subscription.start = Some(head);
            }
        }
        self.broker.subscribe(topic).await?;
        Ok(subscription)
    }

    /// Publishes through the broker, counting the outcome.
    pub async fn publish(&self, event: NewEvent) -> Result<Arc<SharedEvent>, BrokerError> {
        let namespace = crate::event::topic::namespace(&event.topic);
        match self.broker.publish(event).await {
            Ok(shared) => {
                self.metrics
                    .events_published_total
                    .with_label_values(&[namespace])
                    .inc();
                Ok(shared)
            }
            Err(e) => {
                let reason = match e {
                    BrokerError::Unavailable(_) => "unavailable",
                    BrokerError::InvalidTopic(_) => "invalid_topic",
                };
                self.metrics
                    .publish_failures_total
                    .with_label_values(&[reason])
                    .inc();
                Err(e)
            }
        }
    }

    /// The number of local subscribers of `topic`.
    pub fn subscriber_count(&self, topic: &str) -> usize {
        self.lock(topic).get(topic).map_or(0, |t| t.subs.len())
    }

    /// The topics with local subscribers.
    pub fn topics(&self) -> Vec<String> {
        let mut all = Vec::new();
        for shard in self.shards.iter() {
            all.extend(Self::locked(shard).keys().cloned());
        }
        all
    }

    /// The shard of `topic`, locked.
    fn lock(&self, topic: &str) -> std::sync::MutexGuard<'_, Topics> {
        use std::hash::BuildHasher;
        let shard = self.hasher.hash_one(topic) as usize % self.shards.len();
        Self::locked(&self.shards[shard])
    }

    fn locked(shard: &Mutex<Topics>) -> std::sync::MutexGuard<'_, Topics> {
        // A panic elsewhere must not wedge every subscription: the map stays
        // consistent because every critical section is a few map operations.
        shard.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Topics came (`+`) or went (`-`).
    fn counted_topics(&self, delta: i64) {
        let now = self.topic_count.fetch_add(delta, Ordering::Relaxed) + delta;
        self.metrics.hub_topics.set(now);
    }

    fn remove(&self, topic: &str, id: u64) {
        let released = {
            let mut topics = self.lock(topic);
            let Some(entry) = topics.get_mut(topic) else {
                return;
            };
            entry.subs.remove(&id);
            let empty = entry.subs.is_empty();
            if empty {
                topics.remove(topic);
                self.counted_topics(-1);
            }
            empty
        };
        if released {
            self.broker.release(topic);
        }
    }
}

impl EventSink for Hub {
    fn topics(&self) -> Vec<String> {
        Hub::topics(self)
    }

    fn wants(&self, topic: &str) -> bool {
        self.lock(topic).contains_key(topic)
    }

    fn dispatch(&self, event: Arc<SharedEvent>) {
        let topic = event.event.topic.clone();
        let mut topics = self.lock(&topic);
        let Some(entry) = topics.get_mut(&topic) else {
            self.metrics
                .events_dropped_total
                .with_label_values(&["no_subscriber"])
                .inc();
            return;
        };
        if let Some(waiting) = entry.filling.as_mut() {
            // A fill is under way: this waits its turn, in order. A fill
            // that falls a whole history read behind gives the rest to the
            // subscribers' own fills.
            if waiting.len() < self.history_limit {
                waiting.push(event);
                return;
            }
        }
        if let Some(from) = hole_before(entry.last.as_ref(), &event) {
            // A hole (Pub/Sub lost a message, or this node's link came back
            // and the topic's latest event is handed out again): read it
            // from history once for the topic, not once per subscriber.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                entry.filling = Some(vec![event]);
                self.metrics.history_fills_total.inc();
                let hub = self.me.get().and_then(std::sync::Weak::upgrade);
                let limit = self.history_limit;
                drop(topics);
                if let Some(hub) = hub {
                    runtime.spawn(async move {
                        let read = hub.broker.history(&topic, &from, limit).await;
                        let missed = match read {
                            Ok(History::Complete(events)) => events,
                            Ok(History::Gap { retained, .. }) => retained,
                            Err(_) => Vec::new(),
                        };
                        hub.filled(&topic, missed);
                    });
                }
                return;
            }
        }
        let released = self.hand_out(&topic, &mut topics, event);
        drop(topics);
        if released {
            self.broker.release(&topic);
        }
    }
}

/// Where a hole before `event` begins, when there is one: `event` is of the
/// epoch of the last event handed out, and more than one past it.
fn hole_before(
    last: Option<&crate::event::Position>,
    event: &SharedEvent,
) -> Option<crate::event::Position> {
    let (last, pos) = (last?, event.position.as_ref()?);
    (last.epoch == pos.epoch && pos.seq > last.seq + 1).then(|| last.clone())
}

impl Hub {
    /// The fill of `topic` read `missed` from history: what of it is new is
    /// handed out, then what waited, in order.
    fn filled(&self, topic: &str, missed: Vec<Arc<SharedEvent>>) {
        let mut topics = self.lock(topic);
        let Some(entry) = topics.get_mut(topic) else {
            return;
        };
        let waited = entry.filling.take().unwrap_or_default();
        let mut released = false;
        // What the fill read is marked as a resync point: each stream takes
        // what follows where it stands (a new stream stands where the topic
        // stood when it joined) and skips the rest.
        let missed = missed.into_iter().map(|event| event.resync());
        for event in missed.chain(waited) {
            let Some(entry) = topics.get(topic) else {
                break;
            };
            let stale = match (&entry.last, &event.position) {
                (Some(last), Some(pos)) => last.epoch == pos.epoch && pos.seq <= last.seq,
                _ => false,
            };
            if !stale {
                released |= self.hand_out(topic, &mut topics, event);
            }
        }
        drop(topics);
        if released {
            self.broker.release(topic);
        }
    }

    /// Hands `event` to every subscriber of `topic` (whose shard is
    /// `topics`); `true` when the last one left (the caller releases the
    /// topic at the broker once the lock is dropped).
    fn hand_out(&self, topic: &str, topics: &mut Topics, event: Arc<SharedEvent>) -> bool {
        let Some(entry) = topics.get_mut(topic) else {
            return false;
        };
        if let Some(pos) = &event.position {
            let newer = match &entry.last {
                Some(last) => last.epoch != pos.epoch || pos.seq > last.seq,
                None => true,
            };
            if newer {
                entry.last = Some(pos.clone());
            }
        }
        let mut slow = Vec::new();
        entry
            .subs
            .retain(|_, sub| match sub.tx.try_send(event.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    // Deliberate drop: the subscriber is removed (its queue
                    // closes after what it holds) and its connection cut.
                    slow.push((sub.cutoff.clone(), sub.transport));
                    false
                }
                // The receiver is gone; its guard removes it shortly.
                Err(mpsc::error::TrySendError::Closed(_)) => true,
            });
        let released = entry.subs.is_empty();
        if released {
            topics.remove(topic);
            self.counted_topics(-1);
        }
        for (cutoff, transport) in slow {
            cut_slow_consumer(&self.metrics, cutoff.as_deref(), transport);
        }
        released
    }
}

/// Cuts off a subscriber that fell a whole queue behind (its connection
/// closes with the slow-consumer code), counting the dropped event and the
/// disconnect.
pub(crate) fn cut_slow_consumer(
    metrics: &Metrics,
    cutoff: Option<&Cutoff>,
    transport: &'static str,
) {
    metrics
        .events_dropped_total
        .with_label_values(&["slow_consumer"])
        .inc();
    metrics
        .slow_consumer_disconnects_total
        .with_label_values(&[transport])
        .inc();
    if let Some(cutoff) = cutoff {
        cutoff.cut(CutoffReason::SlowConsumer);
    }
}

/// One local subscription: a stream of the topic's events. Dropping it
/// releases its place in the hub.
pub struct Subscription {
    rx: mpsc::Receiver<Arc<SharedEvent>>,
    /// Where the topic stood when this subscription joined it: what it
    /// receives comes after (`None`: the topic has no events yet).
    start: Option<crate::event::Position>,
    guard: SubscriptionGuard,
}

impl Subscription {
    /// Where the topic stood when this subscription joined it.
    pub fn start(&self) -> Option<&crate::event::Position> {
        self.start.as_ref()
    }

    pub async fn recv(&mut self) -> Option<Arc<SharedEvent>> {
        self.rx.recv().await
    }

    pub fn topic(&self) -> &str {
        &self.guard.topic
    }
}

impl Stream for Subscription {
    type Item = Arc<SharedEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

struct SubscriptionGuard {
    hub: Arc<Hub>,
    topic: String,
    id: u64,
}

impl Drop for SubscriptionGuard {
    fn drop(&mut self) {
        self.hub.remove(&self.topic, self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::memory::MemoryBroker;
    use futures_util::StreamExt;

    fn hub(capacity: usize) -> Arc<Hub> {
        Hub::new(
            Arc::new(MemoryBroker::default()),
            Arc::new(Metrics::new()),
            capacity,
        )
    }

    #[tokio::test]
    async fn one_event_reaches_every_subscriber_as_the_same_allocation() {
        let hub = hub(8);
        let mut a = hub.subscribe("posts", "test", None).await.unwrap();
        let mut b = hub.subscribe("posts", "test", None).await.unwrap();
        let published = hub
            .broker()
            .publish(NewEvent::new(
                "posts",
                "post.created",
                serde_json::json!({}),
            ))
            .await
            .unwrap();
        let ea = a.next().await.unwrap();
        let eb = b.next().await.unwrap();
        assert!(Arc::ptr_eq(&ea, &eb));
        assert!(Arc::ptr_eq(&ea, &published));
    }

    #[tokio::test]
    async fn dropping_the_last_subscription_removes_the_topic() {
        let hub = hub(8);
        let a = hub.subscribe("posts", "test", None).await.unwrap();
        let b = hub.subscribe("posts", "test", None).await.unwrap();
        assert_eq!(hub.subscriber_count("posts"), 2);
        drop(a);
        assert_eq!(hub.subscriber_count("posts"), 1);
        drop(b);
        assert!(hub.topics().is_empty());
    }

    #[tokio::test]
    async fn a_full_queue_cuts_off_only_the_slow_subscriber() {
        let hub = hub(2);
        let slow_cut = Cutoff::new();
        let mut slow = hub
            .subscribe("t", "test", Some(slow_cut.clone()))
            .await
            .unwrap();
        let mut fast = hub.subscribe("t", "test", None).await.unwrap();
        for i in 0..5 {
            hub.broker()
                .publish(NewEvent::new("t", "x", serde_json::json!({ "i": i })))
                .await
                .unwrap();
            assert_eq!(fast.next().await.unwrap().event.payload["i"], i);
        }
        assert_eq!(slow_cut.reason(), Some(CutoffReason::SlowConsumer));
        // The slow one keeps what was queued, then its stream ends.
        assert!(slow.next().await.is_some());
        assert!(slow.next().await.is_some());
        assert!(slow.next().await.is_none());
        assert_eq!(hub.subscriber_count("t"), 1);
    }
}
