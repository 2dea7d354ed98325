//! GraphQL over Server-Sent Events at `/graphql/stream`, the graphql-sse
//! protocol's "distinct connections mode": one request, one operation, one
//! event stream.
//!
//! - `POST` with `Content-Type: application/json` (one request, not a
//!   batch), or `GET` with `?query=&variables=&operationName=` for queries
//!   and subscriptions (a mutation over GET is 405); `Accept` must allow
//!   `text/event-stream` (406 otherwise).
//! - Authentication: `Authorization: Bearer T` (401 when it does not
//!   verify).
//! - Refused before the stream starts, as JSON: a body or query string that
//!   is not a GraphQL request, a document that does not parse (400), a body
//!   over `server.max_body_bytes` (413), a form-like content type (415), a
//!   foreign `Origin` (403), admission (503).
//! - The stream: `event: next` / `data: <ExecutionResult>` for every
//!   result, then `event: complete` when the operation is over. As the
//!   protocol requires, a document that parses but fails validation (or
//!   the schema's limits) is reported in the stream, as a `next` carrying
//!   the errors, then `complete`: an `EventSource` could not read a 400's
//!   body.
//! - Subscriptions run with the caller's [`Viewer`], the stream's
//!   [`Cutoff`] and [`TransportLabel`] `graphql_sse`. A stream that falls
//!   behind is cut off and ends without `complete`, as does every stream
//!   when the node drains: the client retries.
//! - A quiet stream gets a comment line every `sse.heartbeat_seconds`, with
//!   no blank line after it, and no `retry:` field is ever sent: clients of
//!   this protocol parse the stream themselves, and some treat a field-less
//!   blank line or `retry:` as an error.

use std::time::Instant;

use actix_web::http::{header, Method, StatusCode};
use actix_web::web::{self, Bytes};
use actix_web::{HttpRequest, HttpResponse};
use async_graphql::parser::types::OperationType;
use async_graphql::{Request, Response};
use futures_util::stream::{self, StreamExt};
use serde_json::json;

use crate::error::ErrorCode;
use crate::graphql::groups::{own_results, Membership, Output};
use crate::graphql::limits::{decode_body, is_large};
use crate::graphql::subscription::TransportLabel;
use crate::graphql::{ClientAddr, Viewer};
use crate::hub::Cutoff;
use crate::state::AppState;
use crate::telemetry::metrics::{transport, GaugeGuard, Metrics};
use crate::transport::admission::{Gate, Opening};
use crate::transport::graphql_error;
use crate::transport::operation::{
    counted_operation_type, operation_label, outcome, request_from_query,
};
use crate::transport::request::{bare_media_type, media_type, read_body};
use crate::transport::streaming::{frame, Streaming};

/// The heartbeat: a comment line alone (see the module docs for why).
const PING: &[u8] = b": ping\n";

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/graphql/stream")
            .route(web::post().to(stream))
            .route(web::get().to(stream)),
    );
}

/// A request refused before streaming, in the GraphQL error shape.
fn refuse(status: StatusCode, code: Option<ErrorCode>, message: &str) -> HttpResponse {
    let mut response = graphql_error(status, code, message);
    if status == StatusCode::METHOD_NOT_ALLOWED {
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
    }
    response
}

/// Whether the client takes an event stream: `Accept` absent, or naming
/// `text/event-stream`, `text/*` or `*/*`.
fn accepts_event_stream(req: &HttpRequest) -> bool {
    let Some(accept) = req.headers().get(header::ACCEPT) else {
        return true;
    };
    let Ok(accept) = accept.to_str() else {
        return false;
    };
    accept.split(',').any(|range| {
        matches!(
            bare_media_type(range).as_str(),
            "text/event-stream" | "text/*" | "*/*"
        )
    })
}

