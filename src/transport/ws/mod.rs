//! GraphQL over WebSocket: the upgrade (Origin, admission, authentication,
//! subprotocol negotiation) and what the two protocol machines share.
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
//! The machines are sans-IO: they turn client messages and operation results
//! into [`Action`]s, and [`pump`] does the I/O.

pub mod legacy;
pub mod pump;
pub mod transport_ws;

use std::collections::HashMap;
use std::sync::Arc;

use actix_web::http::header::{self, HeaderMap, HeaderValue};
use actix_web::{web, HttpRequest, HttpResponse, HttpResponseBuilder};
use async_graphql::parser::types::OperationType;
use async_graphql::{Executor, Request, Response};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::app::AppState;
use crate::auth::{bearer, Authenticator, Principal};
use crate::transport::http::{
    is_request_error, is_websocket_upgrade, operation_label, operation_type, principal_from_header,
};

use self::legacy::Legacy;
use self::pump::{Connection, PumpConfig};
use self::transport_ws::TransportWs;

/// The current protocol's subprotocol name.
pub const GRAPHQL_TRANSPORT_WS: &str = "graphql-transport-ws";
/// The legacy (subscriptions-transport-ws) subprotocol name.
pub const GRAPHQL_WS: &str = "graphql-ws";

/// Registers `GET /graphql/ws` and the WebSocket upgrade on `/graphql`.
///
/// Must be called before the HTTP transport registers `/graphql`: the
/// upgrade resource carries a resource-level guard, so a plain GET falls
/// through it to the next `/graphql` resource, whereas a resource that
/// matched the path first would answer an upgrade with 405 itself.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/graphql/ws").route(web::get().to(graphql_ws)))
        .service(
            web::resource("/graphql")
                .guard(UpgradeGuard)
                .route(web::get().to(graphql_ws)),
        );
}

/// Matches WebSocket upgrade requests.
struct UpgradeGuard;

impl actix_web::guard::Guard for UpgradeGuard {
    fn check(&self, ctx: &actix_web::guard::GuardContext<'_>) -> bool {
        is_websocket_upgrade(ctx.head().headers())
    }
}

