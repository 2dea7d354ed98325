//! `--churn R`: while the measured subscriptions are measured, a client of
//! its own subscribes to R fresh topics a second and unsubscribes from each
//! `--churn-lifetime-ms` later, on `--churn-connections` graphql-transport-ws
//! connections (`events(topics: [fresh topic])`, then `complete`). Nothing
//! is ever published to those topics, and nothing the churn does counts
//! toward the measured deliveries: the report puts what it achieved
//! (subscribes and unsubscribes a second, errors, the round trip of a
//! `ping` on its connections) beside the measured latency, so that one sees
//! whether churn stalls delivery on the other topics.
//!
//! It runs on a thread of its own with a runtime of its own, so that its
//! thousands of frames a second do not delay the publisher's timers.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::client::message_type;
use crate::net;
use crate::setup::EVENTS_QUERY;

/// Bounds opening a churn connection (handshake and `connection_ack`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often each churn connection measures a `ping`'s round trip.
const PING_EVERY: Duration = Duration::from_millis(500);
/// Churn subscriptions one connection holds at once, at most, when
/// `--churn-connections` is not given: half the node's default
/// `websocket.max_subscriptions_per_connection` (100).
const PER_CONNECTION: f64 = 50.0;
/// A connection that falls further behind its schedule than this skips the
/// slots it missed (counted as `behind`) instead of bursting to catch up.
const MAX_BEHIND: Duration = Duration::from_millis(200);

/// What `--churn` was asked to do.
#[derive(Debug, Clone)]
pub struct ChurnPlan {
    /// Tells this run's churn topics from any other's.
    pub run: String,
    pub urls: Vec<String>,
    /// Topics per second: subscribes, and as many unsubscribes.
    pub rate: f64,
    pub connections: usize,
    pub lifetime: Duration,
    /// `Bearer …`: a topic nobody has published to is readable by any
    /// authenticated caller, and by nobody else.
    pub authorization: String,
}

impl ChurnPlan {
    /// Connections enough that none holds more than [`PER_CONNECTION`]
    /// churn subscriptions at once, and at least two.
    pub fn default_connections(rate: f64, lifetime: Duration) -> usize {
        ((rate * lifetime.as_secs_f64() / PER_CONNECTION).ceil() as usize).max(2)
    }
}

/// What the churn did, for the report.
#[derive(Debug, Default, Serialize)]
pub struct ChurnReport {
    pub target_rate: f64,
    pub connections: usize,
    /// Connections open when the churn ended.
    pub connections_open_at_end: u64,
    pub lifetime_ms: f64,
    /// From the start of the churn to its stop.
    pub seconds: f64,
    pub subscribes: u64,
    /// Every subscribe is let go of: on its schedule, or when the churn
    /// stops.
    pub unsubscribes: u64,
    /// Over `seconds`: those let go of at the stop are not in the rate.
    pub subscribes_per_second: f64,
    pub unsubscribes_per_second: f64,
    /// Schedule slots skipped because a connection fell behind (its socket
    /// would not take the frames).
    pub behind: u64,
    /// Errors the nodes answered a churn subscription with, by code.
    pub errors: BTreeMap<String, u64>,
    /// Churn connections that could not be opened, by reason.
    pub connect_errors: BTreeMap<String, u64>,
    /// Churn connections the nodes or the network ended, by close code.
    pub closes: BTreeMap<String, u64>,
    /// Round trips of `ping` → `pong` on the churn connections while
    /// churning: how long a frame waits behind the churn on the node.
    pub ping_rtt_ms: Rtt,
}

#[derive(Debug, Default, Serialize)]
pub struct Rtt {
    pub count: u64,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl ChurnReport {
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum::<u64>()
            + self.connect_errors.values().sum::<u64>()
            + self.closes.values().sum::<u64>()
    }
}

/// What every churn connection adds to.
struct Counters {
    subscribes: AtomicU64,
    unsubscribes: AtomicU64,
    behind: AtomicU64,
    open: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    connect_errors: Mutex<BTreeMap<String, u64>>,
    closes: Mutex<BTreeMap<String, u64>>,
    rtt: Mutex<Histogram<u64>>,
}