/// Both routes: the same screening, then the request from the body (POST)
/// or from the query string (GET).
async fn stream(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> HttpResponse {
    // Checked before the body is read: a refused request costs no buffering.
    let gate = match precheck(&state, &req) {
        Ok(gate) => gate,
        Err(refusal) => return *refusal,
    };
    let method = req.method().clone();
    let request = if method == Method::GET {
        request_from_query(req.query_string())
            .map_err(|bad| refuse(StatusCode::BAD_REQUEST, None, &bad.to_string()))
    } else {
        posted_request(&state, &req, payload).await
    };
    match request {
        Ok(request) => stream_operation(&state, &req, gate, request, method).await,
        Err(refusal) => refusal,
    }
}

/// The one GraphQL request a POST carries as JSON.
async fn posted_request(
    state: &AppState,
    req: &HttpRequest,
    mut payload: web::Payload,
) -> Result<Request, HttpResponse> {
    if media_type(req) != "application/json" {
        return Err(refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            None,
            "POST /graphql/stream takes Content-Type: application/json",
        ));
    }
    let body = read_body(&mut payload, state.settings.server.max_body_bytes)
        .await
        .map_err(|e| refuse(e.status(), None, &e.to_string()))?
        .freeze();
    decode_body::<Request>(body).await.map_err(|e| {
        refuse(
            StatusCode::BAD_REQUEST,
            None,
            &format!("the body is not one GraphQL request: {e}"),
        )
    })
}

/// What refuses a request whatever it asks: `Accept`, then the gate's
/// screening (`Origin`, the drain). The refusal is boxed: a response is
/// large and the common case is to pass.
fn precheck<'a>(state: &'a AppState, req: &HttpRequest) -> Result<Gate<'a>, Box<HttpResponse>> {
    if !accepts_event_stream(req) {
        return Err(Box::new(refuse(
            StatusCode::NOT_ACCEPTABLE,
            None,
            "/graphql/stream answers with text/event-stream",
        )));
    }
    Gate::screen(state, req.headers(), Opening::EventStream)
        .map_err(|refusal| Box::new(refusal.graphql_response()))
}

async fn stream_operation(
    state: &AppState,
    req: &HttpRequest,
    gate: Gate<'_>,
    mut request: Request,
    method: Method,
) -> HttpResponse {
    let principal = match state.auth.from_header(req.headers()) {
        Ok(principal) => principal,
        Err(message) => {
            return refuse(
                StatusCode::UNAUTHORIZED,
                Some(ErrorCode::Unauthorized),
                &message.to_string(),
            )
        }
    };
    let ty = match counted_operation_type(
        &state.schema,
        &mut request,
        state.settings.graphql.max_tokens,
        &state.metrics,
    )
    .await
    {
        Ok(ty) => ty,
        Err(unknown) => {
            let mut refused = HttpResponse::build(unknown.status());
            if unknown.status() == StatusCode::TOO_MANY_REQUESTS {
                refused.insert_header((header::RETRY_AFTER, "1"));
            }
            return refused.json(serde_json::json!({ "errors": [unknown.server_error()] }));
        }
    };
    if method == Method::GET && ty == OperationType::Mutation {
        return refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            None,
            "mutations cannot be sent with GET; use POST",
        );
    }
    let drain = match gate
        .admit_as(principal.as_ref().map(|p| p.user_id.as_str()))
        .await
    {
        Ok(drain) => drain,
        Err(refusal) => return refusal.graphql_response(),
    };
    let cutoff = Cutoff::new();
    let expires_at = principal.as_ref().and_then(|p| p.expires_at);
    let member = principal.clone();
    let request = request
        .data(Viewer(principal))
        .data(ClientAddr(crate::transport::request::client_of(
            req,
            &state.settings,
        )))
        .data(cutoff.clone())
        .data(TransportLabel(transport::GRAPHQL_SSE));
    let held = (ty == OperationType::Subscription)
        .then(|| {
            GaugeGuard::new(
                state
                    .metrics
                    .subscriptions
                    .with_label_values(&[transport::GRAPHQL_SSE]),
            )
        })
        .into_iter()
        .collect();
    let mut outcome = Outcome::new(state.metrics.clone(), ty);
    let subscription = ty == OperationType::Subscription;
    let results = if subscription && !is_large(&request.query) {
        // Shared with the identical subscriptions on the node.
        let membership = Membership {
            transport: transport::GRAPHQL_SSE,
            cutoff: cutoff.clone(),
        };
        state.groups.subscribe(request, member, membership)
    } else {
        own_results(
            state.schema.execute_stream(request),
            subscription,
            &state.metrics,
        )
    };
    let metrics = state.metrics.clone();
    let results = results.map(move |output| match output {
        Output::Own(response) => {
            outcome.result(&response);
            next(&response)
        }
        Output::Shared(shared) => {
            outcome.counted(shared.outcome);
            if let Some(published_at) = shared.published_at_ms {
                metrics.delivered(transport::GRAPHQL_SSE, published_at);
            }
            shared.common_frame(|json| frame::event("next", None, json))
        }
    });
    let frames = results
        .chain(stream::once(async {
            Bytes::from_static(b"event: complete\ndata: \n\n")
        }))
        .boxed();
    // An expired token ends the operation as a failed one would: an error
    // result, then `complete`.
    let expired = json!({ "errors": [{
        "message": "the token has expired: reconnect with a fresh one",
        "extensions": { "code": ErrorCode::Unauthorized.as_str() },
    }] });
    let farewell = [
        frame::event("next", None, &expired.to_string()),
        Bytes::from_static(b"event: complete\ndata: \n\n"),
    ]
    .concat();
    Streaming::new(state, transport::GRAPHQL_SSE, PING, cutoff, drain, held)
        .expiring(expires_at, Bytes::from(farewell))
        .respond(Vec::new(), frames)
}

