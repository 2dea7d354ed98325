//! The WebSocket layer that every subgate WebSocket runs on (the GraphQL
//! protocols on `/graphql/ws`, the envelope protocol on `/ws`), so that all
//! enforce the same limits and close the same way:
//!
//! - [`accept`]: the upgrade through the admission gate and the token
//!   check, then the handshake, with a frame guard that closes with 1009 a
//!   frame whose header announces more than `websocket.max_frame_bytes`,
//!   before its payload is buffered;
//! - [`Reader::receive`]: one client frame, fragments joined within the
//!   same limit, pings answered, a broken frame closed with 1002/1007;
//! - [`Outbox`]: the sending half, whose every write yields to the
//!   connection's [`Cutoff`] (1013 "slow consumer") and the node's drain
//!   (1001 "server shutting down"), so a client that stops reading cannot
//!   hold its task; and which cuts the connection off (1013) when the bytes
//!   it has sent that the socket has not taken yet would exceed
//!   `hub.subscriber_queue_bytes`, so such a client costs the node a
//!   bounded number of bytes, whatever the size of its events;
//! - [`Heartbeat`]: a WebSocket ping every `websocket.ping_interval_seconds`;
//!   a peer that has sent nothing at all, not even a pong, for three
//!   intervals is closed with 1001 "idle timeout";
//! - [`Socket::open`] and [`finish`]: the connection counted while it
//!   lives, and its close, counted in `ws_closes_total` when the node
//!   decides on it.

mod expiry;
mod frame;
mod heartbeat;
mod outbox;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::body::BoxBody;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{CloseReason, Message, MessageStream, ProtocolError, Session};
use bytestring::ByteString;

use crate::auth::Principal;
use crate::error::{close, ErrorCode};
use crate::hub::Cutoff;
use crate::shutdown::{DrainGuard, Shutdown};
use crate::state::AppState;
use crate::telemetry::metrics::{GaugeGuard, Metrics};
use crate::transport::admission::{Gate, Opening, Refusal};
use crate::transport::graphql_error;

pub use self::expiry::Expiry;
use self::frame::{guard_frames, Assembled, Assembler, FrameError};
pub use self::heartbeat::Heartbeat;
use self::outbox::close_reason;
pub use self::outbox::{going_away, slow_consumer, Outbox};
use self::outbox::{Budget, Buffered, Drained};

/// RFC 6455 "protocol error": a frame the WebSocket layer rejects.
pub const PROTOCOL_ERROR: u16 = 1002;
/// RFC 6455 "invalid frame payload data": a text message that is not UTF-8.
pub const INVALID_PAYLOAD: u16 = 1007;

/// An open WebSocket, as its pump takes it.
pub struct Socket {
    session: Session,
    messages: MessageStream,
    max_frame_bytes: usize,
    /// Set by the frame guard when a frame header announced too much.
    oversized: Arc<AtomicBool>,
    /// The connection's place under `server.max_connections`: counts it as
    /// open (admission, drain) for as long as the pump holds it.
    drain: DrainGuard,
    /// Bytes sent and not yet taken by the socket's writer, and their bound
    /// (`hub.subscriber_queue_bytes`).
    buffered: Buffered,
    max_buffered_bytes: usize,
}

impl Socket {
    /// Opens the socket for its pump: the connection counts as one of
    /// `transport` while the [`Reader`] lives, and every write through the
    /// [`Outbox`] yields to `cutoff` and the drain.
    pub fn open(
        self,
        metrics: &Metrics,
        transport: &'static str,
        ping_interval: Duration,
        cutoff: Arc<Cutoff>,
        shutdown: Shutdown,
    ) -> (Reader, Outbox) {
        metrics
            .connections_total
            .with_label_values(&[transport])
            .inc();
        let reader = Reader {
            messages: self.messages,
            heartbeat: Heartbeat::new(ping_interval),
            assembler: Assembler::new(self.max_frame_bytes),
            oversized: self.oversized,
            _drain: self.drain,
            _open: GaugeGuard::new(metrics.connections.with_label_values(&[transport])),
        };
        let budget = Budget {
            buffered: self.buffered,
            max_buffered_bytes: self.max_buffered_bytes,
            slow_consumers: metrics
                .slow_consumer_disconnects_total
                .with_label_values(&[transport]),
        };
        (reader, Outbox::new(self.session, cutoff, shutdown, budget))
    }
}

