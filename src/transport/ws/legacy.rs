//! The legacy `graphql-ws` protocol (subscriptions-transport-ws) as a
//! sans-IO state machine: client messages and operation results in,
//! [`Action`]s out.
//!
//! `connection_init` is answered with `connection_ack` and a first `ka`
//! (then `ka` every ping interval); a token in its payload that does not
//! verify gets `connection_error` and close 4403. `start` runs an operation
//! whose results are `data`, then `complete`; an operation that fails before
//! execution gets one `error` and no `complete`; `stop` ends one (answered
//! with `complete`); `connection_terminate` closes with 1000.
//!
//! Where the protocol leaves a choice:
//!
//! - A message that cannot be parsed (not JSON, no string `type`, a binary
//!   frame) is answered with `connection_error` and ignored, as the
//!   protocol says; a parsed message the server cannot use (unknown type,
//!   missing `id`, a bad `start` payload) gets `error` (with its `id` when
//!   it has one). The connection stays open in both cases.
//! - `start` before the ack closes with 4401 and a second `connection_init`
//!   with 4429, as in `graphql-transport-ws`; a late `connection_init`
//!   closes with 4408 after a `connection_error`.
//! - `start` with the id of an active operation replaces it (the old one
//!   stops silently), which is what clients of this protocol expect.
//! - `error` payloads are an object: the first error's `message`, and every
//!   error in `errors`.

use async_graphql::Response;
use serde_json::{json, Map, Value};

use super::protocol::{
    encode, encode_bare, parse_request, too_many_operations, Action, Admission, Core, Delivery,
    Phase, Protocol,
};
use crate::auth::credentials::Verify;
use crate::auth::Principal;
use crate::error::close;
use crate::telemetry::metrics::transport;

/// The state of one legacy `graphql-ws` connection.
pub struct Legacy {
    core: Core,
}

/// What a text message turned out to be.
enum Parsed {
    Init(Option<Value>),
    Start {
        id: String,
        payload: Option<Value>,
    },
    Stop {
        id: String,
    },
    Terminate,
    /// Not parseable: `connection_error`.
    Unparseable(String),
    /// Parsed but unusable: `error`.
    Invalid {
        id: Option<String>,
        message: String,
    },
}

fn parse(text: &str) -> Parsed {
    let Ok(Value::Object(mut message)) = serde_json::from_str::<Value>(text) else {
        return Parsed::Unparseable("the message is not a JSON object".into());
    };
    let Some(Value::String(ty)) = message.remove("type") else {
        return Parsed::Unparseable("the message has no string \"type\"".into());
    };
    let id = match message.remove("id") {
        Some(Value::String(id)) if !id.is_empty() => Some(id),
        _ => None,
    };
    let payload = message.remove("payload").filter(|p| !p.is_null());
    match (ty.as_str(), id) {
        ("connection_init", _) => Parsed::Init(payload),
        ("connection_terminate", _) => Parsed::Terminate,
        ("start", Some(id)) => Parsed::Start { id, payload },
        ("stop", Some(id)) => Parsed::Stop { id },
        ("start" | "stop", None) => Parsed::Invalid {
            id: None,
            message: format!("{ty} needs a non-empty string \"id\""),
        },
        (_, id) => Parsed::Invalid {
            id,
            message: "unknown message type".into(),
        },
    }
}

/// The legacy `error` payload for a list of GraphQL errors.
fn error_payload(errors: Value) -> Value {
    let message = errors
        .get(0)
        .and_then(|e| e.get("message"))
        .cloned()
        .unwrap_or_else(|| Value::String("the operation failed".into()));
    json!({ "message": message, "errors": errors })
}

impl Legacy {
    /// `principal` is who the upgrade authenticated (a `connection_init`
    /// token replaces it); `max_operations` bounds concurrent operations.
    pub fn new(principal: Option<Principal>, verify: Verify, max_operations: usize) -> Self {
        Self {
            core: Core::new(principal, verify, max_operations),
        }
    }

