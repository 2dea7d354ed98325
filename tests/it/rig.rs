//! The docker-compose rig without containers, from the same files: a real
//! `redis-server`, three nodes, HAProxy started with
//! `deploy/haproxy/haproxy.cfg` (adapted only in addresses, as that file's
//! header says), Prometheus started with `deploy/prometheus/prometheus.yml`
//! (its service discovery replaced by the three addresses), and
//! `subgate-loadgen` driving the fleet through HAProxy.
//!
//! What an operator relies on: nothing is lost or duplicated through the
//! load balancer; a rolling restart (SIGTERM each node in turn, start it
//! again, as Kubernetes does) costs clients that resume nothing; the load
//! balancer stops sending new requests to a draining node; Prometheus sees
//! every replica.
//!
//! HAProxy and Prometheus must be installed (`scripts/install-tools`); a
//! missing one fails these tests, it never skips them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::node::Capture;
use crate::common::*;

/// Longer than HAProxy's check needs to mark a node down (500 ms × 2 in
/// the shipped config), short enough for a test.
/// Long enough for the checks made while a node drains to finish on a
/// loaded machine (the node stops answering when its grace ends).
const DRAIN_GRACE_SECONDS: &str = "6";
const DRAIN_TIMEOUT_SECONDS: &str = "8";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The path of `tool`, or a failure that says how to install it.
fn require(tool: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(tool))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("`{tool}` is not installed: run scripts/install-tools (the test command in README.md does)")
    })
}

/// A child process killed on drop, its output kept for failure messages.
struct Daemon {
    name: &'static str,
    child: Child,
    stdout: Arc<Capture>,
    stderr: Arc<Capture>,
}

impl Daemon {
    fn spawn(name: &'static str, mut command: Command) -> Daemon {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let stdout = Capture::spawn(child.stdout.take().unwrap());
        let stderr = Capture::spawn(child.stderr.take().unwrap());
        Daemon {
            name,
            child,
            stdout,
            stderr,
        }
    }

