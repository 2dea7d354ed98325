//! GraphQL over HTTP as a client sees it, plus the domain helpers most
//! tests need (a user with a token, a post).

use reqwest::header::{HeaderMap, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use reqwest::StatusCode;
use serde_json::{json, Value};

use super::node::Node;

pub const GRAPHQL_RESPONSE_JSON: &str = "application/graphql-response+json";

/// A raw HTTP answer: status, headers and the body as text.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as JSON; panics with the body when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "the body is not JSON ({e}); status {}: {}",
                self.status, self.body
            )
        })
    }
}

async fn reply(response: reqwest::Response) -> Reply {
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.text().await.expect("read the response body");
    Reply {
        status,
        headers,
        body,
    }
}

/// `GET path` on the node.
pub async fn get(node: &Node, path: &str) -> Reply {
    let response = node
        .http
        .get(node.http_url(path))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    reply(response).await
}

/// `POST /graphql` with a raw body and content type (None: no header).
pub async fn post_raw(
    node: &Node,
    content_type: Option<&str>,
    body: impl Into<reqwest::Body>,
    token: Option<&str>,
) -> Reply {
    let mut request = node
        .http
        .post(node.http_url("/graphql"))
        .header(ACCEPT, GRAPHQL_RESPONSE_JSON)
        .body(body);
    if let Some(ct) = content_type {
        request = request.header(CONTENT_TYPE, ct);
    }
    if let Some(token) = token {
        request = request.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    reply(request.send().await.expect("POST /graphql")).await
}

/// `POST /graphql` with a JSON body (a request or a batch).
pub async fn post_json(node: &Node, body: &Value, token: Option<&str>) -> Reply {
    post_raw(node, Some("application/json"), body.to_string(), token).await
}

/// `GET /graphql?query=..&variables=..&operationName=..`.
pub async fn get_graphql(
    node: &Node,
    query: &str,
    variables: Option<&Value>,
    operation_name: Option<&str>,
) -> Reply {
    let mut params = vec![("query", query.to_owned())];
    if let Some(v) = variables {
        params.push(("variables", v.to_string()));
    }
    if let Some(name) = operation_name {
        params.push(("operationName", name.to_owned()));
    }
    let response = node
        .http
        .get(node.http_url("/graphql"))
        .header(ACCEPT, GRAPHQL_RESPONSE_JSON)
        .query(&params)
        .send()
        .await
        .expect("GET /graphql");
    reply(response).await
}

/// Runs one operation; asserts HTTP 200 and returns the whole response
/// (`data` and `errors`).
pub async fn gql(node: &Node, query: &str, variables: Value, token: Option<&str>) -> Value {
    let reply = post_json(
        node,
        &json!({ "query": query, "variables": variables }),
        token,
    )
    .await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "operation {query}\nanswered {}: {}",
        reply.status,
        reply.body
    );
    reply.json()
}

/// Runs one operation that must succeed; returns its `data`.
pub async fn gql_ok(node: &Node, query: &str, variables: Value, token: Option<&str>) -> Value {
    let response = gql(node, query, variables, token).await;
    assert!(
        response
            .get("errors")
            .is_none_or(|e| e.as_array().is_some_and(|a| a.is_empty())),
        "operation {query}\nfailed: {response}"
    );
    response["data"].clone()
}

/// A user created through `createUser`, and a token for it.
#[derive(Debug, Clone)]
pub struct TestUser {
    pub id: String,
    pub email: String,
    pub token: String,
}

/// A unique suffix, so that tests sharing nothing still never collide.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

/// Creates a user with a fresh email and signs a token for it.
pub async fn create_user(node: &Node, name: &str) -> TestUser {
    let email = format!(
        "{}@example.com",
        unique(&format!("{}-", name.to_lowercase()))
    );
    let data = gql_ok(
        node,
        "mutation($input: CreateUserInput!) { createUser(input: $input) { user { id email } errors { field message code } } }",
        json!({ "input": { "email": email, "name": name, "password": "correct horse battery staple" } }),
        None,
    )
    .await;
    let payload = &data["createUser"];
    assert!(
        payload["errors"].as_array().is_none_or(|e| e.is_empty()),
        "createUser {email} returned errors: {payload}"
    );
    let id = payload["user"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("createUser has no user id: {payload}"))
        .to_owned();
    let token = super::jwt::token(node.secret(), &id);
    TestUser { id, email, token }
}

/// Creates a post as `token`'s user; returns the post's id.
pub async fn create_post(node: &Node, token: &str, title: &str, content: &str) -> String {
    let data = gql_ok(
        node,
        "mutation($input: CreatePostInput!) { createPost(input: $input) { post { id } errors { field message code } } }",
        json!({ "input": { "title": title, "content": content } }),
        Some(token),
    )
    .await;
    let payload = &data["createPost"];
    payload["post"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("createPost {title:?} returned no post: {payload}"))
        .to_owned()
}

/// The `errors` of a mutation payload, as (code, field) pairs.
pub fn payload_errors(payload: &Value) -> Vec<(String, Option<String>)> {
    payload["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("the payload has no `errors` list: {payload}"))
        .iter()
        .map(|e| {
            (
                e["code"]
                    .as_str()
                    .unwrap_or_else(|| panic!("a UserError without code: {e}"))
                    .to_owned(),
                e["field"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

/// The messages of the top-level GraphQL `errors`, joined (empty if none).
pub fn error_messages(response: &Value) -> String {
    response["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .map(|e| e["message"].as_str().unwrap_or("").to_owned())
                .collect::<Vec<_>>()
                .join(" | ")
        })
        .unwrap_or_default()
}

/// The sum of every sample of `name` in a Prometheus text exposition.
pub fn metric_sum(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            (metric == name)
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}