impl Counters {
    fn count(map: &Mutex<BTreeMap<String, u64>>, key: &str) {
        *map.lock().entry(key.to_owned()).or_default() += 1;
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Waiting,
    Churning,
    Stopping,
}

/// The churn client, connected and waiting for [`Churn::begin`].
pub struct Churn {
    phase: watch::Sender<Phase>,
    thread: std::thread::JoinHandle<ChurnReport>,
}

impl Churn {
    /// Opens the churn connections on a thread of their own; returns once
    /// every one is open (or failed), before any churn.
    pub async fn connect(plan: ChurnPlan) -> Result<Self, String> {
        let (phase, phase_rx) = watch::channel(Phase::Waiting);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("churn".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the churn");
                runtime.block_on(run(plan, phase_rx, ready_tx))
            })
            .map_err(|e| format!("starting the churn: {e}"))?;
        ready_rx
            .await
            .map_err(|_| "the churn ended before its connections were open".to_owned())?;
        Ok(Self { phase, thread })
    }

    /// Starts churning.
    pub fn begin(&self) {
        self.phase.send_replace(Phase::Churning);
    }

    /// Stops churning: every churn subscription still held is completed
    /// and the connections closed; what the churn did.
    pub async fn stop(self) -> Result<ChurnReport, String> {
        self.phase.send_replace(Phase::Stopping);
        let thread = self.thread;
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .map_err(|e| format!("the churn: {e}"))?
            .map_err(|_| "the churn panicked".to_owned())
    }
}

