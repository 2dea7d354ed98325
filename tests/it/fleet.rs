//! A fleet: several nodes sharing one real `redis-server`, as in production.
//!
//! What a user of a fleet relies on, checked from the outside: an event
//! published on any node reaches every subscriber on every node once and in
//! order; a node listens to a topic's channel only while it has subscribers
//! for it; Redis going away (killed, not started yet, or dropping a node's
//! Pub/Sub connection) costs events published while it is gone but never
//! the clients' connections, and the fleet heals by itself when it returns;
//! a node dying costs only its own clients; data written on one node is
//! visible on every other at once.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

/// The Pub/Sub channel of the `posts` topic under the default prefix.
const POSTS_CHANNEL: &str = "subgate:topic:posts";
pub(crate) const POST_CREATED: &str = "subscription { postCreated { id title } }";
pub(crate) const CREATE_POST: &str =
    "mutation($input: CreatePostInput!) { createPost(input: $input) { post { id title } errors { field message code } } }";
/// The operation id every subscriber here uses for `postCreated`.
pub(crate) const FEED: &str = "feed";
/// The title of the post that closes a batch: every subscriber reads up to
/// it, so a lost event shows as missing and a duplicate as one too many.
pub(crate) const END: &str = "[end of batch]";
/// How long Redis may be back before subscribers receive events again.
pub(crate) const RECOVERY: Duration = Duration::from_secs(5);

/// A node on the Redis at `redis_url`. A 200ms cap on reconnect backoff keeps the time a
/// node takes to notice a returning Redis well inside [`RECOVERY`].
fn fleet_node(redis_url: &str) -> Node {
    Node::start(&[
        ("SUBGATE__REDIS__URL", redis_url),
        ("SUBGATE__REDIS__MAX_BACKOFF_SECONDS", "0.2"),
    ])
}

/// `N` nodes on `bus`, started side by side.
pub(crate) fn fleet<const N: usize>(bus: &(impl Bus + Sync)) -> [Node; N] {
    bus_fleet(bus, &[])
}

/// A graphql-transport-ws client on `node` subscribed to `postCreated` as
/// operation [`FEED`] (not yet known to be live: see [`until_live`]).
pub(crate) async fn subscriber(node: &Node) -> GqlWs {
    let mut ws = GqlWs::connect(&node.ws_url("/graphql/ws"), TRANSPORT_WS).await;
    ws.init_ack(json!({})).await;
    ws.subscribe(FEED, POST_CREATED, json!({})).await;
    ws
}

/// `createPost` on `node`: the new post's id, or the whole response when
/// the node did not report a clean success.
pub(crate) async fn try_create_post(
    node: &Node,
    token: &str,
    title: &str,
    content: &str,
) -> Result<String, Value> {
    let reply = post_json(
        node,
        &json!({ "query": CREATE_POST, "variables": { "input": { "title": title, "content": content } } }),
        Some(token),
    )
    .await;
    let response: Value = serde_json::from_str(&reply.body)
        .unwrap_or_else(|_| json!({ "status": reply.status.as_u16(), "body": reply.body }));
    let payload = &response["data"]["createPost"];
    let clean = reply.status == StatusCode::OK
        && response["errors"].as_array().is_none_or(|e| e.is_empty())
        && payload["errors"].as_array().is_some_and(|e| e.is_empty());
    match payload["post"]["id"].as_str() {
        Some(id) if clean => Ok(id.to_owned()),
        _ => Err(response),
    }
}

/// Creates marker posts on `node` until every client has received one;
/// while Redis is coming back a publish may fail, and is simply repeated.
pub(crate) async fn until_live_via(
    node: &Node,
    token: &str,
    clients: &mut [&mut GqlWs],
    label: &str,
) {
    until_live(clients, FEED, async |n| {
        let title = format!("[{label} {n}]");
        let _ = try_create_post(node, token, &title, "").await;
        title
    })
    .await;
}

/// The posts (id, title) delivered to `ws` on [`FEED`] before the one
/// titled [`END`], each within `gap` of the previous one; `who` names the
/// client in failures.
pub(crate) async fn posts_until_end(
    ws: &mut GqlWs,
    gap: Duration,
    who: &str,
) -> Vec<(String, String)> {
    let mut posts = Vec::new();
    loop {
        let message = match ws.read(gap).await {
            Read::Message(message) => message,
            Read::TimedOut => panic!(
                "{who} received nothing for {gap:?} after {} posts (last {:?}), and never the end marker",
                posts.len(),
                posts.last()
            ),
            Read::Closed(code, reason) => {
                panic!("{who} was disconnected ({code} {reason:?}) after {} posts", posts.len())
            }
        };
        assert!(
            message["type"] == "next" && message["id"] == FEED,
            "{who} expected a post, got {message}"
        );
        let post = &message["payload"]["data"]["postCreated"];
        let (Some(id), Some(title)) = (post["id"].as_str(), post["title"].as_str()) else {
            panic!("{who} got a delivery without a post: {message}");
        };
        if title == END {
            return posts;
        }
        posts.push((id.to_owned(), title.to_owned()));
    }
}

