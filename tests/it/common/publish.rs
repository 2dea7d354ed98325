//! `POST /api/v1/publish` as a backend calls it, with the API key every
//! node started through [`publisher_node`] accepts.

use serde_json::{json, Value};

use super::gql::Reply;
use super::node::Node;

/// The API key of [`publisher_node`]s (at least 16 characters, as required).
pub const API_KEY: &str = "it-publish-key-0123456789abcdef";

/// A node that accepts [`API_KEY`], with `env` on top.
pub fn publisher_node(env: &[(&str, &str)]) -> Node {
    let mut all = vec![("SUBGATE__PUBLISH__API_KEYS", API_KEY)];
    all.extend_from_slice(env);
    Node::start(&all)
}

/// `POST /api/v1/publish` with `Authorization: Bearer <bearer>` (none when
/// `None`) and a raw body.
pub async fn publish_raw(
    node: &Node,
    bearer: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> Reply {
    let mut request = node
        .http
        .post(node.http_url("/api/v1/publish"))
        .header("content-type", "application/json")
        .body(body);
    if let Some(bearer) = bearer {
        request = request.header("authorization", format!("Bearer {bearer}"));
    }
    let response = request.send().await.expect("POST /api/v1/publish");
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.text().await.expect("read the publish answer");
    Reply {
        status,
        headers,
        body,
    }
}

/// Publishes with [`API_KEY`]; asserts 202 and returns the event's id.
pub async fn publish(node: &Node, topic: &str, kind: &str, payload: Value) -> String {
    publish_body(
        node,
        &json!({ "topic": topic, "type": kind, "payload": payload }),
    )
    .await
}

/// Publishes `body` with [`API_KEY`]; asserts 202 and returns the event's id.
pub async fn publish_body(node: &Node, body: &Value) -> String {
    let reply = publish_raw(node, Some(API_KEY), body.to_string()).await;
    assert_eq!(
        reply.status,
        reqwest::StatusCode::ACCEPTED,
        "publish {body} answered {}: {}",
        reply.status,
        reply.body
    );
    let answer = reply.json();
    assert_eq!(answer["topic"], body["topic"], "{answer}");
    answer["id"]
        .as_str()
        .unwrap_or_else(|| panic!("a publish answer without id: {answer}"))
        .to_owned()
}
