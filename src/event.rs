//! The event envelope, its ids and the topic names.
//!
//! Every event, on every transport and on the bus wire, is
//! `{"id","type","topic","payload","timestamp"}`. The `id` is unique and,
//! within one topic, ordered: it is the resume position. It has the form
//! `MILLIS-SEQ` (the shape of a Redis stream id) so that the Redis history
//! can use it as is.

use std::any::Any;
use std::sync::{Arc, OnceLock};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Longest topic name accepted anywhere.
pub const MAX_TOPIC_LEN: usize = 200;

/// One event as it travels.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub topic: String,
    pub payload: serde_json::Value,
    pub timestamp: String,
}

/// An event decoded once per node, with its envelope encoded once per node,
/// shared by every local subscriber.
pub struct SharedEvent {
    pub event: Event,
    /// The envelope as JSON, ready to write.
    pub json: Box<RawValue>,
    /// Milliseconds since the epoch at publish time (from the id).
    pub published_at_ms: u64,
    /// The payload decoded into a domain type, once, by the first subscriber
    /// that asks (see [`SharedEvent::payload_as`]).
    typed: OnceLock<Option<Arc<dyn Any + Send + Sync>>>,
}

impl std::fmt::Debug for SharedEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedEvent").field("event", &self.event).finish_non_exhaustive()
    }
}

impl SharedEvent {
    /// Encodes `event` once.
    pub fn new(event: Event) -> Arc<Self> {
        let json = serde_json::value::to_raw_value(&event).expect("an Event always serializes");
        Self::from_parts(event, json)
    }

    fn from_parts(event: Event, json: Box<RawValue>) -> Arc<Self> {
        let published_at_ms = EventId::parse(&event.id).map_or_else(now_ms, |id| id.ms);
        Arc::new(Self { event, json, published_at_ms, typed: OnceLock::new() })
    }

    /// The payload as `T`, decoded once per node however many subscribers
    /// ask; `None` when it does not decode as `T`.
    pub fn payload_as<T: DeserializeOwned + Send + Sync + 'static>(&self) -> Option<Arc<T>> {
        let decode = || -> Option<Arc<dyn Any + Send + Sync>> {
            serde_json::from_value::<T>(self.event.payload.clone())
                .ok()
                .map(|v| Arc::new(v) as Arc<dyn Any + Send + Sync>)
        };
        match self.typed.get_or_init(decode) {
            Some(any) => match any.clone().downcast::<T>() {
                Ok(v) => Some(v),
                // Another type was decoded first: decode this one uncached.
                Err(_) => serde_json::from_value::<T>(self.event.payload.clone()).ok().map(Arc::new),
            },
            None => None,
        }
    }

    /// Decodes an envelope received from the bus; the original text is kept
    /// as the encoding so nothing is re-serialized.
    pub fn decode(text: &str) -> Result<Arc<Self>, serde_json::Error> {
        let event: Event = serde_json::from_str(text)?;
        let json = RawValue::from_string(text.to_owned())?;
        Ok(Self::from_parts(event, json))
    }
}

/// What a publisher hands to the broker; the broker assigns id and timestamp.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub topic: String,
    pub kind: String,
    pub payload: serde_json::Value,
}

impl NewEvent {
    pub fn new(topic: impl Into<String>, kind: impl Into<String>, payload: serde_json::Value) -> Self {
        Self { topic: topic.into(), kind: kind.into(), payload }
    }

    /// Stamps this event with an id and the time.
    pub fn stamp(self, id: EventId) -> Event {
        let timestamp = DateTime::<Utc>::from_timestamp_millis(id.ms as i64)
            .unwrap_or_else(Utc::now)
            .to_rfc3339_opts(SecondsFormat::Millis, true);
        Event { id: id.to_string(), kind: self.kind, topic: self.topic, payload: self.payload, timestamp }
    }
}

/// `MILLIS-SEQ`, ordered first by time then by sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId {
    pub ms: u64,
    pub seq: u64,
}

impl EventId {
    /// The next id after `last` at time `now_ms`: never goes backwards even
    /// when the clock does.
    pub fn next(last: Option<EventId>, now_ms: u64) -> EventId {
        match last {
            Some(last) if now_ms <= last.ms => EventId { ms: last.ms, seq: last.seq + 1 },
            _ => EventId { ms: now_ms, seq: 0 },
        }
    }

    pub fn parse(s: &str) -> Option<EventId> {
        let (ms, seq) = s.split_once('-')?;
        Some(EventId { ms: ms.parse().ok()?, seq: seq.parse().ok()? })
    }
}

impl std::fmt::Display for EventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Topic names of the domain.
pub mod topic {
    pub const POSTS: &str = "posts";
    pub fn post(id: &str) -> String {
        format!("post:{id}")
    }
    pub fn user(id: &str) -> String {
        format!("user:{id}")
    }
    pub fn notifications(user_id: &str) -> String {
        format!("notifications:{user_id}")
    }
    pub fn channel(channel_id: &str) -> String {
        format!("channel:{channel_id}")
    }

    /// The namespace of a topic (the part before `:`), a bounded metric label
    /// for the domain topics and `other` for the rest.
    pub fn namespace(topic: &str) -> &'static str {
        match topic.split(':').next().unwrap_or("") {
            "posts" => "posts",
            "post" => "post",
            "user" => "user",
            "notifications" => "notifications",
            "channel" => "channel",
            _ => "other",
        }
    }

    /// Whether `topic` is a name subgate accepts: 1 to 200 characters of
    /// letters, digits and `:_-.@/`.
    pub fn is_valid(topic: &str) -> bool {
        !topic.is_empty()
            && topic.len() <= super::MAX_TOPIC_LEN
            && topic
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '-' | '.' | '@' | '/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_ordered_even_when_the_clock_steps_back() {
        let a = EventId::next(None, 1000);
        let b = EventId::next(Some(a), 1000);
        let c = EventId::next(Some(b), 999);
        let d = EventId::next(Some(c), 1001);
        assert!(a < b && b < c && c < d);
        assert_eq!(EventId::parse(&c.to_string()), Some(c));
        assert_eq!(EventId::parse("nope"), None);
    }

    #[test]
    fn the_envelope_is_encoded_once_and_round_trips() {
        let event = NewEvent::new("posts", "post.created", serde_json::json!({"id": "1"}))
            .stamp(EventId { ms: 1_700_000_000_000, seq: 3 });
        let shared = SharedEvent::new(event.clone());
        let decoded = SharedEvent::decode(shared.json.get()).unwrap();
        assert_eq!(decoded.event, event);
        assert_eq!(decoded.published_at_ms, 1_700_000_000_000);
        let v: serde_json::Value = serde_json::from_str(shared.json.get()).unwrap();
        assert_eq!(v["type"], "post.created");
        assert_eq!(v["timestamp"], "2023-11-14T22:13:20.000Z");
    }

    #[test]
    fn topic_names_are_checked() {
        assert!(topic::is_valid("channel:abc-1"));
        assert!(!topic::is_valid(""));
        assert!(!topic::is_valid("has space"));
        assert_eq!(topic::namespace("notifications:u1"), "notifications");
        assert_eq!(topic::namespace("orders:eu"), "other");
    }
}
