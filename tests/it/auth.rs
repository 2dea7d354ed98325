//! Every kind of bad token is refused, on HTTP (401) and on WebSocket
//! (4403), and good tokens in every accepted form are not.

use std::time::Duration;

use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn bad_tokens_are_refused_over_http_with_401() {
    let node = Node::start(&[]);
    let query = json!({ "query": "{ __typename }" });

    // The control: a good token passes, so a 401 below means the token.
    let good = token(node.secret(), "user-1");
    let reply = post_json(&node, &query, Some(&good)).await;
    assert_eq!(reply.status, StatusCode::OK, "a good token: {}", reply.body);

    for (what, bad) in bad_tokens(node.secret(), "user-1") {
        let reply = post_json(&node, &query, Some(&bad)).await;
        assert_eq!(
            reply.status,
            StatusCode::UNAUTHORIZED,
            "a token that is {what} must be 401: {}",
            reply.body
        );
        assert!(
            reply
                .header("www-authenticate")
                .is_some_and(|v| v.starts_with("Bearer")),
            "a 401 names the scheme ({what}): {:?}",
            reply.headers
        );
        let body = reply.json();
        assert!(
            !error_messages(&body).is_empty(),
            "a 401 says why ({what}): {}",
            reply.body
        );
        assert!(
            !reply.body.contains(&bad),
            "the refusal must not echo the token ({what})"
        );
    }
    // Over GET too.
    let (what, bad) = bad_tokens(node.secret(), "user-1").remove(0);
    let reply = node
        .http
        .get(node.http_url("/graphql?query=%7B__typename%7D"))
        .header("authorization", format!("Bearer {bad}"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        reply.status(),
        StatusCode::UNAUTHORIZED,
        "GET with a token that is {what}"
    );

    // Headers that are not a bearer token at all.
    for header in ["Basic dXNlcjpwYXNz", "Bearer", "Bearer    ", good.as_str()] {
        let reply = node
            .http
            .post(node.http_url("/graphql"))
            .header("content-type", "application/json")
            .header("authorization", header)
            .body(query.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(
            reply.status(),
            StatusCode::UNAUTHORIZED,
            "Authorization: {header:?} must be 401"
        );
    }

    // Tokens never reach the logs.
    let log = node.stderr_text();
    for (what, bad) in bad_tokens(node.secret(), "user-1") {
        if bad.len() > 20 {
            assert!(!log.contains(&bad), "a token ({what}) was logged:\n{log}");
        }
    }
    assert!(!log.contains(&good), "a good token was logged:\n{log}");
}

/// Opens a graphql-transport-ws connection, sends `connection_init` with
/// `payload`, and returns the first thing the server answers:
/// `Ok(message)` or `Err((close code, reason))`.
async fn init_with(
    url: String,
    payload: serde_json::Value,
) -> Result<serde_json::Value, (u16, String)> {
    let mut ws = GqlWs::connect(&url, TRANSPORT_WS).await;
    ws.connection_init(payload).await;
    match ws.read(Duration::from_secs(5)).await {
        Read::Message(message) => Ok(message),
        Read::Closed(code, reason) => Err((code, reason)),
        Read::TimedOut => panic!("no answer to connection_init within 5s"),
    }
}

#[tokio::test]
async fn bad_tokens_are_refused_over_websocket_with_4403() {
    let node = Node::start(&[]);
    let url = node.ws_url("/graphql/ws");
    let good = token(node.secret(), "user-1");

    // Both accepted forms, with a good token: acknowledged.
    for payload in [
        json!({ "authorization": format!("Bearer {good}") }),
        json!({ "token": good }),
    ] {
        let answer = init_with(url.clone(), payload.clone()).await;
        assert!(
            answer.as_ref().is_ok_and(|m| m["type"] == "connection_ack"),
            "connection_init {payload} with a good token: {answer:?}"
        );
    }

    // Every bad token, in both forms, at once.
    let cases: Vec<(String, serde_json::Value)> = bad_tokens(node.secret(), "user-1")
        .into_iter()
        .flat_map(|(what, bad)| {
            [
                (
                    format!("{what} (authorization)"),
                    json!({ "authorization": format!("Bearer {bad}") }),
                ),
                (format!("{what} (token)"), json!({ "token": bad })),
            ]
        })
        .collect();
    let answers = join_all(
        cases
            .iter()
            .map(|(_, payload)| init_with(url.clone(), payload.clone())),
    )
    .await;
    let wrong: Vec<String> = cases
        .iter()
        .zip(answers)
        .filter_map(|((what, _), answer)| match answer {
            Err((4403, _)) => None,
            other => Some(format!("{what}: expected close 4403, got {other:?}")),
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "bad tokens not refused with 4403:\n{}",
        wrong.join("\n")
    );
}

/// Connects to `/ws` with `?token=` and reads the greeting up to
/// `auth.success`.
async fn envelope_client(node: &Node, token: &str) -> GqlWs {
    let url = node.ws_url(&format!("/ws?token={token}"));
    let mut ws = try_connect(&url, ConnectOptions::default())
        .await
        .expect("the /ws upgrade");
    for kind in ["connection.established", "auth.success"] {
        let m = ws.next_message(Duration::from_secs(5)).await;
        assert_eq!(m["type"], kind, "{m}");
    }
    ws
}

#[tokio::test]
async fn a_token_that_expires_ends_the_connections_it_opened_on_every_transport() {
    use crate::common::jwt::{now, sign};
    let node = publisher_node(&[]);
    let lifetime = 4;
    let short = sign(
        jsonwebtoken::Algorithm::HS256,
        &json!({ "sub": "carol", "exp": now() + lifetime }),
        node.secret(),
    );
    let fresh = token(node.secret(), "carol");
    let topic = "notifications:carol";

    let mut gql = GqlWs::connect(&node.ws_url("/graphql/ws"), TRANSPORT_WS).await;
    gql.init_ack(json!({ "token": short })).await;
    gql.subscribe(
        "n",
        &format!("subscription {{ events(topics: [\"{topic}\"]) {{ id }} }}"),
        json!({}),
    )
    .await;
    let mut sse = open_stream(
        &node,
        &format!("/api/v1/events/stream?topic={topic}&token={short}"),
        &[],
    )
    .await
    .expect("the stream opens with a valid token");
    let mut envelope = envelope_client(&node, &short).await;
    // Another /ws connection sends a fresh token of the same user in time.
    let mut refreshed = envelope_client(&node, &short).await;
    refreshed
        .send_json(json!({ "type": "auth", "payload": { "token": fresh } }))
        .await;
    let m = refreshed.next_message(Duration::from_secs(5)).await;
    assert_eq!(m["type"], "auth.success", "{m}");

    // While the token counts, events arrive.
    until_live(&mut [&mut gql], "n", async |n| {
        publish(&node, topic, "note", json!({ "n": n })).await
    })
    .await;
    let seen = sse.next_event(Duration::from_secs(5)).await;
    assert_eq!(seen.event(), Some("note"), "{seen:?}");

    // At the expiry every connection the token opened ends, each as its
    // protocol says; nothing more is delivered.
    let (_, (code, reason)) = gql
        .read_until_close(Duration::from_secs(lifetime as u64 + 4))
        .await;
    assert_eq!(
        (code, reason.as_str()),
        (4403, "Forbidden: token expired"),
        "graphql-transport-ws"
    );
    let blocks = sse.until_ended(Duration::from_secs(5)).await;
    let last = blocks.iter().rev().find(|b| b.dispatches());
    assert_eq!(
        last.and_then(|b| b.event()),
        Some("auth.expired"),
        "the SSE stream says why it ends: {blocks:?}"
    );
    let (messages, (code, _)) = envelope.read_until_close(Duration::from_secs(5)).await;
    assert_eq!(code, 4401, "/ws closes with 4401: {messages:?}");
    assert!(
        messages.iter().any(|m| m["type"] == "auth.expired"),
        "/ws says auth.expired first: {messages:?}"
    );
    // The refreshed connection lives on.
    refreshed.send_json(json!({ "type": "ping" })).await;
    let pong = refreshed.next_message(Duration::from_secs(5)).await;
    assert_eq!(pong["type"], "pong", "{pong}");
    // And the expired token opens nothing new.
    let again = open_stream(
        &node,
        &format!("/api/v1/events/stream?topic={topic}&token={short}"),
        &[],
    )
    .await;
    assert!(
        again.is_err_and(|reply| reply.status == StatusCode::UNAUTHORIZED),
        "an expired token opens no stream"
    );
}
