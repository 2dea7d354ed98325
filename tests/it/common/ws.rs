//! A GraphQL-over-WebSocket client that speaks both subprotocols:
//! `graphql-transport-ws` (subscribe/next/error/complete, ping/pong) and the
//! legacy `graphql-ws` of subscriptions-transport-ws (start/data/stop, ka).
//! Every read is bounded by a timeout that fails with what was expected.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

pub const TRANSPORT_WS: &str = "graphql-transport-ws";
pub const LEGACY_WS: &str = "graphql-ws";

/// How a connection attempt is made.
#[derive(Default, Clone)]
pub struct ConnectOptions<'a> {
    /// `Sec-WebSocket-Protocol` to offer (None: none offered).
    pub subprotocol: Option<&'a str>,
    /// An `Origin` header, as a browser would send.
    pub origin: Option<&'a str>,
    /// SO_RCVBUF for the client socket: a small one makes a client that
    /// stops reading back up sooner.
    pub recv_buffer_bytes: Option<u32>,
}

/// One read from the socket.
#[derive(Debug)]
pub enum Read {
    Message(Value),
    /// A close frame (code, reason); 1005 when the frame had no code, 1006
    /// when the connection ended without any close frame.
    Closed(u16, String),
    TimedOut,
}

pub struct GqlWs {
    socket: WebSocketStream<TcpStream>,
    /// The subprotocol the server accepted.
    pub protocol: String,
    closed: Option<(u16, String)>,
}

/// Opens a WebSocket; `Err` carries tungstenite's error (an HTTP refusal of
/// the upgrade is `Error::Http(response)`).
pub async fn try_connect(
    url: &str,
    options: ConnectOptions<'_>,
) -> Result<GqlWs, tungstenite::Error> {
    let mut request = url.into_client_request()?;
    if let Some(protocol) = options.subprotocol {
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_str(protocol).unwrap(),
        );
    }
    if let Some(origin) = options.origin {
        request
            .headers_mut()
            .insert("Origin", HeaderValue::from_str(origin).unwrap());
    }
    let host = request.uri().host().expect("a host in the URL").to_owned();
    let port = request.uri().port_u16().expect("a port in the URL");
    let addr: std::net::SocketAddr = format!("{host}:{port}")
        .parse()
        .expect("a numeric address in the URL");
    let socket = TcpSocket::new_v4()?;
    if let Some(bytes) = options.recv_buffer_bytes {
        socket.set_recv_buffer_size(bytes)?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    // Generous client limits: the slow-consumer test reads 50 KB messages.
    let config = WebSocketConfig {
        max_message_size: Some(64 << 20),
        max_frame_size: Some(64 << 20),
        ..Default::default()
    };
    let (socket, response) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await?;
    let protocol = response
        .headers()
        .get("Sec-WebSocket-Protocol")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    Ok(GqlWs {
        socket,
        protocol,
        closed: None,
    })
}

impl GqlWs {
    /// Connects offering `subprotocol`; panics (with the reason) if the
    /// server refuses the upgrade or picks another subprotocol.
    pub async fn connect(url: &str, subprotocol: &str) -> GqlWs {
        let attempt = try_connect(
            url,
            ConnectOptions {
                subprotocol: Some(subprotocol),
                ..Default::default()
            },
        );
        let ws = match tokio::time::timeout(Duration::from_secs(10), attempt).await {
            Err(_) => panic!("the WebSocket handshake with {url} did not finish within 10s"),
            Ok(Err(e)) => panic!("the WebSocket upgrade at {url} with {subprotocol} failed: {e}"),
            Ok(Ok(ws)) => ws,
        };
        assert_eq!(
            ws.protocol, subprotocol,
            "the server accepted another subprotocol at {url}"
        );
        ws
    }

    pub fn legacy(&self) -> bool {
        self.protocol == LEGACY_WS
    }

    pub async fn send_text(&mut self, text: impl Into<String>) {
        self.socket
            .send(Message::Text(text.into()))
            .await
            .expect("send a WebSocket text frame");
    }

    pub async fn send_json(&mut self, message: Value) {
        self.send_text(message.to_string()).await;
    }

    /// Sends a raw WebSocket message; `Err` if the socket is already gone.
    pub async fn send_raw(&mut self, message: Message) -> Result<(), tungstenite::Error> {
        self.socket.send(message).await
    }

    pub async fn connection_init(&mut self, payload: Value) {
        self.send_json(json!({ "type": "connection_init", "payload": payload }))
            .await;
    }

    /// `connection_init` and its `connection_ack` (within 5s).
    pub async fn init_ack(&mut self, payload: Value) -> Value {
        self.connection_init(payload.clone()).await;
        let ack = self.next_message(Duration::from_secs(5)).await;
        assert_eq!(
            ack["type"], "connection_ack",
            "connection_init {payload} was not acknowledged: {ack}"
        );
        ack
    }

