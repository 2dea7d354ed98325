//! Transports: how clients reach the hub and the schema.

pub mod envelope;
pub mod envelope_types;
pub mod graphql_sse;
pub mod http;
pub mod ops;
pub mod publish;
pub mod sse;
pub mod ws;

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpResponse};
use serde_json::json;

pub fn configure(cfg: &mut web::ServiceConfig) {
    // First: the upgrade on /graphql must be matched before the plain GET.
    ws::configure(cfg);
    envelope::configure(cfg);
    // Before /graphql too, though the paths differ: the more specific
    // resource reads better first.
    graphql_sse::configure(cfg);
    http::configure(cfg);
    sse::configure(cfg);
    publish::configure(cfg);
    ops::configure(cfg);
}

/// A REST refusal not yet turned into a response (small enough to return
/// through `Result` cheaply).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn response(&self) -> HttpResponse {
        api_error(self.status, self.code, &self.message)
    }
}

/// The error body of the REST endpoints (`/api/v1/…`):
/// `{"error": {"code", "message"}}`, `code` a stable machine string
/// (`bad_request`, `unauthorized`, `forbidden`, `not_found`, `too_large`,
/// `rate_limited`, `unavailable`, `internal`), `message` for humans.
pub(crate) fn api_error(status: StatusCode, code: &str, message: &str) -> HttpResponse {
    let mut response = HttpResponse::build(status);
    match status {
        StatusCode::UNAUTHORIZED => {
            response.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
        }
        // A node that cannot serve now may well serve in a moment, or
        // another node behind the balancer may.
        StatusCode::SERVICE_UNAVAILABLE => {
            response.insert_header((header::RETRY_AFTER, "1"));
        }
        _ => {}
    }
    response.json(json!({ "error": { "code": code, "message": message } }))
}
