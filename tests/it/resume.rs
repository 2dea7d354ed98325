//! Resuming GraphQL subscriptions: a client that says where it was gets
//! every event it missed, in order, then the live stream, nothing twice,
//! even on another node of the fleet; a position that cannot be resumed
//! from is said in the stream (`HISTORY_GAP`).

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

const SEND: &str = "mutation($input: SendMessageInput!) { sendMessage(input: $input) { message { id content } errors { code message } } }";
const RECEIVED: &str =
    "subscription($channel: ID!, $after: String) { messageReceived(channelId: $channel, after: $after) { eventId content } }";
const EVENTS: &str = "subscription($topics: [String!]!, $after: String) { events(topics: $topics, after: $after) { id topic type payload } }";
const WAIT: Duration = Duration::from_secs(5);

async fn send(node: &Node, token: &str, channel: &str, content: &str) {
    let reply = gql_ok(
        node,
        SEND,
        json!({ "input": { "channelId": channel, "content": content } }),
        Some(token),
    )
    .await;
    assert_eq!(reply["sendMessage"]["errors"], json!([]), "{reply}");
}

async fn public_channel(node: &Node, token: &str) -> String {
    let reply = gql_ok(
        node,
        "mutation { createChannel(input: { name: \"resume\" }) { channel { id } errors { code } } }",
        json!({}),
        Some(token),
    )
    .await;
    reply["createChannel"]["channel"]["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The next `next` payload for operation `id`: its data, or its errors.
async fn next_result(ws: &mut GqlWs, id: &str) -> Value {
    loop {
        let message = ws.next_message(WAIT).await;
        if message["id"] == id && message["type"] == "next" {
            return message["payload"].clone();
        }
        assert_ne!(message["type"], "error", "{message}");
        assert_ne!(message["type"], "complete", "{message}");
    }
}

#[tokio::test]
async fn a_subscriber_resumes_on_another_node_with_exactly_what_it_missed() {
    a_subscriber_resumes_on_another_node_with_exactly_what_it_missed_on(&TestRedis::start()).await;
}

pub(crate) async fn a_subscriber_resumes_on_another_node_with_exactly_what_it_missed_on(
    bus: &(impl Bus + Sync),
) {
    let nodes: Vec<Node> = bus_fleet::<3>(bus, &[]).into();
    let author = create_user(&nodes[0], "Resumer").await;
    let channel = public_channel(&nodes[0], &author.token).await;

    // Node 1: subscribe and see one message, so there is a position to keep.
    let mut first = GqlWs::connect(&nodes[0].ws_url("/graphql/ws"), TRANSPORT_WS).await;
    first.init_ack(json!({})).await;
    first
        .subscribe("m", RECEIVED, json!({ "channel": channel }))
        .await;
    let mut last_seen = None;
    for attempt in 0..50 {
        send(
            &nodes[1],
            &author.token,
            &channel,
            &format!("warm-up {attempt}"),
        )
        .await;
        if let Read::Message(m) = first.read(Duration::from_millis(200)).await {
            if m["type"] == "next" {
                last_seen = m["payload"]["data"]["messageReceived"]["eventId"]
                    .as_str()
                    .map(str::to_owned);
                break;
            }
        }
    }
    let mut last_seen = last_seen.expect("the subscription never went live");
    // Drain what else the warm-up delivered, keeping the last position.
    while let Read::Message(m) = first.read(Duration::from_millis(300)).await {
        if let Some(id) = m["payload"]["data"]["messageReceived"]["eventId"].as_str() {
            last_seen = id.to_owned();
        }
    }
    drop(first);

    // Missed while away, published on node 2.
    let missed: Vec<String> = (0..5).map(|i| format!("missed {i}")).collect();
    for m in &missed {
        send(&nodes[1], &author.token, &channel, m).await;
    }

    // Resume on node 3: the missed messages in order, then live ones, none twice.
    let mut resumed = GqlWs::connect(&nodes[2].ws_url("/graphql/ws"), TRANSPORT_WS).await;
    resumed.init_ack(json!({})).await;
    resumed
        .subscribe(
            "m",
            RECEIVED,
            json!({ "channel": channel, "after": last_seen }),
        )
        .await;
    let mut got = Vec::new();
    for _ in 0..missed.len() {
        let result = next_result(&mut resumed, "m").await;
        got.push(
            result["data"]["messageReceived"]["content"]
                .as_str()
                .unwrap_or("?")
                .to_owned(),
        );
    }
    assert_eq!(got, missed, "exactly the missed messages, in order");
    send(&nodes[0], &author.token, &channel, "live").await;
    let live = next_result(&mut resumed, "m").await;
    assert_eq!(
        live["data"]["messageReceived"]["content"], "live",
        "then the live stream, nothing repeated"
    );

    // The same through the generic `events` subscription.
    let mut generic = GqlWs::connect(&nodes[2].ws_url("/graphql/ws"), TRANSPORT_WS).await;
    generic.init_ack(json!({})).await;
    let topic = format!("channel:{channel}");
    generic
        .subscribe(
            "e",
            EVENTS,
            json!({ "topics": [topic], "after": last_seen }),
        )
        .await;
    let mut contents = Vec::new();
    for _ in 0..missed.len() + 1 {
        let result = next_result(&mut generic, "e").await;
        assert_eq!(
            result["data"]["events"]["type"], "message.created",
            "{result}"
        );
        contents.push(
            result["data"]["events"]["payload"]["message"]["content"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let mut expected = missed.clone();
    expected.push("live".into());
    assert_eq!(contents, expected);
}

#[tokio::test]
async fn a_position_older_than_the_history_is_a_history_gap_before_what_is_retained() {
    let node = Node::start(&[("SUBGATE__HISTORY__SIZE", "3")]);
    let author = create_user(&node, "Gapper").await;
    let channel = public_channel(&node, &author.token).await;
    let topic = format!("channel:{channel}");
    let mut ws = GqlWs::connect(&node.ws_url("/graphql/ws"), TRANSPORT_WS).await;
    ws.init_ack(json!({})).await;
    // Learn the first position through a live subscription.
    ws.subscribe("live", EVENTS, json!({ "topics": [topic] }))
        .await;
    let mut first_id = None;
    for attempt in 0..50 {
        send(&node, &author.token, &channel, &format!("m{attempt}")).await;
        if let Read::Message(m) = ws.read(Duration::from_millis(200)).await {
            if m["type"] == "next" {
                first_id = m["payload"]["data"]["events"]["id"]
                    .as_str()
                    .map(str::to_owned);
                break;
            }
        }
    }
    let first_id = first_id.expect("the subscription never went live");
    ws.complete("live").await;
    for i in 0..6 {
        send(&node, &author.token, &channel, &format!("later {i}")).await;
    }
    ws.subscribe(
        "old",
        EVENTS,
        json!({ "topics": [topic], "after": first_id }),
    )
    .await;
    let gap = next_result(&mut ws, "old").await;
    let error = &gap["errors"][0];
    assert_eq!(error["extensions"]["code"], "HISTORY_GAP", "{gap}");
    assert_eq!(error["extensions"]["reason"], "expired", "{gap}");
    // Then what the history still holds: the last three.
    let mut contents = Vec::new();
    for _ in 0..3 {
        let r = next_result(&mut ws, "old").await;
        contents.push(
            r["data"]["events"]["payload"]["message"]["content"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(contents, ["later 3", "later 4", "later 5"]);
    ws.subscribe(
        "bad",
        EVENTS,
        json!({ "topics": [topic], "after": "not-a-position" }),
    )
    .await;
    let bad = next_result(&mut ws, "bad").await;
    assert_eq!(
        bad["errors"][0]["extensions"]["reason"], "malformed",
        "{bad}"
    );
}
