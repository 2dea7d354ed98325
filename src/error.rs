//! Client-visible error codes and WebSocket close codes: the stable tables.
//!
//! Machine codes never change meaning; human messages may. The close codes
//! are chosen with the graphql-ws client's reconnect rules in mind: it
//! retries after 1001, 1012, 1013, 4403 and 4408 and gives up after 1011,
//! 4400, 4401, 4409, 4429 and 4500.

use async_graphql::Enum;

/// Codes carried by `UserError.code` in mutation payloads and by
/// `extensions.code` in GraphQL errors.
#[derive(Enum, Copy, Clone, Debug, Eq, PartialEq)]
pub enum ErrorCode {
    /// An input field is missing, malformed or out of range.
    ValidationError,
    /// The operation needs an authenticated user.
    Unauthorized,
    /// The authenticated user may not do this.
    Forbidden,
    /// The entity does not exist.
    NotFound,
    /// The entity clashes with an existing one (a taken email).
    Conflict,
    /// Too many requests; retry later.
    RateLimited,
    /// The node could not complete the operation (its store or bus failed).
    Internal,
    /// Events were lost here: the resume position is older than the
    /// retained history, from a lost history, or malformed (`extensions.reason`).
    HistoryGap,
    /// The node cannot take this now (draining, at capacity, its bus
    /// down); another node, or this one later, may.
    Unavailable,
    /// The request is not a GraphQL request the transport can run.
    BadRequest,
    /// The connection already runs `websocket.max_subscriptions_per_connection`
    /// subscriptions.
    TooManySubscriptions,
    /// The document holds more tokens than `graphql.max_tokens`; it was
    /// refused before it was parsed.
    TooManyTokens,
}

impl ErrorCode {
    /// The string used in `extensions.code`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::ValidationError => "VALIDATION_ERROR",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::Conflict => "CONFLICT",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::Internal => "INTERNAL",
            ErrorCode::HistoryGap => "HISTORY_GAP",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::BadRequest => "BAD_REQUEST",
            ErrorCode::TooManySubscriptions => "TOO_MANY_SUBSCRIPTIONS",
            ErrorCode::TooManyTokens => "TOO_MANY_TOKENS",
        }
    }
}

/// WebSocket close codes used by every subgate WebSocket.
pub mod close {
    /// Normal closure (the client completed).
    pub const NORMAL: u16 = 1000;
    /// The node is draining: reconnect, preferably to another node.
    pub const GOING_AWAY: u16 = 1001;
    /// A frame larger than `websocket.max_frame_bytes`.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// Internal error on the node (not retried by graphql-ws clients).
    pub const INTERNAL: u16 = 1011;
    /// Node at capacity or a slow consumer: try again later. A subscriber
    /// whose queue overflowed is cut off with this code; graphql-ws clients
    /// reconnect after it.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// graphql-transport-ws: invalid message.
    pub const BAD_REQUEST: u16 = 4400;
    /// graphql-transport-ws: unauthorized, or subscribe before the ack.
    /// Envelope protocol: not authenticated within
    /// `websocket.auth_timeout_seconds`.
    pub const UNAUTHORIZED: u16 = 4401;
    /// graphql-transport-ws: forbidden.
    pub const FORBIDDEN: u16 = 4403;
    /// graphql-transport-ws: connection_init not received in time.
    pub const INIT_TIMEOUT: u16 = 4408;
    /// graphql-transport-ws: a subscriber with this id already exists.
    pub const SUBSCRIBER_EXISTS: u16 = 4409;
    /// graphql-transport-ws: more than one connection_init.
    pub const TOO_MANY_INIT: u16 = 4429;
    /// graphql-transport-ws: internal server error.
    pub const INTERNAL_SERVER_ERROR: u16 = 4500;
    /// The user authenticated after the upgrade (`connection_init`, an
    /// `auth` message) already holds `server.max_connections_per_user`.
    /// Shares 4429 with graphql-transport-ws's "too many initialisation
    /// requests": both say "too many", and a client retries later.
    pub const TOO_MANY_USER_CONNECTIONS: u16 = 4429;

    /// The slow-consumer code (see [`TRY_AGAIN_LATER`]).
    pub const SLOW_CONSUMER: u16 = TRY_AGAIN_LATER;
}

/// The `code` of the envelope protocol's `error` (and `auth.failed`)
/// messages on `/ws`.
pub mod envelope {
    /// Not JSON, not an object, an unknown type, a missing or wrong field.
    pub const BAD_REQUEST: &str = "bad_request";
    /// The message needs an authenticated user, or a token did not verify.
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// The user may not do this (a private channel they are not in).
    pub const FORBIDDEN: &str = "forbidden";
    /// Too many messages; the payload says when to retry.
    pub const RATE_LIMITED: &str = "rate_limited";
    /// The channel does not exist.
    pub const NOT_FOUND: &str = "not_found";
    /// A text message over `websocket.max_message_bytes`.
    pub const TOO_LARGE: &str = "too_large";
    /// The node could not do it (its store or bus failed); retry.
    pub const INTERNAL: &str = "internal";
}
