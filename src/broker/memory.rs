//! The in-memory broker: one node, no Redis. Publishing records the event
//! in its topic's ring and hands it straight to this node's sink.
//!
//! At most `history.max_topics` topics keep a history: publishing to one
//! more evicts the history of the topic published to least recently
//! (counted in `subgate_history_evictions_total`), as does
//! `history.ttl_seconds` of silence. A topic that this node's subscribers
//! still read keeps its lineage (its epoch and last number) without its
//! events, so its live subscribers go on without a gap and a client
//! resuming from before the eviction hears that those events expired; a
//! topic nobody reads loses its lineage too, and a client resuming on it
//! hears of a new epoch, as after a restart.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{Broker, BrokerError, BrokerResult, EventSink, GapReason, History};
use crate::event::{topic, NewEvent, Position, SharedEvent};

/// One topic's history: its epoch, the last sequence number and a ring.
struct Log {
    epoch: String,
    last_seq: u64,
    ring: VecDeque<Arc<SharedEvent>>,
    touched: Instant,
    /// This log's key in [`Logs::by_publish`]; [`NO_HISTORY`] for a
    /// lineage kept without its events.
    tick: u64,
}

/// The tick of a log that keeps only its lineage.
const NO_HISTORY: u64 = u64::MAX;

/// The histories, and the order in which they were last published to.
#[derive(Default)]
struct Logs {
    by_topic: HashMap<String, Log>,
    /// tick of the last publish -> topic, least recent first: eviction and
    /// expiry take from the front.
    by_publish: BTreeMap<u64, String>,
    next_tick: u64,
    /// Topics this node's hub reads (between its `subscribe` and `release`).
    subscribed: HashSet<String>,
}

impl Logs {
    /// Drops `topic`'s events; its lineage too, unless it is read here.
    fn drop_history(&mut self, topic: &str) {
        let read = self.subscribed.contains(topic);
        let Some(log) = self.by_topic.get_mut(topic) else {
            return;
        };
        self.by_publish.remove(&log.tick);
        if read {
            log.ring = VecDeque::new();
            log.tick = NO_HISTORY;
        } else {
            self.by_topic.remove(topic);
        }
    }

    /// Whether `topic` keeps events (not only a lineage, or nothing).
    fn has_history(&self, topic: &str) -> bool {
        self.by_topic
            .get(topic)
            .is_some_and(|log| log.tick != NO_HISTORY)
    }

    /// Drops the histories idle for longer than `ttl`: the least recently
    /// published first, so only those are looked at.
    fn expire(&mut self, ttl: Duration) {
        while let Some((_, topic)) = self.by_publish.first_key_value() {
            let idle = self
                .by_topic
                .get(topic)
                .is_none_or(|log| log.touched.elapsed() >= ttl);
            if !idle {
                break;
            }
            let topic = topic.clone();
            if self.by_topic.contains_key(&topic) {
                self.drop_history(&topic);
            } else {
                self.by_publish.pop_first();
            }
        }
    }

    /// Marks `topic`'s log as published to now.
    fn touch(&mut self, topic: &str) {
        let tick = self.next_tick;
        self.next_tick += 1;
        if let Some(log) = self.by_topic.get_mut(topic) {
            self.by_publish.remove(&log.tick);
            log.tick = tick;
            log.touched = Instant::now();
            self.by_publish.insert(tick, topic.to_owned());
        }
    }
}

pub struct MemoryBroker {
    sink: OnceLock<Arc<dyn EventSink>>,
    logs: Mutex<Logs>,
    /// Topics released and not yet taken out of [`Logs::subscribed`]: a
    /// release comes from the hub, which may be dispatching an event that
    /// `publish` hands it under the logs' lock, so it cannot take that lock.
    releases: Mutex<Vec<String>>,
    history_size: usize,
    history_ttl: Duration,
    /// Most topics with a history (see the module docs).
    max_topics: usize,
    /// Histories evicted to stay within `max_topics`.
    evictions: prometheus::IntCounter,
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new(1000, Duration::from_secs(86400))
    }
}

