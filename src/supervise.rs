//! Supervised background tasks: a task that must run for the node's whole
//! life (the drain on a stop signal, the Redis Pub/Sub connection, Redis
//! health, presence) is restarted when it dies, never left dead behind a
//! node that still looks alive.
//!
//! A death is a panic or a return (these tasks loop forever). Each is
//! logged with the task's name and why, counted in
//! `subgate_task_restarts_total{task}`, and followed by a restart after a
//! backoff (100 ms doubling to 5 s; back to 100 ms after a minute alive).
//! Dropping the [`Supervised`] handle stops the task and its supervisor.

use std::future::Future;
use std::time::{Duration, Instant};

use prometheus::IntCounterVec;
use tokio::task::AbortHandle;

/// First wait before a restart.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait before a restart.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A task alive this long had recovered: its next death waits the least.
const HEALTHY_AFTER: Duration = Duration::from_secs(60);

/// A running supervised task; dropping it stops the task.
pub struct Supervised(AbortHandle);

impl Supervised {
    /// Leaves the task running for the rest of the process.
    pub fn detach(self) {
        std::mem::forget(self);
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Aborts the task it holds when dropped (the supervisor's current run,
/// when the supervisor itself is aborted).
struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs `make()` as a task named `task`, and again whenever it dies.
pub fn spawn<F, Fut>(task: &'static str, restarts: IntCounterVec, mut make: F) -> Supervised
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    restarts.with_label_values(&[task]);
    let supervisor = tokio::spawn(async move {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let started = Instant::now();
            let run = tokio::spawn(make());
            let _stop = AbortOnDrop(run.abort_handle());
            let why = match run.await {
                Ok(()) => "it returned".to_owned(),
                Err(e) if e.is_panic() => format!("it panicked: {}", panic_message(e.into_panic())),
                // Aborted from outside: only this supervisor does that,
                // when it is dropped itself.
                Err(_) => return,
            };
            if started.elapsed() >= HEALTHY_AFTER {
                backoff = FIRST_BACKOFF;
            }
            restarts.with_label_values(&[task]).inc();
            tracing::error!(
                task,
                restart_in_ms = backoff.as_millis() as u64,
                "background task {task} died ({why}); restarting it"
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    });
    Supervised(supervisor.abort_handle())
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-text panic".to_owned())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    fn counter() -> IntCounterVec {
        IntCounterVec::new(prometheus::Opts::new("t_restarts_total", "t"), &["task"]).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_panics_or_returns_is_counted_and_restarted_until_dropped() {
        let restarts = counter();
        let runs = Arc::new(AtomicUsize::new(0));
        let supervised = {
            let runs = runs.clone();
            spawn("flaky", restarts.clone(), move || {
                let run = runs.fetch_add(1, Ordering::SeqCst);
                async move {
                    match run {
                        0 => panic!("first run fails"),
                        1 => {}
                        _ => std::future::pending().await,
                    }
                }
            })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 3, "panicked, returned, runs");
        assert_eq!(restarts.with_label_values(&["flaky"]).get(), 2);

        drop(supervised);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 3, "stopped for good");
        assert_eq!(restarts.with_label_values(&["flaky"]).get(), 2);
    }
}
