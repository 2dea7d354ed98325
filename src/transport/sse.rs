//! Server-Sent Events: the event stream at `GET /api/v1/events/stream`.
//!
//! # The event stream
//!
//! - Topics: `?topic=` repeated (at most [`MAX_TOPICS`]); without any, the
//!   caller's own `notifications:{userId}` (anonymous: 401).
//! - Authentication: `Authorization: Bearer T`, or `?token=T` because
//!   `EventSource` cannot set headers. A token that does not verify is 401.
//! - Every topic passes the one authorization decision
//!   ([`crate::auth::policy::authorize`]) before the response starts: a
//!   refusal is a JSON error (401, 403, 404, 400), never a stream.
//! - The stream: a `retry:` line first, then one block per event,
//!   `event: <type>`, `id: <resume id>`, `data: <envelope>` and a blank
//!   line; a `: ping` comment whenever it has been quiet for
//!   `sse.heartbeat_seconds`. Several topics merge into one stream.
//! - Resuming: the `Last-Event-ID` header (what `EventSource` sends when it
//!   reconnects) or, failing that, `?lastEventId=`. With one topic the id is
//!   the event's position `EPOCH:SEQ`. With several it must let every topic
//!   resume, so it is composite: `topic~EPOCH:SEQ` for every topic that has
//!   a position, comma-separated, e.g. `posts~ab12cd:5,channel:x~ef34ab:9`
//!   (`~` and `,` never occur in topic names). A composite id is accepted
//!   with one topic too, and a plain position when there is one topic. A
//!   topic the id does not name starts at its latest event, and the stream
//!   says where it starts with an `id:`-only block after `retry:`, so that
//!   a client which drops before its first event still resumes exactly.
//! - What cannot be resumed is said in the stream, never papered over:
//!   `event: gap` with `data: {"topic": …, "reason": …}`, `reason` one of
//!   `expired`, `epoch_changed`, `malformed`, `unavailable`.
//!
//! # Bounds
//!
//! Admission counts the stream against `server.max_connections` (503), and
//! the node's `Origin` list applies (403). Each topic is a hub subscription
//! with its bounded queue: a stream whose client does not keep up is cut
//! off (the hub counts it) and simply ends; the client reconnects and
//! resumes. The drain ends every stream cleanly. The response body is
//! [`crate::transport::streaming`]'s.

use actix_web::http::StatusCode;
use actix_web::web;
use actix_web::{HttpRequest, HttpResponse};
use futures_util::future::join_all;
use futures_util::stream::{self, StreamExt};

use crate::auth::policy::{authorize, Refusal};
use crate::auth::Principal;
use crate::broker::GapReason;
use crate::event::topic;
use crate::hub::resume::Delivery;
use crate::hub::Cutoff;
use crate::state::AppState;
use crate::telemetry::metrics::{transport, GaugeGuard};
use crate::transport::admission::{Gate, Opening};
use crate::transport::streaming::{frame, Streaming};
use crate::transport::{api_error, ApiError};

pub use crate::graphql::subscription::MAX_TOPICS;

/// The header an `EventSource` sends when it reconnects.
const LAST_EVENT_ID: &str = "last-event-id";

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/api/v1/events/stream", web::get().to(events_stream));
}

// ---------------------------------------------------------------------------
// Resume ids.

/// Separates a topic from its position in a composite id.
const TOPIC_SEP: char = '~';
/// Separates the topics of a composite id.
const ENTRY_SEP: char = ',';

/// Where a stream stands: the latest position of each of its topics, and
/// the SSE `id:` that says it.
#[derive(Debug, Clone)]
pub struct Cursor {
    topics: Vec<String>,
    positions: Vec<Option<String>>,
}

impl Cursor {
    pub fn new(topics: Vec<String>) -> Self {
        let positions = vec![None; topics.len()];
        Self { topics, positions }
    }

    /// Records that topic `index` stands at `position`.
    pub fn set(&mut self, index: usize, position: String) {
        self.positions[index] = Some(position);
    }

    /// The resume id: one topic's position as is; for several topics
    /// `topic~position` of each that has one, comma-separated, in the order
    /// the topics were asked for. `None` while no topic has a position.
    pub fn id(&self) -> Option<String> {
        if let [only] = &self.positions[..] {
            return only.clone();
        }
        let mut id = String::new();
        for (topic, position) in self.topics.iter().zip(&self.positions) {
            let Some(position) = position else { continue };
            if !id.is_empty() {
                id.push(ENTRY_SEP);
            }
            id.push_str(topic);
            id.push(TOPIC_SEP);
            id.push_str(position);
        }
        (!id.is_empty()).then_some(id)
    }
}

/// Where one topic of a stream starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResumeFrom {
    /// No position for it: live events only.
    Live,
    /// After this position (checked by the hub, which says when it cannot).
    After(String),
    /// The id given cannot be read at all.
    Malformed,
}