    fn log(&self) -> String {
        format!(
            "--- {} ---\n{}{}",
            self.name,
            self.stdout.text(),
            self.stderr.text()
        )
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `deploy/haproxy/haproxy.cfg` with the three adaptations its header
/// allows: real servers for the template, no Docker resolver, other ports.
fn haproxy_config(nodes: &[u16], listen: u16, stats: u16) -> String {
    let shipped = std::fs::read_to_string(repo("deploy/haproxy/haproxy.cfg")).unwrap();
    let mut out = Vec::new();
    let mut in_resolvers = false;
    let mut templated = 0;
    for line in shipped.lines() {
        let trimmed = line.trim_start();
        let starts_section = !line.starts_with(char::is_whitespace)
            && !trimmed.is_empty()
            && !trimmed.starts_with('#');
        if starts_section {
            in_resolvers = trimmed.starts_with("resolvers docker");
        }
        if in_resolvers {
            continue;
        }
        if trimmed.starts_with("server-template subgate") {
            templated += 1;
            let indent = &line[..line.len() - trimmed.len()];
            // `server-template NAME COUNT ADDR options…`
            let options: Vec<&str> = trimmed.split_whitespace().skip(4).collect();
            let options = options
                .join(" ")
                .replace("resolvers docker", "")
                .replace("init-addr none", "");
            let options = options.split_whitespace().collect::<Vec<_>>().join(" ");
            for (i, port) in nodes.iter().enumerate() {
                out.push(format!(
                    "{indent}server s{} 127.0.0.1:{port} {options}",
                    i + 1
                ));
            }
            continue;
        }
        if trimmed == "bind :8080" {
            out.push(line.replace(":8080", &format!("127.0.0.1:{listen}")));
            continue;
        }
        if trimmed == "bind :8404" {
            out.push(line.replace(":8404", &format!("127.0.0.1:{stats}")));
            continue;
        }
        out.push(line.to_owned());
    }
    assert_eq!(
        templated, 1,
        "haproxy.cfg has one `server-template subgate` line"
    );
    out.join("\n") + "\n"
}

/// `deploy/prometheus/prometheus.yml` with the nodes as static targets in
/// place of Docker's DNS, and the other targets' addresses moved.
fn prometheus_config(nodes: &[u16], haproxy_stats: u16, prometheus: u16) -> String {
    let shipped = std::fs::read_to_string(repo("deploy/prometheus/prometheus.yml")).unwrap();
    let mut out = Vec::new();
    let mut lines = shipped.lines().peekable();
    let mut replaced = 0;
    while let Some(line) = lines.next() {
        if line.trim() == "dns_sd_configs:" {
            replaced += 1;
            let indent = line.len() - line.trim_start().len();
            // Drop the block: every following line indented deeper.
            while let Some(next) = lines.peek() {
                let deeper =
                    next.len() - next.trim_start().len() > indent || next.trim().is_empty();
                if !deeper {
                    break;
                }
                lines.next();
            }
            let targets: Vec<String> = nodes.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
            out.push(format!("{}static_configs:", " ".repeat(indent)));
            out.push(format!(
                "{}- targets: [{}]",
                " ".repeat(indent + 2),
                targets.join(", ")
            ));
            continue;
        }
        out.push(
            line.replace("haproxy:8404", &format!("127.0.0.1:{haproxy_stats}"))
                .replace("localhost:9090", &format!("127.0.0.1:{prometheus}")),
        );
    }
    assert_eq!(
        replaced, 1,
        "prometheus.yml discovers the nodes in one dns_sd_configs block"
    );
    out.join("\n") + "\n"
}

/// The servers HAProxy reports UP in its stats CSV.
async fn haproxy_up(client: &reqwest::Client, stats: u16) -> Vec<String> {
    let Ok(r) = client
        .get(format!("http://127.0.0.1:{stats}/;csv"))
        .send()
        .await
    else {
        return Vec::new();
    };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("subgate,s"))
        .filter(|l| l.split(',').nth(17) == Some("UP"))
        .map(|l| l.split(',').nth(1).unwrap_or("").to_owned())
        .collect()
}

async fn wait_haproxy_up(client: &reqwest::Client, stats: u16, want: usize, haproxy: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let up = haproxy_up(client, stats).await;
        if up.len() == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "HAProxy sees {up:?} up, not {want}\n{}",
            haproxy.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn node_env(redis: &TestRedis, port: u16) -> Vec<(String, String)> {
    [
        ("SUBGATE__REDIS__URL", redis.url()),
        ("SUBGATE__SERVER__PORT", port.to_string()),
        ("SUBGATE__PUBLISH__API_KEYS", API_KEY.to_owned()),
        ("SUBGATE__RATELIMIT__PUBLISH_PER_SECOND", "10000".to_owned()),
        ("SUBGATE__RATELIMIT__PUBLISH_BURST", "10000".to_owned()),
        (
            "SUBGATE__SERVER__DRAIN_GRACE_SECONDS",
            DRAIN_GRACE_SECONDS.to_owned(),
        ),
        (
            "SUBGATE__SERVER__DRAIN_TIMEOUT_SECONDS",
            DRAIN_TIMEOUT_SECONDS.to_owned(),
        ),
        ("SUBGATE__REDIS__MAX_BACKOFF_SECONDS", "0.2".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

fn start_node(env: &[(String, String)]) -> Node {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Node::start(&env)
}

/// The rig: Redis, three nodes on fixed ports (a restarted node comes back
/// where HAProxy expects it), HAProxy in front.
struct Rig {
    redis: TestRedis,
    ports: Vec<u16>,
    nodes: Vec<Option<Node>>,
    haproxy: Daemon,
    lb: u16,
    stats: u16,
    dir: TempDir,
    http: reqwest::Client,
}

impl Rig {
    async fn start() -> Rig {
        let haproxy_bin = require("haproxy");
        let redis = TestRedis::start();
        let ports: Vec<u16> = (0..3).map(|_| reserve_port()).collect();
        let nodes = std::thread::scope(|scope| {
            let starting: Vec<_> = ports
                .iter()
                .map(|&p| {
                    let env = node_env(&redis, p);
                    scope.spawn(move || start_node(&env))
                })
                .collect();
            starting
                .into_iter()
                .map(|s| Some(s.join().unwrap_or_else(|e| std::panic::resume_unwind(e))))
                .collect::<Vec<_>>()
        });
        let (lb, stats) = (reserve_port(), reserve_port());
        let dir = TempDir::new();
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(&cfg, haproxy_config(&ports, lb, stats)).unwrap();
        let mut command = Command::new(haproxy_bin);
        command.arg("-db").arg("-f").arg(&cfg);
        let haproxy = Daemon::spawn("haproxy", command);
        let http = reqwest::Client::new();
        wait_haproxy_up(&http, stats, 3, &haproxy).await;
        Rig {
            redis,
            ports,
            nodes,
            haproxy,
            lb,
            stats,
            dir,
            http,
        }
    }

    fn lb_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.lb)
    }

    fn metrics_args(&self) -> Vec<String> {
        self.ports
            .iter()
            .flat_map(|p| ["--metrics-url".to_owned(), format!("http://127.0.0.1:{p}")])
            .collect()
    }

    /// The sum of node `i`'s series whose line starts with `prefix`, by
    /// its own `/metrics`.
    async fn metric(&self, i: usize, prefix: &str) -> f64 {
        let text = self
            .http
            .get(format!("http://127.0.0.1:{}/metrics", self.ports[i]))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    }

    /// New long-lived connections node `i` has accepted.
    async fn accepted(&self, i: usize) -> f64 {
        self.metric(i, "subgate_connections_total{").await
    }

    /// GraphQL queries node `i` has answered (HTTP, WebSocket, SSE).
    async fn queries(&self, i: usize) -> f64 {
        self.metric(i, "subgate_graphql_operations_total{").await
    }
}

/// The load generator's arguments for a run through HAProxy that scrapes
/// every node: `extra` on top of the common ones.
fn through_haproxy(rig: &Rig, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--url",
        &rig.lb_url(),
        "--publisher",
        "api",
        "--api-key",
        API_KEY,
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect();
    args.extend(rig.metrics_args());
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_haproxy_nothing_is_lost_and_every_node_takes_connections() {
    let rig = Rig::start().await;
    let json = rig.dir.path().join("steady.json");
    let args = through_haproxy(
        &rig,
        &["--connections", "150", "--rate", "10", "--duration", "4"],
    );
    let run = tokio::task::block_in_place(|| run_loadgen(&args, &json, Duration::from_secs(120)));
    let (ok, report, text) = (run.ok, run.report, run.output);
    assert!(ok, "the run failed\n{text}\n{}", rig.haproxy.log());
    assert_eq!(count(&report, "/deliveries/lost"), 0, "{text}");
    assert_eq!(count(&report, "/deliveries/duplicates"), 0, "{text}");
    let expected = count(&report, "/deliveries/expected");
    assert!(expected >= 150 * 30, "{text}");
    assert_eq!(count(&report, "/deliveries/received"), expected, "{text}");
    // The server figures come from each node's own /metrics.
    let nodes = report
        .pointer("/server/nodes")
        .and_then(Value::as_array)
        .unwrap();
    assert_eq!(nodes.len(), 3, "{report}");
    assert!(report
        .pointer("/server/cpu_seconds_per_1000_deliveries")
        .and_then(Value::as_f64)
        .is_some());
    // leastconn spread the subscribers over every node.
    for i in 0..3 {
        let accepted = rig.accepted(i).await;
        assert!(
            accepted >= 20.0,
            "node {i} accepted {accepted} connections\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_loses_nothing_for_clients_that_resume() {
    let mut rig = Rig::start().await;
    let json = rig.dir.path().join("rolling.json");
    let args = through_haproxy(
        &rig,
        &[
            "--connections",
            "150",
            "--rate",
            "10",
            "--duration",
            "45",
            "--resume",
            "--drain-timeout",
            "20",
        ],
    );
    let run = std::thread::spawn({
        let json = json.clone();
        move || run_loadgen(&args, &json, Duration::from_secs(180))
    });
    // Let the run reach its measured phase.
    tokio::time::sleep(Duration::from_secs(6)).await;
    for i in 0..3 {
        let node = rig.nodes[i].take().unwrap();
        let before = rig.accepted(i).await;
        node.sigterm();
        // HAProxy's check (500 ms, two failures) takes the node out well
        // inside its drain grace; meanwhile it still answers HTTP.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let marked = rig.accepted(i).await;
        let answered = rig.queries(i).await;
        let down: Vec<String> = haproxy_up(&rig.http, rig.stats).await;
        assert!(
            !down.contains(&format!("s{}", i + 1)),
            "HAProxy still counts draining node {i} as up: {down:?}"
        );
        // The draining node still answers HTTP (its drain grace), so any
        // query HAProxy sent it would be counted by it: none is.
        for _ in 0..30 {
            let r = rig
                .http
                .post(format!("{}/graphql", rig.lb_url()))
                .json(&serde_json::json!({"query": "{ __typename }"}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
        assert_eq!(
            rig.queries(i).await,
            answered,
            "HAProxy sent queries to draining node {i}"
        );
        // Clients the drain cut off reconnected through HAProxy meanwhile
        // (their backoff is at most about a second): none of them landed
        // on the draining node.
        let after = rig.accepted(i).await;
        assert_eq!(
            marked, after,
            "HAProxy sent new connections to draining node {i} (accepted {before} before the drain)"
        );
        let status = node.wait_exit(Duration::from_secs(20)).await;
        assert!(
            status.success(),
            "node {i} exited with {status:?}\n{}",
            node.stderr_text()
        );
        drop(node);
        rig.nodes[i] = Some(start_node(&node_env(&rig.redis, rig.ports[i])));
        wait_haproxy_up(&rig.http, rig.stats, 3, &rig.haproxy).await;
    }
    let done = tokio::task::block_in_place(|| run.join().unwrap());
    let (ok, report, text) = (done.ok, done.report, done.output);
    assert!(ok, "the run failed\n{text}");
    assert_eq!(count(&report, "/deliveries/lost"), 0, "{text}");
    assert_eq!(count(&report, "/deliveries/duplicates"), 0, "{text}");
    assert!(count(&report, "/connections/reconnects") >= 1, "{text}");
    assert!(count(&report, "/connections/closes/1001") >= 1, "{text}");
    assert!(count(&report, "/deliveries/received") >= count(&report, "/deliveries/expected"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_with_the_shipped_scrape_config_sees_every_node_up() {
    let prometheus_bin = require("prometheus");
    let rig = Rig::start().await;
    let port = reserve_port();
    let dir = rig.dir.path().join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("prometheus.yml"),
        prometheus_config(&rig.ports, rig.stats, port),
    )
    .unwrap();
    // The rules load from beside the config, as in the compose rig.
    std::fs::copy(repo("deploy/prometheus/alerts.yml"), dir.join("alerts.yml")).unwrap();
    let mut command = Command::new(prometheus_bin);
    command
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"));
    let prometheus = Daemon::spawn("prometheus", command);
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let targets = rig
            .http
            .get(format!("http://127.0.0.1:{port}/api/v1/targets"))
            .send()
            .await;
        let mut up = Vec::new();
        if let Ok(r) = targets {
            let v: Value = r.json().await.unwrap_or(Value::Null);
            for t in v
                .pointer("/data/activeTargets")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if t.pointer("/labels/job").and_then(Value::as_str) == Some("subgate")
                    && t.get("health").and_then(Value::as_str) == Some("up")
                {
                    up.push(
                        t.pointer("/labels/instance")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_owned(),
                    );
                }
            }
        }
        if up.len() == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus sees {up:?} up\n{}",
            prometheus.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The rules loaded: every alert of alerts.yml is known to Prometheus.
    let rules: Value = rig
        .http
        .get(format!("http://127.0.0.1:{port}/api/v1/rules"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let groups = rules
        .pointer("/data/groups")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    assert!(
        !groups.is_empty(),
        "no rule groups loaded: {rules}\n{}",
        prometheus.log()
    );
}

fn count(report: &Value, pointer: &str) -> u64 {
    report.pointer(pointer).and_then(Value::as_u64).unwrap_or(0)
}