/// `event: next` with one execution result.
fn next(response: &Response) -> Bytes {
    match serde_json::to_string(response) {
        Ok(json) => frame::event("next", None, &json),
        // A result holds only JSON values; should one still not encode,
        // the client hears about it rather than silence.
        Err(e) => frame::event(
            "next",
            None,
            &json!({ "errors": [{ "message": format!("the result could not be encoded: {e}") }] })
                .to_string(),
        ),
    }
}

/// Counts one operation in `graphql_operations_total{type,outcome}` once,
/// by its first result (as the WebSocket transports do): `request_error`,
/// `field_error` or `ok`; `cancelled` when the stream ended before any.
struct Outcome {
    metrics: std::sync::Arc<Metrics>,
    label: &'static str,
    started: Instant,
    counted: bool,
}

impl Outcome {
    fn new(metrics: std::sync::Arc<Metrics>, ty: OperationType) -> Self {
        Self {
            metrics,
            label: operation_label(ty),
            started: Instant::now(),
            counted: false,
        }
    }

    fn result(&mut self, response: &Response) {
        self.counted(outcome(response));
    }

    /// Counts the first result, whose outcome label is `outcome`.
    fn counted(&mut self, outcome: &'static str) {
        if self.counted {
            return;
        }
        self.counted = true;
        self.metrics
            .graphql_operations_total
            .with_label_values(&[self.label, outcome])
            .inc();
        // A subscription's first result waits for its first event: only
        // queries and mutations have an execution time worth the name.
        if self.label != "subscription" {
            self.metrics
                .graphql_operation_duration_seconds
                .with_label_values(&[self.label])
                .observe(self.started.elapsed().as_secs_f64());
        }
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        if !self.counted {
            self.metrics
                .graphql_operations_total
                .with_label_values(&[self.label, "cancelled"])
                .inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    #[test]
    fn accept_must_allow_an_event_stream() {
        let with = |accept: Option<&str>| {
            let mut req = TestRequest::default();
            if let Some(accept) = accept {
                req = req.insert_header((header::ACCEPT, accept));
            }
            accepts_event_stream(&req.to_http_request())
        };
        assert!(with(None));
        assert!(with(Some("text/event-stream")));
        assert!(with(Some("application/json, text/event-stream;q=0.9")));
        assert!(with(Some("*/*")));
        assert!(!with(Some("application/json")));
        assert!(!with(Some("application/graphql-response+json")));
    }

    #[test]
    fn results_are_next_events() {
        let response =
            Response::new(async_graphql::Value::from_json(json!({"hello": "world"})).unwrap());
        assert_eq!(
            String::from_utf8(next(&response).to_vec()).unwrap(),
            "event: next\ndata: {\"data\":{\"hello\":\"world\"}}\n\n"
        );
    }
}
