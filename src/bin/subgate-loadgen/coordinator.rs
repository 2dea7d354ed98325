//! The run, phase by phase: set up, start the workers, connect, warm up
//! (publish markers until every subscriber has seen one, so nothing is
//! still subscribing when measuring starts), measure, drain, settle, report.

use std::io::IsTerminal;
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};

use crate::churn::Churn;
use crate::plan::{
    metrics_urls, normalize_url, subscribers_of, Args, Command, Status, WorkerMessage, WorkerReport,
};
use crate::publisher;
use crate::report::{self, Connections, Deliveries, Publish, Report};
use crate::scrape::Targets;
use crate::setup;

/// Warm-up markers go to every topic this often until all are live.
const WARMUP_EVERY: Duration = Duration::from_millis(500);
/// How long workers get to send their final reports.
const FINAL_TIMEOUT: Duration = Duration::from_secs(60);

/// What the workers have said, shared with the tasks reading their pipes.
#[derive(Default)]
struct Board {
    status: Vec<Status>,
    finals: Vec<Option<WorkerReport>>,
    fatal: Option<String>,
}

impl Board {
    /// The summed status, or why a worker failed.
    fn healthy_total(&self) -> Result<Status, String> {
        match &self.fatal {
            Some(f) => Err(f.clone()),
            None => Ok(self.total()),
        }
    }

    /// The topics some worker still waits on (a subscription not yet
    /// live), when every worker could list its own; `None` when one had
    /// too many to list (then every topic is marked).
    fn waiting_topics(&self) -> Option<Vec<usize>> {
        let mut all = Vec::new();
        for s in &self.status {
            all.extend(s.waiting_topics.as_ref()?.iter().map(|&t| t as usize));
        }
        all.sort_unstable();
        all.dedup();
        Some(all)
    }

    fn total(&self) -> Status {
        let mut t = Status::default();
        for s in &self.status {
            t.attempted += s.attempted;
            t.open += s.open;
            t.live += s.live;
            t.refused += s.refused;
            t.received += s.received;
            t.frames += s.frames;
            t.reconnects += s.reconnects;
            t.connect_errors += s.connect_errors;
        }
        t
    }
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
}

