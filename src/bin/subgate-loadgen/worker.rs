//! A worker process: holds a slice of the subscribers, tells the
//! coordinator how they are doing on stdout (one JSON line every 250 ms),
//! and settles their loss when told the run is over.

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::watch;

use crate::client::{self, Finish, Shared};
use crate::plan::{Command, Status, WorkerMessage, WorkerReport, WAITING_LISTED};

const STATUS_EVERY: Duration = Duration::from_millis(250);
/// After `finish`, how long subscribers get to settle (they only count).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

pub fn main() -> ExitCode {
    // One thread per worker: the coordinator runs as many workers as the
    // load needs, and a single-threaded runtime keeps each one cheap.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            send(&WorkerMessage::Fatal(format!(
                "cannot start a runtime: {e}"
            )));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            send(&WorkerMessage::Fatal(e));
            ExitCode::FAILURE
        }
    }
}

fn send(message: &WorkerMessage) {
    let line = serde_json::to_string(message).expect("worker messages encode");
    let mut out = std::io::stdout().lock();
    // A coordinator that went away cannot be told anything more.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

async fn read_command(
    lines: &mut tokio::io::Lines<BufReader<tokio::io::Stdin>>,
) -> Result<Command, String> {
    match lines.next_line().await {
        Ok(Some(line)) => serde_json::from_str(&line).map_err(|e| format!("bad command: {e}")),
        Ok(None) => Err("the coordinator closed its pipe".into()),
        Err(e) => Err(format!("reading a command: {e}")),
    }
}

fn status(shared: &Shared) -> Status {
    Status {
        attempted: shared.attempted.load(Ordering::Relaxed),
        open: shared.open.load(Ordering::Relaxed),
        live: shared.live.load(Ordering::Relaxed),
        refused: shared.refused.load(Ordering::Relaxed),
        received: shared.received.load(Ordering::Relaxed),
        frames: shared.frames.load(Ordering::Relaxed),
        reconnects: shared.reconnects.load(Ordering::Relaxed),
        connect_errors: shared.connect_errors.load(Ordering::Relaxed),
        waiting_topics: shared.waiting_topics(WAITING_LISTED),
    }
}

async fn serve() -> Result<(), String> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let Command::Start { plan, first, count } = read_command(&mut lines).await? else {
        return Err("the first command must be start".into());
    };
    let plan = Arc::new(plan);
    let shared = Arc::new(Shared::new());
    for index in first..first + count {
        for sub in 0..plan.subscriptions_per_connection {
            shared.wait_for(plan.topic_of(index, sub));
        }
    }
    let (finish_tx, finish_rx) = watch::channel::<Option<Arc<Finish>>>(None);
    let mut subscribers = tokio::task::JoinSet::new();

    // Status lines, until the final report replaces them.
    let reporter = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(STATUS_EVERY);
            loop {
                tick.tick().await;
                send(&WorkerMessage::Status(status(&shared)));
            }
        })
    };

    // Connections are opened at the plan's ramp while commands are read:
    // the coordinator may finish a run before every connection is open.
    let ramp = plan.ramp.max(0.001);
    let interval = Duration::from_secs_f64(1.0 / ramp);
    let start = tokio::time::Instant::now();
    let mut opened = 0usize;
    let finish = loop {
        if opened < count {
            let slot = start + interval.mul_f64(opened as f64);
            tokio::select! {
                _ = tokio::time::sleep_until(slot) => {
                    let index = first + opened;
                    subscribers.spawn(client::run(index, plan.clone(), shared.clone(), finish_rx.clone()));
                    opened += 1;
                }
                command = read_command(&mut lines) => break command?,
            }
        } else {
            break read_command(&mut lines).await?;
        }
    };
    let Command::Finish { published, unacked } = finish else {
        return Err("expected finish".into());
    };
    // Connections never started were never live.
    shared.never_live.fetch_add(
        ((count - opened) * plan.subscriptions_per_connection) as u64,
        Ordering::Relaxed,
    );
    finish_tx.send_replace(Some(Arc::new(Finish { published, unacked })));
    let settled = tokio::time::timeout(SETTLE_TIMEOUT, async {
        while subscribers.join_next().await.is_some() {}
    })
    .await;
    reporter.abort();
    if settled.is_err() {
        return Err("subscribers did not settle in time".into());
    }
    let latency_us = shared
        .latency
        .lock()
        .iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect();
    let report = WorkerReport {
        status: status(&shared),
        lost: shared.lost.load(Ordering::Relaxed),
        duplicates: shared.duplicates.load(Ordering::Relaxed),
        gaps: shared.gaps.load(Ordering::Relaxed),
        never_live: shared.never_live.load(Ordering::Relaxed),
        refused_reasons: shared.refused_reasons.lock().clone(),
        connect_error_reasons: shared.connect_error_reasons.lock().clone(),
        closes: shared.closes.lock().clone(),
        server_errors: shared.server_errors.lock().clone(),
        latency_us,
    };
    send(&WorkerMessage::Final(Box::new(report)));
    Ok(())
}
