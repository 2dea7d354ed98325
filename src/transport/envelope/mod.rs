//! The event-envelope WebSocket protocol on `GET /ws`: chat-style channels
//! over plain JSON messages, for clients that do not speak GraphQL.
//!
//! # Connecting
//!
//! No subprotocol is needed. The upgrade passes the same admission as the
//! GraphQL WebSocket (`server.allowed_origins` 403, drain and
//! `server.max_connections` 503) and may carry a token as `?token=T` (or
//! `Authorization: Bearer T`); a token that does not verify is refused with
//! 401 before the upgrade. Otherwise the client authenticates with a first
//! message `{"type":"auth","payload":{"token":"T"}}` within
//! `websocket.auth_timeout_seconds`, or receives `auth.failed
//! {code:"unauthorized"}` and the close code 4401. A wrong token in `auth`
//! is answered `auth.failed` and the client may try again until then.
//!
//! # Messages
//!
//! Every server message is an envelope `{"id","type","topic"?,"payload",
//! "timestamp"}`. Events are forwarded exactly as the node encoded them
//! (their `id` is the resume position `EPOCH:SEQ`); control messages carry
//! ids of their own, `c:{session_id}:{n}`, so a client can de-duplicate
//! every message by `id`.
//!
//! | client → server | answered with |
//! | --- | --- |
//! | `auth {token}` | `auth.success {user_id}` or `auth.failed {code, message}` |
//! | `channel.subscribe {channel_id, last_event_id?}` | `channel.subscribed {channel_id, recovered, reason?}`, then the missed events, then live ones |
//! | `channel.unsubscribe {channel_id}` | `channel.unsubscribed {channel_id}` |
//! | `message.send {channel_id, content}` | `message.sent {channel_id, message}`; subscribers get `message.created {message}` |
//! | `user.typing {channel_id}` | nothing; subscribers get `user.typing {user_id, channel_id}` |
//! | `presence.update {status}` | nothing; presence announces `presence.updated` |
//! | `ping {…}` | `pong` with the same payload |
//!
//! The server greets with `connection.established {session_id}` (and
//! `auth.success` when the upgrade carried a token). Replies come in the
//! order of the requests; events interleave with them. Events of a channel
//! never precede its `channel.subscribed`, nor follow its
//! `channel.unsubscribed`.
//!
//! - `recovered` is `false` when `last_event_id` could not be resumed from
//!   exactly (`reason`: `expired`, older than the history kept;
//!   `epoch_changed`, the history was lost; `malformed`; `unavailable`):
//!   the client then gets what the history still holds and should refetch
//!   the rest. Without `last_event_id` it is `true`.
//! - `channel.gap {channel_id, reason}` says that events of a live
//!   subscription were lost and could not be recovered from history.
//! - Subscribing to a channel twice is `error bad_request` (the first
//!   subscription stays); so is unsubscribing from one not subscribed.
//!   Subscribing registers the user as present in the channel until the
//!   unsubscribe or the disconnect.
//! - `user.typing` is for channels the user may read and goes out at most
//!   once per `ratelimit.typing_interval_seconds` per user and channel; the rest
//!   are absorbed silently (counted in `subgate_rate_limited_total`).
//!   Typing signals are live only: never in the history, never replayed.
//!
//! # Errors
//!
//! `error {code, message, field?, request?, retry_after_ms?}`: `field`
//! names the input at fault (`payload.channel_id`), `request` the type of
//! the message refused. Bad input never closes the connection:
//! `bad_request` (not JSON, not an object, unknown type, missing or wrong
//! field, duplicate subscribe, too many subscriptions), `unauthorized`
//! (not authenticated yet), `forbidden` (a private channel the user is not
//! in), `not_found`, `too_large` (a text message over
//! `websocket.max_message_bytes`), `rate_limited` (over
//! `ratelimit.messages_per_second` on the connection or
//! `ratelimit.user_messages_per_second` for the user), `internal`.
//! The connection closes only for what every subgate WebSocket closes for:
//! 1001 drain or idle, 1009 a frame over `websocket.max_frame_bytes`, 1013
//! slow consumer, and 4401 for the auth timeout.

pub mod protocol;
pub mod pump;
pub mod types;

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};

use crate::auth::credentials::verifier;
use crate::error::ErrorCode;
use crate::state::AppState;
use crate::transport::graphql_error;
use crate::transport::socket::{self, Upgrade};

use self::protocol::{Machine, MachineConfig};

/// Registers `GET /ws` for requests that are not WebSocket upgrades (those
/// never reach the application: [`upgrade`] serves them): 400.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/ws", web::get().to(not_an_upgrade));
}

async fn not_an_upgrade() -> HttpResponse {
    graphql_error(
        StatusCode::BAD_REQUEST,
        Some(ErrorCode::BadRequest),
        "this endpoint speaks the event-envelope WebSocket protocol: send a WebSocket upgrade",
    )
}

/// Serves a WebSocket upgrade of `/ws`: the checks, the handshake, then
/// the task that serves the connection.
pub async fn upgrade(state: AppState, upgrade: Upgrade) {
    let settings = &state.settings.websocket;
    let accepted = socket::accept(&state, upgrade, settings.max_frame_bytes, |_| Ok(())).await;
    let Some(accepted) = accepted else {
        return;
    };
    let config = MachineConfig {
        max_subscriptions: settings.max_subscriptions_per_connection,
        // A message limit above the frame limit could never apply.
        max_message_bytes: settings.max_message_bytes.min(settings.max_frame_bytes),
        auth_timeout: Duration::from_secs(settings.auth_timeout_seconds),
    };
    let session_id = uuid::Uuid::new_v4().simple().to_string();
    let machine = Machine::new(
        session_id,
        accepted.principal.clone(),
        verifier(state.auth.clone()),
        config,
        state.limits.clone(),
    );
    let Some(socket) = accepted.switch(None).await else {
        return;
    };
    // The connection's one task from here on: exactly the pump's state.
    actix_web::rt::spawn(pump::run(state, machine, socket));
}
