//! A real `subgate` node: the built binary as a child process on port 0.
//!
//! The child runs in a fresh temporary directory (so the repository's
//! `config/*.toml` never leak into a test unless the test writes them), with
//! a cleared environment plus the `SUBGATE__*` variables the test gives.
//! Its stderr is drained by a thread into a buffer for the whole life of the
//! process: a pipe that nobody reads fills up and blocks the node's logger.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The binary under test, as cargo built it for this test target.
pub const BIN: &str = env!("CARGO_BIN_EXE_subgate");

/// The HS256 secret every node gets unless a test sets its own: 32+ bytes so
/// the same value also passes the production check.
pub const SECRET: &str = "subgate-integration-test-secret-0123456789";

/// A debug binary on a loaded 2-core machine with several nodes starting at
/// once takes well under a second; this only bounds a hang.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A directory removed on drop; each node gets its own as working directory.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "subgate-it-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create a temporary directory");
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Lines read from a child's pipe, shared with the thread that reads them.
#[derive(Default)]
pub struct Capture {
    state: Mutex<(String, bool)>,
    changed: Condvar,
}

impl Capture {
    /// Starts a thread that appends every line of `pipe` until it closes.
    pub fn spawn(pipe: impl Read + Send + 'static) -> Arc<Self> {
        let capture = Arc::new(Capture::default());
        let writer = capture.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let text = strip_ansi(&String::from_utf8_lossy(&line));
                        writer.state.lock().unwrap().0.push_str(&text);
                        writer.changed.notify_all();
                    }
                }
            }
            writer.state.lock().unwrap().1 = true;
            writer.changed.notify_all();
        });
        capture
    }

    pub fn text(&self) -> String {
        self.state.lock().unwrap().0.clone()
    }

    /// The whole text once the pipe has closed (or whatever came within `timeout`).
    pub fn wait_closed(&self, timeout: Duration) -> String {
        let guard = self.state.lock().unwrap();
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |s| !s.1)
            .unwrap();
        guard.0.clone()
    }

    /// Waits until `pick` finds something in the text; `Err` with the text
    /// when the pipe closed first or `timeout` passed.
    pub fn wait_for<T>(
        &self,
        timeout: Duration,
        mut pick: impl FnMut(&str) -> Option<T>,
    ) -> Result<T, String> {
        let deadline = Instant::now() + timeout;
        let mut state = self.state.lock().unwrap();
        loop {
            if let Some(found) = pick(&state.0) {
                return Ok(found);
            }
            let now = Instant::now();
            if state.1 || now >= deadline {
                return Err(state.0.clone());
            }
            state = self.changed.wait_timeout(state, deadline - now).unwrap().0;
        }
    }
}

/// Log lines may carry colour codes even with NO_COLOR on some versions of
/// the logger; tests match on the plain text.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The address in the node's `listening on ADDR` line (text or JSON logs).
pub fn parse_listen_addr(text: &str) -> Option<SocketAddr> {
    let rest = &text[text.find("listening on ")? + "listening on ".len()..];
    let addr: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '[' | ']'))
        .collect();
    addr.parse().ok()
}

/// The child's exit status, set by the thread that reaps it.
#[derive(Default)]
struct ExitCell {
    status: Mutex<Option<ExitStatus>>,
    set: Condvar,
}

impl ExitCell {
    fn wait(&self, timeout: Duration) -> Option<ExitStatus> {
        let guard = self.status.lock().unwrap();
        let (guard, _) = self
            .set
            .wait_timeout_while(guard, timeout, |s| s.is_none())
            .unwrap();
        *guard
    }
}

