//! `subgate-loadgen` as a child process: run to its end (bounded), with its
//! exit status, its JSON report and everything it printed.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::node::Capture;

/// The load generator cargo built beside the node.
pub const LOADGEN: &str = env!("CARGO_BIN_EXE_subgate-loadgen");

pub struct LoadgenRun {
    /// Exit status 0: nothing lost or duplicated, every subscriber live.
    pub ok: bool,
    /// The `--json` report (`Null` when none was written).
    pub report: Value,
    /// stdout (the summary) and stderr (the progress lines).
    pub output: String,
}

impl LoadgenRun {
    /// An unsigned figure of the report by JSON pointer; 0 when absent.
    pub fn count(&self, pointer: &str) -> u64 {
        self.report
            .pointer(pointer)
            .and_then(Value::as_u64)
            .unwrap_or(0)
    }
}

/// Runs `subgate-loadgen ARGS --json JSON`, killing it after `timeout`
/// (a failure with its output). Blocking: call it from a thread or
/// `block_in_place`.
pub fn run_loadgen<S: AsRef<std::ffi::OsStr>>(
    args: &[S],
    json: &Path,
    timeout: Duration,
) -> LoadgenRun {
    let mut child = Command::new(LOADGEN)
        .args(args)
        .arg("--json")
        .arg(json)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start subgate-loadgen");
    let out = Capture::spawn(child.stdout.take().unwrap());
    let err = Capture::spawn(child.stderr.take().unwrap());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "subgate-loadgen did not finish in {timeout:?}\n{}\n{}",
                out.text(),
                err.text()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = format!(
        "{}\n{}",
        out.wait_closed(Duration::from_secs(5)),
        err.wait_closed(Duration::from_secs(5))
    );
    let report = std::fs::read_to_string(json)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    LoadgenRun {
        ok: status.success(),
        report,
        output,
    }
}
