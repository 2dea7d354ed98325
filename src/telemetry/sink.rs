//! Where log lines go: a bounded queue drained by a thread of its own into
//! stderr, so that logging never blocks nor panics a task that matters.
//!
//! stderr may be a pipe whose reader died (every write fails with `EPIPE`)
//! or stalled (a write would block once the pipe buffer is full). A line
//! that cannot be queued (the queue is full) or written (the write failed)
//! is dropped and counted in `subgate_log_write_errors_total{reason}`
//! (`queue_full`, `write_failed`): the node goes on serving, draining and
//! reconnecting without its log rather than stopping for it.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use prometheus::{IntCounterVec, Opts};

/// Lines queued before new ones are dropped: about a second of a busy
/// debug log, a few megabytes at most.
const QUEUE_LINES: usize = 8192;

/// `subgate_log_write_errors_total{reason}`: one process-wide counter (the
/// log is process-wide), registered into every [`super::metrics::Metrics`].
pub static LOG_WRITE_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let vec = IntCounterVec::new(
        Opts::new(
            "subgate_log_write_errors_total",
            "Log lines dropped: the queue to the log writer was full, or writing to stderr failed",
        ),
        &["reason"],
    )
    .expect("a valid metric");
    for reason in ["queue_full", "write_failed"] {
        vec.with_label_values(&[reason]);
    }
    vec
});

/// The writer handed to the tracing subscriber: each line goes to the
/// queue, never to stderr directly.
#[derive(Clone)]
pub struct LogSink {
    tx: SyncSender<Vec<u8>>,
    /// Lines queued and not yet written, for [`LogSink::flush`].
    pending: Arc<AtomicUsize>,
}

impl LogSink {
    /// Starts the writer thread over `out`.
    pub fn start(mut out: impl Write + Send + 'static) -> Self {
        let (tx, rx) = sync_channel::<Vec<u8>>(QUEUE_LINES);
        let pending = Arc::new(AtomicUsize::new(0));
        let written = pending.clone();
        let spawned = std::thread::Builder::new()
            .name("subgate-log".into())
            .spawn(move || {
                for line in rx {
                    if out.write_all(&line).and_then(|()| out.flush()).is_err() {
                        LOG_WRITE_ERRORS.with_label_values(&["write_failed"]).inc();
                    }
                    written.fetch_sub(1, Ordering::SeqCst);
                }
            });
        if spawned.is_err() {
            // No thread, no log: every line will count as dropped (the
            // receiver is gone, so sends fail).
            LOG_WRITE_ERRORS.with_label_values(&["write_failed"]).inc();
        }
        Self { tx, pending }
    }

    fn queue(&self, line: Vec<u8>) {
        self.pending.fetch_add(1, Ordering::SeqCst);
        let reason = match self.tx.try_send(line) {
            Ok(()) => return,
            Err(TrySendError::Full(_)) => "queue_full",
            Err(TrySendError::Disconnected(_)) => "write_failed",
        };
        self.pending.fetch_sub(1, Ordering::SeqCst);
        LOG_WRITE_ERRORS.with_label_values(&[reason]).inc();
    }

    /// Waits until the queued lines are written, at most `timeout` (the
    /// last lines before exit; a stalled stderr does not hold the exit).
    pub fn flush(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.pending.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// One log line being formatted; queued whole when dropped.
pub struct Line {
    sink: LogSink,
    buf: Vec<u8>,
}

impl Write for Line {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            self.sink.queue(std::mem::take(&mut self.buf));
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogSink {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line {
            sink: self.clone(),
            buf: Vec::with_capacity(256),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink whose every write fails, as a pipe without a reader.
    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A sink that never returns, as a pipe whose reader stopped.
    struct Stalled;

    impl Write for Stalled {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            std::thread::park();
            Ok(0)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn failures(reason: &str) -> u64 {
        LOG_WRITE_ERRORS.with_label_values(&[reason]).get()
    }

    #[test]
    fn a_failing_or_stalled_stderr_drops_and_counts_lines_without_blocking() {
        use tracing_subscriber::fmt::MakeWriter;

        let before = failures("write_failed");
        let broken = LogSink::start(Broken);
        for _ in 0..3 {
            writeln!(broken.make_writer(), "a line").unwrap();
        }
        broken.flush(Duration::from_secs(5));
        assert!(failures("write_failed") >= before + 3);

        let before = failures("queue_full");
        let stalled = LogSink::start(Stalled);
        let started = Instant::now();
        for _ in 0..QUEUE_LINES + 10 {
            writeln!(stalled.make_writer(), "a line").unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(5), "never blocks");
        assert!(failures("queue_full") >= before + 9);
    }
}
