//! Server-Sent Events as browsers and graphql-sse clients use them: the
//! event stream at `/api/v1/events/stream` (headers, framing, who may read
//! what, heartbeats through quiet spells, resuming across a fleet, gaps,
//! bounds) and GraphQL over SSE at `/graphql/stream`.

use std::collections::HashMap;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::common::sse::stream_client;
use crate::common::*;

const STREAM: &str = "/api/v1/events/stream";
/// How long any one expected event may take.
const WAIT: Duration = Duration::from_secs(10);
/// How long "nothing more arrives" is watched for.
const QUIET: Duration = Duration::from_millis(400);

/// Opens an event stream that must be accepted, and reads its `retry:`.
async fn open_events(node: &Node, path: &str, headers: &[(&str, &str)]) -> SseStream {
    let mut stream = open_stream(node, path, headers)
        .await
        .unwrap_or_else(|reply| panic!("GET {path} was refused: {} {}", reply.status, reply.body));
    match stream.read(WAIT).await {
        SseRead::Block(block) => assert_eq!(
            block.get("retry"),
            Some("3000"),
            "the stream opens with retry: {block:?}"
        ),
        other => panic!("GET {path}: no retry: line, got {other:?}"),
    }
    stream
}

/// The answer of a stream that must be refused.
async fn refused(node: &Node, path: &str, headers: &[(&str, &str)]) -> Reply {
    match open_stream(node, path, headers).await {
        Ok(_) => panic!("GET {path} with {headers:?} was accepted"),
        Err(reply) => reply,
    }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Asserts that nothing but heartbeats arrives for [`QUIET`].
async fn nothing_more(stream: &mut SseStream, what: &str) {
    let until = Instant::now() + QUIET;
    loop {
        match stream
            .read(until.saturating_duration_since(Instant::now()))
            .await
        {
            SseRead::TimedOut => return,
            SseRead::Block(block) if !block.dispatches() => {}
            other => panic!("{what}: expected nothing more, got {other:?}"),
        }
    }
}

/// The value of one series (`name{labels}` exactly as exposed) on `node`.
async fn series(node: &Node, series: &str) -> f64 {
    let text = get(node, "/metrics").await.body;
    text.lines()
        .find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// The sequence number of a position `EPOCH:SEQ`.
fn seq(position: &str) -> u64 {
    let (epoch, seq) = position
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{position:?} is not EPOCH:SEQ"));
    assert!(
        !epoch.is_empty() && epoch.chars().all(|c| c.is_ascii_alphanumeric()),
        "{position:?}"
    );
    seq.parse()
        .unwrap_or_else(|_| panic!("{position:?} is not EPOCH:SEQ"))
}

#[tokio::test]
async fn a_stream_answers_with_sse_headers_then_retry_then_typed_events_carrying_their_position() {
    let node = Node::start(&[]);
    let author = create_user(&node, "Streamer").await;
    let mut stream = open_events(&node, &format!("{STREAM}?topic=posts"), &[]).await;
    assert_eq!(stream.header("content-type"), Some("text/event-stream"));
    assert_eq!(stream.header("cache-control"), Some("no-cache"));
    assert_eq!(stream.header("x-accel-buffering"), Some("no"));
    // HTTP/1.1: the connection persists unless the server says otherwise.
    assert_ne!(stream.header("connection"), Some("close"));

    let mut posts = Vec::new();
    for title in ["first over SSE", "second over SSE"] {
        posts.push(create_post(&node, &author.token, title, "multi\nline\ncontent").await);
    }
    let mut last_seq = 0;
    for (post, title) in posts.iter().zip(["first over SSE", "second over SSE"]) {
        let event = stream.next_event(WAIT).await;
        assert_eq!(event.event(), Some("post.created"), "{event:?}");
        // The envelope, on one data line, as every transport sends it.
        assert_eq!(
            event
                .fields
                .iter()
                .filter(|(name, _)| name == "data")
                .count(),
            1,
            "{event:?}"
        );
        let envelope = event.json();
        assert_eq!(envelope["type"], "post.created");
        assert_eq!(envelope["topic"], "posts");
        assert_eq!(envelope["payload"]["id"], post.as_str());
        assert_eq!(envelope["payload"]["title"], title);
        assert_eq!(envelope["payload"]["content"], "multi\nline\ncontent");
        assert!(envelope["timestamp"].is_string(), "{envelope}");
        // One topic: the SSE id is the event's own id, its position.
        assert_eq!(event.id(), envelope["id"].as_str(), "{event:?}");
        let this = seq(event.id().unwrap());
        assert!(this > last_seq, "positions grow: {this} after {last_seq}");
        last_seq = this;
    }
    assert_eq!(
        series(&node, "subgate_connections{transport=\"sse\"}").await,
        1.0
    );
    assert_eq!(
        series(&node, "subgate_subscriptions{transport=\"sse\"}").await,
        1.0
    );
    assert_eq!(
        series(&node, "subgate_events_delivered_total{transport=\"sse\"}").await,
        2.0
    );
}

#[tokio::test]
async fn without_topics_a_stream_carries_the_callers_notifications_authenticated_by_header_or_query(
) {
    let node = publisher_node(&[]);
    let ann = create_user(&node, "Ann").await;
    let bob = create_user(&node, "Bob").await;
    let mut by_header = open_events(&node, STREAM, &[("authorization", &bearer(&ann.token))]).await;
    let mut by_query = open_events(&node, &format!("{STREAM}?token={}", ann.token), &[]).await;

    // Bob comments on Ann's post: Ann is notified.
    let post = create_post(&node, &ann.token, "Ann's post", "").await;
    gql_ok(
        &node,
        "mutation($input: CreateCommentInput!) { createComment(input: $input) { comment { id } errors { code } } }",
        json!({ "input": { "postId": post, "content": "Nice one" } }),
        Some(&bob.token),
    )
    .await;
    // A backend notifies her too, through the publish API.
    let topic = format!("notifications:{}", ann.id);
    let published = publish(&node, &topic, "billing.reminder", json!({ "due": "soon" })).await;
    for (how, stream) in [("by header", &mut by_header), ("by ?token=", &mut by_query)] {
        let comment = stream.next_event(WAIT).await;
        assert_eq!(
            comment.event(),
            Some("notification.created"),
            "{how}: {comment:?}"
        );
        assert_eq!(comment.json()["topic"], topic.as_str(), "{how}");
        assert_eq!(
            comment.json()["payload"]["userId"],
            ann.id.as_str(),
            "{how}"
        );
        let reminder = stream.next_event(WAIT).await;
        assert_eq!(
            reminder.event(),
            Some("billing.reminder"),
            "{how}: {reminder:?}"
        );
        assert_eq!(reminder.id(), Some(published.as_str()), "{how}");
        assert_eq!(
            reminder.json()["payload"],
            json!({ "due": "soon" }),
            "{how}"
        );
    }

    // Nobody to default to: 401, with the challenge.
    let anonymous = refused(&node, STREAM, &[]).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    assert_eq!(anonymous.header("www-authenticate"), Some("Bearer"));
    assert_eq!(anonymous.json()["error"]["code"], "unauthorized");
    // A token that does not verify is refused wherever it comes from.
    let (name, bad) = &bad_tokens(node.secret(), &ann.id)[0];
    let by_header = refused(&node, STREAM, &[("authorization", &bearer(bad))]).await;
    assert_eq!(
        by_header.status,
        StatusCode::UNAUTHORIZED,
        "{name} token by header"
    );
    let by_query = refused(&node, &format!("{STREAM}?topic=posts&token={bad}"), &[]).await;
    assert_eq!(
        by_query.status,
        StatusCode::UNAUTHORIZED,
        "{name} token by query"
    );
}

#[tokio::test]
async fn every_topic_is_authorized_before_the_stream_starts() {
    let node = publisher_node(&[]);
    let ann = create_user(&node, "Ann").await;
    let bob = create_user(&node, "Bob").await;
    let check = async |path: &str, token: Option<&str>, want: StatusCode, code: &str| {
        let auth = token.map(bearer);
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("authorization", a.as_str())).collect();
        let reply = refused(&node, path, &headers).await;
        assert_eq!(reply.status, want, "GET {path}: {}", reply.body);
        assert_eq!(
            reply.json()["error"]["code"],
            code,
            "GET {path}: {}",
            reply.body
        );
        assert!(
            reply.json()["error"]["message"].is_string(),
            "{}",
            reply.body
        );
    };
    let admitted = async |path: &str, token: &str| {
        drop(open_events(&node, path, &[("authorization", &bearer(token))]).await);
    };

    // Someone else's notifications.
    let anns = format!("{STREAM}?topic=notifications:{}", ann.id);
    check(&anns, Some(&bob.token), StatusCode::FORBIDDEN, "forbidden").await;
    check(&anns, None, StatusCode::UNAUTHORIZED, "unauthorized").await;
    // One refused topic refuses the whole stream.
    let mixed = format!("{STREAM}?topic=posts&topic=notifications:{}", ann.id);
    check(&mixed, Some(&bob.token), StatusCode::FORBIDDEN, "forbidden").await;

    // A private channel, to a non-member; a channel that does not exist.
    let data = gql_ok(
        &node,
        "mutation($input: CreateChannelInput!) { createChannel(input: $input) { channel { id } errors { code } } }",
        json!({ "input": { "name": "secret", "isPrivate": true } }),
        Some(&ann.token),
    )
    .await;
    let channel = data["createChannel"]["channel"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let private = format!("{STREAM}?topic=channel:{channel}");
    check(
        &private,
        Some(&bob.token),
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
    admitted(&private, &ann.token).await;
    check(
        &format!("{STREAM}?topic=channel:nope"),
        Some(&ann.token),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;

    // A backend topic its publisher restricted to Ann.
    publish_body(&node, &json!({ "topic": "payroll", "type": "pay.slip", "payload": {}, "readers": { "users": [ann.id] } }))
        .await;
    let payroll = format!("{STREAM}?topic=payroll");
    check(
        &payroll,
        Some(&bob.token),
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
    check(&payroll, None, StatusCode::UNAUTHORIZED, "unauthorized").await;
    admitted(&payroll, &ann.token).await;

    // Not a topic at all; too many.
    check(
        &format!("{STREAM}?topic=has%20space"),
        Some(&ann.token),
        StatusCode::BAD_REQUEST,
        "bad_request",
    )
    .await;
    let many: String = (0..21).map(|i| format!("topic=t{i}&")).collect();
    check(
        &format!("{STREAM}?{many}"),
        Some(&ann.token),
        StatusCode::BAD_REQUEST,
        "bad_request",
    )
    .await;
}

#[tokio::test]
async fn a_foreign_origin_and_a_full_node_are_refused() {
    let node = Node::start(&[
        ("SUBGATE__SERVER__ALLOWED_ORIGINS", "https://app.example"),
        ("SUBGATE__SERVER__MAX_CONNECTIONS", "1"),
    ]);
    let path = format!("{STREAM}?topic=posts");
    let foreign = refused(&node, &path, &[("origin", "https://evil.example")]).await;
    assert_eq!(foreign.status, StatusCode::FORBIDDEN);
    assert_eq!(foreign.json()["error"]["code"], "forbidden");

    let _held = open_events(&node, &path, &[("origin", "https://app.example")]).await;
    let full = refused(&node, &path, &[]).await;
    assert_eq!(full.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(full.header("retry-after"), Some("1"));
    assert_eq!(full.json()["error"]["code"], "unavailable");
    assert_eq!(
        series(&node, "subgate_rejected_total{reason=\"max_connections\"}").await,
        1.0
    );
    assert_eq!(
        series(&node, "subgate_rejected_total{reason=\"origin\"}").await,
        1.0
    );
}

#[tokio::test]
async fn heartbeats_keep_a_quiet_stream_talking() {
    let node = Node::start(&[("SUBGATE__SSE__HEARTBEAT_SECONDS", "1")]);
    let author = create_user(&node, "Quiet").await;
    let mut stream = open_events(&node, &format!("{STREAM}?topic=posts"), &[]).await;
    let started = Instant::now();
    let mut pings = 0;
    while started.elapsed() < Duration::from_millis(3500) {
        match stream.read(Duration::from_secs(2)).await {
            SseRead::Block(block) => {
                assert!(block.is_comment(), "a quiet stream sent {block:?}");
                assert_eq!(block.comments, ["ping"]);
                pings += 1;
            }
            other => {
                panic!("a quiet stream with a 1s heartbeat gave {other:?} after {pings} pings")
            }
        }
    }
    assert!(
        (2..=4).contains(&pings),
        "{pings} pings in 3.5s with a 1s heartbeat"
    );
    create_post(&node, &author.token, "after the quiet", "").await;
    assert_eq!(
        stream.next_event(WAIT).await.json()["payload"]["title"],
        "after the quiet"
    );

    // A client that goes away frees its place within a few heartbeats.
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(5);
    while series(&node, "subgate_connections{transport=\"sse\"}").await != 0.0 {
        assert!(
            Instant::now() < deadline,
            "a closed stream still counts as open after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        series(&node, "subgate_subscriptions{transport=\"sse\"}").await,
        0.0
    );
}

/// With the default 15 s heartbeat, a stream that carries nothing for 20 s
/// hears a ping in between (so a proxy that closes connections idle for,
/// say, 16 s never sees it idle) and still delivers afterwards.
#[tokio::test]
async fn a_twenty_second_quiet_spell_is_bridged_by_the_default_heartbeat() {
    let node = Node::start(&[]);
    let author = create_user(&node, "Patient").await;
    let mut stream = open_events(&node, &format!("{STREAM}?topic=posts"), &[]).await;
    let opened = Instant::now();
    let mut pings = Vec::new();
    let quiet = Duration::from_secs(20);
    while opened.elapsed() < quiet {
        match stream.read(quiet.saturating_sub(opened.elapsed())).await {
            SseRead::TimedOut => break,
            SseRead::Block(block) if block.is_comment() => pings.push(opened.elapsed()),
            other => panic!("a quiet stream gave {other:?}"),
        }
    }
    assert_eq!(
        pings.len(),
        1,
        "one ping in 20 s with a 15 s heartbeat, got them at {pings:?}"
    );
    assert!(
        pings[0] >= Duration::from_secs(14) && pings[0] <= Duration::from_secs(17),
        "the ping came after {:?}",
        pings[0]
    );
    create_post(&node, &author.token, "after twenty seconds", "").await;
    assert_eq!(
        stream.next_event(WAIT).await.json()["payload"]["title"],
        "after twenty seconds"
    );
}

#[tokio::test]
async fn a_position_the_history_no_longer_holds_is_a_gap_in_the_stream() {
    let node = publisher_node(&[("SUBGATE__HISTORY__SIZE", "3")]);
    let first = publish_body(
        &node,
        &json!({ "topic": "ledger", "type": "entry", "payload": { "n": 0 }, "readers": "public" }),
    )
    .await;
    let mut later = Vec::new();
    for n in 1..=5 {
        later.push(publish(&node, "ledger", "entry", json!({ "n": n })).await);
    }

    // Expired: said, then what the history still holds (the last three).
    let mut stream = open_events(
        &node,
        &format!("{STREAM}?topic=ledger&lastEventId={first}"),
        &[],
    )
    .await;
    let gap = stream.next_event(WAIT).await;
    assert_eq!(gap.event(), Some("gap"));
    assert_eq!(
        gap.json(),
        json!({ "topic": "ledger", "reason": "expired" })
    );
    let retained = stream.events(3, WAIT).await;
    assert_eq!(
        retained
            .iter()
            .map(|e| e.id().unwrap().to_owned())
            .collect::<Vec<_>>(),
        later[2..]
    );
    assert_eq!(
        retained
            .iter()
            .map(|e| e.json()["payload"]["n"].clone())
            .collect::<Vec<_>>(),
        [3, 4, 5]
    );
    nothing_more(&mut stream, "after the retained events").await;
    drop(stream);

    // Not a position at all; a position of another (lost) history.
    for (id, reason) in [
        ("garbage", "malformed"),
        ("ffffffffffff:2", "epoch_changed"),
    ] {
        let mut stream = open_events(
            &node,
            &format!("{STREAM}?topic=ledger"),
            &[("last-event-id", id)],
        )
        .await;
        let gap = stream.next_event(WAIT).await;
        assert_eq!(
            gap.json(),
            json!({ "topic": "ledger", "reason": reason }),
            "Last-Event-ID {id}"
        );
        if reason == "epoch_changed" {
            let retained = stream.events(3, WAIT).await;
            assert_eq!(
                retained.last().unwrap().id(),
                later.last().map(String::as_str)
            );
        }
        nothing_more(&mut stream, id).await;
    }

    // A plain position cannot say which of several topics it belongs to.
    let mut stream = open_events(
        &node,
        &format!("{STREAM}?topic=ledger&topic=posts"),
        &[("last-event-id", &later[4])],
    )
    .await;
    let gaps = stream.events(2, WAIT).await;
    let mut said: Vec<Value> = gaps.iter().map(Block::json).collect();
    said.sort_by_key(|gap| gap["topic"].as_str().unwrap().to_owned());
    assert_eq!(
        said,
        [
            json!({ "topic": "ledger", "reason": "malformed" }),
            json!({ "topic": "posts", "reason": "malformed" })
        ]
    );
}

#[tokio::test]
async fn a_client_that_drops_before_its_first_event_still_resumes_exactly() {
    let node = publisher_node(&[]);
    let before = publish_body(
        &node,
        &json!({ "topic": "alerts", "type": "alert", "payload": { "n": 0 }, "readers": "public" }),
    )
    .await;
    let before_other = publish_body(&node, &json!({ "topic": "digests", "type": "digest", "payload": { "n": 100 }, "readers": "public" })).await;

    // One topic: the stream says where it begins, and nothing else.
    let mut quiet = open_events(&node, &format!("{STREAM}?topic=alerts"), &[]).await;
    match quiet.read(WAIT).await {
        SseRead::Block(block) => assert_eq!(
            block.fields,
            [("id".to_owned(), before.clone())],
            "{block:?}"
        ),
        other => panic!("no starting id: {other:?}"),
    }
    nothing_more(&mut quiet, "a stream with no new events").await;
    let anchor = quiet.last_id().unwrap().to_owned();
    drop(quiet);
    let missed = [
        publish(&node, "alerts", "alert", json!({ "n": 1 })).await,
        publish(&node, "alerts", "alert", json!({ "n": 2 })).await,
    ];
    let mut back = open_events(
        &node,
        &format!("{STREAM}?topic=alerts"),
        &[("last-event-id", &anchor)],
    )
    .await;
    let replay = back.events(2, WAIT).await;
    assert_eq!(
        replay
            .iter()
            .map(|e| e.id().unwrap().to_owned())
            .collect::<Vec<_>>(),
        missed
    );
    nothing_more(&mut back, "after the missed alerts").await;
    drop(back);

    // Several topics: the starting id names each topic that has a history.
    let both = format!("{STREAM}?topic=alerts&topic=digests&topic=posts");
    let mut quiet = open_events(&node, &both, &[]).await;
    nothing_more(&mut quiet, "a multi-topic stream with no new events").await;
    let anchor = quiet.last_id().unwrap().to_owned();
    assert_eq!(
        anchor,
        format!("alerts~{},digests~{before_other}", missed[1])
    );
    drop(quiet);
    let digest = publish(&node, "digests", "digest", json!({ "n": 101 })).await;
    let mut back = open_events(&node, &both, &[("last-event-id", &anchor)]).await;
    assert_eq!(
        back.next_event(WAIT).await.id(),
        Some(format!("alerts~{},digests~{digest}", missed[1]).as_str())
    );
    nothing_more(&mut back, "after the missed digest").await;
}

/// `N` nodes sharing `redis`, each accepting the publish API key.
fn fleet<const N: usize>(bus: &(impl Bus + Sync)) -> [Node; N] {
    bus_fleet(bus, &[("SUBGATE__PUBLISH__API_KEYS", API_KEY)])
}

/// The `n` payload field of each event.
fn ns(events: &[Block]) -> Vec<i64> {
    events
        .iter()
        .map(|e| {
            e.json()["payload"]["n"]
                .as_i64()
                .unwrap_or_else(|| panic!("{e:?}"))
        })
        .collect()
}

#[tokio::test]
async fn a_stream_resumes_on_another_node_with_exactly_what_it_missed() {
    a_stream_resumes_on_another_node_with_exactly_what_it_missed_on(&TestRedis::start()).await;
}

pub(crate) async fn a_stream_resumes_on_another_node_with_exactly_what_it_missed_on(
    bus: &(impl Bus + Sync),
) {
    let [n1, n2, n3] = fleet(bus);
    let topic = "orders:eu";
    // Published before anyone listens: never part of what follows.
    publish_body(
        &n2,
        &json!({ "topic": topic, "type": "order", "payload": { "n": 0 }, "readers": "public" }),
    )
    .await;
    let path = format!("{STREAM}?topic={topic}");

    let mut first = open_events(&n1, &path, &[]).await;
    let mut opening = first.read(WAIT).await;
    while matches!(&opening, SseRead::Block(b) if b.is_comment()) {
        opening = first.read(WAIT).await;
    }
    assert!(
        matches!(&opening, SseRead::Block(b) if b.id().is_some() && !b.dispatches()),
        "{opening:?}"
    );
    for n in 1..=2 {
        publish(&n2, topic, "order", json!({ "n": n })).await;
    }
    let seen = first.events(2, WAIT).await;
    assert_eq!(ns(&seen), [1, 2]);
    let last_id = seen[1].id().unwrap().to_owned();
    drop(first);

    let mut missed = Vec::new();
    for n in 3..=5 {
        missed.push(publish(&n2, topic, "order", json!({ "n": n })).await);
    }
    // What a reconnecting EventSource sends: the URL it was first given
    // (here with a query id it has long moved past) and the header, which wins.
    let reconnect = format!("{path}&lastEventId=stale");
    let mut resumed = open_events(&n3, &reconnect, &[("last-event-id", &last_id)]).await;
    let replay = resumed.events(3, WAIT).await;
    assert_eq!(
        ns(&replay),
        [3, 4, 5],
        "exactly the missed events, in order"
    );
    assert_eq!(
        replay
            .iter()
            .map(|e| e.id().unwrap().to_owned())
            .collect::<Vec<_>>(),
        missed
    );
    for n in 6..=7 {
        publish(&n2, topic, "order", json!({ "n": n })).await;
    }
    assert_eq!(ns(&resumed.events(2, WAIT).await), [6, 7], "then live");
    nothing_more(&mut resumed, "after the live events").await;
}

#[tokio::test]
async fn a_stream_of_several_topics_resumes_every_topic_from_its_composite_id() {
    a_stream_of_several_topics_resumes_every_topic_from_its_composite_id_on(&TestRedis::start())
        .await;
}

pub(crate) async fn a_stream_of_several_topics_resumes_every_topic_from_its_composite_id_on(
    bus: &(impl Bus + Sync),
) {
    let [n1, n2, n3] = fleet(bus);
    let (eu, us) = ("orders:eu", "orders:us");
    for topic in [eu, us] {
        publish_body(
            &n2,
            &json!({ "topic": topic, "type": "order", "payload": { "n": 0 }, "readers": "public" }),
        )
        .await;
    }
    let path = format!("{STREAM}?topic={eu}&topic={us}");

    let mut first = open_events(&n1, &path, &[]).await;
    let eu1 = publish(&n2, eu, "order", json!({ "n": 1 })).await;
    let us1 = publish(&n2, us, "order", json!({ "n": 101 })).await;
    let seen = first.events(2, WAIT).await;
    // Whichever came last names both topics, in the order they were asked for.
    let last_id = seen[1].id().unwrap().to_owned();
    assert_eq!(last_id, format!("{eu}~{eu1},{us}~{us1}"));
    drop(first);

    let missed_eu = [
        publish(&n2, eu, "order", json!({ "n": 2 })).await,
        publish(&n2, eu, "order", json!({ "n": 3 })).await,
    ];
    let missed_us = [publish(&n2, us, "order", json!({ "n": 102 })).await];
    let mut resumed = open_events(&n3, &path, &[("last-event-id", &last_id)]).await;
    let replay = resumed.events(3, WAIT).await;
    let by_topic = |events: &[Block]| {
        let mut topics: HashMap<String, Vec<String>> = HashMap::new();
        for e in events {
            topics
                .entry(e.json()["topic"].as_str().unwrap().to_owned())
                .or_default()
                .push(e.json()["id"].as_str().unwrap().to_owned());
        }
        topics
    };
    let replayed = by_topic(&replay);
    assert_eq!(
        replayed[eu], missed_eu,
        "the missed events of {eu}, in order"
    );
    assert_eq!(replayed[us], missed_us, "the missed events of {us}");

    let live_us = publish(&n2, us, "order", json!({ "n": 103 })).await;
    let live_eu = publish(&n2, eu, "order", json!({ "n": 4 })).await;
    let live = resumed.events(2, WAIT).await;
    assert_eq!(
        by_topic(&live),
        HashMap::from([
            (eu.to_owned(), vec![live_eu.clone()]),
            (us.to_owned(), vec![live_us.clone()])
        ])
    );
    assert_eq!(
        live[1].id(),
        Some(format!("{eu}~{live_eu},{us}~{live_us}").as_str())
    );
    nothing_more(&mut resumed, "after the live events").await;
}

#[tokio::test]
async fn a_draining_node_ends_its_streams_cleanly() {
    let node = Node::start(&[("SUBGATE__SERVER__DRAIN_TIMEOUT_SECONDS", "5")]);
    let mut stream = open_events(&node, &format!("{STREAM}?topic=posts"), &[]).await;
    node.sigterm();
    // The response ends properly (its last chunk arrives): EventSource then
    // reconnects, through the balancer, to another node.
    stream.until_ended(Duration::from_secs(5)).await;
    assert!(node.wait_exit(Duration::from_secs(10)).await.success());
}

#[tokio::test]
async fn a_stream_whose_client_stops_reading_is_cut_off_and_counted() {
    let node = publisher_node(&[("SUBGATE__HUB__SUBSCRIBER_QUEUE_CAPACITY", "4")]);
    publish_body(
        &node,
        &json!({ "topic": "firehose", "type": "big", "payload": {}, "readers": "public" }),
    )
    .await;
    // A raw client with a small receive buffer that stops reading after
    // the response head: its socket backs up after a few events.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut raw = socket.connect(node.addr).await.unwrap();
    raw.write_all(
        format!(
            "GET {STREAM}?topic=firehose HTTP/1.1\r\nHost: {}\r\n\r\n",
            node.addr
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = [0u8; 12];
    raw.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");

    let big = "x".repeat(50 * 1024);
    let cut = "subgate_slow_consumer_disconnects_total{transport=\"sse\"}";
    let mut published = 0;
    while series(&node, cut).await < 1.0 {
        assert!(
            published < 400,
            "{published} events of 50 KB to a client that reads nothing, and no cut-off"
        );
        publish(&node, "firehose", "big", json!({ "blob": big })).await;
        published += 1;
    }
    // The stream's task is gone at once, even though the client reads
    // nothing: it no longer counts as an open connection.
    let deadline = Instant::now() + Duration::from_secs(5);
    while series(&node, "subgate_connections{transport=\"sse\"}").await != 0.0 {
        assert!(
            Instant::now() < deadline,
            "the cut-off stream still counts as open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Reading again, the client finds the response ended properly.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = raw.read(&mut buf).await.unwrap();
            rest.extend_from_slice(&buf[..n]);
            if n == 0 || rest.ends_with(b"\r\n0\r\n\r\n") {
                return n != 0;
            }
        }
    })
    .await
    .expect("the rest of the response arrives");
    assert!(
        ended,
        "the response ended with its last chunk rather than a dropped connection"
    );
}

// ---------------------------------------------------------------------------
// GraphQL over SSE.

const GRAPHQL_STREAM: &str = "/graphql/stream";

/// `POST /graphql/stream` with a JSON body.
async fn graphql_stream(
    node: &Node,
    body: &Value,
    token: Option<&str>,
) -> Result<SseStream, Reply> {
    let mut request = stream_client()
        .post(node.http_url(GRAPHQL_STREAM))
        .header("accept", "text/event-stream")
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(token) = token {
        request = request.header("authorization", bearer(token));
    }
    SseStream::from_response(request.send().await.expect("POST /graphql/stream")).await
}

#[tokio::test]
async fn a_graphql_subscription_over_sse_receives_posts_created_over_http() {
    let node = Node::start(&[]);
    let author = create_user(&node, "Author").await;
    let mut stream = graphql_stream(
        &node,
        &json!({ "query": "subscription { postCreated { id title } }" }),
        Some(&author.token),
    )
    .await
    .unwrap_or_else(|reply| panic!("refused: {} {}", reply.status, reply.body));
    assert_eq!(stream.header("content-type"), Some("text/event-stream"));
    // The operation starts once the stream does: create marker posts until
    // one arrives, so that the real one is known to be live.
    let mut n = 0;
    loop {
        create_post(&node, &author.token, &format!("[warm-up {n}]"), "").await;
        n += 1;
        match stream.read(Duration::from_millis(300)).await {
            SseRead::Block(block) if block.event() == Some("next") => break,
            SseRead::TimedOut if n < 30 => {}
            other => panic!("no warm-up post arrived ({other:?})"),
        }
    }
    let id = create_post(&node, &author.token, "over graphql-sse", "").await;
    let found = loop {
        let block = stream.next_event(WAIT).await;
        assert_eq!(block.event(), Some("next"), "{block:?}");
        let post = block.json()["data"]["postCreated"].clone();
        if post["title"] == "over graphql-sse" {
            break post;
        }
        assert!(
            post["title"].as_str().unwrap().starts_with("[warm-up"),
            "{post}"
        );
    };
    assert_eq!(found["id"], id.as_str());
    assert_eq!(
        series(&node, "subgate_subscriptions{transport=\"graphql_sse\"}").await,
        1.0
    );
}

#[tokio::test]
async fn graphql_over_sse_refuses_unparseable_requests_and_streams_the_rest() {
    let node = Node::start(&[]);
    // A document that does not parse: 400 before any stream.
    let bad = graphql_stream(
        &node,
        &json!({ "query": "subscription { postCreated { id " }),
        None,
    )
    .await
    .err()
    .unwrap();
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(
        bad.json()["errors"][0]["message"].is_string(),
        "{}",
        bad.body
    );
    // Not a GraphQL request at all.
    let not_graphql = graphql_stream(&node, &json!({ "nope": 1 }), None)
        .await
        .err()
        .unwrap();
    assert_eq!(not_graphql.status, StatusCode::BAD_REQUEST);

    // A query: its result, then complete, then the response ends.
    let mut query = graphql_stream(&node, &json!({ "query": "{ __typename }" }), None)
        .await
        .unwrap();
    let blocks = query.until_ended(WAIT).await;
    assert_eq!(blocks.len(), 2, "{blocks:?}");
    assert_eq!(
        (blocks[0].event(), blocks[0].json()),
        (Some("next"), json!({ "data": { "__typename": "Query" } }))
    );
    assert_eq!(blocks[1].event(), Some("complete"));

    // Parsed but invalid: the errors travel in the stream, as the protocol
    // requires (a browser could not read them from a 400).
    let mut invalid = graphql_stream(&node, &json!({ "query": "{ nope }" }), None)
        .await
        .unwrap();
    let blocks = invalid.until_ended(WAIT).await;
    assert_eq!(blocks[0].event(), Some("next"));
    assert!(
        blocks[0].json()["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("nope"),
        "{blocks:?}"
    );
    assert_eq!(blocks[1].event(), Some("complete"));

    // GET takes queries and subscriptions, not mutations; the client must
    // take an event stream.
    let client = stream_client();
    let get = |query: &str| {
        client
            .get(node.http_url(GRAPHQL_STREAM))
            .query(&[("query", query)])
            .header("accept", "text/event-stream")
            .send()
    };
    let mut by_get = SseStream::from_response(get("{ __typename }").await.unwrap())
        .await
        .unwrap();
    assert_eq!(
        by_get.until_ended(WAIT).await[0].json()["data"]["__typename"],
        "Query"
    );
    let mutation = get("mutation { deletePost(input: { id: \"x\" }) { errors { code } } }")
        .await
        .unwrap();
    assert_eq!(mutation.status(), StatusCode::METHOD_NOT_ALLOWED);
    let json_only = client
        .post(node.http_url(GRAPHQL_STREAM))
        .header("accept", "application/json")
        .header("content-type", "application/json")
        .body(json!({ "query": "{ __typename }" }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(json_only.status(), StatusCode::NOT_ACCEPTABLE);
    // A token that does not verify.
    let (_, bad_token) = &bad_tokens(node.secret(), "u1")[0];
    let unauthorized = graphql_stream(
        &node,
        &json!({ "query": "{ __typename }" }),
        Some(bad_token),
    )
    .await
    .err()
    .unwrap();
    assert_eq!(unauthorized.status, StatusCode::UNAUTHORIZED);
}
