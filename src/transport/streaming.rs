//! The body of an event-stream response (`text/event-stream`), written by
//! both SSE transports: the wire format ([`frame`]) and the task that feeds
//! one response ([`Streaming`]).
//!
//! One task per stream writes into a small bounded queue that the response
//! body drains; every wait in it yields to the cut-off, the drain and the
//! client going away, so a client that stops reading cannot hold it.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header;
use actix_web::web::{Bytes, BytesMut};
use actix_web::HttpResponse;
use futures_util::stream::{BoxStream, StreamExt};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;

use crate::broker::GapReason;
use crate::hub::Cutoff;
use crate::shutdown::{DrainGuard, Shutdown};
use crate::state::AppState;
use crate::telemetry::metrics::{GaugeGuard, Metrics};
use crate::transport::socket::Expiry;

/// Frames queued between a stream's task and its response body. Small on
/// purpose: the hub's per-subscriber queue is where a slow client is
/// measured, not here.
const WRITE_QUEUE: usize = 8;

/// The event-stream wire format.
pub mod frame {
    use super::*;

    /// The heartbeat of the event stream: a comment, then a blank line.
    pub const PING: &[u8] = b": ping\n\n";

    /// The reconnection delay for `EventSource`.
    pub fn retry(ms: u64) -> Bytes {
        Bytes::from(format!("retry: {ms}\n\n"))
    }

    /// One event: `event:`, `id:` when given, a `data:` line per line of
    /// `data`, and the blank line that dispatches it.
    pub fn event(kind: &str, id: Option<&str>, data: &str) -> Bytes {
        let mut out =
            BytesMut::with_capacity(kind.len() + id.map_or(0, str::len) + data.len() + 24);
        field(&mut out, "event", kind);
        if let Some(id) = id {
            field(&mut out, "id", id);
        }
        // A value holding a line break would end its field early: each line
        // of the data gets its own `data:` line (the client joins them with
        // `\n` again). Encoded JSON has none, so the usual case is one line.
        let mut rest = data;
        loop {
            let (line, next) = match rest.find(['\r', '\n']) {
                None => (rest, None),
                Some(at) => {
                    let skip = if rest[at..].starts_with("\r\n") { 2 } else { 1 };
                    (&rest[..at], Some(&rest[at + skip..]))
                }
            };
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\n");
            match next {
                Some(next) => rest = next,
                None => break,
            }
        }
        out.extend_from_slice(b"\n");
        out.freeze()
    }

    /// A block with only `id:`: it moves the client's last event id and
    /// dispatches nothing.
    pub fn id(id: &str) -> Bytes {
        let mut out = BytesMut::with_capacity(id.len() + 6);
        field(&mut out, "id", id);
        out.extend_from_slice(b"\n");
        out.freeze()
    }

    /// The event name of [`gap`]: reserved, no backend may publish it
    /// (`crate::domain::publishing::is_reserved_type`).
    pub const GAP: &str = "gap";

    /// `event: gap` for `topic`.
    pub fn gap(topic: &str, reason: GapReason) -> Bytes {
        event(
            GAP,
            None,
            &json!({ "topic": topic, "reason": reason.as_str() }).to_string(),
        )
    }

    /// A one-line field; line breaks are dropped rather than allowed to
    /// start a field of their own.
    fn field(out: &mut BytesMut, name: &str, value: &str) {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        if value.contains(['\r', '\n']) {
            out.extend_from_slice(value.replace(['\r', '\n'], "").as_bytes());
        } else {
            out.extend_from_slice(value.as_bytes());
        }
        out.extend_from_slice(b"\n");
    }
}

/// One streaming response: what bounds it besides its frames.
pub struct Streaming {
    /// The `transport` metric label.
    transport: &'static str,
    /// How long the stream may be quiet before `ping` is written.
    heartbeat: Duration,
    ping: &'static [u8],
    /// Fired by the hub when one of the stream's subscriptions fell behind.
    cutoff: Arc<Cutoff>,
    shutdown: Shutdown,
    /// Counts the stream as an open connection (admission, drain).
    drain: DrainGuard,
    metrics: Arc<Metrics>,
    /// Gauges held up for as long as the stream runs (its subscriptions).
    held: Vec<GaugeGuard>,
    /// When the token the stream was opened with expires (seconds since
    /// the Unix epoch), and the frame that says so before the stream ends.
    expiry: Option<(u64, Bytes)>,
}

impl Streaming {
    /// A stream of `transport` on this node: its heartbeat every
    /// `sse.heartbeat_seconds` (written as `ping`), ended by the node's
    /// drain or by `cutoff`.
    pub fn new(
        state: &AppState,
        transport: &'static str,
        ping: &'static [u8],
        cutoff: Arc<Cutoff>,
        drain: DrainGuard,
        held: Vec<GaugeGuard>,
    ) -> Self {
        Self {
            transport,
            heartbeat: Duration::from_secs(state.settings.sse.heartbeat_seconds),
            ping,
            cutoff,
            shutdown: state.shutdown.clone(),
            drain,
            metrics: state.metrics.clone(),
            held,
            expiry: None,
        }
    }

    /// Ends the stream when its token expires (`expires_at`, as
    /// [`crate::auth::Principal::expires_at`]), with `farewell` as its last
    /// frame. A client opens a new stream with a fresh token and resumes.
    pub fn expiring(mut self, expires_at: Option<u64>, farewell: Bytes) -> Self {
        self.expiry = expires_at.map(|at| (at, farewell));
        self
    }
}

