//! One subscriber connection: connect over its transport, open its
//! subscriptions (`--subscriptions-per-connection`, each on its own topic),
//! count what arrives for each, and (with `--resume`) reconnect to the next
//! URL and resume each from the last event id it saw.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

use crate::marker::{self, Kind};
use crate::net;
use crate::plan::{Plan, Transport};

/// Bounds the handshake and the wait for each answer to a subscription.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest SSE line kept while it is incomplete; a longer one is an error,
/// not a reason to buffer without bound.
const MAX_SSE_LINE: usize = 1 << 20;
/// The label of a subscription refused because its connection holds the
/// most the node allows (`websocket.max_subscriptions_per_connection`):
/// the GraphQL error code, which the `/ws` refusal is given too.
pub const TOO_MANY_SUBSCRIPTIONS: &str = "TOO_MANY_SUBSCRIPTIONS";

/// The end of the measured phase, as the coordinator said it.
#[derive(Debug)]
pub struct Finish {
    pub published: Vec<u64>,
    pub unacked: Vec<Vec<u64>>,
}

/// Counters and tallies every subscriber of one worker adds to. `attempted`,
/// `open`, `connect_errors`, `reconnects` and `closes` count connections;
/// the rest count subscriptions.
pub struct Shared {
    pub attempted: AtomicU64,
    pub open: AtomicU64,
    pub live: AtomicU64,
    pub received: AtomicU64,
    pub frames: AtomicU64,
    pub reconnects: AtomicU64,
    pub connect_errors: AtomicU64,
    pub refused: AtomicU64,
    pub lost: AtomicU64,
    pub duplicates: AtomicU64,
    pub gaps: AtomicU64,
    pub never_live: AtomicU64,
    pub latency: Mutex<Histogram<u64>>,
    pub connect_error_reasons: Mutex<BTreeMap<String, u64>>,
    pub refused_reasons: Mutex<BTreeMap<String, u64>>,
    pub closes: Mutex<BTreeMap<String, u64>>,
    pub server_errors: Mutex<BTreeMap<String, u64>>,
    /// Per topic, this worker's subscriptions of it not yet live (nor
    /// refused).
    pub waiting: Mutex<HashMap<usize, u32>>,
}

impl Shared {
    pub fn new() -> Self {
        Self {
            attempted: AtomicU64::new(0),
            open: AtomicU64::new(0),
            live: AtomicU64::new(0),
            received: AtomicU64::new(0),
            frames: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            connect_errors: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            never_live: AtomicU64::new(0),
            // 1 µs to 1 hour at 3 significant digits.
            latency: Mutex::new(
                Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds"),
            ),
            connect_error_reasons: Mutex::new(BTreeMap::new()),
            refused_reasons: Mutex::new(BTreeMap::new()),
            closes: Mutex::new(BTreeMap::new()),
            server_errors: Mutex::new(BTreeMap::new()),
            waiting: Mutex::new(HashMap::new()),
        }
    }

    /// A subscription of `topic` is on its way.
    pub fn wait_for(&self, topic: usize) {
        *self.waiting.lock().entry(topic).or_default() += 1;
    }

    /// A subscription of `topic` is live, or will never be.
    fn done_waiting(&self, topic: usize) {
        let mut waiting = self.waiting.lock();
        if let Some(n) = waiting.get_mut(&topic) {
            *n -= 1;
            if *n == 0 {
                waiting.remove(&topic);
            }
        }
    }

    /// The topics still waited on, if at most `limit`.
    pub fn waiting_topics(&self, limit: usize) -> Option<Vec<u32>> {
        let waiting = self.waiting.lock();
        (waiting.len() <= limit).then(|| {
            let mut topics: Vec<u32> = waiting.keys().map(|&t| t as u32).collect();
            topics.sort_unstable();
            topics
        })
    }

    fn count(map: &Mutex<BTreeMap<String, u64>>, key: &str) {
        *map.lock().entry(key.to_owned()).or_default() += 1;
    }
}

/// How one connection ended.
enum End {
    /// The coordinator said the run is over.
    Finished,
    /// No subscription was established: refused, timed out, unauthorized.
    ConnectFailed(String),
    /// An established connection ended: a close code, `reset`, `eof`,
    /// `complete`.
    Closed(String),
}

