//! Hostile or careless input, as the node must take it: documents too large
//! to parse, syntax errors in huge documents, publishers forging the node's
//! own event types; and the metrics of each WebSocket protocol.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::*;

/// About 665 KB: `me { id }` selected 66,500 times, 200,000 tokens.
fn huge_document() -> String {
    format!("{{ {}}}", "me { id } ".repeat(66_500))
}

/// About 15,000 tokens, within `graphql.max_tokens`: `me { id }` selected
/// 2,990 times. It parses, and validation refuses it as too complex: most
/// of a second of CPU in a debug build, about 15 ms in a release one.
fn large_document() -> String {
    format!("{{ {}}}", "me { id } ".repeat(2_990))
}

/// A large (about 2,700 tokens) and valid selection set of little
/// complexity: each of `fields` selected 70 times, each time in an inline
/// fragment with two directives that keep it.
fn large_valid_selection(fields: &[&str]) -> String {
    let selections: String = (0..70)
        .flat_map(|_| fields.iter())
        .map(|field| format!("... @skip(if: false) @include(if: true) {{ {field} }} "))
        .collect();
    format!("{{ {selections}}}")
}

/// The `extensions.code` of every error in a GraphQL response.
fn codes(response: &Value) -> Vec<String> {
    response["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .map(|e| e["extensions"]["code"].as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// One sample of `name{label="value"}` in a Prometheus exposition (0 when absent).
fn sample(exposition: &str, name: &str, label: &str, value: &str) -> f64 {
    let series = format!("{name}{{{label}=\"{value}\"}}");
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(&series))
        .and_then(|rest| rest.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn twenty_huge_documents_are_refused_at_once_while_health_checks_answer() {
    let node = Node::start(&[]);
    let document = json!({ "query": huge_document() }).to_string();
    assert!(document.len() > 600_000 && document.len() < 1024 * 1024);

    let prober = HealthProber::start(node.http_url("/healthz"), None);
    let started = Instant::now();
    let replies = join_all(
        (0..20).map(|_| post_raw(&node, Some("application/json"), document.clone(), None)),
    )
    .await;
    let all_refused_in = started.elapsed();
    let probed = prober.stop();

    for reply in &replies {
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
        let body = reply.json();
        assert_eq!(codes(&body), ["TOO_MANY_TOKENS"], "{body}");
        assert!(
            error_messages(&body).contains("at most 15000"),
            "the refusal names the limit: {body}"
        );
        assert!(reply.body.len() < 1_000, "a short refusal: {}", reply.body);
    }
    // Parsing and validating one such document took most of a second of
    // CPU; counting its tokens takes microseconds. Twenty of them, sent
    // over 20 connections of a debug build on a shared machine, in well
    // under two seconds.
    assert!(
        all_refused_in < Duration::from_secs(2),
        "20 huge documents took {all_refused_in:?} to refuse"
    );
    assert!(
        probed.slowest < Duration::from_millis(100) && probed.failed == 0,
        "/healthz while the documents were refused: {probed:?}"
    );

    // A normal query still works.
    let user = create_user(&node, "Tokens").await;
    let me = gql_ok(&node, "{ me { id } }", json!({}), Some(&user.token)).await;
    assert_eq!(me["me"]["id"], user.id.as_str());
}

#[tokio::test]
async fn large_documents_are_checked_off_the_workers_and_the_excess_is_refused() {
    let node = Node::start(&[]);
    let user = create_user(&node, "Large").await;
    // A large valid document runs as any other.
    let query = format!("{{ me {} }}", large_valid_selection(&["id", "name"]));
    let me = gql_ok(&node, &query, json!({}), Some(&user.token)).await;
    assert_eq!(me["me"]["id"], user.id.as_str(), "{me}");

    // Eighty at once: one is checked at a time, 32 wait their turn, the
    // rest are refused at once. The workers meanwhile only count tokens.
    let prober = HealthProber::start(node.http_url("/healthz"), None);
    let body = json!({ "query": large_document() }).to_string();
    let replies =
        join_all((0..80).map(|_| post_raw(&node, Some("application/json"), body.clone(), None)))
            .await;
    let probed = prober.stop();
    let (mut checked, mut refused) = (0, 0);
    for reply in &replies {
        let answer = reply.json();
        match reply.status {
            StatusCode::BAD_REQUEST => {
                assert!(error_messages(&answer).contains("too complex"), "{answer}");
                checked += 1;
            }
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(codes(&answer), ["RATE_LIMITED"], "{answer}");
                assert_eq!(answer["errors"][0]["extensions"]["scope"], "large_document");
                assert_eq!(reply.header("retry-after"), Some("1"));
                refused += 1;
            }
            other => panic!("{other}: {answer}"),
        }
    }
    let outcomes = format!("{checked} checked, {refused} refused; /healthz: {probed:?}");
    eprintln!("{outcomes}");
    assert!(checked > 32 && refused > 0, "{outcomes}");
    let exposition = get(&node, "/metrics").await.body;
    assert_eq!(
        sample(
            &exposition,
            "subgate_rate_limited_total",
            "scope",
            "large_document"
        ),
        refused as f64,
        "{outcomes}"
    );
    // The workers only decode the bodies and count tokens: the probes they
    // answer meanwhile are not held up.
    assert!(
        probed.slowest < Duration::from_millis(250) && probed.failed == 0,
        "{outcomes}"
    );
}

#[tokio::test]
async fn a_large_document_on_a_websocket_is_checked_while_the_connection_serves_others() {
    let node = Node::start(&[]);
    let user = create_user(&node, "LargeWs").await;
    let mut ws = GqlWs::connect(&node.ws_url("/graphql"), TRANSPORT_WS).await;
    ws.init_ack(json!({ "token": user.token })).await;

    ws.subscribe("large", &large_document(), json!({})).await;
    ws.subscribe("small", "{ me { id } }", json!({})).await;
    let mut answered = Vec::new();
    // `next` and `complete` for the small one, `error` for the large one.
    while answered.len() < 3 {
        let message = ws.next_message(Duration::from_secs(20)).await;
        answered.push((message["id"].as_str().unwrap_or("").to_owned(), message));
    }
    let order: Vec<_> = answered
        .iter()
        .map(|(id, m)| format!("{id}:{}", m["type"].as_str().unwrap_or("")))
        .collect();
    let (_, error) = answered
        .iter()
        .find(|(id, m)| id == "large" && m["type"] == "error")
        .unwrap_or_else(|| panic!("{order:?}"));
    assert!(error.to_string().contains("too complex"), "{error}");
    let (_, small) = answered
        .iter()
        .find(|(id, m)| id == "small" && m["type"] == "next")
        .unwrap_or_else(|| panic!("{order:?}"));
    assert_eq!(small["payload"]["data"]["me"]["id"], user.id.as_str());
    if cfg!(debug_assertions) {
        // The check takes most of a second unoptimised: the small query,
        // sent after it, is answered before it ends.
        assert_eq!(&order[..2], ["small:next", "small:complete"], "{order:?}");
    }

    // A large valid subscription is checked, then delivers.
    let subscription = format!(
        "subscription {{ postCreated {} }}",
        large_valid_selection(&["id", "title"])
    );
    ws.subscribe("posts", &subscription, json!({})).await;
    let (node_ref, token) = (&node, user.token.clone());
    until_live(&mut [&mut ws], "posts", async |n| {
        create_post(node_ref, &token, &format!("large-{n}"), "body").await
    })
    .await;
}

#[tokio::test]
async fn every_graphql_transport_refuses_a_document_over_the_token_limit() {
    let node = Node::start(&[("SUBGATE__GRAPHQL__MAX_TOKENS", "40")]);
    // 5 + 6 × 6 + 1 = 42 tokens.
    let over = format!("{{ me {{ id }} {}}}", "a: me { id } ".repeat(6));
    let under = "subscription { postCreated { id } }";

    // POST and GET /graphql.
    let post = post_json(&node, &json!({ "query": over }), None).await;
    assert_eq!(post.status, StatusCode::BAD_REQUEST, "{}", post.body);
    assert_eq!(codes(&post.json()), ["TOO_MANY_TOKENS"], "{}", post.body);
    let get = get_graphql(&node, &over, None, None).await;
    assert_eq!(get.status, StatusCode::BAD_REQUEST, "{}", get.body);
    assert_eq!(codes(&get.json()), ["TOO_MANY_TOKENS"], "{}", get.body);

    // A batch: the operation's place holds the refusal, the other runs.
    let batch = post_json(
        &node,
        &json!([{ "query": over }, { "query": "{ __typename }" }]),
        None,
    )
    .await;
    assert_eq!(batch.status, StatusCode::OK, "{}", batch.body);
    let batch = batch.json();
    assert_eq!(codes(&batch[0]), ["TOO_MANY_TOKENS"], "{batch}");
    assert_eq!(batch[1]["data"]["__typename"], "Query", "{batch}");

    // graphql-sse: refused before the stream starts.
    let sse = node
        .http
        .post(node.http_url("/graphql/stream"))
        .header("accept", "text/event-stream")
        .header("content-type", "application/json")
        .body(json!({ "query": over }).to_string())
        .send()
        .await
        .expect("POST /graphql/stream");
    assert_eq!(sse.status(), StatusCode::BAD_REQUEST);
    let body: Value = sse.json().await.expect("a JSON refusal");
    assert_eq!(codes(&body), ["TOO_MANY_TOKENS"], "{body}");

    // Both WebSocket protocols: the operation is refused, the connection
    // stays and runs a document within the limit.
    for protocol in [TRANSPORT_WS, LEGACY_WS] {
        let mut ws = GqlWs::connect(&node.ws_url("/graphql/ws"), protocol).await;
        ws.init_ack(json!({})).await;
        ws.subscribe("1", &over, json!({})).await;
        let refusal = ws.next_message(Duration::from_secs(5)).await;
        assert_eq!(refusal["type"], "error", "{protocol}: {refusal}");
        assert_eq!(refusal["id"], "1", "{protocol}: {refusal}");
        let errors = if protocol == LEGACY_WS {
            refusal["payload"]["errors"].clone()
        } else {
            refusal["payload"].clone()
        };
        assert_eq!(
            errors[0]["extensions"]["code"], "TOO_MANY_TOKENS",
            "{protocol}: {refusal}"
        );
        ws.subscribe("2", under, json!({})).await;
        match ws.read(Duration::from_millis(300)).await {
            Read::TimedOut => {}
            other => panic!("{protocol}: a valid subscription was answered with {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_syntax_error_in_a_megabyte_document_quotes_a_short_window() {
    let node = Node::start(&[]);
    // One line: a 1,000,000-character string argument, then a stray `!`.
    let long = "x".repeat(1_000_000);
    let document = format!("{{ user(id: \"{long}\") {{ id }} ! }}");
    let column = document.find('!').unwrap() + 1;

    let reply = post_json(&node, &json!({ "query": document }), None).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{:.300}", reply.body);
    assert!(
        reply.body.len() < 2_000,
        "the error body is {} bytes: {:.300}…",
        reply.body.len(),
        reply.body
    );
    let message = error_messages(&reply.json());
    assert!(
        message.contains(&format!("line 1, column {column}")),
        "the position is named: {message}"
    );
    assert!(
        message.contains("{ id } !"),
        "the text near it is quoted: {message}"
    );

    // The same over WebSocket, where the schema parses the document.
    let node = Node::start(&[("SUBGATE__WEBSOCKET__MAX_FRAME_BYTES", "2000000")]);
    let mut ws = GqlWs::connect(&node.ws_url("/graphql/ws"), TRANSPORT_WS).await;
    ws.init_ack(json!({})).await;
    ws.subscribe("1", &document, json!({})).await;
    let refusal = ws.next_message(Duration::from_secs(10)).await;
    let text = refusal.to_string();
    assert_eq!(refusal["type"], "error", "{text:.300}");
    assert!(
        text.len() < 2_000,
        "the error is {} bytes: {text:.300}…",
        text.len()
    );
    assert!(text.contains(&format!("column {column}")), "{text}");
}

#[tokio::test]
async fn legacy_graphql_ws_deliveries_are_counted_under_their_own_transport() {
    let node = Node::start(&[]);
    let author = create_user(&node, "Legacy").await;
    let mut ws = GqlWs::connect(&node.ws_url("/graphql/ws"), LEGACY_WS).await;
    ws.init_ack(json!({})).await;
    ws.subscribe("1", "subscription { postCreated { id title } }", json!({}))
        .await;
    until_live(&mut [&mut ws], "1", async |n| {
        let title = format!("[warm-up {n}]");
        create_post(&node, &author.token, &title, "").await;
        title
    })
    .await;
    create_post(&node, &author.token, "counted", "").await;
    let payload = ws.next_data("1", Duration::from_secs(5)).await;
    assert_eq!(payload["data"]["postCreated"]["title"], "counted");

    let metrics = get(&node, "/metrics").await.body;
    let name = "subgate_events_delivered_total";
    assert!(
        sample(&metrics, name, "transport", "graphql_ws_legacy") >= 1.0,
        "no delivery counted for graphql_ws_legacy:\n{metrics}"
    );
    assert_eq!(
        sample(&metrics, name, "transport", "graphql_ws"),
        0.0,
        "legacy deliveries counted as graphql_ws:\n{metrics}"
    );
}

#[tokio::test]
async fn a_publisher_may_not_use_the_nodes_own_event_types() {
    let node = publisher_node(&[]);
    for kind in [
        "gap",
        "auth.success",
        "connection.established",
        "error",
        "pong",
        "message.created",
        "notification.created",
    ] {
        let body = json!({ "topic": "orders", "type": kind, "payload": {} }).to_string();
        let reply = publish_raw(&node, Some(API_KEY), body).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{kind}: {}",
            reply.body
        );
        let body = reply.json();
        assert_eq!(body["error"]["code"], "bad_request", "{kind}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(&format!("\"{kind}\" is a reserved event type"))),
            "{kind}: the refusal says why: {body}"
        );
    }
    // Nothing of them was published: the next event is the topic's first.
    let id = publish(&node, "orders", "acme.gap", json!({ "n": 1 })).await;
    assert!(id.ends_with(":1"), "the first event of the topic: {id}");
}

/// The node's resident memory, from `/proc`.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the node's status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS in /proc/PID/status")
        * 1024
}

