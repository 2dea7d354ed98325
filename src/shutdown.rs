//! Stop signal, drain tracking and the drain timeout.
//!
//! On SIGTERM or SIGINT the node turns not-ready (`/readyz` 503), fires the
//! [`Shutdown`] signal so that every long-lived connection closes with 1001
//! (WebSockets) or ends its stream (SSE), waits for the connections it
//! tracks to finish, and exits when they have or when
//! `server.drain_timeout_seconds` has passed, whichever comes first.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

#[derive(Clone)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

struct Inner {
    draining: AtomicBool,
    tx: watch::Sender<bool>,
    open: AtomicUsize,
    idle: Notify,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        let (tx, _) = watch::channel(false);
        Self {
            inner: Arc::new(Inner {
                draining: AtomicBool::new(false),
                tx,
                open: AtomicUsize::new(0),
                idle: Notify::new(),
            }),
        }
    }

    /// Starts the drain: readiness fails and every tracked connection is told.
    pub fn begin(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
        self.inner.tx.send_replace(true);
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// Resolves when the drain begins.
    pub async fn wait(&self) {
        let mut rx = self.inner.tx.subscribe();
        let _ = rx.wait_for(|draining| *draining).await;
    }

    /// Tracks one long-lived connection until the guard drops.
    pub fn track(&self) -> DrainGuard {
        self.inner.open.fetch_add(1, Ordering::SeqCst);
        DrainGuard {
            inner: self.inner.clone(),
            _held: None,
        }
    }

    /// Connections still open.
    pub fn open_connections(&self) -> usize {
        self.inner.open.load(Ordering::SeqCst)
    }

    /// Waits until every tracked connection is gone or `timeout` passes;
    /// returns how many were still open.
    pub async fn drained(&self, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let idle = self.inner.idle.notified();
            let open = self.open_connections();
            if open == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.open_connections();
            }
        }
    }
}

/// Counts a connection as open while it lives.
pub struct DrainGuard {
    inner: Arc<Inner>,
    /// What else the connection holds for as long as it is open (its
    /// place under the per-user limit).
    _held: Option<Box<dyn Send + Sync>>,
}

impl DrainGuard {
    /// Holds `thing` for as long as the connection is open.
    pub fn holding(mut self, thing: impl Send + Sync + 'static) -> Self {
        self._held = Some(Box::new(thing));
        self
    }
}

impl Drop for DrainGuard {
    fn drop(&mut self) {
        if self.inner.open.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.inner.idle.notify_waiters();
        }
    }
}

/// The stop signals, listened for from the moment this is built (so a
/// signal that arrives before the node awaits it is not lost to the
/// default action).
pub struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers; call inside the runtime, before announcing
    /// the node.
    pub fn install() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Self {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(Self {})
        }
    }

    /// Resolves on the first SIGTERM or SIGINT.
    pub async fn recv(mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_tracked_connections_up_to_the_timeout() {
        let s = Shutdown::new();
        let guard = s.track();
        let waiter = {
            let s = s.clone();
            tokio::spawn(async move { s.wait().await })
        };
        s.begin();
        waiter.await.unwrap();
        assert!(s.is_draining());
        assert_eq!(s.drained(Duration::from_secs(5)).await, 1);
        let s2 = s.clone();
        let done = tokio::spawn(async move { s2.drained(Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(guard);
        assert_eq!(done.await.unwrap(), 0);
    }
}
