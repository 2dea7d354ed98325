//! The WebSocket layer that every subgate WebSocket runs on (the GraphQL
//! protocols on `/graphql/ws`, the envelope protocol on `/ws`), so that all
//! enforce the same limits and close the same way.
//!
//! After the upgrade a WebSocket owns its TCP stream ([`Upgrade`]): the
//! HTTP server's dispatcher and its buffers are gone, one task serves the
//! connection, and nothing is buffered while it idles.
//!
//! - [`accept`]: the upgrade through the admission gate and the token
//!   check; [`Accepted::switch`] then completes the handshake;
//! - [`Reader`]: the client's frames, read when the socket has bytes
//!   ([`Reader::frame`]) and interpreted by [`Reader::receive`]: a frame
//!   whose header announces more than `websocket.max_frame_bytes` is closed
//!   with 1009 before its payload is read, fragments are joined within the
//!   same limit, pings answered, a broken frame closed with 1002/1007;
//! - [`Outbox`]: the sending half. Frames are appended to one send buffer
//!   and written by [`Outbox::flush`] once per turn of the connection's
//!   task, so the frames of one turn go out in one write; a client that
//!   stops reading cannot hold the task (nothing waits on the socket), and
//!   is cut off (1013 "slow consumer") when what the socket has not taken
//!   would exceed `hub.subscriber_queue_bytes`;
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
mod upgrade;
mod wire;

use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix_http::RequestHead;
use actix_web::http::StatusCode;
use actix_web::web::BytesMut;
use actix_web::HttpResponse;
use bytestring::ByteString;
use tokio::net::TcpStream;

use crate::auth::Principal;
use crate::error::{close, ErrorCode};
use crate::hub::Cutoff;
use crate::shutdown::DrainGuard;
use crate::state::AppState;
use crate::telemetry::metrics::{GaugeGuard, Metrics};
use crate::transport::admission::{Gate, Opening, Refusal};
use crate::transport::graphql_error;

pub use self::expiry::Expiry;
use self::frame::{Assembled, Assembler, FrameError};
pub use self::heartbeat::Heartbeat;
pub use self::outbox::{going_away, slow_consumer, Outbox};
pub use self::upgrade::Upgrade;
use self::wire::{opcode, Frame, Parsed};

/// RFC 6455 "protocol error": a frame the WebSocket layer rejects.
pub const PROTOCOL_ERROR: u16 = 1002;
/// RFC 6455 "invalid frame payload data": a text message that is not UTF-8.
pub const INVALID_PAYLOAD: u16 = 1007;

/// Bytes read off the socket at a time.
const READ_CHUNK: usize = 4096;

/// An open WebSocket, as its pump takes it.
pub struct Socket {
    stream: Rc<TcpStream>,
    /// Bytes the client sent right behind its upgrade request.
    read: BytesMut,
    max_frame_bytes: usize,
    /// The connection's place under `server.max_connections`: counts it as
    /// open (admission, drain) for as long as the pump holds it.
    drain: DrainGuard,
    max_buffered_bytes: usize,
    held: upgrade::Held,
}

impl Socket {
    /// Opens the socket for its pump: the connection counts as one of
    /// `transport` while the [`Reader`] lives, and the [`Outbox`] cuts it
    /// off through `cutoff` when it falls behind.
    pub fn open(
        self,
        metrics: &Metrics,
        transport: &'static str,
        ping_interval: Duration,
        cutoff: Arc<Cutoff>,
    ) -> (Reader, Outbox) {
        metrics
            .connections_total
            .with_label_values(&[transport])
            .inc();
        let reader = Reader {
            frames: Frames {
                stream: self.stream.clone(),
                read: self.read,
                max_frame_bytes: self.max_frame_bytes,
            },
            heartbeat: Heartbeat::new(ping_interval),
            assembler: Assembler::new(self.max_frame_bytes),
            _open: GaugeGuard::new(metrics.connections.with_label_values(&[transport])),
            _drain: self.drain,
            _held: self.held,
        };
        let outbox = Outbox::new(
            self.stream,
            cutoff,
            self.max_buffered_bytes,
            metrics
                .slow_consumer_disconnects_total
                .with_label_values(&[transport]),
        );
        (reader, outbox)
    }
}

