//! The event-envelope protocol on `/ws`, through real sockets against the
//! real binary: authentication, every bad input, channels, messages that
//! cross between `/ws` and GraphQL, typing, presence, and resuming on
//! another node of a fleet.

use std::time::Duration;

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite;

use crate::common::*;

/// Every expected message arrives within this on a local node.
const WAIT: Duration = Duration::from_secs(5);

const CREATE_CHANNEL: &str =
    "mutation($input: CreateChannelInput!) { createChannel(input: $input) { channel { id } errors { field message code } } }";
const SEND_MESSAGE: &str =
    "mutation($input: SendMessageInput!) { sendMessage(input: $input) { message { id content } errors { field message code } } }";
const MESSAGE_RECEIVED: &str =
    "subscription($c: ID!) { messageReceived(channelId: $c) { id content author { id } } }";

/// An envelope-protocol client.
struct Client {
    ws: GqlWs,
    session_id: String,
    /// Events read while waiting for something else, oldest first: a
    /// subscriber's own message may arrive before the reply to its send.
    held: std::collections::VecDeque<Value>,
}

impl Client {
    /// Connects to `/ws` (with `?token=` when given) and reads the greeting.
    async fn connect(node: &Node, token: Option<&str>) -> Client {
        let url = match token {
            Some(token) => node.ws_url(&format!("/ws?token={token}")),
            None => node.ws_url("/ws"),
        };
        let ws =
            match tokio::time::timeout(WAIT, try_connect(&url, ConnectOptions::default())).await {
                Ok(Ok(ws)) => ws,
                Ok(Err(e)) => panic!("the upgrade of /ws failed: {e}"),
                Err(_) => panic!("the upgrade of /ws did not finish within {WAIT:?}"),
            };
        let mut client = Client {
            ws,
            session_id: String::new(),
            held: Default::default(),
        };
        let hello = client.next().await;
        assert_eq!(hello["type"], "connection.established", "{hello}");
        client.session_id = hello["payload"]["session_id"]
            .as_str()
            .expect("a session id")
            .to_owned();
        if token.is_some() {
            client.expect("auth.success").await;
        }
        client
    }

    async fn user(node: &Node, user: &TestUser) -> Client {
        Self::connect(node, Some(&user.token)).await
    }

    async fn send(&mut self, kind: &str, payload: Value) {
        self.ws
            .send_json(json!({ "type": kind, "payload": payload }))
            .await;
    }

    /// The next message, checked to be an envelope.
    async fn next(&mut self) -> Value {
        let m = self.ws.next_message(WAIT).await;
        assert!(
            m["id"].as_str().is_some_and(|id| !id.is_empty()),
            "an envelope without id: {m}"
        );
        assert!(
            m["type"].is_string() && m["payload"].is_object() && m["timestamp"].is_string(),
            "not an envelope: {m}"
        );
        m
    }

    /// The next message of type `kind`. Events of other types that arrive
    /// first are held for later; presence announcements (which every
    /// subscribe and disconnect causes) are dropped unless asked for; any
    /// other control message fails the test.
    async fn expect(&mut self, kind: &str) -> Value {
        if let Some(at) = self.held.iter().position(|m| m["type"] == kind) {
            return self.held.remove(at).unwrap();
        }
        loop {
            let m = self.next().await;
            if m["type"] == kind {
                return m;
            }
            if m["type"] == "presence.updated" {
                continue;
            }
            let is_event = !m["id"].as_str().unwrap().starts_with("c:");
            assert!(is_event, "expected {kind}, got {m}");
            self.held.push_back(m);
        }
    }

    /// The next message that is not a presence announcement, whatever it is.
    async fn next_non_presence(&mut self) -> Value {
        if let Some(m) = self.held.pop_front() {
            return m;
        }
        loop {
            let m = self.next().await;
            if m["type"] != "presence.updated" {
                return m;
            }
        }
    }

    /// The payload of the next `error`.
    async fn error(&mut self) -> Value {
        self.expect("error").await["payload"].clone()
    }

    /// Subscribes to `channel_id`; the payload of `channel.subscribed`.
    async fn subscribe(&mut self, channel_id: &str, last_event_id: Option<&str>) -> Value {
        let mut payload = json!({ "channel_id": channel_id });
        if let Some(id) = last_event_id {
            payload["last_event_id"] = json!(id);
        }
        self.send("channel.subscribe", payload).await;
        let ack = self.expect("channel.subscribed").await;
        assert_eq!(ack["topic"], format!("channel:{channel_id}"), "{ack}");
        ack["payload"].clone()
    }

    /// Sends a message and returns the stored message from `message.sent`.
    async fn say(&mut self, channel_id: &str, content: &str) -> Value {
        self.send(
            "message.send",
            json!({ "channel_id": channel_id, "content": content }),
        )
        .await;
        let sent = self.expect("message.sent").await;
        assert_eq!(sent["payload"]["message"]["content"], content, "{sent}");
        sent["payload"]["message"].clone()
    }