/// Where each of `topics` starts, given the client's last event id.
pub fn resume_points(last_event_id: Option<&str>, topics: &[String]) -> Vec<ResumeFrom> {
    let Some(id) = last_event_id.map(str::trim).filter(|id| !id.is_empty()) else {
        return vec![ResumeFrom::Live; topics.len()];
    };
    if !id.contains(TOPIC_SEP) {
        // A plain position names no topic: it can only be the one topic's.
        return match topics {
            [_] => vec![ResumeFrom::After(id.to_owned())],
            _ => vec![ResumeFrom::Malformed; topics.len()],
        };
    }
    let mut entries = Vec::new();
    for entry in id.split(ENTRY_SEP) {
        match entry.split_once(TOPIC_SEP) {
            Some((topic, position)) if !topic.is_empty() && !position.is_empty() => {
                entries.push((topic, position))
            }
            _ => return vec![ResumeFrom::Malformed; topics.len()],
        }
    }
    topics
        .iter()
        .map(|topic| {
            // The last entry for a topic wins, should a client repeat one.
            entries
                .iter()
                .rev()
                .find(|(t, _)| t == topic)
                .map_or(ResumeFrom::Live, |(_, position)| {
                    ResumeFrom::After((*position).to_owned())
                })
        })
        .collect()
}

// ---------------------------------------------------------------------------
// The event stream endpoint.

/// A query string that does not decode.
#[derive(Debug, thiserror::Error)]
#[error("the query string is malformed: {0}")]
struct MalformedQuery(actix_web::error::QueryPayloadError);

/// The query string of the event stream.
#[derive(Debug, Default, PartialEq)]
struct StreamQuery {
    topics: Vec<String>,
    token: Option<String>,
    last_event_id: Option<String>,
}

impl StreamQuery {
    /// `topic` (repeated), `token`, `lastEventId`; other parameters (a
    /// client's cache buster, say) are ignored.
    fn parse(query_string: &str) -> Result<Self, MalformedQuery> {
        let pairs = web::Query::<Vec<(String, String)>>::from_query(query_string)
            .map_err(MalformedQuery)?
            .into_inner();
        let mut query = StreamQuery::default();
        for (key, value) in pairs {
            match key.as_str() {
                "topic" => query.topics.push(value),
                "token" => query.token = Some(value).filter(|t| !t.is_empty()),
                "lastEventId" => query.last_event_id = Some(value),
                _ => {}
            }
        }
        Ok(query)
    }
}

/// The refusal of one topic, as the REST error it is on this endpoint.
fn refused(refusal: &Refusal) -> HttpResponse {
    let (status, code) = match refusal {
        Refusal::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
        Refusal::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
        Refusal::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
        Refusal::InvalidTopic(_) => (StatusCode::BAD_REQUEST, "bad_request"),
        Refusal::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
    };
    api_error(status, code, &refusal.to_string())
}

/// The topics asked for, without repeats, or the caller's notifications.
fn choose_topics(
    asked: Vec<String>,
    principal: Option<&Principal>,
) -> Result<Vec<String>, ApiError> {
    if asked.is_empty() {
        return match principal {
            Some(p) => Ok(vec![topic::notifications(&p.user_id)]),
            None => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "name topics with ?topic=, or authenticate to stream your own notifications",
            )),
        };
    }
    let mut topics: Vec<String> = Vec::with_capacity(asked.len());
    for topic in asked {
        if !topics.contains(&topic) {
            topics.push(topic);
        }
    }
    if topics.len() > MAX_TOPICS {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("a stream may name at most {MAX_TOPICS} topics"),
        ));
    }
    Ok(topics)
}

