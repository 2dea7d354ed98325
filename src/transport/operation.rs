//! What every GraphQL transport (HTTP, both WebSocket protocols, SSE) says
//! about one operation: the request of a GET, its type before it runs, and
//! the labels it is counted under in `subgate_graphql_operations_total`.

use actix_web::web;
use async_graphql::parser::types::OperationType;
use async_graphql::{Request, Response};

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
    /// The document does not parse (the parser's own message).
    #[error("{0}")]
    Syntax(#[from] async_graphql::parser::Error),
    #[error("unknown operation named \"{0}\"")]
    UnknownName(String),
    #[error("operationName is required with several operations")]
    NameRequired,
    #[error("the document has no operation")]
    NoOperation,
}

/// The type of the operation `request` would run, if its document parses.
pub fn operation_type(request: &Request) -> Result<OperationType, OperationError> {
    let doc = async_graphql::parser::parse_query(&request.query)?;
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
    Ok(op)
}

/// [`operation_type`], counting a request whose type cannot be told as
/// `{type="unknown", outcome="request_error"}`.
pub(crate) fn counted_operation_type(
    request: &Request,
    metrics: &Metrics,
) -> Result<OperationType, OperationError> {
    operation_type(request).inspect_err(|_| {
        metrics
            .graphql_operations_total
            .with_label_values(&["unknown", "request_error"])
            .inc();
    })
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
