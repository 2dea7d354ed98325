//! Identical subscriptions share one execution per event on a node: what
//! each member must still see as its own (every event once, in order, its
//! own operation id and protocol) and what must never be shared (results
//! that depend on who asks).

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

const FEED: &str = "subscription Feed { postCreated { id title } }";

async fn metric(node: &Node, name: &str) -> f64 {
    metric_sum(&get(node, "/metrics").await.body, name)
}

/// The payloads of the next `n` deliveries of operation `id` on `ws`.
async fn deliveries(ws: &mut GqlWs, id: &str, n: usize) -> Vec<Value> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        out.push(ws.next_data(id, Duration::from_secs(10)).await);
    }
    out
}

#[tokio::test]
async fn identical_subscriptions_share_one_execution_and_each_member_gets_every_event_once_in_order(
) {
    let node = Node::start(&[]);
    let author = create_user(&node, "Author").await;
    let url = node.ws_url("/graphql/ws");
    // Three members on both protocols, each with an operation id of its own.
    let mut members = Vec::new();
    for (i, protocol) in [TRANSPORT_WS, LEGACY_WS, TRANSPORT_WS]
        .into_iter()
        .enumerate()
    {
        let mut ws = GqlWs::connect(&url, protocol).await;
        ws.init_ack(json!({})).await;
        ws.subscribe(&format!("member-{i}"), FEED, json!({})).await;
        members.push(ws);
    }
    // The same document written differently (spacing, commas) is the same
    // subscription.
    let mut spaced = GqlWs::connect(&url, TRANSPORT_WS).await;
    spaced.init_ack(json!({})).await;
    let respaced = "subscription   Feed{postCreated{id,\n title}}";
    spaced.subscribe("spaced", respaced, json!({})).await;
    for (i, ws) in members.iter_mut().enumerate() {
        until_live(&mut [ws], &format!("member-{i}"), async |n| {
            create_post(&node, &author.token, &format!("warm-up {i} {n}"), "").await
        })
        .await;
    }
    until_live(&mut [&mut spaced], "spaced", async |n| {
        create_post(&node, &author.token, &format!("warm-up spaced {n}"), "").await
    })
    .await;
    assert_eq!(metric(&node, "subgate_subscription_groups").await, 1.0);
    // What the warm-up left in flight is read before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (i, ws) in members.iter_mut().enumerate() {
        while ws
            .delivery(&format!("member-{i}"), Duration::from_millis(200))
            .await
            .is_some()
        {}
    }
    while spaced
        .delivery("spaced", Duration::from_millis(200))
        .await
        .is_some()
    {}

    let executions = metric(&node, "subgate_graphql_subscription_executions_total").await;
    let mut posted = Vec::new();
    for n in 0..20 {
        posted.push(create_post(&node, &author.token, &format!("post {n}"), "").await);
    }
    members.push(spaced);
    for (i, ws) in members.iter_mut().enumerate() {
        let id = if i == 3 {
            "spaced".to_owned()
        } else {
            format!("member-{i}")
        };
        let got: Vec<String> = deliveries(ws, &id, 20)
            .await
            .iter()
            .map(|d| {
                d["data"]["postCreated"]["id"]
                    .as_str()
                    .unwrap_or("?")
                    .to_owned()
            })
            .collect();
        assert_eq!(got, posted, "member {id}: every post once, in order");
        assert!(
            ws.delivery(&id, Duration::from_millis(300)).await.is_none(),
            "member {id}: nothing more"
        );
    }
    // Four members, twenty posts: twenty executions, not eighty.
    assert_eq!(
        metric(&node, "subgate_graphql_subscription_executions_total").await - executions,
        20.0
    );

    // Another document is another group; the groups go with their members.
    let mut other = GqlWs::connect(&url, TRANSPORT_WS).await;
    other.init_ack(json!({})).await;
    other
        .subscribe("other", "subscription { postCreated { id } }", json!({}))
        .await;
    until_live(&mut [&mut other], "other", async |n| {
        create_post(&node, &author.token, &format!("other {n}"), "").await
    })
    .await;
    assert_eq!(metric(&node, "subgate_subscription_groups").await, 2.0);
    drop(members);
    drop(other);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while metric(&node, "subgate_subscription_groups").await > 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the groups outlived their members"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn results_that_depend_on_the_viewer_are_never_shared_across_users() {
    let node = Node::start(&[]);
    let alice = create_user(&node, "Alice").await;
    let bob = create_user(&node, "Bob").await;
    let url = node.ws_url("/graphql/ws");
    // One document, which shows an author's email to that author only.
    let document = "subscription { postCreated { id author { id email } } }";
    let mut viewers = Vec::new();
    for token in [Some(&alice.token), Some(&bob.token), None] {
        let mut ws = GqlWs::connect(&url, TRANSPORT_WS).await;
        let init = match token {
            Some(token) => json!({ "token": token }),
            None => json!({}),
        };
        ws.init_ack(init).await;
        ws.subscribe("feed", document, json!({})).await;
        viewers.push(ws);
    }
    {
        let [a, b, anonymous] = viewers.as_mut_slice() else {
            unreachable!()
        };
        until_live(&mut [a, b, anonymous], "feed", async |n| {
            create_post(&node, &alice.token, &format!("warm-up {n}"), "").await
        })
        .await;
    }
    // Alice, Bob and nobody: three groups.
    assert_eq!(metric(&node, "subgate_subscription_groups").await, 3.0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for ws in viewers.iter_mut() {
        while ws
            .delivery("feed", Duration::from_millis(200))
            .await
            .is_some()
        {}
    }

    for (writer, email) in [(&alice, &alice.email), (&bob, &bob.email)] {
        let id = create_post(&node, &writer.token, "whose email?", "").await;
        for (viewer, ws) in [&alice, &bob]
            .into_iter()
            .map(Some)
            .chain([None])
            .zip(viewers.iter_mut())
        {
            let data = ws.next_data("feed", Duration::from_secs(10)).await;
            assert_eq!(data["data"]["postCreated"]["id"], id.as_str(), "{data}");
            let seen = &data["data"]["postCreated"]["author"]["email"];
            if viewer.is_some_and(|v| v.id == writer.id) {
                assert_eq!(
                    seen,
                    email.as_str(),
                    "the author sees their own email: {data}"
                );
            } else {
                assert!(seen.is_null(), "nobody else sees it: {data}");
            }
        }
    }
}

