//! `subgate-loadgen`: the load generator every subgate benchmark is
//! measured with.
//!
//! One coordinator process (this one, unless `--worker`) sets the run up,
//! spreads its subscribers over worker processes (each holds at most
//! `--per-worker` sockets, far below the 20,000 open files a process may
//! hold), paces the publishers, scrapes the servers' own `/metrics`, and
//! sums what the workers saw into one report.
//!
//! - [`plan`]: the command line and the plan handed to every worker.
//! - [`marker`]: the mark an event carries (run, kind, topic, sequence
//!   number, send time) and how it is found in any transport's frame.
//! - [`setup`]: the user, channels and topic rules a run needs.
//! - [`client`]: one subscriber connection per transport, with its
//!   subscriptions, reconnecting and resuming.
//! - [`churn`]: `--churn`, fresh topics subscribed to and let go of beside
//!   the measured subscriptions.
//! - [`net`]: the subscribers' source addresses, spread over 127.0.0.0/8
//!   against a loopback node.
//! - [`worker`]: a process of subscribers, reporting status lines.
//! - [`publisher`]: paced publishing with a bounded pool of requests.
//! - [`scrape`]: server CPU and RSS from `/metrics`.
//! - [`report`]: the summary, the JSON report and the exit status.
//! - [`coordinator`]: the phases: connect, warm up, measure, drain, finish.
//! - [`storm`]: `--storm`, hostile requests at once while `/healthz` is
//!   probed: how the hardening targets are measured.

mod churn;
mod client;
mod coordinator;
mod marker;
mod net;
mod plan;
mod publisher;
mod report;
mod scrape;
mod setup;
mod storm;
mod worker;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = plan::Args::parse();
    raise_open_files_limit();
    if args.worker {
        return worker::main();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("subgate-loadgen: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let run = async move {
        match args.storm {
            Some(storm) => storm::run(storm, &args).await,
            None => coordinator::run(args).await,
        }
    };
    match runtime.block_on(run) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("subgate-loadgen: {e}");
            ExitCode::from(2)
        }
    }
}

/// Lifts the soft open-files limit to the hard one: each subscriber is a
/// socket, and the soft default (often 1024) would fail a run long before
/// the machine's real limit.
fn raise_open_files_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
