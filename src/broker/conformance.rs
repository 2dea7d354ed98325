//! The conformance suite every [`Broker`] implementation passes: the
//! trait's contract (in the module docs) as executable checks, run once per
//! implementation.
//!
//! Each check builds its own broker and is its own test, so a failure names
//! the behaviour that broke and the implementation it broke in. The Redis
//! runs start a private `redis-server` per test.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::*;
use crate::event::Event;

/// What keeps a broker's backing service alive for the test.
type Keep = Box<dyn std::any::Any + Send>;

/// Builds a broker that keeps its history within `limits`.
type Setup = fn(HistoryLimits) -> (Arc<dyn Broker>, Keep);

/// Every check, by name; each implementation's module below turns each into
/// a test.
macro_rules! for_each_check {
    ($suite:ident!($setup:path)) => {
        $suite!($setup;
            a_publish_is_stamped_and_reaches_a_subscribed_sink,
            ids_are_ordered_per_topic_without_gaps,
            subscribing_twice_delivers_once_and_release_does_not_block,
            history_after_a_position_is_exact_and_bounded,
            history_says_why_it_cannot_resume,
            an_idle_history_expires_into_a_new_epoch,
            live_only_events_are_delivered_but_not_kept,
            invalid_topics_are_refused,
        );
    };
}

macro_rules! suite {
    ($setup:path; $($check:ident),+ $(,)?) => {
        $(
            // Several worker threads, so concurrent publishes really race.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $check() {
                super::$check($setup).await;
            }
        )+
    };
}

mod memory_broker {
    use super::*;

    fn setup(limits: HistoryLimits) -> (Arc<dyn Broker>, Keep) {
        let broker = memory::MemoryBroker::new(limits.size, limits.ttl);
        (Arc::new(broker), Box::new(()))
    }

    for_each_check!(suite!(setup));
}

mod redis_broker {
    use super::*;
    use crate::infra::redis::Redis;
    use crate::telemetry::metrics::Metrics;
    use crate::test_support::RedisServer;

    fn setup(limits: HistoryLimits) -> (Arc<dyn Broker>, Keep) {
        let server = RedisServer::start();
        let metrics = Arc::new(Metrics::new());
        let config = super::super::redis::tests::test_config(&server.url());
        let redis = Redis::new(config, metrics.clone()).expect("a valid URL");
        let broker = redis::RedisBroker::new(redis, limits, metrics);
        (Arc::new(broker), Box::new(server))
    }

    for_each_check!(suite!(setup));
}

/// History limits for checks that do not test them.
const LIMITS: HistoryLimits = HistoryLimits {
    size: 100,
    ttl: Duration::from_secs(600),
};

/// How long an event may take to come back through the bus.
const DELIVERY: Duration = Duration::from_secs(5);

/// A sink standing in for the hub: it wants what the test subscribed to,
/// and hands what it receives to the test.
struct Sink {
    wanted: Mutex<HashSet<String>>,
    received: mpsc::UnboundedSender<Arc<SharedEvent>>,
}

impl EventSink for Sink {
    fn dispatch(&self, event: Arc<SharedEvent>) {
        let _ = self.received.send(event);
    }
    fn topics(&self) -> Vec<String> {
        self.wanted.lock().unwrap().iter().cloned().collect()
    }
    fn wants(&self, topic: &str) -> bool {
        self.wanted.lock().unwrap().contains(topic)
    }
}

/// A started broker, its sink, and what reached the sink.
struct Node {
    broker: Arc<dyn Broker>,
    sink: Arc<Sink>,
    received: mpsc::UnboundedReceiver<Arc<SharedEvent>>,
    _keep: Keep,
}

impl Node {
    fn start(setup: Setup, limits: HistoryLimits) -> Self {
        let (broker, keep) = setup(limits);
        let (tx, received) = mpsc::unbounded_channel();
        let sink = Arc::new(Sink {
            wanted: Mutex::default(),
            received: tx,
        });
        broker.start(sink.clone());
        Self {
            broker,
            sink,
            received,
            _keep: keep,
        }
    }

    /// Subscribes as the hub does: the topic is wanted first.
    async fn subscribe(&self, topic: &str) {
        self.sink.wanted.lock().unwrap().insert(topic.to_owned());
        self.broker
            .subscribe(topic)
            .await
            .expect("the subscription is confirmed");
    }

    /// Releases as the hub does: the topic is no longer wanted first.
    fn release(&self, topic: &str) {
        self.sink.wanted.lock().unwrap().remove(topic);
        self.broker.release(topic);
    }

    async fn publish(&self, topic: &str, i: usize) -> Arc<SharedEvent> {
        self.broker
            .publish(NewEvent::new(
                topic,
                "test.event",
                serde_json::json!({ "i": i }),
            ))
            .await
            .expect("published")
    }

    async fn next(&mut self) -> Arc<SharedEvent> {
        tokio::time::timeout(DELIVERY, self.received.recv())
            .await
            .expect("an event reaches the sink")
            .expect("the sink is open")
    }