    // Encoding a `serde_json::Value` cannot fail (its keys are strings), so
    // the fallbacks below are never sent.
    fn connection_error(message: &str) -> Action {
        Action::Send(
            encode(
                "connection_error",
                None,
                Some(json!({ "message": message })),
            )
            .unwrap_or_default(),
        )
    }

    fn error(id: Option<&str>, payload: Value) -> Action {
        Action::Send(encode("error", id, Some(payload)).unwrap_or_default())
    }

    /// Fails the connection after telling the client why, as this
    /// protocol's clients read `connection_error` and not close reasons.
    fn refuse(&mut self, code: u16, reason: &str, message: &str) -> Vec<Action> {
        let mut out = vec![Self::connection_error(message)];
        out.extend(self.core.close(code, reason));
        out
    }

    fn connection_init(&mut self, payload: Option<Value>) -> Vec<Action> {
        if self.core.phase == Phase::Ready {
            return self
                .core
                .close(close::TOO_MANY_INIT, "Too many initialisation requests");
        }
        let payload: Option<Map<String, Value>> = match payload {
            None => None,
            Some(Value::Object(map)) => Some(map),
            Some(_) => {
                return self.refuse(
                    close::BAD_REQUEST,
                    "Bad request",
                    "the connection_init payload must be an object",
                )
            }
        };
        if let Err(message) = self.core.init(payload.as_ref()) {
            return self.refuse(close::FORBIDDEN, "Forbidden", &message.to_string());
        }
        vec![
            Action::Send(encode_bare("connection_ack", None)),
            Action::Send(encode_bare("ka", None)),
        ]
    }

    fn start(&mut self, id: String, payload: Option<Value>) -> Vec<Action> {
        if self.core.phase != Phase::Ready {
            return self.core.close(close::UNAUTHORIZED, "Unauthorized");
        }
        let request = match payload.map(parse_request) {
            Some(Ok(request)) => request,
            Some(Err(invalid)) => {
                let message = invalid.to_string();
                return vec![Self::error(Some(&id), json!({ "message": message }))];
            }
            None => {
                let message = "start needs an object \"payload\"";
                return vec![Self::error(Some(&id), json!({ "message": message }))];
            }
        };
        let mut out = Vec::new();
        // Restarting an id replaces the running operation.
        self.core.ops.cancel(&id, &mut out);
        match self.core.admit(&id, request) {
            Admission::Started(op) => out.push(Action::Start(op)),
            // Unreachable after the cancel above; answered like a bad start
            // rather than trusted to stay so.
            Admission::Duplicate => {
                out.push(Self::error(Some(&id), json!({ "message": "duplicate id" })))
            }
            Admission::Full => {
                out.push(Action::Reject("max_subscriptions"));
                out.push(Self::error(
                    Some(&id),
                    error_payload(too_many_operations(self.core.ops.max())),
                ));
            }
        }
        out
    }
}

impl Protocol for Legacy {
    const TRANSPORT: &'static str = transport::GRAPHQL_WS_LEGACY;
    const NEXT: &'static str = "data";

    fn core(&mut self) -> &mut Core {
        &mut self.core
    }

    fn text_message(&mut self, text: &str) -> Vec<Action> {
        match parse(text) {
            Parsed::Init(payload) => self.connection_init(payload),
            Parsed::Start { id, payload } => self.start(id, payload),
            Parsed::Stop { id } => {
                let mut out = Vec::new();
                if self.core.ops.cancel(&id, &mut out) {
                    out.push(Action::Send(encode_bare("complete", Some(&id))));
                }
                out
            }
            Parsed::Terminate => self.core.close(close::NORMAL, "Normal Closure"),
            Parsed::Unparseable(message) => vec![Self::connection_error(&message)],
            Parsed::Invalid { id, message } => {
                vec![Self::error(id.as_deref(), json!({ "message": message }))]
            }
        }
    }

    fn binary_message(&mut self) -> Vec<Action> {
        vec![Self::connection_error("binary frames are not supported")]
    }

