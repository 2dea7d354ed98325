//! GraphQL over WebSocket: both subprotocols on both paths, every
//! graphql-transport-ws close code, keep-alive, origin checks, and what
//! each subscription delivers (and to whom).

use std::time::Duration;

use futures_util::future::join_all;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::common::*;

const POST_CREATED: &str = "subscription { postCreated { id title author { id } } }";

/// Makes `clients` live on `postCreated` (operation `id`) by creating
/// marker posts until each has received one.
async fn live_on_post_created(node: &Node, token: &str, clients: &mut [&mut GqlWs], id: &str) {
    until_live(clients, id, async |n| {
        let title = format!("[warm-up {n}]");
        create_post(node, token, &title, "").await;
        title
    })
    .await;
}

/// The refusal of operation `id`: an `error` message, or a `next` that
/// carries only errors (then `complete`). Returns the GraphQL errors.
async fn expect_refused(ws: &mut GqlWs, id: &str) -> Vec<Value> {
    let message = ws.next_message(Duration::from_secs(5)).await;
    assert_eq!(
        message["id"], id,
        "expected the refusal of operation {id:?}, got {message}"
    );
    let errors = match message["type"].as_str() {
        Some("error") => message["payload"].clone(),
        Some("next") | Some("data") => {
            let payload = &message["payload"];
            assert!(
                payload["data"].is_null(),
                "a refused subscription must not deliver data: {message}"
            );
            payload["errors"].clone()
        }
        _ => panic!("expected the refusal of operation {id:?}, got {message}"),
    };
    let errors = match errors {
        Value::Array(errors) => errors,
        single @ Value::Object(_) => vec![single],
        other => panic!("a refusal without errors: {other}"),
    };
    assert!(!errors.is_empty(), "a refusal without errors: {message}");
    errors
}

#[tokio::test]
async fn graphql_transport_ws_delivers_the_post_a_mutation_creates_on_both_paths() {
    let node = Node::start(&[]);
    let author = create_user(&node, "Writer").await;

    // /graphql/ws, and the WebSocket upgrade on /graphql itself.
    let mut on_ws_path = GqlWs::connect(&node.ws_url("/graphql/ws"), TRANSPORT_WS).await;
    let mut on_graphql_path = GqlWs::connect(&node.ws_url("/graphql"), TRANSPORT_WS).await;
    for ws in [&mut on_ws_path, &mut on_graphql_path] {
        ws.init_ack(json!({})).await;
        // The protocol's own ping is answered.
        ws.ping_pong().await;
        ws.subscribe("s1", POST_CREATED, json!({})).await;
    }
    live_on_post_created(
        &node,
        &author.token,
        &mut [&mut on_ws_path, &mut on_graphql_path],
        "s1",
    )
    .await;

    let post_id = create_post(&node, &author.token, "Breaking news", "content").await;
    for ws in [&mut on_ws_path, &mut on_graphql_path] {
        let payload = ws.next_data("s1", Duration::from_secs(5)).await;
        assert_eq!(
            payload,
            json!({ "data": { "postCreated": { "id": post_id, "title": "Breaking news", "author": { "id": author.id } } } }),
            "the subscriber must receive the post the mutation created"
        );
    }

    // `complete` releases the id: subscribing again with it is not a duplicate
    // (4409), and the new operation delivers.
    on_ws_path.complete("s1").await;
    on_ws_path.subscribe("s1", POST_CREATED, json!({})).await;
    live_on_post_created(&node, &author.token, &mut [&mut on_ws_path], "s1").await;
    let post_id = create_post(&node, &author.token, "Second", "").await;
    let payload = on_ws_path.next_data("s1", Duration::from_secs(5)).await;
    assert_eq!(
        payload["data"]["postCreated"]["id"],
        post_id.as_str(),
        "{payload}"
    );
}

