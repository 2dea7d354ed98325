//! What every GraphQL transport (HTTP, both WebSocket protocols, SSE) says
//! about one operation: the request of a GET, its type before it runs, and
//! the labels it is counted under in `subgate_graphql_operations_total`.

use actix_web::web;
use async_graphql::parser::types::{ExecutableDocument, OperationType};
use async_graphql::{Request, Response};

use crate::error::ErrorCode;
use crate::graphql::document::{count_tokens, describe_parse_error, TooManyTokens};
use crate::graphql::limits::{parse_large, LARGE_DOCUMENT_TOKENS};
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
}

impl OperationError {
    /// The `extensions.code` of the refusal, where it has one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            OperationError::TooManyTokens(_) => Some(ErrorCode::TooManyTokens),
            _ => None,
        }
    }
}

/// The type of the operation `request` would run, if its document holds at
/// most `max_tokens` tokens (counted first: a larger one is not parsed) and
/// parses. The parsed document is kept in `request`, so that the schema
/// does not parse it again.
pub fn operation_type(
    request: &mut Request,
    max_tokens: usize,
) -> Result<OperationType, OperationError> {
    count_tokens(&request.query, max_tokens)?;
    let doc = async_graphql::parser::parse_query(&request.query);
    kept_operation_type(request, doc)
}

/// [`operation_type`] for the transports that may wait: a large document
/// is parsed off the worker ([`parse_large`]). A request whose type cannot
/// be told is counted as `{type="unknown", outcome="request_error"}`.
pub(crate) async fn counted_operation_type(
    request: &mut Request,
    max_tokens: usize,
    metrics: &Metrics,
) -> Result<OperationType, OperationError> {
    let told = async {
        let tokens = count_tokens(&request.query, max_tokens)?;
        let doc = if tokens > LARGE_DOCUMENT_TOKENS {
            parse_large(&request.query).await
        } else {
            async_graphql::parser::parse_query(&request.query)
        };
        kept_operation_type(request, doc)
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
    let op = match (&request.operation_name, &doc.operations) {
        (Some(name), ops) => ops
            .iter()
            .find(|(n, _)| n.map(|n| n.as_str() == name).unwrap_or(false))
            .map(|(_, op)| op.node.ty)
            .ok_or_else(|| OperationError::UnknownName(name.clone()))?,
        (None, ops) => {
            let mut iter = ops.iter();
            match (iter.next(), iter.next()) {
                (Some((_, op)), None) => op.node.ty,
                (Some(_), Some(_)) => return Err(OperationError::NameRequired),
                (None, _) => return Err(OperationError::NoOperation),
            }
        }
    };
    request.set_parsed_query(doc);
    Ok(op)
}

/// The `type` label of an operation.
pub fn operation_label(ty: OperationType) -> &'static str {
    match ty {
        OperationType::Query => "query",
        OperationType::Mutation => "mutation",
        OperationType::Subscription => "subscription",
    }
}

/// A response that failed before execution (parse, validation, limits):
/// errors, no data, and no error tied to a field path. A field error that
/// nulled the whole result still ran, and is answered 200.
pub fn is_request_error(response: &Response) -> bool {
    !response.errors.is_empty()
        && matches!(response.data, async_graphql::Value::Null)
        && response.errors.iter().all(|e| e.path.is_empty())
}

/// The `outcome` label of an operation, decided by its first result:
/// `request_error` (it never ran), `field_error` or `ok`.
pub fn outcome(response: &Response) -> &'static str {
    if is_request_error(response) {
        "request_error"
    } else if response.errors.is_empty() {
        "ok"
    } else {
        "field_error"
    }
}
