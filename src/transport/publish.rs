//! `POST /api/v1/publish`: server-side publishing for trusted backends.
//!
//! - Body: `{"topic", "type", "payload", "readers"?}`, JSON; unknown fields
//!   are refused so that a misspelt `readers` cannot silently publish to
//!   a topic with the wrong rule.
//! - Authentication: `Authorization: Bearer K` where `K` is one of
//!   `publish.api_keys` (compared in constant time), or a JWT whose `scope`
//!   holds `publish`. Anything else is 401; a valid token without the scope
//!   is 403.
//! - Validation: `topic` a valid topic name, `type` 1 to 100 characters of
//!   `[a-z0-9._-]` and not reserved (the node's own message and event
//!   names, such as `gap` or `auth.success`, and the domain's event kinds,
//!   such as `message.created`: all 400); `payload` at most
//!   `publish.max_payload_bytes` once encoded (413); a body that is not such
//!   JSON is 400 saying why.
//! - Any topic may be published to, the domain's included (backends notify
//!   users on `notifications:{userId}` this way). `readers` sets who may
//!   subscribe to a backend topic (`"public"`, `"authenticated"`, or
//!   `{"users": […]}`); a publish without it keeps the topic's rule, and a
//!   topic that never had one is readable by any authenticated caller. On a
//!   domain topic, whose rules are built in, `readers` is refused (400).
//! - Rate limit: a token bucket per API key or token subject on this node
//!   (`ratelimit.publish_per_second`, `ratelimit.publish_burst`); over it,
//!   429 with `Retry-After` (whole seconds, rounded up).
//! - Guessing: every 401 takes a token from the client address's bucket
//!   (`ratelimit.publish_auth_failures_per_second` / `_burst`; the address
//!   after `server.trusted_proxies`). While that bucket is empty, every
//!   publish from the address is 429 with `Retry-After` before its
//!   credentials are even looked at: answering a right key differently
//!   would tell the guesser which key was right.
//! - Answer: 202 `{"id": "<position>", "topic": …}` once the broker has the
//!   event; 503 when the broker or the store cannot take it (Redis down).
//!
//! This module authenticates, limits and reads the body; what may be
//! published, and the readers rule, are decided by
//! [`crate::domain::publishing`].

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;
use subtle::{ConditionallySelectable, ConstantTimeEq};

use super::request::{client_of, read_body, BodyError};
use super::{api_error, ApiError};
use crate::auth::bearer;
use crate::domain::publishing::{BackendEvent, Invalid, PublishRefusal};
use crate::event::topic;
use crate::ratelimit::Limited;
use crate::state::AppState;
use crate::store::TopicReaders;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/api/v1/publish", web::post().to(publish));
}

/// The body of a publish request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishRequest {
    topic: String,
    #[serde(rename = "type")]
    kind: String,
    payload: serde_json::Value,
    #[serde(default)]
    readers: Option<TopicReaders>,
}

/// Who is publishing: which configured key, or which token subject. Names
/// the publisher for the rate limit and the logs, never with the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Publisher {
    /// The key at this index of `publish.api_keys`.
    Key(usize),
    /// A token's `sub`.
    Subject(String),
}

impl Publisher {
    /// The rate limit's key: distinct for every key and subject, and never
    /// the key itself (the limiter's map is no place for a secret).
    fn limit_key(&self) -> String {
        match self {
            Publisher::Key(index) => format!("key:{index}"),
            Publisher::Subject(sub) => format!("sub:{sub}"),
        }
    }
}

/// The index of the key equal to `given`, if any. Every key is compared in
/// full and the match is selected without branching, so the time taken
/// says neither how much of a key matched nor which one did. (Lengths are
/// not hidden: a key's length is no help in guessing it.)
fn key_index(keys: &[String], given: &str) -> Option<usize> {
    let mut found: u64 = 0;
    for (i, key) in keys.iter().enumerate() {
        let equal = key.as_bytes().ct_eq(given.as_bytes());
        found = u64::conditional_select(&found, &(i as u64 + 1), equal);
    }
    (found != 0).then(|| found as usize - 1)
}

/// The publisher the request speaks for, or the 401/403 that says why not.
fn authenticate(state: &AppState, req: &HttpRequest) -> Result<Publisher, ApiError> {
    let unauthorized =
        |message: String| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message);
    let header = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .ok_or_else(|| {
            unauthorized("publishing needs Authorization: Bearer <API key or token>".into())
        })?;
    let token = header.to_str().ok().and_then(bearer).ok_or_else(|| {
        unauthorized("the Authorization header must be `Bearer <API key or token>`".into())
    })?;
    if let Some(index) = key_index(&state.settings.publish.api_keys, token) {
        return Ok(Publisher::Key(index));
    }
    let principal = state.auth.verify(token).map_err(|e| {
        unauthorized(format!(
            "neither a publish API key nor an accepted token: {e}"
        ))
    })?;
    if !principal.has_scope("publish") {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the token's scope does not include `publish`",
        ));
    }
    Ok(Publisher::Subject(principal.user_id))
}