#[tokio::test]
async fn legacy_graphql_ws_delivers_the_post_a_mutation_creates() {
    let node = Node::start(&[]);
    let author = create_user(&node, "Legacy").await;
    let mut clients = Vec::new();
    for path in ["/graphql", "/graphql/ws"] {
        let mut ws = GqlWs::connect(&node.ws_url(path), LEGACY_WS).await;
        ws.init_ack(json!({})).await;
        ws.subscribe("1", POST_CREATED, json!({})).await;
        clients.push(ws);
    }
    let [on_graphql, on_ws] = clients.as_mut_slice() else {
        unreachable!()
    };
    live_on_post_created(&node, &author.token, &mut [on_graphql, on_ws], "1").await;

    let post_id = create_post(&node, &author.token, "Old school", "").await;
    for ws in clients.iter_mut() {
        let payload = ws.next_data("1", Duration::from_secs(5)).await;
        assert_eq!(
            payload["data"]["postCreated"]["id"],
            post_id.as_str(),
            "legacy `data` message: {payload}"
        );
        assert_eq!(payload["data"]["postCreated"]["title"], "Old school");
    }
    // `stop` ends the operation; the connection stays usable.
    clients[0].complete("1").await;
    clients[0].subscribe("2", POST_CREATED, json!({})).await;
    live_on_post_created(&node, &author.token, &mut [&mut clients[0]], "2").await;
}

/// One connection that misbehaves in one way, and the close it gets.
async fn provoke(url: String, init: bool, messages: Vec<String>) -> (u16, String, Duration) {
    let mut ws = GqlWs::connect(&url, TRANSPORT_WS).await;
    let started = Instant::now();
    if init {
        ws.init_ack(json!({})).await;
    }
    for message in messages {
        ws.send_text(message).await;
    }
    let (code, reason) = ws.expect_close(Duration::from_secs(10)).await;
    (code, reason, started.elapsed())
}

#[tokio::test]
async fn every_graphql_transport_ws_close_code_is_sent_when_provoked() {
    let node = Node::start(&[
        ("SUBGATE__WEBSOCKET__CONNECTION_INIT_TIMEOUT_SECONDS", "1"),
        ("SUBGATE__WEBSOCKET__MAX_FRAME_BYTES", "4096"),
    ]);
    let url = node.ws_url("/graphql/ws");
    let subscribe = |id: &str| {
        json!({ "id": id, "type": "subscribe", "payload": { "query": POST_CREATED } }).to_string()
    };
    let init =
        |payload: Value| json!({ "type": "connection_init", "payload": payload }).to_string();
    let big = json!({ "type": "ping", "payload": { "pad": "x".repeat(8192) } }).to_string();
    let cases: Vec<(&str, u16, bool, Vec<String>)> = vec![
        ("no connection_init within the timeout", 4408, false, vec![]),
        (
            "subscribe before connection_ack",
            4401,
            false,
            vec![subscribe("a")],
        ),
        (
            "a message that is not JSON",
            4400,
            true,
            vec!["hello".to_owned()],
        ),
        (
            "a message of unknown type",
            4400,
            true,
            vec![json!({ "type": "bogus" }).to_string()],
        ),
        (
            "subscribe without an id",
            4400,
            true,
            vec![json!({ "type": "subscribe", "payload": { "query": POST_CREATED } }).to_string()],
        ),
        (
            "a bad token in connection_init",
            4403,
            false,
            vec![init(json!({ "token": "not-a-jwt" }))],
        ),
        (
            "two operations with one id",
            4409,
            true,
            vec![subscribe("dup"), subscribe("dup")],
        ),
        (
            "a second connection_init",
            4429,
            true,
            vec![init(json!({}))],
        ),
        (
            "a frame over max_frame_bytes",
            1009,
            true,
            vec![big.clone()],
        ),
        (
            "a frame over max_frame_bytes before init",
            1009,
            false,
            vec![big],
        ),
    ];
    // Independent connections: provoke them all at once.
    let results = join_all(
        cases
            .iter()
            .map(|(_, _, init, messages)| provoke(url.clone(), *init, messages.clone())),
    )
    .await;
    let mut wrong = Vec::new();
    for ((what, expected, _, _), (code, reason, elapsed)) in cases.iter().zip(&results) {
        if code != expected {
            wrong.push(format!(
                "{what}: expected {expected}, got {code} {reason:?}"
            ));
        }
        if *expected == 4408 {
            assert!(
                *elapsed >= Duration::from_millis(900),
                "4408 came after {elapsed:?}, before the 1s init timeout"
            );
        }
    }
    assert!(wrong.is_empty(), "wrong close codes:\n{}", wrong.join("\n"));

    // The node is unharmed, and a well-behaved client is still served.
    assert_eq!(get(&node, "/healthz").await.status, reqwest::StatusCode::OK);
    let mut ws = GqlWs::connect(&url, TRANSPORT_WS).await;
    ws.init_ack(json!({})).await;
    ws.ping_pong().await;
}

