//! Resumable subscriptions: replay from history, then live, with no event
//! twice across the seam and holes in the live stream filled from history.
//!
//! The subscription is opened before the history is read, so nothing
//! published in between is missed; whatever the live stream repeats of the
//! replay is dropped by position. A live event whose position does not
//! follow the last one delivered (Pub/Sub lost a message, say across a
//! reconnect) makes the stream read the history from the last delivered
//! position before going on; a live event of a new epoch (the history was
//! lost, e.g. Redis restarted empty) is a gap, then the new epoch read from
//! its start, so whatever was published since reaches the subscriber once.
//! A resync point (a topic's latest event, handed out again when the bus
//! link returns) triggers the same comparison even if no new event comes.
//! A live stream that has delivered nothing yet compares from where the
//! topic stood when it joined (the hub's last position for the topic, or
//! the broker's head for a topic new to the node), so an event published
//! while the link was down reaches it too.
//! What cannot be recovered is said out loud as a [`Delivery::Gap`], never
//! papered over.

use std::collections::VecDeque;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::stream::{self, BoxStream, StreamExt};

use super::{Cutoff, Hub, Subscription};
use crate::broker::{BrokerError, GapReason, History};
use crate::event::{Position, SharedEvent};

/// One item of a resumable stream.
#[derive(Debug, Clone)]
pub enum Delivery {
    Event(Arc<SharedEvent>),
    /// Events were lost here and could not be recovered.
    Gap(GapReason),
    /// The subscriber may no longer read the topic (its readers rule
    /// changed); the stream ends after this.
    Revoked,
}

/// Asks again whether a stream's subscriber may still read its topic, when
/// the topic's readers rule changed: `false` only when it definitely may
/// not.
pub type Recheck = Arc<dyn Fn() -> BoxFuture<'static, bool> + Send + Sync>;

/// A resumable subscription.
pub struct Resumed {
    /// Why the requested position could not be resumed from exactly
    /// (`None`: it was, or none was given). Not repeated in `stream`.
    pub gap: Option<GapReason>,
    /// The replay, then the live events.
    pub stream: BoxStream<'static, Delivery>,
}

struct State {
    live: Subscription,
    hub: Arc<Hub>,
    topic: String,
    limit: usize,
    pending: VecDeque<Delivery>,
    /// A live event to look at again once the history read is delivered.
    requeued: Option<Arc<SharedEvent>>,
    last: Option<Position>,
    recheck: Option<Recheck>,
    revoked: bool,
}

impl State {
    /// Queues `event` unless it was already delivered.
    fn accept(&mut self, event: Arc<SharedEvent>) {
        match (&self.last, &event.position) {
            (Some(last), Some(pos)) if last.epoch == pos.epoch && pos.seq <= last.seq => {}
            (_, pos) => {
                if let Some(pos) = pos {
                    self.last = Some(pos.clone());
                }
                self.pending.push_back(Delivery::Event(event));
            }
        }
    }

    /// Fills the hole before `event` from history, then requeues it.
    async fn fill(&mut self, from: Position, event: Arc<SharedEvent>) {
        let before = self.last.clone();
        match self
            .hub
            .broker()
            .history(&self.topic, &from, self.limit)
            .await
        {
            Ok(History::Complete(events)) => {
                for e in events {
                    self.accept(e);
                }
                if self.last == before {
                    // The history had nothing to add: what is missing is gone.
                    self.pending.push_back(Delivery::Gap(GapReason::Expired));
                    self.last = event.position.clone();
                    self.pending.push_back(Delivery::Event(event));
                } else {
                    self.requeued = Some(event);
                }
            }
            Ok(History::Gap { reason, retained }) => {
                self.pending.push_back(Delivery::Gap(reason));
                self.last = None;
                for e in retained {
                    self.accept(e);
                }
                self.requeued = Some(event);
            }
            Err(_) => {
                self.pending
                    .push_back(Delivery::Gap(GapReason::Unavailable));
                self.last = event.position.clone();
                self.pending.push_back(Delivery::Event(event));
            }
        }
    }

