//! A real `redis-server` of the test's own, on a port of its own.
//!
//! Fleet tests need a Redis they can break: SIGKILL it mid-test, bring it
//! back on the same port (nodes keep their configured URL), or have none
//! listening yet when a node starts. So each test starts its own server,
//! never the developer's on 6379, with persistence off (a restarted server
//! starts empty, as a crashed cache does in production).
//!
//! Ports come from below the kernel's ephemeral range: nodes listen on port
//! 0 and every client connection takes an ephemeral port, so a port from
//! that range could be taken by one of them while this Redis is down and
//! the restart would fail to bind.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::node::Capture;

/// A fresh server answers PING within milliseconds; this bounds a hang.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Every command a test sends is local and tiny; this bounds a hang.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

pub struct TestRedis {
    port: u16,
    /// Arguments beyond the port and the no-persistence defaults.
    extra: Vec<String>,
    /// A sentinel's configuration file (a sentinel rewrites it).
    sentinel: Option<std::path::PathBuf>,
    child: Option<Child>,
    /// The server's log (it writes it to stdout), shown when a test fails.
    log: Arc<Capture>,
}

/// A port below the ephemeral range that nothing listens on now, and that
/// no other test of this process has been given.
pub fn reserve_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let base = 10_000u32;
    let span = low.saturating_sub(base).max(1000);
    // Starting from an offset of the pid spreads concurrent test processes
    // (two worktrees testing at once) over the range.
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let offset = (u64::from(std::process::id()) * 7919 % u64::from(span)) as u32;
    let _ = NEXT.compare_exchange(u32::MAX, offset, Ordering::SeqCst, Ordering::SeqCst);
    for _ in 0..span {
        let port = (base + NEXT.fetch_add(1, Ordering::SeqCst) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between {base} and {}", base + span);
}

impl TestRedis {
    /// Starts a server on a free port and waits until it answers.
    pub fn start() -> TestRedis {
        Self::start_on(reserve_port())
    }

    /// Starts a server on `port` (see [`reserve_port`]) and waits until it answers.
    pub fn start_on(port: u16) -> TestRedis {
        Self::start_with(port, &[])
    }

    /// Starts a sentinel on `port` from its configuration file.
    pub fn start_sentinel(port: u16, conf: &std::path::Path) -> TestRedis {
        let (child, log) = spawn(port, &[], Some(conf));
        let mut redis = TestRedis {
            port,
            extra: Vec::new(),
            sentinel: Some(conf.to_owned()),
            child: Some(child),
            log,
        };
        redis.wait_ready();
        redis
    }

    /// Starts a server on `port` with `extra` arguments (a cluster node, a
    /// replica, a sentinel's master) and waits until it answers.
    pub fn start_with(port: u16, extra: &[String]) -> TestRedis {
        let (child, log) = spawn(port, extra, None);
        let mut redis = TestRedis {
            port,
            extra: extra.to_vec(),
            sentinel: None,
            child: Some(child),
            log,
        };
        redis.wait_ready();
        redis
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: the server vanishes without closing anything gracefully,
    /// as in a crash or an OOM kill. Returns once the process is gone (its
    /// sockets are closed by then).
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("this redis-server is not running");
        kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL)
            .expect("send SIGKILL to redis-server");
        child.wait().expect("reap redis-server");
    }

    /// Starts the server again on the same port (empty: nothing persists).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart() after kill() only");
        let (child, log) = spawn(self.port, &self.extra, self.sentinel.as_deref());
        self.child = Some(child);
        self.log = log;
        self.wait_ready();
    }

    /// Waits for the server's "Ready to accept connections" log line, then
    /// checks that it answers PING; panics with its log if it exits first
    /// (the port was taken) or takes too long.
    fn wait_ready(&mut self) {
        // A sentinel says who it is instead.
        let line = if self.sentinel.is_some() {
            "Sentinel ID is"
        } else {
            "Ready to accept connections"
        };
        let ready = self
            .log
            .wait_for(START_TIMEOUT, |log| log.contains(line).then_some(()));
        if let Err(log) = ready {
            let status = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            panic!(
                "redis-server on port {} was not ready within {START_TIMEOUT:?} (exit: {status:?}):\n{log}",
                self.port
            );
        }
        let client = redis::Client::open(self.url()).expect("a valid redis URL");
        let pong = client
            .get_connection_with_timeout(COMMAND_TIMEOUT)
            .and_then(|mut conn| redis::cmd("PING").query::<String>(&mut conn));
        assert_eq!(
            pong.as_deref().ok(),
            Some("PONG"),
            "redis-server on port {} said it was ready, yet PING gave {pong:?}",
            self.port
        );
    }

    /// Waits until `replica` has every write this master had when asked
    /// (its `slave_repl_offset` reaches the master's `master_repl_offset`):
    /// what a test reads after killing this master is what it wrote.
    pub async fn wait_replicated_to(&self, replica: &TestRedis) {
        let offset = |info: &str, field: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(field)?.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        let info: String = self.cmd(&["INFO", "replication"]).await;
        let want = offset(&info, "master_repl_offset:");
        let deadline = std::time::Instant::now() + START_TIMEOUT;
        loop {
            let info: String = replica.cmd(&["INFO", "replication"]).await;
            let have = offset(&info, "slave_repl_offset:");
            if have >= want {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "replica {} reached offset {have} of {want} within {START_TIMEOUT:?}",
                replica.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the server process is running (not killed).
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Runs one command, such as `["PUBSUB", "NUMSUB", "subgate:topic:posts"]`,
    /// on a fresh connection; panics (naming the command) if it fails.
    pub async fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let client = redis::Client::open(self.url()).expect("a valid redis URL");
        let run = async {
            let mut conn = client.get_multiplexed_async_connection().await?;
            let mut cmd = redis::cmd(args[0]);
            for arg in &args[1..] {
                cmd.arg(*arg);
            }
            cmd.query_async::<T>(&mut conn).await
        };
        match tokio::time::timeout(COMMAND_TIMEOUT, run).await {
            Ok(Ok(value)) => value,
            Ok(Err(e)) => panic!("redis {args:?} on port {} failed: {e}", self.port),
            Err(_) => panic!(
                "redis {args:?} on port {} did not answer within {COMMAND_TIMEOUT:?}",
                self.port
            ),
        }
    }

    /// How many connections are subscribed to `channel` (`PUBSUB NUMSUB`):
    /// with subgate, how many nodes listen to it.
    pub async fn numsub(&self, channel: &str) -> i64 {
        let counts: std::collections::HashMap<String, i64> =
            self.cmd(&["PUBSUB", "NUMSUB", channel]).await;
        counts
            .get(channel)
            .copied()
            .unwrap_or_else(|| panic!("PUBSUB NUMSUB did not name {channel}: {counts:?}"))
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        self.log.text()
    }
}

fn spawn(port: u16, extra: &[String], sentinel: Option<&std::path::Path>) -> (Child, Arc<Capture>) {
    let mut command = Command::new("redis-server");
    match sentinel {
        Some(conf) => command.arg(conf).args([
            "--sentinel",
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ]),
        None => command.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]),
    };
    // A replica's full sync writes an RDB file to the working directory:
    // it goes to the temporary directory, never into the source tree.
    command.current_dir(std::env::temp_dir());
    let spawned = command
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("redis-server is not installed; the fleet tests need it: apt-get install redis-server")
        }
        Err(e) => panic!("could not start redis-server: {e}"),
    };
    let log = Capture::spawn(child.stdout.take().unwrap());
    (child, log)
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- log of redis-server on port {} ----\n{}",
                self.port,
                self.log.text()
            );
        }
    }
}
