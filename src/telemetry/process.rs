//! The process collectors (`subgate_process_*`), read from `/proc` at each
//! scrape.
//!
//! The prometheus crate ships a process collector, but it counts CPU in
//! whole seconds: a benchmark that divides server CPU by deliveries over a
//! 30-second run would read 0 or 1. This one keeps the kernel's tick
//! resolution (10 ms at the usual 100 Hz), under the same metric names.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Counter, Gauge, IntGauge, Opts};

pub struct ProcessCollector {
    descs: Vec<Desc>,
    cpu_seconds: Counter,
    open_fds: IntGauge,
    max_fds: IntGauge,
    resident_memory_bytes: IntGauge,
    resident_memory_max_bytes: IntGauge,
    virtual_memory_bytes: IntGauge,
    start_time_seconds: Gauge,
    threads: IntGauge,
    ticks_per_second: f64,
    page_size: i64,
}

impl ProcessCollector {
    pub fn new(prefix: &str) -> Self {
        let name = |n: &str| format!("{prefix}_process_{n}");
        let cpu_seconds = Counter::with_opts(Opts::new(
            name("cpu_seconds_total"),
            "Total user and system CPU time spent in seconds.",
        ))
        .unwrap();
        let gauge = |n: &str, help: &str| IntGauge::new(name(n), help).unwrap();
        let open_fds = gauge("open_fds", "Number of open file descriptors.");
        let max_fds = gauge("max_fds", "Maximum number of open file descriptors.");
        let resident_memory_bytes =
            gauge("resident_memory_bytes", "Resident memory size in bytes.");
        // Not in the prometheus crate's collector: what a memory limit must
        // hold is the peak, which a scrape every 15 s easily misses.
        let resident_memory_max_bytes = gauge(
            "resident_memory_max_bytes",
            "Peak resident memory size in bytes since the process started (VmHWM).",
        );
        let virtual_memory_bytes = gauge("virtual_memory_bytes", "Virtual memory size in bytes.");
        let start_time_seconds = Gauge::new(
            name("start_time_seconds"),
            "Start time of the process since unix epoch in seconds.",
        )
        .unwrap();
        let threads = gauge("threads", "Number of OS threads in the process.");
        let mut descs = Vec::new();
        for c in [
            &cpu_seconds as &dyn Collector,
            &open_fds,
            &max_fds,
            &resident_memory_bytes,
            &resident_memory_max_bytes,
            &virtual_memory_bytes,
            &start_time_seconds,
            &threads,
        ] {
            descs.extend(c.desc().into_iter().cloned());
        }
        let ticks_per_second = procfs::ticks_per_second() as f64;
        let page_size = procfs::page_size() as i64;
        if let Ok(stat) = procfs::process::Process::myself().and_then(|p| p.stat()) {
            if let Ok(boot) = procfs::boot_time_secs() {
                start_time_seconds.set(boot as f64 + stat.starttime as f64 / ticks_per_second);
            }
        }
        Self {
            descs,
            cpu_seconds,
            open_fds,
            max_fds,
            resident_memory_bytes,
            resident_memory_max_bytes,
            virtual_memory_bytes,
            start_time_seconds,
            threads,
            ticks_per_second,
            page_size,
        }
    }
}

impl Collector for ProcessCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        // A /proc that cannot be read (an unusual sandbox) leaves the last
        // values in place rather than failing the whole scrape.
        if let Ok(me) = procfs::process::Process::myself() {
            if let Ok(n) = me.fd_count() {
                self.open_fds.set(n as i64);
            }
            if let Ok(limits) = me.limits() {
                if let procfs::process::LimitValue::Value(max) = limits.max_open_files.soft_limit {
                    self.max_fds.set(max as i64);
                }
            }
            if let Ok(stat) = me.stat() {
                self.virtual_memory_bytes.set(stat.vsize as i64);
                self.resident_memory_bytes
                    .set(stat.rss as i64 * self.page_size);
                self.threads.set(stat.num_threads);
                let total = (stat.utime + stat.stime) as f64 / self.ticks_per_second;
                // Two scrapes at once may both read; the counter only moves up.
                let delta = total - self.cpu_seconds.get();
                if delta > 0.0 {
                    self.cpu_seconds.inc_by(delta);
                }
            }
            if let Some(kib) = me.status().ok().and_then(|s| s.vmhwm) {
                self.resident_memory_max_bytes.set(kib as i64 * 1024);
            }
        }
        let mut out = Vec::with_capacity(8);
        for c in [
            &self.cpu_seconds as &dyn Collector,
            &self.open_fds,
            &self.max_fds,
            &self.resident_memory_bytes,
            &self.resident_memory_max_bytes,
            &self.virtual_memory_bytes,
            &self.start_time_seconds,
            &self.threads,
        ] {
            out.extend(c.collect());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_has_sub_second_resolution_and_memory_is_read() {
        let c = ProcessCollector::new("t");
        // Burn a little CPU so the counter has something to show.
        let mut x = 0u64;
        let until = std::time::Instant::now() + std::time::Duration::from_millis(60);
        while std::time::Instant::now() < until {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let families = c.collect();
        let get = |name: &str| {
            families
                .iter()
                .find(|f| f.get_name() == name)
                .map(|f| {
                    let m = &f.get_metric()[0];
                    if f.get_field_type() == prometheus::proto::MetricType::COUNTER {
                        m.get_counter().get_value()
                    } else {
                        m.get_gauge().get_value()
                    }
                })
                .unwrap()
        };
        let cpu = get("t_process_cpu_seconds_total");
        assert!(cpu > 0.0 && cpu.fract() != 0.0, "cpu seconds {cpu}");
        assert!(get("t_process_resident_memory_bytes") > 1e6);
        assert!(
            get("t_process_resident_memory_max_bytes") >= get("t_process_resident_memory_bytes")
        );
        assert!(get("t_process_open_fds") >= 3.0);
        assert!(get("t_process_start_time_seconds") > 1.6e9);
    }
}