    async fn next(mut self) -> Option<(Delivery, Self)> {
        loop {
            if self.revoked {
                return None;
            }
            if let Some(d) = self.pending.pop_front() {
                return Some((d, self));
            }
            let event = match self.requeued.take() {
                Some(e) => e,
                None => self.live.recv().await?,
            };
            if event.event.kind == crate::event::READERS_CHANGED {
                if let Some(recheck) = &self.recheck {
                    if !recheck().await {
                        self.revoked = true;
                        return Some((Delivery::Revoked, self));
                    }
                }
                continue;
            }
            let Some(pos) = event.position.clone() else {
                // Not a position subgate wrote: nothing to order by.
                return Some((Delivery::Event(event), self));
            };
            match self.last.clone() {
                // A stream with no position (it joined a topic with no
                // events yet, or could not read where the topic stood):
                // an event handed out again cannot be placed, and is not
                // taken for a new one.
                None if event.resync => continue,
                None => {
                    self.last = Some(pos);
                    return Some((Delivery::Event(event), self));
                }
                // The history was lost under us (a new epoch): the gap is
                // said, then the new epoch is read from its start, since
                // what it holds before this event was published while this
                // node could not hear it.
                Some(last) if last.epoch != pos.epoch => self.fill(last, event).await,
                Some(last) if pos.seq <= last.seq => continue,
                Some(last) if pos.seq == last.seq + 1 => {
                    self.last = Some(pos);
                    return Some((Delivery::Event(event), self));
                }
                Some(last) => self.fill(last, event).await,
            }
        }
    }
}

impl Hub {
    /// Subscribes to `topic` and, when `after` is given, first replays what
    /// came after that position. `after` is an event id (`EPOCH:SEQ`).
    /// `recheck`, for a topic whose readers may change, is asked whenever
    /// they do.
    pub async fn subscribe_from(
        self: &Arc<Self>,
        topic: &str,
        after: Option<&str>,
        transport: &'static str,
        cutoff: Option<Arc<Cutoff>>,
        recheck: Option<Recheck>,
    ) -> Result<Resumed, BrokerError> {
        // Live first, so that nothing published during the read is missed.
        let live = self.subscribe(topic, transport, cutoff).await?;
        // A live stream starts where the topic stood when it joined: a
        // resync point past that (an event this node missed while its bus
        // link was down) is delivered, one at or before it is not.
        let start = if after.is_none() {
            live.start().cloned()
        } else {
            None
        };
        let mut state = State {
            live,
            hub: self.clone(),
            topic: topic.to_owned(),
            limit: self.history_limit,
            pending: VecDeque::new(),
            requeued: None,
            last: start,
            recheck,
            revoked: false,
        };
        let mut gap = None;
        if let Some(after) = after {
            match Position::parse(after) {
                None => gap = Some(GapReason::Malformed),
                Some(pos) => match self.broker().history(topic, &pos, self.history_limit).await {
                    Ok(History::Complete(events)) => {
                        state.last = Some(pos);
                        for e in events {
                            state.accept(e);
                        }
                    }
                    Ok(History::Gap { reason, retained }) => {
                        gap = Some(reason);
                        for e in retained {
                            state.accept(e);
                        }
                    }
                    Err(_) => gap = Some(GapReason::Unavailable),
                },
            }
        }
        let stream = stream::unfold(state, State::next).boxed();
        Ok(Resumed { gap, stream })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::memory::MemoryBroker;
    use crate::event::NewEvent;
    use crate::telemetry::metrics::Metrics;
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    use std::time::Duration;

    fn hub(history: usize) -> Arc<Hub> {
        Hub::new(
            Arc::new(MemoryBroker::new(history, Duration::from_secs(60))),
            Arc::new(Metrics::new()),
            64,
        )
    }

    async fn publish(hub: &Arc<Hub>, topic: &str, n: usize) -> Vec<String> {
        let mut ids = Vec::new();
        for i in 0..n {
            ids.push(
                hub.publish(NewEvent::new(topic, "t", serde_json::json!({ "i": i })))
                    .await
                    .unwrap()
                    .event
                    .id
                    .clone(),
            );
        }
        ids
    }

    /// A subscription to topic `t` from `position`.
    async fn resume(hub: &Arc<Hub>, position: Option<&str>) -> Resumed {
        hub.subscribe_from("t", position, "test", None, None)
            .await
            .unwrap()
    }

    async fn take(stream: &mut BoxStream<'static, Delivery>, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        for _ in 0..n {
            match tokio::time::timeout(Duration::from_secs(1), stream.next())
                .await
                .unwrap()
                .unwrap()
            {
                Delivery::Event(e) => out.push(e.event.id.clone()),
                Delivery::Gap(reason) => out.push(format!("gap:{}", reason.as_str())),
                Delivery::Revoked => out.push("revoked".into()),
            }
        }
        out
    }