async fn events_stream(state: web::Data<AppState>, req: HttpRequest) -> HttpResponse {
    let gate = match Gate::screen(&state, req.headers(), Opening::EventStream) {
        Ok(gate) => gate,
        Err(refusal) => return refusal.api_response(),
    };
    let query = match StreamQuery::parse(req.query_string()) {
        Ok(query) => query,
        Err(malformed) => {
            let message = malformed.to_string();
            return api_error(StatusCode::BAD_REQUEST, "bad_request", &message);
        }
    };
    let principal = match state
        .auth
        .from_header_or_query(req.headers(), query.token.as_deref())
    {
        Ok(principal) => principal,
        Err(why) => return api_error(StatusCode::UNAUTHORIZED, "unauthorized", &why.to_string()),
    };
    let topics = match choose_topics(query.topics, principal.as_ref()) {
        Ok(topics) => topics,
        Err(refusal) => return refusal.response(),
    };
    // Each decision may be a store round trip: all at once, and the first
    // refusal in the order asked is the one reported.
    let decisions = join_all(
        topics
            .iter()
            .map(|name| authorize(state.store.as_ref(), principal.as_ref(), name)),
    )
    .await;
    if let Some(refusal) = decisions.into_iter().find_map(Result::err) {
        return refused(&refusal);
    }
    let drain = match gate
        .admit_as(principal.as_ref().map(|p| p.user_id.as_str()))
        .await
    {
        Ok(drain) => drain,
        Err(refusal) => return refusal.api_response(),
    };
    // The header is what a reconnecting EventSource sends; the query
    // parameter is the first connection's, and stale after that.
    let last_event_id = req
        .headers()
        .get(LAST_EVENT_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or(query.last_event_id);
    let points = resume_points(last_event_id.as_deref(), &topics);

    // A topic the client has no position for starts at its latest event,
    // read before subscribing: what is published from then on is replayed
    // or live, and the stream can name where it began before any event
    // arrives. Notifications are rare; a client that drops before its
    // first one must still resume exactly. No head (no history, or the bus
    // unreadable): live only.
    let broker = state.hub.broker();
    let anchors = join_all(topics.iter().zip(&points).map(|(name, from)| async move {
        match from {
            ResumeFrom::After(_) => None,
            ResumeFrom::Live | ResumeFrom::Malformed => broker
                .head(name)
                .await
                .ok()
                .flatten()
                .map(|p| p.to_string()),
        }
    }))
    .await;
    let cutoff = Cutoff::new();
    // Subscribed together: each waits for the broker's confirmation and
    // reads its topic's history.
    let opened = join_all(topics.iter().zip(&points).zip(&anchors).map(
        |((name, from), anchor)| {
            let after = match from {
                ResumeFrom::After(position) => Some(position.as_str()),
                ResumeFrom::Live | ResumeFrom::Malformed => anchor.as_deref(),
            };
            state.hub.subscribe_from(
                name,
                after,
                transport::SSE,
                Some(cutoff.clone()),
                crate::auth::policy::recheck(state.store.clone(), principal.clone(), name),
            )
        },
    ))
    .await;
    let mut cursor = Cursor::new(topics.clone());
    let mut opening = vec![frame::retry(
        (state.settings.sse.retry_seconds * 1000.0).round() as u64,
    )];
    let mut streams = Vec::with_capacity(topics.len());
    let mut held = Vec::with_capacity(topics.len());
    for (index, (((name, from), anchor), resumed)) in topics
        .iter()
        .zip(points)
        .zip(anchors)
        .zip(opened)
        .enumerate()
    {
        let resumed = match resumed {
            Ok(resumed) => resumed,
            // The topics already open are released as `opened` drops.
            Err(e) => {
                return api_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    &format!("could not subscribe to {name}: {e}"),
                )
            }
        };
        let gap = match from {
            ResumeFrom::Malformed => Some(GapReason::Malformed),
            _ => resumed.gap,
        };
        // The client's position stays the topic's until an event moves it,
        // even across a gap: resuming from it again replays what the
        // history holds by then. Only a position that is not one is dropped.
        match (&from, anchor) {
            (ResumeFrom::After(position), _) if gap != Some(GapReason::Malformed) => {
                cursor.set(index, position.clone())
            }
            (_, Some(anchor)) => cursor.set(index, anchor),
            _ => {}
        }
        if let Some(reason) = gap {
            opening.push(frame::gap(name, reason));
        }
        streams.push(resumed.stream.map(move |delivery| (index, delivery)));
        held.push(GaugeGuard::new(
            state
                .metrics
                .subscriptions
                .with_label_values(&[transport::SSE]),
        ));
    }

    // Where the stream begins, before any event: a block with only `id:`
    // sets the client's last event id without dispatching anything.
    if let Some(id) = cursor.id() {
        opening.push(frame::id(&id));
    }
    let metrics = state.metrics.clone();
    let frames = stream::select_all(streams)
        .map(move |(index, delivery)| match delivery {
            Delivery::Event(event) => {
                if event.position.is_some() {
                    cursor.set(index, event.event.id.clone());
                }
                metrics.delivered(transport::SSE, event.published_at_ms);
                match cursor.id() {
                    // One topic: every stream of it writes the same block,
                    // made once per node.
                    Some(id) if id == event.event.id => event.sse_frame(|e| {
                        frame::event(&e.event.kind, Some(&e.event.id), e.json.get())
                    }),
                    id => frame::event(&event.event.kind, id.as_deref(), event.json.get()),
                }
            }
            Delivery::Gap(reason) => frame::gap(&cursor.topics[index], reason),
            // The topic's stream ends; the others go on.
            Delivery::Revoked => frame::event(
                "revoked",
                None,
                &serde_json::json!({ "topic": cursor.topics[index], "code": "forbidden" })
                    .to_string(),
            ),
        })
        .boxed();
    let expired = serde_json::json!({
        "code": crate::error::envelope::UNAUTHORIZED,
        "message": "the token has expired: reconnect with a fresh one",
    });
    Streaming::new(&state, transport::SSE, frame::PING, cutoff, drain, held)
        .expiring(
            principal.as_ref().and_then(|p| p.expires_at),
            frame::event("auth.expired", None, &expired.to_string()),
        )
        .respond(opening, frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn one_topic_resumes_from_its_plain_position() {
        let mut cursor = Cursor::new(topics(&["posts"]));
        assert_eq!(cursor.id(), None);
        cursor.set(0, "ab12cd:5".into());
        assert_eq!(cursor.id().as_deref(), Some("ab12cd:5"));
        assert_eq!(
            resume_points(Some("ab12cd:5"), &topics(&["posts"])),
            [ResumeFrom::After("ab12cd:5".into())]
        );
        // A composite id names the topic too.
        assert_eq!(
            resume_points(
                Some("channel:x~ef34ab:9,posts~ab12cd:5"),
                &topics(&["posts"])
            ),
            [ResumeFrom::After("ab12cd:5".into())]
        );
        for none in [None, Some(""), Some("  ")] {
            assert_eq!(resume_points(none, &topics(&["posts"])), [ResumeFrom::Live]);
        }
    }

    #[test]
    fn several_topics_resume_from_a_composite_id_that_round_trips() {
        let names = topics(&["posts", "channel:x", "orders"]);
        let mut cursor = Cursor::new(names.clone());
        cursor.set(1, "ef34ab:9".into());
        assert_eq!(cursor.id().as_deref(), Some("channel:x~ef34ab:9"));
        cursor.set(0, "ab12cd:5".into());
        cursor.set(1, "ef34ab:10".into());
        let id = cursor.id().unwrap();
        assert_eq!(id, "posts~ab12cd:5,channel:x~ef34ab:10");
        assert_eq!(
            resume_points(Some(&id), &names),
            [
                ResumeFrom::After("ab12cd:5".into()),
                ResumeFrom::After("ef34ab:10".into()),
                ResumeFrom::Live
            ]
        );
        // Topics the id names but the stream does not ask for are ignored;
        // a repeated topic's last entry wins.
        assert_eq!(
            resume_points(
                Some("gone~aa:1,posts~ab12cd:4,posts~ab12cd:5"),
                &topics(&["posts", "orders"])
            ),
            [ResumeFrom::After("ab12cd:5".into()), ResumeFrom::Live]
        );
    }

    #[test]
    fn an_unreadable_id_is_malformed_for_every_topic() {
        let names = topics(&["posts", "orders"]);
        // A plain position cannot say which of several topics it is.
        assert_eq!(
            resume_points(Some("ab12cd:5"), &names),
            [ResumeFrom::Malformed, ResumeFrom::Malformed]
        );
        for bad in [
            "posts~ab:1,orders",
            "posts~",
            "~ab:1",
            "posts~ab:1,,orders~cd:2",
        ] {
            assert_eq!(
                resume_points(Some(bad), &names),
                [ResumeFrom::Malformed, ResumeFrom::Malformed],
                "{bad}"
            );
        }
        // A malformed position inside a well-formed composite is the hub's
        // to judge (it says `malformed` for that topic only).
        assert_eq!(
            resume_points(Some("posts~nonsense"), &names),
            [ResumeFrom::After("nonsense".into()), ResumeFrom::Live]
        );
    }

    #[test]
    fn the_query_string_takes_repeated_topics() {
        let q =
            StreamQuery::parse("topic=posts&topic=channel%3Ax&token=t&lastEventId=a~b%3A1&_=123")
                .unwrap();
        assert_eq!(
            q,
            StreamQuery {
                topics: topics(&["posts", "channel:x"]),
                token: Some("t".into()),
                last_event_id: Some("a~b:1".into())
            }
        );
        assert_eq!(StreamQuery::parse("").unwrap(), StreamQuery::default());
        assert_eq!(StreamQuery::parse("token=").unwrap().token, None);
    }

    #[test]
    fn topics_default_to_the_callers_notifications_and_are_bounded() {
        let me = Principal {
            user_id: "u1".into(),
            scopes: vec![],
            expires_at: None,
        };
        assert_eq!(
            choose_topics(vec![], Some(&me)).unwrap(),
            ["notifications:u1"]
        );
        assert_eq!(
            choose_topics(vec![], None).unwrap_err().status,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            choose_topics(topics(&["a", "b", "a"]), None).unwrap(),
            ["a", "b"]
        );
        let many: Vec<String> = (0..=MAX_TOPICS).map(|i| format!("t{i}")).collect();
        assert_eq!(
            choose_topics(many, Some(&me)).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }
}