async fn graphql_ws(state: web::Data<AppState>, req: HttpRequest, body: web::Payload) -> HttpResponse {
    let config = PumpConfig::from_settings(&state.settings.websocket);
    accept(&state, &req, body, state.schema.clone(), config).await
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

/// Whether the request's `Origin` may open a WebSocket.
fn origin_allowed(allowed: &[String], headers: &HeaderMap) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else { return false };
    let origin = origin.trim().trim_end_matches('/');
    allowed
        .iter()
        .any(|a| a.trim().trim_end_matches('/').eq_ignore_ascii_case(origin))
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// The principal the upgrade request speaks for: `Authorization: Bearer`
/// first, else `?token=` (browsers cannot set headers on a WebSocket).
fn upgrade_principal(state: &AppState, req: &HttpRequest) -> Result<Option<Principal>, String> {
    if req.headers().contains_key(header::AUTHORIZATION) {
        return principal_from_header(state, req);
    }
    let query = web::Query::<TokenQuery>::from_query(req.query_string())
        .map_err(|_| "the query string is malformed".to_owned())?;
    match query.into_inner().token.filter(|t| !t.is_empty()) {
        Some(token) => state.auth.verify(&token).map(Some).map_err(|e| e.to_string()),
        None => Ok(None),
    }
}

/// An upgrade refused before the handshake, as a GraphQL-style error body.
fn refuse(mut response: HttpResponseBuilder, code: &str, message: &str) -> HttpResponse {
    response.json(json!({
        "errors": [{ "message": message, "extensions": { "code": code } }]
    }))
}

/// 503 with a hint to retry soon (on this node or, behind a balancer,
/// another).
fn unavailable() -> HttpResponseBuilder {
    let mut response = HttpResponse::ServiceUnavailable();
    response.insert_header((header::RETRY_AFTER, "1"));
    response
}

/// Runs the admission checks, completes the handshake and spawns the pump
/// that serves the connection with `executor`.
///
/// Generic over the executor so that tests can serve a schema of their own.
pub async fn accept<E: Executor>(
    state: &AppState,
    req: &HttpRequest,
    body: web::Payload,
    executor: E,
    config: PumpConfig,
) -> HttpResponse {
    let metrics = &state.metrics;
    if !origin_allowed(&state.settings.server.allowed_origins, req.headers()) {
        metrics.rejected_total.with_label_values(&["origin"]).inc();
        return refuse(
            HttpResponse::Forbidden(),
            "FORBIDDEN",
            "this Origin may not open a WebSocket",
        );
    }
    if state.shutdown.is_draining() {
        metrics.rejected_total.with_label_values(&["draining"]).inc();
        return refuse(unavailable(), "UNAVAILABLE", "the node is shutting down");
    }
    let Some(protocol) = negotiate(req.headers()) else {
        return refuse(
            HttpResponse::BadRequest(),
            "BAD_REQUEST",
            &format!("unsupported WebSocket subprotocol; supported: {GRAPHQL_TRANSPORT_WS}, {GRAPHQL_WS}"),
        );
    };
    let principal = match upgrade_principal(state, req) {
        Ok(principal) => principal,
        Err(message) => {
            return HttpResponse::Unauthorized()
                .insert_header((header::WWW_AUTHENTICATE, "Bearer"))
                .json(json!({ "errors": [{ "message": message, "extensions": { "code": "UNAUTHORIZED" } }] }))
        }
    };
    // Counted first and checked after, so that concurrent upgrades on
    // several workers can never overshoot the limit together.
    let drain = state.shutdown.track();
    if state.shutdown.open_connections() > state.settings.server.max_connections {
        drop(drain);
        metrics.rejected_total.with_label_values(&["max_connections"]).inc();
        return refuse(unavailable(), "UNAVAILABLE", "the node is at its connection limit");
    }
    let (body, oversized) = match pump::guard_frames(req, body, config.max_frame_bytes).await {
        Ok(guarded) => guarded,
        Err(e) => return e.error_response(),
    };
    let (mut response, session, messages) = match actix_ws::handle(req, body) {
        Ok(parts) => parts,
        Err(e) => return e.error_response(),
    };
    // The handshake does not echo a subprotocol; a client that offered some
    // must see the one chosen or it fails the connection.
    if req.headers().contains_key(header::SEC_WEBSOCKET_PROTOCOL) {
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(protocol.name()),
        );
    }
    let messages = messages.max_frame_size(config.max_frame_bytes);
    let verify = verifier(state.auth.clone());
    let max_operations = config.max_operations;
    let connection = Connection {
        executor,
        config,
        metrics: state.metrics.clone(),
        shutdown: state.shutdown.clone(),
        drain,
        oversized,
    };
    match protocol {
        Subprotocol::TransportWs => {
            let machine = TransportWs::new(principal, verify, max_operations);
            actix_web::rt::spawn(pump::run(connection, machine, session, messages));
        }
        Subprotocol::Legacy => {
            let machine = Legacy::new(principal, verify, max_operations);
            actix_web::rt::spawn(pump::run(connection, machine, session, messages));
        }
    }
    response
}

// ---------------------------------------------------------------------------
// What both protocol machines share.

/// Verifies a token from a `connection_init` payload; the error is safe to
/// show to the client.
pub type Verify = Arc<dyn Fn(&str) -> Result<Principal, String> + Send + Sync>;

/// The node's verifier as a [`Verify`].
pub fn verifier(auth: Arc<Authenticator>) -> Verify {
    Arc::new(move |token| auth.verify(token).map_err(|e| e.to_string()))
}