    #[tokio::test]
    async fn resume_replays_what_was_missed_then_goes_live_without_repeats() {
        let hub = hub(100);
        let ids = publish(&hub, "t", 5).await;
        let mut resumed = resume(&hub, Some(&ids[1])).await;
        assert_eq!(resumed.gap, None);
        let live = publish(&hub, "t", 2).await;
        let got = take(&mut resumed.stream, 5).await;
        assert_eq!(got, [&ids[2..], &live[..]].concat());
    }

    #[tokio::test]
    async fn live_only_events_pass_through_and_stay_out_of_history() {
        let hub = hub(100);
        let mut resumed = resume(&hub, None).await;
        let first = publish(&hub, "t", 1).await;
        let typing = hub
            .publish(NewEvent::new("t", "user.typing", serde_json::json!({})).ephemeral())
            .await
            .unwrap();
        let second = publish(&hub, "t", 1).await;
        assert!(typing.position.is_none());
        assert_eq!(
            take(&mut resumed.stream, 3).await,
            vec![first[0].clone(), typing.event.id.clone(), second[0].clone()]
        );
        // Resuming after the first replays the second only: the typing signal was never kept.
        let mut again = resume(&hub, Some(&first[0])).await;
        assert_eq!(take(&mut again.stream, 1).await, second);
        assert_eq!(
            second[0].split(':').nth(1),
            Some("2"),
            "live-only events take no position"
        );
    }

    #[tokio::test]
    async fn a_position_older_than_the_history_is_a_gap_then_what_is_retained() {
        let hub = hub(3);
        let ids = publish(&hub, "t", 6).await;
        let mut resumed = resume(&hub, Some(&ids[0])).await;
        assert_eq!(resumed.gap, Some(GapReason::Expired));
        assert_eq!(take(&mut resumed.stream, 3).await, ids[3..].to_vec());
        let bad = resume(&hub, Some("not-a-position")).await;
        assert_eq!(bad.gap, Some(GapReason::Malformed));
        let other = resume(&hub, Some("ffffff:2")).await;
        assert_eq!(other.gap, Some(GapReason::EpochChanged));
    }

    /// Drops deliveries while `losing` is set, as Pub/Sub does across a
    /// reconnect; the history still has every event.
    struct Lossy {
        sink: Arc<dyn crate::broker::EventSink>,
        losing: Arc<AtomicBool>,
    }

    impl crate::broker::EventSink for Lossy {
        fn dispatch(&self, event: Arc<SharedEvent>) {
            if !self.losing.load(SeqCst) {
                self.sink.dispatch(event);
            }
        }
        fn topics(&self) -> Vec<String> {
            self.sink.topics()
        }
        fn wants(&self, topic: &str) -> bool {
            self.sink.wants(topic)
        }
    }

