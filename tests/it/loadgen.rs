//! `subgate-loadgen`, the instrument every benchmark is read from, checked
//! against real nodes: it drives every transport with nothing lost, it
//! reports a soak's memory per connection from the server's own metrics,
//! it fails (exit status and report) when events are lost, and its storm
//! mode tallies every answer to hostile requests.

use std::time::Duration;

use serde_json::Value;

use crate::common::*;

/// A node that takes the loadgen's publishes and mints its tokens.
fn loadgen_node(extra: &[(&str, &str)]) -> Node {
    let mut env = vec![
        ("SUBGATE__RATELIMIT__PUBLISH_PER_SECOND", "10000"),
        ("SUBGATE__RATELIMIT__PUBLISH_BURST", "10000"),
    ];
    env.extend_from_slice(extra);
    publisher_node(&env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transport_delivers_every_event_once() {
    let node = loadgen_node(&[]);
    let url = node.http_url("");
    let url = url.trim_end_matches('/');
    let dir = TempDir::new();
    let cases: &[(&str, &[&str])] = &[
        ("graphql-ws", &[]),
        ("graphql-ws-legacy", &[]),
        ("graphql-sse", &[]),
        ("sse", &[]),
        ("graphql-ws", &["--publisher", "api", "--topics", "3"]),
        ("sse", &["--publisher", "api", "--topics", "2", "--resume"]),
        ("envelope", &["--jwt-secret", SECRET, "--topics", "2"]),
    ];
    for (i, (transport, extra)) in cases.iter().enumerate() {
        let json = dir.path().join(format!("{i}.json"));
        let mut args = vec![
            "--url",
            url,
            "--connections",
            "40",
            "--rate",
            "20",
            "--duration",
            "1.5",
            "--transport",
            transport,
            "--api-key",
            API_KEY,
            // Two worker processes: their reports are summed.
            "--workers",
            "2",
        ];
        args.extend_from_slice(extra);
        let r = tokio::task::block_in_place(|| run_loadgen(&args, &json, Duration::from_secs(60)));
        assert!(r.ok, "{transport} {extra:?}: the run failed\n{}", r.output);
        let expected = r.count("/deliveries/expected");
        // 30 events over the topics, each to its topic's subscribers.
        assert_eq!(
            expected,
            30 * 40 / r.count("/topics").max(1),
            "{}",
            r.output
        );
        assert_eq!(r.count("/deliveries/received"), expected, "{}", r.output);
        assert_eq!(r.count("/deliveries/lost"), 0);
        assert_eq!(r.count("/deliveries/duplicates"), 0);
        assert_eq!(r.count("/connections/live"), 40, "{}", r.output);
        assert_eq!(r.count("/workers"), 2);
        assert!(r.count("/latency_ms/count") == expected, "{}", r.output);
        assert!(r.output.contains("result       OK"), "{}", r.output);
        // Identical GraphQL subscriptions share one execution per event
        // (per topic: each event is executed for its topic's group).
        if transport.starts_with("graphql") {
            let per_event = r
                .report
                .pointer("/server/executions_per_event")
                .and_then(Value::as_f64);
            assert_eq!(per_event, Some(1.0), "{transport} {extra:?}\n{}", r.output);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_subscriptions_per_connection_get_every_event_once_each() {
    let node = loadgen_node(&[]);
    let url = node.http_url("");
    let url = url.trim_end_matches('/');
    let dir = TempDir::new();
    // 20 connections × 4 subscriptions = 80 subscriptions; 30 events.
    // (transport, topics, extra): 80 topics is the per-user shape (each
    // topic one subscription, each connection 4 topics), 1 a broadcast
    // read 4 times on every connection, 8 ten subscriptions a topic.
    let cases: &[(&str, usize, &[&str])] = &[
        ("graphql-ws", 80, &[]),
        ("graphql-ws", 1, &[]),
        ("graphql-ws", 8, &["--resume"]),
        ("graphql-ws-legacy", 80, &[]),
        ("sse", 80, &[]),
        ("envelope", 80, &["--jwt-secret", SECRET]),
    ];
    for (i, (transport, topics, extra)) in cases.iter().enumerate() {
        let json = dir.path().join(format!("{i}.json"));
        let topics = topics.to_string();
        let mut args = vec![
            "--url",
            url,
            "--connections",
            "20",
            "--subscriptions-per-connection",
            "4",
            "--topics",
            &topics,
            "--publisher",
            "api",
            "--rate",
            "20",
            "--duration",
            "1.5",
            "--transport",
            transport,
            "--api-key",
            API_KEY,
            "--workers",
            "2",
        ];
        args.extend_from_slice(extra);
        let r = tokio::task::block_in_place(|| run_loadgen(&args, &json, Duration::from_secs(60)));
        let case = format!("{transport} --topics {topics} {extra:?}");
        assert!(r.ok, "{case}: the run failed\n{}", r.output);
        assert_eq!(r.count("/connections/subscriptions"), 80, "{case}");
        assert_eq!(r.count("/connections/live"), 80, "{case}\n{}", r.output);
        assert_eq!(r.count("/connections/open_at_end"), 20, "{case}");
        assert_eq!(r.count("/publish/acked"), 30, "{case}\n{}", r.output);
        // A delivery is one subscription's copy of one event: each event
        // reaches the 80 / topics subscriptions of its topic, once.
        let expected = r.count("/deliveries/expected");
        assert_eq!(
            expected,
            30 * 80 / topics.parse::<u64>().unwrap(),
            "{case}\n{}",
            r.output
        );
        assert_eq!(r.count("/deliveries/received"), expected, "{case}");
        assert_eq!(r.count("/latency_ms/count"), expected, "{case}");
        assert_eq!(r.count("/deliveries/lost"), 0, "{case}");
        assert_eq!(r.count("/deliveries/duplicates"), 0, "{case}");
        assert_eq!(r.count("/connections/refused"), 0, "{case}");
        assert!(
            r.output.contains("20 connections × 4 subscriptions (80)"),
            "{case}\n{}",
            r.output
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_subscriptions_on_a_drained_node_each_resume_where_they_were() {
    // Two nodes on one Redis; half the connections are on the node
    // stopped mid-run, and with --resume each of their three subscriptions
    // resumes on the other node from the last event it saw.
    let redis = TestRedis::start();
    let env = [
        ("SUBGATE__REDIS__URL", redis.url()),
        ("SUBGATE__SERVER__DRAIN_GRACE_SECONDS", "0".to_owned()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let stays = loadgen_node(&env);
    let dir = TempDir::new();
    for (i, (transport, extra)) in [
        ("graphql-ws", &[][..]),
        ("sse", &[][..]),
        ("envelope", &["--jwt-secret", SECRET][..]),
    ]
    .iter()
    .enumerate()
    {
        let stops = loadgen_node(&env);
        let (a, b) = (stays.http_url(""), stops.http_url(""));
        let json = dir.path().join(format!("{i}.json"));
        let mut args: Vec<String> = [
            "--url",
            a.trim_end_matches('/'),
            "--url",
            b.trim_end_matches('/'),
            "--publish-url",
            a.trim_end_matches('/'),
            "--connections",
            "20",
            "--subscriptions-per-connection",
            "3",
            "--topics",
            "12",
            "--rate",
            "20",
            "--duration",
            "4",
            "--publisher",
            "api",
            "--api-key",
            API_KEY,
            "--transport",
            transport,
            "--resume",
        ]
        .iter()
        .chain(extra.iter())
        .map(|s| s.to_string())
        .collect();
        args.extend(["--drain-timeout".to_owned(), "10".to_owned()]);
        let handle = std::thread::spawn({
            let json = json.clone();
            move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                run_loadgen(&args, &json, Duration::from_secs(60))
            }
        });
        tokio::time::sleep(Duration::from_millis(2500)).await;
        stops.sigterm();
        let r = tokio::task::block_in_place(|| handle.join().unwrap());
        assert!(r.ok, "{transport}: the run failed\n{}", r.output);
        // The 10 connections of the stopped node were cut and came back.
        assert!(
            r.count("/connections/reconnects") >= 10,
            "{transport}\n{}",
            r.output
        );
        let closes: u64 = r.report["connections"]["closes"]
            .as_object()
            .map(|c| c.values().filter_map(Value::as_u64).sum())
            .unwrap_or(0);
        assert_eq!(closes, 10, "{transport}\n{}", r.output);
        // 60 subscriptions over 12 topics: every event to 5, once each.
        let acked = r.count("/publish/acked");
        assert_eq!(acked, 80, "{transport}\n{}", r.output);
        assert_eq!(r.count("/deliveries/expected"), acked * 5, "{transport}");
        assert_eq!(
            r.count("/deliveries/received"),
            acked * 5,
            "{transport}\n{}",
            r.output
        );
        assert_eq!(r.count("/deliveries/lost"), 0, "{transport}");
        assert_eq!(r.count("/deliveries/duplicates"), 0, "{transport}");
        assert_eq!(r.count("/deliveries/gaps"), 0, "{transport}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refusing_the_kth_subscription_fails_the_run_at_once_saying_why() {
    let node = loadgen_node(&[("SUBGATE__WEBSOCKET__MAX_SUBSCRIPTIONS_PER_CONNECTION", "2")]);
    let url = node.http_url("");
    let url = url.trim_end_matches('/');
    let dir = TempDir::new();
    for (i, (transport, extra)) in [
        ("graphql-ws", &[][..]),
        ("graphql-ws-legacy", &[][..]),
        ("envelope", &["--jwt-secret", SECRET][..]),
    ]
    .iter()
    .enumerate()
    {
        let json = dir.path().join(format!("{i}.json"));
        let mut args = vec![
            "--url",
            url,
            "--connections",
            "10",
            "--subscriptions-per-connection",
            "3",
            "--topics",
            "30",
            "--publisher",
            "api",
            "--rate",
            "20",
            // Were it measured, this run would take a minute.
            "--duration",
            "60",
            "--transport",
            transport,
            "--api-key",
            API_KEY,
        ];
        args.extend_from_slice(extra);
        let r = tokio::task::block_in_place(|| run_loadgen(&args, &json, Duration::from_secs(30)));
        assert!(!r.ok, "{transport}: the run must fail\n{}", r.output);
        // The third subscription of each connection, and only it.
        assert_eq!(
            r.count("/connections/refused"),
            10,
            "{transport}\n{}",
            r.output
        );
        assert_eq!(
            r.count("/connections/refused_reasons/TOO_MANY_SUBSCRIPTIONS"),
            10,
            "{transport}\n{}",
            r.output
        );
        assert_eq!(
            r.count("/connections/live"),
            20,
            "{transport}\n{}",
            r.output
        );
        assert_eq!(r.count("/connections/never_live"), 0, "{transport}");
        assert_eq!(r.count("/publish/sent"), 0, "{transport}: not measured");
        assert_eq!(r.report["measured"], Value::Bool(false), "{transport}");
        assert!(
            r.output
                .contains("SUBGATE__WEBSOCKET__MAX_SUBSCRIPTIONS_PER_CONNECTION=3 or more"),
            "{transport}\n{}",
            r.output
        );
    }

    // Where a transport cannot hold several, the flag is refused up front.
    for (transport, topics, why) in [
        ("graphql-sse", "30", "one operation per request"),
        ("sse", "1", "distinct topics"),
    ] {
        let json = dir.path().join("refused.json");
        let args = [
            "--url",
            url,
            "--connections",
            "2",
            "--subscriptions-per-connection",
            "3",
            "--topics",
            topics,
            "--publisher",
            "api",
            "--api-key",
            API_KEY,
            "--transport",
            transport,
        ];
        let r = tokio::task::block_in_place(|| run_loadgen(&args, &json, Duration::from_secs(30)));
        assert!(!r.ok && r.output.contains(why), "{transport}\n{}", r.output);
    }
}

/// GraphQL subscription operations the node has counted, every outcome.
async fn subscription_operations(node: &Node) -> f64 {
    let metrics = get(node, "/metrics").await;
    metrics
        .body
        .lines()
        .filter(|l| {
            l.starts_with("subgate_graphql_operations_total{")
                && l.contains("type=\"subscription\"")
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_is_reported_beside_the_measured_deliveries_and_loses_them_nothing() {
    let node = loadgen_node(&[]);
    let url = node.http_url("");
    let url = url.trim_end_matches('/');
    let dir = TempDir::new();
    // Without a secret the churn subscribes as a user signed up for the
    // run; with one, as a user of its own.
    let cases: &[&[&str]] = &[&[], &["--jwt-secret", SECRET, "--churn-connections", "3"]];
    for (i, extra) in cases.iter().enumerate() {
        let before = subscription_operations(&node).await;
        let json = dir.path().join(format!("{i}.json"));
        let mut args = vec![
            "--url",
            url,
            "--connections",
            "20",
            "--subscriptions-per-connection",
            "2",
            "--topics",
            "40",
            "--publisher",
            "api",
            "--api-key",
            API_KEY,
            "--rate",
            "20",
            "--duration",
            "2",
            "--churn",
            "50",
            "--churn-lifetime-ms",
            "200",
        ];
        args.extend_from_slice(extra);
        let r = tokio::task::block_in_place(|| run_loadgen(&args, &json, Duration::from_secs(60)));
        assert!(r.ok, "{extra:?}: the run failed\n{}", r.output);
        // The measured subscriptions: every event once each, the churn in
        // none of the figures.
        assert_eq!(r.count("/publish/acked"), 40, "{}", r.output);
        assert_eq!(r.count("/deliveries/expected"), 40, "{}", r.output);
        assert_eq!(r.count("/deliveries/received"), 40, "{}", r.output);
        assert_eq!(r.count("/latency_ms/count"), 40, "{}", r.output);
        assert_eq!(r.count("/deliveries/lost"), 0);
        assert_eq!(r.count("/deliveries/duplicates"), 0);
        assert_eq!(r.count("/connections/live"), 40, "{}", r.output);
        // The churn: about 50 topics a second for the 2 s measured, each
        // let go of, no errors, its connections answering pings.
        let churn = &r.report["churn"];
        let subscribes = r.count("/churn/subscribes");
        assert!((80..=110).contains(&subscribes), "{}", r.output);
        assert_eq!(r.count("/churn/unsubscribes"), subscribes, "{}", r.output);
        let per_second = churn["subscribes_per_second"].as_f64().unwrap_or(0.0);
        assert!((40.0..=55.0).contains(&per_second), "{}", r.output);
        assert_eq!(r.count("/churn/connections"), if i == 0 { 2 } else { 3 });
        assert_eq!(r.count("/churn/connections_open_at_end"), 0, "{}", r.output);
        for map in ["errors", "connect_errors", "closes"] {
            assert_eq!(churn[map], serde_json::json!({}), "{map}\n{}", r.output);
        }
        assert!(r.count("/churn/ping_rtt_ms/count") >= 2, "{}", r.output);
        assert!(r.output.contains("subscribes/s"), "{}", r.output);
        // The node saw them: every churn subscription is an operation.
        let counted = subscription_operations(&node).await - before;
        assert!(
            counted >= subscribes as f64,
            "the node counted {counted} subscriptions, the churn made {subscribes}\n{}",
            r.output
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soak_reports_server_memory_per_connection() {
    let node = loadgen_node(&[]);
    let url = node.http_url("");
    let dir = TempDir::new();
    let json = dir.path().join("soak.json");
    let args = [
        "--url",
        url.trim_end_matches('/'),
        "--connections",
        "200",
        "--rate",
        "0",
        "--duration",
        "1",
    ];
    let r = tokio::task::block_in_place(|| run_loadgen(&args, &json, Duration::from_secs(60)));
    assert!(r.ok, "{}", r.output);
    assert_eq!(r.count("/connections/open_at_end"), 200);
    let per_connection = r
        .report
        .pointer("/server/rss_per_connection_bytes")
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("no RSS per connection\n{}", r.output));
    // Each held connection costs the node something, and far below a MiB.
    assert!(
        per_connection > 0.0 && per_connection < 1_048_576.0,
        "{per_connection}"
    );
    assert!(r.output.contains("KiB per connection"), "{}", r.output);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_events_fail_the_run_and_are_counted_exactly() {
    // Two nodes on one Redis; half the subscribers are on the node that is
    // stopped mid-run and, without --resume, never come back.
    let redis = TestRedis::start();
    let env = [
        ("SUBGATE__REDIS__URL", redis.url()),
        ("SUBGATE__SERVER__DRAIN_GRACE_SECONDS", "0".to_owned()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let stays = loadgen_node(&env);
    let stops = loadgen_node(&env);
    let (a, b) = (stays.http_url(""), stops.http_url(""));
    let dir = TempDir::new();
    let json = dir.path().join("lossy.json");
    let args: Vec<String> = [
        "--url",
        a.trim_end_matches('/'),
        "--url",
        b.trim_end_matches('/'),
        "--publish-url",
        a.trim_end_matches('/'),
        "--connections",
        "40",
        "--rate",
        "20",
        "--duration",
        "4",
        "--publisher",
        "api",
        "--api-key",
        API_KEY,
        "--drain-timeout",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let handle = std::thread::spawn({
        let json = json.clone();
        move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_loadgen(&args, &json, Duration::from_secs(60))
        }
    });
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stops.sigterm();
    let r = tokio::task::block_in_place(|| handle.join().unwrap());
    assert!(!r.ok, "a run that lost events must fail\n{}", r.output);
    let published = r.count("/publish/acked");
    let lost = r.count("/deliveries/lost");
    let received = r.count("/deliveries/received");
    // Every acknowledged event reached the 20 subscribers that stayed; the
    // 20 cut off with 1001 missed what came after.
    assert_eq!(r.count("/connections/closes/1001"), 20, "{}", r.output);
    assert!(lost > 0, "{}", r.output);
    assert_eq!(received + lost, published * 40, "{}", r.output);
    assert!(r.output.contains("deliveries lost"), "{}", r.output);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_reports_every_answer_the_probes_and_the_nodes_peak_memory() {
    let node = Node::start(&[]);
    let url = node.http_url("");
    let url = url.trim_end_matches('/');
    let dir = TempDir::new();

    // 200 logins from one address: the node's per-address limit answers
    // most of them; every answer is tallied.
    let json = dir.path().join("login.json");
    let args = ["--url", url, "--storm", "login", "--connections", "200"];
    let r = tokio::task::block_in_place(|| run_loadgen(&args, &json, Duration::from_secs(120)));
    assert!(r.ok, "{}", r.output);
    let outcomes = r.report["outcomes"].as_object().expect("outcomes");
    let answered: u64 = outcomes.values().filter_map(Value::as_u64).sum();
    assert_eq!(answered, 200, "{}", r.output);
    assert!(
        r.count("/outcomes/200 RATE_LIMITED~1login") > 0,
        "{}",
        r.output
    );
    assert!(r.count("/healthz/answered") >= 5, "{}", r.output);
    assert_eq!(r.count("/healthz/failed"), 0);
    let peak = r
        .report
        .pointer("/nodes/0/rss_peak")
        .and_then(Value::as_f64);
    let after = r
        .report
        .pointer("/nodes/0/rss_after")
        .and_then(Value::as_f64);
    assert!(
        matches!((peak, after), (Some(p), Some(a)) if p >= a && a > 1e6),
        "{}",
        r.output
    );

    // Large documents: the excess over the queue is refused at once; a
    // target the node cannot meet fails the run, saying why.
    let json = dir.path().join("large.json");
    let args = [
        "--url",
        url,
        "--storm",
        "large-document",
        "--connections",
        "60",
        "--max-rss-mib",
        "1",
    ];
    let r = tokio::task::block_in_place(|| run_loadgen(&args, &json, Duration::from_secs(120)));
    assert!(!r.ok, "{}", r.output);
    assert!(
        r.count("/outcomes/429 RATE_LIMITED~1large_document") > 0,
        "{}",
        r.output
    );
    assert!(r.count("/outcomes/400 (no code)") > 0, "{}", r.output);
    assert!(r.output.contains("peaked at"), "{}", r.output);
    assert_eq!(
        r.report["failures"].as_array().map(Vec::len),
        Some(1),
        "{}",
        r.output
    );
}
