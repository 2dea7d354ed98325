//! `/healthz` polled while a test loads the node: what a load balancer's
//! health check would have seen.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the probes saw.
#[derive(Debug, Clone, Copy)]
pub struct Probed {
    /// The slowest probe, answered or not.
    pub slowest: Duration,
    /// Probes answered 200.
    pub answered: u32,
    /// Probes not answered 200 (an error, a timeout, another status).
    pub failed: u32,
}

/// Polls `/healthz` every 20 ms, from a thread and a runtime of its own (the
/// test's runtime is busy loading the node) and a connection opened before
/// [`HealthProber::start`] returns.
pub struct HealthProber {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Probed>,
}

impl HealthProber {
    /// Probes `url`, from `from` when given (a loopback address of its own,
    /// so that a per-address limit on the load does not touch the probes).
    pub fn start(url: String, from: Option<IpAddr>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("the prober's runtime");
                runtime.block_on(async move {
                    let client = reqwest::Client::builder()
                        .no_proxy()
                        .local_address(from)
                        .timeout(Duration::from_secs(30))
                        .build()
                        .expect("the prober's client");
                    let probe = async || {
                        let started = Instant::now();
                        let ok = client
                            .get(&url)
                            .send()
                            .await
                            .is_ok_and(|r| r.status() == reqwest::StatusCode::OK);
                        (ok, started.elapsed())
                    };
                    let first = probe().await;
                    ready_tx
                        .send(first.0)
                        .expect("the test waits for the prober");
                    let mut probed = Probed {
                        slowest: Duration::ZERO,
                        answered: 0,
                        failed: 0,
                    };
                    while !stop.load(Ordering::Relaxed) || probed.answered + probed.failed < 5 {
                        let (ok, took) = probe().await;
                        probed.slowest = probed.slowest.max(took);
                        match ok {
                            true => probed.answered += 1,
                            false => probed.failed += 1,
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    probed
                })
            })
        };
        let first_ok = ready_rx.recv().expect("the prober started");
        assert!(first_ok, "/healthz answers before the load starts");
        HealthProber { stop, thread }
    }

    /// Stops probing; what was seen.
    pub fn stop(self) -> Probed {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the health prober")
    }
}