    struct LossyBroker {
        inner: MemoryBroker,
        losing: Arc<AtomicBool>,
        /// Whether the bus keeps the lineage of the topics read here (the
        /// memory broker does); without, an expired history starts a new
        /// epoch under its readers, as a Redis restarted empty does.
        lineage: bool,
        /// History reads, by the hub and by every stream.
        reads: Arc<std::sync::atomic::AtomicUsize>,
    }

    #[async_trait::async_trait]
    impl crate::broker::Broker for LossyBroker {
        fn start(&self, sink: Arc<dyn crate::broker::EventSink>) {
            self.inner.start(Arc::new(Lossy {
                sink,
                losing: self.losing.clone(),
            }));
        }
        async fn publish(&self, event: NewEvent) -> Result<Arc<SharedEvent>, BrokerError> {
            self.inner.publish(event).await
        }
        async fn subscribe(&self, topic: &str) -> Result<(), BrokerError> {
            if !self.lineage {
                return Ok(());
            }
            self.inner.subscribe(topic).await
        }
        fn release(&self, topic: &str) {
            self.inner.release(topic)
        }
        fn readiness(&self) -> Result<(), String> {
            self.inner.readiness()
        }
        async fn history(
            &self,
            topic: &str,
            after: &Position,
            limit: usize,
        ) -> Result<History, BrokerError> {
            self.reads.fetch_add(1, SeqCst);
            self.inner.history(topic, after, limit).await
        }
        async fn head(&self, topic: &str) -> Result<Option<Position>, BrokerError> {
            self.inner.head(topic).await
        }
    }

    /// A hub whose bus link can be cut (`losing`), its histories living
    /// `ttl`; and a stream on topic `t` that has delivered its first event.
    async fn lossy_hub(ttl: Duration) -> (Arc<Hub>, Arc<AtomicBool>, Resumed) {
        let (hub, losing, resumed, _) = lossy_hub_counting(ttl).await;
        (hub, losing, resumed)
    }

    /// [`lossy_hub`] on a bus that keeps no lineage: its histories' epochs
    /// end with them.
    async fn lossy_hub_without_lineage(ttl: Duration) -> (Arc<Hub>, Arc<AtomicBool>, Resumed) {
        let (hub, losing, resumed, _) = lossy_hub_with(ttl, false).await;
        (hub, losing, resumed)
    }

    /// [`lossy_hub`], and the count of history reads.
    async fn lossy_hub_counting(
        ttl: Duration,
    ) -> (
        Arc<Hub>,
        Arc<AtomicBool>,
        Resumed,
        Arc<std::sync::atomic::AtomicUsize>,
    ) {
        lossy_hub_with(ttl, true).await
    }

    async fn lossy_hub_with(
        ttl: Duration,
        lineage: bool,
    ) -> (
        Arc<Hub>,
        Arc<AtomicBool>,
        Resumed,
        Arc<std::sync::atomic::AtomicUsize>,
    ) {
        let losing = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let broker = LossyBroker {
            inner: MemoryBroker::new(100, ttl),
            losing: losing.clone(),
            lineage,
            reads: reads.clone(),
        };
        let hub = Hub::new(Arc::new(broker), Arc::new(Metrics::new()), 64);
        let mut resumed = resume(&hub, None).await;
        let first = publish(&hub, "t", 1).await;
        assert_eq!(take(&mut resumed.stream, 1).await, first);
        (hub, losing, resumed, reads)
    }

    /// Publishes `n` events to `t` while the link is cut.
    async fn unheard(hub: &Arc<Hub>, losing: &AtomicBool, n: usize) -> Vec<String> {
        losing.store(true, SeqCst);
        let ids = publish(hub, "t", n).await;
        losing.store(false, SeqCst);
        ids
    }

    #[tokio::test]
    async fn a_hole_in_the_live_stream_is_filled_from_history() {
        let (hub, losing, mut resumed) = lossy_hub(Duration::from_secs(60)).await;
        let lost = unheard(&hub, &losing, 3).await;
        let after = publish(&hub, "t", 2).await;
        assert_eq!(
            take(&mut resumed.stream, 5).await,
            [&lost[..], &after[..]].concat()
        );
    }

