//! `server.max_connections_per_user` across a fleet: two nodes on one
//! Redis count one user's connections together, and a killed node's
//! connections stop counting once its leases lapse.

use std::time::{Duration, Instant};

use tokio_tungstenite::tungstenite;

use crate::common::*;

/// A connection that must be admitted: a GraphQL WebSocket with `?token=`.
async fn connect_as(node: &Node, token: &str) -> GqlWs {
    GqlWs::connect(
        &node.ws_url(&format!("/graphql?token={token}")),
        TRANSPORT_WS,
    )
    .await
}

/// The HTTP refusal of a WebSocket upgrade that must be refused.
async fn refused_upgrade(
    node: &Node,
    path: &str,
    subprotocol: Option<&str>,
) -> tungstenite::http::Response<Option<Vec<u8>>> {
    let options = ConnectOptions {
        subprotocol,
        ..Default::default()
    };
    match try_connect(&node.ws_url(path), options).await {
        Err(tungstenite::Error::Http(response)) => response,
        Err(e) => panic!("{path}: expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("{path}: the upgrade was admitted over the per-user limit"),
    }
}

fn assert_429_with_retry_after(status: u16, retry_after: Option<&str>, what: &str) {
    assert_eq!(status, 429, "{what}: refused with 429");
    assert!(
        retry_after
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|s| s > 0),
        "{what}: the refusal says when to retry ({retry_after:?})"
    );
}

#[tokio::test]
async fn a_users_connections_are_limited_across_the_fleet_and_a_dead_nodes_lapse() {
    a_users_connections_are_limited_across_the_fleet_and_a_dead_nodes_lapse_on(&TestRedis::start())
        .await;
}

pub(crate) async fn a_users_connections_are_limited_across_the_fleet_and_a_dead_nodes_lapse_on(
    bus: &(impl Bus + Sync),
) {
    let env = [
        ("SUBGATE__SERVER__MAX_CONNECTIONS_PER_USER", "3"),
        ("SUBGATE__PRESENCE__TTL_SECONDS", "2"),
        ("SUBGATE__PRESENCE__REFRESH_SECONDS", "1"),
    ];
    let [a, b] = bus_fleet(bus, &env);
    // Ready: each node reaches its Redis (on a cluster, its first call
    // makes the connections; a call that times out would admit).
    for (node, name) in [(&a, "a"), (&b, "b")] {
        crate::fleet::readyz_becomes(node, reqwest::StatusCode::OK, Duration::from_secs(20), name)
            .await;
    }
    let ann = token(SECRET, "ann");

    let mut on_a = vec![connect_as(&a, &ann).await, connect_as(&a, &ann).await];
    let mut on_b = vec![connect_as(&b, &ann).await];

    // The fourth, on either node and by any transport, is refused.
    let response = refused_upgrade(&b, &format!("/graphql?token={ann}"), Some(TRANSPORT_WS)).await;
    let retry = response
        .headers()
        .get("Retry-After")
        .and_then(|v| v.to_str().ok());
    assert_429_with_retry_after(
        response.status().as_u16(),
        retry,
        "graphql-transport-ws on b",
    );
    let response = refused_upgrade(&a, &format!("/graphql?token={ann}"), Some(LEGACY_WS)).await;
    let retry = response
        .headers()
        .get("Retry-After")
        .and_then(|v| v.to_str().ok());
    assert_429_with_retry_after(response.status().as_u16(), retry, "graphql-ws on a");
    let response = refused_upgrade(&b, &format!("/ws?token={ann}"), None).await;
    let retry = response
        .headers()
        .get("Retry-After")
        .and_then(|v| v.to_str().ok());
    assert_429_with_retry_after(response.status().as_u16(), retry, "/ws on b");
    let stream = open_stream(&a, &format!("/api/v1/events/stream?token={ann}"), &[]).await;
    match stream {
        Ok(_) => panic!("an event stream was admitted over the per-user limit"),
        Err(reply) => assert_429_with_retry_after(
            reply.status.as_u16(),
            reply.header("retry-after"),
            "event stream on a",
        ),
    }
    // A user who authenticates after the upgrade is refused with 4429,
    // before any acknowledgement.
    let mut late = GqlWs::connect(&b.ws_url("/graphql"), TRANSPORT_WS).await;
    late.connection_init(serde_json::json!({ "token": ann }))
        .await;
    let (messages, (code, reason)) = late.read_until_close(Duration::from_secs(5)).await;
    assert_eq!(
        code, 4429,
        "connection_init over the limit: {reason} {messages:?}"
    );
    assert!(messages.is_empty(), "no connection_ack: {messages:?}");
    let options = ConnectOptions::default();
    let mut late = try_connect(&a.ws_url("/ws"), options).await.unwrap();
    late.send_json(serde_json::json!({ "type": "auth", "payload": { "token": ann } }))
        .await;
    let (messages, (code, reason)) = late.read_until_close(Duration::from_secs(5)).await;
    assert_eq!(code, 4429, "/ws auth over the limit: {reason} {messages:?}");
    assert!(
        messages.iter().all(|m| m["type"] != "auth.success"),
        "{messages:?}"
    );

    // Another user is not affected.
    let _bob = connect_as(&b, &token(SECRET, "bob")).await;

    let metrics = get(&b, "/metrics").await.body;
    assert!(metric_sum(&metrics, "subgate_user_connections_rejected_total") >= 1.0);

    // A connection closed on one node makes room on the other.
    on_a.pop();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let options = ConnectOptions {
            subprotocol: Some(TRANSPORT_WS),
            ..Default::default()
        };
        match try_connect(&b.ws_url(&format!("/graphql?token={ann}")), options).await {
            Ok(ws) => {
                on_b.push(ws);
                break;
            }
            Err(e) => assert!(
                Instant::now() < deadline,
                "no room on b after ann closed one on a: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Node a dies with ann's last connection there: its lease lapses
    // within presence.ttl_seconds, and ann may connect again.
    a.sigkill();
    drop(on_a);
    let killed = Instant::now();
    let refused = refused_upgrade(&b, &format!("/graphql?token={ann}"), Some(TRANSPORT_WS)).await;
    assert_eq!(
        refused.status(),
        429,
        "a's lease still counts right after the kill"
    );
    let deadline = killed + Duration::from_secs(10);
    loop {
        let options = ConnectOptions {
            subprotocol: Some(TRANSPORT_WS),
            ..Default::default()
        };
        match try_connect(&b.ws_url(&format!("/graphql?token={ann}")), options).await {
            Ok(ws) => {
                on_b.push(ws);
                break;
            }
            Err(e) => assert!(
                Instant::now() < deadline,
                "the killed node's lease never lapsed: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        killed.elapsed() >= Duration::from_millis(500),
        "the lease lapsed by its TTL, not at once ({:?})",
        killed.elapsed()
    );
    assert_eq!(on_b.len(), 3);
}
