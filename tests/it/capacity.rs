//! A node at its connection capacity, sized from its open-files limit:
//! it refuses more long-lived connections with 503 and `Retry-After`, says
//! so on `/readyz`, and keeps answering `/healthz` at once.

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use tokio_tungstenite::tungstenite;

use crate::common::*;

/// Gives the child `files` open files, soft and hard (so it cannot raise it).
fn limit_open_files(cmd: &mut Command, files: u64) {
    // SAFETY: only setrlimit, which is async-signal-safe, runs between fork
    // and exec.
    unsafe {
        cmd.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: files as libc::rlim_t,
                rlim_max: files as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn ws_options() -> ConnectOptions<'static> {
    ConnectOptions {
        subprotocol: Some(TRANSPORT_WS),
        ..Default::default()
    }
}

/// `GET path`, with how long the answer took.
async fn timed_get(node: &Node, path: &str) -> (reqwest::StatusCode, String, Duration) {
    let started = Instant::now();
    let response = node
        .http
        .get(node.http_url(path))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path} on a full node: {e}"));
    let status = response.status();
    let body = response.text().await.unwrap();
    (status, body, started.elapsed())
}

#[tokio::test]
async fn a_full_node_refuses_with_503_and_retry_after_and_stays_healthy() {
    let node = Node::start_custom(
        &[],
        &[("SUBGATE__SERVER__WORKERS", "2")],
        |_| {},
        |cmd| {
            limit_open_files(cmd, 300);
            None
        },
    );
    let url = node.ws_url("/graphql");
    let mut held = Vec::new();
    let refusal = loop {
        assert!(
            held.len() < 300,
            "a node with 300 open files admitted {} WebSockets",
            held.len()
        );
        match try_connect(&url, ws_options()).await {
            Ok(ws) => held.push(ws),
            Err(tungstenite::Error::Http(response)) => break response,
            Err(e) => panic!(
                "after {} WebSockets, the next one failed without an HTTP refusal: {e}",
                held.len()
            ),
        }
    };
    assert_eq!(refusal.status(), 503, "a full node refuses with 503");
    let retry_after = refusal
        .headers()
        .get("Retry-After")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    assert!(
        retry_after.is_some_and(|s| s > 0),
        "the refusal says when to retry: {:?}",
        refusal.headers()
    );
    // 300 files, less the reserve of 256 for everything else.
    assert_eq!(held.len(), 44, "the limit derived from ulimit -n 300");
    let log = node.stderr_text();
    assert!(
        log.contains("max_connections=44"),
        "the start-up log says so:\n{log}"
    );

    // An event stream is refused the same way.
    let stream = node
        .http
        .get(node.http_url(&format!(
            "/api/v1/events/stream?topics=posts&token={}",
            token(SECRET, "reader")
        )))
        .header("Accept", "text/event-stream")
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 503);
    assert!(stream.headers().contains_key("Retry-After"));

    // At capacity the node still answers its probes, at once.
    for _ in 0..5 {
        let (status, _, took) = timed_get(&node, "/healthz").await;
        assert_eq!(status, 200);
        assert!(took < Duration::from_millis(100), "/healthz took {took:?}");
    }
    let (status, body, _) = timed_get(&node, "/readyz").await;
    assert_eq!(status, 503, "a full node is not ready: {body}");
    assert!(
        body.contains("connections: full (44 of 44)"),
        "/readyz says why: {body}"
    );
    let (status, metrics, _) = timed_get(&node, "/metrics").await;
    assert_eq!(status, 200);
    assert!(metric_sum(&metrics, "subgate_rejected_total") >= 2.0);

    // Room again once some clients leave.
    // Dropped: the sockets close, as when clients go away.
    held.truncate(held.len() - 3);
    let deadline = Instant::now() + Duration::from_secs(10);
    let admitted = loop {
        match try_connect(&url, ws_options()).await {
            Ok(ws) => break ws,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no room after three clients left: {e}"),
        }
    };
    held.push(admitted);
    // The other two closes reach the node in their own time.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body, _) = timed_get(&node, "/readyz").await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "ready again with room: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(node.stderr_text().find("Too many open files").is_none());
}

#[test]
fn a_limit_above_what_the_open_files_allow_is_refused_at_start() {
    let dir = TempDir::new();
    let mut cmd = Command::new(crate::common::node::BIN);
    cmd.current_dir(dir.path())
        .env_clear()
        .env("SUBGATE__SERVER__PORT", "0")
        .env("SUBGATE__SERVER__MAX_CONNECTIONS", "50000")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    limit_open_files(&mut cmd, 1024);
    let mut child = cmd.spawn().expect("run subgate");
    // A node that starts instead of refusing is killed, and fails the test.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("a node with max_connections above its file limit started");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("server.max_connections"), "{stderr}");
    assert!(lines[0].contains("768"), "names what fits: {stderr}");
}

#[tokio::test]
async fn idle_http_connections_cannot_fill_the_file_table() {
    let node = Node::start_custom(
        &[],
        &[("SUBGATE__SERVER__WORKERS", "2")],
        |_| {},
        |cmd| {
            limit_open_files(cmd, 300);
            None
        },
    );
    // More idle sockets than the node has files: it takes what fits
    // beside its own files, and the rest wait in the listen backlog.
    let flood: Vec<std::net::TcpStream> = (0..290)
        .map(|i| {
            std::net::TcpStream::connect(node.addr)
                .unwrap_or_else(|e| panic!("connection {i} of the flood: {e}"))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(flood);
    let (status, _, took) = timed_get(&node, "/healthz").await;
    assert_eq!(status, 200);
    assert!(
        took < Duration::from_secs(2),
        "/healthz after the flood took {took:?}"
    );
    let log = node.stderr_text();
    assert!(
        !log.contains("Too many open files"),
        "the flood ran the node out of files:\n{log}"
    );
}
