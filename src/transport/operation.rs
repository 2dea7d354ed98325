//! What every GraphQL transport (HTTP, both WebSocket protocols, SSE) says
//! about one operation: the request of a GET, its type before it runs, and
//! the labels it is counted under in `subgate_graphql_operations_total`.

use actix_web::web;
use async_graphql::parser::types::{ExecutableDocument, OperationType};
use async_graphql::{Executor, Request};

use crate::error::ErrorCode;
use crate::graphql::document::{
    count_tokens, describe_parse_error, scanned_operation_type, TooManyTokens,
};
use crate::graphql::limits::{check_large, is_large, Unchecked};
pub use crate::graphql::{is_request_error, outcome};
use crate::ratelimit::Scope;
use crate::telemetry::metrics::Metrics;

#[derive(serde::Deserialize)]
struct GetParams {
    query: Option<String>,
    #[serde(rename = "operationName")]
    operation_name: Option<String>,
    variables: Option<String>,
    extensions: Option<String>,
}

/// Why a GET's query string is not a GraphQL request.
#[derive(Debug, thiserror::Error)]
pub enum GetRequestError {
    #[error("bad query string: {0}")]
    QueryString(#[from] actix_web::error::QueryPayloadError),
    #[error("the `query` parameter is required")]
    NoQuery,
    #[error("`variables` must be a JSON object")]
    Variables,
    #[error("`extensions` must be a JSON object")]
    Extensions,
}

/// The GraphQL request of a GET: `?query=&variables=&operationName=&extensions=`,
/// `variables` and `extensions` JSON objects.
pub(crate) fn request_from_query(query_string: &str) -> Result<Request, GetRequestError> {
    let params: GetParams = web::Query::<GetParams>::from_query(query_string)?.into_inner();
    let query = params.query.ok_or(GetRequestError::NoQuery)?;
    let mut request = Request::new(query);
    if let Some(name) = params.operation_name.filter(|n| !n.is_empty()) {
        request = request.operation_name(name);
    }
    if let Some(vars) = params.variables.filter(|v| !v.is_empty()) {
        match serde_json::from_str::<serde_json::Value>(&vars) {
            Ok(v @ serde_json::Value::Object(_)) => {
                request = request.variables(async_graphql::Variables::from_json(v));
            }
            _ => return Err(GetRequestError::Variables),
        }
    }
    if let Some(ext) = params.extensions.filter(|v| !v.is_empty()) {
        if serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&ext).is_err() {
            return Err(GetRequestError::Extensions);
        }
    }
    Ok(request)
}

