//! Tracing setup and the metrics registry (served by `transport::ops`).

pub mod deliveries;
pub mod metrics;
#[cfg(target_os = "linux")]
pub mod process;
pub mod sink;

use std::sync::OnceLock;
use std::time::Duration;

use crate::config::{LogFormat, Settings};

/// The log's writer, once [`init`] ran.
static SINK: OnceLock<sink::LogSink> = OnceLock::new();

/// Installs the global tracing subscriber (text or JSON, per `log.format`),
/// writing through a [`sink::LogSink`]: a broken or stalled stderr drops
/// log lines (counted), never the node.
pub fn init(settings: &Settings) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level_directives(&settings.log.level)))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(
            SINK.get_or_init(|| sink::LogSink::start(std::io::stderr()))
                .clone(),
        )
        .with_ansi(ansi)
        .log_internal_errors(false);
    let _ = match settings.log.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// `log.level` as filter directives. The `redis` crate's own warnings are
/// left out unless `log.level` names it: its cluster client warns once per
/// reconnect attempt (hundreds a second while a shard is down), and the
/// node logs the same outage itself, once in a while.
fn level_directives(level: &str) -> String {
    if level.contains("redis") {
        level.to_owned()
    } else {
        format!("{level},redis=error")
    }
}

/// Writes out the queued log lines before the process exits, waiting at
/// most `timeout`.
pub fn flush(timeout: Duration) {
    if let Some(sink) = SINK.get() {
        sink.flush(timeout);
    }
}
