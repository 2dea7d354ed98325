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

/// [`operation_type`], counting a request whose type cannot be told as
/// `{type="unknown", outcome="request_error"}`.
pub(crate) fn counted_operation_type(
    request: &Request,
    metrics: &Metrics,
) -> Result<OperationType, String> {
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