/// `history.max_topics` unless configured.
pub const DEFAULT_MAX_TOPICS: usize = 10_000;

impl MemoryBroker {
    /// Keeps `history_size` events per topic, for `history_ttl` after the
    /// topic's last event, for at most [`DEFAULT_MAX_TOPICS`] topics.
    pub fn new(history_size: usize, history_ttl: Duration) -> Self {
        Self {
            sink: OnceLock::new(),
            logs: Mutex::new(Logs::default()),
            releases: Mutex::new(Vec::new()),
            history_size: history_size.max(1),
            history_ttl,
            max_topics: DEFAULT_MAX_TOPICS,
            evictions: prometheus::IntCounter::new(
                "subgate_history_evictions_total",
                "Topic histories evicted",
            )
            .expect("a valid metric name"),
        }
    }

    /// Keeps at most `max_topics` histories, counting each eviction in
    /// `evictions`.
    pub fn with_max_topics(mut self, max_topics: usize, evictions: prometheus::IntCounter) -> Self {
        self.max_topics = max_topics.max(1);
        self.evictions = evictions;
        self
    }

    /// The logs, with the releases since the last look applied.
    fn lock(&self) -> std::sync::MutexGuard<'_, Logs> {
        let mut logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        let released =
            std::mem::take(&mut *self.releases.lock().unwrap_or_else(|p| p.into_inner()));
        for topic in released {
            logs.subscribed.remove(&topic);
            // A lineage kept for readers who are gone.
            if logs
                .by_topic
                .get(&topic)
                .is_some_and(|log| log.tick == NO_HISTORY)
            {
                logs.by_topic.remove(&topic);
            }
        }
        logs
    }
}

fn retained(log: &Log, limit: usize) -> Vec<Arc<SharedEvent>> {
    log.ring.iter().take(limit).cloned().collect()
}

#[async_trait]
impl Broker for MemoryBroker {
    fn start(&self, sink: Arc<dyn EventSink>) {
        let _ = self.sink.set(sink);
    }

    async fn publish(&self, event: NewEvent) -> BrokerResult<Arc<SharedEvent>> {
        if !topic::is_valid(&event.topic) {
            return Err(BrokerError::InvalidTopic(event.topic));
        }
        if event.ephemeral {
            let shared = SharedEvent::new(event.stamp_ephemeral());
            if let Some(sink) = self.sink.get() {
                sink.dispatch(shared.clone());
            }
            return Ok(shared);
        }
        // The position is taken, recorded and dispatched under one lock so
        // that subscribers see events in position order.
        let mut logs = self.lock();
        logs.expire(self.history_ttl);
        if !logs.has_history(&event.topic) {
            // A new history: make room by evicting the least recently
            // published (see the module docs).
            while logs.by_publish.len() >= self.max_topics {
                let Some((_, oldest)) = logs.by_publish.first_key_value() else {
                    break;
                };
                let oldest = oldest.clone();
                if logs.by_topic.contains_key(&oldest) {
                    logs.drop_history(&oldest);
                } else {
                    logs.by_publish.pop_first();
                }
                self.evictions.inc();
            }
        }
        if !logs.by_topic.contains_key(&event.topic) {
            logs.by_topic.insert(
                event.topic.clone(),
                Log {
                    epoch: Position::new_epoch(),
                    last_seq: 0,
                    ring: VecDeque::new(),
                    touched: Instant::now(),
                    tick: NO_HISTORY,
                },
            );
        }
        logs.touch(&event.topic);
        let log = logs
            .by_topic
            .get_mut(&event.topic)
            .expect("inserted above, under the same lock");
        log.last_seq += 1;
        let position = Position::new(log.epoch.clone(), log.last_seq);
        let shared = SharedEvent::new(event.stamp(&position));
        if log.ring.len() == self.history_size {
            log.ring.pop_front();
        }
        log.ring.push_back(shared.clone());
        if let Some(sink) = self.sink.get() {
            sink.dispatch(shared.clone());
        }
        Ok(shared)
    }

