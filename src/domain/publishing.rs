//! Publishing from a backend (`POST /api/v1/publish`): which events a
//! trusted backend may put on the bus, and the readers rule it may set.
//!
//! - `topic` a valid topic name; `type` 1 to [`MAX_TYPE_LEN`] characters of
//!   `[a-z0-9._-]`, not a reserved one ([`is_reserved_type`]); `payload` at most
//!   `publish.max_payload_bytes` once encoded compactly, as it will travel.
//! - Any topic may be published to, the domain's included (a backend
//!   notifies a user on `notifications:{userId}`); `readers` sets who may
//!   subscribe to a backend topic and is refused on a domain topic, whose
//!   rules are built in.
//! - The rule is recorded before the event goes out: once it is out,
//!   subscribers may come for it.
//!
//! Who may publish (API keys, the `publish` scope) and how often is the
//! transport's business; what may be published is decided here.

use std::sync::Arc;

use crate::auth::policy::is_domain_topic;
use crate::broker::BrokerError;
use crate::event::{topic, NewEvent, SharedEvent, READERS_CHANGED};
use crate::store::TopicReaders;

use super::Domain;

/// Longest event type.
pub const MAX_TYPE_LEN: usize = 100;
/// Most users one `readers` rule may list.
pub const MAX_READERS: usize = 10_000;
/// Longest user id in a `readers` rule.
const MAX_USER_ID_LEN: usize = 200;

/// Event types a backend may not publish ([`is_reserved_type`]): every
/// type the node itself sends on some transport, besides the domain's kinds
/// ([`super::events::NAMES`]).
///
/// A published type travels as the message's `type` on `/ws` and as the
/// SSE `event:` name, beside the node's own messages: a backend's `gap`
/// reads as a history gap to an SSE client, its `auth.success` as an
/// authentication to an envelope client. The domain's kinds are decoded as
/// its entities (`message.created` as a message of a channel, with its
/// author) by subscribers that trust them: only the domain publishes them.
/// Tests in the transports hold this list to what each of them sends.
pub const NODE_TYPES: &[&str] = &[
    // The event stream (SSE): a history gap, an expired token (also on
    // `/ws`), a topic whose readers no longer include the subscriber.
    "gap",
    "auth.expired",
    "revoked",
    // The live-only signal of a readers change, never delivered.
    crate::event::READERS_CHANGED,
    // The envelope protocol on `/ws`, both directions.
    "connection.established",
    "auth",
    "auth.success",
    "auth.failed",
    "channel.subscribe",
    "channel.subscribed",
    "channel.unsubscribe",
    "channel.unsubscribed",
    "channel.gap",
    "message.send",
    "message.sent",
    "presence.update",
    "ping",
    "pong",
    "error",
];

/// Whether backends may not publish events of type `kind`: the node's own
/// ([`NODE_TYPES`]) and the domain's ([`super::events::NAMES`]).
pub fn is_reserved_type(kind: &str) -> bool {
    NODE_TYPES.contains(&kind) || super::events::NAMES.contains(&kind)
}

/// An event a backend asks to publish.
#[derive(Debug, Clone)]
pub struct BackendEvent {
    pub topic: String,
    pub kind: String,
    pub payload: serde_json::Value,
    /// Who may subscribe to the topic from now on (backend topics only).
    pub readers: Option<TopicReaders>,
}