/// One item of the client's frame stream, as [`Frames::next`] read it.
#[derive(Debug)]
pub enum Incoming {
    Frame(Frame),
    /// A frame header announced more than the frame limit.
    TooBig,
    /// Not a frame a client may send.
    Broken,
    /// The peer closed the connection, or it failed.
    Closed,
}

/// The reading side of an open socket, and what the connection holds while
/// it lives. A pump selects over [`Frames::next`] and the heartbeat's
/// [`Heartbeat::tick`], then hands what woke it back here.
pub struct Reader {
    pub frames: Frames,
    pub heartbeat: Heartbeat,
    assembler: Assembler,
    // Dropped in this order: the gauge is down before the drain counts the
    // connection closed.
    _open: GaugeGuard,
    _drain: DrainGuard,
    _held: upgrade::Held,
}

/// The client's frames, read off the socket when it has bytes.
pub struct Frames {
    stream: Rc<TcpStream>,
    /// Bytes read and not parsed yet: empty, and unallocated, between
    /// messages.
    read: BytesMut,
    max_frame_bytes: usize,
}

impl Frames {
    /// The client's next frame. Cancel-safe: what was read stays here.
    pub async fn next(&mut self) -> Incoming {
        loop {
            match wire::parse(&mut self.read, self.max_frame_bytes) {
                Parsed::Frame(frame) => {
                    if self.read.is_empty() {
                        // Release the read buffer while the client is quiet.
                        self.read = BytesMut::new();
                    }
                    return Incoming::Frame(frame);
                }
                Parsed::TooBig => return Incoming::TooBig,
                Parsed::Broken => return Incoming::Broken,
                Parsed::Partial => {}
            }
            if self.stream.readable().await.is_err() {
                return Incoming::Closed;
            }
            match self.fill() {
                Ok(0) => return Incoming::Closed,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return Incoming::Closed,
            }
        }
    }

    /// Reads what the socket holds, up to a chunk, into the read buffer.
    fn fill(&mut self) -> std::io::Result<usize> {
        if self.read.capacity() - self.read.len() >= READ_CHUNK {
            // Room reserved for a large frame: read straight into it.
            return self.stream.try_read_buf(&mut self.read);
        }
        let mut chunk = [0u8; READ_CHUNK];
        let n = self.stream.try_read(&mut chunk)?;
        self.read.extend_from_slice(&chunk[..n]);
        Ok(n)
    }
}

impl Reader {
    /// What one item of the client's frame stream amounts to (see
    /// [`Received`]); any frame shows the peer alive.
    pub fn receive(&mut self, incoming: Incoming, outbox: &mut Outbox) -> Result<Received, End> {
        let frame = match incoming {
            Incoming::Closed => return Err(End::Gone),
            Incoming::TooBig => {
                return Err(End::Close(close::MESSAGE_TOO_BIG, "frame too large".into()))
            }
            Incoming::Broken => return Err(protocol_error()),
            Incoming::Frame(frame) => frame,
        };
        self.heartbeat.heard();
        match frame.opcode {
            opcode::PING => {
                outbox.pong(&frame.payload);
                Ok(Received::Nothing)
            }
            opcode::PONG => Ok(Received::Nothing),
            opcode::CLOSE => match wire::close_code(&frame.payload) {
                Ok(code) => Err(End::Answer(code)),
                Err(()) => Err(protocol_error()),
            },
            _ => match self.assembler.push(frame) {
                Ok(None) => Ok(Received::Nothing),
                Ok(Some(Assembled::Text(text))) => Ok(Received::Text(text)),
                Ok(Some(Assembled::Binary)) => Ok(Received::Binary),
                Err(FrameError::TooBig) => Err(End::Close(
                    close::MESSAGE_TOO_BIG,
                    "message too large".into(),
                )),
                Err(FrameError::Protocol) => Err(protocol_error()),
                Err(FrameError::NotUtf8) => {
                    Err(End::Close(INVALID_PAYLOAD, "text is not UTF-8".into()))
                }
            },
        }
    }

    /// At a beat: the idle rule, then a ping.
    pub fn beat(&mut self, outbox: &mut Outbox) -> Result<(), End> {
        self.heartbeat.beat(outbox)
    }
}

