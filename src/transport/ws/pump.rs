//! The I/O task of one GraphQL WebSocket: pumps frames between the socket,
//! a protocol machine and the connection's operation streams.
//!
//! One task per connection, selecting over:
//!
//! - the client's frames, each at most `websocket.max_frame_bytes` (and a
//!   fragmented message at most that in total); a larger one closes with
//!   1009, detected from the frame header before its payload is buffered;
//! - the operation streams, in one `StreamMap` polled in place: no task or
//!   channel per operation. While the socket is slow this task simply stops
//!   polling them, and the hub's bounded queues (with their slow-consumer
//!   cut-off) take the strain;
//! - the heartbeat: a WebSocket ping every `websocket.ping_interval_seconds`
//!   (and the protocol's own keep-alive, if it has one). A peer that has
//!   sent nothing at all, not even a pong, for three intervals is presumed
//!   gone and closed with 1001 "idle timeout" (1001 because a client that
//!   is in fact alive should simply reconnect);
//! - the `connection_init` deadline;
//! - the connection's [`Cutoff`]: fired by the hub when one of its
//!   subscriptions overflowed, it closes with 1013 "slow consumer";
//! - the node's drain: 1001 "server shutting down".
//!
//! A write that blocks (the client does not read) still yields to the
//! cut-off and the drain, so a stuck client cannot hold the task.
//!
//! The frame guard, [`receive`], [`Heartbeat`], [`Outbox`] and [`finish`]
//! serve the envelope protocol's pump as well, so that every subgate
//! WebSocket enforces the same limits and closes the same way.

use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use actix_http::error::PayloadError;
use actix_web::web::{self, Bytes, BytesMut};
use actix_web::{dev, FromRequest, HttpRequest};
use actix_ws::{
    CloseCode, CloseReason, Closed, Item, Message, MessageStream, ProtocolError, Session,
};
use async_graphql::parser::types::OperationType;
use async_graphql::{Executor, Response};
use bytestring::ByteString;
use futures_util::stream::{BoxStream, Stream, StreamExt};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::StreamMap;

use super::{Action, Protocol};
use crate::config::WebsocketSettings;
use crate::error::close;
use crate::graphql::Viewer;
use crate::hub::Cutoff;
use crate::shutdown::{DrainGuard, Shutdown};
use crate::telemetry::metrics::{GaugeGuard, Metrics};

/// RFC 6455 "protocol error": a frame the WebSocket layer rejects.
pub const PROTOCOL_ERROR: u16 = 1002;
/// RFC 6455 "invalid frame payload data": a text message that is not UTF-8.
pub const INVALID_PAYLOAD: u16 = 1007;
/// How long a close may wait on a congested socket before the connection is
/// dropped without it.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// A peer silent for this many ping intervals is presumed gone.
const IDLE_INTERVALS: u32 = 3;
/// The longest close reason a WebSocket close frame carries.
const MAX_CLOSE_REASON_BYTES: usize = 123;

/// The connection's timing and limits, in the units the task uses.
#[derive(Debug, Clone)]
pub struct PumpConfig {
    pub ping_interval: Duration,
    pub init_timeout: Duration,
    pub max_frame_bytes: usize,
    pub max_operations: usize,
}

impl PumpConfig {
    pub fn from_settings(ws: &WebsocketSettings) -> Self {
        Self {
            ping_interval: Duration::from_secs(ws.ping_interval_seconds),
            init_timeout: Duration::from_secs(ws.connection_init_timeout_seconds),
            max_frame_bytes: ws.max_frame_bytes,
            max_operations: ws.max_subscriptions_per_connection,
        }
    }
}

/// What the task needs besides the socket and the protocol machine.
pub struct Connection<E> {
    pub executor: E,
    pub config: PumpConfig,
    pub metrics: Arc<Metrics>,
    pub shutdown: Shutdown,
    /// Counts the connection as open (admission, drain) while the task runs.
    pub drain: DrainGuard,
    /// Set by [`guard_frames`] when a frame header announced too much.
    pub oversized: Arc<AtomicBool>,
}

// ---------------------------------------------------------------------------
// Frame-size guard.