    /// Asserts that nothing but presence announcements is pending: a ping's
    /// `pong` is the next thing to arrive.
    async fn nothing_else(&mut self) {
        self.held.retain(|m| m["type"] != "presence.updated");
        assert!(self.held.is_empty(), "unexpected events: {:?}", self.held);
        self.send("ping", json!({ "probe": true })).await;
        let pong = self.expect("pong").await;
        assert_eq!(pong["payload"], json!({ "probe": true }));
    }
}

/// Creates a channel as `owner`; returns its id.
async fn create_channel(node: &Node, owner: &TestUser, private: bool, members: &[&str]) -> String {
    let data = gql_ok(
        node,
        CREATE_CHANNEL,
        json!({ "input": { "name": unique("room-"), "isPrivate": private, "memberIds": members } }),
        Some(&owner.token),
    )
    .await;
    data["createChannel"]["channel"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("createChannel failed: {data}"))
        .to_owned()
}

/// The sequence number of an event id `EPOCH:SEQ`.
fn seq(id: &str) -> u64 {
    id.rsplit_once(':')
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or_else(|| panic!("{id:?} is not EPOCH:SEQ"))
}

#[tokio::test]
async fn auth_by_query_token_by_first_message_and_a_bad_token_refused_before_the_upgrade() {
    let node = Node::start(&[]);
    let ann = create_user(&node, "Ann").await;

    let by_query = Client::user(&node, &ann).await;
    assert!(!by_query.session_id.is_empty());

    let mut by_message = Client::connect(&node, None).await;
    by_message
        .send("auth", json!({ "token": "not-a-jwt" }))
        .await;
    let failed = by_message.expect("auth.failed").await;
    assert_eq!(failed["payload"]["code"], "unauthorized");
    by_message.send("auth", json!({ "token": ann.token })).await;
    let ok = by_message.expect("auth.success").await;
    assert_eq!(ok["payload"]["user_id"], ann.id.as_str());
    assert_ne!(by_message.session_id, by_query.session_id);

    for (what, token) in bad_tokens(node.secret(), &ann.id) {
        let url = node.ws_url(&format!("/ws?token={token}"));
        match try_connect(&url, ConnectOptions::default()).await {
            Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 401, "{what}"),
            Err(e) => panic!("{what}: expected 401, got {e}"),
            Ok(_) => panic!("{what}: the upgrade with a bad token was accepted"),
        }
    }
}

#[tokio::test]
async fn a_client_that_does_not_authenticate_in_time_gets_auth_failed_then_4401() {
    let node = Node::start(&[("SUBGATE__WEBSOCKET__AUTH_TIMEOUT_SECONDS", "1")]);
    let mut client = Client::connect(&node, None).await;
    // Pings do not authenticate.
    client.nothing_else().await;
    let failed = client.expect("auth.failed").await;
    assert_eq!(failed["payload"]["code"], "unauthorized");
    let (rest, (code, _)) = client.ws.read_until_close(WAIT).await;
    assert!(rest.is_empty(), "{rest:?}");
    assert_eq!(code, 4401);
    // One authenticated in time stays.
    let ann = create_user(&node, "Ann").await;
    let mut in_time = Client::connect(&node, None).await;
    in_time.send("auth", json!({ "token": ann.token })).await;
    in_time.expect("auth.success").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    in_time.nothing_else().await;
}

