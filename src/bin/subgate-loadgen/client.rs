//! One subscriber: connect over its transport, subscribe, count what
//! arrives, and (with `--resume`) reconnect to the next URL and resume from
//! the last event id it saw.

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

/// Bounds the handshake and the wait for the subscription's first answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest SSE line kept while it is incomplete; a longer one is an error,
/// not a reason to buffer without bound.
const MAX_SSE_LINE: usize = 1 << 20;

/// The end of the measured phase, as the coordinator said it.
#[derive(Debug)]
pub struct Finish {
    pub published: Vec<u64>,
    pub unacked: Vec<Vec<u64>>,
}

/// Counters and tallies every subscriber of one worker adds to.
pub struct Shared {
    pub attempted: AtomicU64,
    pub open: AtomicU64,
    pub live: AtomicU64,
    pub received: AtomicU64,
    pub frames: AtomicU64,
    pub reconnects: AtomicU64,
    pub connect_errors: AtomicU64,
    pub lost: AtomicU64,
    pub duplicates: AtomicU64,
    pub gaps: AtomicU64,
    pub never_live: AtomicU64,
    pub latency: Mutex<Histogram<u64>>,
    pub connect_error_reasons: Mutex<BTreeMap<String, u64>>,
    pub closes: Mutex<BTreeMap<String, u64>>,
    pub server_errors: Mutex<BTreeMap<String, u64>>,
    /// Per topic, this worker's subscribers of it not yet live.
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
            lost: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            never_live: AtomicU64::new(0),
            // 1 µs to 1 hour at 3 significant digits.
            latency: Mutex::new(
                Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds"),
            ),
            connect_error_reasons: Mutex::new(BTreeMap::new()),
            closes: Mutex::new(BTreeMap::new()),
            server_errors: Mutex::new(BTreeMap::new()),
            waiting: Mutex::new(HashMap::new()),
        }
    }

    /// A subscriber of `topic` is on its way.
    pub fn wait_for(&self, topic: usize) {
        *self.waiting.lock().entry(topic).or_default() += 1;
    }

    /// A subscriber of `topic` is live.
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
    /// An established subscription ended: a close code, `reset`, `eof`,
    /// `complete`.
    Closed(String),
}

/// What one subscriber saw, across all its connections.
struct Tally {
    topic: usize,
    live: bool,
    /// The resume position of the last event seen.
    last_id: Option<String>,
    /// Bit `seq` is set once measured event `seq` has arrived.
    seen: Vec<u64>,
}