/// Why nothing was published.
#[derive(Debug, PartialEq, Eq)]
pub enum PublishRefusal {
    Invalid(Invalid),
    /// The readers rule could not be recorded, or the bus is down.
    Unavailable(&'static str),
}

impl Domain {
    /// Checks `event`, records its topic's readers rule when it has one,
    /// and publishes it; the event as the bus numbered it.
    pub async fn publish_backend(
        &self,
        event: BackendEvent,
    ) -> Result<Arc<SharedEvent>, PublishRefusal> {
        validate(&event, self.max_payload_bytes).map_err(PublishRefusal::Invalid)?;
        let BackendEvent {
            topic,
            kind,
            payload,
            readers,
        } = event;
        if let Some(readers) = &readers {
            let before = self.store.topic_readers(&topic).await.ok().flatten();
            if let Err(e) = self.store.set_topic_readers(&topic, readers).await {
                tracing::warn!(error = %e, "a publish could not record its topic's readers");
                return Err(PublishRefusal::Unavailable(
                    "the topic's readers could not be recorded; nothing was published",
                ));
            }
            if before.as_ref() != Some(readers) {
                // Every stream of the topic asks again before the event
                // the new rule protects reaches it. Live only: a node that
                // misses it (its bus link down) keeps its streams.
                let signal = NewEvent::new(topic.clone(), READERS_CHANGED, serde_json::json!({}));
                if let Err(e) = self.hub.publish(signal.ephemeral()).await {
                    tracing::warn!(error = %e, "a readers change could not be announced");
                }
            }
        }
        match self.hub.publish(NewEvent::new(topic, kind, payload)).await {
            Ok(shared) => Ok(shared),
            Err(BrokerError::InvalidTopic(topic)) => Err(PublishRefusal::Invalid(
                Invalid::BadRequest(format!("{topic:?} is not a valid topic")),
            )),
            Err(BrokerError::Unavailable(why)) => {
                tracing::warn!(%why, "a publish could not reach the bus");
                Err(PublishRefusal::Unavailable(
                    "the event bus is unavailable; nothing was published",
                ))
            }
        }
    }
}

/// Why a backend event was refused before anything was written.
#[derive(Debug, PartialEq, Eq)]
pub enum Invalid {
    BadRequest(String),
    TooLarge(String),
}

/// Checks an event against the rules of the module docs.
fn validate(request: &BackendEvent, max_payload_bytes: usize) -> Result<(), Invalid> {
    if !topic::is_valid(&request.topic) {
        return Err(Invalid::BadRequest(format!(
            "{:?} is not a valid topic: 1 to {} characters of letters, digits and :_-.@/",
            request.topic,
            crate::event::MAX_TOPIC_LEN
        )));
    }
    if !valid_type(&request.kind) {
        return Err(Invalid::BadRequest(format!(
            "{:?} is not a valid type: 1 to {MAX_TYPE_LEN} characters of a-z, 0-9, '.', '_' and '-'",
            request.kind
        )));
    }
    if is_reserved_type(&request.kind) {
        return Err(Invalid::BadRequest(format!(
            "{:?} is a reserved event type: subgate itself sends it; publish a type of your own (such as \"acme.{}\")",
            request.kind, request.kind
        )));
    }
    // Measured as it will travel: encoded once, compactly.
    let size = serde_json::to_vec(&request.payload).map_or(usize::MAX, |v| v.len());
    if size > max_payload_bytes {
        return Err(Invalid::TooLarge(format!(
            "the payload is {size} bytes encoded; at most {max_payload_bytes} are accepted"
        )));
    }
    match &request.readers {
        Some(_) if is_domain_topic(&request.topic) => Err(Invalid::BadRequest(format!(
            "`readers` applies to backend topics; who may read {} is built in",
            request.topic
        ))),
        Some(TopicReaders::Users(ids)) if ids.len() > MAX_READERS => Err(Invalid::BadRequest(
            format!("`readers.users` may list at most {MAX_READERS} users"),
        )),
        Some(TopicReaders::Users(ids))
            if ids
                .iter()
                .any(|id| id.is_empty() || id.len() > MAX_USER_ID_LEN) =>
        {
            Err(Invalid::BadRequest(format!(
                "every user id in `readers.users` must be 1 to {MAX_USER_ID_LEN} characters"
            )))
        }
        _ => Ok(()),
    }
}

/// An event type: 1 to [`MAX_TYPE_LEN`] characters of `[a-z0-9._-]`.
pub fn valid_type(kind: &str) -> bool {
    !kind.is_empty()
        && kind.len() <= MAX_TYPE_LEN
        && kind.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request(
        topic: &str,
        kind: &str,
        payload: serde_json::Value,
        readers: Option<TopicReaders>,
    ) -> BackendEvent {
        BackendEvent {
            topic: topic.into(),
            kind: kind.into(),
            payload,
            readers,
        }
    }

    #[test]
    fn types_are_short_lowercase_dotted_names() {
        for good in ["order.shipped", "a", "x_y-z.1", &"a".repeat(MAX_TYPE_LEN)] {
            assert!(valid_type(good), "{good}");
        }
        for bad in [
            "",
            "Order.Shipped",
            "has space",
            "a\nb",
            "é",
            "a/b",
            &"a".repeat(MAX_TYPE_LEN + 1),
        ] {
            assert!(!valid_type(bad), "{bad:?}");
        }
    }

    #[test]
    fn the_domains_kinds_are_reserved() {
        for kind in super::super::events::NAMES {
            assert!(is_reserved_type(kind), "{kind}");
            assert!(matches!(
                validate(&request("t", kind, json!({}), None), 100),
                Err(Invalid::BadRequest(m)) if m.contains("reserved")
            ));
        }
    }

    #[test]
    fn requests_are_validated_field_by_field() {
        let ok = request(
            "orders:eu",
            "order.shipped",
            json!({"id": 1}),
            Some(TopicReaders::Public),
        );
        assert_eq!(validate(&ok, 100), Ok(()));
        assert!(matches!(
            validate(&request("bad topic", "t", json!({}), None), 100),
            Err(Invalid::BadRequest(_))
        ));
        assert!(matches!(
            validate(&request("t", "Bad", json!({}), None), 100),
            Err(Invalid::BadRequest(_))
        ));
        // The limit is on the compact encoding: 12 bytes here.
        let payload = json!({"a": "1234"});
        assert_eq!(serde_json::to_vec(&payload).unwrap().len(), 12);
        assert_eq!(
            validate(&request("t", "t", payload.clone(), None), 12),
            Ok(())
        );
        assert!(matches!(
            validate(&request("t", "t", payload, None), 11),
            Err(Invalid::TooLarge(_))
        ));
        // Domain topics may be published to, but their readers are built in.
        assert_eq!(
            validate(&request("notifications:u1", "note", json!({}), None), 100),
            Ok(())
        );
        assert!(matches!(
            validate(
                &request(
                    "notifications:u1",
                    "note",
                    json!({}),
                    Some(TopicReaders::Public)
                ),
                100
            ),
            Err(Invalid::BadRequest(_))
        ));
        let empty_id = Some(TopicReaders::Users(vec!["u1".into(), String::new()]));
        assert!(matches!(
            validate(&request("orders", "t", json!({}), empty_id), 100),
            Err(Invalid::BadRequest(_))
        ));
    }
}