    /// Starts an operation: `subscribe` (or `start` on the legacy protocol).
    pub async fn subscribe(&mut self, id: &str, query: &str, variables: Value) {
        let kind = if self.legacy() { "start" } else { "subscribe" };
        self.send_json(json!({ "id": id, "type": kind, "payload": { "query": query, "variables": variables } }))
            .await;
    }

    /// Stops an operation: `complete` (or `stop` on the legacy protocol).
    pub async fn complete(&mut self, id: &str) {
        let kind = if self.legacy() { "stop" } else { "complete" };
        self.send_json(json!({ "id": id, "type": kind })).await;
    }

    /// Protocol-level ping; returns once the pong arrives.
    pub async fn ping_pong(&mut self) {
        self.send_json(json!({ "type": "ping" })).await;
        let pong = self.next_message(Duration::from_secs(5)).await;
        assert_eq!(
            pong["type"], "pong",
            "expected the pong to our ping, got {pong}"
        );
    }

    /// The next protocol message within `timeout`. Keep-alives (`ka`) and
    /// server pings are handled here (a ping is answered with a pong), as
    /// a conforming client does, and are never returned.
    pub async fn read(&mut self, timeout: Duration) -> Read {
        if let Some((code, reason)) = &self.closed {
            return Read::Closed(*code, reason.clone());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let frame = match tokio::time::timeout_at(deadline, self.socket.next()).await {
                Err(_) => return Read::TimedOut,
                Ok(frame) => frame,
            };
            let text = match frame {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Binary(bytes))) => String::from_utf8(bytes)
                    .unwrap_or_else(|_| panic!("the server sent a non-UTF-8 binary frame")),
                // tungstenite answers WebSocket pings itself while reading.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Close(frame))) => {
                    let closed = frame.map_or((1005, String::new()), |f| {
                        (u16::from(f.code), f.reason.into_owned())
                    });
                    self.closed = Some(closed.clone());
                    return Read::Closed(closed.0, closed.1);
                }
                // A reset or an end without a close frame: 1006, as browsers report it.
                Some(Err(_)) | None => {
                    self.closed = Some((1006, String::new()));
                    return Read::Closed(1006, String::new());
                }
            };
            let message: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("the server sent a non-JSON message ({e}): {text}"));
            match message["type"].as_str() {
                Some("ka") if self.legacy() => continue,
                Some("ping") if !self.legacy() => {
                    self.send_json(json!({ "type": "pong" })).await;
                    continue;
                }
                _ => return Read::Message(message),
            }
        }
    }

    /// The next protocol message; panics on a timeout or a close.
    pub async fn next_message(&mut self, timeout: Duration) -> Value {
        match self.read(timeout).await {
            Read::Message(message) => message,
            Read::TimedOut => panic!("no message from the server within {timeout:?}"),
            Read::Closed(code, reason) => panic!(
                "the server closed the connection ({code} {reason:?}) while a message was expected"
            ),
        }
    }

    /// The payload of the next `next` (or legacy `data`) message for `id`;
    /// panics on anything else.
    pub async fn next_data(&mut self, id: &str, timeout: Duration) -> Value {
        let message = self.next_message(timeout).await;
        let kind = if self.legacy() { "data" } else { "next" };
        assert!(
            message["type"] == kind && message["id"] == id,
            "expected `{kind}` for operation {id:?}, got {message}"
        );
        message["payload"].clone()
    }

    /// Reads until the server closes; returns (code, reason). Messages that
    /// arrive first are skipped (they were in flight); a timeout panics.
    pub async fn expect_close(&mut self, timeout: Duration) -> (u16, String) {
        let deadline = Instant::now() + timeout;
        loop {
            match self
                .read(deadline.saturating_duration_since(Instant::now()))
                .await
            {
                Read::Closed(code, reason) => return (code, reason),
                Read::Message(_) => continue,
                Read::TimedOut => {
                    panic!("the server did not close the connection within {timeout:?}")
                }
            }
        }
    }

    /// Like [`GqlWs::expect_close`], also returning the messages read first.
    pub async fn read_until_close(&mut self, timeout: Duration) -> (Vec<Value>, (u16, String)) {
        let deadline = Instant::now() + timeout;
        let mut messages = Vec::new();
        loop {
            match self
                .read(deadline.saturating_duration_since(Instant::now()))
                .await
            {
                Read::Closed(code, reason) => return (messages, (code, reason)),
                Read::Message(message) => messages.push(message),
                Read::TimedOut => panic!(
                    "the server did not close the connection within {timeout:?} ({} messages read)",
                    messages.len()
                ),
            }
        }
    }
}