fn protocol_error() -> End {
    End::Close(PROTOCOL_ERROR, "protocol error".into())
}

/// A WebSocket upgrade that passed every check, its handshake still to
/// answer ([`Accepted::switch`]).
pub struct Accepted<T> {
    /// What the transport's own check chose (the GraphQL subprotocol).
    pub chosen: T,
    /// Who the upgrade speaks for, if it carried a token.
    pub principal: Option<Principal>,
    /// The client's address (`server.trusted_proxies` considered).
    pub client: Option<IpAddr>,
    upgrade: Upgrade,
    drain: DrainGuard,
    max_frame_bytes: usize,
    max_buffered_bytes: usize,
}

impl<T> Accepted<T> {
    /// Answers the handshake, naming `subprotocol` when there is one to
    /// name, and hands over the socket; `None` when the client is gone.
    pub async fn switch(self, subprotocol: Option<&'static str>) -> Option<Socket> {
        let (stream, read, held) = self.upgrade.switch(subprotocol).await?;
        Some(Socket {
            stream: Rc::new(stream),
            read,
            held,
            max_frame_bytes: self.max_frame_bytes,
            drain: self.drain,
            max_buffered_bytes: self.max_buffered_bytes,
        })
    }
}

/// Takes a WebSocket upgrade through every check, in this order: the
/// handshake's headers (400, 405 for a method other than GET), the gate's
/// screening (403 `Origin`, 503 drain), the transport's own `check` (the
/// GraphQL subprotocol: 400), the token from `Authorization: Bearer` or
/// `?token=` (401), a place under `server.max_connections` (503) and,
/// with a token, under `server.max_connections_per_user` (429). A refusal
/// is answered here, in the GraphQL error shape, and the connection closed:
/// `None`.
pub async fn accept<T>(
    state: &AppState,
    upgrade: Upgrade,
    max_frame_bytes: usize,
    check: impl FnOnce(&RequestHead) -> Result<T, Box<HttpResponse>>,
) -> Option<Accepted<T>> {
    match screen(state, &upgrade, check).await {
        Ok((chosen, principal, drain)) => {
            let client = crate::transport::request::client_from(
                upgrade.peer(),
                upgrade.head().headers(),
                &state.settings,
            );
            Some(Accepted {
                chosen,
                principal,
                client,
                upgrade,
                drain,
                max_frame_bytes,
                max_buffered_bytes: state.settings.hub.subscriber_queue_bytes,
            })
        }
        Err(refused) => {
            upgrade.refuse(refused).await;
            None
        }
    }
}

async fn screen<T>(
    state: &AppState,
    upgrade: &Upgrade,
    check: impl FnOnce(&RequestHead) -> Result<T, Box<HttpResponse>>,
) -> Result<(T, Option<Principal>, DrainGuard), HttpResponse> {
    let head = upgrade.head();
    if let Err(error) = actix_http::ws::verify_handshake(head) {
        let status = match error {
            actix_http::ws::HandshakeError::GetMethodRequired => StatusCode::METHOD_NOT_ALLOWED,
            _ => StatusCode::BAD_REQUEST,
        };
        return Err(graphql_error(
            status,
            Some(ErrorCode::BadRequest),
            &format!("not a WebSocket handshake: {error}"),
        ));
    }
    let gate = Gate::screen(state, head.headers(), Opening::WebSocket)
        .map_err(Refusal::graphql_response)?;
    let chosen = check(head).map_err(|refused| *refused)?;
    let principal = state
        .auth
        .from_header_or_query_string(head.headers(), head.uri.query().unwrap_or(""))
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
    Ok((chosen, principal, drain))
}

/// Why the task stops.
#[derive(Debug)]
pub enum End {
    /// The peer is gone: nothing to send.
    Gone,
    /// Close with this code and reason.
    Close(u16, String),
    /// The peer closed (with this code, if it gave one): answer its close
    /// frame.
    Answer(Option<u16>),
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
            outbox.close(Some(code), &reason).await;
        }
        // Echo the peer's code, as RFC 6455 asks; not counted, as the
        // metric counts closes the node decides on.
        End::Answer(code) => outbox.close(code, "").await,
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
