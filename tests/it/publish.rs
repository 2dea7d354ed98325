//! `POST /api/v1/publish` as trusted backends use it: who may publish, what
//! is accepted, what subscribers then receive and may read, and what a
//! backend hears when the node cannot take the event.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::common::jwt::{now, sign};
use crate::common::*;
use jsonwebtoken::Algorithm;

const STREAM: &str = "/api/v1/events/stream";
const WAIT: Duration = Duration::from_secs(10);

/// The `error.code` of a refused publish, checking the status too.
fn error_code(reply: &Reply, status: StatusCode) -> String {
    assert_eq!(reply.status, status, "{}", reply.body);
    let body = reply.json();
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error code: {body}"))
        .to_owned()
}

/// An event stream that must be accepted, past its `retry:` line.
async fn subscribed(node: &Node, path: &str, token: Option<&str>) -> SseStream {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    let mut stream = open_stream(node, path, &headers)
        .await
        .unwrap_or_else(|reply| panic!("GET {path} was refused: {} {}", reply.status, reply.body));
    assert!(matches!(stream.read(WAIT).await, SseRead::Block(b) if b.get("retry").is_some()));
    stream
}

/// The status of opening `path` as `token`'s user (anonymous: `None`).
async fn stream_status(node: &Node, path: &str, token: Option<&str>) -> StatusCode {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    match open_stream(node, path, &headers).await {
        Ok(stream) => stream.status,
        Err(reply) => reply.status,
    }
}