/// Polls `probe` every 25ms until it gives `Ok`; panics with `what` and
/// the last observation after `within`.
pub(crate) async fn eventually<T, O: std::fmt::Debug>(
    within: Duration,
    what: &str,
    mut probe: impl AsyncFnMut() -> Result<T, O>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        match probe().await {
            Ok(value) => return value,
            Err(last) if Instant::now() >= deadline => {
                panic!("{what}: not so within {within:?}; last seen: {last:?}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
}

/// Waits until `/readyz` on `node` answers `want`; returns its body.
pub(crate) async fn readyz_becomes(
    node: &Node,
    want: StatusCode,
    within: Duration,
    name: &str,
) -> String {
    eventually(
        within,
        &format!("/readyz of {name} answers {want}"),
        async || {
            let reply = get(node, "/readyz").await;
            if reply.status == want {
                Ok(reply.body)
            } else {
                Err((reply.status, reply.body))
            }
        },
    )
    .await
}

/// Waits until the connections subscribed to the posts channel are `want`.
async fn numsub_becomes(bus: &impl Bus, want: i64, within: Duration, why: &str) {
    eventually(
        within,
        &format!("subscribers of {POSTS_CHANNEL} = {want} ({why})"),
        async || {
            let n = bus.listeners("posts").await;
            if n == want {
                Ok(())
            } else {
                Err(n)
            }
        },
    )
    .await
}

/// The value of `name` on `node`'s `/metrics`, summed over its labels; 0
/// when absent (a labelled metric has no series until first used).
pub(crate) async fn metric(node: &Node, name: &str) -> f64 {
    metric_sum(&get(node, "/metrics").await.body, name)
}

/// Creates one post on `publisher` and checks it is the very next delivery
/// of every client: live, once, nothing stale in between.
pub(crate) async fn next_post_reaches_all(
    publisher: &Node,
    token: &str,
    clients: &mut [(&str, &mut GqlWs)],
    title: &str,
) {
    let id = create_post(publisher, token, title, "").await;
    create_post(publisher, token, END, "").await;
    for (who, ws) in clients.iter_mut() {
        let got = posts_until_end(ws, Duration::from_secs(10), who).await;
        assert_eq!(
            got,
            vec![(id.clone(), title.to_owned())],
            "{who} should receive exactly the post {title:?} next"
        );
    }
}

#[tokio::test]
async fn posts_created_on_one_node_reach_subscribers_on_two_others_once_each_in_order() {
    posts_created_on_one_node_reach_subscribers_on_two_others(&TestRedis::start()).await;
}

pub(crate) async fn posts_created_on_one_node_reach_subscribers_on_two_others(
    bus: &(impl Bus + Sync),
) {
    let [n1, n2, n3] = fleet(bus);
    let author = create_user(&n3, "Publisher").await;
    let mut s1 = subscriber(&n1).await;
    let mut s2 = subscriber(&n2).await;
    until_live_via(&n3, &author.token, &mut [&mut s1, &mut s2], "warm-up").await;

    let mut published = Vec::new();
    for i in 0..30 {
        let title = format!("post {i}");
        published.push((create_post(&n3, &author.token, &title, "").await, title));
    }
    create_post(&n3, &author.token, END, "").await;

    // Equality with the published list is all three properties at once:
    // nothing missing, nothing twice (a duplicate of a warm-up post would
    // show too), and publish order.
    for (who, ws) in [
        ("the subscriber on node 1", &mut s1),
        ("the subscriber on node 2", &mut s2),
    ] {
        let got = posts_until_end(ws, Duration::from_secs(10), who).await;
        assert_eq!(
            got, published,
            "{who} should receive the 30 posts created on node 3, once each, in order"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_posts_published_from_two_nodes_at_once_reach_every_node_once_each() {
    a_thousand_posts_published_from_two_nodes_at_once_reach_every_node_once_each_on(
        &TestRedis::start(),
    )
    .await;
}

pub(crate) async fn a_thousand_posts_published_from_two_nodes_at_once_reach_every_node_once_each_on(
    bus: &(impl Bus + Sync),
) {
    // Two publishing nodes, five sequential lanes each (so ten createPost
    // in flight at any time), 100 posts per lane.
    const LANES: usize = 5;
    const PER_LANE: usize = 100;
    let [n1, n2, n3] = fleet(bus);
    // An author per publishing node: it exists on that node whether or not
    // the nodes share a store.
    let left = create_user(&n1, "Left").await;
    let right = create_user(&n2, "Right").await;
    let mut subs = [
        subscriber(&n1).await,
        subscriber(&n2).await,
        subscriber(&n3).await,
    ];
    {
        let [a, b, c] = &mut subs;
        until_live_via(&n1, &left.token, &mut [a, b, c], "warm-up").await;
    }

    // Each subscriber is read on its own task while the posts go out, as a
    // real client reads: nobody's queue fills up because the test waited.
    let readers: Vec<_> = subs
        .into_iter()
        .enumerate()
        .map(|(i, mut ws)| {
            tokio::spawn(async move {
                let who = format!("the subscriber on node {}", i + 1);
                posts_until_end(&mut ws, Duration::from_secs(30), &who).await
            })
        })
        .collect();

    let started = Instant::now();
    let lanes = [(1, &n1, &left), (2, &n2, &right)]
        .into_iter()
        .flat_map(|(k, node, author)| {
            (0..LANES).map(move |lane| async move {
                let mut posts = Vec::with_capacity(PER_LANE);
                for i in 0..PER_LANE {
                    let title = format!("n{k}-l{lane}-{i}");
                    posts.push((create_post(node, &author.token, &title, "").await, title));
                }
                posts
            })
        });
    let published: Vec<(String, String)> = join_all(lanes).await.into_iter().flatten().collect();
    let publish_took = started.elapsed();
    create_post(&n3, &left.token, END, "").await;

    let ids: HashSet<&str> = published.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        ids.len(),
        2 * LANES * PER_LANE,
        "createPost returned a post id twice"
    );
    let mut sequences = Vec::new();
    for (i, reader) in readers.into_iter().enumerate() {
        let who = format!("the subscriber on node {}", i + 1);
        let got = reader
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (id, _) in &got {
            *seen.entry(id.as_str()).or_default() += 1;
        }
        let missing: Vec<&str> = ids
            .iter()
            .copied()
            .filter(|id| !seen.contains_key(id))
            .collect();
        let twice: Vec<&str> = seen
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(id, _)| *id)
            .collect();
        let unknown: Vec<&str> = seen
            .keys()
            .copied()
            .filter(|id| !ids.contains(id))
            .collect();
        assert!(
            missing.is_empty() && twice.is_empty() && unknown.is_empty(),
            "{who} received {} deliveries for {} posts: {} missing (e.g. {:?}), {} more than once (e.g. {:?}), {} never published (e.g. {:?})",
            got.len(),
            ids.len(),
            missing.len(),
            missing.iter().take(3).collect::<Vec<_>>(),
            twice.len(),
            twice.iter().take(3).collect::<Vec<_>>(),
            unknown.len(),
            unknown.iter().take(3).collect::<Vec<_>>()
        );
        // Each lane published sequentially, so its posts must arrive in
        // the order it created them.
        let mut next_in_lane: HashMap<String, usize> = HashMap::new();
        for (_, title) in &got {
            let (lane, n) = title.rsplit_once('-').expect("a lane title");
            let n: usize = n.parse().expect("a lane sequence number");
            let expected = next_in_lane.entry(lane.to_owned()).or_default();
            assert_eq!(
                n, *expected,
                "{who} received {lane}'s post {n} when its post {expected} was due"
            );
            *expected += 1;
        }
        sequences.push((who, got));
    }
    // One topic has one order fleet-wide: every node saw the same sequence.
    let (first_who, first) = &sequences[0];
    for (who, other) in &sequences[1..] {
        if let Some(at) = first.iter().zip(other).position(|(a, b)| a != b) {
            panic!(
                "{first_who} and {who} received the posts in different orders: delivery {at} is {:?} on one, {:?} on the other",
                first[at], other[at]
            );
        }
    }
    eprintln!("1000 posts from two nodes published in {publish_took:?}");
}

#[tokio::test]
async fn a_node_listens_to_a_topic_channel_only_while_it_has_subscribers() {
    let redis = TestRedis::start();
    let [n1, n2] = fleet(&redis);
    let author = create_user(&n2, "Publisher").await;
    assert_eq!(
        redis.numsub(POSTS_CHANNEL).await,
        0,
        "no node has a postCreated subscriber yet, yet {POSTS_CHANNEL} has listeners"
    );

    let mut a = subscriber(&n1).await;
    let mut b = subscriber(&n1).await;
    until_live_via(&n2, &author.token, &mut [&mut a, &mut b], "warm-up").await;
    // Node 2 publishes to the channel but has nobody to deliver to, so it
    // must not listen; node 1's two subscribers share one subscription.
    assert_eq!(
        redis.numsub(POSTS_CHANNEL).await,
        1,
        "two subscribers on node 1 and none on node 2: {POSTS_CHANNEL} should have exactly one listener, node 1"
    );

    // One of two leaves (its TCP connection just ends): node 1 must stay
    // subscribed for the other. A node releases a connection's
    // subscriptions before it stops counting the connection, so one open
    // connection left means the leaver's subscription is gone.
    drop(a);
    eventually(
        Duration::from_secs(10),
        "node 1 counts one open connection after a client left",
        async || {
            let n = metric(&n1, "subgate_connections").await;
            if n == 1.0 {
                Ok(())
            } else {
                Err(n)
            }
        },
    )
    .await;
    assert_eq!(
        redis.numsub(POSTS_CHANNEL).await,
        1,
        "node 1 still has a subscriber, so it must still listen"
    );
    next_post_reaches_all(
        &n2,
        &author.token,
        &mut [("the remaining subscriber", &mut b)],
        "still there",
    )
    .await;

    // The last one leaves with a proper close handshake.
    b.send_raw(Message::Close(None))
        .await
        .expect("send a close frame");
    b.expect_close(Duration::from_secs(5)).await;
    numsub_becomes(
        &redis,
        0,
        Duration::from_secs(10),
        "node 1 unsubscribes after its last subscriber left",
    )
    .await;

    // And listens again for the next one.
    let mut c = subscriber(&n1).await;
    until_live_via(&n2, &author.token, &mut [&mut c], "again").await;
    assert_eq!(
        redis.numsub(POSTS_CHANNEL).await,
        1,
        "a new subscriber on node 1 should make it listen again"
    );

    // What the nodes report agrees with what Redis sees: one subscription
    // on node 1, none on node 2.
    for (name, node, want) in [("node 1", &n1, 1.0), ("node 2", &n2, 0.0)] {
        let counted = metric(node, "subgate_subscriptions").await;
        assert_eq!(
            counted, want,
            "subgate_subscriptions on {name}, which has {want} postCreated subscribers"
        );
    }
}

#[tokio::test]
async fn redis_killed_and_restarted_costs_no_connection_and_delivery_resumes_within_5s() {
    let mut redis = TestRedis::start();
    let [n1, n2] = fleet(&redis);
    let author = create_user(&n2, "Publisher").await;
    let mut s1 = subscriber(&n1).await;
    let mut s2 = subscriber(&n2).await;
    until_live_via(&n2, &author.token, &mut [&mut s1, &mut s2], "warm-up").await;

    redis.kill();
    for (name, node) in [("node 1", &n1), ("node 2", &n2)] {
        let body = readyz_becomes(
            node,
            StatusCode::SERVICE_UNAVAILABLE,
            Duration::from_secs(5),
            name,
        )
        .await;
        assert!(
            body.to_lowercase().contains("redis"),
            "/readyz of {name} should say Redis is the problem: {body}"
        );
    }
    // A write that cannot be published must not look like a success, and
    // must not hang until the client gives up.
    let asked = Instant::now();
    let during = try_create_post(&n2, &author.token, "during the outage", "").await;
    let took = asked.elapsed();
    let response = during.expect_err("createPost while Redis is down reported success");
    let payload_codes: Vec<&str> = response["data"]["createPost"]["errors"]
        .as_array()
        .map(|errors| errors.iter().filter_map(|e| e["code"].as_str()).collect())
        .unwrap_or_default();
    let graphql_errors = response["errors"].as_array().is_some_and(|e| !e.is_empty());
    assert!(
        graphql_errors || payload_codes.contains(&"INTERNAL"),
        "createPost while Redis is down should fail with a GraphQL error or a payload error INTERNAL: {response}"
    );
    assert!(
        took < Duration::from_secs(5),
        "createPost while Redis is down took {took:?} to fail"
    );

    redis.restart();
    let back = Instant::now();
    // The same connections as before the outage: until_live fails if any
    // of them was closed.
    until_live_via(
        &n2,
        &author.token,
        &mut [&mut s1, &mut s2],
        "after the outage",
    )
    .await;
    let resumed = back.elapsed();
    assert!(
        resumed < RECOVERY,
        "Redis has been back for {resumed:?} before both subscribers received a new post"
    );
    for (name, node) in [("node 1", &n1), ("node 2", &n2)] {
        readyz_becomes(
            node,
            StatusCode::OK,
            RECOVERY.saturating_sub(back.elapsed()),
            name,
        )
        .await;
    }
    // Nothing from the outage turns up late, and delivery is exact again.
    next_post_reaches_all(
        &n2,
        &author.token,
        &mut [
            ("the subscriber on node 1", &mut s1),
            ("the subscriber on node 2", &mut s2),
        ],
        "healed",
    )
    .await;
}

#[tokio::test]
async fn a_node_started_before_its_redis_is_unready_until_redis_appears_then_serves() {
    let port = reserve_port();
    let node = fleet_node(&format!("redis://127.0.0.1:{port}"));
    // It listened (Node::start waited for the line); it must not claim to
    // be ready, and must say why.
    let reply = get(&node, "/readyz").await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "/readyz with no Redis: {}",
        reply.body
    );
    assert!(
        reply.body.to_lowercase().contains("redis"),
        "/readyz should say Redis is the problem: {}",
        reply.body
    );

    let _redis = TestRedis::start_on(port);
    let appeared = Instant::now();
    readyz_becomes(&node, StatusCode::OK, RECOVERY, "the node").await;
    eprintln!("ready {:?} after Redis appeared", appeared.elapsed());

    let author = create_user(&node, "Late").await;
    let mut ws = subscriber(&node).await;
    until_live_via(&node, &author.token, &mut [&mut ws], "warm-up").await;
    next_post_reaches_all(
        &node,
        &author.token,
        &mut [("the subscriber", &mut ws)],
        "served",
    )
    .await;
}

#[tokio::test]
async fn a_node_killed_with_sigkill_drops_only_its_own_clients() {
    a_node_killed_with_sigkill_drops_only_its_own_clients_on(&TestRedis::start()).await;
}

pub(crate) async fn a_node_killed_with_sigkill_drops_only_its_own_clients_on(
    bus: &(impl Bus + Sync),
) {
    let [n1, n2, n3] = fleet(bus);
    let left = create_user(&n1, "Left").await;
    let right = create_user(&n2, "Right").await;
    let mut s1 = subscriber(&n1).await;
    let mut s2 = subscriber(&n2).await;
    let mut s3 = subscriber(&n3).await;
    until_live_via(
        &n1,
        &left.token,
        &mut [&mut s1, &mut s2, &mut s3],
        "warm-up",
    )
    .await;
    assert_eq!(
        bus.listeners("posts").await,
        3,
        "each of the three nodes has a subscriber"
    );

    n3.sigkill();
    // A killed process sends no close frame: the client sees the TCP
    // connection end (1006).
    let (code, reason) = s3.expect_close(Duration::from_secs(5)).await;
    assert_eq!(
        code, 1006,
        "the client of the killed node should see the connection drop (reason {reason:?})"
    );
    n3.wait_exit(Duration::from_secs(5)).await;
    numsub_becomes(
        bus,
        2,
        Duration::from_secs(10),
        "the killed node's Pub/Sub connection is gone",
    )
    .await;

    // Both surviving nodes keep publishing and delivering, every post.
    let mut published = Vec::new();
    for i in 0..20 {
        let (node, author) = if i % 2 == 0 {
            (&n1, &left)
        } else {
            (&n2, &right)
        };
        let title = format!("after the crash {i}");
        published.push((create_post(node, &author.token, &title, "").await, title));
    }
    create_post(&n1, &left.token, END, "").await;
    for (who, ws) in [
        ("the subscriber on node 1", &mut s1),
        ("the subscriber on node 2", &mut s2),
    ] {
        let got = posts_until_end(ws, Duration::from_secs(10), who).await;
        assert_eq!(
            got, published,
            "{who} should receive every post after node 3 died, once, in order"
        );
    }
}

#[tokio::test]
async fn data_written_on_one_node_is_read_back_on_another_at_once() {
    data_written_on_one_node_is_read_back_on_another_at_once_on(&TestRedis::start()).await;
}

pub(crate) async fn data_written_on_one_node_is_read_back_on_another_at_once_on(
    bus: &(impl Bus + Sync),
) {
    let [n1, n2, n3] = fleet(bus);
    let needs = "(this needs the Redis store: every node reads and writes the same data)";

    // A user signed up on node 1 exists on node 2 and can log in on node 3.
    let ann = create_user(&n1, "Ann").await;
    let data = gql_ok(
        &n2,
        "query($id: ID!) { user(id: $id) { id email name } }",
        json!({ "id": ann.id }),
        Some(&ann.token),
    )
    .await;
    assert_eq!(
        data["user"],
        json!({ "id": ann.id, "email": ann.email, "name": "Ann" }),
        "the user created on node 1, read on node 2 {needs}"
    );
    let data = gql_ok(
        &n3,
        "mutation($input: LoginInput!) { login(input: $input) { token user { id } errors { code } } }",
        json!({ "input": { "email": ann.email, "password": "correct horse battery staple" } }),
        None,
    )
    .await;
    assert_eq!(
        data["login"]["user"]["id"],
        json!(ann.id),
        "log in on node 3 as the user signed up on node 1 {needs}: {data}"
    );
    assert!(
        data["login"]["token"].is_string(),
        "login on node 3 gave no token: {data}"
    );

    // A post written on node 2 is read on node 3 (with its author) and
    // listed on node 1.
    let post_id = create_post(&n2, &ann.token, "Written on node 2", "body").await;
    let data = gql_ok(
        &n3,
        "query($id: ID!) { post(id: $id) { id title content author { id name } } }",
        json!({ "id": post_id }),
        None,
    )
    .await;
    assert_eq!(
        data["post"],
        json!({ "id": post_id, "title": "Written on node 2", "content": "body", "author": { "id": ann.id, "name": "Ann" } }),
        "the post created on node 2, read on node 3 {needs}"
    );
    let data = gql_ok(
        &n1,
        "query($a: ID!) { posts(authorId: $a, first: 10) { totalCount nodes { id } } }",
        json!({ "a": ann.id }),
        None,
    )
    .await;
    assert_eq!(
        data["posts"],
        json!({ "totalCount": 1, "nodes": [{ "id": post_id }] }),
        "Ann's posts listed on node 1 {needs}"
    );

    // A comment written on node 1 by a user from node 3 shows on node 2.
    let bob = create_user(&n3, "Bob").await;
    let data = gql_ok(
        &n1,
        "mutation($input: CreateCommentInput!) { createComment(input: $input) { comment { id } errors { field message code } } }",
        json!({ "input": { "postId": post_id, "content": "Nice one" } }),
        Some(&bob.token),
    )
    .await;
    let comment_id = data["createComment"]["comment"]["id"]
        .as_str()
        .unwrap_or_else(|| {
            panic!("createComment on node 1 on a post from node 2 failed {needs}: {data}")
        })
        .to_owned();
    let data = gql_ok(
        &n2,
        "query($id: ID!) { post(id: $id) { comments(first: 10) { totalCount nodes { id content author { name } } } } }",
        json!({ "id": post_id }),
        None,
    )
    .await;
    assert_eq!(
        data["post"]["comments"],
        json!({ "totalCount": 1, "nodes": [{ "id": comment_id, "content": "Nice one", "author": { "name": "Bob" } }] }),
        "the comment written on node 1, read on node 2 {needs}"
    );

    // A private channel made on node 1 with Bob as a member: Bob reads it
    // on node 3, listens on node 2, and Ann's message sent on node 3
    // reaches him there and is listed on node 1.
    let data = gql_ok(
        &n1,
        "mutation($input: CreateChannelInput!) { createChannel(input: $input) { channel { id } errors { field message code } } }",
        json!({ "input": { "name": "fleet", "isPrivate": true, "memberIds": [bob.id] } }),
        Some(&ann.token),
    )
    .await;
    let channel_id = data["createChannel"]["channel"]["id"]
        .as_str()
        .unwrap_or_else(|| {
            panic!("createChannel with Bob (created on node 3) as a member failed on node 1 {needs}: {data}")
        })
        .to_owned();
    let data = gql_ok(
        &n3,
        "query($id: ID!) { channel(id: $id) { name isPrivate members { id } } }",
        json!({ "id": channel_id }),
        Some(&bob.token),
    )
    .await;
    let members: HashSet<&str> = data["channel"]["members"]
        .as_array()
        .unwrap_or_else(|| {
            panic!(
                "Bob cannot read on node 3 the private channel he is a member of {needs}: {data}"
            )
        })
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(
        members,
        HashSet::from([ann.id.as_str(), bob.id.as_str()]),
        "the channel's members, read on node 3: {data}"
    );

    let mut listener = GqlWs::connect(&n2.ws_url("/graphql/ws"), TRANSPORT_WS).await;
    listener
        .init_ack(json!({ "authorization": format!("Bearer {}", bob.token) }))
        .await;
    listener
        .subscribe(
            "chat",
            "subscription($c: ID!) { messageReceived(channelId: $c) { id content author { id } } }",
            json!({ "c": channel_id }),
        )
        .await;
    const SEND: &str = "mutation($input: SendMessageInput!) { sendMessage(input: $input) { message { id } errors { field message code } } }";
    let send = async |content: &str| -> String {
        let data = gql_ok(
            &n3,
            SEND,
            json!({ "input": { "channelId": channel_id, "content": content } }),
            Some(&ann.token),
        )
        .await;
        data["sendMessage"]["message"]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("sendMessage on node 3 failed {needs}: {data}"))
            .to_owned()
    };
    let mut warm_ups = 0;
    until_live(&mut [&mut listener], "chat", async |n| {
        warm_ups += 1;
        let content = format!("[warm-up {n}]");
        send(&content).await;
        content
    })
    .await;
    let message_id = send("hello from node 3").await;
    let delivered = listener.next_data("chat", Duration::from_secs(10)).await;
    assert_eq!(
        delivered["data"]["messageReceived"],
        json!({ "id": message_id, "content": "hello from node 3", "author": { "id": ann.id } }),
        "Bob, listening on node 2, should receive Ann's message sent on node 3"
    );
    let data = gql_ok(
        &n1,
        "query($id: ID!) { channel(id: $id) { messages(first: 100) { totalCount nodes { id content } } } }",
        json!({ "id": channel_id }),
        Some(&bob.token),
    )
    .await;
    let messages = &data["channel"]["messages"];
    assert_eq!(
        messages["totalCount"],
        json!(warm_ups + 1),
        "every message sent on node 3, counted on node 1: {data}"
    );
    assert_eq!(
        messages["nodes"][0],
        json!({ "id": message_id, "content": "hello from node 3" }),
        "the newest message, listed first on node 1: {data}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_concurrent_signups_with_one_email_across_the_fleet_make_one_user() {
    ten_concurrent_signups_with_one_email_across_the_fleet_make_one_user_on(&TestRedis::start())
        .await;
}

pub(crate) async fn ten_concurrent_signups_with_one_email_across_the_fleet_make_one_user_on(
    bus: &(impl Bus + Sync),
) {
    // A Redis of its own, so that `users` lists this test's users only.
    let nodes = fleet::<3>(bus);
    let email = format!("{}@example.com", unique("race-"));
    const CREATE_USER: &str =
        "mutation($input: CreateUserInput!) { createUser(input: $input) { user { id email } errors { field message code } } }";
    let attempts = (0..10).map(|i| {
        let node = &nodes[i % 3];
        let email = email.clone();
        async move {
            let input = json!({ "input": { "email": email, "name": format!("Racer {i}"), "password": "correct horse battery staple" } });
            (i % 3 + 1, gql_ok(node, CREATE_USER, input, None).await["createUser"].clone())
        }
    });
    let results = join_all(attempts).await;

    let winners: Vec<&(usize, Value)> = results
        .iter()
        .filter(|(_, p)| p["user"]["id"].is_string())
        .collect();
    assert_eq!(
        winners.len(),
        1,
        "exactly one of 10 concurrent createUser with one email (on three nodes) should succeed; these did: {winners:?}"
    );
    assert!(
        payload_errors(&winners[0].1).is_empty(),
        "the winning createUser also reported errors: {:?}",
        winners[0]
    );
    for (node, payload) in results.iter().filter(|(_, p)| !p["user"]["id"].is_string()) {
        assert_eq!(
            payload_errors(payload),
            vec![("CONFLICT".to_owned(), Some("email".to_owned()))],
            "a losing createUser on node {node} should say the email is taken: {payload}"
        );
    }
    // Read as the winner: an email is shown to its owner only.
    let winner = token(
        nodes[0].secret(),
        winners[0].1["user"]["id"].as_str().unwrap(),
    );
    for (i, node) in nodes.iter().enumerate() {
        let data = gql_ok(
            node,
            "{ users(first: 100) { totalCount nodes { email } } }",
            json!({}),
            Some(&winner),
        )
        .await;
        assert_eq!(
            data["users"],
            json!({ "totalCount": 1, "nodes": [{ "email": email }] }),
            "node {} should list exactly one user, with the raced email",
            i + 1
        );
    }
}

#[tokio::test]
async fn redis_dropping_a_nodes_pubsub_connection_costs_no_client_and_delivery_resumes() {
    let redis = TestRedis::start();
    let [n1, n2] = fleet(&redis);
    let author = create_user(&n2, "Publisher").await;
    let mut s1 = subscriber(&n1).await;
    let mut s2 = subscriber(&n2).await;
    until_live_via(&n2, &author.token, &mut [&mut s1, &mut s2], "warm-up").await;
    const RECONNECTS: &str = "subgate_redis_reconnects_total";

    // First by hand, as an operator would; the second half below has Redis
    // do it by itself.
    let before = [metric(&n1, RECONNECTS).await, metric(&n2, RECONNECTS).await];
    let killed: i64 = redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    assert!(
        killed >= 2,
        "each node should hold a Pub/Sub connection, but CLIENT KILL TYPE pubsub closed {killed}"
    );
    let dropped = Instant::now();
    until_live_via(
        &n2,
        &author.token,
        &mut [&mut s1, &mut s2],
        "after CLIENT KILL",
    )
    .await;
    let resumed = dropped.elapsed();
    assert!(
        resumed < RECOVERY,
        "subscribers received new posts only {resumed:?} after their nodes' Pub/Sub connections were dropped"
    );
    let after = [metric(&n1, RECONNECTS).await, metric(&n2, RECONNECTS).await];
    assert!(
        after[0] > before[0] && after[1] > before[1],
        "{RECONNECTS} should rise on both nodes: {before:?} -> {after:?}"
    );
    next_post_reaches_all(
        &n2,
        &author.token,
        &mut [
            ("the subscriber on node 1", &mut s1),
            ("the subscriber on node 2", &mut s2),
        ],
        "after the kill",
    )
    .await;

    // What Redis does on its own to a subscriber whose output buffer
    // passes `client-output-buffer-limit pubsub`: with a 1 KB hard limit a
    // 64 KB post is over it at once, on every node that listens to posts.
    let before = after;
    let _: () = redis
        .cmd(&[
            "CONFIG",
            "SET",
            "client-output-buffer-limit",
            "pubsub 1kb 0 0",
        ])
        .await;
    // Published or not, this post must not cost anyone their connection.
    let _ = try_create_post(
        &n2,
        &author.token,
        "[too big for the buffer]",
        &"x".repeat(64 * 1024),
    )
    .await;
    eventually(
        Duration::from_secs(5),
        "Redis cut off both nodes' Pub/Sub connections over the buffer limit",
        async || {
            let now = [metric(&n1, RECONNECTS).await, metric(&n2, RECONNECTS).await];
            if now[0] > before[0] && now[1] > before[1] {
                Ok(())
            } else {
                Err(now)
            }
        },
    )
    .await;
    let _: () = redis
        .cmd(&[
            "CONFIG",
            "SET",
            "client-output-buffer-limit",
            "pubsub 32mb 8mb 60",
        ])
        .await;
    let cut = Instant::now();
    // The big post may have reached a subscriber before the cut; until_live
    // skips it like any delivery that is not a marker.
    until_live_via(
        &n2,
        &author.token,
        &mut [&mut s1, &mut s2],
        "after the buffer limit",
    )
    .await;
    let resumed = cut.elapsed();
    assert!(
        resumed < RECOVERY,
        "subscribers received new posts only {resumed:?} after the limit was lifted"
    );
    next_post_reaches_all(
        &n2,
        &author.token,
        &mut [
            ("the subscriber on node 1", &mut s1),
            ("the subscriber on node 2", &mut s2),
        ],
        "after the limit",
    )
    .await;
}

/// The topic of the restart test, readable by anyone.
const TICKS: &str = "ticks";
/// The tick that ends the restart test's stream.
const LAST_TICK: i64 = 1_000_000;

/// Publishes tick `n` on `node`; whether it was acknowledged (202).
async fn tick(node: &Node, n: i64) -> bool {
    let body =
        json!({ "topic": TICKS, "type": "tick", "payload": { "n": n }, "readers": "public" });
    publish_raw(node, Some(API_KEY), body.to_string())
        .await
        .status
        == StatusCode::ACCEPTED
}

/// What one subscriber of the restart test received: the ticks, in order,
/// and how many gap signals came with them.
#[derive(Debug, Default)]
struct Ticks {
    got: Vec<i64>,
    gaps: usize,
}

impl Ticks {
    /// Takes one delivery: a tick's number, or `None` for a gap signal.
    fn take(&mut self, tick: Option<i64>) -> bool {
        match tick {
            Some(LAST_TICK) => return true,
            Some(n) => self.got.push(n),
            None => self.gaps += 1,
        }
        false
    }
}

/// The next tick of the SSE stream (`None`: a gap), within `wait`.
async fn sse_tick(stream: &mut SseStream, wait: Duration) -> Option<Option<i64>> {
    let deadline = Instant::now() + wait;
    loop {
        match stream
            .read(deadline.saturating_duration_since(Instant::now()))
            .await
        {
            SseRead::Block(block) if !block.dispatches() => continue,
            SseRead::Block(block) if block.event() == Some("gap") => return Some(None),
            SseRead::Block(block) => return Some(block.json()["payload"]["n"].as_i64()),
            SseRead::TimedOut => return None,
            other => panic!("the SSE stream ended: {other:?}"),
        }
    }
}

/// The next tick of the GraphQL subscription `t` (`None`: a gap), within `wait`.
async fn ws_tick(ws: &mut GqlWs, wait: Duration) -> Option<Option<i64>> {
    let message = ws.delivery("t", wait).await?;
    assert_eq!(message["type"], "next", "{message}");
    if let Some(errors) = message["payload"]["errors"].as_array() {
        assert!(
            errors
                .iter()
                .all(|e| e["extensions"]["code"] == "HISTORY_GAP"),
            "{message}"
        );
        return Some(None);
    }
    Some(message["payload"]["data"]["events"]["payload"]["n"].as_i64())
}

#[tokio::test]
async fn events_acknowledged_after_redis_restarts_empty_reach_every_live_subscriber_once() {
    let mut redis = TestRedis::start();
    let url = redis.url();
    let env = [
        ("SUBGATE__REDIS__URL", url.as_str()),
        ("SUBGATE__REDIS__MAX_BACKOFF_SECONDS", "0.2"),
        ("SUBGATE__PUBLISH__API_KEYS", API_KEY),
    ];
    let (n1, n2) = std::thread::scope(|s| {
        let a = s.spawn(|| Node::start(&env));
        let b = s.spawn(|| Node::start(&env));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert!(
        tick(&n1, -1).await,
        "the first publish sets the topic's readers"
    );
    let mut sse = open_stream(&n1, &format!("/api/v1/events/stream?topic={TICKS}"), &[])
        .await
        .expect("the stream opens");
    let mut ws = GqlWs::connect(&n2.ws_url("/graphql/ws"), TRANSPORT_WS).await;
    ws.init_ack(json!({})).await;
    ws.subscribe(
        "t",
        &format!("subscription {{ events(topics: [\"{TICKS}\"]) {{ id payload }} }}"),
        json!({}),
    )
    .await;
    // Live: a warm-up tick has reached both (later ones then must too).
    let mut warm = -2;
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut sse_live, mut ws_live) = (false, false);
    while !(sse_live && ws_live) {
        assert!(Instant::now() < deadline, "the subscribers never went live");
        warm -= 1;
        assert!(tick(&n1, warm).await);
        let wait = Duration::from_millis(300);
        while !sse_live {
            match sse_tick(&mut sse, wait).await {
                Some(Some(n)) if n == warm => sse_live = true,
                Some(_) => {}
                None => break,
            }
        }
        while !ws_live {
            match ws_tick(&mut ws, wait).await {
                Some(Some(n)) if n == warm => ws_live = true,
                Some(_) => {}
                None => break,
            }
        }
    }

    // Ticks every 100 ms, alternately through each node, across a Redis
    // killed and restarted empty on its port.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let ticking = async {
        let mut acked = Vec::new();
        let mut n = 0;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let node = if n % 2 == 0 { &n1 } else { &n2 };
            if tick(node, n).await {
                acked.push(n);
            }
            n += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        acked
    };
    let outage = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let redis = tokio::task::spawn_blocking(move || {
            redis.kill();
            std::thread::sleep(Duration::from_secs(1));
            redis.restart();
            redis
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        redis
    };
    let (acked, _redis) = tokio::join!(ticking, outage);
    let after_restart = acked.iter().filter(|n| **n >= 30).count();
    assert!(
        after_restart >= 10,
        "too few ticks acknowledged after the restart to tell anything: {acked:?}"
    );
    assert!(tick(&n2, LAST_TICK).await, "the last tick is acknowledged");

    let wait = Duration::from_secs(10);
    let mut sse_ticks = Ticks::default();
    while let Some(tick) = sse_tick(&mut sse, wait).await {
        if sse_ticks.take(tick) {
            break;
        }
    }
    let mut ws_ticks = Ticks::default();
    while let Some(tick) = ws_tick(&mut ws, wait).await {
        if ws_ticks.take(tick) {
            break;
        }
    }
    for (who, ticks) in [
        ("SSE on node 1", &sse_ticks),
        ("GraphQL on node 2", &ws_ticks),
    ] {
        let missing: Vec<_> = acked.iter().filter(|n| !ticks.got.contains(n)).collect();
        let mut seen = HashSet::new();
        let twice: Vec<_> = ticks.got.iter().filter(|n| !seen.insert(**n)).collect();
        assert!(
            missing.is_empty() && twice.is_empty(),
            "{who}: every acknowledged tick once; missing {missing:?}, twice {twice:?} \
             (acknowledged {acked:?}, received {:?}, {} gap signals)",
            ticks.got,
            ticks.gaps
        );
        assert!(
            ticks.gaps >= 1,
            "{who}: the lost history is signalled: {ticks:?}"
        );
    }
}

#[tokio::test]
async fn a_node_a_whole_queue_behind_its_bus_reconnects_and_its_streams_lose_nothing() {
    let redis = TestRedis::start();
    // A queue of one message: a burst that reaches the node faster than its
    // hub takes it overflows the queue.
    let node = Node::start(&[
        ("SUBGATE__REDIS__URL", redis.url().as_str()),
        ("SUBGATE__REDIS__MAX_BACKOFF_SECONDS", "0.2"),
        ("SUBGATE__REDIS__PUBSUB_QUEUE_MESSAGES", "1"),
        ("SUBGATE__PUBLISH__API_KEYS", API_KEY),
    ]);
    let reader = create_user(&node, "Reader").await;
    let auth = format!("Bearer {}", reader.token);
    let mut stream = open_stream(
        &node,
        "/api/v1/events/stream?topic=bursts",
        &[("authorization", auth.as_str())],
    )
    .await
    .expect("the stream opens");
    let mut sent = Vec::new();
    let overflows = async || {
        metric_sum(
            &get(&node, "/metrics").await.body,
            "subgate_pubsub_overflows_total",
        )
    };
    for burst in 0..20 {
        let ids = futures_util::future::join_all(
            (0..50).map(|n| publish(&node, "bursts", "burst", json!({ "burst": burst, "n": n }))),
        )
        .await;
        sent.extend(ids);
        if overflows().await > 0.0 {
            break;
        }
    }
    assert!(
        overflows().await > 0.0,
        "{} events in bursts of 50 never overflowed a queue of one",
        sent.len()
    );
    // Every event, once, in the topic's order, though the node dropped what
    // its queue could not hold and reconnected.
    sent.sort_by_key(|id| id.rsplit(':').next().and_then(|s| s.parse::<u64>().ok()));
    let got: Vec<String> = stream
        .events(sent.len(), Duration::from_secs(30))
        .await
        .iter()
        .filter(|block| block.event() == Some("burst"))
        .map(|block| block.id().unwrap_or("?").to_owned())
        .collect();
    assert_eq!(got, sent);
}

#[tokio::test]
async fn a_live_subscriber_sees_no_gap_when_its_topic_is_silent_past_the_history_ttl() {
    let redis = TestRedis::start();
    let url = redis.url();
    let node = Node::start(&[
        ("SUBGATE__REDIS__URL", url.as_str()),
        ("SUBGATE__HISTORY__TTL_SECONDS", "1"),
    ]);
    let author = create_user(&node, "Author").await;
    let mut ws = subscriber(&node).await;
    until_live_via(&node, &author.token, &mut [&mut ws], "warm-up").await;
    // Silent for three times the history's TTL: its events expire, and
    // without its lineage the next event would start a new history, which
    // the live subscriber would have to take for a gap.
    tokio::time::sleep(Duration::from_secs(3)).await;
    try_create_post(&node, &author.token, "after the silence", "")
        .await
        .expect("createPost");
    loop {
        let message = ws.next_message(Duration::from_secs(5)).await;
        assert!(
            message["type"] == "next" && message["payload"]["errors"].is_null(),
            "the live subscriber was told of a gap: {message}"
        );
        let title = message["payload"]["data"]["postCreated"]["title"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if title.starts_with("[warm-up") {
            continue;
        }
        assert_eq!(title, "after the silence", "{message}");
        break;
    }
}
