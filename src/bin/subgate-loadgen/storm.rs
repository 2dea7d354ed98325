//! `--storm`: what an attacker sends, all at once, instead of subscribers
//! and publishers. `--connections` requests leave together, each on a
//! connection of its own, while `/healthz` is probed every 20 ms from a
//! thread of its own (what a load balancer's health check would see), and
//! each node's resident memory, its peak included, is read from its own
//! `/metrics` before and after.
//!
//! - `login`: `login` with wrong passwords, half against one real account
//!   (made first), half against emails nobody has. Each check is an argon2
//!   hash of about 19 MiB.
//! - `large-document`: a query of about 15,000 tokens (just within the
//!   default `graphql.max_tokens`) that parses and is refused by
//!   validation as too complex.
//!
//! Every request must be answered (any answer: refusing is the point) and
//! every probe must succeed; `--max-healthz-ms` and `--max-rss-mib` make
//! the targets part of the verdict.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{json, Value};

use crate::plan::{metrics_urls, normalize_url, Args};
use crate::publisher::{graphql, request_error};
use crate::scrape::{Sample, Targets};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Storm {
    /// `login` with wrong passwords.
    Login,
    /// Documents of about 15,000 tokens that validation refuses.
    LargeDocument,
}

/// How often `/healthz` is probed.
const PROBE_EVERY: Duration = Duration::from_millis(20);
/// How long one storm request may take before it counts as unanswered.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Serialize)]
pub struct StormReport {
    pub storm: Storm,
    pub url: String,
    pub requests: usize,
    /// From the first request sent to the last answer.
    pub seconds: f64,
    /// Answers by HTTP status and the first error's code (and scope), e.g.
    /// `200 RATE_LIMITED/password_hash`.
    pub outcomes: BTreeMap<String, u64>,
    /// Requests without an answer (a connection error, a timeout), by reason.
    pub unanswered: BTreeMap<String, u64>,
    pub healthz: Probes,
    pub nodes: Vec<NodeMemory>,
    pub ok: bool,
    pub failures: Vec<String>,
}