/// Why the operation a request would run cannot be told.
#[derive(Debug, thiserror::Error)]
pub enum OperationError {
    /// More tokens than `graphql.max_tokens`: refused unparsed.
    #[error(transparent)]
    TooManyTokens(#[from] TooManyTokens),
    /// The document does not parse: the parser's message, quoting a short
    /// window around the position rather than the whole line.
    #[error("{0}")]
    Syntax(String),
    #[error("unknown operation named \"{0}\"")]
    UnknownName(String),
    #[error("operationName is required with several operations")]
    NameRequired,
    #[error("the document has no operation")]
    NoOperation,
    /// A large document when as many as the node queues already wait to
    /// be checked (`RATE_LIMITED`, scope `large_document`).
    #[error("{}", Unchecked::Busy.server_error().message)]
    Busy,
    /// The check of a large document did not finish (the node is stopping).
    #[error("{}", Unchecked::Lost.server_error().message)]
    Unchecked,
}

impl OperationError {
    /// The `extensions.code` of the refusal, where it has one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            OperationError::TooManyTokens(_) => Some(ErrorCode::TooManyTokens),
            OperationError::Busy => Some(ErrorCode::RateLimited),
            OperationError::Unchecked => Some(ErrorCode::Unavailable),
            _ => None,
        }
    }

    /// The GraphQL error of the refusal: its message, its code and, for
    /// [`OperationError::Busy`], `scope` and `retryAfterMs` as every
    /// `RATE_LIMITED` error has them.
    pub fn server_error(&self) -> async_graphql::ServerError {
        match self {
            OperationError::Busy => Unchecked::Busy.server_error(),
            OperationError::Unchecked => Unchecked::Lost.server_error(),
            other => {
                let mut error = async_graphql::ServerError::new(other.to_string(), None);
                if let Some(code) = other.code() {
                    let mut extensions = async_graphql::ErrorExtensionValues::default();
                    extensions.set("code", code.as_str());
                    error.extensions = Some(extensions);
                }
                error
            }
        }
    }

    /// The HTTP status of the refusal when it is the whole answer: 429
    /// (with `Retry-After: 1`) for [`OperationError::Busy`], 503 for
    /// [`OperationError::Unchecked`], 400 otherwise.
    pub fn status(&self) -> actix_web::http::StatusCode {
        use actix_web::http::StatusCode;
        match self {
            OperationError::Busy => StatusCode::TOO_MANY_REQUESTS,
            OperationError::Unchecked => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// The type of the operation `request` would run, for the WebSocket
/// protocols (which decide it as a message arrives, on the worker): `None`
/// when the document holds more than `max_tokens` tokens (counted first: a
/// larger one is not parsed) or its type cannot be told. A small document
/// is parsed, and the request keeps it; a large one is not parsed here: its
/// type is read from its tokens ([`scanned_operation_type`]), and it is
/// parsed and validated off the worker before it runs
/// ([`crate::graphql::limits::check_large`]).
pub fn operation_type(request: &mut Request, max_tokens: usize) -> Option<OperationType> {
    count_tokens(&request.query, max_tokens).ok()?;
    if is_large(&request.query) {
        return scanned_operation_type(&request.query, request.operation_name.as_deref());
    }
    let doc = async_graphql::parser::parse_query(&request.query);
    kept_operation_type(request, doc).ok()
}

/// [`operation_type`] for the transports that may wait: a large document
/// is parsed and validated off the worker ([`check_large`], with
/// `executor`'s rules), and the request keeps both. A request whose type
/// cannot be told is counted as `{type="unknown", outcome="request_error"}`.
pub(crate) async fn counted_operation_type<E: Executor>(
    executor: &E,
    request: &mut Request,
    max_tokens: usize,
    metrics: &Metrics,
) -> Result<OperationType, OperationError> {
    let told = async {
        count_tokens(&request.query, max_tokens)?;
        if !is_large(&request.query) {
            let doc = async_graphql::parser::parse_query(&request.query);
            return kept_operation_type(request, doc);
        }
        match check_large(executor, request).await {
            Ok(()) => {}
            Err(Unchecked::Syntax(e)) => return Err(OperationError::Syntax(e.message)),
            Err(Unchecked::Busy) => {
                metrics
                    .rate_limited_total
                    .with_label_values(&[Scope::LargeDocument.as_str()])
                    .inc();
                return Err(OperationError::Busy);
            }
            Err(Unchecked::Lost) => return Err(OperationError::Unchecked),
        }
        // Parsed off the worker: the request holds the document.
        let name = request.operation_name.clone();
        let doc = request
            .parsed_query()
            .map_err(|e| OperationError::Syntax(e.message))?;
        named_operation_type(doc, name.as_deref())
    };
    told.await.inspect_err(|_| {
        metrics
            .graphql_operations_total
            .with_label_values(&["unknown", "request_error"])
            .inc();
    })
}

/// The type of the operation `request` names in `doc`, its parsed document,
/// which the request keeps.
fn kept_operation_type(
    request: &mut Request,
    doc: Result<ExecutableDocument, async_graphql::parser::Error>,
) -> Result<OperationType, OperationError> {
    let doc = doc.map_err(|e| OperationError::Syntax(describe_parse_error(&request.query, &e)))?;
    let op = named_operation_type(&doc, request.operation_name.as_deref())?;
    request.set_parsed_query(doc);
    Ok(op)
}

/// The type of the operation `name` (or the only one) in `doc`.
fn named_operation_type(
    doc: &ExecutableDocument,
    name: Option<&str>,
) -> Result<OperationType, OperationError> {
    match (name, &doc.operations) {
        (Some(name), ops) => ops
            .iter()
            .find(|(n, _)| n.map(|n| n.as_str() == name).unwrap_or(false))
            .map(|(_, op)| op.node.ty)
            .ok_or_else(|| OperationError::UnknownName(name.to_owned())),
        (None, ops) => {
            let mut iter = ops.iter();
            match (iter.next(), iter.next()) {
                (Some((_, op)), None) => Ok(op.node.ty),
                (Some(_), Some(_)) => Err(OperationError::NameRequired),
                (None, _) => Err(OperationError::NoOperation),
            }
        }
    }
}

/// The `type` label of an operation.
pub fn operation_label(ty: OperationType) -> &'static str {
    match ty {
        OperationType::Query => "query",
        OperationType::Mutation => "mutation",
        OperationType::Subscription => "subscription",
    }
}