/// Wraps the request body so that a frame whose header announces more than
/// `max_frame_bytes` fails the stream at once. The frame decoder alone would
/// report it only after buffering the whole payload, however large.
pub async fn guard_frames(
    req: &HttpRequest,
    body: web::Payload,
    max_frame_bytes: usize,
) -> Result<(web::Payload, Arc<AtomicBool>), actix_web::Error> {
    let oversized = Arc::new(AtomicBool::new(false));
    let guard = FrameGuard {
        inner: body.into_inner(),
        scan: FrameScan::new(max_frame_bytes as u64),
        oversized: oversized.clone(),
        failed: false,
    };
    let boxed: actix_http::BoxedPayloadStream = Box::pin(guard);
    let mut payload = dev::Payload::from(boxed);
    // Extracting a `Payload` only moves it out; it does not fail in practice.
    let body = web::Payload::from_request(req, &mut payload).await?;
    Ok((body, oversized))
}

struct FrameGuard {
    inner: dev::Payload,
    scan: FrameScan,
    oversized: Arc<AtomicBool>,
    failed: bool,
}

impl Stream for FrameGuard {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.failed {
            return Poll::Ready(None);
        }
        match ready!(Pin::new(&mut self.inner).poll_next(cx)) {
            Some(Ok(bytes)) => {
                if self.scan.feed(&bytes) {
                    Poll::Ready(Some(Ok(bytes)))
                } else {
                    self.failed = true;
                    self.oversized.store(true, Ordering::Relaxed);
                    Poll::Ready(Some(Err(PayloadError::Overflow)))
                }
            }
            other => Poll::Ready(other),
        }
    }
}

/// Follows frame boundaries in the raw client byte stream, reading only the
/// headers (RFC 6455 section 5.2) and skipping payloads.
struct FrameScan {
    header: [u8; 14],
    have: usize,
    need: usize,
    skip: u64,
    max: u64,
}

impl FrameScan {
    fn new(max: u64) -> Self {
        Self {
            header: [0; 14],
            have: 0,
            need: 2,
            skip: 0,
            max,
        }
    }

    /// `false` once a header announces a payload over the limit.
    fn feed(&mut self, mut bytes: &[u8]) -> bool {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len() as u64) as usize;
                self.skip -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            self.header[self.have] = bytes[0];
            self.have += 1;
            bytes = &bytes[1..];
            if self.have == 2 {
                let extended = match self.header[1] & 0x7f {
                    126 => 2,
                    127 => 8,
                    _ => 0,
                };
                let mask = if self.header[1] & 0x80 != 0 { 4 } else { 0 };
                self.need = 2 + extended + mask;
            }
            if self.have == self.need {
                let len = match self.header[1] & 0x7f {
                    126 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
                    127 => self.header[2..10]
                        .iter()
                        .fold(0u64, |acc, b| acc << 8 | u64::from(*b)),
                    n => u64::from(n),
                };
                if len > self.max {
                    return false;
                }
                self.skip = len;
                self.have = 0;
                self.need = 2;
            }
        }
        true
    }
}

// ---------------------------------------------------------------------------
// Fragmented messages.

pub(crate) enum Assembled {
    Text(ByteString),
    Binary,
}

pub(crate) enum FrameError {
    TooBig,
    Protocol,
    NotUtf8,
}

/// Joins a fragmented message, bounded by the frame limit in total.
pub(crate) struct Assembler {
    buf: BytesMut,
    text: bool,
    active: bool,
    max: usize,
}