/// What the `/healthz` probes saw, in milliseconds.
#[derive(Debug, Default, Serialize)]
pub struct Probes {
    pub answered: u64,
    pub failed: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// One node's resident memory, in bytes: before the storm, after it, and
/// the node's own peak (since it started) after it.
#[derive(Debug, Default, Serialize)]
pub struct NodeMemory {
    pub node: String,
    pub rss_before: Option<f64>,
    pub rss_after: Option<f64>,
    pub rss_peak: Option<f64>,
}

pub async fn run(storm: Storm, args: &Args) -> Result<ExitCode, String> {
    if args.connections == 0 {
        return Err("--connections must be at least 1".into());
    }
    let url = normalize_url(args.urls.first().ok_or("--url is required")?)?;
    let targets = Targets::resolve(&metrics_urls(args, std::slice::from_ref(&url))?).await?;
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(REQUEST_TIMEOUT)
        .build()
        .map_err(|e| format!("an HTTP client: {e}"))?;
    let bodies = bodies(storm, &client, &url, args.connections).await?;

    let before = targets.sample().await;
    let prober = Prober::start(format!("{url}/healthz"))?;
    let started = Instant::now();
    let answers = futures_util::future::join_all(bodies.into_iter().map(|body| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let response = client
                .post(format!("{url}/graphql"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .map_err(request_error)?;
            let status = response.status().as_u16();
            let text = response.text().await.map_err(request_error)?;
            Ok::<_, String>(outcome(status, &text))
        }
    }))
    .await;
    let seconds = started.elapsed().as_secs_f64();
    let probes = prober.stop();
    let after = targets.sample().await;

    let mut report = StormReport {
        storm,
        url,
        requests: args.connections,
        seconds,
        outcomes: BTreeMap::new(),
        unanswered: BTreeMap::new(),
        healthz: probes,
        nodes: memory(&targets.labels(), &before, &after),
        ok: false,
        failures: Vec::new(),
    };
    for answer in answers {
        let tally = match answer {
            Ok(outcome) => report.outcomes.entry(outcome),
            Err(reason) => report.unanswered.entry(reason),
        };
        *tally.or_default() += 1;
    }
    report.judge(args.max_healthz_ms, args.max_rss_mib);
    crate::report::finish(&report, &report.summary(), report.ok, args.json.as_deref())
}

/// The request bodies of the storm, made up front so that they leave
/// together.
async fn bodies(
    storm: Storm,
    client: &reqwest::Client,
    url: &str,
    n: usize,
) -> Result<Vec<String>, String> {
    let run = crate::marker::new_run_id();
    match storm {
        Storm::Login => {
            let victim = format!("storm-{run}@loadgen.invalid");
            let create = json!({
                "query": "mutation($input: CreateUserInput!) { createUser(input: $input) { user { id } errors { code message } } }",
                "variables": { "input": { "email": victim, "name": "storm", "password": format!("storm-password-{run}") } },
            });
            let answer = graphql(client, url, None, &create)
                .await
                .map_err(|e| format!("signing the storm's account up on {url}: {e}"))?;
            if answer.pointer("/data/createUser/user/id").is_none() {
                return Err(format!("signing the storm's account up on {url}: {answer}"));
            }
            Ok((0..n)
                .map(|i| {
                    let email = match i % 2 {
                        0 => victim.clone(),
                        _ => format!("nobody-{run}-{i}@loadgen.invalid"),
                    };
                    json!({
                        "query": "mutation($input: LoginInput!) { login(input: $input) { token errors { code message } } }",
                        "variables": { "input": { "email": email, "password": format!("guess-{i}") } },
                    })
                    .to_string()
                })
                .collect())
        }
        Storm::LargeDocument => {
            let body =
                json!({ "query": format!("{{ {}}}", "me { id } ".repeat(2_990)) }).to_string();
            Ok(vec![body; n])
        }
    }
}

/// `STATUS CODE[/scope]` of an answer: the first GraphQL error, else the
/// first payload error (`data.<field>.errors`), else `ok`.
fn outcome(status: u16, text: &str) -> String {
    let answer: Value = match serde_json::from_str(text) {
        Ok(answer) => answer,
        Err(_) => return format!("{status} not JSON"),
    };
    let payload_error = || {
        answer
            .get("data")?
            .as_object()?
            .values()
            .find_map(|field| field.pointer("/errors/0"))
    };
    let what = match answer.pointer("/errors/0") {
        Some(error) => {
            let code = error
                .pointer("/extensions/code")
                .and_then(Value::as_str)
                .unwrap_or("(no code)");
            match error.pointer("/extensions/scope").and_then(Value::as_str) {
                Some(scope) => format!("{code}/{scope}"),
                None => code.to_owned(),
            }
        }
        None => match payload_error() {
            Some(error) => error["code"].as_str().unwrap_or("payload error").to_owned(),
            None => "ok".to_owned(),
        },
    };
    format!("{status} {what}")
}

fn memory(
    labels: &[String],
    before: &[Option<Sample>],
    after: &[Option<Sample>],
) -> Vec<NodeMemory> {
    labels
        .iter()
        .enumerate()
        .map(|(i, label)| {
            let (before, after) = (before[i], after[i]);
            NodeMemory {
                node: label.clone(),
                rss_before: before.map(|s| s.rss_bytes),
                rss_after: after.map(|s| s.rss_bytes),
                rss_peak: after.map(|s| s.peak_rss_bytes).filter(|p| *p > 0.0),
            }
        })
        .collect()
}

impl StormReport {
    fn judge(&mut self, max_healthz_ms: Option<f64>, max_rss_mib: Option<f64>) {
        let unanswered: u64 = self.unanswered.values().sum();
        if unanswered > 0 {
            self.failures
                .push(format!("{unanswered} requests went unanswered"));
        }
        if self.healthz.failed > 0 {
            self.failures
                .push(format!("{} /healthz probes failed", self.healthz.failed));
        }
        if let Some(max) = max_healthz_ms.filter(|max| self.healthz.max_ms > *max) {
            self.failures.push(format!(
                "the slowest /healthz took {:.1} ms (at most {max} ms)",
                self.healthz.max_ms
            ));
        }
        if let Some(max) = max_rss_mib {
            for node in &self.nodes {
                match node.rss_peak {
                    Some(peak) if peak / MIB > max => self.failures.push(format!(
                        "{} peaked at {:.1} MiB (at most {max} MiB)",
                        node.node,
                        peak / MIB
                    )),
                    Some(_) => {}
                    None => self
                        .failures
                        .push(format!("{}: no peak RSS in its /metrics", node.node)),
                }
            }
        }
        self.ok = self.failures.is_empty();
    }