    #[tokio::test]
    async fn a_hole_is_read_from_history_once_for_every_stream_of_the_topic() {
        let (hub, losing, mut first, reads) = lossy_hub_counting(Duration::from_secs(60)).await;
        // Four more streams that stand where the first does.
        let mut others = Vec::new();
        for _ in 0..4 {
            others.push(resume(&hub, None).await);
        }
        let edge = publish(&hub, "t", 1).await;
        assert_eq!(take(&mut first.stream, 1).await, edge);
        for other in &mut others {
            assert_eq!(take(&mut other.stream, 1).await, edge);
        }
        let lost = unheard(&hub, &losing, 3).await;
        let after = publish(&hub, "t", 2).await;
        let all = [&lost[..], &after[..]].concat();
        assert_eq!(take(&mut first.stream, 5).await, all);
        for other in &mut others {
            assert_eq!(take(&mut other.stream, 5).await, all);
        }
        assert_eq!(reads.load(SeqCst), 1, "one read for five streams");
    }

    #[tokio::test]
    async fn a_resync_point_fills_what_was_missed_for_every_stream() {
        use crate::broker::EventSink;
        let (hub, losing, mut resumed) = lossy_hub(Duration::from_secs(60)).await;
        // The link is down while three events are published; then nothing
        // new comes, only the topic's latest event handed out again.
        let lost = unheard(&hub, &losing, 3).await;
        let mut fresh = resume(&hub, None).await;
        let latest = hub.broker().head("t").await.unwrap().unwrap();
        let before = Position::new(latest.epoch.clone(), latest.seq - 1);
        let History::Complete(events) = hub.broker().history("t", &before, 1).await.unwrap() else {
            panic!("the history holds the latest event")
        };
        hub.dispatch(events[0].resync());
        assert_eq!(take(&mut resumed.stream, 3).await, lost);
        // A stream that joined while the link was down starts where the
        // node stood: it gets what the node missed too, then what follows.
        assert_eq!(take(&mut fresh.stream, 3).await, lost);
        let next = publish(&hub, "t", 1).await;
        assert_eq!(take(&mut fresh.stream, 1).await, next);
        assert_eq!(take(&mut resumed.stream, 1).await, next);
    }

    #[tokio::test]
    async fn a_stream_that_has_delivered_nothing_still_gets_what_its_node_missed() {
        use crate::broker::EventSink;
        // The topic has a history; a stream joins, delivers nothing, the
        // link drops and an event is published unheard: the resync point
        // after the link returns is delivered, not taken for an old event.
        let (hub, losing, _resumed) = lossy_hub(Duration::from_secs(60)).await;
        let mut quiet = resume(&hub, None).await;
        let lost = unheard(&hub, &losing, 1).await;
        let latest = hub.broker().head("t").await.unwrap().unwrap();
        let before = Position::new(latest.epoch.clone(), latest.seq - 1);
        let History::Complete(events) = hub.broker().history("t", &before, 1).await.unwrap() else {
            panic!("the history holds the latest event")
        };
        hub.dispatch(events[0].resync());
        assert_eq!(take(&mut quiet.stream, 1).await, lost);
    }

    #[tokio::test]
    async fn a_new_epoch_is_read_from_its_start() {
        let (hub, losing, mut resumed) =
            lossy_hub_without_lineage(Duration::from_millis(200)).await;
        // The history expires (a new epoch begins) while the link is down.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let unheard = unheard(&hub, &losing, 2).await;
        let heard = publish(&hub, "t", 1).await;
        assert_eq!(
            take(&mut resumed.stream, 4).await,
            [
                &["gap:epoch_changed".to_owned()][..],
                &unheard[..],
                &heard[..]
            ]
            .concat()
        );
    }
}