/// What one subscription saw, across all its connection's attempts.
struct Tally {
    topic: usize,
    live: bool,
    /// The server refused it (an `error` for its operation or its
    /// `channel.subscribe`): it is never live, nothing it missed is lost,
    /// and a reconnect does not ask for it again.
    refused: bool,
    /// The resume position of the last event seen.
    last_id: Option<String>,
    /// Bit `seq` is set once measured event `seq` has arrived.
    seen: Vec<u64>,
}

impl Tally {
    fn new(topic: usize) -> Self {
        Self {
            topic,
            live: false,
            refused: false,
            last_id: None,
            seen: Vec::new(),
        }
    }

    fn mark_seen(&mut self, seq: u64) -> bool {
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if self.seen.len() <= word {
            self.seen.resize(word + 1, 0);
        }
        let fresh = self.seen[word] & (1 << bit) == 0;
        self.seen[word] |= 1 << bit;
        fresh
    }

    fn has(&self, seq: u64) -> bool {
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        self.seen.get(word).is_some_and(|w| w & (1 << bit) != 0)
    }
}

/// Runs subscriber connection `index` until the run finishes, then adds
/// what each of its subscriptions lost to the shared tallies.
pub async fn run(
    index: usize,
    plan: Arc<Plan>,
    shared: Arc<Shared>,
    mut finish: watch::Receiver<Option<Arc<Finish>>>,
) {
    let mut subs: Vec<Tally> = (0..plan.subscriptions_per_connection)
        .map(|j| Tally::new(plan.topic_of(index, j)))
        .collect();
    let mut stream_last_id = None;
    let mut attempt = 0usize;
    let mut first = true;
    loop {
        let url = &plan.urls[(index + attempt) % plan.urls.len()];
        let mut session = Session {
            index,
            plan: &plan,
            shared: &shared,
            subs: &mut subs,
            stream_last_id: &mut stream_last_id,
            first: &mut first,
        };
        let end = session.run(url, &mut finish).await;
        if std::mem::replace(&mut first, false) {
            shared.attempted.fetch_add(1, Ordering::Relaxed);
        }
        match end {
            End::Finished => break,
            End::ConnectFailed(reason) => {
                shared.connect_errors.fetch_add(1, Ordering::Relaxed);
                Shared::count(&shared.connect_error_reasons, &reason);
            }
            End::Closed(code) => Shared::count(&shared.closes, &code),
        }
        if !plan.resume {
            break;
        }
        // Jittered, capped backoff: a drained node's clients must not all
        // land on the next one in the same millisecond.
        let backoff = Duration::from_millis(
            (100u64 << attempt.min(4)).min(2000) / 2 + (rand::random::<u64>() % 500),
        );
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = finish.wait_for(Option::is_some) => break,
        }
        attempt += 1;
        shared.reconnects.fetch_add(1, Ordering::Relaxed);
    }
    let done = finish
        .wait_for(Option::is_some)
        .await
        .ok()
        .and_then(|f| f.clone());
    if let Some(done) = done {
        for tally in &subs {
            settle(tally, &done, &shared);
        }
    }
}

/// Loss: every acknowledged sequence number of the subscription's topic
/// that it never saw (a delivery is one subscription's copy of one event).
/// A refused subscription is counted as refused instead.
fn settle(tally: &Tally, done: &Finish, shared: &Shared) {
    if tally.refused {
        return;
    }
    if !tally.live {
        shared.never_live.fetch_add(1, Ordering::Relaxed);
    }
    let published = done.published.get(tally.topic).copied().unwrap_or(0);
    let unacked = done
        .unacked
        .get(tally.topic)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let lost = (1..=published)
        .filter(|seq| !tally.has(*seq) && unacked.binary_search(seq).is_err())
        .count() as u64;
    shared.lost.fetch_add(lost, Ordering::Relaxed);
}

struct Session<'a> {
    index: usize,
    plan: &'a Plan,
    shared: &'a Shared,
    subs: &'a mut Vec<Tally>,
    /// The SSE stream's resume id (one for all its topics).
    stream_last_id: &'a mut Option<String>,
    first: &'a mut bool,
}