/// 429 `rate_limited`, with `Retry-After` in whole seconds.
fn too_many_requests(limited: Limited) -> HttpResponse {
    let mut response = api_error(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        &limited.to_string(),
    );
    response.headers_mut().insert(
        actix_web::http::header::RETRY_AFTER,
        actix_web::http::header::HeaderValue::from(limited.retry_after_secs()),
    );
    response
}

/// What is wrong with a publish request, as the client is told.
async fn publish(
    state: web::Data<AppState>,
    req: HttpRequest,
    mut payload: web::Payload,
) -> HttpResponse {
    let client = client_of(&req, &state.settings);
    if let Some(ip) = client {
        if let Err(limited) = state.limits.publish_auth_allowed(ip) {
            return too_many_requests(limited);
        }
    }
    let publisher = match authenticate(&state, &req) {
        Ok(publisher) => publisher,
        Err(refusal) => {
            if refusal.status == StatusCode::UNAUTHORIZED {
                if let Some(ip) = client {
                    if let Err(limited) = state.limits.publish_auth_failed(ip) {
                        return too_many_requests(limited);
                    }
                }
            }
            return refusal.response();
        }
    };
    // Before the body is read: a publisher over its limit costs no parsing.
    if let Err(limited) = state.limits.publish(&publisher.limit_key()) {
        return too_many_requests(limited);
    }
    let body = match read_body(&mut payload, state.settings.server.max_body_bytes).await {
        Ok(body) => body,
        Err(BodyError::TooLarge(limit)) => {
            return api_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                &format!("the body exceeds {limit} bytes"),
            )
        }
        Err(BodyError::Unreadable) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "the request body could not be read",
            )
        }
    };
    let request: PublishRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!(
                    "the body must be JSON {{\"topic\", \"type\", \"payload\", \"readers\"?}}: {e}"
                ),
            )
        }
    };
    let event = BackendEvent {
        topic: request.topic,
        kind: request.kind,
        payload: request.payload,
        readers: request.readers,
    };
    match state.domain.publish_backend(event).await {
        Ok(shared) => {
            tracing::debug!(
                namespace = topic::namespace(&shared.event.topic),
                by_key = matches!(publisher, Publisher::Key(_)),
                "published"
            );
            HttpResponse::Accepted()
                .json(json!({ "id": shared.event.id, "topic": shared.event.topic }))
        }
        Err(PublishRefusal::Invalid(Invalid::BadRequest(message))) => {
            api_error(StatusCode::BAD_REQUEST, "bad_request", &message)
        }
        Err(PublishRefusal::Invalid(Invalid::TooLarge(message))) => {
            api_error(StatusCode::PAYLOAD_TOO_LARGE, "too_large", &message)
        }
        Err(PublishRefusal::Unavailable(message)) => {
            api_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_keys_match_whole_and_only_whole() {
        let keys = vec![
            "k-0123456789abcdef".to_owned(),
            "k-fedcba9876543210".to_owned(),
        ];
        assert_eq!(key_index(&keys, "k-0123456789abcdef"), Some(0));
        assert_eq!(key_index(&keys, "k-fedcba9876543210"), Some(1));
        for wrong in [
            "",
            "k-0123456789abcde",
            "k-0123456789abcdef0",
            "K-0123456789ABCDEF",
            "k-fedcba9876543211",
        ] {
            assert_eq!(key_index(&keys, wrong), None, "{wrong:?}");
        }
        assert_eq!(key_index(&[], "anything"), None);
    }

    #[test]
    fn publishers_are_limited_by_name_never_by_secret() {
        assert_eq!(Publisher::Key(2).limit_key(), "key:2");
        assert_eq!(Publisher::Subject("u1".into()).limit_key(), "sub:u1");
        // A subject that looks like a key index is still another publisher.
        assert_ne!(
            Publisher::Subject("2".into()).limit_key(),
            Publisher::Key(2).limit_key()
        );
    }

    #[test]
    fn the_body_refuses_unknown_and_missing_fields() {
        let parse = |s: &str| serde_json::from_str::<PublishRequest>(s);
        let good =
            parse(r#"{"topic":"t","type":"x","payload":{},"readers":{"users":["u1"]}}"#).unwrap();
        assert_eq!(good.readers, Some(TopicReaders::Users(vec!["u1".into()])));
        assert_eq!(
            parse(r#"{"topic":"t","type":"x","payload":null}"#)
                .unwrap()
                .readers,
            None
        );
        let misspelt =
            parse(r#"{"topic":"t","type":"x","payload":{},"reader":"public"}"#).unwrap_err();
        assert!(
            misspelt.to_string().contains("unknown field `reader`"),
            "{misspelt}"
        );
        let missing = parse(r#"{"topic":"t","payload":{}}"#).unwrap_err();
        assert!(
            missing.to_string().contains("missing field `type`"),
            "{missing}"
        );
    }
}
