//! The envelope protocol as a sans-IO state machine.
//!
//! [`Machine::on_text`] turns one client message into [`Action`]s for the
//! pump. The effects it asks for (open a subscription, store a message,
//! publish a typing signal, set a status) are carried out by the pump and
//! come back as [`Outcome`]s through [`Machine::on_outcome`], which answers
//! the client. Nothing here touches a socket, the store or the hub, so
//! every message type and every bad input is tested below without them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Map, Value};

use super::types::{client, server, CLIENT_MESSAGE_TYPES};
use crate::auth::credentials::Verify;
use crate::auth::policy::Refusal;
use crate::auth::Principal;
use crate::broker::GapReason;
use crate::domain::{self, SendRefusal, Sent};
use crate::error::{close, envelope as code};
use crate::event::{timestamp_now, topic};
use crate::presence::{PresenceError, Status};
use crate::ratelimit::{ConnectionLimiter, Limited, Limits};
use crate::store::StoreError;

/// The per-connection limits the machine enforces.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    /// Most channels subscribed (or being subscribed) at once.
    pub max_subscriptions: usize,
    /// Longest text message handled; longer ones get `error too_large`.
    pub max_message_bytes: usize,
    /// How long an unauthenticated connection lives (for the message).
    pub auth_timeout: Duration,
}

/// What the machine asks the pump to do, in order.
#[derive(Debug)]
pub enum Action {
    /// Send this control envelope.
    Send(String),
    /// Close the socket with this code and reason; nothing after it runs.
    Close(u16, String),
    /// Carry out an effect and hand its [`Outcome`] back.
    Effect(Effect),
    /// Keep the subscription the last `Open` produced: forward its events
    /// and hold `user_id`'s presence in the channel while it lives.
    Attach { channel_id: String, user_id: String },
    /// Drop the channel's subscription (and presence) if it has one.
    Release { channel_id: String },
    /// Count a refusal in `rejected_total{reason}`.
    Reject(&'static str),
}

/// The asynchronous work a client message causes. The pump runs effects one
/// at a time in arrival order, so replies keep the order of requests.
#[derive(Debug)]
pub enum Effect {
    /// Authorize `channel:{id}` for `principal` and subscribe from
    /// `last_event_id`; answered with [`Outcome::Opened`].
    Open {
        channel_id: String,
        subscription: u64,
        last_event_id: Option<String>,
        principal: Principal,
    },
    /// Store and publish a message; answered with [`Outcome::Sent`].
    SendMessage {
        channel_id: String,
        content: String,
        principal: Principal,
    },
    /// Publish `user.typing`, after authorizing the channel unless
    /// `authorized` (this connection subscribes to it already).
    Typing {
        channel_id: String,
        principal: Principal,
        authorized: bool,
    },
    /// Hand a status to presence; answered with [`Outcome::StatusSet`].
    SetStatus {
        principal: Principal,
        status: Status,
    },
}

/// What an [`Effect`] came to.
#[derive(Debug)]
pub enum Outcome {
    /// `Ok(gap)`: subscribed; `gap` says why `last_event_id` could not be
    /// resumed from exactly, if it could not.
    Opened {
        channel_id: String,
        subscription: u64,
        result: Result<Option<GapReason>, Refusal>,
    },
    Sent {
        channel_id: String,
        result: Result<Sent, SendRefusal>,
    },
    Typed {
        channel_id: String,
        result: Result<(), Refusal>,
    },
    StatusSet {
        result: Result<(), PresenceError>,
    },
}

/// A channel of this connection.
#[derive(Debug)]
struct Channel {
    /// Which `Open` this is, so that the outcome of an earlier subscribe of
    /// the same channel (unsubscribed meanwhile) is told apart.
    subscription: u64,
    /// Whether its subscription is attached (events flow).
    active: bool,
}

/// One connection's protocol state.
pub struct Machine {
    session_id: String,
    /// Control envelopes sent so far: the `n` of their ids.
    sent: u64,
    verify: Verify,
    principal: Option<Principal>,
    channels: HashMap<String, Channel>,
    next_subscription: u64,
    config: MachineConfig,
    limits: Arc<Limits>,
    connection: ConnectionLimiter,
}

/// A client message, parsed.
#[derive(Debug, PartialEq)]
enum Request {
    Auth {
        token: String,
    },
    Subscribe {
        channel_id: String,
        last_event_id: Option<String>,
    },
    Unsubscribe {
        channel_id: String,
    },
    Send {
        channel_id: String,
        content: String,
    },
    Typing {
        channel_id: String,
    },
    Presence {
        status: Status,
    },
    Ping {
        payload: Option<Map<String, Value>>,
    },
}

/// An `error` to send instead of acting on a message.
#[derive(Debug, PartialEq)]
struct Problem {
    code: &'static str,
    message: String,
    /// The input field at fault, as a path (`payload.channel_id`).
    field: Option<&'static str>,
    /// The type of the message refused, when it was one of the protocol's.
    request: Option<&'static str>,
    retry_after_ms: Option<u64>,
}

impl Problem {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            field: None,
            request: None,
            retry_after_ms: None,
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(code::BAD_REQUEST, message)
    }

    fn field(mut self, field: &'static str) -> Self {
        self.field = Some(field);
        self
    }

    fn request(mut self, request: &'static str) -> Self {
        self.request = Some(request);
        self
    }
}

/// The fields of one message, read with errors that name the field.
struct Fields {
    request: &'static str,
    payload: Option<Map<String, Value>>,
}

impl Fields {
    fn get(&self, name: &str) -> Option<&Value> {
        self.payload
            .as_ref()
            .and_then(|p| p.get(name))
            .filter(|v| !v.is_null())
    }

    fn string(&self, name: &str, path: &'static str) -> Result<String, Problem> {
        match self.get(name) {
            None => Err(Problem::bad(format!("missing field `{path}`"))
                .field(path)
                .request(self.request)),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(Problem::bad(format!("`{path}` must be a string"))
                .field(path)
                .request(self.request)),
        }
    }