/// The start of a GraphQL-over-WebSocket message: its type and operation id.
#[derive(serde::Deserialize)]
struct Head<'a> {
    #[serde(rename = "type", borrow)]
    ty: &'a str,
    #[serde(default, borrow)]
    id: Option<&'a str>,
}

impl Session<'_> {
    async fn run(&mut self, url: &str, finish: &mut watch::Receiver<Option<Arc<Finish>>>) -> End {
        if finish.borrow().is_some() {
            return End::Finished;
        }
        match self.plan.transport {
            Transport::GraphqlWs | Transport::GraphqlWsLegacy => self.graphql_ws(url, finish).await,
            Transport::Envelope => self.envelope(url, finish).await,
            Transport::Sse | Transport::GraphqlSse => self.sse(url, finish).await,
        }
    }

    fn token(&self) -> Option<&str> {
        let tokens = &self.plan.tokens;
        (!tokens.is_empty()).then(|| tokens[self.index % tokens.len()].as_str())
    }

    fn topic(&self, sub: usize) -> &str {
        &self.plan.topics[self.subs[sub].topic]
    }

    /// The subscriptions still to ask for on a (re)connection: all but the
    /// refused.
    fn wanted(&self) -> Vec<usize> {
        (0..self.subs.len())
            .filter(|&j| !self.subs[j].refused)
            .collect()
    }

    /// The request of GraphQL subscription `sub`.
    fn graphql_payload(&self, sub: usize) -> Value {
        let mut variables = self.plan.variables.clone().unwrap_or_else(|| json!({}));
        if self.plan.events_query {
            variables["topics"] = json!([self.topic(sub)]);
            if let Some(after) = &self.subs[sub].last_id {
                variables["after"] = json!(after);
            }
        }
        json!({"query": self.plan.query, "variables": variables})
    }

    /// The `/ws` request for subscription `sub`.
    fn channel_subscribe(&self, sub: usize) -> String {
        let mut subscribe = json!({"type": "channel.subscribe", "payload": {
            "channel_id": self.topic(sub).trim_start_matches("channel:"),
        }});
        if let Some(after) = &self.subs[sub].last_id {
            subscribe["payload"]["last_event_id"] = json!(after);
        }
        subscribe.to_string()
    }

    /// The first attempt has reached the point where every subscription
    /// has been asked for: the coordinator may start warming up.
    fn subscribed(&mut self) {
        if std::mem::replace(self.first, false) {
            self.shared.attempted.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The server refused subscription `sub`, saying `why`; false when it
    /// was live already or refused before (then it is no refusal).
    fn refuse(&mut self, sub: usize, why: &str) -> bool {
        let Some(tally) = self.subs.get_mut(sub) else {
            return false;
        };
        if tally.live || tally.refused {
            return false;
        }
        tally.refused = true;
        self.shared.refused.fetch_add(1, Ordering::Relaxed);
        Shared::count(&self.shared.refused_reasons, why);
        self.shared.done_waiting(tally.topic);
        true
    }

    /// Counts one frame that may carry an event of this run, for
    /// subscription `sub` when the frame names it (a GraphQL operation id),
    /// else for the subscription of the mark's topic; `id` reads the
    /// frame's resume position when it is needed.
    fn on_event(&mut self, frame: &str, sub: Option<usize>, id: impl FnOnce() -> Option<String>) {
        let Some(mark) = marker::find(frame, &self.plan.run) else {
            return;
        };
        self.shared.frames.fetch_add(1, Ordering::Relaxed);
        let sub = match sub {
            Some(j) if j < self.subs.len() => j,
            _ => match self.subs.iter().position(|t| t.topic == mark.topic) {
                Some(j) => j,
                None => return,
            },
        };
        let tally = &mut self.subs[sub];
        if self.plan.resume {
            if let Some(id) = id() {
                tally.last_id = Some(id);
            }
        }
        match mark.kind {
            Kind::Warmup => {
                if !tally.live {
                    tally.live = true;
                    self.shared.live.fetch_add(1, Ordering::Relaxed);
                    self.shared.done_waiting(tally.topic);
                }
            }
            Kind::Measured => {
                self.shared.received.fetch_add(1, Ordering::Relaxed);
                let latency = marker::now_us().saturating_sub(mark.sent_us).max(1);
                let _ = self.shared.latency.lock().record(latency);
                // Order is not checked against sequence numbers: with
                // publishes in flight concurrently, the topic's order is
                // the order the server took them in, not the order they
                // were sent.
                if !tally.mark_seen(mark.seq) {
                    self.shared.duplicates.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Classifies GraphQL errors inside a result: a history gap, or another
    /// error by its code.
    fn on_graphql_errors(&self, result: &Value) {
        if let Some(Value::Array(errors)) = result.get("errors") {
            for e in errors {
                let code = e
                    .pointer("/extensions/code")
                    .and_then(Value::as_str)
                    .unwrap_or("graphql_error");
                if code == "HISTORY_GAP" {
                    self.shared.gaps.fetch_add(1, Ordering::Relaxed);
                } else {
                    Shared::count(&self.shared.server_errors, code);
                }
            }
        }
    }

    /// Opens a WebSocket to `path` (with `protocol`), from this
    /// connection's source address ([`net`]).
    async fn open_websocket(
        &self,
        url: &str,
        path: &str,
        protocol: Option<&'static str>,
    ) -> Result<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>, End> {
        let target = format!("{}{path}", url.replacen("http://", "ws://", 1));
        let mut request = target
            .into_client_request()
            .map_err(|_| End::ConnectFailed("bad_url".into()))?;
        if let Some(p) = protocol {
            request
                .headers_mut()
                .insert("sec-websocket-protocol", HeaderValue::from_static(p));
        }
        let index = self.index;
        let connected = tokio::time::timeout(CONNECT_TIMEOUT, async {
            let stream = net::connect(url, index)
                .await
                .map_err(|e| net::error_label(&e))?;
            tokio_tungstenite::client_async(request, stream)
                .await
                .map_err(|e| ws_error_label(&e))
        })
        .await;
        match connected {
            Err(_) => Err(End::ConnectFailed("timeout".into())),
            Ok(Err(label)) => Err(End::ConnectFailed(label)),
            Ok(Ok((socket, _))) => Ok(socket),
        }
    }

    /// graphql-transport-ws and the legacy graphql-ws: `connection_init`,
    /// then one operation per subscription (ids `1` to `K`), sent together.
    async fn graphql_ws(
        &mut self,
        url: &str,
        finish: &mut watch::Receiver<Option<Arc<Finish>>>,
    ) -> End {
        let legacy = self.plan.transport == Transport::GraphqlWsLegacy;
        let protocol = if legacy {
            "graphql-ws"
        } else {
            "graphql-transport-ws"
        };
        let mut socket = match self
            .open_websocket(url, "/graphql/ws", Some(protocol))
            .await
        {
            Ok(s) => s,
            Err(end) => return end,
        };
        let init_payload = match self.token() {
            Some(t) => json!({"authorization": format!("Bearer {t}")}),
            None => json!({}),
        };
        let init = json!({"type": "connection_init", "payload": init_payload}).to_string();
        if socket.send(Message::text(init)).await.is_err() {
            return End::ConnectFailed("reset".into());
        }
        let mut established = false;
        let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
        let mut open_guard: Option<OpenGuard> = None;
        let end = loop {
            let text = match self
                .next_text(&mut socket, finish, deadline, established)
                .await
            {
                Ok(Some(text)) => text,
                Ok(None) => continue,
                Err(end) => break end,
            };
            let Ok(head) = serde_json::from_str::<Head>(&text) else {
                continue;
            };
            // Operation `j + 1` is subscription `j`.
            let sub = head
                .id
                .and_then(|id| id.parse::<usize>().ok())
                .and_then(|id| id.checked_sub(1));
            match head.ty {
                "connection_ack" if !established => {
                    let start = if legacy { "start" } else { "subscribe" };
                    // All K in one write: feed each, flush once.
                    let mut failed = false;
                    for j in self.wanted() {
                        let id = (j + 1).to_string();
                        let msg =
                            json!({"id": id, "type": start, "payload": self.graphql_payload(j)});
                        if socket.feed(Message::text(msg.to_string())).await.is_err() {
                            failed = true;
                            break;
                        }
                    }
                    if failed || socket.flush().await.is_err() {
                        break End::ConnectFailed("reset".into());
                    }
                    // graphql-transport-ws has no subscription
                    // acknowledgement: the warm-up marker tells when each
                    // subscription is live.
                    established = true;
                    open_guard = Some(OpenGuard::new(self.shared));
                    self.subscribed();
                }
                "next" | "data" => {
                    if text.contains("\"errors\"") {
                        if let Ok(v) = serde_json::from_str::<Value>(&text) {
                            if let Some(p) = v.get("payload") {
                                self.on_graphql_errors(p);
                            }
                        }
                    }
                    self.on_event(&text, sub, || {
                        serde_json::from_str::<Value>(&text).ok().and_then(|v| {
                            v.pointer("/payload/data/events/id")
                                .and_then(Value::as_str)
                                .map(str::to_owned)
                        })
                    });
                }
                "ping" => {
                    let pong = json!({"type": "pong"}).to_string();
                    let _ = socket.send(Message::text(pong)).await;
                }
                "error" => {
                    // An operation's error ends that operation: before it
                    // was live, the subscription was refused.
                    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                    let code = graphql_error_code(v.get("payload").unwrap_or(&Value::Null));
                    let refused = match sub {
                        Some(j) => self.refuse(j, &code),
                        None => false,
                    };
                    if !refused {
                        Shared::count(&self.shared.server_errors, &code);
                    }
                }
                "complete" => {
                    // The server ended an operation it had started: the
                    // connection is done with (a refused one's end is not).
                    if sub.is_some_and(|j| self.subs.get(j).is_some_and(|t| t.refused)) {
                        continue;
                    }
                    break self.ended(established, "complete");
                }
                "connection_error" => break End::ConnectFailed("connection_error".into()),
                _ => {}
            }
        };
        drop(open_guard);
        if matches!(end, End::Finished) {
            let _ = socket.close(None).await;
        }
        end
    }

    /// The `/ws` envelope protocol: `channel.subscribe` for each
    /// subscription's channel, one at a time (an answer names no request,
    /// so each waits for the last one's `channel.subscribed` or `error`).
    async fn envelope(
        &mut self,
        url: &str,
        finish: &mut watch::Receiver<Option<Arc<Finish>>>,
    ) -> End {
        let path = match self.token() {
            Some(t) => format!("/ws?token={t}"),
            None => "/ws".to_owned(),
        };
        let mut socket = match self.open_websocket(url, &path, None).await {
            Ok(s) => s,
            Err(end) => return end,
        };
        let mut to_ask = self.wanted().into_iter();
        // The subscription whose answer is awaited.
        let mut asking = to_ask.next();
        if let Some(j) = asking {
            if socket
                .send(Message::text(self.channel_subscribe(j)))
                .await
                .is_err()
            {
                return End::ConnectFailed("reset".into());
            }
        }
        let mut established = asking.is_none();
        let mut open_guard = established.then(|| OpenGuard::new(self.shared));
        if established {
            self.subscribed();
        }
        let mut deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
        let end = loop {
            let text = match self
                .next_text(&mut socket, finish, deadline, established)
                .await
            {
                Ok(Some(text)) => text,
                Ok(None) => continue,
                Err(end) => break end,
            };
            // The answer to the subscription asked for: the next one is
            // asked for, or every one has been.
            let mut answered = false;
            match message_type(&text) {
                Some("auth.failed") => break End::ConnectFailed("auth_failed".into()),
                Some("channel.subscribed") => {
                    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                    let channel = v
                        .pointer("/payload/channel_id")
                        .and_then(Value::as_str)
                        .map(|c| format!("channel:{c}"));
                    let sub = (0..self.subs.len())
                        .find(|&j| channel.as_deref() == Some(self.topic(j)))
                        .or(asking);
                    if let Some(j) = sub {
                        if self.subs[j].last_id.is_some()
                            && v.pointer("/payload/recovered") == Some(&Value::Bool(false))
                        {
                            self.shared.gaps.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    answered = asking.is_some();
                }
                Some("channel.gap") => {
                    self.shared.gaps.fetch_add(1, Ordering::Relaxed);
                }
                Some("error") => {
                    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                    let code = v
                        .pointer("/payload/code")
                        .and_then(Value::as_str)
                        .unwrap_or("error")
                        .to_owned();
                    match asking {
                        // This run sends nothing but `channel.subscribe`:
                        // an error while one is awaited answers it.
                        Some(j) if code == "rate_limited" => {
                            // Subscribing is rate-limited per user: wait as
                            // told and ask again.
                            let wait = v
                                .pointer("/payload/retry_after_ms")
                                .and_then(Value::as_u64)
                                .unwrap_or(1000);
                            tokio::time::sleep(Duration::from_millis(wait + 10)).await;
                            deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
                            if socket
                                .send(Message::text(self.channel_subscribe(j)))
                                .await
                                .is_err()
                            {
                                break End::ConnectFailed("reset".into());
                            }
                        }
                        Some(j) => {
                            let message = v
                                .pointer("/payload/message")
                                .and_then(Value::as_str)
                                .unwrap_or("");
                            // `/ws` says "at most N channels per
                            // connection" as a bad request.
                            let why = if message.contains("channels per connection") {
                                TOO_MANY_SUBSCRIPTIONS
                            } else {
                                &code
                            };
                            self.refuse(j, why);
                            answered = true;
                        }
                        None => Shared::count(&self.shared.server_errors, &code),
                    }
                }
                _ => self.on_event(&text, None, || {
                    serde_json::from_str::<Value>(&text)
                        .ok()
                        .and_then(|v| v.get("id").and_then(Value::as_str).map(str::to_owned))
                }),
            }
            if answered {
                asking = to_ask.next();
                deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
                if let Some(j) = asking {
                    let ask = Message::text(self.channel_subscribe(j));
                    if socket.send(ask).await.is_err() {
                        break self.ended(established, "reset");
                    }
                } else if !established {
                    established = true;
                    open_guard = Some(OpenGuard::new(self.shared));
                    self.subscribed();
                }
            }
        };
        drop(open_guard);
        if matches!(end, End::Finished) {
            let _ = socket.close(None).await;
        }
        end
    }

    /// The next text message on a WebSocket (`None` for another kind), or
    /// how the connection ends: the run finished, the connection closed,
    /// or it was not established by `deadline`.
    async fn next_text(
        &self,
        socket: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
        finish: &mut watch::Receiver<Option<Arc<Finish>>>,
        deadline: tokio::time::Instant,
        established: bool,
    ) -> Result<Option<String>, End> {
        let next = tokio::select! {
            biased;
            _ = finish.wait_for(Option::is_some) => return Err(End::Finished),
            _ = tokio::time::sleep_until(deadline), if !established => {
                return Err(End::ConnectFailed("timeout".into()));
            }
            next = socket.next() => next,
        };
        match next {
            None | Some(Err(_)) => Err(self.ended(established, "reset")),
            Some(Ok(Message::Close(frame))) => Err(self.ended(established, &close_code(frame))),
            Some(Ok(Message::Text(text))) => Ok(Some(text)),
            Some(Ok(_)) => Ok(None),
        }
    }

    fn ended(&self, established: bool, how: &str) -> End {
        if established {
            End::Closed(how.to_owned())
        } else {
            End::ConnectFailed(format!("closed_{how}"))
        }
    }

    /// The SSE event stream (one stream naming every subscription's topic)
    /// or GraphQL over SSE (one subscription).
    async fn sse(&mut self, url: &str, finish: &mut watch::Receiver<Option<Arc<Finish>>>) -> End {
        let source = net::is_loopback_v4(url)
            .then(|| net::source_for(std::net::Ipv4Addr::LOCALHOST.into(), self.index))
            .flatten();
        let client = sse_client(source);
        let request = match self.plan.transport {
            Transport::Sse => {
                let topics: Vec<(&str, &str)> = self
                    .wanted()
                    .into_iter()
                    .map(|j| ("topic", self.topic(j)))
                    .collect();
                let mut r = client
                    .get(format!("{url}/api/v1/events/stream"))
                    .query(&topics);
                if let Some(t) = self.token() {
                    r = r.header("authorization", format!("Bearer {t}"));
                }
                if let Some(last) = self.stream_last_id.as_deref() {
                    r = r.header("last-event-id", last);
                }
                r
            }
            _ => {
                let mut r = client
                    .post(format!("{url}/graphql/stream"))
                    .json(&self.graphql_payload(0));
                if let Some(t) = self.token() {
                    r = r.header("authorization", format!("Bearer {t}"));
                }
                r
            }
        }
        .header("accept", "text/event-stream");
        let response = tokio::select! {
            _ = finish.wait_for(Option::is_some) => return End::Finished,
            r = tokio::time::timeout(CONNECT_TIMEOUT, request.send()) => r,
        };
        let response = match response {
            Err(_) => return End::ConnectFailed("timeout".into()),
            Ok(Err(e)) => return End::ConnectFailed(crate::publisher::request_error(e)),
            Ok(Ok(r)) => r,
        };
        if !response.status().is_success() {
            return End::ConnectFailed(format!("http_{}", response.status().as_u16()));
        }
        self.subscribed();
        let _open = OpenGuard::new(self.shared);
        let mut body = response.bytes_stream();
        let mut parser = SseParser::default();
        let graphql = self.plan.transport == Transport::GraphqlSse;
        loop {
            let chunk = tokio::select! {
                biased;
                _ = finish.wait_for(Option::is_some) => return End::Finished,
                chunk = body.next() => chunk,
            };
            let chunk = match chunk {
                None => return End::Closed("eof".into()),
                Some(Err(_)) => return End::Closed("reset".into()),
                Some(Ok(c)) => c,
            };
            let events = match parser.feed(&chunk) {
                Ok(events) => events,
                Err(why) => return End::Closed(why),
            };
            for event in events {
                if let Some(id) = &event.id {
                    if !graphql && self.plan.resume {
                        *self.stream_last_id = Some(id.clone());
                    }
                }
                match event.event.as_deref() {
                    Some("gap") => {
                        self.shared.gaps.fetch_add(1, Ordering::Relaxed);
                    }
                    Some("complete") => return End::Closed("complete".into()),
                    _ => {
                        if graphql && event.data.contains("\"errors\"") {
                            if let Ok(v) = serde_json::from_str::<Value>(&event.data) {
                                self.on_graphql_errors(&v);
                            }
                        }
                        let data = &event.data;
                        // GraphQL over SSE carries its one subscription;
                        // the event stream's topics tell its subscriptions
                        // apart (its own `id:` line was kept above).
                        let sub = graphql.then_some(0);
                        self.on_event(data, sub, || {
                            if graphql {
                                serde_json::from_str::<Value>(data).ok().and_then(|v| {
                                    v.pointer("/data/events/id")
                                        .and_then(Value::as_str)
                                        .map(str::to_owned)
                                })
                            } else {
                                None
                            }
                        });
                    }
                }
            }
        }
    }
}

/// The error code of a GraphQL-over-WebSocket `error` payload: a list of
/// GraphQL errors (graphql-transport-ws) or `{message, errors}` (legacy).
fn graphql_error_code(payload: &Value) -> String {
    let errors = payload.get("errors").unwrap_or(payload);
    errors
        .pointer("/0/extensions/code")
        .and_then(Value::as_str)
        .unwrap_or("graphql_error")
        .to_owned()
}

/// A close frame's code, `1005` (no status) when it has none.
fn close_code(frame: Option<tokio_tungstenite::tungstenite::protocol::CloseFrame>) -> String {
    frame
        .map(|f| u16::from(f.code).to_string())
        .unwrap_or_else(|| u16::from(CloseCode::Status).to_string())
}
/// One HTTP client per worker thread and source address for the SSE
/// transports (see [`net`]): every stream holds its own connection anyway.
fn sse_client(source: Option<std::net::IpAddr>) -> reqwest::Client {
    thread_local! {
        static CLIENTS: std::cell::RefCell<HashMap<Option<std::net::IpAddr>, reqwest::Client>> =
            std::cell::RefCell::new(HashMap::new());
    }
    CLIENTS.with(|clients| {
        clients
            .borrow_mut()
            .entry(source)
            .or_insert_with(|| {
                reqwest::Client::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .pool_max_idle_per_host(0)
                    .local_address(source)
                    .build()
                    .expect("an HTTP client builds")
            })
            .clone()
    })
}

/// The `type` of a JSON message, read without decoding the rest.
pub fn message_type(text: &str) -> Option<&str> {
    #[derive(serde::Deserialize)]
    struct Typed<'a> {
        #[serde(rename = "type", borrow)]
        ty: &'a str,
    }
    serde_json::from_str::<Typed>(text).ok().map(|t| t.ty)
}

fn ws_error_label(e: &tokio_tungstenite::tungstenite::Error) -> String {
    use tokio_tungstenite::tungstenite::Error;
    match e {
        Error::Http(response) => format!("http_{}", response.status().as_u16()),
        Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => "refused".into(),
        Error::Io(_) => "io".into(),
        _ => "handshake".into(),
    }
}

/// Keeps `open` raised while a connection is established.
struct OpenGuard<'a> {
    shared: &'a Shared,
}

impl<'a> OpenGuard<'a> {
    fn new(shared: &'a Shared) -> Self {
        shared.open.fetch_add(1, Ordering::Relaxed);
        Self { shared }
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.shared.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One dispatched SSE event.
#[derive(Debug, Default, PartialEq)]
pub struct SseEvent {
    pub event: Option<String>,
    pub id: Option<String>,
    pub data: String,
}

/// An incremental `text/event-stream` parser (the WHATWG rules that matter
/// here: `field: value` lines, comments, a blank line dispatches).
#[derive(Default)]
pub struct SseParser {
    line: Vec<u8>,
    current: SseEvent,
    has_data: bool,
}

impl SseParser {
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<SseEvent>, String> {
        let mut out = Vec::new();
        for &b in bytes {
            if b != b'\n' {
                if self.line.len() >= MAX_SSE_LINE {
                    return Err("sse_line_too_long".into());
                }
                self.line.push(b);
                continue;
            }
            let mut line = std::mem::take(&mut self.line);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8_lossy(&line);
            if line.is_empty() {
                if self.has_data || self.current.event.is_some() {
                    out.push(std::mem::take(&mut self.current));
                } else if self.current.id.is_some() {
                    // An id without data still moves the resume position.
                    out.push(std::mem::take(&mut self.current));
                }
                self.has_data = false;
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (&*line, ""),
            };
            match field {
                "event" => self.current.event = Some(value.to_owned()),
                "id" => self.current.id = Some(value.to_owned()),
                "data" => {
                    if self.has_data {
                        self.current.data.push('\n');
                    }
                    self.current.data.push_str(value);
                    self.has_data = true;
                }
                _ => {}
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_frames_split_anywhere_parse_the_same() {
        let stream = "retry: 3000\n\nevent: post.created\nid: a:1\ndata: {\"x\":1}\n\n: ping\n\nevent: gap\r\ndata: {}\r\n\r\n";
        let whole = SseParser::default().feed(stream.as_bytes()).unwrap();
        let mut parser = SseParser::default();
        let mut split = Vec::new();
        for chunk in stream.as_bytes().chunks(3) {
            split.extend(parser.feed(chunk).unwrap());
        }
        assert_eq!(whole, split);
        assert_eq!(whole.len(), 2);
        assert_eq!(whole[0].event.as_deref(), Some("post.created"));
        assert_eq!(whole[0].id.as_deref(), Some("a:1"));
        assert_eq!(whole[0].data, "{\"x\":1}");
        assert_eq!(whole[1].event.as_deref(), Some("gap"));
    }

    #[test]
    fn an_endless_sse_line_is_an_error_not_a_buffer() {
        let mut parser = SseParser::default();
        let big = vec![b'a'; MAX_SSE_LINE + 1];
        assert!(parser.feed(&big).is_err());
    }

    #[test]
    fn error_codes_are_read_from_both_protocols_payloads() {
        let errors = json!([{"message": "m", "extensions": {"code": "TOO_MANY_SUBSCRIPTIONS"}}]);
        assert_eq!(graphql_error_code(&errors), TOO_MANY_SUBSCRIPTIONS);
        let legacy = json!({"message": "m", "errors": errors});
        assert_eq!(graphql_error_code(&legacy), TOO_MANY_SUBSCRIPTIONS);
        assert_eq!(
            graphql_error_code(&json!({"message": "m"})),
            "graphql_error"
        );
    }

    #[test]
    fn the_tally_counts_each_sequence_number_once() {
        let mut t = Tally::new(0);
        assert!(t.mark_seen(1));
        assert!(t.mark_seen(130));
        assert!(!t.mark_seen(130));
        assert!(t.has(1) && t.has(130) && !t.has(2));
    }
}
