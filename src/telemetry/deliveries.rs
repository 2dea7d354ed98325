//! The per-delivery metrics (`subgate_events_delivered_total` and
//! `subgate_delivery_latency_seconds`) without a shared atomic per
//! delivery: a delivery is recorded in its thread's shard, plain counts
//! behind a lock no other thread takes, and a shard is merged into the
//! shared series every [`FLUSH_EVERY`] deliveries and before every scrape.

use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;
use prometheus::local::{LocalHistogram, LocalIntCounter};

/// Shards: enough that the worker threads of a node rarely share one.
const SHARDS: usize = 16;
/// Deliveries recorded in a shard before it is merged.
const FLUSH_EVERY: u32 = 256;

/// Which shard each thread records in.
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);
thread_local! {
    static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
}

/// The delivery series of each delivering transport, sharded by thread.
pub struct Deliveries {
    transports: Vec<&'static str>,
    shards: Box<[Shard]>,
}

/// One thread's counts, on a cache line of its own.
#[repr(align(128))]
struct Shard(Mutex<ShardCounts>);

struct ShardCounts {
    /// Per transport, in the order of [`Deliveries::transports`].
    series: Vec<(LocalIntCounter, LocalHistogram)>,
    unflushed: u32,
}

impl ShardCounts {
    fn flush(&mut self) {
        for (count, latency) in &self.series {
            count.flush();
            latency.flush();
        }
        self.unflushed = 0;
    }
}

impl Deliveries {
    /// `series` are each transport's shared counter and histogram.
    pub fn new(series: Vec<(&'static str, prometheus::IntCounter, prometheus::Histogram)>) -> Self {
        let shards = (0..SHARDS)
            .map(|_| {
                Shard(Mutex::new(ShardCounts {
                    series: series
                        .iter()
                        .map(|(_, count, latency)| (count.local(), latency.local()))
                        .collect(),
                    unflushed: 0,
                }))
            })
            .collect();
        Self {
            transports: series.iter().map(|(t, _, _)| *t).collect(),
            shards,
        }
    }

    /// Records one delivery over `transport` that took `secs`; `false`
    /// when the transport is not one of these.
    pub fn record(&self, transport: &str, secs: f64) -> bool {
        let Some(index) = self.transports.iter().position(|t| *t == transport) else {
            return false;
        };
        let shard = SHARD.with(|s| *s);
        let mut counts = self.shards[shard].0.lock();
        let (count, latency) = &counts.series[index];
        count.inc();
        latency.observe(secs);
        counts.unflushed += 1;
        if counts.unflushed >= FLUSH_EVERY {
            counts.flush();
        }
        true
    }

    /// Merges every shard into the shared series: before a scrape.
    pub fn flush(&self) {
        for shard in self.shards.iter() {
            shard.0.lock().flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliveries_from_many_threads_are_all_counted_once_flushed() {
        let count = prometheus::IntCounter::new("c", "c").unwrap();
        let latency =
            prometheus::Histogram::with_opts(prometheus::HistogramOpts::new("h", "h")).unwrap();
        let deliveries = std::sync::Arc::new(Deliveries::new(vec![(
            "ws",
            count.clone(),
            latency.clone(),
        )]));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let deliveries = deliveries.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        assert!(deliveries.record("ws", 0.001));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert!(!deliveries.record("carrier-pigeon", 0.001));
        // Most are merged already; the rest wait for a scrape.
        assert!(count.get() <= 8000);
        deliveries.flush();
        assert_eq!(count.get(), 8000);
        assert_eq!(latency.get_sample_count(), 8000);
    }
}
