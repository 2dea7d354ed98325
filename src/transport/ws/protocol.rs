//! What both GraphQL WebSocket machines ([`super::transport_ws`],
//! [`super::legacy`]) speak in: the [`Action`]s they ask the pump for, the
//! [`Protocol`] the pump drives, the state of a connection ([`Core`]: its
//! phase, who it runs as, its operations and their bookkeeping), and the
//! shapes of their messages.

use std::collections::HashMap;

use async_graphql::parser::types::OperationType;
use async_graphql::{Request, Response};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::auth::credentials::{init_token, CredentialError, Verify};
use crate::auth::Principal;
use crate::error::ErrorCode;
use crate::graphql::groups::SharedResult;
use crate::transport::operation::{operation_label, operation_type, outcome};

/// Where a connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Waiting for `connection_init`.
    Connecting,
    /// Acknowledged: operations may run.
    Ready,
    /// A close was requested; everything after it is ignored.
    Closed,
}

/// What both machines keep about a connection.
pub struct Core {
    pub(crate) phase: Phase,
    /// Who operations run as: the upgrade's principal until a
    /// `connection_init` token replaces it.
    principal: Option<Principal>,
    verify: Verify,
    pub(crate) ops: Operations,
}

impl Core {
    pub(crate) fn new(principal: Option<Principal>, verify: Verify, max_operations: usize) -> Self {
        Self {
            phase: Phase::Connecting,
            principal,
            verify,
            ops: Operations::new(max_operations),
        }
    }

    /// The principal operations run as.
    pub(crate) fn principal(&self) -> Option<&Principal> {
        self.principal.as_ref()
    }

    /// Asks for the close; nothing after it is answered.
    pub(crate) fn close(&mut self, code: u16, reason: impl Into<String>) -> Vec<Action> {
        self.phase = Phase::Closed;
        vec![Action::Close(code, reason.into())]
    }

    /// Accepts a `connection_init`: a token in its payload that verifies
    /// replaces the principal. `Err` (a message for the client) when the
    /// token is unusable or does not verify; the phase then stays.
    pub(crate) fn init(
        &mut self,
        payload: Option<&Map<String, Value>>,
    ) -> Result<(), CredentialError> {
        if let Some(token) = init_token(payload)? {
            self.principal = Some((self.verify)(token)?);
        }
        self.phase = Phase::Ready;
        Ok(())
    }

    /// Admits operation `id` as the connection's principal.
    pub(crate) fn admit(&mut self, id: &str, request: Request) -> Admission {
        self.ops.admit(id, request, self.principal.clone())
    }

    /// Classifies a result of `id` for the machine to encode, with the
    /// actions that go before it (its counts); no delivery once the
    /// connection is closed or when `id` is no longer active.
    pub(crate) fn deliver(
        &mut self,
        id: &str,
        response: Response,
    ) -> (Vec<Action>, Option<Delivery>) {
        let mut out = Vec::new();
        if self.phase == Phase::Closed {
            return (out, None);
        }
        let delivery = self.ops.deliver(id, response, &mut out);
        (out, delivery)
    }

    /// When the connection's principal stops counting (seconds since the
    /// Unix epoch); `None` when no token bounds it.
    pub(crate) fn expires_at(&self) -> Option<u64> {
        self.principal.as_ref().and_then(|p| p.expires_at)
    }

    /// Whether `connection_init` has been accepted (or the connection
    /// closed without it).
    pub(crate) fn is_initialised(&self) -> bool {
        self.phase != Phase::Connecting
    }