    fn optional_string(&self, name: &str, path: &'static str) -> Result<Option<String>, Problem> {
        match self.get(name) {
            None => Ok(None),
            Some(_) => self.string(name, path).map(Some),
        }
    }

    fn channel_id(&self) -> Result<String, Problem> {
        const PATH: &str = "payload.channel_id";
        let id = self.string("channel_id", PATH)?;
        if id.is_empty() || !topic::is_valid(&topic::channel(&id)) {
            return Err(Problem::bad(format!("`{PATH}` is not a valid channel id"))
                .field(PATH)
                .request(self.request));
        }
        Ok(id)
    }
}

/// Parses one client message: a JSON object with a string `type` and, when
/// the type has fields, an object `payload`.
fn parse(text: &str) -> Result<Request, Problem> {
    let not_an_object = || Problem::bad("a message must be a JSON object with a `type`");
    let Ok(Value::Object(mut message)) = serde_json::from_str::<Value>(text) else {
        return Err(not_an_object());
    };
    let kind = match message.get("type") {
        None | Some(Value::Null) => return Err(Problem::bad("missing field `type`").field("type")),
        Some(Value::String(kind)) => kind,
        Some(_) => return Err(Problem::bad("`type` must be a string").field("type")),
    };
    let Some(request) = CLIENT_MESSAGE_TYPES.iter().copied().find(|t| t == kind) else {
        // The unknown name is echoed, bounded, so that a client sees its typo.
        let shown: String = kind.chars().take(64).collect();
        return Err(Problem::bad(format!(
            "unknown message type {shown:?}; expected one of {}",
            CLIENT_MESSAGE_TYPES.join(", ")
        ))
        .field("type"));
    };
    let payload = match message.remove("payload") {
        None | Some(Value::Null) => None,
        Some(Value::Object(payload)) => Some(payload),
        Some(_) => {
            return Err(Problem::bad("`payload` must be an object")
                .field("payload")
                .request(request))
        }
    };
    let fields = Fields { request, payload };
    Ok(match request {
        client::AUTH => Request::Auth {
            token: fields.string("token", "payload.token")?,
        },
        client::CHANNEL_SUBSCRIBE => Request::Subscribe {
            channel_id: fields.channel_id()?,
            last_event_id: fields.optional_string("last_event_id", "payload.last_event_id")?,
        },
        client::CHANNEL_UNSUBSCRIBE => Request::Unsubscribe {
            channel_id: fields.channel_id()?,
        },
        client::MESSAGE_SEND => Request::Send {
            channel_id: fields.channel_id()?,
            content: fields.string("content", "payload.content")?,
        },
        client::USER_TYPING => Request::Typing {
            channel_id: fields.channel_id()?,
        },
        client::PRESENCE_UPDATE => {
            const PATH: &str = "payload.status";
            let status = fields.string("status", PATH)?;
            let status = Status::parse(&status).ok_or_else(|| {
                Problem::bad(format!("`{PATH}` must be one of online, away, busy"))
                    .field(PATH)
                    .request(request)
            })?;
            Request::Presence { status }
        }
        _ => Request::Ping {
            payload: fields.payload,
        },
    })
}

/// The envelope error code for a refused subscription (or typing signal).
fn refusal_code(refusal: &Refusal) -> &'static str {
    match refusal {
        Refusal::Unauthorized(_) => code::UNAUTHORIZED,
        Refusal::Forbidden(_) => code::FORBIDDEN,
        Refusal::NotFound(_) => code::NOT_FOUND,
        Refusal::InvalidTopic(_) => code::BAD_REQUEST,
        Refusal::Unavailable(_) => code::INTERNAL,
    }
}

/// One control envelope as written: the same shape as an event's.
#[derive(Serialize)]
struct Envelope<'a> {
    id: String,
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    topic: Option<String>,
    payload: Value,
    timestamp: String,
}

impl Machine {
    /// A connection with `principal` when the upgrade carried a valid token.
    pub fn new(
        session_id: String,
        principal: Option<Principal>,
        verify: Verify,
        config: MachineConfig,
        limits: Arc<Limits>,
    ) -> Self {
        let connection = limits.connection();
        Self {
            session_id,
            sent: 0,
            verify,
            principal,
            channels: HashMap::new(),
            next_subscription: 0,
            config,
            limits,
            connection,
        }
    }

    /// The greeting: `connection.established`, and `auth.success` when the
    /// upgrade authenticated the connection.
    pub fn start(&mut self) -> Vec<Action> {
        let established = json!({ "session_id": self.session_id });
        let mut out = vec![self.control(server::CONNECTION_ESTABLISHED, None, established)];
        if let Some(user_id) = self.principal.as_ref().map(|p| p.user_id.clone()) {
            out.push(self.control(server::AUTH_SUCCESS, None, json!({ "user_id": user_id })));
        }
        out
    }

    pub fn is_authenticated(&self) -> bool {
        self.principal.is_some()
    }

    /// Who the connection speaks for, once authenticated.
    pub fn user_id(&self) -> Option<&str> {
        self.principal.as_ref().map(|p| p.user_id.as_str())
    }

    /// A complete text message from the client.
    pub fn on_text(&mut self, text: &str) -> Vec<Action> {
        self.on_text_at(text, Instant::now())
    }

    /// [`Machine::on_text`] at `now` (the connection's rate limit reads it).
    pub fn on_text_at(&mut self, text: &str, now: Instant) -> Vec<Action> {
        if let Err(problem) = self.admit(now) {
            return vec![self.error(problem)];
        }
        if text.len() > self.config.max_message_bytes {
            let max = self.config.max_message_bytes;
            return vec![self.error(Problem::new(
                code::TOO_LARGE,
                format!("messages are limited to {max} bytes"),
            ))];
        }
        match parse(text) {
            Ok(request) => self.handle(request),
            Err(problem) => vec![self.error(problem)],
        }
    }