    fn on_response(&mut self, id: &str, response: Response) -> Vec<Action> {
        let (mut out, delivery) = self.core.deliver(id, response);
        let encoded = match delivery {
            None => return out,
            Some(Delivery::Next(response)) => encode("data", Some(id), Some(&response)),
            Some(Delivery::Failed(response)) => serde_json::to_value(&response.errors)
                .and_then(|errors| encode("error", Some(id), Some(error_payload(errors)))),
        };
        match encoded {
            Ok(text) => out.push(Action::Send(text)),
            Err(_) => out.extend(self.core.close(close::INTERNAL, "Internal server error")),
        }
        out
    }

    fn on_init_timeout(&mut self) -> Vec<Action> {
        if self.core.is_initialised() {
            return Vec::new();
        }
        self.refuse(
            close::INIT_TIMEOUT,
            "Connection initialisation timeout",
            "Connection initialisation timeout",
        )
    }

    fn on_heartbeat(&mut self) -> Vec<Action> {
        if self.core.phase != Phase::Ready {
            return Vec::new();
        }
        vec![Action::Send(encode_bare("ka", None))]
    }

    fn is_initialised(&self) -> bool {
        self.core.is_initialised()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    fn acked(max: usize) -> Legacy {
        let mut m = Legacy::new(None, verify(), max);
        assert_eq!(
            sent(&m.on_text(r#"{"type":"connection_init","payload":{}}"#)),
            vec![json!({"type": "connection_ack"}), json!({"type": "ka"})]
        );
        m
    }

    use crate::transport::ws::protocol::action_tests::{
        closed, operation, refused_at_the_limit, running, sent, started, stop_of, ticks as data,
        verify,
    };

    fn start(id: &str) -> String {
        operation("start", id)
    }

    #[test]
    fn init_acks_with_a_keep_alive_and_keeps_alive() {
        let mut m = Legacy::new(None, verify(), 10);
        assert!(m.on_heartbeat().is_empty(), "no ka before the ack");
        let mut m = acked(10);
        assert!(m.is_initialised());
        assert_eq!(sent(&m.on_heartbeat()), vec![json!({"type": "ka"})]);
        assert!(m.on_init_timeout().is_empty());
    }

    #[test]
    fn init_tokens_authenticate() {
        for payload in [
            json!({"authorization": "Bearer good"}),
            json!({"token": "good"}),
        ] {
            let mut m = Legacy::new(None, verify(), 10);
            m.on_text(&json!({"type": "connection_init", "payload": payload}).to_string());
            assert_eq!(m.core.principal().unwrap().user_id, "u1");
            let actions = m.on_text(&start("1"));
            assert_eq!(
                started(&actions)[0].principal.as_ref().unwrap().user_id,
                "u1"
            );
        }
    }

    #[test]
    fn a_bad_init_token_is_a_connection_error_then_4403() {
        let mut m = Legacy::new(None, verify(), 10);
        let actions = m.on_text(r#"{"type":"connection_init","payload":{"token":"bad"}}"#);
        assert_eq!(
            sent(&actions),
            vec![
                json!({"type": "connection_error", "payload": {"message": "the token is malformed"}})
            ]
        );
        assert_eq!(closed(&actions), Some((4403, "Forbidden")));
        let mut m = Legacy::new(None, verify(), 10);
        let actions = m.on_text(r#"{"type":"connection_init","payload":"x"}"#);
        assert_eq!(sent(&actions)[0]["type"], "connection_error");
        assert_eq!(closed(&actions).map(|c| c.0), Some(4400));
    }

    #[test]
    fn start_before_init_is_unauthorized_and_a_second_init_too_many() {
        let mut m = Legacy::new(None, verify(), 10);
        assert_eq!(
            closed(&m.on_text(&start("1"))),
            Some((4401, "Unauthorized"))
        );
        let mut m = acked(10);
        assert_eq!(
            closed(&m.on_text(r#"{"type":"connection_init"}"#)).map(|c| c.0),
            Some(4429)
        );
    }

    #[test]
    fn init_timeout_is_a_connection_error_then_4408() {
        let mut m = Legacy::new(None, verify(), 10);
        let actions = m.on_init_timeout();
        assert_eq!(sent(&actions)[0]["type"], "connection_error");
        assert_eq!(
            closed(&actions),
            Some((4408, "Connection initialisation timeout"))
        );
    }

    #[test]
    fn unparseable_messages_get_connection_error_and_the_connection_stays() {
        let mut m = acked(10);
        for text in ["nope", "[]", r#"{"id":"1"}"#, r#"{"type":1}"#] {
            let actions = m.on_text(text);
            assert!(closed(&actions).is_none(), "{text}");
            assert_eq!(sent(&actions)[0]["type"], "connection_error", "{text}");
        }
        assert_eq!(sent(&m.on_binary())[0]["type"], "connection_error");
        assert_eq!(started(&m.on_text(&start("1"))).len(), 1);
    }

    #[test]
    fn unusable_messages_get_error_and_the_connection_stays() {
        let mut m = acked(10);
        let actions = m.on_text(r#"{"type":"subscribe","id":"7"}"#);
        assert_eq!(
            sent(&actions),
            vec![
                json!({"type": "error", "id": "7", "payload": {"message": "unknown message type"}})
            ]
        );
        let actions = m.on_text(r#"{"type":"start","payload":{"query":"{ a }"}}"#);
        assert_eq!(sent(&actions)[0]["type"], "error");
        assert!(sent(&actions)[0].get("id").is_none());
        for bad in [
            json!({"type": "start", "id": "1"}),
            json!({"type": "start", "id": "1", "payload": {"variables": {}}}),
        ] {
            let actions = m.on_text(&bad.to_string());
            assert!(closed(&actions).is_none());
            assert_eq!(sent(&actions)[0]["type"], "error");
            assert_eq!(sent(&actions)[0]["id"], "1");
        }
        assert_eq!(started(&m.on_text(&start("1"))).len(), 1);
    }

    #[test]
    fn stop_is_answered_with_complete() {
        let mut m = running(acked(10), &start("s"));
        let actions = m.on_text(r#"{"type":"stop","id":"s"}"#);
        assert!(stop_of(&actions, "s").is_some());
        assert_eq!(sent(&actions), vec![json!({"type": "complete", "id": "s"})]);
        assert!(m.on_response("s", data(1)).is_empty());
        assert!(m.on_text(r#"{"type":"stop","id":"s"}"#).is_empty());
    }

    #[test]
    fn restarting_an_active_id_replaces_it() {
        let mut m = running(acked(10), &start("s"));
        let actions = m.on_text(&start("s"));
        assert!(closed(&actions).is_none());
        let stop = stop_of(&actions, "s").unwrap();
        let begin = actions
            .iter()
            .position(|a| matches!(a, Action::Start(_)))
            .unwrap();
        assert!(stop < begin);
        assert!(sent(&actions).is_empty());
    }

    #[test]
    fn the_operation_limit_answers_error_and_keeps_the_connection() {
        let mut m = acked(1);
        m.on_text(&start("1"));
        let error = &refused_at_the_limit(&m.on_text(&start("2")))[0];
        assert_eq!(error["type"], "error");
        assert_eq!(error["id"], "2");
        assert_eq!(
            error["payload"]["message"],
            "too many subscriptions on this connection (max 1)"
        );
        assert_eq!(
            error["payload"]["errors"][0]["extensions"]["code"],
            ErrorCode::TooManySubscriptions.as_str()
        );
    }

    #[test]
    fn terminate_closes_normally() {
        let mut m = acked(10);
        assert_eq!(
            closed(&m.on_text(r#"{"type":"connection_terminate"}"#)).map(|c| c.0),
            Some(1000)
        );
        assert!(m.on_text(&start("1")).is_empty());
    }
}