    /// The stream of `id` ended: `complete` when it was active (both
    /// protocols name the message so).
    pub(crate) fn end(&mut self, id: &str) -> Vec<Action> {
        if self.phase == Phase::Closed {
            return Vec::new();
        }
        let mut out = Vec::new();
        if self.ops.end(id, &mut out) {
            out.push(Action::Send(encode_bare("complete", Some(id))));
        }
        out
    }
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
    /// The type of the message that carries a result (`next`, `data`).
    const NEXT: &'static str;
    /// What the machine keeps about its connection.
    fn core(&mut self) -> &mut Core;
    /// A complete text message from the client; ignored once closed.
    fn on_text(&mut self, text: &str) -> Vec<Action> {
        if self.core().phase == Phase::Closed {
            return Vec::new();
        }
        self.text_message(text)
    }
    /// A complete binary message from the client; ignored once closed.
    fn on_binary(&mut self) -> Vec<Action> {
        if self.core().phase == Phase::Closed {
            return Vec::new();
        }
        self.binary_message()
    }
    /// A text message on a connection that is not closed.
    fn text_message(&mut self, text: &str) -> Vec<Action>;
    /// A binary message on a connection that is not closed.
    fn binary_message(&mut self) -> Vec<Action>;
    /// One result of the operation `id`.
    fn on_response(&mut self, id: &str, response: Response) -> Vec<Action>;
    /// One result of the operation `id` that its group shares, encoded
    /// once: only the envelope around it is this connection's.
    fn on_shared(&mut self, id: &str, shared: &SharedResult) -> Vec<Action> {
        let mut out = Vec::new();
        // Never a request error: the member's own checks passed before it
        // joined its group.
        let core = self.core();
        if core.phase != Phase::Closed && core.ops.deliver_shared(id, shared.outcome, &mut out) {
            out.push(Action::Send(encode_raw(Self::NEXT, id, &shared.json)));
        }
        out
    }
    /// The operation `id` has no more results: `complete` when it was
    /// active, as both protocols name it.
    fn on_end(&mut self, id: &str) -> Vec<Action> {
        self.core().end(id)
    }
    /// `connection_init` did not arrive in time.
    fn on_init_timeout(&mut self) -> Vec<Action>;
    /// Every ping interval (besides the WebSocket ping the pump sends).
    fn on_heartbeat(&mut self) -> Vec<Action>;
    /// Whether `connection_init` was accepted (the init timer then stops).
    fn is_initialised(&self) -> bool;
    /// Documents over `max_tokens` tokens are not parsed to label them.
    fn with_max_tokens(mut self, max_tokens: usize) -> Self
    where
        Self: Sized,
    {
        self.core().ops.set_max_tokens(max_tokens);
        self
    }
    /// When the token the connection runs as expires (seconds since the
    /// Unix epoch, leeway included).
    fn expires_at(&mut self) -> Option<u64> {
        self.core().expires_at()
    }
    /// The connection's token expired: it ends with 4403 on both protocols
    /// (a client reconnects with a fresh token and resumes).
    fn on_expired(&mut self) -> Vec<Action> {
        if self.core().phase == Phase::Closed {
            return Vec::new();
        }
        self.core()
            .close(crate::error::close::FORBIDDEN, "Forbidden: token expired")
    }
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
    /// `graphql.max_tokens`: a larger document is not parsed here to label
    /// it (the schema refuses it, unparsed, with `TOO_MANY_TOKENS`).
    max_tokens: usize,
}

impl Operations {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            active: HashMap::new(),
            max,
            max_tokens: crate::config::GraphqlSettings::default().max_tokens,
        }
    }

    pub(crate) fn set_max_tokens(&mut self, max_tokens: usize) {
        self.max_tokens = max_tokens;
    }

    pub(crate) fn max(&self) -> usize {
        self.max
    }

    pub(crate) fn admit(
        &mut self,
        id: &str,
        mut request: Request,
        principal: Option<Principal>,
    ) -> Admission {
        if self.active.contains_key(id) {
            return Admission::Duplicate;
        }
        if self.active.len() >= self.max {
            return Admission::Full;
        }
        let kind = operation_type(&mut request, self.max_tokens);
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
        let outcome = outcome(&response);
        out.push(Action::Count { ty, outcome });
        if outcome == "request_error" {
            self.active.remove(id);
            out.push(Action::Stop(id.to_owned()));
            return Some(Delivery::Failed(response));
        }
        Some(Delivery::Next(response))
    }

    /// [`Operations::deliver`] for a shared result whose outcome is known:
    /// `false` when `id` is no longer active.
    pub(crate) fn deliver_shared(
        &mut self,
        id: &str,
        outcome: &'static str,
        out: &mut Vec<Action>,
    ) -> bool {
        let Some(op) = self.active.get_mut(id) else {
            return false;
        };
        if !op.answered {
            op.answered = true;
            out.push(Action::Count {
                ty: op.label,
                outcome,
            });
        }
        true
    }

    /// The stream of `id` ended; `true` when it was active (the client is
    /// then told it completed).
    pub(crate) fn end(&mut self, id: &str, out: &mut Vec<Action>) -> bool {
        self.remove(id, "ok", out)
    }

    /// The client stopped `id`; `true` when it was active.
    pub(crate) fn cancel(&mut self, id: &str, out: &mut Vec<Action>) -> bool {
        let active = self.remove(id, "cancelled", out);
        if active {
            out.push(Action::Stop(id.to_owned()));
        }
        active
    }

    /// Forgets `id`, counting it with `outcome` if no result decided one.
    fn remove(&mut self, id: &str, outcome: &'static str, out: &mut Vec<Action>) -> bool {
        let Some(op) = self.active.remove(id) else {
            return false;
        };
        if !op.answered {
            out.push(Action::Count {
                ty: op.label,
                outcome,
            });
        }
        true
    }
}