    /// A complete binary message: the protocol is JSON text only.
    pub fn on_binary(&mut self) -> Vec<Action> {
        self.on_binary_at(Instant::now())
    }

    pub fn on_binary_at(&mut self, now: Instant) -> Vec<Action> {
        if let Err(problem) = self.admit(now) {
            return vec![self.error(problem)];
        }
        vec![self.error(Problem::bad(
            "binary messages are not accepted; send JSON text",
        ))]
    }

    /// The connection was not authenticated in time.
    pub fn on_auth_timeout(&mut self) -> Vec<Action> {
        if self.is_authenticated() {
            return Vec::new();
        }
        let secs = self.config.auth_timeout.as_secs();
        let failed = json!({
            "code": code::UNAUTHORIZED,
            "message": format!("not authenticated within {secs}s: send auth, or connect with ?token="),
        });
        vec![
            self.control(server::AUTH_FAILED, None, failed),
            Action::Reject("auth_timeout"),
            Action::Close(close::UNAUTHORIZED, "authentication timeout".into()),
        ]
    }

    /// When the connection's token stops counting (seconds since the Unix
    /// epoch, leeway included); an `auth` with a fresh token of the same
    /// user before then moves it.
    pub fn expires_at(&self) -> Option<u64> {
        self.principal.as_ref().and_then(|p| p.expires_at)
    }

    /// The connection's token expired: `auth.expired`, then close 4401.
    pub fn on_expired(&mut self) -> Vec<Action> {
        let expired = json!({
            "code": code::UNAUTHORIZED,
            "message": "the token has expired: reconnect with a fresh one (or send auth with one before it expires)",
        });
        vec![
            self.control(server::AUTH_EXPIRED, None, expired),
            Action::Close(close::UNAUTHORIZED, "token expired".into()),
        ]
    }

    /// A channel's stream lost events it could not recover.
    pub fn on_gap(&mut self, channel_id: &str, reason: GapReason) -> Vec<Action> {
        if !self.channels.get(channel_id).is_some_and(|c| c.active) {
            return Vec::new();
        }
        let payload = json!({ "channel_id": channel_id, "reason": reason.as_str() });
        vec![self.control(
            server::CHANNEL_GAP,
            Some(topic::channel(channel_id)),
            payload,
        )]
    }

    /// An effect finished.
    pub fn on_outcome(&mut self, outcome: Outcome) -> Vec<Action> {
        match outcome {
            Outcome::Opened {
                channel_id,
                subscription,
                result,
            } => self.opened(channel_id, subscription, result),
            Outcome::Sent { channel_id, result } => self.sent_message(channel_id, result),
            Outcome::Typed { result: Ok(()), .. } | Outcome::StatusSet { result: Ok(()) } => {
                Vec::new()
            }
            Outcome::Typed {
                channel_id,
                result: Err(refusal),
            } => {
                let problem = Problem::new(refusal_code(&refusal), refusal.to_string())
                    .request(client::USER_TYPING);
                tracing::debug!(%channel_id, code = problem.code, "typing signal refused");
                vec![self.error(problem)]
            }
            Outcome::StatusSet { result: Err(e) } => {
                vec![self.error(
                    Problem::new(code::INTERNAL, e.to_string()).request(client::PRESENCE_UPDATE),
                )]
            }
        }
    }

    /// The connection's message allowance, then the user's across the node.
    fn admit(&mut self, now: Instant) -> Result<(), Problem> {
        let limited = |l: Limited| {
            let mut problem = Problem::new(code::RATE_LIMITED, l.to_string());
            problem.retry_after_ms = Some(l.retry_after_ms());
            problem
        };
        self.connection.check_at(now).map_err(limited)?;
        if let Some(principal) = &self.principal {
            self.limits
                .user_message(&principal.user_id)
                .map_err(limited)?;
        }
        Ok(())
    }

    fn handle(&mut self, request: Request) -> Vec<Action> {
        let (principal, request) = match request {
            Request::Ping { payload } => {
                let payload = Value::Object(payload.unwrap_or_default());
                return vec![self.control(server::PONG, None, payload)];
            }
            Request::Auth { token } => return self.authenticate(&token),
            other => match self.principal.clone() {
                Some(principal) => (principal, other),
                None => {
                    let problem = Problem::new(
                        code::UNAUTHORIZED,
                        "authenticate first: send auth, or connect with ?token=",
                    );
                    return vec![self.error(problem)];
                }
            },
        };
        match request {
            Request::Subscribe {
                channel_id,
                last_event_id,
            } => self.subscribe(principal, channel_id, last_event_id),
            Request::Unsubscribe { channel_id } => self.unsubscribe(channel_id),
            Request::Send {
                channel_id,
                content,
            } => {
                if let Err(refusal) = domain::check_message_content(&content) {
                    return self.send_refused(&channel_id, refusal);
                }
                vec![Action::Effect(Effect::SendMessage {
                    channel_id,
                    content,
                    principal,
                })]
            }
            Request::Typing { channel_id } => {
                if self.limits.typing(&principal.user_id, &channel_id).is_err() {
                    // Deliberately silent: a client sends these on every
                    // keystroke; the extra ones are counted by the limiter.
                    return Vec::new();
                }
                let authorized = self.channels.get(&channel_id).is_some_and(|c| c.active);
                vec![Action::Effect(Effect::Typing {
                    channel_id,
                    principal,
                    authorized,
                })]
            }
            Request::Presence { status } => {
                vec![Action::Effect(Effect::SetStatus { principal, status })]
            }
            Request::Ping { .. } | Request::Auth { .. } => unreachable!("answered above"),
        }
    }

    fn authenticate(&mut self, token: &str) -> Vec<Action> {
        match (self.verify)(token) {
            Ok(principal) => {
                if let Some(current) = &self.principal {
                    if current.user_id != principal.user_id {
                        let failed = json!({
                            "code": code::FORBIDDEN,
                            "message": "this connection is authenticated as another user; open a new one",
                        });
                        return vec![self.control(server::AUTH_FAILED, None, failed)];
                    }
                }
                let user_id = principal.user_id.clone();
                // The same user again (a refreshed token) is welcome.
                self.principal = Some(principal);
                vec![self.control(server::AUTH_SUCCESS, None, json!({ "user_id": user_id }))]
            }
            Err(why) => {
                let failed = json!({ "code": code::UNAUTHORIZED, "message": why.to_string() });
                vec![self.control(server::AUTH_FAILED, None, failed)]
            }
        }
    }

