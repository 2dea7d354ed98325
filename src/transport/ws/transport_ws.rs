//! The `graphql-transport-ws` protocol as a sans-IO state machine: client
//! messages and operation results in, [`Action`]s out.
//!
//! Follows the protocol's rules and close codes exactly: 4400 for any
//! message that is not JSON, has an unknown or server-only `type`, or lacks
//! a field (and for binary frames), 4401 for `subscribe` before the ack,
//! 4403 for a `connection_init` token that does not verify, 4408 when
//! `connection_init` is late, 4409 for a `subscribe` whose id is active,
//! 4429 for a second `connection_init`, 4500 when a result cannot be
//! encoded. Queries and mutations run as single-result operations (`next`
//! then `complete`). A `subscribe` over the per-connection limit gets an
//! `error` for its id and the connection stays open.

use async_graphql::Response;
use serde_json::{Map, Value};

use super::protocol::{
    encode, encode_bare, parse_request, too_many_operations, Action, Admission, Core, Delivery,
    Phase, Protocol,
};
use crate::auth::credentials::Verify;
use crate::auth::Principal;
use crate::error::close;
use crate::telemetry::metrics::transport;

/// A client message, validated.
enum ClientMessage {
    ConnectionInit(Option<Map<String, Value>>),
    Ping(Option<Value>),
    Pong,
    Subscribe { id: String, payload: Value },
    Complete { id: String },
}

/// The state of one `graphql-transport-ws` connection.
pub struct TransportWs {
    core: Core,
}

impl TransportWs {
    /// `principal` is who the upgrade authenticated (a `connection_init`
    /// token replaces it); `max_operations` bounds concurrent operations.
    pub fn new(principal: Option<Principal>, verify: Verify, max_operations: usize) -> Self {
        Self {
            core: Core::new(principal, verify, max_operations),
        }
    }

    fn connection_init(&mut self, payload: Option<Map<String, Value>>) -> Vec<Action> {
        if self.core.phase == Phase::Ready {
            return self
                .core
                .close(close::TOO_MANY_INIT, "Too many initialisation requests");
        }
        if self.core.init(payload.as_ref()).is_err() {
            return self.core.close(close::FORBIDDEN, "Forbidden");
        }
        vec![Action::Send(encode_bare("connection_ack", None))]
    }

    fn subscribe(&mut self, id: String, payload: Value) -> Vec<Action> {
        if self.core.phase != Phase::Ready {
            return self.core.close(close::UNAUTHORIZED, "Unauthorized");
        }
        let request = match parse_request(payload) {
            Ok(request) => request,
            Err(reason) => {
                return self.core.close(
                    close::BAD_REQUEST,
                    format!("Invalid message received: {reason}"),
                )
            }
        };
        match self.core.admit(&id, request) {
            Admission::Started(op) => vec![Action::Start(op)],
            Admission::Duplicate => self.core.close(
                close::SUBSCRIBER_EXISTS,
                format!("Subscriber for {id} already exists"),
            ),
            Admission::Full => {
                let errors = too_many_operations(self.core.ops.max());
                let mut out = vec![Action::Reject("max_subscriptions")];
                out.extend(self.send(encode("error", Some(&id), Some(errors))));
                out
            }
        }
    }

    /// A `Send`, or a 4500 close when the message could not be encoded.
    fn send(&mut self, encoded: Result<String, serde_json::Error>) -> Vec<Action> {
        match encoded {
            Ok(text) => vec![Action::Send(text)],
            Err(_) => self
                .core
                .close(close::INTERNAL_SERVER_ERROR, "Internal server error"),
        }
    }
}