    async fn subscribe(&self, topic: &str) -> BrokerResult<()> {
        let mut logs = self.lock();
        if !logs.subscribed.contains(topic) {
            logs.subscribed.insert(topic.to_owned());
        }
        Ok(())
    }

    fn release(&self, topic: &str) {
        // Applied at the next look at the logs (see `releases`).
        self.releases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(topic.to_owned());
    }

    fn readiness(&self) -> Result<(), String> {
        Ok(())
    }

    async fn history(&self, topic: &str, after: &Position, limit: usize) -> BrokerResult<History> {
        let mut logs = self.lock();
        logs.expire(self.history_ttl);
        let Some(log) = logs.by_topic.get(topic) else {
            return Ok(History::Gap {
                reason: GapReason::EpochChanged,
                retained: Vec::new(),
            });
        };
        Ok(read(log, after, limit))
    }

    async fn head(&self, topic: &str) -> BrokerResult<Option<Position>> {
        let mut logs = self.lock();
        logs.expire(self.history_ttl);
        Ok(logs
            .by_topic
            .get(topic)
            .filter(|log| log.last_seq > 0)
            .map(|log| Position::new(log.epoch.clone(), log.last_seq)))
    }
}

/// What `log` says after `after` (shared by every history kept as a ring).
fn read(log: &Log, after: &Position, limit: usize) -> History {
    if after.epoch != log.epoch {
        return History::Gap {
            reason: GapReason::EpochChanged,
            retained: retained(log, limit),
        };
    }
    if after.seq > log.last_seq {
        // A position this history never handed out.
        return History::Gap {
            reason: GapReason::Malformed,
            retained: Vec::new(),
        };
    }
    let first = log
        .ring
        .front()
        .and_then(|e| e.position.as_ref())
        .map_or(log.last_seq + 1, |p| p.seq);
    if after.seq + 1 < first {
        return History::Gap {
            reason: GapReason::Expired,
            retained: retained(log, limit),
        };
    }
    let skip = (after.seq + 1 - first) as usize;
    History::Complete(log.ring.iter().skip(skip).take(limit).cloned().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(b: &MemoryBroker, topic: &str, n: u64) -> Vec<Arc<SharedEvent>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        (0..n)
            .map(|i| {
                rt.block_on(b.publish(NewEvent::new(topic, "t", serde_json::json!({ "i": i }))))
                    .unwrap()
            })
            .collect()
    }

    fn subscribe(b: &MemoryBroker, topic: &str) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(b.subscribe(topic)).unwrap();
    }

    fn history(b: &MemoryBroker, topic: &str, after: &Position) -> History {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(b.history(topic, after, 100)).unwrap()
    }

    fn seqs(events: &[Arc<SharedEvent>]) -> Vec<u64> {
        events
            .iter()
            .map(|e| e.position.as_ref().unwrap().seq)
            .collect()
    }

    #[test]
    fn positions_count_from_one_per_topic_in_one_epoch() {
        let b = MemoryBroker::new(10, Duration::from_secs(60));
        let a = publish(&b, "a", 3);
        let other = publish(&b, "b", 1);
        assert_eq!(seqs(&a), vec![1, 2, 3]);
        assert_eq!(seqs(&other), vec![1]);
        assert_ne!(
            a[0].position.as_ref().unwrap().epoch,
            other[0].position.as_ref().unwrap().epoch
        );
    }

    #[test]
    fn the_head_is_the_latest_position_of_a_history() {
        let b = MemoryBroker::new(2, Duration::from_secs(60));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(rt.block_on(b.head("t")).unwrap(), None);
        let events = publish(&b, "t", 3);
        // The ring holds two; the head is the last position handed out.
        assert_eq!(rt.block_on(b.head("t")).unwrap(), events[2].position);
        assert_eq!(rt.block_on(b.head("other")).unwrap(), None);
    }

    #[test]
    fn history_resumes_after_a_position_and_says_when_it_cannot() {
        let b = MemoryBroker::new(5, Duration::from_secs(60));
        let events = publish(&b, "t", 8);
        let epoch = events[0].position.as_ref().unwrap().epoch.clone();
        match history(&b, "t", &Position::new(epoch.clone(), 5)) {
            History::Complete(e) => assert_eq!(seqs(&e), vec![6, 7, 8]),
            other => panic!("{other:?}"),
        }
        match history(&b, "t", &Position::new(epoch.clone(), 8)) {
            History::Complete(e) => assert!(e.is_empty()),
            other => panic!("{other:?}"),
        }
        // Events 1..=3 fell out of the ring of 5: resuming after 1 would skip 2 and 3.
        match history(&b, "t", &Position::new(epoch.clone(), 1)) {
            History::Gap {
                reason: GapReason::Expired,
                retained,
            } => assert_eq!(seqs(&retained), vec![4, 5, 6, 7, 8]),
            other => panic!("{other:?}"),
        }
        // Resuming after 3 is exact: 4 is the oldest retained.
        assert!(
            matches!(history(&b, "t", &Position::new(epoch.clone(), 3)), History::Complete(e) if e.len() == 5)
        );
        assert!(matches!(
            history(&b, "t", &Position::new("other", 3)),
            History::Gap {
                reason: GapReason::EpochChanged,
                ..
            }
        ));
        assert!(matches!(
            history(&b, "t", &Position::new(epoch, 99)),
            History::Gap {
                reason: GapReason::Malformed,
                ..
            }
        ));
        assert!(matches!(
            history(&b, "never", &Position::new("x", 1)),
            History::Gap {
                reason: GapReason::EpochChanged,
                ..
            }
        ));
    }

    #[test]
    fn the_least_recently_published_history_is_evicted_beyond_max_topics() {
        let evictions = prometheus::IntCounter::new("e", "e").unwrap();
        let b = MemoryBroker::new(5, Duration::from_secs(60)).with_max_topics(2, evictions.clone());
        let a = publish(&b, "a", 2);
        publish(&b, "b", 1);
        // `a` is published to again: `b` is now the least recent.
        let a3 = publish(&b, "a", 1);
        publish(&b, "c", 1);
        assert_eq!(evictions.get(), 1);
        assert_eq!(b.lock().by_topic.len(), 2);
        assert_eq!(b.lock().by_publish.len(), 2);
        // `a` kept its history and epoch.
        assert_eq!(a3[0].position.as_ref().unwrap().seq, 3);
        match history(&b, "a", a[0].position.as_ref().unwrap()) {
            History::Complete(e) => assert_eq!(seqs(&e), vec![2, 3]),
            other => panic!("{other:?}"),
        }
        // `b` is gone: resuming there is a gap, and it starts over.
        assert!(matches!(
            history(&b, "b", &Position::new("whatever", 1)),
            History::Gap {
                reason: GapReason::EpochChanged,
                ..
            }
        ));
        let b_again = publish(&b, "b", 1);
        assert_eq!(b_again[0].position.as_ref().unwrap().seq, 1);
        assert_eq!(evictions.get(), 2, "`a` (now least recent) made room");
        // Many topics: never more than the cap.
        for i in 0..100 {
            publish(&b, &format!("t{i}"), 1);
        }
        assert_eq!(b.lock().by_topic.len(), 2);
        assert_eq!(b.lock().by_publish.len(), 2);
        assert_eq!(evictions.get(), 102);
    }

    #[test]
    fn a_topic_read_here_keeps_its_lineage_when_its_history_goes() {
        let evictions = prometheus::IntCounter::new("e", "e").unwrap();
        let b = MemoryBroker::new(5, Duration::from_secs(60)).with_max_topics(2, evictions.clone());
        subscribe(&b, "mine");
        let first = publish(&b, "mine", 2);
        let epoch = first[0].position.as_ref().unwrap().epoch.clone();
        // Two other topics push its events out.
        publish(&b, "x", 1);
        publish(&b, "y", 1);
        assert_eq!(evictions.get(), 1);
        assert_eq!(b.lock().by_publish.len(), 2, "still two histories at most");
        // Its live readers go on: the next event follows the last.
        let next = publish(&b, "mine", 1);
        let position = next[0].position.as_ref().unwrap();
        assert_eq!((position.epoch.as_str(), position.seq), (epoch.as_str(), 3));
        // Resuming from before the eviction: those events expired, the
        // lineage did not change.
        match history(&b, "mine", first[0].position.as_ref().unwrap()) {
            History::Gap {
                reason: GapReason::Expired,
                retained,
            } => assert_eq!(seqs(&retained), vec![3]),
            other => panic!("{other:?}"),
        }
        match history(&b, "mine", first[1].position.as_ref().unwrap()) {
            History::Complete(e) => assert_eq!(seqs(&e), vec![3]),
            other => panic!("{other:?}"),
        }
        // Once nobody reads it, an evicted topic loses its lineage too.
        publish(&b, "x", 1);
        publish(&b, "y", 1);
        b.release("mine");
        assert!(!b.lock().by_topic.contains_key("mine"));
        let again = publish(&b, "mine", 1);
        assert_ne!(again[0].position.as_ref().unwrap().epoch, epoch);
    }

    #[test]
    fn a_release_from_inside_a_dispatch_does_not_wait_for_the_publish() {
        // The hub releases a topic from inside a dispatch when it cuts the
        // topic's last subscriber off; `publish` dispatches under its lock.
        struct Releasing(OnceLock<Arc<MemoryBroker>>);
        impl EventSink for Releasing {
            fn dispatch(&self, _event: Arc<SharedEvent>) {
                self.0.get().unwrap().release("t");
            }
            fn topics(&self) -> Vec<String> {
                Vec::new()
            }
            fn wants(&self, _topic: &str) -> bool {
                false
            }
        }
        let b = Arc::new(MemoryBroker::new(5, Duration::from_secs(60)));
        let sink = Arc::new(Releasing(OnceLock::new()));
        let _ = sink.0.set(b.clone());
        b.start(sink);
        subscribe(&b, "t");
        publish(&b, "t", 2);
        assert!(!b.lock().subscribed.contains("t"));
    }

    #[test]
    fn a_topic_read_here_keeps_its_lineage_through_silence() {
        let b = MemoryBroker::new(5, Duration::from_millis(30));
        subscribe(&b, "t");
        let first = publish(&b, "t", 1);
        std::thread::sleep(Duration::from_millis(50));
        let after = publish(&b, "t", 1);
        assert_eq!(
            after[0].position.as_ref().unwrap().epoch,
            first[0].position.as_ref().unwrap().epoch
        );
        assert_eq!(after[0].position.as_ref().unwrap().seq, 2);
    }

    #[test]
    fn an_expired_topic_starts_a_new_epoch() {
        let b = MemoryBroker::new(5, Duration::from_millis(30));
        let first = publish(&b, "t", 1);
        std::thread::sleep(Duration::from_millis(40));
        let second = publish(&b, "t", 1);
        let (p1, p2) = (
            first[0].position.clone().unwrap(),
            second[0].position.clone().unwrap(),
        );
        assert_ne!(p1.epoch, p2.epoch);
        assert_eq!(p2.seq, 1);
        assert!(matches!(
            history(&b, "t", &p1),
            History::Gap {
                reason: GapReason::EpochChanged,
                ..
            }
        ));
    }
}