#[tokio::test]
async fn every_bad_input_gets_its_code_and_the_connection_lives_on() {
    let node = Node::start(&[
        ("SUBGATE__WEBSOCKET__MAX_MESSAGE_BYTES", "2048"),
        ("SUBGATE__WEBSOCKET__MAX_FRAME_BYTES", "8192"),
        // Every case below in quick succession, without the rate limit.
        ("SUBGATE__RATELIMIT__MESSAGES_PER_SECOND", "1000"),
        ("SUBGATE__RATELIMIT__MESSAGES_BURST", "1000"),
        ("SUBGATE__RATELIMIT__USER_MESSAGES_PER_SECOND", "1000"),
        ("SUBGATE__RATELIMIT__USER_MESSAGES_BURST", "1000"),
    ]);
    let ann = create_user(&node, "Ann").await;
    let mut client = Client::connect(&node, None).await;

    // Before authenticating: only auth and ping.
    for (kind, payload) in [
        ("channel.subscribe", json!({ "channel_id": "c" })),
        ("channel.unsubscribe", json!({ "channel_id": "c" })),
        (
            "message.send",
            json!({ "channel_id": "c", "content": "hi" }),
        ),
        ("user.typing", json!({ "channel_id": "c" })),
        ("presence.update", json!({ "status": "away" })),
    ] {
        client.send(kind, payload).await;
        assert_eq!(client.error().await["code"], "unauthorized", "{kind}");
    }
    client.send("auth", json!({ "token": ann.token })).await;
    client.expect("auth.success").await;

    let cases: Vec<(String, &str, Option<&str>)> = vec![
        ("this is not json".into(), "bad_request", None),
        ("[1, 2, 3]".into(), "bad_request", None),
        ("{}".into(), "bad_request", Some("type")),
        (r#"{"type": 42}"#.into(), "bad_request", Some("type")),
        (
            r#"{"type": "channel.join", "payload": {}}"#.into(),
            "bad_request",
            Some("type"),
        ),
        (
            r#"{"type": "channel.subscribe"}"#.into(),
            "bad_request",
            Some("payload.channel_id"),
        ),
        (
            r#"{"type": "channel.subscribe", "payload": "c"}"#.into(),
            "bad_request",
            Some("payload"),
        ),
        (
            r#"{"type": "channel.subscribe", "payload": {"channel_id": 7}}"#.into(),
            "bad_request",
            Some("payload.channel_id"),
        ),
        (
            r#"{"type": "channel.subscribe", "payload": {"channel_id": "c", "last_event_id": 1}}"#
                .into(),
            "bad_request",
            Some("payload.last_event_id"),
        ),
        (
            r#"{"type": "channel.subscribe", "payload": {"channel_id": "no such"}}"#.into(),
            "bad_request",
            Some("payload.channel_id"),
        ),
        (
            r#"{"type": "channel.subscribe", "payload": {"channel_id": "nope"}}"#.into(),
            "not_found",
            Some("payload.channel_id"),
        ),
        (
            r#"{"type": "channel.unsubscribe", "payload": {"channel_id": "nope"}}"#.into(),
            "bad_request",
            Some("payload.channel_id"),
        ),
        (
            r#"{"type": "message.send", "payload": {"channel_id": "nope"}}"#.into(),
            "bad_request",
            Some("payload.content"),
        ),
        (
            r#"{"type": "message.send", "payload": {"channel_id": "nope", "content": ""}}"#.into(),
            "bad_request",
            Some("payload.content"),
        ),
        (
            r#"{"type": "message.send", "payload": {"channel_id": "nope", "content": "hi"}}"#
                .into(),
            "not_found",
            Some("payload.channel_id"),
        ),
        (
            r#"{"type": "user.typing", "payload": {}}"#.into(),
            "bad_request",
            Some("payload.channel_id"),
        ),
        (
            r#"{"type": "presence.update", "payload": {"status": "asleep"}}"#.into(),
            "bad_request",
            Some("payload.status"),
        ),
        (
            r#"{"type": "auth", "payload": {}}"#.into(),
            "bad_request",
            Some("payload.token"),
        ),
        (
            format!(
                r#"{{"type": "ping", "payload": {{"pad": "{}"}}}}"#,
                "x".repeat(3000)
            ),
            "too_large",
            None,
        ),
    ];
    for (text, code, field) in &cases {
        client.ws.send_text(text.clone()).await;
        let error = client.error().await;
        assert_eq!(error["code"], *code, "{text:.80}: {error}");
        assert_eq!(error["field"].as_str(), *field, "{text:.80}: {error}");
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{error}"
        );
    }
    // The unknown type is named.
    client.ws.send_text(r#"{"type": "channel.join"}"#).await;
    assert!(client.error().await["message"]
        .as_str()
        .unwrap()
        .contains("channel.join"));
    // Binary frames are bad input too, not a reason to close.
    client
        .ws
        .send_raw(tungstenite::Message::Binary(vec![1, 2, 3]))
        .await
        .unwrap();
    assert_eq!(client.error().await["code"], "bad_request");
    client.nothing_else().await;

    // A content over 4000 characters in a message within the size limit.
    let relaxed = Node::start(&[]);
    let bob = create_user(&relaxed, "Bob").await;
    let room = create_channel(&relaxed, &bob, false, &[]).await;
    let mut roomy = Client::user(&relaxed, &bob).await;
    roomy
        .send(
            "message.send",
            json!({ "channel_id": room, "content": "é".repeat(4001) }),
        )
        .await;
    let error = roomy.error().await;
    assert_eq!(
        (error["code"].as_str(), error["field"].as_str()),
        (Some("bad_request"), Some("payload.content"))
    );
    roomy.say(&room, &"é".repeat(4000)).await;

    // Only a frame over the frame limit closes, with 1009.
    client.ws.send_text("x".repeat(9000)).await;
    let (_, (code, _)) = client.ws.read_until_close(WAIT).await;
    assert_eq!(code, 1009);
}

#[tokio::test]
async fn a_client_that_sends_too_fast_is_told_rate_limited_and_stays() {
    let node = Node::start(&[
        ("SUBGATE__RATELIMIT__MESSAGES_PER_SECOND", "2"),
        ("SUBGATE__RATELIMIT__MESSAGES_BURST", "5"),
    ]);
    let mut client = Client::connect(&node, None).await;
    for i in 0..5 {
        client.send("ping", json!({ "i": i })).await;
    }
    client.send("ping", json!({ "i": 5 })).await;
    for i in 0..5 {
        assert_eq!(client.expect("pong").await["payload"]["i"], i);
    }
    let limited = client.error().await;
    assert_eq!(limited["code"], "rate_limited");
    assert!(
        limited["retry_after_ms"]
            .as_u64()
            .is_some_and(|ms| ms > 0 && ms <= 500),
        "{limited}"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    client.nothing_else().await;
    let metrics = get(&node, "/metrics").await.body;
    assert!(
        metric_sum(&metrics, "subgate_rate_limited_total") >= 1.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn channels_subscribe_deliver_and_unsubscribe() {
    let node = Node::start(&[]);
    let ann = create_user(&node, "Ann").await;
    let bob = create_user(&node, "Bob").await;
    let room = create_channel(&node, &ann, false, &[]).await;
    let mut a = Client::user(&node, &ann).await;
    let mut b = Client::user(&node, &bob).await;
    assert_eq!(
        a.subscribe(&room, None).await,
        json!({ "channel_id": room, "recovered": true })
    );
    // Replies keep the order of the requests, even when the first needs the
    // store and the second does not.
    b.send("channel.subscribe", json!({ "channel_id": room }))
        .await;
    b.send("ping", json!({})).await;
    b.expect("channel.subscribed").await;
    b.expect("pong").await;

    let sent = a.say(&room, "hello bob").await;
    for client in [&mut a, &mut b] {
        let event = client.expect("message.created").await;
        assert_eq!(event["topic"], format!("channel:{room}"));
        assert_eq!(
            event["payload"]["message"], sent,
            "the event carries the stored message"
        );
        seq(event["id"].as_str().unwrap());
    }

    // A second subscribe to the same channel is refused; the first stays.
    b.send("channel.subscribe", json!({ "channel_id": room }))
        .await;
    let dup = b.error().await;
    assert_eq!(
        (dup["code"].as_str(), dup["request"].as_str()),
        (Some("bad_request"), Some("channel.subscribe"))
    );

    b.send("channel.unsubscribe", json!({ "channel_id": room }))
        .await;
    let gone = b.expect("channel.unsubscribed").await;
    assert_eq!(gone["payload"], json!({ "channel_id": room }));
    a.say(&room, "bob has left").await;
    a.expect("message.created").await;
    b.nothing_else().await;

    let metrics = get(&node, "/metrics").await.body;
    let line = |name: &str| {
        metrics
            .lines()
            .any(|l| l.starts_with(name) && l.contains(r#"transport="envelope_ws""#))
    };
    for name in [
        "subgate_connections{",
        "subgate_subscriptions{",
        "subgate_events_delivered_total{",
    ] {
        assert!(line(name), "{name} has no envelope_ws series:\n{metrics}");
    }
}

#[tokio::test]
async fn messages_cross_between_the_envelope_protocol_and_graphql() {
    let node = Node::start(&[]);
    let ann = create_user(&node, "Ann").await;
    let room = create_channel(&node, &ann, false, &[]).await;
    let mut sender = Client::user(&node, &ann).await;
    let mut listener = Client::user(&node, &ann).await;
    listener.subscribe(&room, None).await;

    let mut gql_ws = GqlWs::connect(&node.ws_url("/graphql/ws"), TRANSPORT_WS).await;
    gql_ws
        .init_ack(json!({ "authorization": format!("Bearer {}", ann.token) }))
        .await;
    gql_ws
        .subscribe("m", MESSAGE_RECEIVED, json!({ "c": room }))
        .await;
    until_live(&mut [&mut gql_ws], "m", async |n| {
        let content = format!("warm-up {n}");
        sender.say(&room, &content).await;
        content
    })
    .await;
    // The listener saw the warm-up messages too.
    while matches!(
        listener.ws.read(Duration::from_millis(200)).await,
        Read::Message(_)
    ) {}

    // /ws → GraphQL (and /ws).
    let sent = sender.say(&room, "from the envelope protocol").await;
    let delivered = gql_ws.next_data("m", WAIT).await;
    assert_eq!(delivered["data"]["messageReceived"]["id"], sent["id"]);
    assert_eq!(
        delivered["data"]["messageReceived"]["content"],
        "from the envelope protocol"
    );
    assert_eq!(
        delivered["data"]["messageReceived"]["author"]["id"],
        ann.id.as_str()
    );
    assert_eq!(
        listener.expect("message.created").await["payload"]["message"],
        sent
    );

    // GraphQL → /ws (and GraphQL).
    let data = gql_ok(
        &node,
        SEND_MESSAGE,
        json!({ "input": { "channelId": room, "content": "from GraphQL" } }),
        Some(&ann.token),
    )
    .await;
    let id = data["sendMessage"]["message"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let event = listener.expect("message.created").await;
    assert_eq!(event["payload"]["message"]["id"], id.as_str());
    assert_eq!(event["payload"]["message"]["content"], "from GraphQL");
    assert_eq!(event["payload"]["message"]["authorId"], ann.id.as_str());
    assert_eq!(
        gql_ws.next_data("m", WAIT).await["data"]["messageReceived"]["id"],
        id.as_str()
    );
}

#[tokio::test]
async fn typing_reaches_the_other_subscribers_once_per_interval() {
    let node = Node::start(&[]);
    let ann = create_user(&node, "Ann").await;
    let bob = create_user(&node, "Bob").await;
    let room = create_channel(&node, &ann, false, &[]).await;
    let mut a = Client::user(&node, &ann).await;
    let mut b = Client::user(&node, &bob).await;
    a.subscribe(&room, None).await;
    b.subscribe(&room, None).await;

    for _ in 0..3 {
        a.send("user.typing", json!({ "channel_id": room })).await;
    }
    a.say(&room, "done typing").await;
    let typing = b.expect("user.typing").await;
    assert_eq!(typing["topic"], format!("channel:{room}"));
    assert_eq!(
        typing["payload"],
        json!({ "user_id": ann.id, "channel_id": room })
    );
    // The extra signals were absorbed: the message comes next, and nothing
    // else after it.
    assert_eq!(
        b.next_non_presence().await["payload"]["message"]["content"],
        "done typing"
    );
    b.nothing_else().await;
    let metrics = get(&node, "/metrics").await.body;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with(r#"subgate_rate_limited_total{scope="typing"} 2"#)),
        "{metrics}"
    );

    // Typing is for channels the user may read.
    let secret = create_channel(&node, &ann, true, &[]).await;
    b.send("user.typing", json!({ "channel_id": secret })).await;
    assert_eq!(b.error().await["code"], "forbidden");
}

#[tokio::test]
async fn a_private_channel_is_refused_to_non_members() {
    let node = Node::start(&[]);
    let ann = create_user(&node, "Ann").await;
    let bob = create_user(&node, "Bob").await;
    let carol = create_user(&node, "Carol").await;
    let secret = create_channel(&node, &ann, true, &[&carol.id]).await;

    let mut b = Client::user(&node, &bob).await;
    b.send("channel.subscribe", json!({ "channel_id": secret }))
        .await;
    let refused = b.error().await;
    assert_eq!(
        (refused["code"].as_str(), refused["request"].as_str()),
        (Some("forbidden"), Some("channel.subscribe"))
    );
    b.send(
        "message.send",
        json!({ "channel_id": secret, "content": "let me in" }),
    )
    .await;
    assert_eq!(b.error().await["code"], "forbidden");
    // Refused, the channel is not held: nothing arrives from it.
    let mut c = Client::user(&node, &carol).await;
    c.subscribe(&secret, None).await;
    c.say(&secret, "members only").await;
    c.expect("message.created").await;
    b.nothing_else().await;
}

#[tokio::test]
async fn presence_follows_subscriptions_and_status_updates() {
    let node = Node::start(&[]);
    let ann = create_user(&node, "Ann").await;
    let bob = create_user(&node, "Bob").await;
    let room = create_channel(&node, &ann, false, &[]).await;
    let mut b = Client::user(&node, &bob).await;
    b.subscribe(&room, None).await;
    let mut a = Client::user(&node, &ann).await;
    a.subscribe(&room, None).await;

    /// The next presence announcement about `user_id`.
    async fn about(client: &mut Client, user_id: &str) -> Value {
        loop {
            let m = client.expect("presence.updated").await;
            if m["payload"]["user_id"] == user_id {
                return m["payload"].clone();
            }
        }
    }
    assert_eq!(about(&mut b, &ann.id).await["status"], "online");
    a.send("presence.update", json!({ "status": "busy" })).await;
    assert_eq!(
        about(&mut b, &ann.id).await,
        json!({ "user_id": ann.id, "channel_id": room, "status": "busy" })
    );
    drop(a);
    assert_eq!(about(&mut b, &ann.id).await["status"], "offline");
}

#[tokio::test]
async fn a_last_event_id_older_than_the_history_is_not_recovered() {
    let node = Node::start(&[("SUBGATE__HISTORY__SIZE", "5")]);
    let ann = create_user(&node, "Ann").await;
    let room = create_channel(&node, &ann, false, &[]).await;
    let mut a = Client::user(&node, &ann).await;
    a.subscribe(&room, None).await;
    a.say(&room, "first").await;
    let first = a.expect("message.created").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for i in 0..8 {
        a.say(&room, &format!("later {i}")).await;
    }
    let mut late = Client::user(&node, &ann).await;
    let ack = late.subscribe(&room, Some(&first)).await;
    assert_eq!(
        ack,
        json!({ "channel_id": room, "recovered": false, "reason": "expired" })
    );
    // What the history still holds follows, oldest first.
    let retained = late.expect("message.created").await;
    assert!(seq(retained["id"].as_str().unwrap()) > seq(&first) + 1);

    let mut lost = Client::user(&node, &ann).await;
    let ack = lost.subscribe(&room, Some("not-an-event-id")).await;
    assert_eq!(
        ack,
        json!({ "channel_id": room, "recovered": false, "reason": "malformed" })
    );
}

/// Three nodes on one real Redis.
fn fleet(bus: &(impl Bus + Sync)) -> [Node; 3] {
    bus_fleet(bus, &[])
}

#[tokio::test]
async fn a_client_resumes_on_another_node_with_exactly_what_it_missed() {
    a_client_resumes_on_another_node_with_exactly_what_it_missed_on(&TestRedis::start()).await;
}

pub(crate) async fn a_client_resumes_on_another_node_with_exactly_what_it_missed_on(
    bus: &(impl Bus + Sync),
) {
    let [n1, n2, n3] = fleet(bus);
    let ann = create_user(&n1, "Ann").await;
    let bob = create_user(&n2, "Bob").await;
    let room = create_channel(&n1, &ann, false, &[]).await;

    // Ann listens on node 1 and sees the conversation up to "before".
    let mut on_n1 = Client::user(&n1, &ann).await;
    on_n1.subscribe(&room, None).await;
    let mut writer = Client::user(&n2, &bob).await;
    let before = writer.say(&room, "before").await;
    let mut seen = Vec::new();
    let last_seen = loop {
        let event = on_n1.next().await;
        let id = event["id"].as_str().unwrap().to_owned();
        seen.push(id.clone());
        if event["type"] == "message.created" && event["payload"]["message"] == before {
            break id;
        }
    };
    drop(on_n1);

    // While she is away, Bob writes on node 2.
    let mut missed = Vec::new();
    for i in 0..5 {
        missed.push(writer.say(&room, &format!("missed {i}")).await);
    }

    // She comes back on node 3 from the last id she saw.
    let mut on_n3 = Client::user(&n3, &ann).await;
    let ack = on_n3.subscribe(&room, Some(&last_seen)).await;
    assert_eq!(ack, json!({ "channel_id": room, "recovered": true }));
    let mut got = Vec::new();
    let mut ids = Vec::new();
    while got.len() < missed.len() {
        let event = on_n3.next().await;
        ids.push(event["id"].as_str().unwrap().to_owned());
        if event["type"] == "message.created" {
            got.push(event["payload"]["message"].clone());
        }
    }
    assert_eq!(got, missed, "exactly the missed messages, in order");

    // Then live ones.
    let live = writer.say(&room, "live").await;
    loop {
        let event = on_n3.next().await;
        ids.push(event["id"].as_str().unwrap().to_owned());
        if event["type"] == "message.created" {
            assert_eq!(
                event["payload"]["message"], live,
                "the live message comes next"
            );
            break;
        }
    }
    // Nothing twice: every id after the one she resumed from, increasing.
    assert!(
        ids.iter().all(|id| !seen.contains(id)),
        "{ids:?} repeats some of {seen:?}"
    );
    let seqs: Vec<u64> = ids.iter().map(|id| seq(id)).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert!(seqs[0] > seq(&last_seen), "{ids:?} after {last_seen}");
    on_n3.nothing_else().await;
}

#[tokio::test]
async fn the_upgrade_checks_the_origin() {
    let node = Node::start(&[(
        "SUBGATE__SERVER__ALLOWED_ORIGINS",
        "https://app.example.com",
    )]);
    let url = node.ws_url("/ws");
    let connect = |origin| {
        try_connect(
            &url,
            ConnectOptions {
                origin,
                ..Default::default()
            },
        )
    };
    match connect(Some("https://evil.example.com")).await {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 403),
        Err(e) => panic!("expected 403, got {e}"),
        Ok(_) => panic!("an upgrade from another origin was accepted"),
    }
    assert!(connect(Some("https://app.example.com")).await.is_ok());
}

#[tokio::test]
async fn a_draining_node_closes_with_1001_and_a_silent_peer_is_dropped() {
    let node = Node::start(&[("SUBGATE__WEBSOCKET__PING_INTERVAL_SECONDS", "1")]);
    let ann = create_user(&node, "Ann").await;
    let room = create_channel(&node, &ann, false, &[]).await;

    // A peer that answers nothing, not even pings, is gone after three
    // intervals (1001), having been pinged.
    let silent = tokio::spawn({
        let (addr, token) = (node.addr, ann.token.clone());
        async move {
            let mut raw = RawWs::upgrade(addr, &format!("/ws?token={token}"), "none").await;
            tokio::time::timeout(Duration::from_secs(10), raw.read_until_closed()).await
        }
    });
    // One that reads (and so answers pings) outlives it.
    let mut live = Client::user(&node, &ann).await;
    live.subscribe(&room, None).await;
    let reading = async {
        loop {
            if let Read::Closed(code, reason) = live.ws.read(Duration::from_secs(30)).await {
                return (code, reason);
            }
        }
    };
    let (pings, code, _) = tokio::select! {
        silent = silent => silent.unwrap().expect("the silent peer was not dropped within 10s"),
        closed = reading => panic!("the client that answers pings was closed: {closed:?}"),
    };
    assert!(
        pings >= 1 && code == Some(1001),
        "pings {pings}, close {code:?}"
    );
    live.nothing_else().await;

    node.sigterm();
    let (_, (code, _)) = live.ws.read_until_close(WAIT).await;
    assert_eq!(code, 1001);
}

#[tokio::test]
async fn a_subscriber_that_stops_reading_is_cut_off_with_1013() {
    let node = Node::start(&[
        ("SUBGATE__HUB__SUBSCRIBER_QUEUE_CAPACITY", "4"),
        // Ann sends hundreds of messages through GraphQL, which draws on
        // her per-user message allowance like /ws does.
        ("SUBGATE__RATELIMIT__USER_MESSAGES_PER_SECOND", "100000"),
        ("SUBGATE__RATELIMIT__USER_MESSAGES_BURST", "100000"),
    ]);
    let ann = create_user(&node, "Ann").await;
    let room = create_channel(&node, &ann, false, &[]).await;
    let url = node.ws_url(&format!("/ws?token={}", ann.token));
    // A small receive buffer, so that a client that stops reading backs up
    // after a few messages instead of after megabytes of kernel buffering.
    let ws = try_connect(
        &url,
        ConnectOptions {
            recv_buffer_bytes: Some(4096),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut slow = Client {
        ws,
        session_id: String::new(),
        held: Default::default(),
    };
    slow.expect("connection.established").await;
    slow.expect("auth.success").await;
    slow.subscribe(&room, None).await;

    // 16 KB messages (4000 four-byte characters) until the node cuts it off.
    let content = "\u{1d11e}".repeat(4000);
    for sent in 0.. {
        assert!(
            sent < 600,
            "600 messages of 16 KB to a client that reads nothing, and it was never cut off"
        );
        let data = gql_ok(
            &node,
            SEND_MESSAGE,
            json!({ "input": { "channelId": room, "content": content } }),
            Some(&ann.token),
        )
        .await;
        assert!(data["sendMessage"]["message"]["id"].is_string(), "{data}");
        if sent % 10 == 9 {
            let metrics = get(&node, "/metrics").await.body;
            if metric_sum(&metrics, "subgate_slow_consumer_disconnects_total") >= 1.0 {
                break;
            }
        }
    }
    let (_, (code, _)) = slow.ws.read_until_close(Duration::from_secs(20)).await;
    assert_eq!(code, 1013);
}

/// The next presence announcement about `user_id` that `client` reads.
async fn presence_of(client: &mut Client, user_id: &str) -> Value {
    loop {
        let m = client.expect("presence.updated").await;
        if m["payload"]["user_id"] == user_id {
            return m["payload"].clone();
        }
    }
}

/// The user ids `channel(id){onlineUsers}` lists on `node`.
async fn online_users(node: &Node, channel: &str) -> Vec<String> {
    let data = gql_ok(
        node,
        "query($id: ID!) { channel(id: $id) { onlineUsers { userId } } }",
        json!({ "id": channel }),
        None,
    )
    .await;
    data["channel"]["onlineUsers"]
        .as_array()
        .unwrap_or_else(|| panic!("{data}"))
        .iter()
        .map(|u| u["userId"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn presence_typing_and_messages_cross_the_fleet_and_a_killed_node_goes_offline_within_the_ttl(
) {
    presence_typing_and_messages_cross_the_fleet_and_a_killed_node_goes_offline_within_the_ttl_on(
        &TestRedis::start(),
    )
    .await;
}

pub(crate) async fn presence_typing_and_messages_cross_the_fleet_and_a_killed_node_goes_offline_within_the_ttl_on(
    bus: &(impl Bus + Sync),
) {
    // A short presence TTL keeps the SIGKILL case quick.
    let env = [
        ("SUBGATE__PRESENCE__TTL_SECONDS", "3"),
        ("SUBGATE__PRESENCE__REFRESH_SECONDS", "1"),
        ("SUBGATE__PRESENCE__SWEEP_INTERVAL_SECONDS", "0.2"),
    ];
    let [n1, n2, n3] = bus_fleet(bus, &env);
    let ann = create_user(&n1, "Ann").await;
    let bob = create_user(&n1, "Bob").await;
    let cat = create_user(&n1, "Cat").await;
    let room = create_channel(&n1, &ann, false, &[]).await;

    // Bob watches from node 1, Cat from node 3; Ann joins on node 2.
    let mut bob_n1 = Client::user(&n1, &bob).await;
    bob_n1.subscribe(&room, None).await;
    let mut cat_n3 = Client::user(&n3, &cat).await;
    cat_n3.subscribe(&room, None).await;
    let mut ann_n2 = Client::user(&n2, &ann).await;
    ann_n2.subscribe(&room, None).await;
    assert_eq!(presence_of(&mut bob_n1, &ann.id).await["status"], "online");
    assert_eq!(presence_of(&mut cat_n3, &ann.id).await["status"], "online");
    assert!(
        online_users(&n3, &room).await.contains(&ann.id),
        "node 3 answers who is online"
    );

    // Typing and messages from node 2 reach the subscribers on nodes 1 and 3.
    ann_n2
        .send("user.typing", json!({ "channel_id": room }))
        .await;
    for watcher in [&mut bob_n1, &mut cat_n3] {
        let typing = watcher.expect("user.typing").await;
        assert_eq!(
            typing["payload"],
            json!({ "user_id": ann.id, "channel_id": room })
        );
    }
    ann_n2.say(&room, "hello fleet").await;
    for watcher in [&mut bob_n1, &mut cat_n3] {
        let created = watcher.expect("message.created").await;
        assert_eq!(created["payload"]["message"]["content"], "hello fleet");
    }

    // Node 2 dies without a word: Ann is announced offline within the TTL.
    let killed = tokio::time::Instant::now();
    n2.sigkill();
    let offline = tokio::time::timeout(Duration::from_secs(10), presence_of(&mut bob_n1, &ann.id))
        .await
        .expect("no offline announcement within 10 s of the SIGKILL");
    assert_eq!(offline["status"], "offline");
    assert!(
        killed.elapsed() < Duration::from_secs(3 + 2),
        "offline after {:?}, past the 3 s TTL",
        killed.elapsed()
    );
    assert!(
        !online_users(&n3, &room).await.contains(&ann.id),
        "Ann is no longer listed online"
    );
    drop(ann_n2);
}

/// GraphQL `sendMessage` and `/ws` `message.send` are one domain decision:
/// for the same user and input they accept or refuse alike, and they draw
/// on the same per-user message allowance.
#[tokio::test]
async fn send_message_and_message_send_decide_alike_rate_limit_included() {
    let node = Node::start(&[
        // Eight messages per user, practically no refill; the connection's
        // own allowance out of the way.
        ("SUBGATE__RATELIMIT__USER_MESSAGES_PER_SECOND", "0.001"),
        ("SUBGATE__RATELIMIT__USER_MESSAGES_BURST", "8"),
        ("SUBGATE__RATELIMIT__MESSAGES_PER_SECOND", "100"),
        ("SUBGATE__RATELIMIT__MESSAGES_BURST", "100"),
    ]);
    let ann = create_user(&node, "Ann").await;
    let bob = create_user(&node, "Bob").await;
    let open = create_channel(&node, &ann, false, &[]).await;
    let closed = create_channel(&node, &bob, true, &[]).await;
    let mut ws = Client::user(&node, &ann).await;
    let graphql = |channel: &str, content: &str| {
        let (node, token) = (&node, ann.token.clone());
        let vars = json!({ "input": { "channelId": channel, "content": content } });
        async move {
            let data = gql(node, SEND_MESSAGE, vars, Some(&token)).await;
            data["data"]["sendMessage"].clone()
        }
    };
    let first_error_code = |payload: &Value| payload["errors"][0]["code"].clone();

    // Accepted by both.
    ws.say(&open, "hello from /ws").await;
    let sent = graphql(&open, "hello from GraphQL").await;
    assert_eq!(sent["message"]["content"], "hello from GraphQL", "{sent}");
    assert_eq!(sent["errors"], json!([]));

    // Blank content: refused by both, on the content field.
    ws.send(
        "message.send",
        json!({ "channel_id": open, "content": "  " }),
    )
    .await;
    let e = ws.error().await;
    assert_eq!(
        (e["code"].as_str(), e["field"].as_str()),
        (Some("bad_request"), Some("payload.content"))
    );
    let g = graphql(&open, "  ").await;
    assert_eq!(first_error_code(&g), "VALIDATION_ERROR", "{g}");
    assert_eq!(g["errors"][0]["field"], "content");
    assert_eq!(g["message"], Value::Null);

    // No such channel: not found for both.
    ws.send(
        "message.send",
        json!({ "channel_id": "nope", "content": "hi" }),
    )
    .await;
    assert_eq!(ws.error().await["code"], "not_found");
    let g = graphql("nope", "hi").await;
    assert_eq!(first_error_code(&g), "NOT_FOUND", "{g}");

    // Someone else's private channel: refused by both (GraphQL does not
    // even say it exists).
    ws.send(
        "message.send",
        json!({ "channel_id": closed, "content": "hi" }),
    )
    .await;
    assert_eq!(ws.error().await["code"], "forbidden");
    let g = graphql(&closed, "hi").await;
    assert_eq!(first_error_code(&g), "NOT_FOUND", "{g}");

    // Eight messages used between the two: the ninth is refused on either.
    ws.send(
        "message.send",
        json!({ "channel_id": open, "content": "one more" }),
    )
    .await;
    let e = ws.error().await;
    assert_eq!(e["code"], "rate_limited", "{e}");
    let g = graphql(&open, "one more").await;
    assert_eq!(first_error_code(&g), "RATE_LIMITED", "{g}");
    assert_eq!(g["message"], Value::Null);
}
