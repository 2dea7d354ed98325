//! Transports: how clients reach the hub and the schema.
//!
//! The transports ([`http`], [`ws`], [`envelope`], [`sse`], [`graphql_sse`],
//! [`publish`], [`ops`]) each own a route and its wire format, and none
//! imports another: what several of them need is shared infrastructure
//! here. [`admission`] is the one gate of long-lived connections;
//! [`socket`] the WebSocket layer both WebSocket protocols run on;
//! [`streaming`] the event-stream body both SSE transports write;
//! [`operation`] what every GraphQL transport says about an operation;
//! [`request`] what handlers read from a request first; [`server`] the HTTP
//! server that hands WebSocket upgrades to [`upgrade`].

pub mod admission;
pub mod envelope;
pub mod graphql_sse;
pub mod http;
pub mod operation;
pub mod ops;
pub mod publish;
pub mod request;
pub mod server;
pub mod socket;
pub mod sse;
pub mod streaming;
pub mod ws;

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpResponse, HttpResponseBuilder};
use serde_json::json;

use crate::error::ErrorCode;
use crate::state::AppState;

pub fn configure(cfg: &mut web::ServiceConfig) {
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

/// Serves a WebSocket upgrade on the node's paths: `/graphql/ws` and
/// `/graphql` (GraphQL over WebSocket), `/ws` (the envelope protocol); any
/// other path is refused with 404.
pub async fn upgrade(state: AppState, upgrade: socket::Upgrade) {
    match upgrade.path() {
        "/graphql/ws" | "/graphql" => ws::upgrade(state, upgrade).await,
        "/ws" => envelope::upgrade(state, upgrade).await,
        _ => {
            let refusal = graphql_error(
                StatusCode::NOT_FOUND,
                Some(ErrorCode::NotFound),
                "no WebSocket here: /graphql/ws (or /graphql) and /ws take upgrades",
            );
            upgrade.refuse(refusal).await
        }
    }
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
    refusal(status).json(json!({ "error": { "code": code, "message": message } }))
}

/// A GraphQL request refused before it ran (a WebSocket upgrade, a GraphQL
/// event stream), in the GraphQL error shape: `{"errors": [{"message",
/// "extensions": {"code"}?}]}`.
pub(crate) fn graphql_error(
    status: StatusCode,
    code: Option<ErrorCode>,
    message: &str,
) -> HttpResponse {
    let mut error = json!({ "message": message });
    if let Some(code) = code {
        error["extensions"] = json!({ "code": code.as_str() });
    }
    refusal(status).json(json!({ "errors": [error] }))
}

/// A response with the headers its refusal status calls for.
fn refusal(status: StatusCode) -> HttpResponseBuilder {
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
    response
}

#[cfg(test)]
mod tests {
    //! The shape of the module tree: no transport imports another.

    /// The transports, each a file `<name>.rs` or a folder `<name>/`.
    const TRANSPORTS: &[&str] = &[
        "http",
        "ws",
        "envelope",
        "sse",
        "graphql_sse",
        "publish",
        "ops",
    ];

    /// The transports that `source` names after `transport::` or `super::`
    /// (alone or in a `{…}` group), comments included: a doc link is a
    /// dependency too.
    fn named(source: &str) -> Vec<&'static str> {
        let mut found = Vec::new();
        for prefix in ["transport::", "super::"] {
            for (at, _) in source.match_indices(prefix) {
                let rest = &source[at + prefix.len()..];
                let names = match rest.strip_prefix('{') {
                    Some(group) => &group[..group.find('}').unwrap_or(group.len())],
                    None => rest,
                };
                for name in names.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                    if let Some(t) = TRANSPORTS.iter().find(|t| **t == name) {
                        found.push(*t);
                    }
                    if rest.starts_with('{') {
                        continue;
                    }
                    break;
                }
            }
        }
        found
    }

    /// Every `.rs` file below `dir`.
    fn sources(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    #[test]
    fn the_check_sees_every_form_of_import() {
        assert_eq!(named("use crate::transport::ws::pump;"), ["ws"]);
        assert_eq!(named("use super::http::{a, b};"), ["http"]);
        assert_eq!(
            named("use crate::transport::{api_error, sse, ApiError};"),
            ["sse"]
        );
        assert_eq!(
            named("use crate::telemetry::metrics::transport::SSE;"),
            [""; 0]
        );
        assert_eq!(named("use super::{encode, Action};"), [""; 0]);
    }

    #[test]
    fn no_transport_imports_another() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/transport");
        let mut offences = Vec::new();
        for transport in TRANSPORTS {
            let mut files = Vec::new();
            let dir = root.join(transport);
            if dir.is_dir() {
                sources(&dir, &mut files);
            } else {
                files.push(root.join(format!("{transport}.rs")));
            }
            assert!(!files.is_empty(), "no source for the transport {transport}");
            for file in files {
                let source = std::fs::read_to_string(&file).unwrap();
                for other in named(&source) {
                    if other != *transport {
                        offences.push(format!("{} names {other}", file.display()));
                    }
                }
            }
        }
        assert!(
            offences.is_empty(),
            "a transport imports another; move what they share to \
             src/transport/{{admission,socket,streaming,operation,request}}.rs \
             or below: {offences:#?}"
        );
    }
}
