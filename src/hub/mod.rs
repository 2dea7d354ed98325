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

use crate::broker::{Broker, BrokerError, EventSink};
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

type Topics = HashMap<String, HashMap<u64, Subscriber>>;

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
        });
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
        {
            let mut topics = self.lock(topic);
            let subs = match topics.get_mut(topic) {
                Some(subs) => subs,
                None => {
                    self.counted_topics(1);
                    topics.entry(topic.to_owned()).or_default()
                }
            };
            subs.insert(
                id,
                Subscriber {
                    tx,
                    cutoff,
                    transport,
                },
            );
        }
        // Constructed before the await so that a cancelled or failed
        // subscribe still releases its place.
        let subscription = Subscription {
            rx,
            guard: SubscriptionGuard {
                hub: self.clone(),
                topic: topic.to_owned(),
                id,
            },
        };
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
        self.lock(topic).get(topic).map_or(0, HashMap::len)
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
            let Some(subs) = topics.get_mut(topic) else {
                return;
            };
            subs.remove(&id);
            let empty = subs.is_empty();
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
        let mut slow = Vec::new();
        {
            let mut topics = self.lock(&event.event.topic);
            let Some(subs) = topics.get_mut(&event.event.topic) else {
                self.metrics
                    .events_dropped_total
                    .with_label_values(&["no_subscriber"])
                    .inc();
                return;
            };
            subs.retain(|_, sub| match sub.tx.try_send(event.clone()) {
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
            if subs.is_empty() {
                topics.remove(&event.event.topic);
                self.counted_topics(-1);
                drop(topics);
                self.broker.release(&event.event.topic);
            }
        }
        for (cutoff, transport) in slow {
            self.metrics
                .events_dropped_total
                .with_label_values(&["slow_consumer"])
                .inc();
            self.metrics
                .slow_consumer_disconnects_total
                .with_label_values(&[transport])
                .inc();
            if let Some(cutoff) = cutoff {
                cutoff.cut(CutoffReason::SlowConsumer);
            }
        }
    }
}

/// One local subscription: a stream of the topic's events. Dropping it
/// releases its place in the hub.
pub struct Subscription {
    rx: mpsc::Receiver<Arc<SharedEvent>>,
    guard: SubscriptionGuard,
}

impl Subscription {
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