/// The error list sent when a connection holds its maximum of operations.
pub(crate) fn too_many_operations(max: usize) -> Value {
    json!([{
        "message": format!("too many subscriptions on this connection (max {max})"),
        "extensions": { "code": ErrorCode::TooManySubscriptions.as_str() }
    }])
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

/// Why a `subscribe`/`start` payload is not a GraphQL request.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PayloadError {
    #[error("the payload must be an object")]
    NotAnObject,
    #[error("invalid payload: {0}")]
    Fields(serde_json::Error),
    #[error("invalid extensions: {0}")]
    Extensions(serde_json::Error),
}

/// The GraphQL request in a `subscribe`/`start` payload: `query` a string;
/// `variables`, `operationName` and `extensions` optional or null.
pub(crate) fn parse_request(payload: Value) -> Result<Request, PayloadError> {
    if !payload.is_object() {
        return Err(PayloadError::NotAnObject);
    }
    let p: RequestPayload = serde_json::from_value(payload).map_err(PayloadError::Fields)?;
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
        request.extensions =
            serde_json::from_value(Value::Object(extensions)).map_err(PayloadError::Extensions)?;
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

/// Encodes `{"type":ty,"id":id,"payload":json}` around a payload that is
/// already JSON, as [`encode`] would write it: once per delivery, so the id
/// is escaped only when it needs to be.
pub(crate) fn encode_raw(ty: &str, id: &str, json: &str) -> String {
    let plain = !id.chars().any(|c| c == '"' || c == '\\' || c.is_control());
    let mut out = String::with_capacity(ty.len() + id.len() + json.len() + 34);
    out.push_str("{\"type\":\"");
    out.push_str(ty);
    out.push_str("\",\"id\":");
    match plain {
        true => {
            out.push('"');
            out.push_str(id);
            out.push('"');
        }
        false => out.push_str(&serde_json::to_string(id).unwrap_or_else(|_| "\"\"".to_owned())),
    }
    out.push_str(",\"payload\":");
    out.push_str(json);
    out.push('}');
    out
}

/// Encodes a message without payload (cannot fail: only strings inside).
pub(crate) fn encode_bare(ty: &str, id: Option<&str>) -> String {
    encode::<()>(ty, id, None).unwrap_or_else(|_| format!("{{\"type\":\"{ty}\"}}"))
}

/// Readers of a protocol machine's actions, for the machines' unit tests.
#[cfg(test)]
pub(crate) mod action_tests {
    use async_graphql::Response;
    use serde_json::{json, Value};

    use async_graphql::ServerError;

    use super::{Action, Operation, Protocol};
    pub use crate::auth::credentials::test_verify as verify;
    use crate::transport::socket::sent_json;
    use crate::transport::ws::legacy::Legacy;
    use crate::transport::ws::transport_ws::TransportWs;

    /// One operation's life on the acknowledged machine `m`, whatever its
    /// protocol: `run` (the client message that starts `s`) starts it;
    /// each result goes out as a `result_type` message, the first counting
    /// it `ok` and the next nothing; its end is `complete`; a stale end or
    /// result says nothing.
    /// Checks that `actions` refuse an operation over the connection's
    /// limit and keep the connection: nothing closed or started, the
    /// refusal counted. Returns the messages sent.
    pub fn refused_at_the_limit(actions: &[Action]) -> Vec<Value> {
        assert!(closed(actions).is_none());
        assert!(started(actions).is_empty());
        assert!(actions
            .iter()
            .any(|a| matches!(a, Action::Reject("max_subscriptions"))));
        sent(actions)
    }

    /// `m` after the client sent `text` (its `connection_init`, or the
    /// message that starts an operation).
    pub fn running<P: Protocol>(mut m: P, text: &str) -> P {
        m.on_text(text);
        m
    }

    fn an_operation_runs_to_complete(m: &mut impl Protocol, run: &str, result_type: &str) {
        assert_eq!(started(&m.on_text(run)).len(), 1);
        for (n, counted) in [(1, vec![("subscription", "ok")]), (2, vec![])] {
            let actions = m.on_response("s", ticks(n));
            assert_eq!(
                sent(&actions),
                vec![json!({"type": result_type, "id": "s", "payload": {"data": {"ticks": n}}})]
            );
            assert_eq!(outcomes(&actions), counted);
        }
        assert_eq!(
            sent(&m.on_end("s")),
            vec![json!({"type": "complete", "id": "s"})]
        );
        assert!(m.on_end("s").is_empty());
        assert!(m.on_response("s", ticks(3)).is_empty());
    }

    /// A request error of the running operation `s`: one `error` message
    /// carrying `payload`, the operation stopped and counted, no `complete`.
    fn a_request_error_ends_without_complete(m: &mut impl Protocol, payload: Value) {
        let actions = m.on_response(
            "s",
            Response::from_errors(vec![ServerError::new("Unknown field", None)]),
        );
        assert_eq!(
            sent(&actions),
            vec![json!({"type": "error", "id": "s", "payload": payload})]
        );
        assert!(stop_of(&actions, "s").is_some());
        assert!(outcomes(&actions)
            .iter()
            .any(|(_, outcome)| *outcome == "request_error"));
        assert!(m.on_end("s").is_empty());
    }

    /// An acknowledged graphql-transport-ws machine and its `subscribe`.
    fn transport_ws() -> (TransportWs, &'static str) {
        let init = r#"{"type":"connection_init"}"#;
        (
            running(TransportWs::new(None, verify(), 10), init),
            "subscribe",
        )
    }

    /// An acknowledged legacy graphql-ws machine and its `start`.
    fn legacy() -> (Legacy, &'static str) {
        let init = r#"{"type":"connection_init","payload":{}}"#;
        (running(Legacy::new(None, verify(), 10), init), "start")
    }

    #[test]
    fn an_operation_runs_to_complete_on_both_protocols() {
        let (mut m, run) = transport_ws();
        an_operation_runs_to_complete(&mut m, &operation(run, "s"), "next");
        let (mut m, run) = legacy();
        an_operation_runs_to_complete(&mut m, &operation(run, "s"), "data");
    }

    #[test]
    fn a_request_error_ends_without_complete_on_both_protocols() {
        let (m, run) = transport_ws();
        a_request_error_ends_without_complete(
            &mut running(m, &operation(run, "s")),
            json!([{"message": "Unknown field"}]),
        );
        let (m, run) = legacy();
        a_request_error_ends_without_complete(
            &mut running(m, &operation(run, "s")),
            json!({"message": "Unknown field", "errors": [{"message": "Unknown field"}]}),
        );
    }

    /// A client message of type `ty` (`subscribe`, `start`) that runs
    /// `subscription { ticks }` as `id`.
    pub fn operation(ty: &str, id: &str) -> String {
        json!({"type": ty, "id": id, "payload": {"query": "subscription { ticks }"}}).to_string()
    }

    /// A result of `subscription { ticks }`.
    pub fn ticks(n: i32) -> Response {
        Response::new(async_graphql::Value::from_json(json!({ "ticks": n })).unwrap())
    }

    /// The messages sent, decoded.
    pub fn sent(actions: &[Action]) -> Vec<Value> {
        sent_json(actions, |a| match a {
            Action::Send(text) => Some(text),
            _ => None,
        })
    }

    /// The close, if any.
    pub fn closed(actions: &[Action]) -> Option<(u16, &str)> {
        actions.iter().find_map(|a| match a {
            Action::Close(code, reason) => Some((*code, reason.as_str())),
            _ => None,
        })
    }

    /// The `(type, outcome)` of every operation counted.
    pub fn outcomes(actions: &[Action]) -> Vec<(&'static str, &'static str)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Count { ty, outcome } => Some((*ty, *outcome)),
                _ => None,
            })
            .collect()
    }

    /// Where the stop of operation `id` stands among `actions`, if anywhere.
    pub fn stop_of(actions: &[Action], id: &str) -> Option<usize> {
        actions
            .iter()
            .position(|a| matches!(a, Action::Stop(stopped) if stopped == id))
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
    use super::*;

    #[test]
    fn a_shared_payload_is_framed_as_encode_frames_a_value() {
        let payload = serde_json::json!({ "data": { "postCreated": { "id": "1" } } });
        for id in ["op-1", "with \"quotes\" and \\ and\nnewline", "é"] {
            let raw = encode_raw("next", id, &payload.to_string());
            let encoded = encode("next", Some(id), Some(&payload)).unwrap();
            assert_eq!(raw, encoded, "{id:?}");
        }
    }
}