/// Publishes markers until every client has received one on operation
/// `id`, then reads each client up to the message of the last marker.
///
/// A subscription goes live asynchronously after `subscribe` is sent (the
/// protocol has no acknowledgement for it), so a test that publishes once
/// and waits could miss its event. After this returns, every event
/// published later must reach every client, in order.
///
/// `publish(n)` causes one event and returns a string that the resulting
/// message contains (a unique title, an id). Deliveries for other operations
/// of the same connection are skipped; anything else for `id` (an error, a
/// complete) fails the test.
pub async fn until_live(
    clients: &mut [&mut GqlWs],
    id: &str,
    mut publish: impl AsyncFnMut(usize) -> String,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut live = vec![false; clients.len()];
    let mut seen_last = vec![false; clients.len()];
    let mut last = String::new();
    for attempt in 0.. {
        assert!(
            Instant::now() < deadline,
            "operation {id:?} did not deliver anything within 20s ({attempt} events published; live: {live:?})"
        );
        last = publish(attempt).await;
        for (i, client) in clients.iter_mut().enumerate() {
            seen_last[i] = false;
            if live[i] {
                continue;
            }
            let window = Instant::now() + Duration::from_millis(200);
            while let Some(message) = client
                .delivery(id, window.saturating_duration_since(Instant::now()))
                .await
            {
                if message["id"] == id {
                    live[i] = true;
                    seen_last[i] = message.to_string().contains(&last);
                    break;
                }
            }
        }
        if live.iter().all(|l| *l) {
            break;
        }
    }
    for (i, client) in clients.iter_mut().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !seen_last[i] {
            let message = client
                .delivery(id, deadline.saturating_duration_since(Instant::now()))
                .await
                .unwrap_or_else(|| panic!("operation {id:?} did not deliver the last warm-up event {last:?} within 10s (does its selection include the marker?)"));
            seen_last[i] = message["id"] == id && message.to_string().contains(&last);
        }
    }
}

impl GqlWs {
    /// The next `next`/`data` message (of any operation) within `timeout`,
    /// or None on timeout. The end (`complete`) of another operation is
    /// skipped; anything else fails, naming operation `id`.
    pub async fn delivery(&mut self, id: &str, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            match self
                .read(deadline.saturating_duration_since(Instant::now()))
                .await
            {
                Read::Message(message) => {
                    let kind = message["type"].as_str().unwrap_or("");
                    if kind == "complete" && message["id"] != id {
                        continue;
                    }
                    assert!(
                        kind == "next" || kind == "data",
                        "while waiting for operation {id:?} to deliver, got {message}"
                    );
                    return Some(message);
                }
                Read::TimedOut => return None,
                Read::Closed(code, reason) => {
                    panic!("closed ({code} {reason:?}) while waiting for operation {id:?}")
                }
            }
        }
    }
}

/// A WebSocket client written by hand over a TCP socket, for peers that a
/// real client library cannot imitate: one that never answers a ping (a
/// library answers them while reading) or never reads at all.
pub struct RawWs {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawWs {
    /// Completes the opening handshake on `path` offering `subprotocol`.
    pub async fn upgrade(addr: std::net::SocketAddr, path: &str, subprotocol: &str) -> RawWs {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: {subprotocol}\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .expect("send the upgrade request");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
                .await
                .expect("no upgrade response within 5s")
                .expect("read the upgrade response");
            assert!(n > 0, "the server closed during the handshake");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        assert!(
            head.starts_with("HTTP/1.1 101"),
            "the upgrade was refused: {head}"
        );
        buf.drain(..head_end);
        RawWs { stream, buf }
    }

    /// Sends one masked text frame (clients must mask).
    pub async fn send_text(&mut self, text: &str) {
        let payload = text.as_bytes();
        let mask = [0x37u8, 0xfa, 0x21, 0x3d];
        let mut frame = vec![0x81];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= u16::MAX as usize => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&frame).await.expect("send a frame");
    }

    /// Reads frames, answering nothing, until the server sends a close
    /// frame or drops the connection: (pings seen, close code, when).
    /// Pings are WebSocket pings and graphql-transport-ws `ping` messages.
    pub async fn read_until_closed(&mut self) -> (usize, Option<u16>, Instant) {
        let mut pings = 0;
        let mut chunk = [0u8; 16384];
        loop {
            while let Some((opcode, body)) = self.take_frame() {
                match opcode {
                    0x9 => pings += 1,
                    0x1 if String::from_utf8_lossy(&body).contains(r#""type":"ping""#) => {
                        pings += 1
                    }
                    0x8 => {
                        let code =
                            (body.len() >= 2).then(|| u16::from_be_bytes([body[0], body[1]]));
                        return (pings, code, Instant::now());
                    }
                    _ => {}
                }
            }
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return (pings, None, Instant::now()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// One complete server (unmasked) frame from the buffer, if there is one.
    fn take_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        let buf = &self.buf;
        if buf.len() < 2 {
            return None;
        }
        let (len, header) = match buf[1] & 0x7f {
            126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
            127 if buf.len() >= 10 => (
                u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
                10,
            ),
            126 | 127 => return None,
            n => (n as usize, 2),
        };
        if buf.len() < header + len {
            return None;
        }
        let opcode = buf[0] & 0x0f;
        let body = buf[header..header + len].to_vec();
        self.buf.drain(..header + len);
        Some((opcode, body))
    }
}