async fn run(
    plan: ChurnPlan,
    phase: watch::Receiver<Phase>,
    ready: tokio::sync::oneshot::Sender<()>,
) -> ChurnReport {
    let counters = Arc::new(Counters {
        subscribes: AtomicU64::new(0),
        unsubscribes: AtomicU64::new(0),
        behind: AtomicU64::new(0),
        open: AtomicU64::new(0),
        errors: Mutex::new(BTreeMap::new()),
        connect_errors: Mutex::new(BTreeMap::new()),
        closes: Mutex::new(BTreeMap::new()),
        // 1 µs to 1 hour at 3 significant digits.
        rtt: Mutex::new(Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")),
    });
    let opened = futures_util::future::join_all((0..plan.connections).map(|c| {
        let url = plan.urls[c % plan.urls.len()].clone();
        let authorization = plan.authorization.clone();
        async move { open(&url, c, &authorization).await }
    }))
    .await;
    let mut tasks = tokio::task::JoinSet::new();
    let per_connection = plan.rate / plan.connections as f64;
    for (c, socket) in opened.into_iter().enumerate() {
        match socket {
            Ok(socket) => {
                counters.open.fetch_add(1, Ordering::Relaxed);
                let lane = Lane {
                    topic_prefix: format!("loadgen.{}.churn.{c}", plan.run),
                    interval: Duration::from_secs_f64(1.0 / per_connection),
                    // Connections take turns: their subscribes interleave.
                    offset: Duration::from_secs_f64(c as f64 / plan.rate),
                    lifetime: plan.lifetime,
                    counters: counters.clone(),
                };
                tasks.spawn(lane.run(socket, phase.clone()));
            }
            Err(reason) => Counters::count(&counters.connect_errors, &reason),
        }
    }
    let _ = ready.send(());
    // The rates are those of the churning itself: from `begin` to `stop`,
    // without the subscriptions let go of when it stops.
    let mut watching = phase.clone();
    let _ = watching.wait_for(|p| *p != Phase::Waiting).await;
    let since = Instant::now();
    let _ = watching.wait_for(|p| *p == Phase::Stopping).await;
    let seconds = since.elapsed().as_secs_f64();
    let churned = |n: &AtomicU64| n.load(Ordering::Relaxed) as f64 / seconds.max(1e-9);
    let subscribes_per_second = churned(&counters.subscribes);
    let unsubscribes_per_second = churned(&counters.unsubscribes);
    while tasks.join_next().await.is_some() {}
    let subscribes = counters.subscribes.load(Ordering::Relaxed);
    let unsubscribes = counters.unsubscribes.load(Ordering::Relaxed);
    let ms = |us: u64| us as f64 / 1000.0;
    let rtt = counters.rtt.lock().clone();
    let errors = counters.errors.lock().clone();
    let connect_errors = counters.connect_errors.lock().clone();
    let closes = counters.closes.lock().clone();
    ChurnReport {
        target_rate: plan.rate,
        connections: plan.connections,
        connections_open_at_end: counters.open.load(Ordering::Relaxed),
        lifetime_ms: plan.lifetime.as_secs_f64() * 1000.0,
        seconds,
        subscribes,
        unsubscribes,
        subscribes_per_second,
        unsubscribes_per_second,
        behind: counters.behind.load(Ordering::Relaxed),
        errors,
        connect_errors,
        closes,
        ping_rtt_ms: if rtt.is_empty() {
            Rtt::default()
        } else {
            Rtt {
                count: rtt.len(),
                p50: ms(rtt.value_at_quantile(0.5)),
                p99: ms(rtt.value_at_quantile(0.99)),
                max: ms(rtt.max()),
            }
        },
    }
}

/// Opens churn connection `index`: a graphql-transport-ws socket whose
/// `connection_init` has been acknowledged.
async fn open(
    url: &str,
    index: usize,
    authorization: &str,
) -> Result<WebSocketStream<TcpStream>, String> {
    let opening = async {
        let mut request = format!("{}/graphql/ws", url.replacen("http://", "ws://", 1))
            .into_client_request()
            .map_err(|_| "bad_url".to_owned())?;
        request.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("graphql-transport-ws"),
        );
        let stream = net::connect(url, index)
            .await
            .map_err(|e| net::error_label(&e))?;
        // Subscribes and completes are small frames sent on a schedule:
        // out at once, not held back for more.
        let _ = stream.set_nodelay(true);
        let (mut socket, _) = tokio_tungstenite::client_async(request, stream)
            .await
            .map_err(|_| "handshake".to_owned())?;
        let init = json!({"type": "connection_init", "payload": {"authorization": authorization}});
        socket
            .send(Message::text(init.to_string()))
            .await
            .map_err(|_| "reset".to_owned())?;
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) if message_type(&text) == Some("connection_ack") => {
                    return Ok(socket)
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    return Err("closed_before_ack".to_owned())
                }
                Some(Ok(_)) => {}
            }
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, opening)
        .await
        .unwrap_or_else(|_| Err("timeout".to_owned()))
}

/// One churn connection's share of the schedule.
struct Lane {
    topic_prefix: String,
    interval: Duration,
    offset: Duration,
    lifetime: Duration,
    counters: Arc<Counters>,
}