#[tokio::test]
async fn subscriptions_per_connection_are_limited_without_harming_the_others() {
    let node = Node::start(&[("SUBGATE__WEBSOCKET__MAX_SUBSCRIPTIONS_PER_CONNECTION", "2")]);
    let author = create_user(&node, "Limit").await;
    let mut ws = GqlWs::connect(&node.ws_url("/graphql/ws"), TRANSPORT_WS).await;
    ws.init_ack(json!({})).await;
    let by_author = "subscription($id: ID!) { userUpdated(id: $id) { id name } }";
    ws.subscribe("one", POST_CREATED, json!({})).await;
    ws.subscribe("two", by_author, json!({ "id": author.id }))
        .await;
    ws.subscribe("three", POST_CREATED, json!({})).await;
    // The third is refused with an `error` for its id; the connection stays.
    let errors = expect_refused(&mut ws, "three").await;
    assert!(!errors.is_empty());
    live_on_post_created(&node, &author.token, &mut [&mut ws], "one").await;
    // Once one ends, there is room again.
    ws.complete("two").await;
    ws.subscribe("four", by_author, json!({ "id": author.id }))
        .await;
    let rename = "mutation($input: UpdateUserInput!) { updateUser(input: $input) { user { id } errors { code } } }";
    until_live(&mut [&mut ws], "four", async |n| {
        let name = format!("[name {n}]");
        gql_ok(
            &node,
            rename,
            json!({ "input": { "id": author.id, "name": name } }),
            Some(&author.token),
        )
        .await;
        name
    })
    .await;
}

#[tokio::test]
async fn a_peer_that_stops_answering_pings_is_dropped_and_a_live_one_is_not() {
    let node = Node::start(&[("SUBGATE__WEBSOCKET__PING_INTERVAL_SECONDS", "1")]);
    let mut live = GqlWs::connect(&node.ws_url("/graphql/ws"), TRANSPORT_WS).await;
    live.init_ack(json!({})).await;
    let started = Instant::now();

    // The live client only reads, which answers the server's pings; it
    // must outlast the silent one.
    let silent = tokio::time::timeout(Duration::from_secs(10), async {
        let mut raw = RawWs::upgrade(node.addr, "/graphql/ws", TRANSPORT_WS).await;
        raw.send_text(r#"{"type":"connection_init"}"#).await;
        raw.read_until_closed().await
    });
    let reading = async {
        loop {
            if let Read::Closed(code, reason) = live.read(Duration::from_secs(30)).await {
                return (code, reason);
            }
        }
    };
    let (pings, code, dropped_at) = tokio::select! {
        silent = silent => silent.expect("a peer silent for 10 ping intervals of 1s is still connected"),
        closed = reading => panic!("the client that answers pings was closed: {closed:?}"),
    };
    let after = dropped_at - started;
    assert!(
        pings >= 1,
        "the server never pinged the silent client (dropped after {after:?}, close {code:?})"
    );
    assert!(
        after >= Duration::from_millis(1500),
        "the silent peer was dropped after only {after:?}"
    );
    // The live client is still served after the silent one is gone.
    live.ping_pong().await;
}

#[tokio::test]
async fn upgrades_from_origins_not_allowed_are_refused() {
    let node = Node::start(&[(
        "SUBGATE__SERVER__ALLOWED_ORIGINS",
        "https://app.example.com,https://admin.example.com",
    )]);
    let url = node.ws_url("/graphql/ws");
    let connect = |origin| {
        try_connect(
            &url,
            ConnectOptions {
                subprotocol: Some(TRANSPORT_WS),
                origin,
                ..Default::default()
            },
        )
    };
    for origin in [
        "https://evil.example.com",
        "http://app.example.com",
        "https://app.example.com.evil.net",
    ] {
        match connect(Some(origin)).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(
                    response.status(),
                    403,
                    "Origin {origin} must be refused with 403"
                )
            }
            Err(e) => panic!("Origin {origin}: expected an HTTP 403 refusal, got {e}"),
            Ok(_) => panic!("Origin {origin} is not allowed, yet the upgrade succeeded"),
        }
    }
    for origin in ["https://app.example.com", "https://admin.example.com"] {
        let mut ws = connect(Some(origin))
            .await
            .unwrap_or_else(|e| panic!("allowed Origin {origin} refused: {e}"));
        ws.init_ack(json!({})).await;
    }
}

