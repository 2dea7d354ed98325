//! GraphQL over HTTP at `/graphql`, following the GraphQL-over-HTTP spec.
//!
//! - `POST` with `application/json` (single or batched), or `GET` with
//!   `?query=&variables=&operationName=` for queries only (a mutation over
//!   GET is 405 with `Allow: POST`).
//! - The response is `application/graphql-response+json` when the client
//!   accepts it, else `application/json`.
//! - A body that is not JSON, not a GraphQL request, or a document that does
//!   not parse or validate is 400; a body over `server.max_body_bytes` is 413.
//! - CSRF: a POST whose content type a cross-site form can send
//!   (`text/plain`, `application/x-www-form-urlencoded`,
//!   `multipart/form-data`) or that has none is refused with 415.

use std::time::Instant;

use actix_web::http::{header, Method, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use async_graphql::parser::types::OperationType;
use async_graphql::{BatchRequest, BatchResponse};
use serde_json::json;

use crate::error::ErrorCode;
use crate::graphql::limits::decode_body;
use crate::graphql::{ClientAddr, Viewer};
use crate::state::AppState;
use crate::transport::operation::{
    counted_operation_type, is_request_error, operation_label, outcome, request_from_query,
};
use crate::transport::request::{client_of, is_websocket_upgrade, media_type, read_body};

pub const GRAPHQL_RESPONSE_JSON: &str = "application/graphql-response+json";

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/graphql")
            .route(web::post().to(post_graphql))
            .route(web::get().guard(NotUpgrade).to(get_graphql)),
    );
}

/// Matches a plain GET (not a WebSocket upgrade, which `/graphql` also takes).
struct NotUpgrade;

impl actix_web::guard::Guard for NotUpgrade {
    fn check(&self, ctx: &actix_web::guard::GuardContext<'_>) -> bool {
        !is_websocket_upgrade(ctx.head().headers())
    }
}

/// The error body of a request refused before execution.
fn request_error(status: StatusCode, message: &str, json_type: &'static str) -> HttpResponse {
    HttpResponse::build(status)
        .content_type(json_type)
        .json(json!({ "errors": [{ "message": message }] }))
}

/// Which media type the response uses, per the client's `Accept`.
fn response_type(req: &HttpRequest) -> &'static str {
    let accept = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if accept.contains(GRAPHQL_RESPONSE_JSON) {
        GRAPHQL_RESPONSE_JSON
    } else {
        "application/json"
    }
}

fn unauthorized(message: &str, json_type: &'static str) -> HttpResponse {
    HttpResponse::Unauthorized()
        .insert_header((header::WWW_AUTHENTICATE, "Bearer"))
        .content_type(json_type)
        .json(
            json!({ "errors": [{ "message": message, "extensions": { "code": ErrorCode::Unauthorized.as_str() } }] }),
        )
}

async fn post_graphql(
    state: web::Data<AppState>,
    req: HttpRequest,
    mut payload: web::Payload,
) -> HttpResponse {
    let json_type = response_type(&req);
    let content_type = media_type(&req);
    if content_type != "application/json" && content_type != GRAPHQL_RESPONSE_JSON {
        return request_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "POST /graphql takes Content-Type: application/json",
            json_type,
        );
    }
    let body = match read_body(&mut payload, state.settings.server.max_body_bytes).await {
        Ok(body) => body.freeze(),
        Err(e) => return request_error(e.status(), &e.to_string(), json_type),
    };
    let batch = match decode_body::<BatchRequest>(body).await {
        Ok(batch) => batch,
        Err(e) => {
            return request_error(
                StatusCode::BAD_REQUEST,
                &format!("the body is not a GraphQL request: {e}"),
                json_type,
            )
        }
    };
    execute(&state, &req, batch, Method::POST, json_type).await
}