/// The reading side of an open socket, and what the connection holds while
/// it lives. A pump selects over [`Reader::messages`] and the heartbeat's
/// [`Heartbeat::tick`], then hands what woke it back here.
pub struct Reader {
    pub messages: MessageStream,
    pub heartbeat: Heartbeat,
    assembler: Assembler,
    oversized: Arc<AtomicBool>,
    _drain: DrainGuard,
    _open: GaugeGuard,
}

impl Reader {
    /// What one frame from the client amounts to (see [`Received`]); any
    /// frame shows the peer alive.
    pub async fn receive(
        &mut self,
        frame: Option<Result<Message, ProtocolError>>,
        outbox: &mut Outbox,
    ) -> Result<Received, End> {
        self.heartbeat.heard();
        receive(frame, &mut self.assembler, &self.oversized, outbox).await
    }

    /// At a beat: the idle rule, then a ping.
    pub async fn beat(&mut self, outbox: &mut Outbox) -> Result<(), End> {
        self.heartbeat.beat(outbox).await
    }
}

/// A WebSocket upgrade that passed every check, its handshake done.
pub struct Accepted<T> {
    /// What the transport's own check chose (the GraphQL subprotocol).
    pub chosen: T,
    /// Who the upgrade speaks for, if it carried a token.
    pub principal: Option<Principal>,
    /// The response that switches protocols.
    pub response: HttpResponse,
    pub socket: Socket,
}

/// Takes a WebSocket upgrade through every check, in this order: the
/// gate's screening (403 `Origin`, 503 drain), the transport's own `check`
/// (the GraphQL subprotocol: 400), the token from `Authorization: Bearer`
/// or `?token=` (401), a place under `server.max_connections` (503) and,
/// with a token, under `server.max_connections_per_user` (429), then
/// the handshake, with frames of at most `max_frame_bytes`. `Err` is the
/// response that refuses it, in the GraphQL error shape (`check`'s is
/// boxed: a response is large and the common case is to pass).
pub async fn accept<T>(
    state: &AppState,
    req: &HttpRequest,
    body: web::Payload,
    max_frame_bytes: usize,
    check: impl FnOnce(&HttpRequest) -> Result<T, Box<HttpResponse>>,
) -> Result<Accepted<T>, HttpResponse> {
    let gate = Gate::screen(state, req.headers(), Opening::WebSocket)
        .map_err(Refusal::graphql_response)?;
    let chosen = check(req).map_err(|refused| *refused)?;
    let principal = state
        .auth
        .from_header_or_query_string(req.headers(), req.query_string())
        .map_err(|message| {
            graphql_error(
                StatusCode::UNAUTHORIZED,
                Some(ErrorCode::Unauthorized),
                &message.to_string(),
            )
        })?;
    let drain = gate
        .admit_as(principal.as_ref().map(|p| p.user_id.as_str()))
        .await
        .map_err(Refusal::graphql_response)?;
    let (body, oversized) = guard_frames(req, body, max_frame_bytes)
        .await
        .map_err(|e| e.error_response())?;
    let (response, session, messages) =
        actix_ws::handle(req, body).map_err(|e| e.error_response())?;
    let buffered = Buffered::default();
    let counted = buffered.clone();
    let response = response.map_body(move |_, inner| {
        BoxBody::new(Drained {
            inner,
            buffered: counted,
        })
    });
    Ok(Accepted {
        chosen,
        principal,
        response,
        socket: Socket {
            session,
            messages: messages.max_frame_size(max_frame_bytes),
            max_frame_bytes,
            oversized,
            drain,
            buffered,
            max_buffered_bytes: state.settings.hub.subscriber_queue_bytes,
        },
    })
}

/// Why the task stops.
#[derive(Debug)]
pub enum End {
    /// The peer is gone: nothing to send.
    Gone,
    /// Close with this code and reason.
    Close(u16, String),
    /// The peer closed: answer its close frame.
    Answer(Option<CloseReason>),
}

/// What one frame from the client amounts to.
pub enum Received {
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
async fn receive(
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

/// Ends the connection as `end` says, counting the closes the node decides
/// on in `ws_closes_total`.
pub async fn finish(outbox: Outbox, end: End, metrics: &Metrics, transport: &'static str) {
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

/// The text frames among a protocol machine's actions (`text` picks a
/// frame's text out of an action), decoded as JSON: what the machines' unit
/// tests read of what they send.
#[cfg(test)]
pub(crate) fn sent_json<'a, A>(
    actions: &'a [A],
    text: impl Fn(&'a A) -> Option<&'a String>,
) -> Vec<serde_json::Value> {
    actions
        .iter()
        .filter_map(text)
        .map(|text| serde_json::from_str(text).unwrap())
        .collect()
}
