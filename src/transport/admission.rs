//! The one gate every long-lived connection passes (both WebSocket
//! protocols, both event streams): its `Origin`, the drain, and
//! `server.max_connections`.
//!
//! The decision comes in two steps, because a transport does work between
//! them that must not hold a place (verifying a token, authorizing topics):
//! [`Gate::screen`] refuses what costs nothing to decide (a foreign
//! `Origin`, a draining node), and [`Gate::admit`] takes a place under the
//! limit, held by the [`DrainGuard`] for as long as the connection lives.
//! Each refusal is counted in `subgate_rejected_total{reason}` here, once;
//! the transport only renders it, in its own error shape (the REST one or
//! the GraphQL one).

use actix_web::http::header::{self, HeaderMap};
use actix_web::http::StatusCode;
use actix_web::HttpResponse;

use crate::error::ErrorCode;
use crate::shutdown::DrainGuard;
use crate::state::AppState;
use crate::transport::{api_error, graphql_error};

/// `Retry-After` of a 429 for the per-user limit: a user's connection
/// closes when they close a tab, not on a clock; a few seconds, then try.
pub const USER_FULL_RETRY_AFTER_SECONDS: u64 = 5;

/// What a connection opens, as a refusal names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    WebSocket,
    EventStream,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `server.allowed_origins` is set and the `Origin` is not in it.
    Origin(Opening),
    /// The node drains.
    Draining,
    /// The node holds `server.max_connections`.
    Full,
    /// The user holds `server.max_connections_per_user` (on this node or
    /// across the fleet).
    UserFull,
}

impl Refusal {
    /// The `reason` label of `subgate_rejected_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Origin(_) => "origin",
            Refusal::Draining => "draining",
            Refusal::Full => "max_connections",
            Refusal::UserFull => "max_connections_per_user",
        }
    }

    /// 403 for the `Origin`; 503 otherwise (this node, or another behind
    /// the balancer, may well serve in a moment).
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::Origin(_) => StatusCode::FORBIDDEN,
            Refusal::Draining | Refusal::Full => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::UserFull => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// The machine code: `forbidden` or `unavailable`.
    fn code(self) -> &'static str {
        match self {
            Refusal::Origin(_) => "forbidden",
            Refusal::Draining | Refusal::Full => "unavailable",
            Refusal::UserFull => crate::error::envelope::RATE_LIMITED,
        }
    }

    /// The refusal as the REST endpoints answer it (`{"error": {…}}`).
    pub fn api_response(self) -> HttpResponse {
        self.with_retry_after(api_error(self.status(), self.code(), self.message()))
    }

    /// 429 says when to try again (503s already do, in every shape).
    fn with_retry_after(self, mut response: HttpResponse) -> HttpResponse {
        if self == Refusal::UserFull {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                header::HeaderValue::from(USER_FULL_RETRY_AFTER_SECONDS),
            );
        }
        response
    }

    /// The refusal as a GraphQL error (`{"errors": […]}`, its
    /// [`ErrorCode`]): the WebSocket upgrades' and GraphQL over SSE's.
    pub fn graphql_response(self) -> HttpResponse {
        let code = match self {
            Refusal::Origin(_) => ErrorCode::Forbidden,
            Refusal::Draining | Refusal::Full => ErrorCode::Unavailable,
            Refusal::UserFull => ErrorCode::RateLimited,
        };
        self.with_retry_after(graphql_error(self.status(), Some(code), self.message()))
    }

    /// For humans.
    pub fn message(self) -> &'static str {
        match self {
            Refusal::Origin(Opening::WebSocket) => "this Origin may not open a WebSocket",
            Refusal::Origin(Opening::EventStream) => "this Origin may not open an event stream",
            Refusal::Draining => "the node is shutting down",
            Refusal::Full => "the node is at its connection limit",
            Refusal::UserFull => "this user holds as many connections as allowed",
        }
    }
}

/// A request that passed the screening and may ask for a place.
#[must_use = "a screened request is admitted only by `admit`"]
pub struct Gate<'a> {
    state: &'a AppState,
}

impl<'a> Gate<'a> {
    /// Refuses a foreign `Origin` and any request while the node drains.
    pub fn screen(
        state: &'a AppState,
        headers: &HeaderMap,
        opening: Opening,
    ) -> Result<Self, Refusal> {
        let gate = Self { state };
        if !origin_allowed(&state.settings.server.allowed_origins, headers) {
            return Err(gate.refuse(Refusal::Origin(opening)));
        }
        if state.shutdown.is_draining() {
            return Err(gate.refuse(Refusal::Draining));
        }
        Ok(gate)
    }

