//! A node whose log pipe breaks: stderr is a FIFO whose reader is killed.
//! Logging must cost the node its log, nothing else: it still drains and
//! exits on SIGTERM, and its Redis Pub/Sub connection still comes back
//! after a Redis restart.

use std::fs::OpenOptions;
use std::os::unix::ffi::OsStrExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::json;

use crate::common::*;

/// How long recovery after the Redis restart may take.
const RECOVERY: Duration = Duration::from_secs(20);

fn mkfifo(path: &std::path::Path) {
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    let made = unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) };
    assert_eq!(made, 0, "mkfifo: {}", std::io::Error::last_os_error());
}

/// Publishes to a public topic until `stream` receives an event, within
/// `within`.
async fn until_delivered(node: &Node, stream: &mut SseStream, within: Duration) {
    let deadline = Instant::now() + within;
    let mut n = 0;
    loop {
        n += 1;
        let body = json!({ "topic": "ledger", "type": "entry", "payload": { "n": n }, "readers": "public" });
        let reply = publish_raw(node, Some(API_KEY), body.to_string()).await;
        if reply.status == reqwest::StatusCode::ACCEPTED {
            if let SseRead::Block(block) = stream.read(Duration::from_millis(500)).await {
                if block.dispatches() {
                    return;
                }
            }
        } else {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            Instant::now() < deadline,
            "no event reached the subscriber within {within:?} (last publish: {} {})",
            reply.status,
            reply.body
        );
    }
}

async fn readyz(node: &Node) -> reqwest::StatusCode {
    match node
        .http
        .get(node.http_url("/readyz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
    {
        Ok(r) => r.status(),
        Err(_) => reqwest::StatusCode::REQUEST_TIMEOUT,
    }
}

#[tokio::test]
async fn a_dead_log_reader_neither_disables_shutdown_nor_redis_reconnection() {
    let mut redis = TestRedis::start();
    let fifo_dir = TempDir::new();
    let fifo = fifo_dir.path().join("stderr.fifo");
    mkfifo(&fifo);
    // The log reader: a process of its own, to kill like a crashed shipper.
    let mut reader = Command::new("cat")
        .arg(&fifo)
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn cat");
    let reader_out = reader.stdout.take().unwrap();
    let url = redis.url();
    let node = Node::start_custom(
        &[],
        &[
            ("SUBGATE__REDIS__URL", url.as_str()),
            ("SUBGATE__REDIS__MAX_BACKOFF_SECONDS", "0.2"),
            ("SUBGATE__PUBLISH__API_KEYS", API_KEY),
            ("SUBGATE__SERVER__DRAIN_TIMEOUT_SECONDS", "3"),
            // Chatty, so that every step writes to the broken pipe.
            ("SUBGATE__LOG__LEVEL", "debug"),
        ],
        |_| {},
        |cmd| {
            // Opening the write end waits for cat to open the read end.
            let write_end = OpenOptions::new().write(true).open(&fifo).unwrap();
            cmd.stderr(Stdio::from(write_end));
            Some(Box::new(reader_out))
        },
    );
    let path = format!(
        "/api/v1/events/stream?topic=ledger&token={}",
        token(SECRET, "reader")
    );
    let mut stream = open_stream(&node, &path, &[])
        .await
        .unwrap_or_else(|r| panic!("stream refused: {} {}", r.status, r.body));
    until_delivered(&node, &mut stream, RECOVERY).await;

    // The reader dies: every write to stderr now fails with EPIPE.
    kill(Pid::from_raw(reader.id() as i32), Signal::SIGKILL).unwrap();
    reader.wait().unwrap();
    for _ in 0..5 {
        assert_eq!(readyz(&node).await, 200);
    }

    // Redis goes away and comes back: the node notices (and logs, into
    // the broken pipe) and reconnects.
    redis.kill();
    let deadline = Instant::now() + RECOVERY;
    while readyz(&node).await == 200 {
        assert!(
            Instant::now() < deadline,
            "the node never noticed Redis left"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    redis.restart();
    let deadline = Instant::now() + RECOVERY;
    while readyz(&node).await != 200 {
        assert!(
            Instant::now() < deadline,
            "/readyz did not return to 200 within {RECOVERY:?} of Redis' restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The subscriber from before the outage gets new events again.
    until_delivered(&node, &mut stream, RECOVERY).await;

    let metrics = get(&node, "/metrics").await.body;
    assert!(
        metric_sum(&metrics, "subgate_log_write_errors_total") > 0.0,
        "lines lost to the broken pipe are counted"
    );
    assert_eq!(
        metric_sum(&metrics, "subgate_task_restarts_total"),
        0.0,
        "no background task died"
    );

    // SIGTERM still drains and exits, within the drain timeout.
    drop(stream);
    let stopped = Instant::now();
    node.sigterm();
    let status = node.wait_exit(Duration::from_secs(8)).await;
    assert!(status.success(), "{status:?}");
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "{:?}",
        stopped.elapsed()
    );
}