#[tokio::test]
async fn subscriptions_deliver_only_what_their_arguments_select() {
    let node = Node::start(&[]);
    let owner = create_user(&node, "Owner").await;
    let outsider = create_user(&node, "Outsider").await;
    let watched = create_post(&node, &owner.token, "watched", "").await;
    let ignored = create_post(&node, &owner.token, "ignored", "").await;
    let channel = |private: bool, name: &str| {
        let node = &node;
        let token = owner.token.clone();
        let name = name.to_owned();
        async move {
            let data = gql_ok(
                node,
                "mutation($input: CreateChannelInput!) { createChannel(input: $input) { channel { id } errors { code } } }",
                json!({ "input": { "name": name, "isPrivate": private } }),
                Some(&token),
            )
            .await;
            data["createChannel"]["channel"]["id"]
                .as_str()
                .unwrap_or_else(|| panic!("{data}"))
                .to_owned()
        }
    };
    let general = channel(false, "general").await;
    let random = channel(false, "random").await;
    let secret = channel(true, "secret").await;

    let mut ws = GqlWs::connect(&node.ws_url("/graphql/ws"), TRANSPORT_WS).await;
    ws.init_ack(json!({ "token": outsider.token })).await;
    ws.subscribe(
        "post",
        "subscription($id: ID!) { postUpdated(id: $id) { id title } }",
        json!({ "id": watched }),
    )
    .await;
    ws.subscribe("chan", "subscription($c: ID!) { messageReceived(channelId: $c) { id channelId content author { id } } }", json!({ "c": general }))
        .await;

    // A private channel the caller is not in is refused.
    ws.subscribe(
        "secret",
        "subscription($c: ID!) { messageReceived(channelId: $c) { id } }",
        json!({ "c": secret }),
    )
    .await;
    let errors = expect_refused(&mut ws, "secret").await;
    assert_eq!(errors[0]["extensions"]["code"], "FORBIDDEN", "{errors:?}");

    let update = "mutation($input: UpdatePostInput!) { updatePost(input: $input) { post { id } errors { code } } }";
    let send = "mutation($input: SendMessageInput!) { sendMessage(input: $input) { message { id } errors { code } } }";
    until_live(&mut [&mut ws], "post", async |n| {
        let title = format!("[edit {n}]");
        gql_ok(
            &node,
            update,
            json!({ "input": { "id": watched, "title": title } }),
            Some(&owner.token),
        )
        .await;
        title
    })
    .await;
    until_live(&mut [&mut ws], "chan", async |n| {
        let content = format!("[hello {n}]");
        gql_ok(
            &node,
            send,
            json!({ "input": { "channelId": general, "content": content } }),
            Some(&owner.token),
        )
        .await;
        content
    })
    .await;

    // The other post and the other channel change first; had they leaked,
    // they would arrive before the events that were selected.
    gql_ok(
        &node,
        update,
        json!({ "input": { "id": ignored, "title": "not for you" } }),
        Some(&owner.token),
    )
    .await;
    gql_ok(
        &node,
        send,
        json!({ "input": { "channelId": random, "content": "not for you" } }),
        Some(&owner.token),
    )
    .await;
    gql_ok(
        &node,
        update,
        json!({ "input": { "id": watched, "title": "for you" } }),
        Some(&owner.token),
    )
    .await;
    let payload = ws.next_data("post", Duration::from_secs(5)).await;
    assert_eq!(
        payload["data"]["postUpdated"],
        json!({ "id": watched, "title": "for you" })
    );
    let data = gql_ok(
        &node,
        send,
        json!({ "input": { "channelId": general, "content": "for you" } }),
        Some(&owner.token),
    )
    .await;
    let message_id = data["sendMessage"]["message"]["id"].clone();
    let payload = ws.next_data("chan", Duration::from_secs(5)).await;
    assert_eq!(
        payload["data"]["messageReceived"],
        json!({ "id": message_id, "channelId": general, "content": "for you", "author": { "id": owner.id } })
    );
}