    /// Counts one more long-lived connection, or refuses it when the node
    /// began draining since the screening or holds `server.max_connections`.
    /// The guard keeps the connection counted.
    pub fn admit(self) -> Result<DrainGuard, Refusal> {
        let shutdown = &self.state.shutdown;
        if shutdown.is_draining() {
            return Err(self.refuse(Refusal::Draining));
        }
        // Counted first and checked after, so that concurrent requests on
        // several workers can never overshoot the limit together.
        let drain = shutdown.track();
        if shutdown.open_connections() > self.state.settings.connection_limit() {
            drop(drain);
            return Err(self.refuse(Refusal::Full));
        }
        Ok(drain)
    }

    /// [`Gate::admit`], then a place under the per-user limit for `user`
    /// (when the connection speaks for one), held by the guard too.
    pub async fn admit_as(self, user: Option<&str>) -> Result<DrainGuard, Refusal> {
        let state = self.state;
        let drain = self.admit()?;
        let Some(user) = user else {
            return Ok(drain);
        };
        match state.user_connections.acquire(user).await {
            Ok(lease) => Ok(drain.holding(lease)),
            Err(_) => Err(Gate { state }.refuse(Refusal::UserFull)),
        }
    }

    fn refuse(&self, refusal: Refusal) -> Refusal {
        self.state
            .metrics
            .rejected_total
            .with_label_values(&[refusal.reason()])
            .inc();
        refusal
    }
}

/// Whether the request's `Origin` may open a long-lived connection. A
/// request without `Origin` is not a browser's and passes.
fn origin_allowed(allowed: &[String], headers: &HeaderMap) -> bool {
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

#[cfg(test)]
mod tests {
    use actix_web::http::header::HeaderValue;

    use super::*;
    use crate::config::Settings;

    fn with_origin(origin: Option<&'static str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(origin) = origin {
            headers.insert(header::ORIGIN, HeaderValue::from_static(origin));
        }
        headers
    }

    #[test]
    fn origins_match_without_case_or_trailing_slash() {
        let allowed = vec!["https://app.example/".to_owned()];
        assert!(origin_allowed(&[], &with_origin(Some("https://x"))));
        assert!(origin_allowed(&allowed, &with_origin(None)));
        assert!(origin_allowed(
            &allowed,
            &with_origin(Some("HTTPS://APP.example"))
        ));
        assert!(!origin_allowed(&allowed, &with_origin(Some("https://x"))));
    }

    #[tokio::test]
    async fn every_refusal_is_counted_once_by_its_reason() {
        let mut settings = Settings::default();
        settings.server.allowed_origins = vec!["https://app.example".into()];
        settings.server.max_connections = Some(1);
        let state = crate::test_support::state(settings);
        let rejected = |reason| {
            state
                .metrics
                .rejected_total
                .with_label_values(&[reason])
                .get()
        };

        let foreign = with_origin(Some("https://evil.example"));
        let refusal = Gate::screen(&state, &foreign, Opening::EventStream).err();
        assert_eq!(refusal, Some(Refusal::Origin(Opening::EventStream)));
        assert_eq!(rejected("origin"), 1);

        let held = Gate::screen(&state, &HeaderMap::new(), Opening::WebSocket)
            .and_then(Gate::admit)
            .expect("room for one");
        let full = Gate::screen(&state, &HeaderMap::new(), Opening::WebSocket)
            .and_then(Gate::admit)
            .err();
        assert_eq!(full, Some(Refusal::Full));
        assert_eq!(rejected("max_connections"), 1);
        assert_eq!(state.shutdown.open_connections(), 1);
        drop(held);

        let gate = Gate::screen(&state, &HeaderMap::new(), Opening::WebSocket).unwrap();
        state.shutdown.begin();
        assert_eq!(gate.admit().err(), Some(Refusal::Draining));
        let late = Gate::screen(&state, &HeaderMap::new(), Opening::WebSocket).err();
        assert_eq!(late, Some(Refusal::Draining));
        assert_eq!(rejected("draining"), 2);
        assert_eq!(state.shutdown.open_connections(), 0);
    }
}