    fn subscribe(
        &mut self,
        principal: Principal,
        channel_id: String,
        last_event_id: Option<String>,
    ) -> Vec<Action> {
        const REQUEST: &str = client::CHANNEL_SUBSCRIBE;
        if self.channels.contains_key(&channel_id) {
            let problem = Problem::bad(format!(
                "already subscribed to channel {channel_id}; unsubscribe first"
            ))
            .field("payload.channel_id")
            .request(REQUEST);
            return vec![self.error(problem)];
        }
        if self.channels.len() >= self.config.max_subscriptions {
            let max = self.config.max_subscriptions;
            let problem = Problem::bad(format!(
                "at most {max} channels per connection; unsubscribe from one first"
            ))
            .request(REQUEST);
            return vec![Action::Reject("max_subscriptions"), self.error(problem)];
        }
        self.next_subscription += 1;
        let subscription = self.next_subscription;
        self.channels.insert(
            channel_id.clone(),
            Channel {
                subscription,
                active: false,
            },
        );
        vec![Action::Effect(Effect::Open {
            channel_id,
            subscription,
            last_event_id,
            principal,
        })]
    }

    fn unsubscribe(&mut self, channel_id: String) -> Vec<Action> {
        if self.channels.remove(&channel_id).is_none() {
            let problem = Problem::bad(format!("not subscribed to channel {channel_id}"))
                .field("payload.channel_id")
                .request(client::CHANNEL_UNSUBSCRIBE);
            return vec![self.error(problem)];
        }
        let topic = topic::channel(&channel_id);
        let payload = json!({ "channel_id": channel_id });
        vec![
            Action::Release { channel_id },
            self.control(server::CHANNEL_UNSUBSCRIBED, Some(topic), payload),
        ]
    }

    fn opened(
        &mut self,
        channel_id: String,
        subscription: u64,
        result: Result<Option<GapReason>, Refusal>,
    ) -> Vec<Action> {
        // Not current: unsubscribed (and maybe subscribed again) while this
        // one was opening. The client still hears how its request went, in
        // order, but the subscription itself is not kept.
        let current = self
            .channels
            .get(&channel_id)
            .is_some_and(|c| c.subscription == subscription);
        match result {
            Ok(gap) => {
                let mut payload = json!({ "channel_id": channel_id, "recovered": gap.is_none() });
                if let Some(reason) = gap {
                    payload["reason"] = json!(reason.as_str());
                }
                let mut out = vec![self.control(
                    server::CHANNEL_SUBSCRIBED,
                    Some(topic::channel(&channel_id)),
                    payload,
                )];
                if current {
                    if let Some(channel) = self.channels.get_mut(&channel_id) {
                        channel.active = true;
                    }
                    let user_id = self
                        .principal
                        .as_ref()
                        .map(|p| p.user_id.clone())
                        .unwrap_or_default();
                    out.push(Action::Attach {
                        channel_id,
                        user_id,
                    });
                }
                out
            }
            Err(refusal) => {
                if current {
                    self.channels.remove(&channel_id);
                }
                let mut problem = Problem::new(refusal_code(&refusal), refusal.to_string())
                    .request(client::CHANNEL_SUBSCRIBE);
                if matches!(refusal, Refusal::NotFound(_) | Refusal::InvalidTopic(_)) {
                    problem = problem.field("payload.channel_id");
                }
                vec![self.error(problem)]
            }
        }
    }

    fn sent_message(
        &mut self,
        channel_id: String,
        result: Result<Sent, SendRefusal>,
    ) -> Vec<Action> {
        match result {
            Ok(sent) => {
                let payload = json!({ "channel_id": channel_id, "message": sent.message });
                let mut out = vec![self.control(
                    server::MESSAGE_SENT,
                    Some(topic::channel(&channel_id)),
                    payload,
                )];
                if let Some(e) = sent.publish_error {
                    let problem = Problem::new(
                        code::INTERNAL,
                        format!(
                            "saved, but the {} event could not be published: {e}",
                            domain::MESSAGE_CREATED
                        ),
                    )
                    .request(client::MESSAGE_SEND);
                    out.push(self.error(problem));
                }
                out
            }
            Err(refusal) => self.send_refused(&channel_id, refusal),
        }
    }

    fn send_refused(&mut self, channel_id: &str, refusal: SendRefusal) -> Vec<Action> {
        let problem = match refusal {
            SendRefusal::Invalid { message, .. } => Problem::bad(message).field("payload.content"),
            SendRefusal::NotFound | SendRefusal::Store(StoreError::NotFound) => Problem::new(
                code::NOT_FOUND,
                format!("channel {channel_id} does not exist"),
            )
            .field("payload.channel_id"),
            SendRefusal::NotMember => Problem::new(
                code::FORBIDDEN,
                format!("channel {channel_id} is private and you are not a member"),
            ),
            SendRefusal::Store(e) => Problem::new(code::INTERNAL, format!("{e}; nothing was sent")),
        };
        vec![self.error(problem.request(client::MESSAGE_SEND))]
    }

    fn error(&mut self, problem: Problem) -> Action {
        let mut payload = json!({ "code": problem.code, "message": problem.message });
        if let Some(field) = problem.field {
            payload["field"] = json!(field);
        }
        if let Some(request) = problem.request {
            payload["request"] = json!(request);
        }
        if let Some(ms) = problem.retry_after_ms {
            payload["retry_after_ms"] = json!(ms);
        }
        self.control(server::ERROR, None, payload)
    }