/// What a protocol machine asks the pump to do, in order.
#[derive(Debug)]
pub enum Action {
    /// Send a text frame.
    Send(String),
    /// Close the socket with this code and reason; nothing after it runs.
    Close(u16, String),
    /// Execute an operation and feed its results back under its id.
    Start(Box<Operation>),
    /// Drop an operation's stream (its results are no longer wanted).
    Stop(String),
    /// Count one finished or failed operation in
    /// `graphql_operations_total{type,outcome}`.
    Count { ty: &'static str, outcome: &'static str },
    /// Count a refusal in `rejected_total{reason}`.
    Reject(&'static str),
}

/// An operation a machine admitted.
#[derive(Debug)]
pub struct Operation {
    pub id: String,
    pub request: Request,
    /// `None` when the document does not parse (the executor reports why).
    pub kind: Option<OperationType>,
    /// Who runs it: the connection's principal at the time it started.
    pub principal: Option<Principal>,
}

/// A sans-IO protocol: the pump calls these and carries out the actions.
pub trait Protocol {
    /// The `transport` metric label.
    const TRANSPORT: &'static str;
    /// A complete text message from the client.
    fn on_text(&mut self, text: &str) -> Vec<Action>;
    /// A complete binary message from the client.
    fn on_binary(&mut self) -> Vec<Action>;
    /// One result of the operation `id`.
    fn on_response(&mut self, id: &str, response: Response) -> Vec<Action>;
    /// The operation `id` has no more results.
    fn on_end(&mut self, id: &str) -> Vec<Action>;
    /// `connection_init` did not arrive in time.
    fn on_init_timeout(&mut self) -> Vec<Action>;
    /// Every ping interval (besides the WebSocket ping the pump sends).
    fn on_heartbeat(&mut self) -> Vec<Action>;
    /// Whether `connection_init` was accepted (the init timer then stops).
    fn is_initialised(&self) -> bool;
}

/// The outcome of [`Operations::admit`].
pub(crate) enum Admission {
    Started(Box<Operation>),
    /// An active operation already has this id.
    Duplicate,
    /// The connection holds its maximum of operations.
    Full,
}

/// What to tell the client about one result.
pub(crate) enum Delivery {
    /// A result: `next` / `data`.
    Next(Response),
    /// The operation failed before execution (parse, validation, limits,
    /// a subscription refused at setup): `error`, and the operation is over.
    Failed(Response),
}

struct Active {
    label: &'static str,
    /// Whether the first result has arrived (the one that decides between
    /// a request error and a running operation).
    answered: bool,
}

/// The active operations of one connection: ids, the limit, and the
/// bookkeeping both protocols need.
pub(crate) struct Operations {
    active: HashMap<String, Active>,
    max: usize,
}

impl Operations {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            active: HashMap::new(),
            max,
        }
    }

    pub(crate) fn max(&self) -> usize {
        self.max
    }

    pub(crate) fn admit(&mut self, id: &str, request: Request, principal: Option<Principal>) -> Admission {
        if self.active.contains_key(id) {
            return Admission::Duplicate;
        }
        if self.active.len() >= self.max {
            return Admission::Full;
        }
        let kind = operation_type(&request).ok();
        let label = kind.map_or("unknown", operation_label);
        self.active.insert(id.to_owned(), Active { label, answered: false });
        Admission::Started(Box::new(Operation {
            id: id.to_owned(),
            request,
            kind,
            principal,
        }))
    }

    /// Classifies a result of `id`; `None` when `id` is no longer active (a
    /// result that raced a stop is dropped on purpose).
    pub(crate) fn deliver(&mut self, id: &str, response: Response, out: &mut Vec<Action>) -> Option<Delivery> {
        let op = self.active.get_mut(id)?;
        if op.answered {
            return Some(Delivery::Next(response));
        }
        op.answered = true;
        let ty = op.label;
        if is_request_error(&response) {
            self.active.remove(id);
            out.push(Action::Count {
                ty,
                outcome: "request_error",
            });
            out.push(Action::Stop(id.to_owned()));
            return Some(Delivery::Failed(response));
        }
        let outcome = if response.errors.is_empty() {
            "ok"
        } else {
            "field_error"
        };
        out.push(Action::Count { ty, outcome });
        Some(Delivery::Next(response))
    }

    /// The stream of `id` ended; `true` when it was active (the client is
    /// then told it completed).
    pub(crate) fn end(&mut self, id: &str, out: &mut Vec<Action>) -> bool {
        let Some(op) = self.active.remove(id) else { return false };
        if !op.answered {
            out.push(Action::Count {
                ty: op.label,
                outcome: "ok",
            });
        }
        true
    }

    /// The client stopped `id`; `true` when it was active.
    pub(crate) fn cancel(&mut self, id: &str, out: &mut Vec<Action>) -> bool {
        let Some(op) = self.active.remove(id) else { return false };
        if !op.answered {
            out.push(Action::Count {
                ty: op.label,
                outcome: "cancelled",
            });
        }
        out.push(Action::Stop(id.to_owned()));
        true
    }
}

