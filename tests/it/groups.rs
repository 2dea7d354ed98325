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
