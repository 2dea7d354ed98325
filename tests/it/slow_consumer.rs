//! Isolation: one client's misbehaviour (not reading, oversized frames,
//! over-deep documents) costs that client only; everyone else on the node
//! keeps receiving, in order.

use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc;

use crate::common::*;

const POST_CREATED_FULL: &str = "subscription { postCreated { id title content } }";
const CREATE_POST: &str = "mutation($input: CreatePostInput!) { createPost(input: $input) { post { id } errors { code } } }";

#[tokio::test]
async fn a_subscriber_that_stops_reading_is_cut_off_with_1013_and_a_fast_one_gets_every_post_in_order(
) {
    let node = Node::start(&[("SUBGATE__HUB__SUBSCRIBER_QUEUE_CAPACITY", "8")]);
    let author = create_user(&node, "Firehose").await;
    let url = node.ws_url("/graphql/ws");

    let mut fast = GqlWs::connect(&url, TRANSPORT_WS).await;
    // A small receive buffer, so that a client that stops reading backs up
    // after a few messages instead of after megabytes of kernel buffering.
    let mut slow = try_connect(
        &url,
        ConnectOptions {
            subprotocol: Some(TRANSPORT_WS),
            recv_buffer_bytes: Some(4096),
            ..Default::default()
        },
    )
    .await
    .expect("connect the slow client");
    for ws in [&mut fast, &mut slow] {
        ws.init_ack(json!({})).await;
        ws.subscribe("feed", POST_CREATED_FULL, json!({})).await;
    }
    until_live(&mut [&mut fast, &mut slow], "feed", async |n| {
        let title = format!("[warm-up {n}]");
        create_post(&node, &author.token, &title, "").await;
        title
    })
    .await;

    // From here the slow client reads nothing. The fast one reads on its
    // own task and reports every post id, in the order received.
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<Result<String, String>>();
    let reader = tokio::spawn(async move {
        loop {
            match fast.read(Duration::from_secs(60)).await {
                Read::Message(message) => {
                    let id = message["payload"]["data"]["postCreated"]["id"]
                        .as_str()
                        .map(str::to_owned);
                    let report = id.ok_or_else(|| format!("the fast subscriber got {message}"));
                    if seen_tx.send(report).is_err() {
                        return;
                    }
                }
                Read::Closed(code, reason) => {
                    let _ = seen_tx.send(Err(format!(
                        "the fast subscriber was closed: {code} {reason:?}"
                    )));
                    return;
                }
                Read::TimedOut => return,
            }
        }
    });

    // 50 KB posts until the node reports a slow consumer, then 5 more; the
    // fast subscriber must have each one before the next is created (so it
    // is fast by construction and never the one that falls behind).
    let content = "x".repeat(50 * 1024);
    let mut created = Vec::new();
    let mut cut_at = None;
    while cut_at.is_none_or(|at| created.len() < at + 5) {
        assert!(
            created.len() < 400,
            "400 posts of 50 KB (20 MB) to a client that reads nothing, and the node never cut it off"
        );
        let title = format!("big {}", created.len());
        let data = gql_ok(
            &node,
            CREATE_POST,
            json!({ "input": { "title": title, "content": content } }),
            Some(&author.token),
        )
        .await;
        let id = data["createPost"]["post"]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("{data}"))
            .to_owned();
        created.push(id.clone());
        let got = tokio::time::timeout(Duration::from_secs(10), seen_rx.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the fast subscriber did not receive post {} within 10s",
                    created.len()
                )
            })
            .expect("the fast subscriber's reader ended");
        assert_eq!(
            got,
            Ok(id),
            "the fast subscriber's post {} is out of order or missing",
            created.len()
        );
        if cut_at.is_none() {
            let metrics = get(&node, "/metrics").await.body;
            if metric_sum(&metrics, "subgate_slow_consumer_disconnects_total") >= 1.0 {
                cut_at = Some(created.len());
            }
        }
    }
    reader.abort();

    // The slow client finds, after what was already on its way, close 1013;
    // what it did get is a gap-free prefix of what was published.
    let (messages, (code, reason)) = slow.read_until_close(Duration::from_secs(20)).await;
    assert_eq!(
        code, 1013,
        "a cut-off slow consumer is closed with 1013 (reason {reason:?})"
    );
    let got: Vec<String> = messages
        .iter()
        .filter_map(|m| {
            m["payload"]["data"]["postCreated"]["id"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(
        got.len(),
        messages.len(),
        "the slow client got something other than posts: {messages:?}"
    );
    assert!(
        got.len() < created.len(),
        "the slow client got every post, yet was cut off"
    );
    assert_eq!(
        got[..],
        created[..got.len()],
        "the slow client's posts before the cut are not a gap-free prefix"
    );

    // Exactly one subscriber was cut: the slow one.
    let metrics = get(&node, "/metrics").await.body;
    assert_eq!(
        metric_sum(&metrics, "subgate_slow_consumer_disconnects_total"),
        1.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn oversized_frames_and_deep_subscriptions_cost_only_their_own_client() {
    let node = Node::start(&[("SUBGATE__WEBSOCKET__MAX_FRAME_BYTES", "16384")]);
    let author = create_user(&node, "Steady").await;
    let url = node.ws_url("/graphql/ws");

    let mut watcher = GqlWs::connect(&url, TRANSPORT_WS).await;
    watcher.init_ack(json!({})).await;
    watcher
        .subscribe("w", "subscription { postCreated { id title } }", json!({}))
        .await;
    until_live(&mut [&mut watcher], "w", async |n| {
        let title = format!("[warm-up {n}]");
        create_post(&node, &author.token, &title, "").await;
        title
    })
    .await;

    // Depth 11 through a subscription: an `error` for that operation, and
    // the connection carries on.
    let mut deep = GqlWs::connect(&url, TRANSPORT_WS).await;
    deep.init_ack(json!({})).await;
    let eleven = "subscription { postCreated { author { posts(first: 1) { nodes { author { posts(first: 1) { nodes { author { posts(first: 1) { nodes { id } } } } } } } } } } }";
    deep.subscribe("too-deep", eleven, json!({})).await;
    let refusal = deep.next_message(Duration::from_secs(5)).await;
    assert_eq!(
        refusal["type"], "error",
        "a depth-11 subscription gets an `error` message: {refusal}"
    );
    assert_eq!(refusal["id"], "too-deep", "{refusal}");
    let text = refusal["payload"].to_string().to_lowercase();
    assert!(
        text.contains("deep") || text.contains("depth"),
        "the error must say why: {refusal}"
    );
    deep.ping_pong().await;
    let ten = "subscription { postCreated { title author { posts(first: 1) { nodes { author { posts(first: 1) { nodes { author { id } } } } } } } } }";
    deep.subscribe("ok", ten, json!({})).await;

    // A frame over the limit closes its own connection with 1009...
    let mut oversized = GqlWs::connect(&url, TRANSPORT_WS).await;
    oversized.init_ack(json!({})).await;
    oversized
        .send_json(json!({ "type": "ping", "payload": { "pad": "x".repeat(32 * 1024) } }))
        .await;
    let (code, reason) = oversized.expect_close(Duration::from_secs(5)).await;
    assert_eq!(
        code, 1009,
        "a 32 KB frame over a 16 KB limit (reason {reason:?})"
    );
    // ...while one just under the limit is fine.
    watcher
        .send_json(json!({ "type": "ping", "payload": { "pad": "x".repeat(15 * 1024) } }))
        .await;
    let pong = watcher.next_message(Duration::from_secs(5)).await;
    assert_eq!(
        pong["type"], "pong",
        "a 15 KB frame under a 16 KB limit: {pong}"
    );

    // Everyone else still receives.
    until_live(&mut [&mut deep], "ok", async |n| {
        let title = format!("[deep warm-up {n}]");
        create_post(&node, &author.token, &title, "").await;
        title
    })
    .await;
    let post_id = create_post(&node, &author.token, "after the trouble", "").await;
    loop {
        let payload = watcher.next_data("w", Duration::from_secs(5)).await;
        if payload["data"]["postCreated"]["id"] == post_id.as_str() {
            break;
        }
        // Only the deep client's warm-up posts may come first.
        let title = payload["data"]["postCreated"]["title"]
            .as_str()
            .unwrap_or("");
        assert!(
            title.starts_with("[deep warm-up"),
            "unexpected post for the watcher: {payload}"
        );
    }
    let payload = deep.next_data("ok", Duration::from_secs(5)).await;
    assert_eq!(
        payload["data"]["postCreated"]["author"]["posts"]["nodes"][0]["author"]["posts"]["nodes"]
            [0]["author"]["id"],
        author.id.as_str()
    );
}
