//! The in-memory broker: one node, no Redis. Publishing records the event
//! in its topic's ring and hands it straight to this node's sink.

use std::collections::{HashMap, VecDeque};
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
}

pub struct MemoryBroker {
    sink: OnceLock<Arc<dyn EventSink>>,
    logs: Mutex<HashMap<String, Log>>,
    history_size: usize,
    history_ttl: Duration,
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new(1000, Duration::from_secs(86400))
    }
}

impl MemoryBroker {
    /// Keeps `history_size` events per topic, for `history_ttl` after the
    /// topic's last event.
    pub fn new(history_size: usize, history_ttl: Duration) -> Self {
        Self {
            sink: OnceLock::new(),
            logs: Mutex::new(HashMap::new()),
            history_size: history_size.max(1),
            history_ttl,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Log>> {
        self.logs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops the logs idle for longer than the TTL (their epoch ends).
    fn expire(&self, logs: &mut HashMap<String, Log>) {
        let ttl = self.history_ttl;
        logs.retain(|_, log| log.touched.elapsed() < ttl);
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
        if let Some(log) = logs.get(&event.topic) {
            if log.touched.elapsed() >= self.history_ttl {
                logs.remove(&event.topic);
            }
        }
        let log = logs.entry(event.topic.clone()).or_insert_with(|| Log {
            epoch: Position::new_epoch(),
            last_seq: 0,
            ring: VecDeque::new(),
            touched: Instant::now(),
        });
        log.last_seq += 1;
        log.touched = Instant::now();
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

    async fn subscribe(&self, _topic: &str) -> BrokerResult<()> {
        Ok(())
    }

    fn release(&self, _topic: &str) {}

    fn readiness(&self) -> Result<(), String> {
        Ok(())
    }

    async fn history(&self, topic: &str, after: &Position, limit: usize) -> BrokerResult<History> {
        let mut logs = self.lock();
        self.expire(&mut logs);
        let Some(log) = logs.get(topic) else {
            return Ok(History::Gap {
                reason: GapReason::EpochChanged,
                retained: Vec::new(),
            });
        };
        Ok(read(log, after, limit))
    }

    async fn head(&self, topic: &str) -> BrokerResult<Option<Position>> {
        let mut logs = self.lock();
        self.expire(&mut logs);
        Ok(logs
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
