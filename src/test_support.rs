//! Test-only helpers: a node's state built as the binary builds it, and a
//! private `redis-server` per test, on a port of its own.
//!
//! Tests never touch a shared Redis (and never port 6379): each starts its
//! own throw-away server, bound to 127.0.0.1, without persistence, and kills
//! it when the handle drops, so a failed test leaves no process behind.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a freshly spawned server may take to answer PING.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// A `redis-server` child process, killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers PING.
    pub fn start() -> Self {
        // Between closing the probe listener and redis binding the port,
        // another process may take it; a few fresh ports make that harmless.
        let mut last_failure = String::new();
        for _ in 0..5 {
            match Self::try_start_on(free_port()) {
                Ok(server) => return server,
                Err(why) => last_failure = why,
            }
        }
        panic!("could not start redis-server: {last_failure}");
    }

    /// Starts a server on `port` (e.g. to bring back one that was stopped).
    pub fn start_on(port: u16) -> Self {
        Self::try_start_on(port).unwrap_or_else(|why| panic!("could not start redis-server: {why}"))
    }

    fn try_start_on(port: u16) -> Result<Self, String> {
        let spawned = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            // No persistence is configured, but a working directory outside
            // the source tree keeps a stray dump file out of the repository.
            .args(["--dir", &std::env::temp_dir().to_string_lossy()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-server is not on PATH; the Redis tests need it: install it \
                 with `apt-get install redis-server` (or your platform's package)"
            ),
            Err(e) => panic!("could not spawn redis-server: {e}"),
        };
        // From here on the child is owned by `server`, so every early return
        // kills it.
        let mut server = Self {
            child: Some(child),
            port,
        };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if answers_ping(port) {
                return Ok(server);
            }
            if let Some(child) = server.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    server.child = None;
                    return Err(format!("it exited with {status} (port {port} taken?)"));
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no PING answer on port {port} within {STARTUP_TIMEOUT:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills the server and reaps it; the port is free again afterwards.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The child's process id while it runs (to pause it with a signal).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port nobody listens on right now: the kernel picks it for a probe
/// listener that is closed at once.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a probe listener on 127.0.0.1:0");
    listener
        .local_addr()
        .expect("probe listener address")
        .port()
}

/// One inline PING over a plain socket: no client library involved, so a
/// failure here is about the server, not about the code under test.
fn answers_ping(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

/// The state of a node with these settings, as `subgate serve` builds it.
pub fn state(settings: crate::config::Settings) -> crate::state::AppState {
    crate::app::build(settings).expect("the node builds")
}