async fn get_graphql(state: web::Data<AppState>, req: HttpRequest) -> HttpResponse {
    let json_type = response_type(&req);
    match request_from_query(req.query_string()) {
        Ok(request) => {
            execute(
                &state,
                &req,
                BatchRequest::Single(request),
                Method::GET,
                json_type,
            )
            .await
        }
        Err(bad) => request_error(StatusCode::BAD_REQUEST, &bad.to_string(), json_type),
    }
}

async fn execute(
    state: &AppState,
    req: &HttpRequest,
    batch: BatchRequest,
    method: Method,
    json_type: &'static str,
) -> HttpResponse {
    let principal = match state.auth.from_header(req.headers()) {
        Ok(p) => p,
        Err(why) => return unauthorized(&why.to_string(), json_type),
    };
    let requests = match batch {
        BatchRequest::Single(r) => vec![r],
        BatchRequest::Batch(rs) => {
            if rs.is_empty() {
                return request_error(StatusCode::BAD_REQUEST, "an empty batch", json_type);
            }
            if rs.len() > state.settings.graphql.max_batch_size {
                return request_error(
                    StatusCode::BAD_REQUEST,
                    &format!(
                        "a batch may hold at most {} operations",
                        state.settings.graphql.max_batch_size
                    ),
                    json_type,
                );
            }
            rs
        }
    };
    let client = ClientAddr(client_of(req, &state.settings));
    let batched = requests.len() > 1;
    let mut responses = Vec::with_capacity(requests.len());
    let mut any_request_error = false;
    for mut request in requests {
        let ty = counted_operation_type(
            &state.schema,
            &mut request,
            state.settings.graphql.max_tokens,
            &state.metrics,
        )
        .await;
        if method == Method::GET && ty.as_ref().is_ok_and(|ty| *ty != OperationType::Query) {
            return HttpResponse::MethodNotAllowed()
                .insert_header((header::ALLOW, "POST"))
                .content_type(json_type)
                .json(json!({ "errors": [{ "message": "only queries may be sent with GET; use POST" }] }));
        }
        let (refused, status) = match ty {
            Err(unknown) => (unknown.server_error(), unknown.status()),
            Ok(OperationType::Subscription) => {
                state
                    .metrics
                    .graphql_operations_total
                    .with_label_values(&["subscription", "request_error"])
                    .inc();
                (
                    async_graphql::ServerError::new(
                        "subscriptions are served over WebSocket at /graphql/ws",
                        None,
                    ),
                    StatusCode::BAD_REQUEST,
                )
            }
            Ok(ty) => {
                let label = operation_label(ty);
                let started = Instant::now();
                let response = state
                    .schema
                    .execute(request.data(Viewer(principal.clone())).data(client))
                    .await;
                state
                    .metrics
                    .graphql_operation_duration_seconds
                    .with_label_values(&[label])
                    .observe(started.elapsed().as_secs_f64());
                state
                    .metrics
                    .graphql_operations_total
                    .with_label_values(&[label, outcome(&response)])
                    .inc();
                any_request_error |= is_request_error(&response);
                responses.push(response);
                continue;
            }
        };
        // Refused before it ran: alone, the request is 400; in a batch, the
        // operation's place holds the error and the others still run.
        if !batched {
            let mut response = HttpResponse::build(status);
            if status == StatusCode::TOO_MANY_REQUESTS {
                response.insert_header((header::RETRY_AFTER, "1"));
            }
            return response
                .content_type(json_type)
                .json(json!({ "errors": [refused] }));
        }
        any_request_error = true;
        responses.push(async_graphql::Response::from_errors(vec![refused]));
    }
    let status = if any_request_error && !batched {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    let body = if batched {
        serde_json::to_vec(&BatchResponse::Batch(responses))
    } else {
        serde_json::to_vec(&responses.pop().expect("one response"))
    };
    match body {
        Ok(body) => HttpResponse::build(status)
            .content_type(json_type)
            .body(body),
        Err(_) => request_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the response could not be encoded",
            json_type,
        ),
    }
}