    /// A control envelope with an id of its own: `c:{session}:{n}`, unique
    /// per connection and distinct from every event id (those have no `c:`
    /// prefix), so that a client can de-duplicate everything by id.
    fn control(&mut self, kind: &str, topic: Option<String>, payload: Value) -> Action {
        self.sent += 1;
        let envelope = Envelope {
            id: format!("c:{}:{}", self.session_id, self.sent),
            kind,
            topic,
            payload,
            timestamp: timestamp_now(),
        };
        Action::Send(serde_json::to_string(&envelope).expect("an envelope always serializes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RatelimitSettings;
    use crate::store;
    use crate::telemetry::metrics::Metrics;
    use crate::transport::socket::sent_json;

    const ANN: &str = "token-ann";
    const BOB: &str = "token-bob";

    fn verify() -> Verify {
        Arc::new(|token: &str| match token {
            ANN => Ok(Principal {
                user_id: "ann".into(),
                scopes: vec![],
                expires_at: None,
            }),
            BOB => Ok(Principal {
                user_id: "bob".into(),
                scopes: vec![],
                expires_at: None,
            }),
            _ => Err(crate::auth::AuthError::Malformed.into()),
        })
    }

    fn limits(burst: u32) -> Arc<Limits> {
        let settings = RatelimitSettings {
            messages_per_second: 10.0,
            messages_burst: burst,
            user_messages_per_second: 1000.0,
            user_messages_burst: 1000,
            ..RatelimitSettings::default()
        };
        Arc::new(Limits::new(&settings, 1, &Metrics::new()))
    }

    fn config() -> MachineConfig {
        MachineConfig {
            max_subscriptions: 2,
            max_message_bytes: 1024,
            auth_timeout: Duration::from_secs(10),
        }
    }

    fn machine_with(token: Option<&str>, burst: u32) -> Machine {
        let principal = token.map(|t| verify()(t).unwrap());
        Machine::new("s1".into(), principal, verify(), config(), limits(burst))
    }

    /// A connection authenticated as ann at the upgrade, greeting consumed.
    fn ann() -> Machine {
        let mut m = machine_with(Some(ANN), 1000);
        m.start();
        m
    }

    fn anonymous() -> Machine {
        let mut m = machine_with(None, 1000);
        m.start();
        m
    }

    /// The control envelopes among `actions`, decoded.
    fn sent(actions: &[Action]) -> Vec<Value> {
        sent_json(actions, |a| match a {
            Action::Send(text) => Some(text),
            _ => None,
        })
    }

    /// The single message sent, checking its envelope shape.
    fn only(actions: &[Action]) -> Value {
        let messages = sent(actions);
        assert_eq!(messages.len(), 1, "{actions:?}");
        let m = messages.into_iter().next().unwrap();
        assert!(m["id"].as_str().unwrap().starts_with("c:s1:"), "{m}");
        assert!(m["timestamp"].as_str().unwrap().ends_with('Z'), "{m}");
        assert!(m["payload"].is_object(), "{m}");
        m
    }

    fn error_of(actions: &[Action]) -> (String, Option<String>) {
        let m = only(actions);
        assert_eq!(m["type"], "error", "{m}");
        assert!(
            m["payload"]["message"]
                .as_str()
                .is_some_and(|s| !s.is_empty()),
            "{m}"
        );
        (
            m["payload"]["code"].as_str().unwrap().to_owned(),
            m["payload"]["field"].as_str().map(str::to_owned),
        )
    }

    fn effects(actions: Vec<Action>) -> Vec<Effect> {
        actions
            .into_iter()
            .filter_map(|a| match a {
                Action::Effect(e) => Some(e),
                _ => None,
            })
            .collect()
    }

    fn closes(actions: &[Action]) -> bool {
        actions.iter().any(|a| matches!(a, Action::Close(..)))
    }

    /// The subscription number of the open that `actions` ask for.
    fn opening(actions: Vec<Action>) -> u64 {
        let Some(Effect::Open { subscription, .. }) = effects(actions).pop() else {
            panic!("no open")
        };
        subscription
    }

    /// Subscribes ann's machine to `channel` and completes the open.
    fn subscribed(m: &mut Machine, channel: &str) -> Vec<Action> {
        let actions = m.on_text(
            &json!({"type": "channel.subscribe", "payload": {"channel_id": channel}}).to_string(),
        );
        let subscription = opening(actions);
        m.on_outcome(Outcome::Opened {
            channel_id: channel.into(),
            subscription,
            result: Ok(None),
        })
    }

    #[test]
    fn the_greeting_names_the_session_and_the_user() {
        let mut m = machine_with(Some(ANN), 10);
        let greeting = sent(&m.start());
        assert_eq!(greeting[0]["type"], "connection.established");
        assert_eq!(greeting[0]["payload"]["session_id"], "s1");
        assert_eq!(greeting[1]["type"], "auth.success");
        assert_eq!(greeting[1]["payload"]["user_id"], "ann");
        assert_ne!(greeting[0]["id"], greeting[1]["id"]);
        let mut anonymous = machine_with(None, 10);
        assert_eq!(sent(&anonymous.start()).len(), 1);
        assert!(!anonymous.is_authenticated());
    }

    #[test]
    fn auth_by_message_succeeds_fails_and_refuses_a_second_user() {
        let mut m = anonymous();
        let failed = only(&m.on_text(r#"{"type":"auth","payload":{"token":"nope"}}"#));
        assert_eq!(
            (failed["type"].as_str(), failed["payload"]["code"].as_str()),
            (Some("auth.failed"), Some("unauthorized"))
        );
        assert!(!m.is_authenticated());
        let ok = only(&m.on_text(&json!({"type": "auth", "payload": {"token": ANN}}).to_string()));
        assert_eq!(
            (ok["type"].as_str(), ok["payload"]["user_id"].as_str()),
            (Some("auth.success"), Some("ann"))
        );
        assert!(m.is_authenticated());
        // A refreshed token of the same user is fine; another user is not.
        assert_eq!(
            only(&m.on_text(&json!({"type": "auth", "payload": {"token": ANN}}).to_string()))
                ["type"],
            "auth.success"
        );
        let other =
            only(&m.on_text(&json!({"type": "auth", "payload": {"token": BOB}}).to_string()));
        assert_eq!(
            (other["type"].as_str(), other["payload"]["code"].as_str()),
            (Some("auth.failed"), Some("forbidden"))
        );
        let bad = only(&m.on_text(r#"{"type":"auth","payload":{"token":"nope"}}"#));
        assert_eq!(bad["type"], "auth.failed");
        assert!(
            m.is_authenticated(),
            "a bad token does not undo the authentication"
        );
    }

    #[test]
    fn the_auth_timeout_fails_and_closes_with_4401_unless_authenticated() {
        let mut m = anonymous();
        let actions = m.on_auth_timeout();
        let failed = sent(&actions);
        assert_eq!(failed[0]["type"], "auth.failed");
        assert_eq!(failed[0]["payload"]["code"], "unauthorized");
        assert!(matches!(actions.last(), Some(Action::Close(4401, _))));
        assert!(ann().on_auth_timeout().is_empty());
    }

    #[test]
    fn every_bad_input_gets_its_code_and_field_and_never_a_close() {
        // Each a `bad_request`, with the field at fault where there is one.
        let bad_requests: &[(&str, Option<&str>)] = &[
            ("not json", None),
            ("[1,2]", None),
            ("42", None),
            (r#""ping""#, None),
            ("{}", Some("type")),
            (r#"{"type":7}"#, Some("type")),
            (r#"{"type":"channel.join"}"#, Some("type")),
            (r#"{"type":"ping","payload":[1]}"#, Some("payload")),
            (r#"{"type":"auth"}"#, Some("payload.token")),
            (
                r#"{"type":"auth","payload":{"token":5}}"#,
                Some("payload.token"),
            ),
            (
                r#"{"type":"channel.subscribe","payload":{}}"#,
                Some("payload.channel_id"),
            ),
            (
                r#"{"type":"channel.subscribe"}"#,
                Some("payload.channel_id"),
            ),
            (
                r#"{"type":"channel.subscribe","payload":{"channel_id":1}}"#,
                Some("payload.channel_id"),
            ),
            (
                r#"{"type":"channel.subscribe","payload":{"channel_id":""}}"#,
                Some("payload.channel_id"),
            ),
            (
                r#"{"type":"channel.subscribe","payload":{"channel_id":"a b"}}"#,
                Some("payload.channel_id"),
            ),
            (
                r#"{"type":"channel.subscribe","payload":{"channel_id":"c","last_event_id":3}}"#,
                Some("payload.last_event_id"),
            ),
            (
                r#"{"type":"channel.unsubscribe","payload":{}}"#,
                Some("payload.channel_id"),
            ),
            (
                r#"{"type":"channel.unsubscribe","payload":{"channel_id":"c"}}"#,
                Some("payload.channel_id"),
            ),
            (
                r#"{"type":"message.send","payload":{"channel_id":"c"}}"#,
                Some("payload.content"),
            ),
            (
                r#"{"type":"message.send","payload":{"channel_id":"c","content":"  "}}"#,
                Some("payload.content"),
            ),
            (
                r#"{"type":"message.send","payload":{"content":"hi"}}"#,
                Some("payload.channel_id"),
            ),
            (
                r#"{"type":"user.typing","payload":{"channel_id":false}}"#,
                Some("payload.channel_id"),
            ),
            (
                r#"{"type":"presence.update","payload":{}}"#,
                Some("payload.status"),
            ),
            (
                r#"{"type":"presence.update","payload":{"status":"offline"}}"#,
                Some("payload.status"),
            ),
        ];
        let too_large = "x".repeat(1025);
        let cases = bad_requests
            .iter()
            .map(|(text, field)| (*text, "bad_request", *field))
            .chain([(too_large.as_str(), "too_large", None)]);
        let mut m = ann();
        for (text, want_code, want_field) in cases {
            let actions = m.on_text(text);
            assert!(!closes(&actions), "{text} closed the connection");
            assert_eq!(
                error_of(&actions),
                (want_code.to_string(), want_field.map(str::to_owned)),
                "{text}"
            );
        }
        // Content over 4000 characters, in a message within the size limit.
        let mut roomy = Machine::new(
            "s1".into(),
            verify()(ANN).ok(),
            verify(),
            MachineConfig {
                max_message_bytes: 64 * 1024,
                ..config()
            },
            limits(1000),
        );
        let long = "x".repeat(domain::MAX_MESSAGE_CHARS + 1);
        let text = json!({"type": "message.send", "payload": {"channel_id": "c", "content": long}})
            .to_string();
        assert_eq!(
            error_of(&roomy.on_text(&text)),
            ("bad_request".into(), Some("payload.content".into()))
        );
        let actions = m.on_binary();
        assert_eq!(error_of(&actions).0, "bad_request");
        assert!(!closes(&actions));
        // And the connection still works.
        assert_eq!(only(&m.on_text(r#"{"type":"ping"}"#))["type"], "pong");
    }

    #[test]
    fn an_unknown_type_is_named_in_the_error() {
        let m = only(&anonymous().on_text(r#"{"type":"channel.join"}"#));
        assert!(
            m["payload"]["message"]
                .as_str()
                .unwrap()
                .contains("\"channel.join\""),
            "{m}"
        );
    }

    #[test]
    fn everything_but_auth_and_ping_needs_a_user() {
        let mut m = anonymous();
        for text in [
            r#"{"type":"channel.subscribe","payload":{"channel_id":"c"}}"#,
            r#"{"type":"channel.unsubscribe","payload":{"channel_id":"c"}}"#,
            r#"{"type":"message.send","payload":{"channel_id":"c","content":"hi"}}"#,
            r#"{"type":"user.typing","payload":{"channel_id":"c"}}"#,
            r#"{"type":"presence.update","payload":{"status":"away"}}"#,
        ] {
            assert_eq!(error_of(&m.on_text(text)).0, "unauthorized", "{text}");
        }
        let pong = only(&m.on_text(r#"{"type":"ping","payload":{"t":1}}"#));
        assert_eq!(
            (pong["type"].as_str(), &pong["payload"]),
            (Some("pong"), &json!({"t": 1}))
        );
        assert_eq!(only(&m.on_text(r#"{"type":"ping"}"#))["payload"], json!({}));
    }

    #[test]
    fn too_many_messages_are_refused_until_the_bucket_refills() {
        let mut m = machine_with(None, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(
                only(&m.on_text_at(r#"{"type":"ping"}"#, t0))["type"],
                "pong"
            );
        }
        let refused = only(&m.on_text_at(r#"{"type":"ping"}"#, t0));
        assert_eq!(refused["payload"]["code"], "rate_limited");
        assert_eq!(refused["payload"]["retry_after_ms"], 100);
        // Bad input counts too, so a flood of garbage is limited as well.
        assert_eq!(error_of(&m.on_text_at("garbage", t0)).0, "rate_limited");
        assert_eq!(
            only(&m.on_text_at(r#"{"type":"ping"}"#, t0 + Duration::from_millis(100)))["type"],
            "pong"
        );
    }

    #[test]
    fn a_subscribe_opens_then_acknowledges_and_attaches() {
        let mut m = ann();
        let actions = m.on_text(
            r#"{"type":"channel.subscribe","payload":{"channel_id":"c1","last_event_id":"e:3"}}"#,
        );
        let Some(Effect::Open {
            channel_id,
            subscription,
            last_event_id,
            principal,
        }) = effects(actions).pop()
        else {
            panic!("no open");
        };
        assert_eq!(
            (
                channel_id.as_str(),
                last_event_id.as_deref(),
                principal.user_id.as_str()
            ),
            ("c1", Some("e:3"), "ann")
        );
        let actions = m.on_outcome(Outcome::Opened {
            channel_id: "c1".into(),
            subscription,
            result: Ok(None),
        });
        let ack = only(&actions);
        assert_eq!(ack["type"], "channel.subscribed");
        assert_eq!(ack["topic"], "channel:c1");
        assert_eq!(
            ack["payload"],
            json!({"channel_id": "c1", "recovered": true})
        );
        assert!(
            matches!(&actions[1], Action::Attach { channel_id, user_id } if channel_id == "c1" && user_id == "ann")
        );
    }

    #[test]
    fn a_position_that_cannot_be_resumed_is_recovered_false_with_the_reason() {
        let mut m = ann();
        let actions = m.on_text(
            r#"{"type":"channel.subscribe","payload":{"channel_id":"c1","last_event_id":"x"}}"#,
        );
        let subscription = opening(actions);
        let result = Ok(Some(GapReason::Malformed));
        let ack = only(&m.on_outcome(Outcome::Opened {
            channel_id: "c1".into(),
            subscription,
            result,
        }));
        assert_eq!(
            ack["payload"],
            json!({"channel_id": "c1", "recovered": false, "reason": "malformed"})
        );
    }

    #[test]
    fn refused_subscriptions_say_why_and_leave_no_channel() {
        for (refusal, want) in [
            (Refusal::Forbidden("channel:c1".into()), "forbidden"),
            (Refusal::NotFound("channel c1".into()), "not_found"),
            (Refusal::Unavailable("down".into()), "internal"),
        ] {
            let mut m = ann();
            let actions =
                m.on_text(r#"{"type":"channel.subscribe","payload":{"channel_id":"c1"}}"#);
            let subscription = opening(actions);
            let actions = m.on_outcome(Outcome::Opened {
                channel_id: "c1".into(),
                subscription,
                result: Err(refusal),
            });
            assert_eq!(error_of(&actions).0, want);
            assert!(!actions.iter().any(|a| matches!(a, Action::Attach { .. })));
            // The channel is free to subscribe to again.
            assert_eq!(
                effects(m.on_text(r#"{"type":"channel.subscribe","payload":{"channel_id":"c1"}}"#))
                    .len(),
                1
            );
        }
    }

    #[test]
    fn duplicates_and_the_per_connection_limit_are_refused() {
        let mut m = ann();
        subscribed(&mut m, "c1");
        let dup = m.on_text(r#"{"type":"channel.subscribe","payload":{"channel_id":"c1"}}"#);
        assert_eq!(
            error_of(&dup),
            ("bad_request".into(), Some("payload.channel_id".into()))
        );
        // A subscribe still opening counts too.
        assert_eq!(
            effects(m.on_text(r#"{"type":"channel.subscribe","payload":{"channel_id":"c2"}}"#))
                .len(),
            1
        );
        let dup = m.on_text(r#"{"type":"channel.subscribe","payload":{"channel_id":"c2"}}"#);
        assert_eq!(error_of(&dup).0, "bad_request");
        let full = m.on_text(r#"{"type":"channel.subscribe","payload":{"channel_id":"c3"}}"#);
        assert!(matches!(full[0], Action::Reject("max_subscriptions")));
        assert_eq!(error_of(&full).0, "bad_request");
    }

    #[test]
    fn unsubscribe_releases_and_acknowledges() {
        let mut m = ann();
        subscribed(&mut m, "c1");
        let actions = m.on_text(r#"{"type":"channel.unsubscribe","payload":{"channel_id":"c1"}}"#);
        assert!(matches!(&actions[0], Action::Release { channel_id } if channel_id == "c1"));
        let ack = only(&actions);
        assert_eq!(
            (ack["type"].as_str(), &ack["payload"]),
            (Some("channel.unsubscribed"), &json!({"channel_id": "c1"}))
        );
        let again = m.on_text(r#"{"type":"channel.unsubscribe","payload":{"channel_id":"c1"}}"#);
        assert_eq!(error_of(&again).0, "bad_request");
    }

    #[test]
    fn a_subscribe_undone_while_opening_is_answered_but_not_attached() {
        let mut m = ann();
        let s1 =
            opening(m.on_text(r#"{"type":"channel.subscribe","payload":{"channel_id":"c1"}}"#));
        m.on_text(r#"{"type":"channel.unsubscribe","payload":{"channel_id":"c1"}}"#);
        let s2 =
            opening(m.on_text(r#"{"type":"channel.subscribe","payload":{"channel_id":"c1"}}"#));
        let stale = m.on_outcome(Outcome::Opened {
            channel_id: "c1".into(),
            subscription: s1,
            result: Ok(None),
        });
        assert_eq!(only(&stale)["type"], "channel.subscribed");
        assert!(!stale.iter().any(|a| matches!(a, Action::Attach { .. })));
        let current = m.on_outcome(Outcome::Opened {
            channel_id: "c1".into(),
            subscription: s2,
            result: Ok(None),
        });
        assert!(current.iter().any(|a| matches!(a, Action::Attach { .. })));
    }

    fn a_message(channel_id: &str) -> store::Message {
        store::Message {
            id: "m1".into(),
            channel_id: channel_id.into(),
            author_id: "ann".into(),
            content: "hi".into(),
            created_at: chrono::Utc::now(),
        }
    }

    #[test]
    fn a_message_is_stored_through_an_effect_and_acknowledged() {
        let mut m = ann();
        let actions =
            m.on_text(r#"{"type":"message.send","payload":{"channel_id":"c1","content":"hi"}}"#);
        let Some(Effect::SendMessage {
            channel_id,
            content,
            principal,
        }) = effects(actions).pop()
        else {
            panic!()
        };
        assert_eq!(
            (
                channel_id.as_str(),
                content.as_str(),
                principal.user_id.as_str()
            ),
            ("c1", "hi", "ann")
        );
        let stored = Sent {
            message: a_message("c1"),
            publish_error: None,
        };
        let ack = only(&m.on_outcome(Outcome::Sent {
            channel_id: "c1".into(),
            result: Ok(stored),
        }));
        assert_eq!(ack["type"], "message.sent");
        assert_eq!(ack["payload"]["message"]["id"], "m1");
        assert_eq!(ack["payload"]["message"]["channelId"], "c1");
        let unpublished = Sent {
            message: a_message("c1"),
            publish_error: Some(crate::broker::BrokerError::Unavailable("down".into())),
        };
        let actions = m.on_outcome(Outcome::Sent {
            channel_id: "c1".into(),
            result: Ok(unpublished),
        });
        let both = sent(&actions);
        assert_eq!(
            (
                both[0]["type"].as_str(),
                both[1]["payload"]["code"].as_str()
            ),
            (Some("message.sent"), Some("internal"))
        );
    }

    #[test]
    fn refused_messages_get_their_codes() {
        for (refusal, want) in [
            (SendRefusal::NotFound, "not_found"),
            (SendRefusal::NotMember, "forbidden"),
            (
                SendRefusal::Store(StoreError::Unavailable("down".into())),
                "internal",
            ),
            (
                SendRefusal::Invalid {
                    field: "content",
                    message: "too long".into(),
                },
                "bad_request",
            ),
        ] {
            let actions = ann().on_outcome(Outcome::Sent {
                channel_id: "c1".into(),
                result: Err(refusal),
            });
            assert_eq!(error_of(&actions).0, want);
        }
    }

    #[test]
    fn typing_is_published_once_per_interval_and_refusals_are_reported() {
        let mut m = ann();
        subscribed(&mut m, "c1");
        let typing = |channel: &str| {
            json!({"type": "user.typing", "payload": {"channel_id": channel}}).to_string()
        };
        let Some(Effect::Typing {
            channel_id,
            authorized,
            ..
        }) = effects(m.on_text(&typing("c1"))).pop()
        else {
            panic!("no typing effect");
        };
        assert_eq!((channel_id.as_str(), authorized), ("c1", true));
        assert!(
            m.on_text(&typing("c1")).is_empty(),
            "a second signal within the interval is absorbed"
        );
        // Another channel has its own allowance, and needs authorizing.
        let Some(Effect::Typing { authorized, .. }) = effects(m.on_text(&typing("c2"))).pop()
        else {
            panic!()
        };
        assert!(!authorized);
        let refused = Outcome::Typed {
            channel_id: "c2".into(),
            result: Err(Refusal::Forbidden("channel:c2".into())),
        };
        assert_eq!(error_of(&m.on_outcome(refused)).0, "forbidden");
        assert!(m
            .on_outcome(Outcome::Typed {
                channel_id: "c1".into(),
                result: Ok(())
            })
            .is_empty());
    }

    #[test]
    fn a_status_goes_to_presence() {
        let mut m = ann();
        let Some(Effect::SetStatus { status, principal }) =
            effects(m.on_text(r#"{"type":"presence.update","payload":{"status":"busy"}}"#)).pop()
        else {
            panic!()
        };
        assert_eq!((status, principal.user_id.as_str()), (Status::Busy, "ann"));
        let failed = Outcome::StatusSet {
            result: Err(PresenceError::Unavailable("down".into())),
        };
        assert_eq!(error_of(&m.on_outcome(failed)).0, "internal");
    }

    #[test]
    fn a_gap_on_an_attached_channel_is_announced() {
        let mut m = ann();
        subscribed(&mut m, "c1");
        let gap = only(&m.on_gap("c1", GapReason::Expired));
        assert_eq!(gap["type"], "channel.gap");
        assert_eq!(
            gap["payload"],
            json!({"channel_id": "c1", "reason": "expired"})
        );
        assert!(m.on_gap("c9", GapReason::Expired).is_empty());
    }

    #[test]
    fn control_ids_are_unique_and_never_look_like_event_ids() {
        let mut m = ann();
        let ids: Vec<String> = (0..5)
            .map(|_| {
                only(&m.on_text(r#"{"type":"ping"}"#))["id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        let unique: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
        assert!(
            ids.iter()
                .all(|id| crate::event::Position::parse(id).is_none()),
            "{ids:?}"
        );
    }
}
