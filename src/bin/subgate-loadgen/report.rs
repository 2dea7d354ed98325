//! The run's report: one JSON document with every figure, a human summary,
//! and the verdict (the exit status).

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::churn::ChurnReport;
use crate::client::TOO_MANY_SUBSCRIPTIONS;
use crate::plan::WorkerReport;
use crate::scrape::Sample;

#[derive(Debug, Serialize)]
pub struct Report {
    pub run: String,
    pub transport: String,
    pub publisher: String,
    pub urls: Vec<String>,
    pub topics: usize,
    pub workers: usize,
    pub target_rate: f64,
    pub duration_seconds: f64,
    pub connections: Connections,
    pub publish: Publish,
    pub deliveries: Deliveries,
    pub latency_ms: Latency,
    /// `--churn`: what the churn client did beside the measured
    /// subscriptions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub churn: Option<ChurnReport>,
    pub server: Server,
    /// CPU-seconds the load generator itself spent (coordinator and
    /// workers): on a shared machine, what the servers did not get.
    pub client_cpu_seconds: f64,
    /// Whether the measured phase ran (not when the nodes refused
    /// subscriptions).
    pub measured: bool,
    pub ok: bool,
    pub failures: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct Connections {
    /// Subscriber connections.
    pub target: usize,
    /// `--subscriptions-per-connection`.
    pub subscriptions_per_connection: usize,
    /// Subscriptions in all: `target` times the above.
    pub subscriptions: usize,
    /// Subscriptions that saw a warm-up event (live end to end).
    pub live: u64,
    /// Subscriptions never live (refused ones apart).
    pub never_live: u64,
    /// Subscriptions the nodes refused, and why (an error code:
    /// `TOO_MANY_SUBSCRIPTIONS` is the per-connection limit).
    pub refused: u64,
    pub refused_reasons: BTreeMap<String, u64>,
    /// Established at the end of the measured phase.
    pub open_at_end: u64,
    pub connect_errors: u64,
    pub connect_error_reasons: BTreeMap<String, u64>,
    /// Connections ended by the server or the network, by close code.
    pub closes: BTreeMap<String, u64>,
    pub reconnects: u64,
    /// Errors the server sent inside a subscription, by code.
    pub server_errors: BTreeMap<String, u64>,
    /// Seconds from the first connection to every subscriber being live.
    pub warmup_seconds: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct Publish {
    pub sent: u64,
    pub acked: u64,
    pub failed: u64,
    pub failures: BTreeMap<String, u64>,
    /// Publishes that started after their slot: the publisher could not
    /// keep the target rate (every request in flight was busy).
    pub late: u64,
    pub achieved_rate: f64,
    /// Warm-up markers published (every round, before measuring), and
    /// those that failed, by reason.
    pub warmup_sent: u64,
    pub warmup_failed: u64,
    pub warmup_failures: BTreeMap<String, u64>,
}

#[derive(Debug, Default, Serialize)]
pub struct Deliveries {
    /// Acknowledged events times the subscriptions of their topic.
    pub expected: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicates: u64,
    /// History gaps the server announced on resume.
    pub gaps: u64,
    /// Received per second of the measured phase.
    pub per_second: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct Latency {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// One node's figures, from its own `/metrics`.
#[derive(Debug, Default, Serialize)]
pub struct Node {
    pub node: String,
    pub cpu_seconds: Option<f64>,
    pub rss_bytes: NodeRss,
}

/// A node's resident memory before the run, after it, and at its peak.
#[derive(Debug, Default, Serialize)]
pub struct NodeRss {
    /// Before the first connection.
    pub before: Option<f64>,
    /// At the end of the measured phase (or of the soak).
    pub after: Option<f64>,
    /// The highest of the samples taken every second.
    pub peak: Option<f64>,
}

#[derive(Debug, Default, Serialize)]
pub struct Server {
    pub nodes: Vec<Node>,
    /// Summed over the nodes, measured phase and drain.
    pub cpu_seconds: Option<f64>,
    pub cpu_seconds_per_1000_deliveries: Option<f64>,
    pub deliveries_per_cpu_second: Option<f64>,
    /// Summed over the nodes: the highest RSS each reached.
    pub rss_peak_bytes: Option<f64>,
    /// RSS added by the connections (held, not publishing), per connection.
    pub rss_per_connection_bytes: Option<f64>,
    /// GraphQL subscription results the nodes executed per event published
    /// in the measured phase, summed over the nodes: 1 per node when
    /// identical subscriptions share their execution, one per subscriber
    /// when they do not.
    pub executions_per_event: Option<f64>,
}

/// Prints `summary`, writes `report` to `json` when asked, and gives the
/// exit status of the verdict `ok`.
pub fn finish(
    report: &impl Serialize,
    summary: &str,
    ok: bool,
    json: Option<&std::path::Path>,
) -> Result<std::process::ExitCode, String> {
    print!("{summary}");
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(report).expect("the report encodes");
        std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    Ok(match ok {
        true => std::process::ExitCode::SUCCESS,
        false => std::process::ExitCode::FAILURE,
    })
}

/// Sums the workers' histograms and tallies.
pub fn merge(reports: &[WorkerReport]) -> (WorkerReport, Histogram<u64>) {
    let mut total = WorkerReport::default();
    let mut histogram =
        Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds");
    for r in reports {
        let s = &mut total.status;
        s.attempted += r.status.attempted;
        s.open += r.status.open;
        s.live += r.status.live;
        s.refused += r.status.refused;
        s.received += r.status.received;
        s.frames += r.status.frames;
        s.reconnects += r.status.reconnects;
        s.connect_errors += r.status.connect_errors;
        total.lost += r.lost;
        total.duplicates += r.duplicates;
        total.gaps += r.gaps;
        total.never_live += r.never_live;
        for (into, from) in [
            (&mut total.connect_error_reasons, &r.connect_error_reasons),
            (&mut total.refused_reasons, &r.refused_reasons),
            (&mut total.closes, &r.closes),
            (&mut total.server_errors, &r.server_errors),
        ] {
            for (k, v) in from {
                *into.entry(k.clone()).or_default() += v;
            }
        }
        for &(value, count) in &r.latency_us {
            let _ = histogram.record_n(value.max(1), count);
        }
    }
    (total, histogram)
}

pub fn latency(h: &Histogram<u64>) -> Latency {
    let ms = |us: u64| us as f64 / 1000.0;
    if h.is_empty() {
        return Latency::default();
    }
    Latency {
        count: h.len(),
        mean: h.mean() / 1000.0,
        p50: ms(h.value_at_quantile(0.50)),
        p90: ms(h.value_at_quantile(0.90)),
        p99: ms(h.value_at_quantile(0.99)),
        p999: ms(h.value_at_quantile(0.999)),
        max: ms(h.max()),
    }
}

/// Per node: before, after and peak samples into the server section.
#[allow(clippy::too_many_arguments)] // each is one figure the section needs
pub fn server(
    labels: &[String],
    baseline: &[Option<Sample>],
    start: &[Option<Sample>],
    end: &[Option<Sample>],
    peak_rss: &[Option<f64>],
    delivered: u64,
    events: u64,
    held_connections: Option<u64>,
) -> Server {
    let mut out = Server::default();
    let mut executions = 0.0;
    let mut cpu_total = 0.0;
    let mut cpu_known = !labels.is_empty();
    let mut peak_total = 0.0;
    let mut rss_growth = 0.0;
    let mut rss_known = !labels.is_empty();
    for (i, label) in labels.iter().enumerate() {
        let (b, s, e) = (baseline[i], start[i], end[i]);
        let cpu = match (s, e) {
            (Some(s), Some(e)) => Some(e.cpu_seconds - s.cpu_seconds),
            _ => None,
        };
        match cpu {
            Some(c) => cpu_total += c,
            None => cpu_known = false,
        }
        match (b, e) {
            (Some(b), Some(e)) => rss_growth += e.rss_bytes - b.rss_bytes,
            _ => rss_known = false,
        }
        if let (Some(s), Some(e)) = (s, e) {
            executions += e.executions - s.executions;
        }
        peak_total += peak_rss[i].unwrap_or(0.0);
        out.nodes.push(Node {
            node: label.clone(),
            cpu_seconds: cpu,
            rss_bytes: NodeRss {
                before: b.map(|s| s.rss_bytes),
                after: e.map(|s| s.rss_bytes),
                peak: peak_rss[i],
            },
        });
    }
    if cpu_known {
        out.cpu_seconds = Some(cpu_total);
        if delivered > 0 {
            out.cpu_seconds_per_1000_deliveries = Some(cpu_total / delivered as f64 * 1000.0);
            if cpu_total > 0.0 {
                out.deliveries_per_cpu_second = Some(delivered as f64 / cpu_total);
            }
        }
    }
    if !labels.is_empty() {
        out.rss_peak_bytes = Some(peak_total);
    }
    if events > 0 && executions > 0.0 {
        out.executions_per_event = Some(executions / events as f64);
    }
    if let (true, Some(n)) = (rss_known, held_connections) {
        if n > 0 {
            out.rss_per_connection_bytes = Some(rss_growth / n as f64);
        }
    }
    out
}

impl Report {
    /// Decides the verdict from the figures.
    pub fn judge(&mut self, max_connect_errors: u64, publishing: bool) {
        let mut failures = Vec::new();
        let d = &self.deliveries;
        if d.lost > 0 {
            failures.push(format!("{} deliveries lost", d.lost));
        }
        if d.duplicates > 0 {
            failures.push(format!("{} deliveries duplicated", d.duplicates));
        }
        let c = &self.connections;
        if c.connect_errors > max_connect_errors {
            failures.push(format!(
                "{} connection failures (at most {max_connect_errors} allowed)",
                c.connect_errors
            ));
        }
        if c.refused > 0 {
            let mut failure = format!(
                "{} subscriptions refused by the nodes {:?}",
                c.refused, c.refused_reasons
            );
            if c.refused_reasons.contains_key(TOO_MANY_SUBSCRIPTIONS) {
                failure.push_str(&format!(
                    ": a node holds at most websocket.max_subscriptions_per_connection per \
                     connection (100 by default), below the {} asked for; start the nodes \
                     with SUBGATE__WEBSOCKET__MAX_SUBSCRIPTIONS_PER_CONNECTION={} or more",
                    c.subscriptions_per_connection, c.subscriptions_per_connection
                ));
            }
            failures.push(failure);
        }
        let never_live_allowed = max_connect_errors * c.subscriptions_per_connection.max(1) as u64;
        if c.never_live > never_live_allowed {
            failures.push(format!(
                "{} subscriptions never received an event",
                c.never_live
            ));
        }
        if let Some(churn) = &self.churn {
            if churn.error_count() > 0 {
                failures.push(format!(
                    "churn: {} errors {:?}, connections {:?} {:?}",
                    churn.error_count(),
                    churn.errors,
                    churn.connect_errors,
                    churn.closes
                ));
            }
        }
        if publishing && self.publish.acked == 0 {
            failures.push("no publish was acknowledged".to_owned());
        }
        self.ok = failures.is_empty();
        self.failures = failures;
    }

    pub fn summary(&self) -> String {
        let mut s = String::new();
        let c = &self.connections;
        let p = &self.publish;
        let d = &self.deliveries;
        let l = &self.latency_ms;
        let who = if c.subscriptions_per_connection == 1 {
            format!("{} subscribers", c.target)
        } else {
            format!(
                "{} connections × {} subscriptions ({})",
                c.target, c.subscriptions_per_connection, c.subscriptions
            )
        };
        s.push_str(&format!(
            "subgate-loadgen run {} — {who} over {} ({} topic(s), {} worker(s))\n",
            self.run, self.transport, self.topics, self.workers
        ));
        s.push_str(&format!(
            "  connections  live {}  never live {}  open at end {}  connect errors {}  reconnects {}  warm-up {:.1}s\n",
            c.live, c.never_live, c.open_at_end, c.connect_errors, c.reconnects, c.warmup_seconds
        ));
        if !c.connect_error_reasons.is_empty() {
            s.push_str(&format!(
                "  connect errors by reason  {:?}\n",
                c.connect_error_reasons
            ));
        }
        if c.refused > 0 {
            s.push_str(&format!(
                "  refused      {} subscription(s) {:?}\n",
                c.refused, c.refused_reasons
            ));
        }
        if !c.closes.is_empty() {
            s.push_str(&format!("  closes by code  {:?}\n", c.closes));
        }
        if !c.server_errors.is_empty() {
            s.push_str(&format!("  server errors  {:?}\n", c.server_errors));
        }
        if p.warmup_failed > 0 {
            s.push_str(&format!(
                "  warm-up      {} markers published, {} failed {:?}\n",
                p.warmup_sent, p.warmup_failed, p.warmup_failures
            ));
        }
        if self.measured && self.target_rate > 0.0 {
            s.push_str(&format!(
                "  publish      {} sent  {} acked  {} failed  {:.1}/s achieved of {:.1}/s ({} late) via {}\n",
                p.sent, p.acked, p.failed, p.achieved_rate, self.target_rate, p.late, self.publisher
            ));
            if !p.failures.is_empty() {
                s.push_str(&format!("  publish failures  {:?}\n", p.failures));
            }
            s.push_str(&format!(
                "  deliveries   {} of {} expected  lost {}  duplicates {}  gaps {}  ({:.0}/s)\n",
                d.received, d.expected, d.lost, d.duplicates, d.gaps, d.per_second
            ));
            s.push_str(&format!(
                "  latency ms   p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  mean {:.3}\n",
                l.p50, l.p90, l.p99, l.p999, l.max, l.mean
            ));
        }
        if let Some(ch) = &self.churn {
            s.push_str(&format!(
                "  churn        {:.0} subscribes/s  {:.0} unsubscribes/s  achieved of {:.0}/s on {} connection(s), each held {:.0} ms ({} behind)\n",
                ch.subscribes_per_second,
                ch.unsubscribes_per_second,
                ch.target_rate,
                ch.connections,
                ch.lifetime_ms,
                ch.behind
            ));
            s.push_str(&format!(
                "  churn        {} subscribes  {} unsubscribes  errors {}  ping rtt ms p50 {:.3}  p99 {:.3}  max {:.3}\n",
                ch.subscribes,
                ch.unsubscribes,
                ch.error_count(),
                ch.ping_rtt_ms.p50,
                ch.ping_rtt_ms.p99,
                ch.ping_rtt_ms.max
            ));
            for (what, map) in [
                ("churn errors", &ch.errors),
                ("churn connect errors", &ch.connect_errors),
                ("churn closes", &ch.closes),
            ] {
                if !map.is_empty() {
                    s.push_str(&format!("  {what}  {map:?}\n"));
                }
            }
        }
        let sv = &self.server;
        if let Some(cpu) = sv.cpu_seconds {
            s.push_str(&format!("  server cpu   {cpu:.2}s"));
            if let Some(per) = sv.cpu_seconds_per_1000_deliveries {
                s.push_str(&format!(
                    "  {per:.4}s per 1000 deliveries  ({:.0} deliveries per cpu-second)",
                    sv.deliveries_per_cpu_second.unwrap_or(0.0)
                ));
            }
            if let Some(per_event) = sv.executions_per_event {
                s.push_str(&format!("  {per_event:.2} GraphQL executions per event"));
            }
            s.push('\n');
        }
        if let Some(peak) = sv.rss_peak_bytes {
            s.push_str(&format!(
                "  server rss   peak {:.1} MiB (summed over {} node(s))",
                peak / 1048576.0,
                sv.nodes.len()
            ));
            if let Some(per) = sv.rss_per_connection_bytes {
                s.push_str(&format!("  {:.1} KiB per connection", per / 1024.0));
            }
            s.push('\n');
        }
        s.push_str(&format!(
            "  loadgen cpu  {:.2}s (its own, workers included)\n",
            self.client_cpu_seconds
        ));
        if self.ok {
            s.push_str("  result       OK\n");
        } else {
            s.push_str(&format!(
                "  result       FAILED: {}\n",
                self.failures.join("; ")
            ));
        }
        s
    }
}

/// CPU-seconds of this process and of its children that have been waited
/// for (the workers, once they exited).
pub fn own_cpu_seconds() -> f64 {
    let mut total = 0.0;
    for who in [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN] {
        // SAFETY: getrusage only writes the struct it is given.
        let usage = unsafe {
            let mut u: libc::rusage = std::mem::zeroed();
            if libc::getrusage(who, &mut u) != 0 {
                continue;
            }
            u
        };
        for t in [usage.ru_utime, usage.ru_stime] {
            total += t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        }
    }
    total
}