    fn summary(&self) -> String {
        let mut out = format!(
            "storm {}: {} requests at once to {}, all settled in {:.2} s\n",
            self.storm
                .to_possible_value()
                .map(|v| v.get_name().to_owned())
                .unwrap_or_default(),
            self.requests,
            self.url,
            self.seconds
        );
        for (outcome, n) in &self.outcomes {
            out += &format!("  {n:>6} × {outcome}\n");
        }
        for (reason, n) in &self.unanswered {
            out += &format!("  {n:>6} × unanswered: {reason}\n");
        }
        let h = &self.healthz;
        out += &format!(
            "/healthz: {} probes, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, {} failed\n",
            h.answered, h.p50_ms, h.p99_ms, h.max_ms, h.failed
        );
        let mib = |v: Option<f64>| v.map_or("?".to_owned(), |v| format!("{:.1}", v / MIB));
        for node in &self.nodes {
            out += &format!(
                "{}: RSS {} MiB before, {} MiB after, peak {} MiB\n",
                node.node,
                mib(node.rss_before),
                mib(node.rss_after),
                mib(node.rss_peak)
            );
        }
        out += &match self.ok {
            true => "OK\n".to_owned(),
            false => format!("FAILED: {}\n", self.failures.join("; ")),
        };
        out
    }
}

const MIB: f64 = 1024.0 * 1024.0;

/// `/healthz` probed every [`PROBE_EVERY`] from a thread and a runtime of
/// its own, so that the storm's tasks never delay a probe.
struct Prober {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Probes>,
}

impl Prober {
    /// Starts probing once a first probe has been answered (the node is up).
    fn start(url: String) -> Result<Prober, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the prober");
                runtime.block_on(probe_until(url, stop, ready_tx))
            })
        };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Prober { stop, thread }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("the /healthz prober stopped".into()),
        }
    }

    fn stop(self) -> Probes {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

async fn probe_until(
    url: String,
    stop: Arc<AtomicBool>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) -> Probes {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(client) => client,
        Err(e) => {
            let _ = ready.send(Err(format!("an HTTP client: {e}")));
            return Probes::default();
        }
    };
    let probe = async || {
        let started = Instant::now();
        let ok = client
            .get(&url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        (ok, started.elapsed())
    };
    if !probe().await.0 {
        let _ = ready.send(Err(format!("{url} does not answer 200")));
        return Probes::default();
    }
    let _ = ready.send(Ok(()));
    let mut histogram =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds");
    let mut probes = Probes::default();
    while !stop.load(Ordering::Relaxed) || probes.answered + probes.failed < 5 {
        let (ok, took) = probe().await;
        match ok {
            true => probes.answered += 1,
            false => probes.failed += 1,
        }
        let _ = histogram.record((took.as_micros() as u64).max(1));
        tokio::time::sleep(PROBE_EVERY).await;
    }
    let ms = |us: u64| us as f64 / 1000.0;
    probes.p50_ms = ms(histogram.value_at_quantile(0.5));
    probes.p99_ms = ms(histogram.value_at_quantile(0.99));
    probes.max_ms = ms(histogram.max());
    probes
}
