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
use async_graphql::{BatchRequest, BatchResponse, Request};
use futures_util::StreamExt;
use serde_json::json;

use crate::auth::{bearer, Principal};
use crate::graphql::Viewer;
use crate::state::AppState;

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

pub fn is_websocket_upgrade(headers: &header::HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
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

/// The principal from `Authorization: Bearer`, or an error response.
pub fn principal_from_header(
    state: &AppState,
    req: &HttpRequest,
) -> Result<Option<Principal>, String> {
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| "the Authorization header is not text".to_owned())?;
    let token = bearer(value)
        .ok_or_else(|| "the Authorization header must be `Bearer <token>`".to_owned())?;
    state
        .auth
        .verify(token)
        .map(Some)
        .map_err(|e| e.to_string())
}

fn unauthorized(message: &str, json_type: &'static str) -> HttpResponse {
    HttpResponse::Unauthorized()
        .insert_header((header::WWW_AUTHENTICATE, "Bearer"))
        .content_type(json_type)
        .json(
            json!({ "errors": [{ "message": message, "extensions": { "code": "UNAUTHORIZED" } }] }),
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
        Ok(body) => body,
        Err(BodyError::TooLarge(limit)) => {
            return request_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("the request body exceeds {limit} bytes"),
                json_type,
            )
        }
        Err(BodyError::Unreadable) => {
            return request_error(
                StatusCode::BAD_REQUEST,
                "the request body could not be read",
                json_type,
            )
        }
    };
    let batch: BatchRequest = match serde_json::from_slice(&body) {
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

#[derive(serde::Deserialize)]
struct GetParams {
    query: Option<String>,
    #[serde(rename = "operationName")]
    operation_name: Option<String>,
    variables: Option<String>,
    extensions: Option<String>,
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
        Err(message) => request_error(StatusCode::BAD_REQUEST, &message, json_type),
    }
}

/// The GraphQL request of a GET: `?query=&variables=&operationName=&extensions=`,
/// `variables` and `extensions` JSON objects. `Err` says what is wrong.
pub(crate) fn request_from_query(query_string: &str) -> Result<Request, String> {
    let params: GetParams = web::Query::<GetParams>::from_query(query_string)
        .map_err(|e| format!("bad query string: {e}"))?
        .into_inner();
    let query = params.query.ok_or("the `query` parameter is required")?;
    let mut request = Request::new(query);
    if let Some(name) = params.operation_name.filter(|n| !n.is_empty()) {
        request = request.operation_name(name);
    }
    if let Some(vars) = params.variables.filter(|v| !v.is_empty()) {
        match serde_json::from_str::<serde_json::Value>(&vars) {
            Ok(v @ serde_json::Value::Object(_)) => {
                request = request.variables(async_graphql::Variables::from_json(v));
            }
            _ => return Err("`variables` must be a JSON object".into()),
        }
    }
    if let Some(ext) = params.extensions.filter(|v| !v.is_empty()) {
        if serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&ext).is_err() {
            return Err("`extensions` must be a JSON object".into());
        }
    }
    Ok(request)
}

/// Why a request body was not read.
pub(crate) enum BodyError {
    /// Over this many bytes.
    TooLarge(usize),
    /// The connection failed mid-body.
    Unreadable,
}

/// Reads the whole body, refusing it as soon as it passes `limit` bytes
/// (so an oversized body is never buffered whole).
pub(crate) async fn read_body(
    payload: &mut web::Payload,
    limit: usize,
) -> Result<web::BytesMut, BodyError> {
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|_| BodyError::Unreadable)?;
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The media type of a request's `Content-Type`, lowercased, without parameters.
pub(crate) fn media_type(req: &HttpRequest) -> String {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// The type of the operation `request` would run, if its document parses.
pub fn operation_type(request: &Request) -> Result<OperationType, String> {
    let doc = async_graphql::parser::parse_query(&request.query).map_err(|e| e.to_string())?;
    let op = match (&request.operation_name, &doc.operations) {
        (Some(name), ops) => ops
            .iter()
            .find(|(n, _)| n.map(|n| n.as_str() == name).unwrap_or(false))
            .map(|(_, op)| op.node.ty)
            .ok_or_else(|| format!("unknown operation named \"{name}\""))?,
        (None, ops) => {
            let mut iter = ops.iter();
            match (iter.next(), iter.next()) {
                (Some((_, op)), None) => op.node.ty,
                (Some(_), Some(_)) => {
                    return Err("operationName is required with several operations".into())
                }
                (None, _) => return Err("the document has no operation".into()),
            }
        }
    };
    Ok(op)
}

pub fn operation_label(ty: OperationType) -> &'static str {
    match ty {
        OperationType::Query => "query",
        OperationType::Mutation => "mutation",
        OperationType::Subscription => "subscription",
    }
}

async fn execute(
    state: &AppState,
    req: &HttpRequest,
    batch: BatchRequest,
    method: Method,
    json_type: &'static str,
) -> HttpResponse {
    let principal = match principal_from_header(state, req) {
        Ok(p) => p,
        Err(message) => return unauthorized(&message, json_type),
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
    let batched = requests.len() > 1;
    let mut responses = Vec::with_capacity(requests.len());
    let mut any_request_error = false;
    for request in requests {
        let ty = match operation_type(&request) {
            Ok(ty) => ty,
            Err(message) => {
                state
                    .metrics
                    .graphql_operations_total
                    .with_label_values(&["unknown", "request_error"])
                    .inc();
                if !batched {
                    return request_error(StatusCode::BAD_REQUEST, &message, json_type);
                }
                any_request_error = true;
                responses.push(async_graphql::Response::from_errors(vec![
                    async_graphql::ServerError::new(message, None),
                ]));
                continue;
            }
        };
        if method == Method::GET && ty != OperationType::Query {
            return HttpResponse::MethodNotAllowed()
                .insert_header((header::ALLOW, "POST"))
                .content_type(json_type)
                .json(json!({ "errors": [{ "message": "only queries may be sent with GET; use POST" }] }));
        }
        if ty == OperationType::Subscription {
            state
                .metrics
                .graphql_operations_total
                .with_label_values(&["subscription", "request_error"])
                .inc();
            if !batched {
                return request_error(
                    StatusCode::BAD_REQUEST,
                    "subscriptions are served over WebSocket at /graphql/ws",
                    json_type,
                );
            }
            any_request_error = true;
            responses.push(async_graphql::Response::from_errors(vec![
                async_graphql::ServerError::new(
                    "subscriptions are served over WebSocket at /graphql/ws",
                    None,
                ),
            ]));
            continue;
        }
        let label = operation_label(ty);
        let started = Instant::now();
        let response = state
            .schema
            .execute(request.data(Viewer(principal.clone())))
            .await;
        state
            .metrics
            .graphql_operation_duration_seconds
            .with_label_values(&[label])
            .observe(started.elapsed().as_secs_f64());
        // A response without data failed before execution (parse, validation, limits).
        let outcome = if response.errors.is_empty() {
            "ok"
        } else if is_request_error(&response) {
            any_request_error = true;
            "request_error"
        } else {
            "field_error"
        };
        state
            .metrics
            .graphql_operations_total
            .with_label_values(&[label, outcome])
            .inc();
        responses.push(response);
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

/// A response that failed before execution (parse, validation, limits):
/// errors, no data, and no error tied to a field path. A field error that
/// nulled the whole result still ran, and is answered 200.
pub fn is_request_error(response: &async_graphql::Response) -> bool {
    !response.errors.is_empty()
        && matches!(response.data, async_graphql::Value::Null)
        && response.errors.iter().all(|e| e.path.is_empty())
}
