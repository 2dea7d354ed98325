//! The handler and the pump over real sockets, with a schema of their
//! own so that they do not depend on the node's.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::http::header::HeaderValue;
use async_graphql::{Context, Object, Schema, Subscription};
use futures_util::{SinkExt, Stream, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue as ClientHeaderValue;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::*;
use crate::config::Settings;
use crate::error::ErrorCode;
use crate::graphql::Viewer;
use crate::hub::{Cutoff, CutoffReason};
use crate::telemetry::metrics::transport;

struct TestQuery;

#[Object]
impl TestQuery {
    async fn hello(&self) -> &str {
        "world"
    }

    async fn whoami(&self, ctx: &Context<'_>) -> Option<String> {
        ctx.data::<Viewer>()
            .ok()
            .and_then(|v| v.0.as_ref().map(|p| p.user_id.clone()))
    }
}

struct TestMutation;

#[Object]
impl TestMutation {
    async fn add(&self, a: i32, b: i32) -> i32 {
        a + b
    }
}

struct TestSubscription;

#[Subscription]
impl TestSubscription {
    async fn ticks(&self, n: i32) -> impl Stream<Item = i32> {
        futures_util::stream::iter(0..n)
    }

    async fn forever(&self) -> impl Stream<Item = i32> {
        futures_util::stream::unfold(0, |i| async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Some((i, i + 1))
        })
    }

    /// Large items as fast as they are taken.
    async fn flood(&self, ctx: &Context<'_>) -> async_graphql::Result<impl Stream<Item = String>> {
        *FLOODED.lock().unwrap() = Some(ctx.data::<Arc<Cutoff>>()?.clone());
        Ok(
            futures_util::stream::repeat("x".repeat(64 * 1024)).inspect(|_| {
                FLOOD_ITEMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }),
        )
    }

    /// One item, then the connection is cut off as the hub would.
    async fn cut(&self, ctx: &Context<'_>) -> async_graphql::Result<impl Stream<Item = i32>> {
        let cutoff = ctx.data::<Arc<Cutoff>>()?.clone();
        Ok(
            futures_util::stream::iter([1]).chain(futures_util::stream::once(async move {
                cutoff.cut(CutoffReason::SlowConsumer);
                std::future::pending::<i32>().await
            })),
        )
    }
}

/// The cut-off of the connection running `flood` (one test uses it).
static FLOODED: std::sync::Mutex<Option<Arc<Cutoff>>> = std::sync::Mutex::new(None);
/// How many items `flood` produced: it stalls while the pump is blocked.
static FLOOD_ITEMS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

type TestSchema = Schema<TestQuery, TestMutation, TestSubscription>;

fn config() -> PumpConfig {
    PumpConfig {
        ping_interval: Duration::from_secs(5),
        init_timeout: Duration::from_secs(5),
        max_frame_bytes: 4096,
        max_operations: 3,
    }
}

fn state_with(edit: impl FnOnce(&mut Settings)) -> AppState {
    let mut settings = Settings::default();
    edit(&mut settings);
    crate::test_support::state(settings)
}

/// A node on 127.0.0.1:0 serving the test schema at `/test/ws` beside
/// the node's own routes.
async fn serve(state: AppState, config: PumpConfig) -> (SocketAddr, ServerHandle) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let schema: TestSchema = Schema::new(TestQuery, TestMutation, TestSubscription);
    let data = web::Data::new(state.clone());
    let upgrades = move |upgrade: Upgrade| {
        let (state, schema, config) = (state.clone(), schema.clone(), config.clone());
        async move {
            if upgrade.path() == "/test/ws" {
                accept(&state, upgrade, schema, None, config).await
            } else {
                crate::transport::upgrade(state, upgrade).await
            }
        }
    };
    let settings = crate::transport::server::ServerSettings {
        workers: 1,
        max_sockets_per_worker: None,
        shutdown_timeout: Duration::from_secs(1),
    };
    let server = crate::transport::server::start(
        listener,
        settings,
        move |cfg: &mut web::ServiceConfig| {
            cfg.app_data(data.clone());
            crate::transport::configure(cfg);
        },
        upgrades,
    )
    .unwrap();
    let handle = server.handle();
    actix_web::rt::spawn(server);
    (addr, handle)
}

