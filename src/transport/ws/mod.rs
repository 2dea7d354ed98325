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

use crate::auth::{bearer, Authenticator, Principal};
use crate::shutdown::DrainGuard;
use crate::state::AppState;
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

async fn graphql_ws(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Payload,
) -> HttpResponse {
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

/// Whether the request's `Origin` may open a long-lived connection
/// (WebSocket or event stream).
pub(crate) fn origin_allowed(allowed: &[String], headers: &HeaderMap) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
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
pub(crate) fn upgrade_principal(
    state: &AppState,
    req: &HttpRequest,
) -> Result<Option<Principal>, String> {
    if req.headers().contains_key(header::AUTHORIZATION) {
        return principal_from_header(state, req);
    }
    let query = web::Query::<TokenQuery>::from_query(req.query_string())
        .map_err(|_| "the query string is malformed".to_owned())?;
    match query.into_inner().token.filter(|t| !t.is_empty()) {
        Some(token) => state
            .auth
            .verify(&token)
            .map(Some)
            .map_err(|e| e.to_string()),
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

/// The checks every WebSocket upgrade passes first: its `Origin` (403) and
/// the drain (503). The refusal is boxed: a response is large and the
/// common case is admission.
pub(crate) fn admit_upgrade(state: &AppState, req: &HttpRequest) -> Result<(), Box<HttpResponse>> {
    let metrics = &state.metrics;
    if !origin_allowed(&state.settings.server.allowed_origins, req.headers()) {
        metrics.rejected_total.with_label_values(&["origin"]).inc();
        return Err(Box::new(refuse(
            HttpResponse::Forbidden(),
            "FORBIDDEN",
            "this Origin may not open a WebSocket",
        )));
    }
    if state.shutdown.is_draining() {
        metrics
            .rejected_total
            .with_label_values(&["draining"])
            .inc();
        return Err(Box::new(refuse(
            unavailable(),
            "UNAVAILABLE",
            "the node is shutting down",
        )));
    }
    Ok(())
}

/// The 401 for an upgrade whose token does not verify.
pub(crate) fn unauthorized_upgrade(message: &str) -> HttpResponse {
    HttpResponse::Unauthorized()
        .insert_header((header::WWW_AUTHENTICATE, "Bearer"))
        .json(
            json!({ "errors": [{ "message": message, "extensions": { "code": "UNAUTHORIZED" } }] }),
        )
}

/// Counts one more long-lived connection, or refuses it (503) when the node
/// holds `server.max_connections`. The guard keeps it counted.
pub(crate) fn admit_connection(state: &AppState) -> Result<DrainGuard, Box<HttpResponse>> {
    // Counted first and checked after, so that concurrent upgrades on
    // several workers can never overshoot the limit together.
    let drain = state.shutdown.track();
    if state.shutdown.open_connections() > state.settings.server.max_connections {
        drop(drain);
        state
            .metrics
            .rejected_total
            .with_label_values(&["max_connections"])
            .inc();
        return Err(Box::new(refuse(
            unavailable(),
            "UNAVAILABLE",
            "the node is at its connection limit",
        )));
    }
    Ok(drain)
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
    if let Err(refused) = admit_upgrade(state, req) {
        return *refused;
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
        Err(message) => return unauthorized_upgrade(&message),
    };
    let drain = match admit_connection(state) {
        Ok(drain) => drain,
        Err(refused) => return *refused,
    };
    let (body, oversized) = match pump::guard_frames(req, body, config.max_frame_bytes).await {
        Ok(guarded) => guarded,
        Err(e) => return e.error_response(),
    };
    let (mut response, session, messages) = match actix_ws::handle(req, body) {
        Ok(parts) => parts,
        Err(e) => return e.error_response(),
    };
    // The handshake does not echo a subprotocol; a client that offered some
    // must see the one chosen or it fails the connection, and one that
    // offered none must not see any.
    let offered = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .any(|v| v.to_str().is_ok_and(|v| !v.trim().is_empty()));
    if offered {
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
    Count {
        ty: &'static str,
        outcome: &'static str,
    },
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

    pub(crate) fn admit(
        &mut self,
        id: &str,
        request: Request,
        principal: Option<Principal>,
    ) -> Admission {
        if self.active.contains_key(id) {
            return Admission::Duplicate;
        }
        if self.active.len() >= self.max {
            return Admission::Full;
        }
        let kind = operation_type(&request).ok();
        let label = kind.map_or("unknown", operation_label);
        self.active.insert(
            id.to_owned(),
            Active {
                label,
                answered: false,
            },
        );
        Admission::Started(Box::new(Operation {
            id: id.to_owned(),
            request,
            kind,
            principal,
        }))
    }

    /// Classifies a result of `id`; `None` when `id` is no longer active (a
    /// result that raced a stop is dropped on purpose).
    pub(crate) fn deliver(
        &mut self,
        id: &str,
        response: Response,
        out: &mut Vec<Action>,
    ) -> Option<Delivery> {
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
        let Some(op) = self.active.remove(id) else {
            return false;
        };
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
        let Some(op) = self.active.remove(id) else {
            return false;
        };
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
    let Some(payload) = payload else {
        return Ok(None);
    };
    if let Some((_, value)) = payload
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
    {
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
    let p: RequestPayload =
        serde_json::from_value(payload).map_err(|e| format!("invalid payload: {e}"))?;
    let mut request = Request::new(p.query);
    if let Some(name) = p.operation_name {
        request = request.operation_name(name);
    }
    if let Some(variables) = p.variables {
        request = request.variables(async_graphql::Variables::from_json(Value::Object(
            variables,
        )));
    }
    if let Some(extensions) = p.extensions {
        request.extensions = serde_json::from_value(Value::Object(extensions))
            .map_err(|e| format!("invalid extensions: {e}"))?;
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

/// Readers of a protocol machine's actions, for the machines' unit tests.
#[cfg(test)]
pub(crate) mod action_tests {
    use std::sync::Arc;

    use serde_json::Value;

    use super::{Action, Operation, Verify};
    use crate::auth::Principal;

    /// A verifier that knows one token, `good`, for user `u1`.
    pub fn verify() -> Verify {
        Arc::new(|token| match token {
            "good" => Ok(Principal {
                user_id: "u1".into(),
                scopes: vec![],
            }),
            _ => Err("the token is malformed".into()),
        })
    }

    /// The messages sent, decoded.
    pub fn sent(actions: &[Action]) -> Vec<Value> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send(text) => Some(serde_json::from_str(text).unwrap()),
                _ => None,
            })
            .collect()
    }

    /// The close, if any.
    pub fn closed(actions: &[Action]) -> Option<(u16, &str)> {
        actions.iter().find_map(|a| match a {
            Action::Close(code, reason) => Some((*code, reason.as_str())),
            _ => None,
        })
    }

    /// The operations started.
    pub fn started(actions: &[Action]) -> Vec<&Operation> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Start(op) => Some(&**op),
                _ => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    //! The handler and the pump over real sockets, with a schema of their
    //! own so that they do not depend on the node's.

    use std::net::{SocketAddr, TcpListener};
    use std::time::Duration;

    use actix_web::dev::ServerHandle;
    use actix_web::http::header::{CONNECTION, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE};
    use actix_web::http::StatusCode;
    use actix_web::{test as actix_test, App, HttpServer};
    use async_graphql::{Context, Object, Schema, Subscription};
    use futures_util::{SinkExt, Stream, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::HeaderValue as ClientHeaderValue;
    use tokio_tungstenite::tungstenite::Message as WsMessage;
    use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

    use super::*;
    use crate::config::Settings;
    use crate::graphql::Viewer;
    use crate::hub::{Cutoff, CutoffReason};
    use crate::telemetry::metrics::transport;

    struct TestQuery;

    #[Object]
    impl TestQuery {
        async fn hello(&self) -> &str {
            "world"
        }

        async fn whoami(&self, ctx: &Context<'_>) -> Option<String> {
            ctx.data::<Viewer>()
                .ok()
                .and_then(|v| v.0.as_ref().map(|p| p.user_id.clone()))
        }
    }

    struct TestMutation;

    #[Object]
    impl TestMutation {
        async fn add(&self, a: i32, b: i32) -> i32 {
            a + b
        }
    }

    struct TestSubscription;

    #[Subscription]
    impl TestSubscription {
        async fn ticks(&self, n: i32) -> impl Stream<Item = i32> {
            futures_util::stream::iter(0..n)
        }

        async fn forever(&self) -> impl Stream<Item = i32> {
            futures_util::stream::unfold(0, |i| async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                Some((i, i + 1))
            })
        }

        /// Large items as fast as they are taken.
        async fn flood(
            &self,
            ctx: &Context<'_>,
        ) -> async_graphql::Result<impl Stream<Item = String>> {
            *FLOODED.lock().unwrap() = Some(ctx.data::<Arc<Cutoff>>()?.clone());
            Ok(
                futures_util::stream::repeat("x".repeat(64 * 1024)).inspect(|_| {
                    FLOOD_ITEMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }),
            )
        }

        /// One item, then the connection is cut off as the hub would.
        async fn cut(&self, ctx: &Context<'_>) -> async_graphql::Result<impl Stream<Item = i32>> {
            let cutoff = ctx.data::<Arc<Cutoff>>()?.clone();
            Ok(
                futures_util::stream::iter([1]).chain(futures_util::stream::once(async move {
                    cutoff.cut(CutoffReason::SlowConsumer);
                    std::future::pending::<i32>().await
                })),
            )
        }
    }

    /// The cut-off of the connection running `flood` (one test uses it).
    static FLOODED: std::sync::Mutex<Option<Arc<Cutoff>>> = std::sync::Mutex::new(None);
    /// How many items `flood` produced: it stalls while the pump is blocked.
    static FLOOD_ITEMS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    type TestSchema = Schema<TestQuery, TestMutation, TestSubscription>;

    #[derive(Clone)]
    struct TestDeps {
        schema: TestSchema,
        config: PumpConfig,
    }

    async fn test_ws(
        state: web::Data<AppState>,
        deps: web::Data<TestDeps>,
        req: HttpRequest,
        body: web::Payload,
    ) -> HttpResponse {
        accept(&state, &req, body, deps.schema.clone(), deps.config.clone()).await
    }

    fn config() -> PumpConfig {
        PumpConfig {
            ping_interval: Duration::from_secs(5),
            init_timeout: Duration::from_secs(5),
            max_frame_bytes: 4096,
            max_operations: 3,
        }
    }

    fn state_with(edit: impl FnOnce(&mut Settings)) -> AppState {
        let mut settings = Settings::default();
        edit(&mut settings);
        crate::test_support::state(settings)
    }

    fn app_config(
        state: AppState,
        config: PumpConfig,
    ) -> impl FnOnce(&mut web::ServiceConfig) + Clone {
        let deps = TestDeps {
            schema: Schema::new(TestQuery, TestMutation, TestSubscription),
            config,
        };
        move |cfg: &mut web::ServiceConfig| {
            cfg.app_data(web::Data::new(state))
                .app_data(web::Data::new(deps))
                .route("/test/ws", web::get().to(test_ws));
            crate::transport::configure(cfg);
        }
    }

    /// A node on 127.0.0.1:0 serving the test schema at `/test/ws` beside
    /// the node's own routes.
    async fn serve(state: AppState, config: PumpConfig) -> (SocketAddr, ServerHandle) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let routes = app_config(state, config);
        let server = HttpServer::new(move || App::new().configure(routes.clone()))
            .workers(1)
            .disable_signals()
            .listen(listener)
            .unwrap()
            .run();
        let handle = server.handle();
        actix_web::rt::spawn(server);
        (addr, handle)
    }

    type Client = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

    async fn connect(
        addr: SocketAddr,
        path: &str,
        protocol: Option<&'static str>,
    ) -> (Client, Option<String>) {
        let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
        if let Some(protocol) = protocol {
            request.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                ClientHeaderValue::from_static(protocol),
            );
        }
        let (ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
        let chosen = response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .map(|v| v.to_str().unwrap().to_owned());
        (ws, chosen)
    }

    async fn send(ws: &mut Client, message: Value) {
        ws.send(WsMessage::Text(message.to_string())).await.unwrap();
    }

    /// The next text message, skipping control frames.
    async fn next_json(ws: &mut Client) -> Value {
        let next = async {
            loop {
                match ws.next().await {
                    Some(Ok(WsMessage::Text(text))) => return serde_json::from_str(&text).unwrap(),
                    Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
                    other => panic!("expected a text message, got {other:?}"),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), next)
            .await
            .expect("a message in time")
    }

    /// The close frame's code and reason, skipping everything before it.
    async fn next_close(ws: &mut Client) -> (u16, String) {
        let next = async {
            loop {
                match ws.next().await {
                    Some(Ok(WsMessage::Close(Some(frame)))) => {
                        return (u16::from(frame.code), frame.reason.into_owned())
                    }
                    Some(Ok(WsMessage::Close(None))) | None => panic!("closed without a code"),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => panic!("socket error before the close frame: {e}"),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), next)
            .await
            .expect("a close in time")
    }

    async fn init(ws: &mut Client) {
        send(ws, json!({"type": "connection_init"})).await;
        assert_eq!(next_json(ws).await, json!({"type": "connection_ack"}));
    }

    fn upgrade_request(path: &str) -> actix_test::TestRequest {
        actix_test::TestRequest::get()
            .uri(path)
            .insert_header((UPGRADE, "websocket"))
            .insert_header((CONNECTION, "Upgrade"))
            .insert_header((SEC_WEBSOCKET_VERSION, "13"))
            .insert_header((SEC_WEBSOCKET_KEY, "dGhlIHNhbXBsZSBub25jZQ=="))
    }

    #[test]
    fn negotiation_prefers_the_current_protocol() {
        let headers = |values: &[&'static str]| {
            let mut map = HeaderMap::new();
            for v in values {
                map.append(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(v));
            }
            map
        };
        assert_eq!(negotiate(&headers(&[])), Some(Subprotocol::TransportWs));
        assert_eq!(
            negotiate(&headers(&["graphql-ws"])),
            Some(Subprotocol::Legacy)
        );
        assert_eq!(
            negotiate(&headers(&["graphql-ws, graphql-transport-ws"])),
            Some(Subprotocol::TransportWs)
        );
        assert_eq!(
            negotiate(&headers(&["graphql-ws", "graphql-transport-ws"])),
            Some(Subprotocol::TransportWs)
        );
        assert_eq!(
            negotiate(&headers(&["chat", "graphql-ws"])),
            Some(Subprotocol::Legacy)
        );
        assert_eq!(negotiate(&headers(&["chat"])), None);
    }

    #[test]
    fn init_tokens_are_read_from_either_key() {
        let map = |v: Value| v.as_object().unwrap().clone();
        assert_eq!(init_token(None), Ok(None));
        assert_eq!(init_token(Some(&map(json!({})))), Ok(None));
        assert_eq!(
            init_token(Some(&map(json!({"authorization": "Bearer t"})))),
            Ok(Some("t"))
        );
        assert_eq!(
            init_token(Some(&map(json!({"AUTHORIZATION": "bearer t"})))),
            Ok(Some("t"))
        );
        assert_eq!(init_token(Some(&map(json!({"token": "t"})))), Ok(Some("t")));
        assert_eq!(init_token(Some(&map(json!({"token": null})))), Ok(None));
        assert!(init_token(Some(&map(json!({"authorization": "t"})))).is_err());
        assert!(init_token(Some(&map(json!({"token": 1})))).is_err());
    }

    #[actix_web::test]
    async fn upgrades_are_refused_before_the_handshake() {
        let state = state_with(|s| {
            s.server.allowed_origins = vec!["https://app.example".into()];
            s.server.max_connections = 1;
        });
        let app =
            actix_test::init_service(App::new().configure(app_config(state.clone(), config())))
                .await;

        let res = actix_test::call_service(
            &app,
            upgrade_request("/test/ws")
                .insert_header(("Sec-WebSocket-Protocol", "chat"))
                .to_request(),
        )
        .await;
        assert_eq!(res.status(), StatusCode::BAD_REQUEST);
        let body: Value = actix_test::read_body_json(res).await;
        let message = body["errors"][0]["message"].as_str().unwrap();
        assert!(
            message.contains("graphql-transport-ws") && message.contains("graphql-ws"),
            "{message}"
        );

        let res = actix_test::call_service(
            &app,
            upgrade_request("/test/ws")
                .insert_header(("Origin", "https://evil.example"))
                .to_request(),
        )
        .await;
        assert_eq!(res.status(), StatusCode::FORBIDDEN);

        let res = actix_test::call_service(
            &app,
            upgrade_request("/test/ws")
                .insert_header(("Authorization", "Bearer nope"))
                .to_request(),
        )
        .await;
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        let res =
            actix_test::call_service(&app, upgrade_request("/test/ws?token=nope").to_request())
                .await;
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);

        // An allowed Origin with a good token passes (the pump ends at once:
        // a test request has no socket behind it).
        let token = state
            .auth
            .mint("u1", Duration::from_secs(60), None)
            .unwrap();
        let res = actix_test::call_service(
            &app,
            upgrade_request(&format!("/test/ws?token={token}"))
                .insert_header(("Origin", "https://app.example"))
                .insert_header(("Sec-WebSocket-Protocol", "graphql-ws"))
                .to_request(),
        )
        .await;
        assert_eq!(res.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(
            res.headers().get(header::SEC_WEBSOCKET_PROTOCOL).unwrap(),
            "graphql-ws"
        );

        // At the connection limit.
        let held = state.shutdown.track();
        let res = actix_test::call_service(&app, upgrade_request("/test/ws").to_request()).await;
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(res.headers().get(header::RETRY_AFTER).unwrap(), "1");
        assert_eq!(
            state
                .metrics
                .rejected_total
                .with_label_values(&["max_connections"])
                .get(),
            1
        );
        drop(held);

        // Draining.
        state.shutdown.begin();
        let res = actix_test::call_service(&app, upgrade_request("/test/ws").to_request()).await;
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(res.headers().get(header::RETRY_AFTER).unwrap(), "1");
    }

    #[actix_web::test]
    async fn both_paths_upgrade_and_a_plain_get_still_works() {
        let state = state_with(|_| {});
        let (addr, server) = serve(state, config()).await;
        for path in ["/graphql/ws", "/graphql"] {
            let (mut ws, chosen) = connect(addr, path, Some("graphql-transport-ws")).await;
            assert_eq!(chosen.as_deref(), Some("graphql-transport-ws"), "{path}");
            init(&mut ws).await;
            let (mut ws, chosen) = connect(addr, path, Some("graphql-ws")).await;
            assert_eq!(chosen.as_deref(), Some("graphql-ws"), "{path}");
            send(&mut ws, json!({"type": "connection_init"})).await;
            assert_eq!(next_json(&mut ws).await, json!({"type": "connection_ack"}));
            assert_eq!(next_json(&mut ws).await, json!({"type": "ka"}));
            // No subprotocol offered: the current one, not echoed.
            let (mut ws, chosen) = connect(addr, path, None).await;
            assert_eq!(chosen, None);
            init(&mut ws).await;
        }
        let res = reqwest::get(format!("http://{addr}/graphql?query=%7B__typename%7D"))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let body: Value = res.json().await.unwrap();
        assert!(body["data"]["__typename"].is_string(), "{body}");
        server.stop(false).await;
    }

    #[actix_web::test]
    async fn operations_run_over_the_socket() {
        let state = state_with(|_| {});
        let token = state
            .auth
            .mint("u1", Duration::from_secs(60), None)
            .unwrap();
        let (addr, server) = serve(state.clone(), config()).await;
        let (mut ws, _) = connect(addr, "/test/ws", Some("graphql-transport-ws")).await;
        send(
            &mut ws,
            json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {token}")}}),
        )
        .await;
        assert_eq!(next_json(&mut ws).await["type"], "connection_ack");

        send(
            &mut ws,
            json!({"type": "subscribe", "id": "s", "payload": {"query": "subscription { ticks(n: 3) }"}}),
        )
        .await;
        for i in 0..3 {
            assert_eq!(
                next_json(&mut ws).await,
                json!({"type": "next", "id": "s", "payload": {"data": {"ticks": i}}})
            );
        }
        assert_eq!(
            next_json(&mut ws).await,
            json!({"type": "complete", "id": "s"})
        );

        send(
            &mut ws,
            json!({"type": "subscribe", "id": "q", "payload": {"query": "{ hello whoami }"}}),
        )
        .await;
        assert_eq!(
            next_json(&mut ws).await,
            json!({"type": "next", "id": "q", "payload": {"data": {"hello": "world", "whoami": "u1"}}})
        );
        assert_eq!(
            next_json(&mut ws).await,
            json!({"type": "complete", "id": "q"})
        );

        send(&mut ws, json!({"type": "subscribe", "id": "m", "payload": {"query": "mutation($a: Int!) { add(a: $a, b: 2) }", "variables": {"a": 1}}})).await;
        assert_eq!(next_json(&mut ws).await["payload"]["data"]["add"], 3);
        assert_eq!(next_json(&mut ws).await["type"], "complete");

        send(
            &mut ws,
            json!({"type": "subscribe", "id": "e", "payload": {"query": "{ nope }"}}),
        )
        .await;
        let error = next_json(&mut ws).await;
        assert_eq!(error["type"], "error");
        assert!(error["payload"][0]["message"].is_string());

        // The per-connection limit (3), then a client complete frees a slot.
        for id in ["f1", "f2", "f3", "f4"] {
            send(
                &mut ws,
                json!({"type": "subscribe", "id": id, "payload": {"query": "subscription { forever }"}}),
            )
            .await;
        }
        let refused = loop {
            let message = next_json(&mut ws).await;
            if message["type"] == "error" {
                break message;
            }
        };
        assert_eq!(refused["id"], "f4");
        assert_eq!(
            refused["payload"][0]["extensions"]["code"],
            "TOO_MANY_SUBSCRIPTIONS"
        );
        let gauge = state
            .metrics
            .subscriptions
            .with_label_values(&[transport::GRAPHQL_WS]);
        assert_eq!(gauge.get(), 3);
        assert_eq!(
            state
                .metrics
                .rejected_total
                .with_label_values(&["max_subscriptions"])
                .get(),
            1
        );
        for id in ["f1", "f2", "f3"] {
            send(&mut ws, json!({"type": "complete", "id": id})).await;
        }
        send(&mut ws, json!({"type": "ping"})).await;
        while next_json(&mut ws).await["type"] != "pong" {}
        assert_eq!(gauge.get(), 0);

        // A protocol violation still closes with the protocol's code.
        send(&mut ws, json!({"type": "connection_init"})).await;
        assert_eq!(
            next_close(&mut ws).await,
            (4429, "Too many initialisation requests".into())
        );
        let ops = &state.metrics.graphql_operations_total;
        // The `forever` ones count as ok or cancelled, by whether their
        // first tick beat the client's complete.
        let subscriptions =
            ["ok", "cancelled"].map(|o| ops.with_label_values(&["subscription", o]).get());
        assert_eq!(subscriptions.iter().sum::<u64>(), 4);
        assert_eq!(ops.with_label_values(&["query", "ok"]).get(), 1);
        assert_eq!(ops.with_label_values(&["mutation", "ok"]).get(), 1);
        assert_eq!(ops.with_label_values(&["query", "request_error"]).get(), 1);
        assert_eq!(
            state
                .metrics
                .ws_closes_total
                .with_label_values(&["4429"])
                .get(),
            1
        );
        server.stop(false).await;
    }

    #[actix_web::test]
    async fn the_legacy_protocol_runs_operations() {
        let state = state_with(|_| {});
        let (addr, server) = serve(state, config()).await;
        let (mut ws, _) = connect(addr, "/test/ws", Some("graphql-ws")).await;
        send(&mut ws, json!({"type": "connection_init", "payload": {}})).await;
        assert_eq!(next_json(&mut ws).await["type"], "connection_ack");
        assert_eq!(next_json(&mut ws).await["type"], "ka");
        send(
            &mut ws,
            json!({"type": "start", "id": "1", "payload": {"query": "subscription { ticks(n: 2) }"}}),
        )
        .await;
        assert_eq!(
            next_json(&mut ws).await,
            json!({"type": "data", "id": "1", "payload": {"data": {"ticks": 0}}})
        );
        assert_eq!(
            next_json(&mut ws).await,
            json!({"type": "data", "id": "1", "payload": {"data": {"ticks": 1}}})
        );
        assert_eq!(
            next_json(&mut ws).await,
            json!({"type": "complete", "id": "1"})
        );
        send(&mut ws, json!({"type": "connection_terminate"})).await;
        assert_eq!(next_close(&mut ws).await.0, 1000);
        server.stop(false).await;
    }

    #[actix_web::test]
    async fn a_late_init_closes_with_4408() {
        let state = state_with(|_| {});
        let (addr, server) = serve(
            state.clone(),
            PumpConfig {
                init_timeout: Duration::from_millis(100),
                ..config()
            },
        )
        .await;
        let (mut ws, _) = connect(addr, "/test/ws", Some("graphql-transport-ws")).await;
        assert_eq!(
            next_close(&mut ws).await,
            (4408, "Connection initialisation timeout".into())
        );
        let (mut ws, _) = connect(addr, "/test/ws", Some("graphql-ws")).await;
        assert_eq!(next_json(&mut ws).await["type"], "connection_error");
        assert_eq!(next_close(&mut ws).await.0, 4408);
        assert_eq!(
            state
                .metrics
                .ws_closes_total
                .with_label_values(&["4408"])
                .get(),
            2
        );
        server.stop(false).await;
    }

    #[actix_web::test]
    async fn an_oversized_frame_closes_only_its_connection() {
        let state = state_with(|_| {});
        let (addr, server) = serve(
            state,
            PumpConfig {
                max_frame_bytes: 1024,
                ..config()
            },
        )
        .await;
        let (mut good, _) = connect(addr, "/test/ws", Some("graphql-transport-ws")).await;
        init(&mut good).await;
        let (mut big, _) = connect(addr, "/test/ws", Some("graphql-transport-ws")).await;
        init(&mut big).await;
        let query = format!("{{ hello {} }}", " ".repeat(100_000));
        send(
            &mut big,
            json!({"type": "subscribe", "id": "1", "payload": {"query": query}}),
        )
        .await;
        assert_eq!(next_close(&mut big).await.0, 1009);
        send(
            &mut good,
            json!({"type": "subscribe", "id": "1", "payload": {"query": "{ hello }"}}),
        )
        .await;
        assert_eq!(
            next_json(&mut good).await["payload"]["data"]["hello"],
            "world"
        );
        server.stop(false).await;
    }

    #[actix_web::test]
    async fn a_cut_off_connection_closes_with_1013() {
        let state = state_with(|_| {});
        let (addr, server) = serve(state.clone(), config()).await;
        let (mut ws, _) = connect(addr, "/test/ws", Some("graphql-transport-ws")).await;
        init(&mut ws).await;
        send(
            &mut ws,
            json!({"type": "subscribe", "id": "c", "payload": {"query": "subscription { cut }"}}),
        )
        .await;
        assert_eq!(next_json(&mut ws).await["payload"]["data"]["cut"], 1);
        assert_eq!(next_close(&mut ws).await, (1013, "slow consumer".into()));
        server.stop(false).await;
    }

    #[actix_web::test]
    async fn a_client_that_stops_reading_is_still_cut_off() {
        let state = state_with(|_| {});
        let (addr, server) = serve(state.clone(), config()).await;
        let (mut ws, _) = connect(addr, "/test/ws", Some("graphql-transport-ws")).await;
        init(&mut ws).await;
        send(
            &mut ws,
            json!({"type": "subscribe", "id": "f", "payload": {"query": "subscription { flood }"}}),
        )
        .await;
        // Not reading: the socket fills up and the pump blocks on a write,
        // which shows as the stream no longer being polled.
        let items = || FLOOD_ITEMS.load(std::sync::atomic::Ordering::Relaxed);
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let before = items();
                tokio::time::sleep(Duration::from_millis(100)).await;
                if before > 0 && items() == before {
                    break;
                }
            }
        })
        .await
        .expect("the pump blocks on the full socket");
        assert_eq!(state.shutdown.open_connections(), 1);
        let cutoff = FLOODED.lock().unwrap().clone().expect("flood started");
        cutoff.cut(CutoffReason::SlowConsumer);
        // The blocked write yields to the cut-off; the close cannot get
        // through a full socket, so the task gives up on it and ends.
        assert_eq!(state.shutdown.drained(Duration::from_secs(3)).await, 0);
        assert_eq!(
            state
                .metrics
                .ws_closes_total
                .with_label_values(&["1013"])
                .get(),
            1
        );
        assert_eq!(
            state
                .metrics
                .subscriptions
                .with_label_values(&[transport::GRAPHQL_WS])
                .get(),
            0
        );
        drop(ws);
        server.stop(false).await;
    }

    #[actix_web::test]
    async fn the_drain_closes_with_1001() {
        let state = state_with(|_| {});
        let (addr, server) = serve(state.clone(), config()).await;
        let (mut ws, _) = connect(addr, "/test/ws", Some("graphql-transport-ws")).await;
        init(&mut ws).await;
        send(
            &mut ws,
            json!({"type": "subscribe", "id": "f", "payload": {"query": "subscription { forever }"}}),
        )
        .await;
        next_json(&mut ws).await;
        let connections = state
            .metrics
            .connections
            .with_label_values(&[transport::GRAPHQL_WS]);
        assert_eq!(connections.get(), 1);
        assert_eq!(state.shutdown.open_connections(), 1);
        state.shutdown.begin();
        assert_eq!(
            next_close(&mut ws).await,
            (1001, "server shutting down".into())
        );
        assert_eq!(state.shutdown.drained(Duration::from_secs(2)).await, 0);
        assert_eq!(connections.get(), 0);
        server.stop(false).await;
    }

    #[actix_web::test]
    async fn a_silent_peer_is_closed_after_three_ping_intervals() {
        let state = state_with(|_| {});
        let (addr, server) = serve(
            state,
            PumpConfig {
                ping_interval: Duration::from_millis(50),
                ..config()
            },
        )
        .await;
        let (mut ws, _) = connect(addr, "/test/ws", Some("graphql-ws")).await;
        send(&mut ws, json!({"type": "connection_init"})).await;
        // Not reading: the client answers no ping.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let mut kas = 0;
        let close = loop {
            match tokio::time::timeout(Duration::from_secs(5), ws.next())
                .await
                .unwrap()
            {
                Some(Ok(WsMessage::Text(text))) => kas += usize::from(text.contains("\"ka\"")),
                Some(Ok(WsMessage::Close(Some(frame)))) => {
                    break (u16::from(frame.code), frame.reason.into_owned())
                }
                Some(Ok(_)) => {}
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(close, (1001, "idle timeout".into()));
        assert!(
            kas >= 2,
            "the ack's ka and at least one periodic ka, got {kas}"
        );
        server.stop(false).await;
    }
}