/// The id of the newest notification of `user` not in `known`, waiting
/// (polling the query) until it exists.
async fn new_notification(node: &Node, user: &TestUser, known: &mut Vec<String>) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let data = gql_ok(
            node,
            "{ notifications(first: 100) { nodes { id } } }",
            json!({}),
            Some(&user.token),
        )
        .await;
        let ids: Vec<String> = data["notifications"]["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .map(|n| n["id"].as_str().expect("id").to_owned())
            .collect();
        if let Some(id) = ids.into_iter().find(|id| !known.contains(id)) {
            known.push(id.clone());
            return id;
        }
        assert!(
            Instant::now() < deadline,
            "no new notification for {} within 5s",
            user.id
        );
    }
}

#[tokio::test]
async fn notification_received_yields_only_the_callers_own() {
    let node = Node::start(&[]);
    let alice = create_user(&node, "Alice").await;
    let carol = create_user(&node, "Carol").await;
    let bob = create_user(&node, "Bob").await;
    let alice_post = create_post(&node, &alice.token, "Alice's", "").await;
    let carol_post = create_post(&node, &carol.token, "Carol's", "").await;
    let comment = async |post: &str, content: &str| {
        gql_ok(
            &node,
            "mutation($input: CreateCommentInput!) { createComment(input: $input) { comment { id } errors { code } } }",
            json!({ "input": { "postId": post, "content": content } }),
            Some(&bob.token),
        )
        .await;
    };
    let subscription = "subscription { notificationReceived { id type message payload read } }";

    // Anonymous: refused.
    let mut anonymous = GqlWs::connect(&node.ws_url("/graphql/ws"), TRANSPORT_WS).await;
    anonymous.init_ack(json!({})).await;
    anonymous.subscribe("n", subscription, json!({})).await;
    let errors = expect_refused(&mut anonymous, "n").await;
    assert_eq!(
        errors[0]["extensions"]["code"], "UNAUTHORIZED",
        "{errors:?}"
    );

    // Both token forms of connection_init.
    let mut alice_ws = GqlWs::connect(&node.ws_url("/graphql/ws"), TRANSPORT_WS).await;
    alice_ws
        .init_ack(json!({ "authorization": format!("Bearer {}", alice.token) }))
        .await;
    alice_ws.subscribe("n", subscription, json!({})).await;
    let mut carol_ws = GqlWs::connect(&node.ws_url("/graphql"), TRANSPORT_WS).await;
    carol_ws.init_ack(json!({ "token": carol.token })).await;
    carol_ws.subscribe("n", subscription, json!({})).await;

    let (mut alice_known, mut carol_known) = (Vec::new(), Vec::new());
    until_live(&mut [&mut alice_ws], "n", async |n| {
        comment(&alice_post, &format!("warm-up {n}")).await;
        new_notification(&node, &alice, &mut alice_known).await
    })
    .await;
    until_live(&mut [&mut carol_ws], "n", async |n| {
        comment(&carol_post, &format!("warm-up {n}")).await;
        new_notification(&node, &carol, &mut carol_known).await
    })
    .await;

    // Alice's notification is created first: had it leaked to Carol, it
    // would be the first thing Carol's subscription delivers.
    comment(&alice_post, "for Alice").await;
    let for_alice = new_notification(&node, &alice, &mut alice_known).await;
    comment(&carol_post, "for Carol").await;
    let for_carol = new_notification(&node, &carol, &mut carol_known).await;

    let payload = carol_ws.next_data("n", Duration::from_secs(5)).await;
    let got = &payload["data"]["notificationReceived"];
    assert_eq!(
        got["id"],
        for_carol.as_str(),
        "Carol received someone else's notification: {payload}"
    );
    let payload = alice_ws.next_data("n", Duration::from_secs(5)).await;
    let got = &payload["data"]["notificationReceived"];
    assert_eq!(got["id"], for_alice.as_str(), "{payload}");
    assert_eq!(got["type"], "comment.created");
    assert_eq!(got["read"], false);
    assert!(
        got["payload"].to_string().contains(&alice_post),
        "the payload names the post: {got}"
    );
}

