//! The event envelope, its ids and the topic names.
//!
//! Every event, on every transport and on the bus wire, is
//! `{"id","type","topic","payload","timestamp"}`. The `id` is unique and,
//! within one topic, ordered: it is the resume position, a [`Position`]
//! `EPOCH:SEQ`. `SEQ` counts the topic's events from 1 without gaps, so a
//! subscriber can tell a missing event from the next one; `EPOCH` names the
//! topic's history and changes when that history is lost (its store
//! restarted empty, the topic expired), so a position from another epoch is
//! a gap, never a place to resume from.

use std::any::Any;
use std::sync::{Arc, OnceLock};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Longest topic name accepted anywhere.
pub const MAX_TOPIC_LEN: usize = 200;

/// The type of the live-only signal a node publishes on a topic whose
/// readers rule changed: every stream of the topic asks again whether its
/// subscriber may still read it. Never delivered to clients.
pub const READERS_CHANGED: &str = "subgate.readers_changed";

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
    /// Milliseconds since the epoch at publish time (from the timestamp).
    pub published_at_ms: u64,
    /// The resume position, when the id is one.
    pub position: Option<Position>,
    /// A topic's latest event handed out again after the node's bus link
    /// came back (see [`SharedEvent::resync`]): a resumable stream that has
    /// delivered something compares it with where it stands and reads what
    /// it missed from history; a stream that has delivered nothing yet
    /// ignores it.
    pub resync: bool,
    /// The payload decoded into a domain type, once, by the first subscriber
    /// that asks (see [`SharedEvent::payload_as`]).
    typed: OnceLock<Option<Arc<dyn Any + Send + Sync>>>,
    /// The SSE block of a stream of this event's topic alone, made once
    /// (see [`SharedEvent::sse_frame`]).
    sse: OnceLock<bytes::Bytes>,
}

impl std::fmt::Debug for SharedEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedEvent")
            .field("event", &self.event)
            .finish_non_exhaustive()
    }
}

impl SharedEvent {
    /// Encodes `event` once.
    pub fn new(event: Event) -> Arc<Self> {
        let json = serde_json::value::to_raw_value(&event).expect("an Event always serializes");
        Self::from_parts(event, json)
    }

    fn from_parts(event: Event, json: Box<RawValue>) -> Arc<Self> {
        let published_at_ms = DateTime::parse_from_rfc3339(&event.timestamp)
            .map(|t| t.timestamp_millis().max(0) as u64)
            .unwrap_or_else(|_| now_ms());
        let position = Position::parse(&event.id);
        Arc::new(Self {
            event,
            json,
            published_at_ms,
            position,
            resync: false,
            typed: OnceLock::new(),
            sse: OnceLock::new(),
        })
    }

    /// This event again, marked as a resync point.
    pub fn resync(&self) -> Arc<Self> {
        Arc::new(Self {
            event: self.event.clone(),
            json: self.json.clone(),
            published_at_ms: self.published_at_ms,
            position: self.position.clone(),
            resync: true,
            typed: OnceLock::new(),
            sse: OnceLock::new(),
        })
    }

    /// The SSE block of this event for a stream of its topic alone (whose
    /// `id:` is the event's id), made by `build` once per node, then shared.
    pub fn sse_frame(&self, build: impl FnOnce(&SharedEvent) -> bytes::Bytes) -> bytes::Bytes {
        self.sse.get_or_init(|| build(self)).clone()
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
                Err(_) => serde_json::from_value::<T>(self.event.payload.clone())
                    .ok()
                    .map(Arc::new),
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
    /// Delivered live only: not numbered, not kept in history, not
    /// replayed (typing indicators). Its id is `live:…`, not a position.
    pub ephemeral: bool,
}

impl NewEvent {
    pub fn new(
        topic: impl Into<String>,
        kind: impl Into<String>,
        payload: serde_json::Value,
    ) -> Self {
        Self {
            topic: topic.into(),
            kind: kind.into(),
            payload,
            ephemeral: false,
        }
    }

    /// Makes this event live-only (see [`NewEvent::ephemeral`]).
    pub fn ephemeral(mut self) -> Self {
        self.ephemeral = true;
        self
    }

    /// Stamps a live-only event with a unique id that is not a position.
    pub fn stamp_ephemeral(self) -> Event {
        Event {
            id: format!("live:{}", uuid::Uuid::new_v4().simple()),
            kind: self.kind,
            topic: self.topic,
            payload: self.payload,
            timestamp: timestamp_now(),
        }
    }

    /// Stamps this event with its position and the time.
    pub fn stamp(self, position: &Position) -> Event {
        Event {
            id: position.to_string(),
            kind: self.kind,
            topic: self.topic,
            payload: self.payload,
            timestamp: timestamp_now(),
        }
    }
}

/// A resume position: the topic's history epoch and the event's sequence
/// number in it. Written `EPOCH:SEQ`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Position {
    pub epoch: String,
    pub seq: u64,
}

