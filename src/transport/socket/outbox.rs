//! The socket's sending half, and how it closes; the bytes it has handed
//! to the socket layer that the socket has not taken yet, and their bound.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_web::web::Bytes;
use actix_ws::{CloseCode, CloseReason, Closed, Session};
use bytestring::ByteString;

use super::End;
use crate::error::close;
use crate::hub::{Cutoff, CutoffReason};
use crate::shutdown::Shutdown;

/// How long a close may wait on a congested socket before the connection is
/// dropped without it.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// The longest close reason a WebSocket close frame carries.
const MAX_CLOSE_REASON_BYTES: usize = 123;

/// Bytes of frames handed to the socket layer (actix-ws queues up to 32
/// messages per connection) and not yet taken by the connection's writer:
/// what a client that stops reading makes the node hold for it.
#[derive(Clone, Default)]
pub struct Buffered(Arc<AtomicUsize>);

impl Buffered {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    fn add(&self, bytes: usize) {
        self.0.fetch_add(bytes, Ordering::Relaxed);
    }

    fn taken(&self, bytes: usize) {
        // Saturating: the close frame goes out uncounted.
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(bytes))
            });
    }
}

/// The size on the wire of a server (unmasked) frame of `payload` bytes.
pub(super) fn frame_bytes(payload: usize) -> usize {
    payload
        + match payload {
            0..=125 => 2,
            126..=65535 => 4,
            _ => 10,
        }
}

/// The WebSocket response body, counting out of [`Buffered`] every chunk the
/// connection's writer takes (actix-web pulls the next chunk only when it
/// has room to write it).
pub(super) struct Drained {
    pub(super) inner: BoxBody,
    pub(super) buffered: Buffered,
}

impl MessageBody for Drained {
    type Error = Box<dyn std::error::Error>;

    fn size(&self) -> BodySize {
        self.inner.size()
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_next(cx);
        if let Poll::Ready(Some(Ok(chunk))) = &polled {
            this.buffered.taken(chunk.len());
        }
        polled
    }
}

/// The socket's sending half; every write yields to the cut-off and the
/// drain, so a client that stopped reading cannot wedge the task.
pub struct Outbox {
    session: Session,
    cutoff: Arc<Cutoff>,
    shutdown: Shutdown,
    buffered: Buffered,
    /// `hub.subscriber_queue_bytes`: a text frame that would take
    /// [`Buffered`] above it cuts the connection off as a slow consumer.
    max_buffered_bytes: usize,
    /// `slow_consumer_disconnects_total` for this connection's transport.
    slow_consumers: prometheus::IntCounter,
}

/// What an [`Outbox`] is bounded by and counts in.
pub struct Budget {
    pub buffered: Buffered,
    pub max_buffered_bytes: usize,
    pub slow_consumers: prometheus::IntCounter,
}

impl Outbox {
    pub fn new(session: Session, cutoff: Arc<Cutoff>, shutdown: Shutdown, budget: Budget) -> Self {
        Self {
            session,
            cutoff,
            shutdown,
            buffered: budget.buffered,
            max_buffered_bytes: budget.max_buffered_bytes,
            slow_consumers: budget.slow_consumers,
        }
    }

    /// Sends a text frame, unless the frames still waiting for the socket
    /// and this one would exceed the connection's byte bound: the client is
    /// then cut off (1013, counted as a slow consumer) before the node holds
    /// more for it. A frame alone over the bound still goes out when
    /// nothing waits.
    pub async fn text(&mut self, text: impl Into<ByteString>) -> Result<(), End> {
        let text = text.into();
        let size = frame_bytes(text.len());
        let waiting = self.buffered.get();
        if waiting > 0 && waiting + size > self.max_buffered_bytes {
            if self.cutoff.reason().is_none() {
                self.slow_consumers.inc();
                self.cutoff.cut(CutoffReason::SlowConsumer);
            }
            return Err(slow_consumer());
        }
        self.buffered.add(size);
        // The usual case: the socket layer has room and takes the frame at
        // once, without waiting on (and registering with) the cut-off and
        // the drain. A send that would wait sends nothing (the channel's
        // send is cancel-safe), and the frame (a shared buffer: the clone
        // is a count) goes the slow way, boxed, so that every connection's
        // task does not carry the slow way's state.
        if let Some(sent) = futures_util::FutureExt::now_or_never(self.session.text(text.clone())) {
            return sent.map_err(|Closed| End::Gone);
        }
        let (cutoff, shutdown) = (self.cutoff.clone(), self.shutdown.clone());
        Box::pin(interruptible(self.session.text(text), &cutoff, &shutdown)).await
    }

    pub async fn ping(&mut self) -> Result<(), End> {
        self.buffered.add(frame_bytes(0));
        let (cutoff, shutdown) = (self.cutoff.clone(), self.shutdown.clone());
        interruptible(self.session.ping(b""), &cutoff, &shutdown).await
    }

    pub(super) async fn pong(&mut self, payload: &[u8]) -> Result<(), End> {
        self.buffered.add(frame_bytes(payload.len()));
        let (cutoff, shutdown) = (self.cutoff.clone(), self.shutdown.clone());
        interruptible(self.session.pong(payload), &cutoff, &shutdown).await
    }

    /// Sends the close frame if the socket takes it within [`CLOSE_GRACE`];
    /// dropping the session afterwards ends the response and the connection.
    pub(super) async fn close(self, reason: Option<CloseReason>) {
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

pub fn slow_consumer() -> End {
    End::Close(close::SLOW_CONSUMER, "slow consumer".into())
}

pub fn going_away() -> End {
    End::Close(close::GOING_AWAY, "server shutting down".into())
}

/// At most [`MAX_CLOSE_REASON_BYTES`] of `reason`, on a character boundary.
pub(super) fn close_reason(code: u16, reason: &str) -> CloseReason {
    let mut end = reason.len().min(MAX_CLOSE_REASON_BYTES);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    CloseReason {
        code: CloseCode::from(code),
        description: Some(reason[..end].to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_sizes_count_the_header_as_the_codec_writes_it() {
        assert_eq!(frame_bytes(0), 2);
        assert_eq!(frame_bytes(125), 127);
        assert_eq!(frame_bytes(126), 130);
        assert_eq!(frame_bytes(65535), 65539);
        assert_eq!(frame_bytes(65536), 65546);
        // As actix's codec frames them.
        for len in [0, 125, 126, 65535, 65536] {
            let mut out = actix_web::web::BytesMut::new();
            let text = "x".repeat(len);
            actix_http::ws::Parser::write_message(
                &mut out,
                text.as_bytes(),
                actix_http::ws::OpCode::Text,
                true,
                false,
            );
            assert_eq!(out.len(), frame_bytes(len), "{len}");
        }
    }

    #[test]
    fn close_reasons_fit_a_close_frame() {
        let long = "é".repeat(100);
        let reason = close_reason(4400, &long);
        assert!(reason.description.unwrap().len() <= MAX_CLOSE_REASON_BYTES);
    }
}