    /// Asserts that nothing reaches the sink for a while.
    async fn quiet(&mut self) {
        let more = tokio::time::timeout(Duration::from_millis(300), self.received.recv()).await;
        assert!(more.is_err(), "unexpected delivery: {more:?}");
    }

    async fn history(&self, topic: &str, after: &Position, limit: usize) -> History {
        self.broker
            .history(topic, after, limit)
            .await
            .expect("the history is readable")
    }
}

fn position(event: &SharedEvent) -> Position {
    event
        .position
        .clone()
        .expect("a published event has a position")
}

fn seqs(events: &[Arc<SharedEvent>]) -> Vec<u64> {
    events.iter().map(|e| position(e).seq).collect()
}

fn envelopes(events: &[Arc<SharedEvent>]) -> Vec<(Event, String)> {
    events
        .iter()
        .map(|e| (e.event.clone(), e.json.get().to_owned()))
        .collect()
}

async fn a_publish_is_stamped_and_reaches_a_subscribed_sink(setup: Setup) {
    let mut node = Node::start(setup, LIMITS);
    node.subscribe("posts").await;
    let sent = node
        .broker
        .publish(NewEvent::new(
            "posts",
            "post.created",
            serde_json::json!({ "title": "t" }),
        ))
        .await
        .unwrap();
    assert_eq!(sent.event.topic, "posts");
    assert_eq!(sent.event.kind, "post.created");
    assert_eq!(sent.event.payload, serde_json::json!({ "title": "t" }));
    assert_eq!(position(&sent).seq, 1, "a topic's first event");
    assert_eq!(sent.event.id, position(&sent).to_string());
    assert!(
        chrono::DateTime::parse_from_rfc3339(&sent.event.timestamp).is_ok(),
        "{}",
        sent.event.timestamp
    );
    let got = node.next().await;
    assert_eq!(
        envelopes(&[got]),
        envelopes(&[sent]),
        "the sink gets the very envelope the publisher got back"
    );
    assert_eq!(node.broker.readiness(), Ok(()));
}