type Client = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(
    addr: SocketAddr,
    path: &str,
    protocol: Option<&'static str>,
) -> (Client, Option<String>) {
    let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
    if let Some(protocol) = protocol {
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            ClientHeaderValue::from_static(protocol),
        );
    }
    let (ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    let chosen = response
        .headers()
        .get("Sec-WebSocket-Protocol")
        .map(|v| v.to_str().unwrap().to_owned());
    (ws, chosen)
}

async fn send(ws: &mut Client, message: Value) {
    ws.send(WsMessage::Text(message.to_string())).await.unwrap();
}

/// Sends the operation `query` as `id` in a message of type `ty`
/// (`subscribe`, `start`).
async fn send_operation(ws: &mut Client, ty: &str, id: &str, query: &str) {
    send(
        ws,
        json!({"type": ty, "id": id, "payload": {"query": query}}),
    )
    .await;
}

/// Asserts that the next text message is `expected`.
async fn expect_json(ws: &mut Client, expected: Value) {
    assert_eq!(next_json(ws).await, expected);
}

/// The next text message, skipping control frames.
async fn next_json(ws: &mut Client) -> Value {
    let next = async {
        loop {
            match ws.next().await {
                Some(Ok(WsMessage::Text(text))) => return serde_json::from_str(&text).unwrap(),
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), next)
        .await
        .expect("a message in time")
}

/// The close frame's code and reason, skipping everything before it.
async fn next_close(ws: &mut Client) -> (u16, String) {
    let next = async {
        loop {
            match ws.next().await {
                Some(Ok(WsMessage::Close(Some(frame)))) => {
                    return (u16::from(frame.code), frame.reason.into_owned())
                }
                Some(Ok(WsMessage::Close(None))) | None => panic!("closed without a code"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("socket error before the close frame: {e}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), next)
        .await
        .expect("a close in time")
}

async fn init(ws: &mut Client) {
    send(ws, json!({"type": "connection_init"})).await;
    assert_eq!(next_json(ws).await, json!({"type": "connection_ack"}));
}

/// A node with default settings serving the test schema, its pump
/// configured as [`config`] with `tweak` applied.
async fn node(tweak: impl FnOnce(&mut PumpConfig)) -> (AppState, SocketAddr, ServerHandle) {
    node_with(tweak, |_| {}).await
}

/// [`node`], with `edit` applied to its settings.
async fn node_with(
    tweak: impl FnOnce(&mut PumpConfig),
    edit: impl FnOnce(&mut Settings),
) -> (AppState, SocketAddr, ServerHandle) {
    let mut config = config();
    tweak(&mut config);
    let state = state_with(edit);
    let (addr, server) = serve(state.clone(), config).await;
    (state, addr, server)
}

/// A node serving the test schema, and a graphql-transport-ws client on it
/// that is acknowledged and subscribed to `subscription { <field> }` as `id`.
async fn subscribed(id: &str, field: &str) -> (AppState, ServerHandle, Client) {
    subscribed_with(id, field, |_| {}).await
}

/// [`subscribed`], with `edit` applied to the node's settings.
async fn subscribed_with(
    id: &str,
    field: &str,
    edit: impl FnOnce(&mut Settings),
) -> (AppState, ServerHandle, Client) {
    let (state, addr, server) = node_with(|_| {}, edit).await;
    let (mut ws, _) = connect(addr, "/test/ws", Some("graphql-transport-ws")).await;
    init(&mut ws).await;
    let query = format!("subscription {{ {field} }}");
    send(
        &mut ws,
        json!({"type": "subscribe", "id": id, "payload": {"query": query}}),
    )
    .await;
    (state, server, ws)
}

/// How many closes with `code` the node counted.
fn closes(state: &AppState, code: u16) -> u64 {
    state
        .metrics
        .ws_closes_total
        .with_label_values(&[&code.to_string()])
        .get()
}

/// A response to a raw upgrade request.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends a WebSocket upgrade of `path` with `headers` besides the
/// handshake's own, and reads the answer: a refusal whole (the node closes
/// after it), a `101` up to the end of its head.
async fn raw_upgrade(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Answer {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
            .await
            .expect("an answer")
            .unwrap();
        raw.extend_from_slice(&chunk[..n]);
        if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        assert!(n > 0, "closed before the head ended: {raw:?}");
    };
    let head = String::from_utf8(raw[..head_end].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|line| {
            let (name, value) = line.split_once(':').unwrap();
            (name.trim().to_owned(), value.trim().to_owned())
        })
        .collect();
    let mut body = raw[head_end + 4..].to_vec();
    if status != 101 {
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut body))
            .await
            .expect("the node closes after a refusal")
            .unwrap();
    }
    Answer {
        status,
        headers,
        body: String::from_utf8(body).unwrap(),
    }
}

#[test]
fn negotiation_prefers_the_current_protocol() {
    let headers = |values: &[&'static str]| {
        let mut map = HeaderMap::new();
        for v in values {
            map.append(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(v));
        }
        map
    };
    assert_eq!(negotiate(&headers(&[])), Some(Subprotocol::TransportWs));
    assert_eq!(
        negotiate(&headers(&["graphql-ws"])),
        Some(Subprotocol::Legacy)
    );
    assert_eq!(
        negotiate(&headers(&["graphql-ws, graphql-transport-ws"])),
        Some(Subprotocol::TransportWs)
    );
    assert_eq!(
        negotiate(&headers(&["graphql-ws", "graphql-transport-ws"])),
        Some(Subprotocol::TransportWs)
    );
    assert_eq!(
        negotiate(&headers(&["chat", "graphql-ws"])),
        Some(Subprotocol::Legacy)
    );
    assert_eq!(negotiate(&headers(&["chat"])), None);
}

#[actix_web::test]
async fn upgrades_are_refused_before_the_handshake() {
    let state = state_with(|s| {
        s.server.allowed_origins = vec!["https://app.example".into()];
        s.server.max_connections = Some(1);
    });
    let (addr, server) = serve(state.clone(), config()).await;

    let answer = raw_upgrade(addr, "/test/ws", &[("Sec-WebSocket-Protocol", "chat")]).await;
    assert_eq!(answer.status, 400);
    let body: Value = serde_json::from_str(&answer.body).unwrap();
    let message = body["errors"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("graphql-transport-ws") && message.contains("graphql-ws"),
        "{message}"
    );
    assert_eq!(answer.header("connection"), Some("close"));

    // A foreign Origin, then a bad token in either place, then a path that
    // takes no upgrade.
    for (path, header, status) in [
        ("/test/ws", Some(("Origin", "https://evil.example")), 403),
        ("/test/ws", Some(("Authorization", "Bearer nope")), 401),
        ("/test/ws?token=nope", None, 401),
        ("/nowhere", None, 404),
    ] {
        let answer = raw_upgrade(addr, path, header.as_slice()).await;
        assert_eq!(answer.status, status, "{path} {header:?}");
        let body: Value = serde_json::from_str(&answer.body).unwrap();
        assert!(body["errors"][0]["message"].is_string(), "{body}");
    }

    // An allowed Origin with a good token passes.
    let token = state
        .auth
        .mint("u1", Duration::from_secs(60), None)
        .unwrap();
    let answer = raw_upgrade(
        addr,
        &format!("/test/ws?token={token}"),
        &[
            ("Origin", "https://app.example"),
            ("Sec-WebSocket-Protocol", "graphql-ws"),
        ],
    )
    .await;
    assert_eq!(answer.status, 101);
    assert_eq!(answer.header("sec-websocket-protocol"), Some("graphql-ws"));
    assert_eq!(
        answer.header("sec-websocket-accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "RFC 6455's own example key and answer"
    );
    drop(answer);
    // Its connection closes when the client's does.
    tokio::time::timeout(Duration::from_secs(5), async {
        while state.shutdown.open_connections() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the connection is released");

    // At the connection limit.
    let held = state.shutdown.track();
    let answer = raw_upgrade(addr, "/test/ws", &[]).await;
    assert_eq!(answer.status, 503);
    assert_eq!(answer.header("retry-after"), Some("1"));
    assert_eq!(
        state
            .metrics
            .rejected_total
            .with_label_values(&["max_connections"])
            .get(),
        1
    );
    drop(held);

    // Not a handshake: the connection is not to be upgraded after all.
    let answer = raw_upgrade(addr, "/test/ws", &[("Connection", "close")]).await;
    assert_eq!(answer.status, 400);

    // Draining.
    state.shutdown.begin();
    let answer = raw_upgrade(addr, "/test/ws", &[]).await;
    assert_eq!(answer.status, 503);
    assert_eq!(answer.header("retry-after"), Some("1"));
    server.stop(false).await;
}

#[actix_web::test]
async fn both_paths_upgrade_and_a_plain_get_still_works() {
    let (_state, addr, server) = node(|_| {}).await;
    for path in ["/graphql/ws", "/graphql"] {
        let (mut ws, chosen) = connect(addr, path, Some("graphql-transport-ws")).await;
        assert_eq!(chosen.as_deref(), Some("graphql-transport-ws"), "{path}");
        init(&mut ws).await;
        let (mut ws, chosen) = connect(addr, path, Some("graphql-ws")).await;
        assert_eq!(chosen.as_deref(), Some("graphql-ws"), "{path}");
        send(&mut ws, json!({"type": "connection_init"})).await;
        assert_eq!(next_json(&mut ws).await, json!({"type": "connection_ack"}));
        assert_eq!(next_json(&mut ws).await, json!({"type": "ka"}));
        // No subprotocol offered: the current one, not echoed.
        let (mut ws, chosen) = connect(addr, path, None).await;
        assert_eq!(chosen, None);
        init(&mut ws).await;
    }
    let res = reqwest::get(format!("http://{addr}/graphql?query=%7B__typename%7D"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert!(body["data"]["__typename"].is_string(), "{body}");
    server.stop(false).await;
}

#[actix_web::test]
async fn operations_run_over_the_socket() {
    let state = state_with(|_| {});
    let token = state
        .auth
        .mint("u1", Duration::from_secs(60), None)
        .unwrap();
    let (addr, server) = serve(state.clone(), config()).await;
    let (mut ws, _) = connect(addr, "/test/ws", Some("graphql-transport-ws")).await;
    send(
        &mut ws,
        json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {token}")}}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["type"], "connection_ack");

    send_operation(&mut ws, "subscribe", "s", "subscription { ticks(n: 3) }").await;
    for i in 0..3 {
        expect_json(
            &mut ws,
            json!({"type": "next", "id": "s", "payload": {"data": {"ticks": i}}}),
        )
        .await;
    }
    expect_json(&mut ws, json!({"type": "complete", "id": "s"})).await;

    send_operation(&mut ws, "subscribe", "q", "{ hello whoami }").await;
    expect_json(
        &mut ws,
        json!({"type": "next", "id": "q", "payload": {"data": {"hello": "world", "whoami": "u1"}}}),
    )
    .await;
    expect_json(&mut ws, json!({"type": "complete", "id": "q"})).await;

    send(&mut ws, json!({"type": "subscribe", "id": "m", "payload": {"query": "mutation($a: Int!) { add(a: $a, b: 2) }", "variables": {"a": 1}}})).await;
    assert_eq!(next_json(&mut ws).await["payload"]["data"]["add"], 3);
    assert_eq!(next_json(&mut ws).await["type"], "complete");

    send_operation(&mut ws, "subscribe", "e", "{ nope }").await;
    let error = next_json(&mut ws).await;
    assert_eq!(error["type"], "error");
    assert!(error["payload"][0]["message"].is_string());

    // The per-connection limit (3), then a client complete frees a slot.
    for id in ["f1", "f2", "f3", "f4"] {
        send(
            &mut ws,
            json!({"type": "subscribe", "id": id, "payload": {"query": "subscription { forever }"}}),
        )
        .await;
    }
    let refused = loop {
        let message = next_json(&mut ws).await;
        if message["type"] == "error" {
            break message;
        }
    };
    assert_eq!(refused["id"], "f4");
    assert_eq!(
        refused["payload"][0]["extensions"]["code"],
        ErrorCode::TooManySubscriptions.as_str()
    );
    let gauge = state
        .metrics
        .subscriptions
        .with_label_values(&[transport::GRAPHQL_WS]);
    assert_eq!(gauge.get(), 3);
    assert_eq!(
        state
            .metrics
            .rejected_total
            .with_label_values(&["max_subscriptions"])
            .get(),
        1
    );
    for id in ["f1", "f2", "f3"] {
        send(&mut ws, json!({"type": "complete", "id": id})).await;
    }
    send(&mut ws, json!({"type": "ping"})).await;
    while next_json(&mut ws).await["type"] != "pong" {}
    assert_eq!(gauge.get(), 0);

    // A protocol violation still closes with the protocol's code.
    send(&mut ws, json!({"type": "connection_init"})).await;
    assert_eq!(
        next_close(&mut ws).await,
        (4429, "Too many initialisation requests".into())
    );
    let ops = &state.metrics.graphql_operations_total;
    // The `forever` ones count as ok or cancelled, by whether their
    // first tick beat the client's complete.
    let subscriptions =
        ["ok", "cancelled"].map(|o| ops.with_label_values(&["subscription", o]).get());
    assert_eq!(subscriptions.iter().sum::<u64>(), 4);
    assert_eq!(ops.with_label_values(&["query", "ok"]).get(), 1);
    assert_eq!(ops.with_label_values(&["mutation", "ok"]).get(), 1);
    assert_eq!(ops.with_label_values(&["query", "request_error"]).get(), 1);
    assert_eq!(closes(&state, 4429), 1);
    server.stop(false).await;
}

#[actix_web::test]
async fn the_legacy_protocol_runs_operations() {
    let (_state, addr, server) = node(|_| {}).await;
    let (mut ws, _) = connect(addr, "/test/ws", Some("graphql-ws")).await;
    send(&mut ws, json!({"type": "connection_init", "payload": {}})).await;
    assert_eq!(next_json(&mut ws).await["type"], "connection_ack");
    assert_eq!(next_json(&mut ws).await["type"], "ka");
    send_operation(&mut ws, "start", "1", "subscription { ticks(n: 2) }").await;
    expect_json(
        &mut ws,
        json!({"type": "data", "id": "1", "payload": {"data": {"ticks": 0}}}),
    )
    .await;
    expect_json(
        &mut ws,
        json!({"type": "data", "id": "1", "payload": {"data": {"ticks": 1}}}),
    )
    .await;
    expect_json(&mut ws, json!({"type": "complete", "id": "1"})).await;
    send(&mut ws, json!({"type": "connection_terminate"})).await;
    assert_eq!(next_close(&mut ws).await.0, 1000);
    server.stop(false).await;
}

#[actix_web::test]
async fn a_late_init_closes_with_4408() {
    let (state, addr, server) = node(|c| c.init_timeout = Duration::from_millis(100)).await;
    let (mut ws, _) = connect(addr, "/test/ws", Some("graphql-transport-ws")).await;
    assert_eq!(
        next_close(&mut ws).await,
        (4408, "Connection initialisation timeout".into())
    );
    let (mut ws, _) = connect(addr, "/test/ws", Some("graphql-ws")).await;
    assert_eq!(next_json(&mut ws).await["type"], "connection_error");
    assert_eq!(next_close(&mut ws).await.0, 4408);
    assert_eq!(closes(&state, 4408), 2);
    server.stop(false).await;
}

#[actix_web::test]
async fn an_oversized_frame_closes_only_its_connection() {
    let (_state, addr, server) = node(|c| c.max_frame_bytes = 1024).await;
    let (mut good, _) = connect(addr, "/test/ws", Some("graphql-transport-ws")).await;
    init(&mut good).await;
    let (mut big, _) = connect(addr, "/test/ws", Some("graphql-transport-ws")).await;
    init(&mut big).await;
    let query = format!("{{ hello {} }}", " ".repeat(100_000));
    send(
        &mut big,
        json!({"type": "subscribe", "id": "1", "payload": {"query": query}}),
    )
    .await;
    assert_eq!(next_close(&mut big).await.0, 1009);
    send_operation(&mut good, "subscribe", "1", "{ hello }").await;
    assert_eq!(
        next_json(&mut good).await["payload"]["data"]["hello"],
        "world"
    );
    server.stop(false).await;
}

#[actix_web::test]
async fn a_cut_off_connection_closes_with_1013() {
    let (_state, server, mut ws) = subscribed("c", "cut").await;
    assert_eq!(next_json(&mut ws).await["payload"]["data"]["cut"], 1);
    assert_eq!(next_close(&mut ws).await, (1013, "slow consumer".into()));
    server.stop(false).await;
}

#[actix_web::test]
async fn a_client_that_stops_reading_is_still_cut_off() {
    // No byte bound (it would cut the client off before a write blocks):
    // this is about a write that already blocks.
    let (state, server, ws) =
        subscribed_with("f", "flood", |s| s.hub.subscriber_queue_bytes = 1 << 40).await;
    // Not reading: the socket fills up and the pump blocks on a write,
    // which shows as the stream no longer being polled.
    let items = || FLOOD_ITEMS.load(std::sync::atomic::Ordering::Relaxed);
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let before = items();
            tokio::time::sleep(Duration::from_millis(100)).await;
            if before > 0 && items() == before {
                break;
            }
        }
    })
    .await
    .expect("the pump blocks on the full socket");
    assert_eq!(state.shutdown.open_connections(), 1);
    let cutoff = FLOODED.lock().unwrap().clone().expect("flood started");
    cutoff.cut(CutoffReason::SlowConsumer);
    // The blocked write yields to the cut-off; the close cannot get
    // through a full socket, so the task gives up on it and ends.
    assert_eq!(state.shutdown.drained(Duration::from_secs(3)).await, 0);
    assert_eq!(closes(&state, 1013), 1);
    assert_eq!(
        state
            .metrics
            .subscriptions
            .with_label_values(&[transport::GRAPHQL_WS])
            .get(),
        0
    );
    drop(ws);
    server.stop(false).await;
}

#[actix_web::test]
async fn the_drain_closes_with_1001() {
    let (state, server, mut ws) = subscribed("f", "forever").await;
    next_json(&mut ws).await;
    let connections = state
        .metrics
        .connections
        .with_label_values(&[transport::GRAPHQL_WS]);
    assert_eq!(connections.get(), 1);
    assert_eq!(state.shutdown.open_connections(), 1);
    state.shutdown.begin();
    assert_eq!(
        next_close(&mut ws).await,
        (1001, "server shutting down".into())
    );
    assert_eq!(state.shutdown.drained(Duration::from_secs(2)).await, 0);
    assert_eq!(connections.get(), 0);
    server.stop(false).await;
}

#[actix_web::test]
async fn a_silent_peer_is_closed_after_three_ping_intervals() {
    let (_state, addr, server) = node(|c| c.ping_interval = Duration::from_millis(50)).await;
    let (mut ws, _) = connect(addr, "/test/ws", Some("graphql-ws")).await;
    send(&mut ws, json!({"type": "connection_init"})).await;
    // Not reading: the client answers no ping.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut kas = 0;
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
        {
            Some(Ok(WsMessage::Text(text))) => kas += usize::from(text.contains("\"ka\"")),
            Some(Ok(WsMessage::Close(Some(frame)))) => {
                break (u16::from(frame.code), frame.reason.into_owned())
            }
            Some(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(close, (1001, "idle timeout".into()));
    assert!(
        kas >= 2,
        "the ack's ka and at least one periodic ka, got {kas}"
    );
    server.stop(false).await;
}
