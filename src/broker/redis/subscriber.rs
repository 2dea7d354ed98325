//! The subscriber task: the node's one Pub/Sub connection, kept equal to
//! what the hub wants, drained at once into the hub, probed for silence and
//! rebuilt when lost.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rand::Rng;
use tokio::sync::{mpsc, oneshot};

use super::{Link, Shared};
use crate::event::SharedEvent;
use crate::infra::redis::Redis;

/// How many channels one SUBSCRIBE or UNSUBSCRIBE names.
const BATCH: usize = 1000;

pub(super) struct SubscriberTask {
    pub(super) redis: Redis,
    pub(super) shared: Arc<Shared>,
    /// This node's probe channel.
    pub(super) probe_channel: String,
}

impl SubscriberTask {
    pub(super) async fn run(self) {
        let mut attempt: u32 = 0;
        let mut reconnecting = false;
        loop {
            let served = if self.redis.keys().tagged() {
                super::cluster::serve(&self, &mut attempt, reconnecting).await
            } else {
                self.connect_and_serve(&mut attempt, reconnecting).await
            };
            let reason = match served {
                Ok(()) => return,
                Err(reason) => reason,
            };
            self.shared.confirmed().clear();
            self.shared.metrics.redis_subscribed_channels.set(0);
            self.shared.set_link(Link::Down(reason.clone()));
            self.shared.metrics.redis_reconnects_total.inc();
            // Capped exponential backoff with full jitter, so a fleet does
            // not reconnect in lockstep.
            let cap = self.redis.config().max_backoff.as_millis().max(1) as u64;
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
            reconnecting = true;
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
    }

    /// Serves one Pub/Sub connection until it fails; `Err` says why.
    /// `reconnecting`: an earlier connection was lost, and with it whatever
    /// was published meanwhile.
    async fn connect_and_serve(&self, attempt: &mut u32, reconnecting: bool) -> Result<(), String> {
        let pubsub = self
            .redis
            .pubsub()
            .await
            .map_err(|e| e.cause().to_owned())?;
        let (mut sink, mut stream) = pubsub.split();
        self.timed(sink.subscribe(&self.probe_channel)).await?;
        self.shared.set_link(Link::Up);
        *attempt = 0;
        tracing::info!("redis pub/sub connected");

        // The reader drains the connection into a bounded queue and reports
        // its end; the dispatcher decodes what the queue holds into the
        // hub. The reader only moves messages, so redis-rs's own (unbounded)
        // buffer stays empty while the node has any CPU at all; when the
        // node cannot keep up the queue fills, and a full queue ends the
        // connection (counted): the node reconnects and each stream reads
        // what it missed from history, instead of the node buffering
        // without bound.
        let (ended_tx, mut ended_rx) = oneshot::channel::<()>();
        // `redis.pubsub_queue_messages`: a full queue ends the connection
        // (`subgate_pubsub_overflows_total`).
        let queued = self.redis.config().pubsub_queue.max(1);
        let (queue_tx, mut queue_rx) = mpsc::channel::<redis::Msg>(queued);
        let reader = {
            let shared = self.shared.clone();
            let probe_channel = self.probe_channel.clone();
            tokio::spawn(async move {
                while let Some(msg) = stream.next().await {
                    if msg.get_channel_name() == probe_channel {
                        if let Ok(seq) = std::str::from_utf8(msg.get_payload_bytes())
                            .unwrap_or("")
                            .parse::<u64>()
                        {
                            shared.probe_seen.fetch_max(seq, Ordering::SeqCst);
                        }
                        continue;
                    }
                    if let Err(full) = queue_tx.try_send(msg) {
                        if matches!(full, mpsc::error::TrySendError::Full(_)) {
                            shared.metrics.pubsub_overflows_total.inc();
                            tracing::warn!(
                                queued,
                                "redis pub/sub: the node fell behind its bus; reconnecting to catch up from history"
                            );
                        }
                        break;
                    }
                }
                let _ = ended_tx.send(());
            })
        };
        let dispatcher = {
            let shared = self.shared.clone();
            tokio::spawn(async move {
                while let Some(msg) = queue_rx.recv().await {
                    shared.metrics.pubsub_queue.set(queue_rx.len() as i64);
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
                shared.metrics.pubsub_queue.set(0);
            })
        };
        let _abort_dispatcher = AbortOnDrop(dispatcher);
        let _abort_reader = AbortOnDrop(reader);

        let probe_interval = self.redis.config().probe_interval;
        let mut probe = tokio::time::interval(probe_interval);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut probe_sent: u64 = self.shared.probe_seen.load(Ordering::SeqCst);
        let mut probe_sent_at: Option<Instant> = None;
        // Everything the hub wants is missing on a new connection.
        self.reconcile(&mut sink, true).await?;
        // Events published while the link was down were kept in history
        // but never heard here: each topic's latest event is handed out
        // again, so every stream compares it with where it stands and
        // reads what it missed, even if nothing new is published.
        let _resync = reconnecting.then(|| AbortOnDrop(tokio::spawn(self.resync())));
        loop {
            tokio::select! {
                _ = &mut ended_rx => return Err("the connection closed".into()),
                _ = self.shared.wake.notified() => self.reconcile(&mut sink, false).await?,
                _ = probe.tick() => {
                    let seen = self.shared.probe_seen.load(Ordering::SeqCst);
                    if let Some(at) = probe_sent_at {
                        if seen < probe_sent && at.elapsed() >= probe_interval * 2 {
                            self.shared.metrics.redis_probe_failures_total.inc();
                            return Err("the probe did not come back: pub/sub is silent".into());
                        }
                    }
                    if seen >= probe_sent {
                        probe_sent += 1;
                        probe_sent_at = Some(Instant::now());
                        let mut publish = redis::cmd("PUBLISH");
                        publish.arg(&self.probe_channel).arg(probe_sent);
                        let sent: Result<i64, _> = self.redis.call("probe", &publish).await;
                        if sent.is_err() {
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

    /// Hands out the latest event of every subscribed topic again, marked
    /// as a resync point, in batches of [`BATCH`] topics per round trip.
    fn resync(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let redis = self.redis.clone();
        let shared = self.shared.clone();
        async move {
            let topics: Vec<String> = shared.confirmed().iter().cloned().collect();
            for chunk in topics.chunks(BATCH) {
                match super::latest_events(&redis, chunk).await {
                    Ok(events) => {
                        let Some(sink) = shared.sink.get() else {
                            return;
                        };
                        for event in events {
                            sink.dispatch(event.resync());
                        }
                    }
                    Err(e) => {
                        // The next event of each topic still fills its
                        // hole; only an idle topic waits for one.
                        tracing::warn!(error = %e, "redis: could not resync topics after reconnecting");
                        return;
                    }
                }
            }
        }
    }

    /// A command on the Pub/Sub connection, under the layer's deadline.
    async fn timed<T>(
        &self,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, String> {
        self.redis
            .bounded(fut)
            .await
            .map_err(|e| e.cause().to_owned())
    }

    /// The channels of `topics`.
    fn channels(&self, topics: &[String]) -> Vec<String> {
        let keys = self.redis.keys();
        topics.iter().map(|t| keys.topic_channel(t)).collect()
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
        // A topic to remove stops counting as confirmed at once, under the
        // same lock as the decision: a subscribe arriving while its
        // UNSUBSCRIBE is on the way then waits for the next pass to
        // subscribe it again, instead of trusting a subscription that is
        // about to end.
        let wanted: Option<HashSet<String>> = full.then(|| hub.topics().into_iter().collect());
        let (to_add, to_remove) = {
            let mut confirmed = self.shared.confirmed();
            let (add, remove): (Vec<String>, Vec<String>) = if let Some(wanted) = wanted {
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
            for topic in &remove {
                confirmed.remove(topic);
            }
            (add, remove)
        };
        for chunk in to_add.chunks(BATCH) {
            self.timed(sink.subscribe(self.channels(chunk))).await?;
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
            self.timed(sink.unsubscribe(self.channels(chunk))).await?;
        }
        self.shared.settle_waiters(hub.as_ref());
        Ok(())
    }
}

pub(super) struct AbortOnDrop(pub(super) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