/// Builds the child command: cleared environment, the given variables, cwd.
fn command(args: &[&str], env: &[(String, String)], cwd: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .current_dir(cwd)
        // Nothing from the developer's shell (a stray SUBGATE__ variable,
        // RUST_LOG, SUBGATE_ENV) may change what a test sees.
        .env_clear()
        .env("NO_COLOR", "1")
        .env("RUST_BACKTRACE", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

fn owned(env: &[(&str, &str)]) -> Vec<(String, String)> {
    env.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// What a one-shot run of the binary produced.
#[derive(Debug)]
pub struct CliOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `subgate ARGS` with exactly `env` in `cwd` and waits for it, at most
/// `timeout` (a run that does not end, say a node that started listening
/// instead of refusing its configuration, is killed and reported).
pub fn run_cli(args: &[&str], env: &[(&str, &str)], cwd: &Path, timeout: Duration) -> CliOutput {
    let mut child = command(args, &owned(env), cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the subgate binary");
    let pid = child.id();
    let stdout = Capture::spawn(child.stdout.take().unwrap());
    let stderr = Capture::spawn(child.stderr.take().unwrap());
    let exit = reap(child);
    let Some(status) = exit.wait(timeout) else {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        let _ = exit.wait(Duration::from_secs(5));
        panic!(
            "`subgate {}` with {env:?} was still running after {timeout:?}\nstderr:\n{}",
            args.join(" "),
            stderr.text()
        );
    };
    // The pipes close when the process exits; let the readers finish.
    let stdout = stdout.wait_closed(Duration::from_secs(5));
    let stderr = stderr.wait_closed(Duration::from_secs(5));
    CliOutput {
        status,
        stdout,
        stderr,
    }
}

/// Hands `child` to a thread that waits for it, so that an exit is noticed
/// at once (no polling) and the process never lingers as a zombie.
fn reap(mut child: Child) -> Arc<ExitCell> {
    let exit = Arc::new(ExitCell::default());
    let cell = exit.clone();
    std::thread::spawn(move || {
        let status = child.wait().expect("wait for the child");
        *cell.status.lock().unwrap() = Some(status);
        cell.set.notify_all();
    });
    exit
}

/// A running node, killed when dropped.
pub struct Node {
    pub addr: SocketAddr,
    pub pid: u32,
    stderr: Arc<Capture>,
    exit: Arc<ExitCell>,
    env: Vec<(String, String)>,
    dir: TempDir,
    /// One client per node: reqwest's pool belongs to the runtime of the
    /// test that uses it, and each test has its own node.
    pub http: reqwest::Client,
}

impl Node {
    /// Starts a node with `env` over the test defaults (port 0, the test
    /// secret) and waits until it listens.
    pub fn start(env: &[(&str, &str)]) -> Node {
        Self::start_with(&[], env, |_| {})
    }

    /// Like [`Node::start`], with command-line `args` and a `setup` that may
    /// write files (config layers) into the node's working directory first.
    pub fn start_with(args: &[&str], env: &[(&str, &str)], setup: impl FnOnce(&Path)) -> Node {
        Self::start_custom(args, env, setup, |_| None)
    }

    /// Like [`Node::start_with`], with a `configure` hook on the command
    /// before it spawns (resource limits, where stderr goes). When the hook
    /// answers a reader, the node's log is read from it instead of from a
    /// stderr pipe (the hook then sets stderr itself).
    pub fn start_custom(
        args: &[&str],
        env: &[(&str, &str)],
        setup: impl FnOnce(&Path),
        configure: impl FnOnce(&mut Command) -> Option<Box<dyn Read + Send>>,
    ) -> Node {
        let dir = TempDir::new();
        setup(dir.path());
        let mut full = owned(&[
            ("SUBGATE__SERVER__HOST", "127.0.0.1"),
            ("SUBGATE__SERVER__PORT", "0"),
            ("SUBGATE__AUTH__JWT_SECRET", SECRET),
        ]);
        for (k, v) in owned(env) {
            full.retain(|(key, _)| *key != k);
            full.push((k, v));
        }
        let mut cmd = command(args, &full, dir.path());
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let log = configure(&mut cmd);
        let mut child = cmd.spawn().expect("spawn the subgate binary");
        let pid = child.id();
        let stderr = match log {
            Some(reader) => Capture::spawn(reader),
            None => Capture::spawn(child.stderr.take().unwrap()),
        };
        let exit = reap(child);
        let addr = match stderr.wait_for(START_TIMEOUT, parse_listen_addr) {
            Ok(addr) => addr,
            Err(text) => {
                let status = exit.wait(Duration::from_secs(2));
                if status.is_none() {
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
                panic!(
                    "subgate did not log `listening on ADDR` within {START_TIMEOUT:?} (exit: {status:?}); env {full:?}\nstderr:\n{text}"
                );
            }
        };
        let http = reqwest::Client::builder()
            // The sandbox may export HTTP(S)_PROXY; the node is on loopback.
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("build the HTTP client");
        Node {
            addr,
            pid,
            stderr,
            exit,
            env: full,
            dir,
            http,
        }
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// Everything the node wrote to stderr so far.
    pub fn stderr_text(&self) -> String {
        self.stderr.text()
    }

    /// The environment the node was started with (for `subgate token`).
    pub fn env(&self) -> Vec<(&str, &str)> {
        self.env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The HS256 secret this node verifies with.
    pub fn secret(&self) -> &str {
        self.env
            .iter()
            .find(|(k, _)| k == "SUBGATE__AUTH__JWT_SECRET")
            .map(|(_, v)| v.as_str())
            .unwrap_or(SECRET)
    }

    pub fn sigterm(&self) {
        assert!(
            self.exit.status.lock().unwrap().is_none(),
            "the node has already exited"
        );
        kill(Pid::from_raw(self.pid as i32), Signal::SIGTERM).expect("send SIGTERM to the node");
    }

    /// SIGKILL: the node dies at once, as in a crash or an OOM kill; its
    /// sockets are closed by the kernel, without any close frame.
    pub fn sigkill(&self) {
        assert!(
            self.exit.status.lock().unwrap().is_none(),
            "the node has already exited"
        );
        kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL).expect("send SIGKILL to the node");
    }

    /// The exit status, if the node has exited.
    pub fn exited(&self) -> Option<ExitStatus> {
        *self.exit.status.lock().unwrap()
    }

    /// Waits for the node to exit; panics with its stderr after `timeout`.
    pub async fn wait_exit(&self, timeout: Duration) -> ExitStatus {
        let exit = self.exit.clone();
        let status = tokio::task::spawn_blocking(move || exit.wait(timeout))
            .await
            .expect("join the waiter");
        match status {
            Some(status) => status,
            None => panic!(
                "the node did not exit within {timeout:?}\nstderr:\n{}",
                self.stderr_text()
            ),
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
            // Reaped by the reaper thread; wait briefly so that no test
            // leaves a running process behind.
            let _ = self.exit.wait(Duration::from_secs(5));
        }
        // Printed only when the test fails (libtest captures it otherwise):
        // the node's own account of what happened.
        if std::thread::panicking() {
            eprintln!(
                "---- stderr of the node on {} ----\n{}",
                self.addr,
                self.stderr_text()
            );
        }
    }
}