/// The error list sent when a connection holds its maximum of operations.
pub(crate) fn too_many_operations(max: usize) -> Value {
    json!([{
        "message": format!("too many subscriptions on this connection (max {max})"),
        "extensions": { "code": "TOO_MANY_SUBSCRIPTIONS" }
    }])
}

/// The token a `connection_init` payload carries: `{"authorization":
/// "Bearer T"}` (the key in any case, as clients copy header names) or
/// `{"token": "T"}`. `Err` when one is present but unusable.
pub(crate) fn init_token(payload: Option<&Map<String, Value>>) -> Result<Option<&str>, String> {
    let Some(payload) = payload else { return Ok(None) };
    if let Some((_, value)) = payload.iter().find(|(k, _)| k.eq_ignore_ascii_case("authorization")) {
        let value = value.as_str().ok_or("authorization must be a string")?;
        return bearer(value)
            .map(Some)
            .ok_or_else(|| "authorization must be `Bearer <token>`".to_owned());
    }
    match payload.get("token") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(t)) if !t.trim().is_empty() => Ok(Some(t)),
        Some(_) => Err("token must be a non-empty string".to_owned()),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequestPayload {
    query: String,
    #[serde(default)]
    operation_name: Option<String>,
    #[serde(default)]
    variables: Option<Map<String, Value>>,
    #[serde(default)]
    extensions: Option<Map<String, Value>>,
}

/// The GraphQL request in a `subscribe`/`start` payload: `query` a string;
/// `variables`, `operationName` and `extensions` optional or null.
pub(crate) fn parse_request(payload: Value) -> Result<Request, String> {
    if !payload.is_object() {
        return Err("the payload must be an object".into());
    }
    let p: RequestPayload = serde_json::from_value(payload).map_err(|e| format!("invalid payload: {e}"))?;
    let mut request = Request::new(p.query);
    if let Some(name) = p.operation_name {
        request = request.operation_name(name);
    }
    if let Some(variables) = p.variables {
        request = request.variables(async_graphql::Variables::from_json(Value::Object(variables)));
    }
    if let Some(extensions) = p.extensions {
        request.extensions =
            serde_json::from_value(Value::Object(extensions)).map_err(|e| format!("invalid extensions: {e}"))?;
    }
    Ok(request)
}

/// One outgoing message: `{"type", "id"?, "payload"?}`.
#[derive(Serialize)]
struct Outgoing<'a, P: Serialize> {
    #[serde(rename = "type")]
    ty: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<P>,
}

/// Encodes one outgoing message.
pub(crate) fn encode<P: Serialize>(
    ty: &str,
    id: Option<&str>,
    payload: Option<P>,
) -> Result<String, serde_json::Error> {
    serde_json::to_string(&Outgoing { ty, id, payload })
}

/// Encodes a message without payload (cannot fail: only strings inside).
pub(crate) fn encode_bare(ty: &str, id: Option<&str>) -> String {
    encode::<()>(ty, id, None).unwrap_or_else(|_| format!("{{\"type\":\"{ty}\"}}"))
}