#[tokio::test]
async fn events_delivers_the_envelopes_of_the_named_topics_and_keeps_private_ones_private() {
    let node = Node::start(&[]);
    let alice = create_user(&node, "Alice").await;
    let bob = create_user(&node, "Bob").await;
    let post = create_post(&node, &alice.token, "watched", "").await;
    let events = "subscription($topics: [String!]!) { events(topics: $topics) { id topic type payload timestamp } }";

    let mut ws = GqlWs::connect(&node.ws_url("/graphql/ws"), TRANSPORT_WS).await;
    ws.init_ack(json!({ "token": bob.token })).await;
    // The generic subscription must not be a way around notification privacy.
    ws.subscribe(
        "theirs",
        events,
        json!({ "topics": [format!("notifications:{}", alice.id)] }),
    )
    .await;
    let errors = expect_refused(&mut ws, "theirs").await;
    assert_eq!(errors[0]["extensions"]["code"], "FORBIDDEN", "{errors:?}");

    ws.subscribe(
        "e",
        events,
        json!({ "topics": ["posts", format!("post:{post}")] }),
    )
    .await;
    until_live(&mut [&mut ws], "e", async |n| {
        let title = format!("[warm-up {n}]");
        create_post(&node, &alice.token, &title, "").await;
        title
    })
    .await;

    let created = create_post(&node, &alice.token, "fresh", "").await;
    gql_ok(
        &node,
        "mutation($input: UpdatePostInput!) { updatePost(input: $input) { post { id } errors { code } } }",
        json!({ "input": { "id": post, "title": "edited" } }),
        Some(&alice.token),
    )
    .await;
    // Two topics: each is ordered, but nothing orders one against the other.
    let mut received = Vec::new();
    for _ in 0..2 {
        let payload = ws.next_data("e", Duration::from_secs(5)).await;
        received.push(payload["data"]["events"].clone());
    }
    received.sort_by_key(|event| event["type"].as_str().unwrap_or("").to_owned());
    let mut ids = Vec::new();
    let expected = [
        ("posts", "post.created", &created, "fresh"),
        (&format!("post:{post}")[..], "post.updated", &post, "edited"),
    ];
    for (event, (topic, kind, id, title)) in received.iter().zip(expected) {
        assert_eq!(event["topic"], topic, "{event}");
        assert_eq!(event["type"], kind, "{event}");
        assert_eq!(
            event["payload"]["id"],
            id.as_str(),
            "the envelope carries the entity: {event}"
        );
        assert_eq!(event["payload"]["title"], title, "{event}");
        let timestamp = event["timestamp"]
            .as_str()
            .unwrap_or_else(|| panic!("no timestamp: {event}"));
        assert!(
            chrono::DateTime::parse_from_rfc3339(timestamp).is_ok(),
            "timestamp {timestamp:?} is not RFC 3339"
        );
        ids.push(
            event["id"]
                .as_str()
                .unwrap_or_else(|| panic!("no id: {event}"))
                .to_owned(),
        );
    }
    assert_ne!(ids[0], ids[1], "event ids are unique");

    // Topics that backends publish to need a caller.
    let mut anonymous = GqlWs::connect(&node.ws_url("/graphql/ws"), TRANSPORT_WS).await;
    anonymous.init_ack(json!({})).await;
    anonymous
        .subscribe("orders", events, json!({ "topics": ["orders"] }))
        .await;
    let errors = expect_refused(&mut anonymous, "orders").await;
    assert_eq!(
        errors[0]["extensions"]["code"], "UNAUTHORIZED",
        "{errors:?}"
    );
}
