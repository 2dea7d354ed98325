//! SIGTERM: the node turns not-ready, tells every WebSocket client to go
//! elsewhere (1001), and exits 0 within the drain timeout, even when a
//! client never answers.

use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use crate::common::*;

#[tokio::test]
async fn sigterm_drains_websockets_with_1001_and_exits_zero() {
    let node = Node::start(&[
        ("SUBGATE__SERVER__DRAIN_TIMEOUT_SECONDS", "5"),
        // Keeps answering HTTP for a second into the drain, so that /readyz
        // is observed as 503 before the node stops listening.
        ("SUBGATE__SERVER__DRAIN_GRACE_SECONDS", "1"),
    ]);
    let author = create_user(&node, "Drain").await;
    assert_eq!(get(&node, "/readyz").await.status, reqwest::StatusCode::OK);

    let mut current = GqlWs::connect(&node.ws_url("/graphql/ws"), TRANSPORT_WS).await;
    current.init_ack(json!({})).await;
    current
        .subscribe("1", "subscription { postCreated { id title } }", json!({}))
        .await;
    let mut legacy = GqlWs::connect(&node.ws_url("/graphql"), LEGACY_WS).await;
    legacy.init_ack(json!({})).await;
    legacy
        .subscribe("1", "subscription { postCreated { id title } }", json!({}))
        .await;
    until_live(&mut [&mut current, &mut legacy], "1", async |n| {
        let title = format!("[warm-up {n}]");
        create_post(&node, &author.token, &title, "").await;
        title
    })
    .await;
    // A client that completed the handshake and then reads nothing: the
    // drain may wait for it, which also keeps the node up long enough for
    // /readyz to be observed.
    let _stuck = RawWs::upgrade(node.addr, "/graphql/ws", TRANSPORT_WS).await;

    let signalled = Instant::now();
    node.sigterm();

    // /readyz answers 200 until the drain begins, then 503 for as long as the
    // node still answers at all.
    let mut saw_503 = false;
    let mut seen = Vec::new();
    loop {
        // A fresh connection per probe: a pooled keep-alive connection the
        // node closed would read as "stopped listening" while it still runs.
        let probe = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        match probe
            .get(node.http_url("/readyz"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
        {
            Ok(reply) if reply.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE => {
                saw_503 = true;
                break;
            }
            Ok(reply) => {
                seen.push(format!("{:?} {}", signalled.elapsed(), reply.status()));
                assert_eq!(
                    reply.status(),
                    reqwest::StatusCode::OK,
                    "/readyz while draining"
                )
            }
            // The node stopped listening: the drain finished before we looked.
            Err(e) => {
                seen.push(format!("{:?} {e}", signalled.elapsed()));
                break;
            }
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(4),
            "/readyz still 200 four seconds after SIGTERM"
        );
    }
    for (name, ws) in [
        ("graphql-transport-ws", &mut current),
        ("graphql-ws", &mut legacy),
    ] {
        let (code, reason) = ws.expect_close(Duration::from_secs(5)).await;
        assert_eq!(
            code, 1001,
            "a {name} client of a draining node is told 1001 going away (reason {reason:?})"
        );
    }

    let status = node.wait_exit(Duration::from_secs(5 + 3)).await;
    let took = signalled.elapsed();
    assert!(
        status.success(),
        "a drained node exits 0, got {status:?}\nstderr:\n{}",
        node.stderr_text()
    );
    assert!(
        took < Duration::from_millis(5_000 + 1_500),
        "exit took {took:?}, over the 5s drain timeout"
    );
    assert!(
        saw_503,
        "/readyz never answered 503 during the drain grace; probes: {seen:?}\nstderr:\n{}",
        node.stderr_text()
    );
    assert!(
        took >= Duration::from_secs(1),
        "the node stopped after {took:?}, inside its 1s drain grace"
    );
}

#[tokio::test]
async fn the_drain_timeout_bounds_a_client_that_never_closes() {
    let node = Node::start(&[("SUBGATE__SERVER__DRAIN_TIMEOUT_SECONDS", "2")]);
    // Handshake done, connection_init sent, then deaf: it never reads the
    // close frame and never closes its side.
    let mut deaf = RawWs::upgrade(node.addr, "/graphql/ws", TRANSPORT_WS).await;
    deaf.send_text(r#"{"type":"connection_init"}"#).await;
    let signalled = Instant::now();
    node.sigterm();
    let status = node.wait_exit(Duration::from_secs(2 + 4)).await;
    let took = signalled.elapsed();
    assert!(
        status.success(),
        "exit after the drain timeout is still 0, got {status:?}"
    );
    assert!(
        took < Duration::from_millis(2_000 + 1_500),
        "exit took {took:?}, over the 2s drain timeout"
    );
    drop(deaf);
}

#[tokio::test]
async fn an_idle_node_exits_at_once_on_sigterm() {
    let node = Node::start(&[("SUBGATE__SERVER__DRAIN_TIMEOUT_SECONDS", "30")]);
    assert_eq!(get(&node, "/healthz").await.status, reqwest::StatusCode::OK);
    let signalled = Instant::now();
    node.sigterm();
    let status = node.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}");
    // Nothing to drain: no reason to sit out the 30s timeout.
    assert!(
        signalled.elapsed() < Duration::from_secs(3),
        "an idle node took {:?} to exit",
        signalled.elapsed()
    );
}