/// Why a stream's task ended.
#[derive(Debug, Clone, Copy)]
enum End {
    /// The frames ran out (a GraphQL operation completed).
    Complete,
    /// The node drains.
    Drain,
    /// A subscription fell behind and was cut off.
    SlowConsumer,
    /// The client went away.
    Gone,
    /// The token the stream was opened with expired.
    Expired,
}

impl Streaming {
    /// Answers 200 with the SSE headers and a body fed by a task that
    /// writes `opening`, then `frames` with heartbeats in between, until the
    /// frames end, the client leaves, the node drains or the hub cuts the
    /// stream off.
    pub fn respond(self, opening: Vec<Bytes>, frames: BoxStream<'static, Bytes>) -> HttpResponse {
        let (tx, rx) = mpsc::channel::<Bytes>(WRITE_QUEUE);
        self.metrics
            .connections_total
            .with_label_values(&[self.transport])
            .inc();
        actix_web::rt::spawn(self.run(opening, frames, tx));
        HttpResponse::Ok()
            .insert_header((header::CONTENT_TYPE, "text/event-stream"))
            .insert_header((header::CACHE_CONTROL, "no-cache"))
            // Reverse proxies (nginx) must pass each event on at once.
            .insert_header(("X-Accel-Buffering", "no"))
            // No `Connection: keep-alive`: HTTP/1.1 connections persist by
            // default, HTTP/2 forbids the header, and actix writes the
            // header itself (only for HTTP/1.0, which cannot stream this).
            .streaming(ReceiverStream::new(rx).map(Ok::<_, Infallible>))
    }

    async fn run(
        self,
        opening: Vec<Bytes>,
        mut frames: BoxStream<'static, Bytes>,
        tx: mpsc::Sender<Bytes>,
    ) {
        let Streaming {
            transport,
            heartbeat,
            ping,
            cutoff,
            shutdown,
            drain,
            metrics,
            held,
            expiry,
        } = self;
        let _drain = drain;
        let (expires_at, mut farewell) = expiry.unzip();
        let mut expiry = Expiry::new();
        expiry.follow(expires_at);
        let _held = held;
        let _open = GaugeGuard::new(metrics.connections.with_label_values(&[transport]));
        let mut beat = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
        beat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut pending = opening
            .into_iter()
            .collect::<std::collections::VecDeque<_>>();
        let end = loop {
            let frame = match pending.pop_front() {
                Some(frame) => frame,
                None => tokio::select! {
                    biased;
                    _ = shutdown.wait() => break End::Drain,
                    _ = cutoff.fired() => break End::SlowConsumer,
                    _ = tx.closed() => break End::Gone,
                    next = frames.next() => match next {
                        Some(frame) => frame,
                        None => break End::Complete,
                    },
                    _ = beat.tick() => Bytes::from_static(ping),
                    () = expiry.wait() => {
                        if let Some(farewell) = farewell.take() {
                            // Best effort: the stream ends either way.
                            let _ = write(&tx, farewell, &cutoff, &shutdown).await;
                        }
                        break End::Expired;
                    }
                },
            };
            if let Err(end) = write(&tx, frame, &cutoff, &shutdown).await {
                break end;
            }
            beat.reset();
        };
        tracing::debug!(transport, ?end, "event stream ended");
        // Dropping `tx` ends the body once the client has read what is
        // queued; dropping `frames` releases the hub subscriptions.
    }
}

/// Queues one frame for the body, yielding to the cut-off and the drain
/// while the client is not reading.
async fn write(
    tx: &mpsc::Sender<Bytes>,
    frame: Bytes,
    cutoff: &Cutoff,
    shutdown: &Shutdown,
) -> Result<(), End> {
    match tx.try_send(frame) {
        Ok(()) => Ok(()),
        Err(mpsc::error::TrySendError::Closed(_)) => Err(End::Gone),
        Err(mpsc::error::TrySendError::Full(frame)) => tokio::select! {
            biased;
            sent = tx.send(frame) => sent.map_err(|_| End::Gone),
            _ = cutoff.fired() => Err(End::SlowConsumer),
            _ = shutdown.wait() => Err(End::Drain),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(bytes: Bytes) -> String {
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[test]
    fn backends_may_not_publish_the_gap_event() {
        assert!(crate::domain::publishing::is_reserved_type(frame::GAP));
    }

    #[test]
    fn an_event_is_one_block_of_fields() {
        let data = r#"{"id":"e1:3","type":"post.created"}"#;
        assert_eq!(
            text(frame::event("post.created", Some("e1:3"), data)),
            format!("event: post.created\nid: e1:3\ndata: {data}\n\n")
        );
        assert_eq!(
            text(frame::event("x", None, "{}")),
            "event: x\ndata: {}\n\n"
        );
        assert_eq!(text(frame::retry(3000)), "retry: 3000\n\n");
        assert_eq!(text(frame::id("posts~ab:1")), "id: posts~ab:1\n\n");
        assert_eq!(
            text(frame::gap("posts", GapReason::Expired)),
            "event: gap\ndata: {\"reason\":\"expired\",\"topic\":\"posts\"}\n\n"
        );
    }

    #[test]
    fn line_breaks_cannot_break_out_of_a_field() {
        // Every kind of line break in the data becomes a `data:` line of
        // its own, which the client joins with `\n` again.
        assert_eq!(
            text(frame::event("x", None, "a\nb\r\nc\rd")),
            "event: x\ndata: a\ndata: b\ndata: c\ndata: d\n\n"
        );
        assert_eq!(text(frame::event("x", None, "")), "event: x\ndata: \n\n");
        assert_eq!(
            text(frame::event("x\ndata: forged", Some("1\n2"), "{}")),
            "event: xdata: forged\nid: 12\ndata: {}\n\n"
        );
    }
}