impl Assembler {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            text: false,
            active: false,
            max,
        }
    }

    pub(crate) fn push(&mut self, item: Item) -> Result<Option<Assembled>, FrameError> {
        match item {
            // A new message may not start inside another.
            Item::FirstText(_) | Item::FirstBinary(_) if self.active => Err(FrameError::Protocol),
            Item::FirstText(bytes) => {
                self.begin(true);
                self.append(&bytes).map(|()| None)
            }
            Item::FirstBinary(bytes) => {
                self.begin(false);
                self.append(&bytes).map(|()| None)
            }
            Item::Continue(_) | Item::Last(_) if !self.active => Err(FrameError::Protocol),
            Item::Continue(bytes) => self.append(&bytes).map(|()| None),
            Item::Last(bytes) => {
                self.append(&bytes)?;
                self.active = false;
                let whole = self.buf.split().freeze();
                if !self.text {
                    return Ok(Some(Assembled::Binary));
                }
                ByteString::try_from(whole)
                    .map(|t| Some(Assembled::Text(t)))
                    .map_err(|_| FrameError::NotUtf8)
            }
        }
    }

    fn begin(&mut self, text: bool) {
        self.active = true;
        self.text = text;
        self.buf.clear();
    }

    fn append(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        if self.buf.len() + bytes.len() > self.max {
            return Err(FrameError::TooBig);
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Operation streams.

/// One operation's results, then one `None` to say it ended (a `StreamMap`
/// drops finished streams without telling). Holds the `subscriptions`
/// gauge up while a subscription runs.
struct OperationStream {
    inner: Option<BoxStream<'static, Response>>,
    _active: Option<GaugeGuard>,
}

impl Stream for OperationStream {
    type Item = Option<Response>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match ready!(inner.poll_next_unpin(cx)) {
            Some(response) => Poll::Ready(Some(Some(response))),
            None => {
                self.inner = None;
                Poll::Ready(Some(None))
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Writing.

/// Why the task stops.
#[derive(Debug)]
pub(crate) enum End {
    /// The peer is gone: nothing to send.
    Gone,
    /// Close with this code and reason.
    Close(u16, String),
    /// The peer closed: answer its close frame.
    Answer(Option<CloseReason>),
}

/// The socket's sending half; every write yields to the cut-off and the
/// drain, so a client that stopped reading cannot wedge the task.
pub(crate) struct Outbox {
    session: Session,
    cutoff: Arc<Cutoff>,
    shutdown: Shutdown,
}

impl Outbox {
    pub(crate) fn new(session: Session, cutoff: Arc<Cutoff>, shutdown: Shutdown) -> Self {
        Self {
            session,
            cutoff,
            shutdown,
        }
    }

    pub(crate) async fn text(&mut self, text: impl Into<ByteString>) -> Result<(), End> {
        let (cutoff, shutdown) = (self.cutoff.clone(), self.shutdown.clone());
        interruptible(self.session.text(text), &cutoff, &shutdown).await
    }

    pub(crate) async fn ping(&mut self) -> Result<(), End> {
        let (cutoff, shutdown) = (self.cutoff.clone(), self.shutdown.clone());
        interruptible(self.session.ping(b""), &cutoff, &shutdown).await
    }

    async fn pong(&mut self, payload: &[u8]) -> Result<(), End> {
        let (cutoff, shutdown) = (self.cutoff.clone(), self.shutdown.clone());
        interruptible(self.session.pong(payload), &cutoff, &shutdown).await
    }

    /// Sends the close frame if the socket takes it within [`CLOSE_GRACE`];
    /// dropping the session afterwards ends the response and the connection.
    async fn close(self, reason: Option<CloseReason>) {
        let _ = tokio::time::timeout(CLOSE_GRACE, self.session.close(reason)).await;
    }
}

async fn interruptible(
    send: impl std::future::Future<Output = Result<(), Closed>>,
    cutoff: &Cutoff,
    shutdown: &Shutdown,
) -> Result<(), End> {
    tokio::select! {
        biased;
        sent = send => sent.map_err(|Closed| End::Gone),
        _ = cutoff.fired() => Err(slow_consumer()),
        _ = shutdown.wait() => Err(going_away()),
    }
}

pub(crate) fn slow_consumer() -> End {
    End::Close(close::SLOW_CONSUMER, "slow consumer".into())
}

pub(crate) fn going_away() -> End {
    End::Close(close::GOING_AWAY, "server shutting down".into())
}

/// At most [`MAX_CLOSE_REASON_BYTES`] of `reason`, on a character boundary.
fn close_reason(code: u16, reason: &str) -> CloseReason {
    let mut end = reason.len().min(MAX_CLOSE_REASON_BYTES);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    CloseReason {
        code: CloseCode::from(code),
        description: Some(reason[..end].to_owned()),
    }
}

// ---------------------------------------------------------------------------
// Reading, heartbeat and closing: what every WebSocket pump shares.

/// What one frame from the client amounts to.
pub(crate) enum Received {
    /// A complete text message (joined from its fragments).
    Text(ByteString),
    /// A complete binary message.
    Binary,
    /// A control frame handled here, or a fragment of a message still open.
    Nothing,
}

/// Interprets one item of the client's frame stream: joins fragments within
/// the frame limit, answers pings, and says when the connection must end
/// (1009 for an oversized frame, 1002/1007 for a broken one, or the peer's
/// own close).
pub(crate) async fn receive(
    frame: Option<Result<Message, ProtocolError>>,
    assembler: &mut Assembler,
    oversized: &AtomicBool,
    outbox: &mut Outbox,
) -> Result<Received, End> {
    match frame {
        None => Err(End::Gone),
        Some(Err(error)) => {
            if oversized.load(Ordering::Relaxed) || matches!(error, ProtocolError::Overflow) {
                return Err(End::Close(close::MESSAGE_TOO_BIG, "frame too large".into()));
            }
            Err(End::Close(PROTOCOL_ERROR, "protocol error".into()))
        }
        Some(Ok(Message::Text(text))) => Ok(Received::Text(text)),
        Some(Ok(Message::Binary(_))) => Ok(Received::Binary),
        Some(Ok(Message::Continuation(item))) => match assembler.push(item) {
            Ok(None) => Ok(Received::Nothing),
            Ok(Some(Assembled::Text(text))) => Ok(Received::Text(text)),
            Ok(Some(Assembled::Binary)) => Ok(Received::Binary),
            Err(FrameError::TooBig) => Err(End::Close(
                close::MESSAGE_TOO_BIG,
                "message too large".into(),
            )),
            Err(FrameError::Protocol) => Err(End::Close(PROTOCOL_ERROR, "protocol error".into())),
            Err(FrameError::NotUtf8) => {
                Err(End::Close(INVALID_PAYLOAD, "text is not UTF-8".into()))
            }
        },
        Some(Ok(Message::Ping(payload))) => outbox.pong(&payload).await.map(|()| Received::Nothing),
        Some(Ok(Message::Pong(_) | Message::Nop)) => Ok(Received::Nothing),
        Some(Ok(Message::Close(reason))) => Err(End::Answer(reason)),
    }
}

/// The server's heartbeat: a WebSocket ping every interval, and the idle
/// rule (a peer silent for [`IDLE_INTERVALS`] intervals is presumed gone).
pub(crate) struct Heartbeat {
    interval: tokio::time::Interval,
    idle_limit: Duration,
    last_heard: Instant,
}

impl Heartbeat {
    pub(crate) fn new(ping_interval: Duration) -> Self {
        // A zero period would make the interval panic; settings forbid it,
        // this keeps a hand-built config from doing so.
        let period = ping_interval.max(Duration::from_millis(1));
        let mut interval = tokio::time::interval_at(Instant::now() + period, period);
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self {
            interval,
            idle_limit: period * IDLE_INTERVALS,
            last_heard: Instant::now(),
        }
    }

    /// Resolves at the next beat.
    pub(crate) async fn tick(&mut self) {
        self.interval.tick().await;
    }

    /// The peer sent something (any frame, a pong included).
    pub(crate) fn heard(&mut self) {
        self.last_heard = Instant::now();
    }

    /// At a beat: closes an idle peer with 1001 "idle timeout" (1001 because
    /// a client that is in fact alive should simply reconnect), else pings.
    pub(crate) async fn beat(&mut self, outbox: &mut Outbox) -> Result<(), End> {
        if self.last_heard.elapsed() >= self.idle_limit {
            return Err(End::Close(close::GOING_AWAY, "idle timeout".into()));
        }
        outbox.ping().await
    }
}

/// Ends the connection as `end` says, counting the closes the node decides
/// on in `ws_closes_total`.
pub(crate) async fn finish(outbox: Outbox, end: End, metrics: &Metrics, transport: &'static str) {
    match end {
        End::Gone => tracing::debug!(transport, "WebSocket peer went away"),
        End::Close(code, reason) => {
            tracing::debug!(transport, code, %reason, "closing WebSocket");
            metrics
                .ws_closes_total
                .with_label_values(&[&code.to_string()])
                .inc();
            outbox.close(Some(close_reason(code, &reason))).await;
        }
        End::Answer(reason) => {
            // Echo the peer's code, as RFC 6455 asks; not counted, as the
            // metric counts closes the node decides on.
            outbox
                .close(reason.map(|r| CloseReason {
                    code: r.code,
                    description: None,
                }))
                .await;
        }
    }
}

// ---------------------------------------------------------------------------
// The task.

/// What woke the task. Lives for one loop turn on the stack, so the size of
/// the `Response` variant costs nothing worth an allocation per result.
#[allow(clippy::large_enum_variant)]
enum Event {
    Drain,
    Cut,
    Frame(Option<Result<Message, ProtocolError>>),
    Result(String, Option<Response>),
    InitTimeout,
    Heartbeat,
}

/// Serves one connection until either side closes it.
pub async fn run<E: Executor, P: Protocol>(
    connection: Connection<E>,
    mut machine: P,
    session: Session,
    mut messages: MessageStream,
) {
    let Connection {
        executor,
        config,
        metrics,
        shutdown,
        drain,
        oversized,
    } = connection;
    let _drain = drain;
    let transport = P::TRANSPORT;
    metrics
        .connections_total
        .with_label_values(&[transport])
        .inc();
    let _open = GaugeGuard::new(metrics.connections.with_label_values(&[transport]));

    let cutoff = Cutoff::new();
    let mut outbox = Outbox::new(session, cutoff.clone(), shutdown.clone());
    let mut operations: StreamMap<String, OperationStream> = StreamMap::new();
    let mut assembler = Assembler::new(config.max_frame_bytes);
    let mut heartbeat = Heartbeat::new(config.ping_interval);
    let mut init_timer = pin!(tokio::time::sleep(config.init_timeout));
    let mut init_timer_armed = true;
    let mut drained = pin!(shutdown.wait());
    let mut cut = pin!(cutoff.fired());

    let end = 'connection: loop {
        let event = tokio::select! {
            _ = &mut drained => Event::Drain,
            _ = &mut cut => Event::Cut,
            frame = messages.next() => Event::Frame(frame),
            Some((id, result)) = operations.next(), if !operations.is_empty() => Event::Result(id, result),
            _ = &mut init_timer, if init_timer_armed && !machine.is_initialised() => Event::InitTimeout,
            () = heartbeat.tick() => Event::Heartbeat,
        };
        let actions = match event {
            Event::Drain => break going_away(),
            Event::Cut => break slow_consumer(),
            Event::Frame(frame) => {
                heartbeat.heard();
                match receive(frame, &mut assembler, &oversized, &mut outbox).await {
                    Ok(Received::Text(text)) => machine.on_text(&text),
                    Ok(Received::Binary) => machine.on_binary(),
                    Ok(Received::Nothing) => Vec::new(),
                    Err(end) => break end,
                }
            }
            Event::Result(id, Some(response)) => machine.on_response(&id, response),
            Event::Result(id, None) => machine.on_end(&id),
            Event::InitTimeout => {
                init_timer_armed = false;
                machine.on_init_timeout()
            }
            Event::Heartbeat => {
                if let Err(end) = heartbeat.beat(&mut outbox).await {
                    break end;
                }
                machine.on_heartbeat()
            }
        };
        for action in actions {
            match action {
                Action::Send(text) => {
                    if let Err(end) = outbox.text(text).await {
                        break 'connection end;
                    }
                }
                Action::Close(code, reason) => break 'connection End::Close(code, reason),
                Action::Start(operation) => {
                    let active = (operation.kind == Some(OperationType::Subscription)).then(|| {
                        GaugeGuard::new(metrics.subscriptions.with_label_values(&[transport]))
                    });
                    let operation = *operation;
                    let request = operation
                        .request
                        .data(Viewer(operation.principal))
                        // The subscription resolvers hand this to the hub,
                        // which fires it when this connection falls behind.
                        .data(cutoff.clone());
                    let results = executor.execute_stream(request, None);
                    operations.insert(
                        operation.id,
                        OperationStream {
                            inner: Some(results),
                            _active: active,
                        },
                    );
                }
                Action::Stop(id) => {
                    operations.remove(&id);
                }
                Action::Count { ty, outcome } => {
                    metrics
                        .graphql_operations_total
                        .with_label_values(&[ty, outcome])
                        .inc();
                }
                Action::Reject(reason) => metrics.rejected_total.with_label_values(&[reason]).inc(),
            }
        }
    };

    // Release the operations (and their hub places) before the close goes
    // out, so that nothing is delivered after it.
    drop(operations);
    finish(outbox, end, &metrics, transport).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(len: usize) -> Vec<u8> {
        // A masked text frame header, as a client sends it.
        let mut h = vec![0x81];
        if len < 126 {
            h.push(0x80 | len as u8);
        } else if len <= u16::MAX as usize {
            h.push(0x80 | 126);
            h.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            h.push(0x80 | 127);
            h.extend_from_slice(&(len as u64).to_be_bytes());
        }
        h.extend_from_slice(&[1, 2, 3, 4]);
        h
    }

    fn frame(len: usize) -> Vec<u8> {
        let mut f = header(len);
        f.extend(std::iter::repeat_n(b'x', len));
        f
    }

    #[test]
    fn the_scan_follows_frames_across_chunks() {
        let mut stream = Vec::new();
        for len in [0, 5, 125, 126, 1000, 65535, 70000] {
            stream.extend(frame(len));
        }
        for chunk_size in [1, 3, 7, 100, 4096, stream.len()] {
            let mut scan = FrameScan::new(70000);
            assert!(
                stream.chunks(chunk_size).all(|c| scan.feed(c)),
                "chunks of {chunk_size}"
            );
            assert_eq!((scan.have, scan.skip), (0, 0));
        }
    }

    #[test]
    fn the_scan_stops_at_an_oversized_header_before_its_payload() {
        for len in [126, 70000, 1 << 40] {
            let mut scan = FrameScan::new(125);
            assert!(scan.feed(&frame(10)));
            assert!(!scan.feed(&header(len)), "{len}");
        }
        let mut scan = FrameScan::new(125);
        assert!(scan.feed(&frame(125)));
    }

    #[test]
    fn fragments_join_within_the_limit() {
        let mut a = Assembler::new(10);
        assert!(matches!(
            a.push(Item::FirstText(Bytes::from_static(b"ab"))),
            Ok(None)
        ));
        assert!(matches!(
            a.push(Item::Continue(Bytes::from_static(b"cd"))),
            Ok(None)
        ));
        match a.push(Item::Last(Bytes::from_static(b"ef"))) {
            Ok(Some(Assembled::Text(t))) => assert_eq!(&*t, "abcdef"),
            _ => panic!("expected text"),
        }
        assert!(matches!(
            a.push(Item::FirstBinary(Bytes::from_static(b"x"))),
            Ok(None)
        ));
        assert!(matches!(
            a.push(Item::Last(Bytes::from_static(b"y"))),
            Ok(Some(Assembled::Binary))
        ));
        assert!(matches!(
            a.push(Item::FirstText(Bytes::from_static(b"123456"))),
            Ok(None)
        ));
        assert!(matches!(
            a.push(Item::Last(Bytes::from_static(b"78901"))),
            Err(FrameError::TooBig)
        ));
        let mut a = Assembler::new(10);
        assert!(matches!(
            a.push(Item::Continue(Bytes::new())),
            Err(FrameError::Protocol)
        ));
        assert!(matches!(
            a.push(Item::FirstText(Bytes::from_static(&[0xff]))),
            Ok(None)
        ));
        assert!(matches!(
            a.push(Item::FirstText(Bytes::new())),
            Err(FrameError::Protocol)
        ));
        let mut a = Assembler::new(10);
        a.push(Item::FirstText(Bytes::from_static(&[0xff]))).ok();
        assert!(matches!(
            a.push(Item::Last(Bytes::new())),
            Err(FrameError::NotUtf8)
        ));
    }

    #[test]
    fn close_reasons_fit_a_close_frame() {
        let long = "é".repeat(100);
        let reason = close_reason(4400, &long);
        assert!(reason.description.unwrap().len() <= MAX_CLOSE_REASON_BYTES);
    }
}