impl Lane {
    async fn run(self, mut socket: WebSocketStream<TcpStream>, mut phase: watch::Receiver<Phase>) {
        if phase.wait_for(|p| *p != Phase::Waiting).await.is_err() {
            return;
        }
        let start = Instant::now();
        let mut next_subscribe = start + self.offset;
        let mut next_ping = start + PING_EVERY;
        let mut ping_sent: Option<Instant> = None;
        // Subscriptions held: (when to complete it, operation id).
        let mut held: VecDeque<(Instant, u64)> = VecDeque::new();
        let mut n = 0u64;
        let ended = loop {
            if *phase.borrow() == Phase::Stopping {
                break None;
            }
            let wake = held
                .front()
                .map_or(next_subscribe, |(at, _)| (*at).min(next_subscribe))
                .min(next_ping);
            tokio::select! {
                biased;
                changed = phase.changed() => {
                    if changed.is_err() {
                        break None;
                    }
                    continue;
                }
                message = socket.next() => match message {
                    Some(Ok(Message::Text(text))) => self.on_text(&text, &mut ping_sent),
                    Some(Ok(Message::Close(frame))) => {
                        break Some(frame.map_or_else(|| "1005".to_owned(), |f| u16::from(f.code).to_string()));
                    }
                    Some(Ok(_)) => {}
                    None | Some(Err(_)) => break Some("reset".to_owned()),
                },
                _ = tokio::time::sleep_until(wake) => {
                    let now = Instant::now();
                    if now > next_subscribe + MAX_BEHIND {
                        let missed = ((now - next_subscribe).as_secs_f64()
                            / self.interval.as_secs_f64()) as u64;
                        self.counters.behind.fetch_add(missed, Ordering::Relaxed);
                        next_subscribe += self.interval.mul_f64(missed as f64);
                    }
                    // Every frame due now, fed together and flushed once.
                    let mut frames = Vec::new();
                    while next_subscribe <= now {
                        frames.push(self.subscribe(n));
                        held.push_back((now + self.lifetime, n));
                        n += 1;
                        next_subscribe += self.interval;
                    }
                    let subscribes = frames.len() as u64;
                    let mut unsubscribes = 0;
                    while held.front().is_some_and(|(at, _)| *at <= now) {
                        let (_, id) = held.pop_front().expect("a held subscription");
                        frames.push(complete(id));
                        unsubscribes += 1;
                    }
                    if now >= next_ping {
                        if ping_sent.is_none() {
                            frames.push(json!({"type": "ping"}).to_string());
                            ping_sent = Some(now);
                        }
                        next_ping = now + PING_EVERY;
                    }
                    if send_all(&mut socket, frames).await.is_err() {
                        break Some("reset".to_owned());
                    }
                    self.counters.subscribes.fetch_add(subscribes, Ordering::Relaxed);
                    self.counters.unsubscribes.fetch_add(unsubscribes, Ordering::Relaxed);
                }
            }
        };
        match ended {
            None => {
                // Stopping: let go of what is still held, then close.
                let frames: Vec<String> = held.drain(..).map(|(_, id)| complete(id)).collect();
                let count = frames.len() as u64;
                if send_all(&mut socket, frames).await.is_ok() {
                    self.counters
                        .unsubscribes
                        .fetch_add(count, Ordering::Relaxed);
                }
                let _ = socket.close(None).await;
            }
            Some(how) => Counters::count(&self.counters.closes, &how),
        }
        self.counters.open.fetch_sub(1, Ordering::Relaxed);
    }

    fn subscribe(&self, n: u64) -> String {
        json!({"id": n.to_string(), "type": "subscribe", "payload": {
            "query": EVENTS_QUERY,
            "variables": {"topics": [format!("{}.{n}", self.topic_prefix)]},
        }})
        .to_string()
    }

    fn on_text(&self, text: &str, ping_sent: &mut Option<Instant>) {
        match message_type(text) {
            Some("pong") => {
                if let Some(sent) = ping_sent.take() {
                    let us = sent.elapsed().as_micros() as u64;
                    let _ = self.counters.rtt.lock().record(us.max(1));
                }
            }
            Some("error") => {
                let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
                let code = v
                    .pointer("/payload/0/extensions/code")
                    .and_then(Value::as_str)
                    .unwrap_or("graphql_error");
                Counters::count(&self.counters.errors, code);
            }
            // `next` cannot come (nothing is published to a churn topic);
            // a `complete` from the node ends one the churn ends anyway.
            _ => {}
        }
    }
}

fn complete(id: u64) -> String {
    json!({"id": id.to_string(), "type": "complete"}).to_string()
}

/// Feeds every frame and flushes once: one write for all of them.
async fn send_all(
    socket: &mut WebSocketStream<TcpStream>,
    frames: Vec<String>,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    if frames.is_empty() {
        return Ok(());
    }
    for frame in frames {
        socket.feed(Message::text(frame)).await?;
    }
    socket.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_connections_hold_at_most_fifty_each() {
        let ms = Duration::from_millis;
        assert_eq!(ChurnPlan::default_connections(10.0, ms(100)), 2);
        assert_eq!(ChurnPlan::default_connections(10_000.0, ms(100)), 20);
        assert_eq!(ChurnPlan::default_connections(10_000.0, ms(1000)), 200);
    }
}