#[tokio::test]
async fn a_member_that_resumes_replays_on_its_own_then_joins_its_group_none_lost_none_twice() {
    let node = publisher_node(&[]);
    let reader = create_user(&node, "Reader").await;
    // A backend topic: its readers are authenticated users.
    let topic = "ticks";
    let document = "subscription Ticks($topics: [String!]!, $after: String) { events(topics: $topics, after: $after) { id payload } }";
    let url = node.ws_url("/graphql/ws");
    let ids = |payloads: Vec<Value>| -> Vec<String> {
        payloads
            .iter()
            .map(|p| p["data"]["events"]["id"].as_str().unwrap_or("?").to_owned())
            .collect()
    };

    // A live member, and five events it sees.
    let mut live = GqlWs::connect(&url, TRANSPORT_WS).await;
    live.init_ack(json!({ "token": reader.token })).await;
    live.subscribe("live", document, json!({ "topics": [topic] }))
        .await;
    until_live(&mut [&mut live], "live", async |n| {
        publish(&node, topic, "tick", json!({ "warm": n })).await
    })
    .await;
    let mut sent = Vec::new();
    for n in 0..5 {
        sent.push(publish(&node, topic, "tick", json!({ "n": n })).await);
    }
    assert_eq!(ids(deliveries(&mut live, "live", 5).await), sent);

    // A member that saw the first two comes back: it gets the three it
    // missed, then everything live, once each and in order, and ends up
    // sharing the live member's execution.
    let mut back = GqlWs::connect(&url, LEGACY_WS).await;
    back.init_ack(json!({ "token": reader.token })).await;
    back.subscribe(
        "back",
        document,
        json!({ "topics": [topic], "after": sent[1] }),
    )
    .await;
    assert_eq!(ids(deliveries(&mut back, "back", 3).await), sent[2..]);
    for n in 5..7 {
        sent.push(publish(&node, topic, "tick", json!({ "n": n })).await);
    }
    assert_eq!(ids(deliveries(&mut back, "back", 2).await), sent[5..7]);
    assert_eq!(ids(deliveries(&mut live, "live", 2).await), sent[5..7]);
    assert_eq!(metric(&node, "subgate_subscription_groups").await, 1.0);

    let executions = metric(&node, "subgate_graphql_subscription_executions_total").await;
    for n in 7..12 {
        sent.push(publish(&node, topic, "tick", json!({ "n": n })).await);
    }
    assert_eq!(ids(deliveries(&mut back, "back", 5).await), sent[7..12]);
    assert_eq!(ids(deliveries(&mut live, "live", 5).await), sent[7..12]);
    for (ws, id) in [(&mut back, "back"), (&mut live, "live")] {
        assert!(
            ws.delivery(id, Duration::from_millis(300)).await.is_none(),
            "{id}: nothing twice"
        );
    }
    // Both members, five events: five executions.
    assert_eq!(
        metric(&node, "subgate_graphql_subscription_executions_total").await - executions,
        5.0
    );
}

#[tokio::test]
async fn a_member_refused_on_its_own_never_gets_the_groups_results() {
    let node = publisher_node(&[]);
    let reader = create_user(&node, "Reader").await;
    let document = "subscription($topics: [String!]!, $after: String) { events(topics: $topics, after: $after) { id } }";
    let url = node.ws_url("/graphql/ws");
    let mut allowed = GqlWs::connect(&url, TRANSPORT_WS).await;
    allowed.init_ack(json!({ "token": reader.token })).await;
    allowed
        .subscribe("in", document, json!({ "topics": ["ticks"] }))
        .await;
    until_live(&mut [&mut allowed], "in", async |n| {
        publish(&node, "ticks", "tick", json!({ "n": n })).await
    })
    .await;
    let earlier = publish(&node, "ticks", "tick", json!({ "n": "earlier" })).await;
    // Anonymous, resuming or not: refused, as alone, and nothing after.
    for (id, variables) in [
        ("live", json!({ "topics": ["ticks"] })),
        ("resuming", json!({ "topics": ["ticks"], "after": earlier })),
    ] {
        let mut outsider = GqlWs::connect(&url, TRANSPORT_WS).await;
        outsider.init_ack(json!({})).await;
        outsider.subscribe(id, document, variables).await;
        let refused = outsider.next_message(Duration::from_secs(10)).await;
        assert!(
            refused.to_string().contains("UNAUTHORIZED"),
            "{id}: {refused}"
        );
        for n in 0..3 {
            publish(&node, "ticks", "tick", json!({ "after_refusal": n })).await;
        }
        let rest = outsider.read(Duration::from_millis(500)).await;
        assert!(
            matches!(&rest, Read::Message(m) if m["type"] == "complete")
                || matches!(rest, Read::TimedOut),
            "{id}: nothing but the end after a refusal: {rest:?}"
        );
    }
}