impl Position {
    pub fn new(epoch: impl Into<String>, seq: u64) -> Self {
        Self {
            epoch: epoch.into(),
            seq,
        }
    }

    /// Parses `EPOCH:SEQ`; `None` for anything else.
    pub fn parse(s: &str) -> Option<Position> {
        let (epoch, seq) = s.rsplit_once(':')?;
        let valid_epoch = !epoch.is_empty()
            && epoch.len() <= 32
            && epoch.chars().all(|c| c.is_ascii_alphanumeric());
        if !valid_epoch || seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(Position {
            epoch: epoch.to_owned(),
            seq: seq.parse().ok()?,
        })
    }

    /// A fresh epoch name.
    pub fn new_epoch() -> String {
        let bytes: [u8; 6] = rand::random();
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.epoch, self.seq)
    }
}

/// Resume cursors over several topics: `topic~EPOCH:SEQ,topic~EPOCH:SEQ`
/// (`~` and `,` never occur in topic names). With one topic a bare
/// position is a cursor too.
pub mod cursor {
    use std::collections::BTreeMap;

    /// Why a cursor cannot be read.
    #[derive(Debug, PartialEq, thiserror::Error)]
    pub enum CursorError {
        #[error("with several topics the cursor is `topic~position,…`")]
        BarePosition,
        #[error("{0:?} is not `topic~position`")]
        NotAPair(String),
        #[error("the cursor names {0:?}, which is not subscribed")]
        NotSubscribed(String),
    }

    /// Reads `text` as the positions of `topics`: a bare position when there
    /// is exactly one topic, else `topic~position` pairs. Topics a cursor does
    /// not name start live; a pair for a topic not asked for is an error.
    pub fn parse(text: &str, topics: &[String]) -> Result<BTreeMap<String, String>, CursorError> {
        let text = text.trim();
        if !text.contains('~') {
            return match topics {
                [only] => Ok(BTreeMap::from([(only.clone(), text.to_owned())])),
                _ => Err(CursorError::BarePosition),
            };
        }
        let mut positions = BTreeMap::new();
        for pair in text.split(',').filter(|p| !p.is_empty()) {
            let (topic, position) = pair
                .split_once('~')
                .ok_or_else(|| CursorError::NotAPair(pair.to_owned()))?;
            if !topics.iter().any(|t| t == topic) {
                return Err(CursorError::NotSubscribed(topic.to_owned()));
            }
            positions.insert(topic.to_owned(), position.to_owned());
        }
        Ok(positions)
    }

    /// Writes positions as a cursor; a single topic's is its bare position.
    pub fn format(positions: &BTreeMap<String, String>) -> String {
        if positions.len() == 1 {
            return positions.values().next().cloned().unwrap_or_default();
        }
        positions
            .iter()
            .map(|(t, p)| format!("{t}~{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn cursors_round_trip() {
            let topics = vec!["posts".to_owned(), "channel:a".to_owned()];
            let parsed = parse("posts~ab:5,channel:a~cd:9", &topics).unwrap();
            assert_eq!(parsed["posts"], "ab:5");
            assert_eq!(parse(&format(&parsed), &topics).unwrap(), parsed);
            assert_eq!(parse("ab:5", &topics[..1]).unwrap()["posts"], "ab:5");
            assert_eq!(parse("ab:5", &topics), Err(CursorError::BarePosition));
            assert_eq!(
                parse("other~ab:5", &topics),
                Err(CursorError::NotSubscribed("other".into()))
            );
            assert_eq!(
                parse("posts~1:1,junk", &topics),
                Err(CursorError::NotAPair("junk".into()))
            );
        }
    }
}

/// The current time as RFC 3339 with milliseconds, as envelopes carry it.
pub fn timestamp_now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
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
            && topic.chars().all(|c| {
                c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '-' | '.' | '@' | '/')
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_parse_and_print() {
        let p = Position::new("a1b2c3", 42);
        assert_eq!(p.to_string(), "a1b2c3:42");
        assert_eq!(Position::parse("a1b2c3:42"), Some(p));
        for bad in [
            "",
            "42",
            ":42",
            "abc:",
            "abc:-1",
            "abc:4x",
            "a-b:1",
            "abc:99999999999999999999999",
        ] {
            assert_eq!(Position::parse(bad), None, "{bad}");
        }
        assert_ne!(Position::new_epoch(), Position::new_epoch());
    }

    #[test]
    fn the_envelope_is_encoded_once_and_round_trips() {
        let mut event = NewEvent::new("posts", "post.created", serde_json::json!({"id": "1"}))
            .stamp(&Position::new("e1", 3));
        event.timestamp = "2023-11-14T22:13:20.000Z".into();
        let shared = SharedEvent::new(event.clone());
        let decoded = SharedEvent::decode(shared.json.get()).unwrap();
        assert_eq!(decoded.event, event);
        assert_eq!(decoded.published_at_ms, 1_700_000_000_000);
        assert_eq!(decoded.position, Some(Position::new("e1", 3)));
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