/// Why a client message is refused: the 4400 close reason.
#[derive(Debug, thiserror::Error)]
enum Invalid {
    #[error("Invalid message received: not JSON")]
    NotJson,
    #[error("Invalid message received: not a JSON object")]
    NotAnObject,
    #[error("Invalid message received: \"type\" must be a string")]
    NoType,
    #[error("Invalid message received: {0} needs a non-empty string \"id\"")]
    NoId(&'static str),
    #[error("Invalid message received: {0} payload must be an object")]
    PayloadNotAnObject(&'static str),
    #[error("Invalid message received: subscribe needs an object \"payload\"")]
    NoSubscribePayload,
    #[error("Unexpected message of type {0} received")]
    ServerOnly(&'static str),
    /// The type, cut to 32 bytes.
    #[error("Invalid message received: unknown type {0:?}")]
    UnknownType(String),
}

/// Validates one client message.
fn parse(text: &str) -> Result<ClientMessage, Invalid> {
    let Ok(value) = serde_json::from_str::<Value>(text) else {
        return Err(Invalid::NotJson);
    };
    let Value::Object(mut message) = value else {
        return Err(Invalid::NotAnObject);
    };
    let ty = match message.get("type") {
        Some(Value::String(ty)) => ty.clone(),
        _ => return Err(Invalid::NoType),
    };
    let id = |message: &mut Map<String, Value>, ty: &'static str| match message.remove("id") {
        Some(Value::String(id)) if !id.is_empty() => Ok(id),
        _ => Err(Invalid::NoId(ty)),
    };
    match ty.as_str() {
        "connection_init" => match message.remove("payload") {
            None | Some(Value::Null) => Ok(ClientMessage::ConnectionInit(None)),
            Some(Value::Object(payload)) => Ok(ClientMessage::ConnectionInit(Some(payload))),
            Some(_) => Err(Invalid::PayloadNotAnObject("connection_init")),
        },
        "ping" | "pong" => {
            let ping = ty == "ping";
            let payload = match message.remove("payload") {
                None | Some(Value::Null) => None,
                Some(payload @ Value::Object(_)) => Some(payload),
                Some(_) => {
                    let ty = if ping { "ping" } else { "pong" };
                    return Err(Invalid::PayloadNotAnObject(ty));
                }
            };
            Ok(if ping {
                ClientMessage::Ping(payload)
            } else {
                ClientMessage::Pong
            })
        }
        "subscribe" => {
            let id = id(&mut message, "subscribe")?;
            match message.remove("payload") {
                Some(payload @ Value::Object(_)) => Ok(ClientMessage::Subscribe { id, payload }),
                _ => Err(Invalid::NoSubscribePayload),
            }
        }
        "complete" => Ok(ClientMessage::Complete {
            id: id(&mut message, "complete")?,
        }),
        "connection_ack" => Err(Invalid::ServerOnly("connection_ack")),
        "next" => Err(Invalid::ServerOnly("next")),
        "error" => Err(Invalid::ServerOnly("error")),
        _ => Err(Invalid::UnknownType(truncate(&ty, 32).to_owned())),
    }
}

/// At most `max` bytes of `s`, on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl Protocol for TransportWs {
    const TRANSPORT: &'static str = transport::GRAPHQL_WS;
    const NEXT: &'static str = "next";

    fn core(&mut self) -> &mut Core {
        &mut self.core
    }

    fn text_message(&mut self, text: &str) -> Vec<Action> {
        let message = match parse(text) {
            Ok(message) => message,
            Err(invalid) => return self.core.close(close::BAD_REQUEST, invalid.to_string()),
        };
        match message {
            ClientMessage::ConnectionInit(payload) => self.connection_init(payload),
            ClientMessage::Ping(payload) => {
                let pong = encode("pong", None, payload);
                self.send(pong)
            }
            ClientMessage::Pong => Vec::new(),
            ClientMessage::Subscribe { id, payload } => self.subscribe(id, payload),
            ClientMessage::Complete { id } => {
                // Completing an unknown or finished id is a race the
                // protocol allows, not an error.
                let mut out = Vec::new();
                self.core.ops.cancel(&id, &mut out);
                out
            }
        }
    }

    fn binary_message(&mut self) -> Vec<Action> {
        self.core.close(
            close::BAD_REQUEST,
            "Invalid message received: binary frames are not supported",
        )
    }

    fn on_response(&mut self, id: &str, response: Response) -> Vec<Action> {
        let (mut out, delivery) = self.core.deliver(id, response);
        let sent = match delivery {
            None => return out,
            Some(Delivery::Next(response)) => self.send(encode("next", Some(id), Some(&response))),
            Some(Delivery::Failed(response)) => {
                self.send(encode("error", Some(id), Some(&response.errors)))
            }
        };
        out.extend(sent);
        out
    }

    fn on_init_timeout(&mut self) -> Vec<Action> {
        if self.core.is_initialised() {
            return Vec::new();
        }
        self.core
            .close(close::INIT_TIMEOUT, "Connection initialisation timeout")
    }

    fn on_heartbeat(&mut self) -> Vec<Action> {
        // This protocol's liveness is the WebSocket ping the pump sends.
        Vec::new()
    }

    fn is_initialised(&self) -> bool {
        self.core.is_initialised()
    }
}

#[cfg(test)]
mod tests {
    use async_graphql::parser::types::OperationType;
    use async_graphql::ServerError;
    use serde_json::json;

    use super::*;
    use crate::error::ErrorCode;

    fn machine(max: usize) -> TransportWs {
        TransportWs::new(None, verify(), max)
    }