pub async fn run(args: Args) -> Result<ExitCode, String> {
    if args.connections == 0 {
        return Err("--connections must be at least 1".into());
    }
    if args.rate < 0.0 || args.duration <= 0.0 || args.ramp <= 0.0 {
        return Err("--rate must be >= 0, --duration and --ramp > 0".into());
    }
    let urls: Vec<String> = args
        .urls
        .iter()
        .map(|u| normalize_url(u))
        .collect::<Result<_, _>>()?;
    let publish_urls: Vec<String> = if args.publish_urls.is_empty() {
        urls.clone()
    } else {
        args.publish_urls
            .iter()
            .map(|u| normalize_url(u))
            .collect::<Result<_, _>>()?
    };
    let targets = Targets::resolve(&metrics_urls(&args, &urls)?).await?;
    let labels = targets.labels();
    let baseline = targets.sample().await;
    let prepared = setup::prepare(&args, &urls, &publish_urls).await?;
    let plan = prepared.plan;
    let publisher = Arc::new(prepared.publisher);
    let churn_plan = prepared.churn;
    let topics = plan.topics.len();
    let per_connection = plan.subscriptions_per_connection;
    let subscriptions = args.connections * per_connection;

    // Workers: each holds an even share of the subscribers.
    let n_workers = args
        .workers
        .unwrap_or_else(|| args.connections.div_ceil(args.per_worker.max(1)))
        .clamp(1, args.connections);
    let board = Arc::new(Mutex::new(Board {
        status: vec![Status::default(); n_workers],
        finals: (0..n_workers).map(|_| None).collect(),
        fatal: None,
    }));
    let exe = std::env::current_exe().map_err(|e| format!("finding this program: {e}"))?;
    let mut workers = Vec::with_capacity(n_workers);
    let mut first = 0;
    for w in 0..n_workers {
        let count = args.connections / n_workers + usize::from(w < args.connections % n_workers);
        let mut child = tokio::process::Command::new(&exe)
            .arg("--worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting worker {w}: {e}"))?;
        let mut stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let mut worker_plan = plan.clone();
        worker_plan.ramp = args.ramp / n_workers as f64;
        let start = Command::Start {
            plan: worker_plan,
            first,
            count,
        };
        write_command(&mut stdin, &start).await?;
        first += count;
        let board = board.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            loop {
                match lines.next_line().await {
                    Ok(Some(line)) => match serde_json::from_str::<WorkerMessage>(&line) {
                        Ok(WorkerMessage::Status(s)) => board.lock().status[w] = s,
                        Ok(WorkerMessage::Final(r)) => {
                            let mut b = board.lock();
                            b.status[w] = r.status.clone();
                            b.finals[w] = Some(*r);
                        }
                        Ok(WorkerMessage::Fatal(e)) => {
                            board.lock().fatal = Some(format!("worker {w}: {e}"))
                        }
                        Err(e) => {
                            board.lock().fatal = Some(format!("worker {w} said {line:?}: {e}"))
                        }
                    },
                    _ => {
                        let mut b = board.lock();
                        if b.finals[w].is_none() && b.fatal.is_none() {
                            b.fatal = Some(format!("worker {w} ended before its report"));
                        }
                        break;
                    }
                }
            }
        });
        workers.push(Worker { child, stdin });
    }

    let progress = Progress::new(args.connections, subscriptions);
    let sent = Arc::new(AtomicU64::new(0));
    let peak_rss = Arc::new(Mutex::new(vec![None::<f64>; labels.len()]));
    // Peak RSS: every node sampled once a second for the whole run.
    let targets = Arc::new(targets);
    let sampler = tokio::spawn({
        let peak = peak_rss.clone();
        let targets = targets.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let samples = targets.sample().await;
                let mut peak = peak.lock();
                for (p, s) in peak.iter_mut().zip(samples) {
                    if let Some(s) = s {
                        *p = Some(p.map_or(s.rss_bytes, |v: f64| v.max(s.rss_bytes)));
                    }
                }
            }
        }
    });

    // Connect.
    let connecting_since = Instant::now();
    let connect_deadline =
        connecting_since + Duration::from_secs_f64(args.connections as f64 / args.ramp + 30.0);
    loop {
        let total = board.lock().healthy_total()?;
        progress.show("connecting", &total, &sent);
        if total.attempted as usize >= args.connections || Instant::now() > connect_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Warm up: rounds of markers until every subscriber that can be live
    // is. A round publishes to every topic at first, then only to the
    // topics the workers still wait on (when they can list them), through
    // the bounded pool of publishes; the next round starts when the last
    // one has finished, at most every WARMUP_EVERY.
    let warmup_deadline = Instant::now() + Duration::from_secs_f64(args.warmup_timeout);
    let warmup = Arc::new(publisher::Warmup::default());
    let mut round: Option<tokio::task::JoinHandle<()>> = None;
    let mut marked = 0u64;
    let mut next_round = Instant::now();
    loop {
        let (total, waiting) = {
            let b = board.lock();
            (b.healthy_total()?, b.waiting_topics())
        };
        // Subscriptions: those of connections that failed (unless they
        // come back) and those the server refused never will be.
        let connections_up = if args.resume {
            args.connections as u64
        } else {
            (args.connections as u64).saturating_sub(total.connect_errors)
        };
        let can_be_live = (connections_up * per_connection as u64).saturating_sub(total.refused);
        progress.show("warming up", &total, &sent);
        if total.live >= can_be_live || Instant::now() > warmup_deadline {
            break;
        }
        let idle = round.as_ref().is_none_or(|r| r.is_finished());
        if idle && Instant::now() >= next_round {
            let targets: Vec<usize> = match waiting {
                Some(waiting) if marked > 0 => waiting,
                _ => (0..topics).collect(),
            };
            let first = marked;
            marked += targets.len() as u64;
            round = Some(tokio::spawn(publisher::warmup_round(
                publisher.clone(),
                targets,
                first,
                args.max_in_flight,
                warmup.clone(),
            )));
            next_round = Instant::now() + WARMUP_EVERY;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let warmup_seconds = connecting_since.elapsed().as_secs_f64();
    // A round still going sends no more; what it has in flight finishes
    // before measuring starts.
    warmup.stop.store(true, Ordering::Relaxed);
    if let Some(round) = round {
        let _ = round.await;
    }
    // Let the last markers land before measuring starts.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Subscriptions the nodes refused make the run fail: measuring without
    // them would only take time.
    let refused = board.lock().total().refused;
    let measuring = refused == 0;
    if !measuring {
        progress.note(&format!(
            "the nodes refused {refused} subscription(s): not measuring"
        ));
    }

    // The churn client's connections open before measuring; it churns
    // while the events are published (or the connections held).
    let churn = match churn_plan {
        Some(plan) if measuring => {
            progress.note(&format!(
                "churn: {} topics/s on {} connections, each held {} ms",
                plan.rate,
                plan.connections,
                plan.lifetime.as_millis()
            ));
            Some(Churn::connect(plan).await?)
        }
        _ => None,
    };

    // Measure.
    let start_sample = targets.sample().await;
    let measured_since = Instant::now();
    let received_before = board.lock().total().received;
    let duration = Duration::from_secs_f64(args.duration);
    if let Some(churn) = &churn {
        churn.begin();
    }
    let tally = if measuring && args.rate > 0.0 {
        let paced = tokio::spawn(publisher::run_paced(
            publisher.clone(),
            args.rate,
            duration,
            args.max_in_flight,
            sent.clone(),
        ));
        tokio::pin!(paced);
        loop {
            tokio::select! {
                t = &mut paced => break t.map_err(|e| format!("the publisher failed: {e}"))?,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    let total = board.lock().total();
                    progress.show("measuring", &total, &sent);
                }
            }
        }
    } else if measuring {
        let until = Instant::now() + duration;
        while Instant::now() < until {
            let total = board.lock().total();
            progress.show("holding", &total, &sent);
            tokio::time::sleep(Duration::from_millis(500).min(until - Instant::now())).await;
        }
        publisher::Tally::nothing(topics)
    } else {
        publisher::Tally::nothing(topics)
    };
    let publish_elapsed = measured_since.elapsed().as_secs_f64();
    let churned = match churn {
        Some(churn) => Some(churn.stop().await?),
        None => None,
    };

    // Drain: wait for what is still in flight.
    // A delivery is one subscription's copy of one event: every
    // acknowledged event, times its topic's subscriptions.
    let expected: u64 = (0..topics)
        .map(|k| {
            (tally.published[k] - tally.unacked[k].len() as u64)
                * subscribers_of(k, topics, subscriptions)
        })
        .sum();
    let drain_deadline = Instant::now() + Duration::from_secs_f64(args.drain_timeout);
    if measuring && args.rate > 0.0 {
        loop {
            let total = board.lock().total();
            progress.show("draining", &total, &sent);
            if total.received - received_before >= expected || Instant::now() > drain_deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let measured_elapsed = measured_since.elapsed().as_secs_f64();
    let end_sample = targets.sample().await;
    let open_at_end = board.lock().total().open;

    // Settle: every worker counts its loss against what was acknowledged.
    let finish = Command::Finish {
        published: tally.published.clone(),
        unacked: tally.unacked.clone(),
    };
    for w in &mut workers {
        write_command(&mut w.stdin, &finish).await?;
    }
    let final_deadline = Instant::now() + FINAL_TIMEOUT;
    let finals = loop {
        {
            let b = board.lock();
            if let Some(f) = &b.fatal {
                return Err(f.clone());
            }
            if b.finals.iter().all(Option::is_some) {
                break b.finals.iter().flatten().cloned().collect::<Vec<_>>();
            }
        }
        if Instant::now() > final_deadline {
            return Err("workers did not report in time".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    sampler.abort();
    progress.finish();
    for mut w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(5), w.child.wait()).await;
    }

    let (merged, histogram) = report::merge(&finals);
    let measured_received = merged.status.received.saturating_sub(received_before);
    let server = report::server(
        &labels,
        &baseline,
        &start_sample,
        &end_sample,
        &peak_rss.lock(),
        if args.rate > 0.0 {
            measured_received
        } else {
            0
        },
        tally.acked,
        (args.rate == 0.0).then_some(open_at_end),
    );
    let mut report = Report {
        run: plan.run.clone(),
        transport: plan.transport.name().to_owned(),
        publisher: format!("{:?}", publisher.kind).to_lowercase(),
        urls,
        topics,
        workers: n_workers,
        target_rate: args.rate,
        duration_seconds: args.duration,
        connections: Connections {
            target: args.connections,
            subscriptions_per_connection: per_connection,
            subscriptions,
            live: merged.status.live,
            never_live: merged.never_live,
            refused: merged.status.refused,
            refused_reasons: merged.refused_reasons.clone(),
            open_at_end,
            connect_errors: merged.status.connect_errors,
            connect_error_reasons: merged.connect_error_reasons.clone(),
            closes: merged.closes.clone(),
            reconnects: merged.status.reconnects,
            server_errors: merged.server_errors.clone(),
            warmup_seconds,
        },
        publish: Publish {
            sent: tally.sent,
            acked: tally.acked,
            failed: tally.sent - tally.acked,
            failures: tally.failures.clone(),
            late: tally.late,
            achieved_rate: if publish_elapsed > 0.0 {
                tally.acked as f64 / publish_elapsed
            } else {
                0.0
            },
            warmup_sent: warmup.sent.load(Ordering::Relaxed),
            warmup_failed: warmup.failed.load(Ordering::Relaxed),
            warmup_failures: warmup.failures.lock().clone(),
        },
        deliveries: Deliveries {
            expected,
            received: measured_received,
            lost: merged.lost,
            duplicates: merged.duplicates,
            gaps: merged.gaps,
            per_second: if measured_elapsed > 0.0 {
                measured_received as f64 / measured_elapsed
            } else {
                0.0
            },
        },
        latency_ms: report::latency(&histogram),
        churn: churned,
        server,
        client_cpu_seconds: report::own_cpu_seconds(),
        measured: measuring,
        ok: false,
        failures: Vec::new(),
    };
    report.judge(args.max_connect_errors, measuring && args.rate > 0.0);
    report::finish(&report, &report.summary(), report.ok, args.json.as_deref())
}

async fn write_command(stdin: &mut ChildStdin, command: &Command) -> Result<(), String> {
    let mut line = serde_json::to_vec(command).expect("commands encode");
    line.push(b'\n');
    stdin
        .write_all(&line)
        .await
        .map_err(|e| format!("telling a worker: {e}"))?;
    stdin
        .flush()
        .await
        .map_err(|e| format!("telling a worker: {e}"))
}

/// A line a second on stderr; a spinner with the same line on a terminal.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    started: Instant,
    last: Mutex<(Instant, u64, u64)>,
    connections: usize,
    subscriptions: usize,
}

impl Progress {
    fn new(connections: usize, subscriptions: usize) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                    .expect("a valid template"),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Self {
            bar,
            started: Instant::now(),
            last: Mutex::new((Instant::now() - Duration::from_secs(2), 0, 0)),
            connections,
            subscriptions,
        }
    }

    /// A line of its own, above the spinner on a terminal.
    fn note(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("[{:>6.1}s] {line}", self.started.elapsed().as_secs_f64()),
        }
    }

    fn show(&self, phase: &str, total: &Status, sent: &AtomicU64) {
        let mut last = self.last.lock();
        let now = Instant::now();
        let dt = now.duration_since(last.0).as_secs_f64();
        if dt < 1.0 && self.bar.is_none() {
            return;
        }
        let sent = sent.load(Ordering::Relaxed);
        let rate = |now: u64, then: u64| (now.saturating_sub(then)) as f64 / dt.max(0.001);
        let line = format!(
            "{phase:<11} conns {}/{} live {}/{} errors {} reconnects {} | sent {} ({:.0}/s) | received {} ({:.0}/s)",
            total.open,
            self.connections,
            total.live,
            self.subscriptions,
            total.connect_errors,
            total.reconnects,
            sent,
            rate(sent, last.1),
            total.received,
            rate(total.received, last.2),
        );
        if dt >= 1.0 {
            *last = (now, sent, total.received);
        }
        match &self.bar {
            Some(bar) => bar.set_message(line),
            None => eprintln!("[{:>6.1}s] {line}", self.started.elapsed().as_secs_f64()),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