async fn ids_are_ordered_per_topic_without_gaps(setup: Setup) {
    const EACH: usize = 40;
    let mut node = Node::start(setup, LIMITS);
    let topics = ["a", "channel:b"];
    for topic in topics {
        node.subscribe(topic).await;
    }
    let broker = node.broker.clone();
    let tasks: Vec<_> = (0..4)
        .map(|task| {
            let broker = broker.clone();
            tokio::spawn(async move {
                for i in 0..EACH / 2 {
                    let topic = topics[(task + i) % 2];
                    let event = NewEvent::new(topic, "x", serde_json::json!({ "task": task }));
                    broker.publish(event).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let mut seen: HashMap<String, Vec<Arc<SharedEvent>>> = HashMap::new();
    for _ in 0..EACH * 2 {
        let event = node.next().await;
        seen.entry(event.event.topic.clone())
            .or_default()
            .push(event);
    }
    for topic in topics {
        let events = &seen[topic];
        let want: Vec<u64> = (1..=EACH as u64).collect();
        assert_eq!(
            seqs(events),
            want,
            "{topic}: numbered from 1 without gaps, delivered in order"
        );
        let epochs: HashSet<_> = events.iter().map(|e| position(e).epoch).collect();
        assert_eq!(epochs.len(), 1, "{topic}: one history, one epoch");
        assert_eq!(
            node.broker.head(topic).await.unwrap(),
            Some(position(&events[EACH - 1]))
        );
    }
    node.quiet().await;
}

async fn subscribing_twice_delivers_once_and_release_does_not_block(setup: Setup) {
    let mut node = Node::start(setup, LIMITS);
    node.subscribe("user:1").await;
    node.subscribe("user:1").await;
    let sent = node.publish("user:1", 1).await;
    assert_eq!(node.next().await.event.id, sent.event.id);
    node.quiet().await;

    let started = Instant::now();
    node.release("user:1");
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "release waited {:?}",
        started.elapsed()
    );
    // Subscribed again after a release, the topic delivers again.
    node.subscribe("user:1").await;
    let again = node.publish("user:1", 2).await;
    let mut got = node.next().await;
    // An event published while released may or may not have arrived; the
    // one published after subscribing again must.
    while got.event.id != again.event.id {
        got = node.next().await;
    }
    assert_eq!(position(&got).seq, 2);
}

async fn history_after_a_position_is_exact_and_bounded(setup: Setup) {
    let node = Node::start(setup, LIMITS);
    let mut sent = Vec::new();
    for i in 0..5 {
        sent.push(node.publish("t", i).await);
    }
    match node.history("t", &position(&sent[1]), 100).await {
        History::Complete(events) => assert_eq!(
            envelopes(&events),
            envelopes(&sent[2..]),
            "the history holds the very envelopes that were published"
        ),
        other => panic!("{other:?}"),
    }
    match node.history("t", &position(&sent[1]), 2).await {
        History::Complete(events) => assert_eq!(seqs(&events), vec![3, 4], "at most the limit"),
        other => panic!("{other:?}"),
    }
    match node.history("t", &position(&sent[4]), 100).await {
        History::Complete(events) => assert!(events.is_empty(), "nothing after the head"),
        other => panic!("{other:?}"),
    }
    let epoch = position(&sent[0]).epoch;
    match node.history("t", &Position::new(epoch, 0), 100).await {
        History::Complete(events) => {
            assert_eq!(seqs(&events), vec![1, 2, 3, 4, 5], "from the start")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        node.broker.head("t").await.unwrap(),
        Some(position(&sent[4]))
    );
    assert_eq!(node.broker.head("never").await.unwrap(), None);
}

async fn history_says_why_it_cannot_resume(setup: Setup) {
    let limits = HistoryLimits { size: 10, ..LIMITS };
    let node = Node::start(setup, limits);
    match node.history("never", &Position::new("abc", 1), 100).await {
        History::Gap { reason, retained } => {
            assert_eq!(reason, GapReason::EpochChanged, "a topic without history");
            assert!(retained.is_empty());
        }
        other => panic!("{other:?}"),
    }
    let mut sent = Vec::new();
    // Enough for the history to drop its oldest events (Redis trims its
    // streams approximately, by whole nodes of 100 entries).
    for i in 0..250 {
        sent.push(node.publish("t", i).await);
    }
    let current = position(&sent[249]);
    match node.history("t", &Position::new("elsewhere", 3), 5).await {
        History::Gap { reason, retained } => {
            assert_eq!(
                reason,
                GapReason::EpochChanged,
                "another history's position"
            );
            let kept = seqs(&retained);
            assert!(!kept.is_empty() && kept.len() <= 5, "{kept:?}");
            assert!(kept.windows(2).all(|w| w[0] + 1 == w[1]), "{kept:?}");
        }
        other => panic!("{other:?}"),
    }
    let beyond = Position::new(current.epoch.clone(), current.seq + 1);
    match node.history("t", &beyond, 100).await {
        History::Gap { reason, retained } => {
            assert_eq!(reason, GapReason::Malformed, "a position never handed out");
            assert!(retained.is_empty());
        }
        other => panic!("{other:?}"),
    }
    match node.history("t", &position(&sent[0]), 100).await {
        History::Gap { reason, retained } => {
            assert_eq!(reason, GapReason::Expired, "older than what is kept");
            let kept = seqs(&retained);
            assert!(kept.first().is_some_and(|first| *first > 2), "{kept:?}");
            assert!(kept.len() <= 100, "at most the limit: {kept:?}");
            assert!(kept.windows(2).all(|w| w[0] + 1 == w[1]), "{kept:?}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(GapReason::Expired.as_str(), "expired");
    assert_eq!(GapReason::EpochChanged.as_str(), "epoch_changed");
    assert_eq!(GapReason::Malformed.as_str(), "malformed");
    assert_eq!(GapReason::Unavailable.as_str(), "unavailable");
}

async fn an_idle_history_expires_into_a_new_epoch(setup: Setup) {
    let limits = HistoryLimits {
        ttl: Duration::from_millis(300),
        ..LIMITS
    };
    let node = Node::start(setup, limits);
    let old = node.publish("t", 0).await;
    node.publish("t", 1).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(node.broker.head("t").await.unwrap(), None, "expired");
    match node.history("t", &position(&old), 100).await {
        History::Gap { reason, .. } => assert_eq!(reason, GapReason::EpochChanged),
        other => panic!("{other:?}"),
    }
    let fresh = node.publish("t", 2).await;
    assert_eq!(position(&fresh).seq, 1, "a new history counts from 1");
    assert_ne!(position(&fresh).epoch, position(&old).epoch);
}

async fn live_only_events_are_delivered_but_not_kept(setup: Setup) {
    let mut node = Node::start(setup, LIMITS);
    node.subscribe("channel:c").await;
    let kept = node.publish("channel:c", 0).await;
    assert_eq!(node.next().await.event.id, kept.event.id);
    let live = node
        .broker
        .publish(NewEvent::new("channel:c", "user.typing", serde_json::json!({})).ephemeral())
        .await
        .unwrap();
    assert_eq!(live.position, None, "a live-only id is no position");
    let got = node.next().await;
    assert_eq!(got.event.id, live.event.id);
    assert_eq!(
        node.broker.head("channel:c").await.unwrap(),
        Some(position(&kept)),
        "not numbered"
    );
    match node.history("channel:c", &position(&kept), 100).await {
        History::Complete(events) => assert!(events.is_empty(), "not kept"),
        other => panic!("{other:?}"),
    }
}

async fn invalid_topics_are_refused(setup: Setup) {
    let mut node = Node::start(setup, LIMITS);
    node.subscribe("posts").await;
    let too_long = "a".repeat(crate::event::MAX_TOPIC_LEN + 1);
    for topic in ["", "has space", "star*", too_long.as_str()] {
        for event in [
            NewEvent::new(topic, "x", serde_json::json!({})),
            NewEvent::new(topic, "x", serde_json::json!({})).ephemeral(),
        ] {
            match node.broker.publish(event).await {
                Err(BrokerError::InvalidTopic(named)) => assert_eq!(named, topic),
                other => panic!("{topic:?}: {other:?}"),
            }
        }
    }
    node.quiet().await;
}