    fn acked(max: usize) -> TransportWs {
        let mut m = machine(max);
        assert_eq!(
            sent(&m.on_text(r#"{"type":"connection_init"}"#)),
            vec![json!({"type": "connection_ack"})]
        );
        m
    }

    use crate::transport::ws::protocol::action_tests::{
        closed, operation, outcomes, refused_at_the_limit, running, sent, started, stop_of,
        ticks as data, verify,
    };

    fn subscribe(id: &str) -> String {
        operation("subscribe", id)
    }

    #[test]
    fn init_without_payload_is_acknowledged_anonymously() {
        let mut m = acked(10);
        assert!(m.is_initialised());
        assert!(m.core.principal().is_none());
        let ops = m.on_text(&subscribe("1"));
        assert!(started(&ops)[0].principal.is_none());
    }

    #[test]
    fn ping_is_answered_with_pong_even_before_the_ack() {
        let mut m = machine(10);
        assert_eq!(
            sent(&m.on_text(r#"{"type":"ping"}"#)),
            vec![json!({"type": "pong"})]
        );
        assert_eq!(
            sent(&m.on_text(r#"{"type":"ping","payload":{"t":1}}"#)),
            vec![json!({"type": "pong", "payload": {"t": 1}})]
        );
        assert!(m.on_text(r#"{"type":"pong"}"#).is_empty());
        assert!(!m.is_initialised());
    }

    #[test]
    fn init_tokens_authenticate_and_win_over_the_upgrade() {
        let upgrade = Some(Principal {
            user_id: "from-upgrade".into(),
            scopes: vec![],
            expires_at: None,
        });
        for payload in [
            json!({"authorization": "Bearer good"}),
            json!({"Authorization": "Bearer good"}),
            json!({"token": "good"}),
        ] {
            let mut m = TransportWs::new(upgrade.clone(), verify(), 10);
            let init = json!({"type": "connection_init", "payload": payload}).to_string();
            assert_eq!(
                sent(&m.on_text(&init)),
                vec![json!({"type": "connection_ack"})]
            );
            assert_eq!(m.core.principal().unwrap().user_id, "u1");
            let ops = m.on_text(&subscribe("1"));
            assert_eq!(started(&ops)[0].principal.as_ref().unwrap().user_id, "u1");
        }
        // Without a token the upgrade's principal stays.
        let mut m = TransportWs::new(upgrade, verify(), 10);
        m.on_text(r#"{"type":"connection_init","payload":{"other":1}}"#);
        assert_eq!(m.core.principal().unwrap().user_id, "from-upgrade");
    }

    #[test]
    fn a_bad_init_token_is_forbidden() {
        for payload in [
            json!({"token": "bad"}),
            json!({"authorization": "Bearer bad"}),
            json!({"authorization": "Basic abc"}),
            json!({"authorization": 7}),
            json!({"token": ""}),
        ] {
            let mut m = machine(10);
            let init = json!({"type": "connection_init", "payload": payload}).to_string();
            let actions = m.on_text(&init);
            assert_eq!(closed(&actions), Some((4403, "Forbidden")), "{payload}");
            assert!(sent(&actions).is_empty());
        }
    }

    #[test]
    fn a_second_init_is_too_many() {
        let mut m = acked(10);
        assert_eq!(
            closed(&m.on_text(r#"{"type":"connection_init"}"#)),
            Some((4429, "Too many initialisation requests"))
        );
    }

    #[test]
    fn subscribe_before_the_ack_is_unauthorized() {
        let mut m = machine(10);
        assert_eq!(
            closed(&m.on_text(&subscribe("1"))),
            Some((4401, "Unauthorized"))
        );
        // Closed: nothing more happens.
        assert!(m.on_text(r#"{"type":"connection_init"}"#).is_empty());
    }

    #[test]
    fn malformed_messages_close_with_4400() {
        for text in [
            "not json",
            "[1,2]",
            r#"{"id":"1"}"#,
            r#"{"type":7}"#,
            r#"{"type":"hello"}"#,
            r#"{"type":"next","id":"1","payload":{}}"#,
            r#"{"type":"connection_ack"}"#,
            r#"{"type":"connection_init","payload":"x"}"#,
            r#"{"type":"ping","payload":[1]}"#,
            r#"{"type":"subscribe","payload":{"query":"{ a }"}}"#,
            r#"{"type":"subscribe","id":"","payload":{"query":"{ a }"}}"#,
            r#"{"type":"subscribe","id":1,"payload":{"query":"{ a }"}}"#,
            r#"{"type":"subscribe","id":"1"}"#,
            r#"{"type":"subscribe","id":"1","payload":{}}"#,
            r#"{"type":"subscribe","id":"1","payload":{"query":"{ a }","variables":[1]}}"#,
            r#"{"type":"subscribe","id":"1","payload":{"query":"{ a }","operationName":3}}"#,
            r#"{"type":"complete"}"#,
        ] {
            let mut m = acked(10);
            let actions = m.on_text(text);
            let (code, reason) = closed(&actions).unwrap_or_else(|| panic!("{text}: {actions:?}"));
            assert_eq!(code, 4400, "{text}");
            assert!(!reason.is_empty());
        }
        let mut m = acked(10);
        assert_eq!(closed(&m.on_binary()).map(|c| c.0), Some(4400));
    }

    #[test]
    fn optional_request_fields_may_be_null() {
        let mut m = acked(10);
        let text = r#"{"type":"subscribe","id":"1","payload":{"query":"query Q($a: Int) { a }","variables":null,"operationName":null,"extensions":null}}"#;
        assert_eq!(started(&m.on_text(text)).len(), 1);
        let text = r#"{"type":"subscribe","id":"2","payload":{"query":"query Q($a: Int) { a }","variables":{"a":1},"operationName":"Q","extensions":{"x":1}}}"#;
        let actions = m.on_text(text);
        let op = started(&actions)[0];
        assert_eq!(op.request.operation_name.as_deref(), Some("Q"));
        assert_eq!(op.kind, Some(OperationType::Query));
    }

    #[test]
    fn a_duplicate_active_id_closes_with_4409_but_a_finished_one_is_reusable() {
        let mut m = acked(10);
        let first = m.on_text(&subscribe("a"));
        assert_eq!(started(&first)[0].kind, Some(OperationType::Subscription));
        assert_eq!(
            closed(&m.on_text(&subscribe("a"))),
            Some((4409, "Subscriber for a already exists"))
        );

        // Completed by the client.
        let mut m = acked(10);
        m.on_text(&subscribe("a"));
        m.on_text(r#"{"type":"complete","id":"a"}"#);
        assert_eq!(started(&m.on_text(&subscribe("a"))).len(), 1);
        // Ended by the server.
        m.on_end("a");
        assert_eq!(started(&m.on_text(&subscribe("a"))).len(), 1);
        // Failed before execution.
        m.on_response(
            "a",
            Response::from_errors(vec![ServerError::new("bad", None)]),
        );
        assert_eq!(started(&m.on_text(&subscribe("a"))).len(), 1);
    }

    #[test]
    fn the_operation_limit_answers_error_and_keeps_the_connection() {
        let mut m = acked(2);
        m.on_text(&subscribe("1"));
        m.on_text(&subscribe("2"));
        assert_eq!(
            refused_at_the_limit(&m.on_text(&subscribe("3"))),
            vec![json!({"type": "error", "id": "3", "payload": [{
                "message": "too many subscriptions on this connection (max 2)",
                "extensions": {"code": ErrorCode::TooManySubscriptions.as_str()}
            }]})]
        );
        // Room again once one finishes; the refused id was never active.
        m.on_text(r#"{"type":"complete","id":"1"}"#);
        assert_eq!(started(&m.on_text(&subscribe("3"))).len(), 1);
    }

    #[test]
    fn field_errors_travel_in_next() {
        let mut m = running(acked(10), &subscribe("s"));
        let mut response = data(1);
        response.errors.push(ServerError::new("oops", None));
        let actions = m.on_response("s", response);
        assert_eq!(sent(&actions)[0]["type"], "next");
        assert!(outcomes(&actions)
            .iter()
            .any(|(_, outcome)| *outcome == "field_error"));
    }

    #[test]
    fn a_client_complete_stops_silently() {
        let mut m = running(acked(10), &subscribe("s"));
        let actions = m.on_text(r#"{"type":"complete","id":"s"}"#);
        assert!(sent(&actions).is_empty());
        assert!(stop_of(&actions, "s").is_some());
        assert!(m.on_response("s", data(1)).is_empty());
        assert!(m.on_end("s").is_empty());
        // Completing an unknown id is ignored.
        assert!(m.on_text(r#"{"type":"complete","id":"zzz"}"#).is_empty());
    }

    #[test]
    fn init_timeout_closes_only_before_init() {
        let mut m = machine(10);
        assert_eq!(
            closed(&m.on_init_timeout()),
            Some((4408, "Connection initialisation timeout"))
        );
        let mut m = acked(10);
        assert!(m.on_init_timeout().is_empty());
        assert!(m.on_heartbeat().is_empty());
    }

    #[test]
    fn a_long_unknown_type_is_truncated_in_the_reason() {
        let mut m = acked(10);
        let text = json!({"type": "é".repeat(200)}).to_string();
        let actions = m.on_text(&text);
        let (code, reason) = closed(&actions).unwrap();
        assert_eq!(code, 4400);
        assert!(reason.len() < 123, "{}", reason.len());
    }
}