#[tokio::test]
async fn consumers_that_stop_reading_large_events_are_cut_off_by_bytes_before_the_event_count() {
    let node = publisher_node(&[("SUBGATE__HUB__SUBSCRIBER_QUEUE_BYTES", "262144")]);
    let reader = create_user(&node, "Reader").await;
    let url = node.ws_url("/graphql/ws");
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut ws = try_connect(
            &url,
            ConnectOptions {
                subprotocol: Some(TRANSPORT_WS),
                recv_buffer_bytes: Some(4096),
                ..Default::default()
            },
        )
        .await
        .expect("connect");
        ws.init_ack(json!({ "token": reader.token })).await;
        ws.subscribe(
            "big",
            r#"subscription { events(topics: ["big"]) { id payload } }"#,
            json!({}),
        )
        .await;
        clients.push(ws);
    }
    let mut all: Vec<&mut GqlWs> = clients.iter_mut().collect();
    until_live(&mut all, "big", async |n| {
        let marker = format!("warm-up-{n}");
        publish(&node, "big", "warm.up", json!({ "marker": marker })).await;
        marker
    })
    .await;
    let before = rss_bytes(node.pid);

    // From here nobody reads. 100 events of 60 KB: far fewer than the 256
    // events a subscriber may have queued, 6 MB each.
    let blob = "x".repeat(60_000);
    let mut peak = before;
    for n in 0..100 {
        publish(&node, "big", "blob", json!({ "n": n, "blob": blob })).await;
        if n % 10 == 9 {
            peak = peak.max(rss_bytes(node.pid));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    peak = peak.max(rss_bytes(node.pid));

    for (i, ws) in clients.iter_mut().enumerate() {
        let (code, reason) = ws.expect_close(Duration::from_secs(30)).await;
        assert_eq!(code, 1013, "client {i} closed with {code} {reason:?}");
    }
    let metrics = get(&node, "/metrics").await.body;
    assert!(
        sample(
            &metrics,
            "subgate_slow_consumer_disconnects_total",
            "transport",
            "graphql_ws"
        ) >= 20.0,
        "{metrics}"
    );
    // Each client may cost about its 256 KiB (plus what the socket layer
    // holds); the events themselves are shared.
    let grown = peak.saturating_sub(before);
    assert!(
        grown < 48 << 20,
        "the node grew by {} MiB for 20 stalled clients",
        grown >> 20
    );
}