#[tokio::test]
async fn a_publish_is_accepted_with_its_position_and_reaches_subscribers_as_published() {
    let node = publisher_node(&[]);
    let reader = create_user(&node, "Reader").await;
    let mut stream = subscribed(
        &node,
        &format!("{STREAM}?topic=orders"),
        Some(&reader.token),
    )
    .await;

    let reply = publish_raw(
        &node,
        Some(API_KEY),
        json!({ "topic": "orders", "type": "order.shipped", "payload": { "order": 42, "items": ["a", "b"] } }).to_string(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.body);
    let answer = reply.json();
    assert_eq!(answer["topic"], "orders");
    let id = answer["id"].as_str().unwrap().to_owned();
    let (epoch, seq) = id
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{id} is not EPOCH:SEQ"));
    assert_eq!(seq, "1", "the first event of a topic");
    let second = publish(&node, "orders", "order.cancelled", json!({ "order": 42 })).await;
    assert_eq!(
        second,
        format!("{epoch}:2"),
        "the next position of the same history"
    );

    let shipped = stream.next_event(WAIT).await;
    assert_eq!(shipped.event(), Some("order.shipped"));
    assert_eq!(shipped.id(), Some(id.as_str()));
    let envelope = shipped.json();
    assert_eq!(envelope["id"], id.as_str());
    assert_eq!(envelope["topic"], "orders");
    assert_eq!(envelope["type"], "order.shipped");
    assert_eq!(
        envelope["payload"],
        json!({ "order": 42, "items": ["a", "b"] })
    );
    assert!(
        envelope["timestamp"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{envelope}"
    );
    assert_eq!(stream.next_event(WAIT).await.id(), Some(second.as_str()));

    // The domain's own topics take backend events too: this is how a
    // backend notifies a user.
    let mut mine = subscribed(&node, STREAM, Some(&reader.token)).await;
    let note = publish(
        &node,
        &format!("notifications:{}", reader.id),
        "invoice.ready",
        json!({ "amount": 12 }),
    )
    .await;
    let got = mine.next_event(WAIT).await;
    assert_eq!(
        (got.event(), got.id()),
        (Some("invoice.ready"), Some(note.as_str()))
    );
}

#[tokio::test]
async fn api_keys_and_tokens_with_the_publish_scope_may_publish_and_nothing_else_may() {
    let node = publisher_node(&[]);
    let body = json!({ "topic": "audit", "type": "login", "payload": {} }).to_string();
    let secret = node.secret().to_owned();

    assert_eq!(
        publish_raw(&node, Some(API_KEY), body.clone()).await.status,
        StatusCode::ACCEPTED
    );
    for scope in ["publish", "read publish write"] {
        let token = scoped_token(&secret, "billing-service", scope);
        let reply = publish_raw(&node, Some(&token), body.clone()).await;
        assert_eq!(
            reply.status,
            StatusCode::ACCEPTED,
            "scope {scope:?}: {}",
            reply.body
        );
    }

    // Wrong or missing credentials: 401, with the challenge.
    let near_miss = format!("{}x", &API_KEY[..API_KEY.len() - 1]);
    let (_, expired) = bad_tokens(&secret, "billing-service").remove(0);
    for (what, bearer) in [
        ("a wrong key", Some(near_miss.as_str())),
        ("an expired token", Some(&*expired)),
        ("nothing", None),
    ] {
        let reply = publish_raw(&node, bearer, body.clone()).await;
        assert_eq!(
            error_code(&reply, StatusCode::UNAUTHORIZED),
            "unauthorized",
            "{what}"
        );
        assert_eq!(reply.header("www-authenticate"), Some("Bearer"), "{what}");
    }
    let basic = node
        .http
        .post(node.http_url("/api/v1/publish"))
        .header("authorization", format!("Basic {API_KEY}"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), StatusCode::UNAUTHORIZED);

    // A valid token without the scope: known, and not allowed.
    for scope in [None, Some("read"), Some("publisher")] {
        let token = match scope {
            Some(scope) => scoped_token(&secret, "someone", scope),
            None => token(&secret, "someone"),
        };
        let reply = publish_raw(&node, Some(&token), body.clone()).await;
        assert_eq!(
            error_code(&reply, StatusCode::FORBIDDEN),
            "forbidden",
            "scope {scope:?}"
        );
    }
}

#[tokio::test]
async fn a_token_whose_scopes_are_a_json_array_may_publish() {
    let node = publisher_node(&[]);
    let watcher = token(node.secret(), "watcher");
    let mut stream = subscribed(&node, &format!("{STREAM}?topic=ledger"), Some(&watcher)).await;
    let body = json!({ "topic": "ledger", "type": "entry", "payload": { "n": 1 } }).to_string();
    // As identity providers issue them: `scope` or `scp`, as an array.
    for (claim, scopes) in [
        ("scope", json!(["read", "publish"])),
        ("scp", json!(["publish"])),
        ("scp", json!("read publish")),
    ] {
        let token = sign(
            Algorithm::HS256,
            &json!({ "sub": "ledger-service", "exp": now() + 3600, claim: scopes }),
            node.secret(),
        );
        let reply = publish_raw(&node, Some(&token), body.clone()).await;
        assert_eq!(
            reply.status,
            StatusCode::ACCEPTED,
            "{claim}: {scopes}: {}",
            reply.body
        );
        let got = stream.next_event(WAIT).await;
        assert_eq!(got.id(), reply.json()["id"].as_str(), "{claim}: {scopes}");
    }
    // An array without `publish` is a valid token that may not publish.
    let reader = sign(
        Algorithm::HS256,
        &json!({ "sub": "reader", "exp": now() + 3600, "scope": ["read"] }),
        node.secret(),
    );
    let reply = publish_raw(&node, Some(&reader), body).await;
    assert_eq!(error_code(&reply, StatusCode::FORBIDDEN), "forbidden");
}

#[tokio::test]
async fn bad_publishes_are_refused_saying_why() {
    let node = publisher_node(&[("SUBGATE__PUBLISH__MAX_PAYLOAD_BYTES", "1024")]);
    let refused = async |body: String, status: StatusCode, code: &str, says: &str| {
        let reply = publish_raw(&node, Some(API_KEY), body.clone()).await;
        assert_eq!(error_code(&reply, status), code, "{body}");
        let message = reply.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            message.contains(says),
            "{body}: the message {message:?} should mention {says:?}"
        );
    };
    let with = |topic: &str, kind: &str, payload: serde_json::Value| {
        json!({ "topic": topic, "type": kind, "payload": payload }).to_string()
    };

    // The payload limit is on the payload, not the body around it.
    let fits = json!({ "blob": "x".repeat(1000) });
    assert_eq!(
        publish_raw(&node, Some(API_KEY), with("t", "x", fits))
            .await
            .status,
        StatusCode::ACCEPTED
    );
    refused(
        with("t", "x", json!({ "blob": "x".repeat(1100) })),
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        "1024",
    )
    .await;

    refused(
        with("has space", "x", json!({})),
        StatusCode::BAD_REQUEST,
        "bad_request",
        "topic",
    )
    .await;
    refused(
        with("", "x", json!({})),
        StatusCode::BAD_REQUEST,
        "bad_request",
        "topic",
    )
    .await;
    refused(
        with(&"t".repeat(201), "x", json!({})),
        StatusCode::BAD_REQUEST,
        "bad_request",
        "topic",
    )
    .await;
    refused(
        with("t", "Order.Shipped", json!({})),
        StatusCode::BAD_REQUEST,
        "bad_request",
        "type",
    )
    .await;
    refused(
        with("t", "", json!({})),
        StatusCode::BAD_REQUEST,
        "bad_request",
        "type",
    )
    .await;
    refused(
        with("t", &"a".repeat(101), json!({})),
        StatusCode::BAD_REQUEST,
        "bad_request",
        "type",
    )
    .await;
    refused(
        "not json".into(),
        StatusCode::BAD_REQUEST,
        "bad_request",
        "JSON",
    )
    .await;
    refused(
        json!({ "topic": "t", "payload": {} }).to_string(),
        StatusCode::BAD_REQUEST,
        "bad_request",
        "type",
    )
    .await;
    refused(
        json!({ "topic": "t", "type": "x" }).to_string(),
        StatusCode::BAD_REQUEST,
        "bad_request",
        "payload",
    )
    .await;
    refused(
        json!({ "topic": "t", "type": "x", "payload": {}, "reader": "public" }).to_string(),
        StatusCode::BAD_REQUEST,
        "bad_request",
        "reader",
    )
    .await;
    refused(
        json!({ "topic": "t", "type": "x", "payload": {}, "readers": "everyone" }).to_string(),
        StatusCode::BAD_REQUEST,
        "bad_request",
        "readers",
    )
    .await;
    refused(
        json!({ "topic": "posts", "type": "x", "payload": {}, "readers": "public" }).to_string(),
        StatusCode::BAD_REQUEST,
        "bad_request",
        "readers",
    )
    .await;
}

#[tokio::test]
async fn a_backend_topic_is_readable_as_its_publisher_said_until_told_otherwise() {
    let node = publisher_node(&[]);
    let ann = create_user(&node, "Ann").await;
    let bob = create_user(&node, "Bob").await;
    let path = format!("{STREAM}?topic=reports");
    let statuses = async || {
        [
            stream_status(&node, &path, Some(&ann.token)).await,
            stream_status(&node, &path, Some(&bob.token)).await,
            stream_status(&node, &path, None).await,
        ]
    };
    let (ok, forbidden, unauthorized) = (
        StatusCode::OK,
        StatusCode::FORBIDDEN,
        StatusCode::UNAUTHORIZED,
    );

    // No rule yet: any authenticated caller.
    assert_eq!(statuses().await, [ok, ok, unauthorized]);
    let readers = |readers: serde_json::Value| json!({ "topic": "reports", "type": "report", "payload": {}, "readers": readers });
    publish_body(&node, &readers(json!({ "users": [ann.id] }))).await;
    assert_eq!(statuses().await, [ok, forbidden, unauthorized]);
    // A publish that says nothing of readers keeps the rule.
    publish(&node, "reports", "report", json!({})).await;
    assert_eq!(statuses().await, [ok, forbidden, unauthorized]);
    publish_body(&node, &readers(json!("public"))).await;
    assert_eq!(statuses().await, [ok, ok, ok]);
    publish_body(&node, &readers(json!("authenticated"))).await;
    assert_eq!(statuses().await, [ok, ok, unauthorized]);
    // The same rule decides GraphQL subscriptions.
    publish_body(&node, &readers(json!({ "users": [ann.id] }))).await;
    let mut ws = GqlWs::connect(&node.ws_url("/graphql/ws"), TRANSPORT_WS).await;
    ws.init_ack(json!({ "token": bob.token })).await;
    ws.subscribe(
        "r",
        "subscription { events(topics: [\"reports\"]) { id } }",
        json!({}),
    )
    .await;
    let refusal = ws.next_message(WAIT).await;
    assert!(refusal.to_string().contains("FORBIDDEN"), "{refusal}");
}

#[tokio::test]
async fn a_publisher_over_its_rate_is_told_when_to_retry() {
    let node = publisher_node(&[
        ("SUBGATE__RATELIMIT__PUBLISH_PER_SECOND", "0.5"),
        ("SUBGATE__RATELIMIT__PUBLISH_BURST", "2"),
    ]);
    let body = json!({ "topic": "metered", "type": "tick", "payload": {} }).to_string();
    for _ in 0..2 {
        assert_eq!(
            publish_raw(&node, Some(API_KEY), body.clone()).await.status,
            StatusCode::ACCEPTED
        );
    }
    let limited = publish_raw(&node, Some(API_KEY), body.clone()).await;
    assert_eq!(
        error_code(&limited, StatusCode::TOO_MANY_REQUESTS),
        "rate_limited"
    );
    let retry_after: u64 = limited
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("whole seconds");
    assert!((1..=2).contains(&retry_after), "Retry-After: {retry_after}");
    // Another publisher has a bucket of its own.
    let token = scoped_token(node.secret(), "other-service", "publish");
    assert_eq!(
        publish_raw(&node, Some(&token), body).await.status,
        StatusCode::ACCEPTED
    );
}

/// An HTTP client whose connections come from `source` (any 127.0.0.0/8
/// address reaches the node): another client address.
fn client_from(source: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .local_address(source.parse::<std::net::IpAddr>().expect("an address"))
        .build()
        .expect("build an HTTP client")
}

async fn publish_from(client: &reqwest::Client, node: &Node, bearer: &str) -> reqwest::Response {
    client
        .post(node.http_url("/api/v1/publish"))
        .header("authorization", format!("Bearer {bearer}"))
        .json(&json!({ "topic": "guarded", "type": "tick", "payload": {} }))
        .send()
        .await
        .expect("POST /api/v1/publish")
}

#[tokio::test]
async fn guessing_keys_is_cut_off_per_address_and_other_addresses_publish_on() {
    let node = publisher_node(&[
        (
            "SUBGATE__RATELIMIT__PUBLISH_AUTH_FAILURES_PER_SECOND",
            "0.05",
        ),
        ("SUBGATE__RATELIMIT__PUBLISH_AUTH_FAILURES_BURST", "5"),
    ]);
    let guesser = client_from("127.0.0.2");
    let (_, expired) = bad_tokens(node.secret(), "svc").remove(0);
    let mut statuses = Vec::new();
    for i in 0..40 {
        let guess = if i % 2 == 0 {
            format!("it-publish-key-guess-{i:08}")
        } else {
            expired.clone()
        };
        statuses.push(publish_from(&guesser, &node, &guess).await);
    }
    let codes: Vec<u16> = statuses.iter().map(|r| r.status().as_u16()).collect();
    assert_eq!(&codes[..5], &[401; 5], "the budget: {codes:?}");
    assert!(
        codes[5..].iter().all(|c| *c == 429),
        "then cut off: {codes:?}"
    );
    let retry_after: u64 = statuses[39].headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .expect("whole seconds");
    assert!(
        (1..=20).contains(&retry_after),
        "Retry-After: {retry_after}"
    );
    // Even the right key is refused from there until the bucket refills:
    // a 202 would tell the guesser it had found it.
    let right = publish_from(&guesser, &node, API_KEY).await;
    assert_eq!(right.status(), StatusCode::TOO_MANY_REQUESTS);
    // From another address the right key publishes, as do tokens.
    let backend = client_from("127.0.0.3");
    assert_eq!(
        publish_from(&backend, &node, API_KEY).await.status(),
        StatusCode::ACCEPTED
    );
    let token = scoped_token(node.secret(), "svc", "publish");
    assert_eq!(
        publish_from(&backend, &node, &token).await.status(),
        StatusCode::ACCEPTED
    );
    let metrics = get(&node, "/metrics").await.body;
    assert!(
        metrics.contains("subgate_rate_limited_total{scope=\"publish_auth\"} 36"),
        "35 guesses and the right key refused: {metrics}"
    );
}

#[tokio::test]
async fn a_publish_the_bus_cannot_take_is_503_never_202() {
    let mut redis = TestRedis::start();
    let node = publisher_node(&[
        ("SUBGATE__REDIS__URL", &redis.url()),
        ("SUBGATE__REDIS__COMMAND_TIMEOUT_SECONDS", "0.5"),
        ("SUBGATE__REDIS__MAX_BACKOFF_SECONDS", "0.2"),
    ]);
    let plain = json!({ "topic": "jobs", "type": "job.done", "payload": {} });
    let with_readers =
        json!({ "topic": "jobs", "type": "job.done", "payload": {}, "readers": "public" });
    publish_body(&node, &with_readers).await;
    redis.kill();
    for body in [&plain, &with_readers] {
        let reply = publish_raw(&node, Some(API_KEY), body.to_string()).await;
        assert_eq!(
            error_code(&reply, StatusCode::SERVICE_UNAVAILABLE),
            "unavailable",
            "{body}"
        );
        assert_eq!(reply.header("retry-after"), Some("1"));
    }
    // Back: publishing works again without anyone doing anything.
    redis.restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let reply = publish_raw(&node, Some(API_KEY), plain.to_string()).await;
        if reply.status == StatusCode::ACCEPTED {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {} after Redis returned: {}",
            reply.status,
            reply.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn tightening_a_topics_readers_stops_delivery_to_those_it_leaves_out() {
    let node = publisher_node(&[]);
    let ann = create_user(&node, "Ann").await;
    let bob = create_user(&node, "Bob").await;
    let both = json!({ "users": [ann.id, bob.id] });
    publish_body(
        &node,
        &json!({ "topic": "audit", "type": "entry", "payload": { "n": 0 }, "readers": both }),
    )
    .await;
    // Bob reads over GraphQL and SSE, Ann over GraphQL.
    let subscribe = async |user: &TestUser| {
        let mut ws = GqlWs::connect(&node.ws_url("/graphql/ws"), TRANSPORT_WS).await;
        ws.init_ack(json!({ "token": user.token })).await;
        ws.subscribe(
            "a",
            "subscription { events(topics: [\"audit\"]) { id payload } }",
            json!({}),
        )
        .await;
        ws
    };
    let mut ann_ws = subscribe(&ann).await;
    let mut bob_ws = subscribe(&bob).await;
    let mut bob_sse = open_stream(
        &node,
        &format!("{STREAM}?topic=audit&token={}", bob.token),
        &[],
    )
    .await
    .expect("Bob may read audit");
    until_live(&mut [&mut ann_ws, &mut bob_ws], "a", async |n| {
        publish(&node, "audit", "entry", json!({ "n": n + 1 })).await
    })
    .await;
    // Drain Bob's SSE stream up to now.
    let marker = publish(&node, "audit", "entry", json!({ "n": "marker" })).await;
    loop {
        let block = bob_sse.next_event(Duration::from_secs(5)).await;
        if block.json()["id"] == marker.as_str() {
            break;
        }
    }
    for ws in [&mut ann_ws, &mut bob_ws] {
        let m = ws.next_data("a", Duration::from_secs(5)).await;
        assert_eq!(m["data"]["events"]["id"], marker.as_str(), "{m}");
    }

    // The rule now leaves Bob out: the event it protects reaches Ann only.
    let secret = publish_body(
        &node,
        &json!({ "topic": "audit", "type": "entry", "payload": { "n": "secret" }, "readers": { "users": [ann.id] } }),
    )
    .await;
    let m = ann_ws.next_data("a", Duration::from_secs(5)).await;
    assert_eq!(m["data"]["events"]["id"], secret.as_str(), "{m}");
    // Bob's subscription ends with a FORBIDDEN error, the connection lives.
    let refusal = bob_ws.next_message(Duration::from_secs(5)).await;
    assert_eq!(refusal["type"], "next", "{refusal}");
    assert_eq!(
        refusal["payload"]["errors"][0]["extensions"]["code"], "FORBIDDEN",
        "{refusal}"
    );
    let end = bob_ws.next_message(Duration::from_secs(5)).await;
    assert_eq!(
        (end["type"].as_str(), end["id"].as_str()),
        (Some("complete"), Some("a")),
        "{end}"
    );
    bob_ws.ping_pong().await;
    // Bob's SSE stream says so, then ends; the protected event is in neither.
    let blocks = bob_sse.until_ended(Duration::from_secs(5)).await;
    let events: Vec<&Block> = blocks.iter().filter(|b| b.dispatches()).collect();
    assert_eq!(events.len(), 1, "{blocks:?}");
    assert_eq!(events[0].event(), Some("revoked"), "{blocks:?}");
    assert_eq!(events[0].json()["code"], "forbidden", "{blocks:?}");
}
