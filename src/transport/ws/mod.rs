//! GraphQL over WebSocket: the upgrade route, the subprotocol negotiation,
//! and the two protocol machines ([`protocol`] is what they share).
//!
//! Served at `GET /graphql/ws` and as a WebSocket upgrade on `/graphql`.
//! Two subprotocols, chosen from `Sec-WebSocket-Protocol`:
//!
//! - `graphql-transport-ws` ([`transport_ws`]), preferred, and assumed when
//!   the client names no subprotocol at all;
//! - `graphql-ws`, the legacy subscriptions-transport-ws ([`legacy`]).
//!
//! A client that names only other subprotocols gets 400. The upgrade is
//! refused with 403 when `server.allowed_origins` is set and the `Origin`
//! is not in it (a request without `Origin` is not a browser and passes),
//! with 503 + `Retry-After` while the node drains or holds
//! `server.max_connections` long-lived connections, and with 401 when it
//! carries a token (`Authorization: Bearer` or `?token=`) that does not
//! verify. A token in the `connection_init` payload takes precedence over
//! the one from the upgrade.
//!
//! The checks and the handshake are every WebSocket's
//! ([`crate::transport::socket::accept`]); the subprotocol is this one's.
//!
//! The machines are sans-IO: they turn client messages and operation results
//! into [`protocol::Action`]s, and [`pump`] does the I/O on the
//! [`crate::transport::socket`] layer.

pub mod legacy;
pub mod protocol;
pub mod pump;
#[cfg(test)]
mod tests;
pub mod transport_ws;

use actix_web::http::header::{self, HeaderMap};
use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use std::sync::Arc;

use async_graphql::Executor;

use crate::auth::credentials::verifier;
use crate::error::ErrorCode;
use crate::graphql::groups::Groups;
use crate::state::AppState;
use crate::transport::graphql_error;
use crate::transport::socket::{self, Upgrade};
use crate::transport::ws::protocol::Protocol as _;

use self::legacy::Legacy;
use self::pump::{Connection, PumpConfig};
use self::transport_ws::TransportWs;

/// The current protocol's subprotocol name.
pub const GRAPHQL_TRANSPORT_WS: &str = "graphql-transport-ws";
/// The legacy (subscriptions-transport-ws) subprotocol name.
pub const GRAPHQL_WS: &str = "graphql-ws";

/// Registers `GET /graphql/ws` for requests that are not WebSocket
/// upgrades (those never reach the application: [`upgrade`] serves them):
/// 400, naming what the endpoint speaks.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/graphql/ws").route(web::get().to(not_an_upgrade)));
}

async fn not_an_upgrade() -> HttpResponse {
    graphql_error(
        StatusCode::BAD_REQUEST,
        Some(ErrorCode::BadRequest),
        &format!("this endpoint speaks GraphQL over WebSocket ({GRAPHQL_TRANSPORT_WS}, {GRAPHQL_WS}): send a WebSocket upgrade"),
    )
}

/// Serves a WebSocket upgrade of `/graphql/ws` or `/graphql` with the
/// node's schema, its subscriptions shared through the node's groups.
pub async fn upgrade(state: AppState, upgrade: Upgrade) {
    let config = PumpConfig::from_settings(&state.settings.websocket);
    let groups = Some(state.groups.clone());
    let schema = state.schema.clone();
    accept(&state, upgrade, schema, groups, config).await
}

/// Which protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subprotocol {
    TransportWs,
    Legacy,
}

impl Subprotocol {
    pub fn name(self) -> &'static str {
        match self {
            Subprotocol::TransportWs => GRAPHQL_TRANSPORT_WS,
            Subprotocol::Legacy => GRAPHQL_WS,
        }
    }
}

/// Picks the subprotocol from every `Sec-WebSocket-Protocol` header (each a
/// comma-separated list); `None` when the client offers only others.
pub fn negotiate(headers: &HeaderMap) -> Option<Subprotocol> {
    let mut offered = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .peekable();
    if offered.peek().is_none() {
        // No preference stated (or an empty header): the current protocol.
        return Some(Subprotocol::TransportWs);
    }
    let mut legacy = false;
    for protocol in offered {
        if protocol == GRAPHQL_TRANSPORT_WS {
            return Some(Subprotocol::TransportWs);
        }
        legacy |= protocol == GRAPHQL_WS;
    }
    legacy.then_some(Subprotocol::Legacy)
}

/// Runs the admission checks, completes the handshake and starts the task
/// that serves the connection with `executor`.
///
/// Generic over the executor so that tests can serve a schema of their own
/// (without `groups`: each subscription then runs on its own).
pub async fn accept<E: Executor>(
    state: &AppState,
    upgrade: Upgrade,
    executor: E,
    groups: Option<Arc<Groups<E>>>,
    config: PumpConfig,
) {
    // The handshake does not echo a subprotocol; a client that offered some
    // must see the one chosen or it fails the connection, and one that
    // offered none must not see any.
    let offered = upgrade
        .head()
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .any(|v| v.to_str().is_ok_and(|v| !v.trim().is_empty()));
    let accepted = socket::accept(state, upgrade, config.max_frame_bytes, |head| {
        negotiate(head.headers()).ok_or_else(|| {
            Box::new(graphql_error(
                StatusCode::BAD_REQUEST,
                Some(ErrorCode::BadRequest),
                &format!("unsupported WebSocket subprotocol; supported: {GRAPHQL_TRANSPORT_WS}, {GRAPHQL_WS}"),
            ))
        })
    })
    .await;
    let Some(accepted) = accepted else {
        return;
    };
    let protocol = accepted.chosen;
    let principal = accepted.principal.clone();
    let client = crate::graphql::ClientAddr(accepted.client);
    let Some(socket) = accepted.switch(offered.then_some(protocol.name())).await else {
        return;
    };
    let admitted_user = principal.as_ref().map(|p| p.user_id.clone());
    let verify = verifier(state.auth.clone());
    let max_operations = config.max_operations;
    let connection = Connection {
        executor,
        config,
        metrics: state.metrics.clone(),
        shutdown: state.shutdown.clone(),
        client,
        user_connections: state.user_connections.clone(),
        admitted_user,
        groups,
    };
    // The connection's one task from here on: exactly the pump's state,
    // nothing of the handshake's.
    match protocol {
        Subprotocol::TransportWs => {
            let machine = TransportWs::new(principal, verify, max_operations)
                .with_max_tokens(state.settings.graphql.max_tokens);
            actix_web::rt::spawn(pump::run(connection, machine, socket));
        }
        Subprotocol::Legacy => {
            let machine = Legacy::new(principal, verify, max_operations)
                .with_max_tokens(state.settings.graphql.max_tokens);
            actix_web::rt::spawn(pump::run(connection, machine, socket));
        }
    }
}