impl Tally {
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

/// Runs subscriber `index` until the run finishes, then adds what it lost
/// to the shared tallies.
pub async fn run(
    index: usize,
    plan: Arc<Plan>,
    shared: Arc<Shared>,
    mut finish: watch::Receiver<Option<Arc<Finish>>>,
) {
    let mut tally = Tally {
        topic: index % plan.topics.len(),
        live: false,
        last_id: None,
        seen: Vec::new(),
    };
    let mut attempt = 0usize;
    let mut first = true;
    loop {
        let url = &plan.urls[(index + attempt) % plan.urls.len()];
        let mut session = Session {
            index,
            plan: &plan,
            shared: &shared,
            tally: &mut tally,
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
        settle(&tally, &done, &shared);
    }
}

/// Loss: every acknowledged sequence number of the subscriber's topic that
/// it never saw.
fn settle(tally: &Tally, done: &Finish, shared: &Shared) {
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
    tally: &'a mut Tally,
    first: &'a mut bool,
}

impl Session<'_> {
    async fn run(&mut self, url: &str, finish: &mut watch::Receiver<Option<Arc<Finish>>>) -> End {
        if finish.borrow().is_some() {
            return End::Finished;
        }
        match self.plan.transport {
            Transport::GraphqlWs | Transport::GraphqlWsLegacy | Transport::Envelope => {
                self.websocket(url, finish).await
            }
            Transport::Sse | Transport::GraphqlSse => self.sse(url, finish).await,
        }
    }

    fn token(&self) -> Option<&str> {
        let tokens = &self.plan.tokens;
        (!tokens.is_empty()).then(|| tokens[self.index % tokens.len()].as_str())
    }

    fn topic(&self) -> &str {
        &self.plan.topics[self.tally.topic]
    }

    /// The subscription request of the GraphQL transports.
    fn graphql_payload(&self) -> Value {
        let mut variables = self.plan.variables.clone().unwrap_or_else(|| json!({}));
        if self.plan.events_query {
            variables["topics"] = json!([self.topic()]);
            if let Some(after) = &self.tally.last_id {
                variables["after"] = json!(after);
            }
        }
        json!({"query": self.plan.query, "variables": variables})
    }

    /// The first attempt has reached the point where the subscription is
    /// asked for: the coordinator may start warming up.
    fn subscribed(&mut self) {
        if std::mem::replace(self.first, false) {
            self.shared.attempted.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts one frame that may carry an event of this run; `id` reads the
    /// frame's resume position when it is needed.
    fn on_event(&mut self, frame: &str, id: impl FnOnce() -> Option<String>) {
        let Some(mark) = marker::find(frame, &self.plan.run) else {
            return;
        };
        self.shared.frames.fetch_add(1, Ordering::Relaxed);
        if self.plan.resume {
            if let Some(id) = id() {
                self.tally.last_id = Some(id);
            }
        }
        match mark.kind {
            Kind::Warmup => {
                if !self.tally.live {
                    self.tally.live = true;
                    self.shared.live.fetch_add(1, Ordering::Relaxed);
                    self.shared.done_waiting(self.tally.topic);
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
                if !self.tally.mark_seen(mark.seq) {
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

    async fn websocket(
        &mut self,
        url: &str,
        finish: &mut watch::Receiver<Option<Arc<Finish>>>,
    ) -> End {
        let transport = self.plan.transport;
        let ws_base = url.replacen("http://", "ws://", 1);
        let target = match transport {
            Transport::Envelope => match self.token() {
                Some(t) => format!("{ws_base}/ws?token={t}"),
                None => format!("{ws_base}/ws"),
            },
            _ => format!("{ws_base}/graphql/ws"),
        };
        let mut request = match target.into_client_request() {
            Ok(r) => r,
            Err(_) => return End::ConnectFailed("bad_url".into()),
        };
        let protocol = match transport {
            Transport::GraphqlWs => Some("graphql-transport-ws"),
            Transport::GraphqlWsLegacy => Some("graphql-ws"),
            _ => None,
        };
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
        let mut socket = match connected {
            Err(_) => return End::ConnectFailed("timeout".into()),
            Ok(Err(label)) => return End::ConnectFailed(label),
            Ok(Ok((socket, _))) => socket,
        };
        // The opening: init and subscribe (GraphQL), or wait for the
        // server's greeting and subscribe to the channel (`/ws`).
        let opening = match transport {
            Transport::Envelope => {
                let mut subscribe = json!({"type": "channel.subscribe", "payload": {
                    "channel_id": self.topic().trim_start_matches("channel:"),
                }});
                if let Some(after) = &self.tally.last_id {
                    subscribe["payload"]["last_event_id"] = json!(after);
                }
                vec![subscribe.to_string()]
            }
            _ => {
                let init_payload = match self.token() {
                    Some(t) => json!({"authorization": format!("Bearer {t}")}),
                    None => json!({}),
                };
                vec![json!({"type": "connection_init", "payload": init_payload}).to_string()]
            }
        };
        for text in opening {
            if socket.send(Message::text(text)).await.is_err() {
                return End::ConnectFailed("reset".into());
            }
        }
        let mut acked = transport == Transport::Envelope;
        let mut established = false;
        let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
        let mut open_guard: Option<OpenGuard> = None;
        let end = loop {
            let next = tokio::select! {
                biased;
                _ = finish.wait_for(Option::is_some) => break End::Finished,
                _ = tokio::time::sleep_until(deadline), if !established => {
                    break End::ConnectFailed("timeout".into());
                }
                next = socket.next() => next,
            };
            let text = match next {
                None => break self.ended(established, "reset"),
                Some(Err(_)) => break self.ended(established, "reset"),
                Some(Ok(Message::Close(frame))) => {
                    let code = frame
                        .map(|f| u16::from(f.code).to_string())
                        .unwrap_or_else(|| u16::from(CloseCode::Status).to_string());
                    break self.ended(established, &code);
                }
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(_)) => continue,
            };
            match transport {
                Transport::GraphqlWs | Transport::GraphqlWsLegacy => {
                    let ty = message_type(&text);
                    match ty {
                        Some("connection_ack") if !acked => {
                            acked = true;
                            let start = if transport == Transport::GraphqlWs {
                                "subscribe"
                            } else {
                                "start"
                            };
                            let msg = json!({"id": "1", "type": start, "payload": self.graphql_payload()});
                            if socket.send(Message::text(msg.to_string())).await.is_err() {
                                break End::ConnectFailed("reset".into());
                            }
                            // graphql-transport-ws has no subscription
                            // acknowledgement: the warm-up marker tells
                            // when the subscription is live.
                            established = true;
                            open_guard = Some(OpenGuard::new(self.shared, true));
                            self.subscribed();
                        }
                        Some("next") | Some("data") => {
                            if text.contains("\"errors\"") {
                                if let Ok(v) = serde_json::from_str::<Value>(&text) {
                                    if let Some(p) = v.get("payload") {
                                        self.on_graphql_errors(p);
                                    }
                                }
                            }
                            self.on_event(&text, || {
                                serde_json::from_str::<Value>(&text).ok().and_then(|v| {
                                    v.pointer("/payload/data/events/id")
                                        .and_then(Value::as_str)
                                        .map(str::to_owned)
                                })
                            });
                        }
                        Some("ping") => {
                            let pong = json!({"type": "pong"}).to_string();
                            let _ = socket.send(Message::text(pong)).await;
                        }
                        Some("error") => {
                            Shared::count(&self.shared.server_errors, "subscribe_error");
                            if let Ok(v) = serde_json::from_str::<Value>(&text) {
                                if let Some(Value::Array(errors)) = v.get("payload") {
                                    let wrapped = json!({"errors": errors});
                                    self.on_graphql_errors(&wrapped);
                                }
                            }
                        }
                        Some("complete") => break self.ended(established, "complete"),
                        Some("connection_error") => {
                            break End::ConnectFailed("connection_error".into())
                        }
                        _ => {}
                    }
                }
                Transport::Envelope => {
                    let ty = message_type(&text);
                    match ty {
                        Some("auth.failed") => break End::ConnectFailed("auth_failed".into()),
                        Some("channel.subscribed") => {
                            if !established {
                                established = true;
                                open_guard = Some(OpenGuard::new(self.shared, true));
                                self.subscribed();
                            }
                            if self.tally.last_id.is_some() && text.contains("\"recovered\":false")
                            {
                                self.shared.gaps.fetch_add(1, Ordering::Relaxed);
                            }
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
                            if code == "rate_limited" && !established {
                                // Subscribing is rate-limited per user: wait
                                // as told and ask again.
                                let wait = v
                                    .pointer("/payload/retry_after_ms")
                                    .and_then(Value::as_u64)
                                    .unwrap_or(1000);
                                tokio::time::sleep(Duration::from_millis(wait + 10)).await;
                                let mut subscribe = json!({"type": "channel.subscribe", "payload": {
                                    "channel_id": self.topic().trim_start_matches("channel:"),
                                }});
                                if let Some(after) = &self.tally.last_id {
                                    subscribe["payload"]["last_event_id"] = json!(after);
                                }
                                if socket
                                    .send(Message::text(subscribe.to_string()))
                                    .await
                                    .is_err()
                                {
                                    break End::ConnectFailed("reset".into());
                                }
                            } else {
                                Shared::count(&self.shared.server_errors, &code);
                                if !established {
                                    break End::ConnectFailed(code);
                                }
                            }
                        }
                        _ => self.on_event(&text, || {
                            serde_json::from_str::<Value>(&text).ok().and_then(|v| {
                                v.get("id").and_then(Value::as_str).map(str::to_owned)
                            })
                        }),
                    }
                }
                _ => unreachable!("SSE transports do not open WebSockets"),
            }
        };
        drop(open_guard);
        if matches!(end, End::Finished) {
            let _ = socket.close(None).await;
        }
        end
    }

    fn ended(&self, established: bool, how: &str) -> End {
        if established {
            End::Closed(how.to_owned())
        } else {
            End::ConnectFailed(format!("closed_{how}"))
        }
    }

    async fn sse(&mut self, url: &str, finish: &mut watch::Receiver<Option<Arc<Finish>>>) -> End {
        let source = net::is_loopback_v4(url)
            .then(|| net::source_for(std::net::Ipv4Addr::LOCALHOST.into(), self.index))
            .flatten();
        let client = sse_client(source);
        let request = match self.plan.transport {
            Transport::Sse => {
                let mut r = client
                    .get(format!("{url}/api/v1/events/stream"))
                    .query(&[("topic", self.topic())]);
                if let Some(t) = self.token() {
                    r = r.header("authorization", format!("Bearer {t}"));
                }
                if let Some(last) = &self.tally.last_id {
                    r = r.header("last-event-id", last.as_str());
                }
                r
            }
            _ => {
                let mut r = client
                    .post(format!("{url}/graphql/stream"))
                    .json(&self.graphql_payload());
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
        let _open = OpenGuard::new(self.shared, true);
        let mut body = response.bytes_stream();
        let mut parser = SseParser::default();
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
                    if self.plan.transport == Transport::Sse && self.plan.resume {
                        self.tally.last_id = Some(id.clone());
                    }
                }
                match event.event.as_deref() {
                    Some("gap") => {
                        self.shared.gaps.fetch_add(1, Ordering::Relaxed);
                    }
                    Some("complete") => return End::Closed("complete".into()),
                    _ => {
                        if self.plan.transport == Transport::GraphqlSse
                            && event.data.contains("\"errors\"")
                        {
                            if let Ok(v) = serde_json::from_str::<Value>(&event.data) {
                                self.on_graphql_errors(&v);
                            }
                        }
                        let graphql = self.plan.transport == Transport::GraphqlSse;
                        let data = &event.data;
                        self.on_event(data, || {
                            if graphql {
                                serde_json::from_str::<Value>(data).ok().and_then(|v| {
                                    v.pointer("/data/events/id")
                                        .and_then(Value::as_str)
                                        .map(str::to_owned)
                                })
                            } else {
                                // The stream's own `id:` line was kept above.
                                None
                            }
                        });
                    }
                }
            }
        }
    }
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
fn message_type(text: &str) -> Option<&str> {
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

/// Keeps `open` raised while a subscription is established.
struct OpenGuard<'a> {
    shared: &'a Shared,
    counted: bool,
}

impl<'a> OpenGuard<'a> {
    fn new(shared: &'a Shared, counted: bool) -> Self {
        if counted {
            shared.open.fetch_add(1, Ordering::Relaxed);
        }
        Self { shared, counted }
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        if self.counted {
            self.shared.open.fetch_sub(1, Ordering::Relaxed);
        }
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
    fn the_tally_counts_each_sequence_number_once() {
        let mut t = Tally {
            topic: 0,
            live: false,
            last_id: None,
            seen: Vec::new(),
        };
        assert!(t.mark_seen(1));
        assert!(t.mark_seen(130));
        assert!(!t.mark_seen(130));
        assert!(t.has(1) && t.has(130) && !t.has(2));
    }
}
