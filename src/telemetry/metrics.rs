//! Every collector, in one registry injected through `AppState`.
//!
//! Names carry the `subgate_` prefix, counters end in `_total`, durations
//! are `_seconds`. Labels are bounded: transport, reason, result, operation
//! type, topic namespace; never a raw topic or a user id.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Transport labels.
pub mod transport {
    pub const GRAPHQL_WS: &str = "graphql_ws";
    pub const GRAPHQL_WS_LEGACY: &str = "graphql_ws_legacy";
    pub const HTTP: &str = "http";
    /// The event-envelope protocol on `/ws`.
    pub const ENVELOPE_WS: &str = "envelope_ws";
    /// The event stream, `GET /api/v1/events/stream`.
    pub const SSE: &str = "sse";
    /// GraphQL over Server-Sent Events, `/graphql/stream`.
    pub const GRAPHQL_SSE: &str = "graphql_sse";

    /// Every transport that delivers events.
    pub const DELIVERING: &[&str] = &[GRAPHQL_WS, GRAPHQL_WS_LEGACY, ENVELOPE_WS, SSE, GRAPHQL_SSE];
}

pub struct Metrics {
    registry: Registry,
    /// The delivered counter and latency histogram of each delivering
    /// transport, resolved once: `delivered` runs per event per subscriber
    /// and should not hash its label every time.
    delivery: Vec<(&'static str, prometheus::IntCounter, prometheus::Histogram)>,
    /// Open long-lived connections by transport.
    pub connections: IntGaugeVec,
    /// Connections accepted, by transport.
    pub connections_total: IntCounterVec,
    /// Connections refused at admission, by reason.
    pub rejected_total: IntCounterVec,
    /// Active subscriptions by transport.
    pub subscriptions: IntGaugeVec,
    /// Topics with at least one local subscriber.
    pub hub_topics: IntGauge,
    /// Events accepted by the broker, by topic namespace.
    pub events_published_total: IntCounterVec,
    /// Publishes the broker refused, by reason.
    pub publish_failures_total: IntCounterVec,
    /// Events handed to a client, by transport.
    pub events_delivered_total: IntCounterVec,
    /// Events not delivered, by reason.
    pub events_dropped_total: IntCounterVec,
    /// Subscribers cut off because their queue was full, by transport.
    pub slow_consumer_disconnects_total: IntCounterVec,
    /// Time from publish to the hand-off to the client's socket.
    pub delivery_latency_seconds: HistogramVec,
    /// GraphQL operations by type and outcome.
    pub graphql_operations_total: IntCounterVec,
    /// GraphQL operation execution time by type.
    pub graphql_operation_duration_seconds: HistogramVec,
    /// WebSocket closes by code.
    pub ws_closes_total: IntCounterVec,
    /// Pub/Sub connections lost and restarted.
    pub redis_reconnects_total: prometheus::IntCounter,
    /// Channels subscribed on this node's Pub/Sub connection.
    pub redis_subscribed_channels: IntGauge,
    /// Pub/Sub connections restarted because the probe did not come back.
    pub redis_probe_failures_total: prometheus::IntCounter,
    /// Redis command latency by command.
    pub redis_command_duration_seconds: HistogramVec,
    /// Requests refused by a rate limit, by scope.
    pub rate_limited_total: IntCounterVec,
    /// (channel, user) pairs present on this node.
    pub presence_entries: IntGauge,
    /// Presence writes to Redis (refreshes, joins, leaves, sweeps) that failed.
    pub presence_refresh_failures_total: prometheus::IntCounter,
    /// 1 while the node drains (SIGTERM received), else 0.
    pub draining: IntGauge,
    /// 1 while `/readyz` would answer 200, else 0; set at each scrape.
    pub ready: IntGauge,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let connections = IntGaugeVec::new(
            Opts::new(
                "subgate_connections",
                "Open long-lived connections by transport",
            ),
            &["transport"],
        )
        .unwrap();
        let connections_total = IntCounterVec::new(
            Opts::new(
                "subgate_connections_total",
                "Connections accepted by transport",
            ),
            &["transport"],
        )
        .unwrap();
        let rejected_total = IntCounterVec::new(
            Opts::new(
                "subgate_rejected_total",
                "Connections or subscriptions refused at admission by reason",
            ),
            &["reason"],
        )
        .unwrap();
        let subscriptions = IntGaugeVec::new(
            Opts::new("subgate_subscriptions", "Active subscriptions by transport"),
            &["transport"],
        )
        .unwrap();
        let hub_topics = IntGauge::new(
            "subgate_hub_topics",
            "Topics with at least one local subscriber",
        )
        .unwrap();
        let events_published_total = IntCounterVec::new(
            Opts::new(
                "subgate_events_published_total",
                "Events accepted by the broker by topic namespace",
            ),
            &["namespace"],
        )
        .unwrap();
        let publish_failures_total = IntCounterVec::new(
            Opts::new(
                "subgate_publish_failures_total",
                "Publishes the broker refused by reason",
            ),
            &["reason"],
        )
        .unwrap();
        let events_delivered_total = IntCounterVec::new(
            Opts::new(
                "subgate_events_delivered_total",
                "Events handed to clients by transport",
            ),
            &["transport"],
        )
        .unwrap();
        let events_dropped_total = IntCounterVec::new(
            Opts::new(
                "subgate_events_dropped_total",
                "Events not delivered by reason",
            ),
            &["reason"],
        )
        .unwrap();
        let slow_consumer_disconnects_total = IntCounterVec::new(
            Opts::new(
                "subgate_slow_consumer_disconnects_total",
                "Subscribers cut off because their queue was full, by transport",
            ),
            &["transport"],
        )
        .unwrap();
        let delivery_latency_seconds = HistogramVec::new(
            HistogramOpts::new(
                "subgate_delivery_latency_seconds",
                "Time from publish to the hand-off to the client's socket",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["transport"],
        )
        .unwrap();
        let graphql_operations_total = IntCounterVec::new(
            Opts::new(
                "subgate_graphql_operations_total",
                "GraphQL operations by type and outcome",
            ),
            &["type", "outcome"],
        )
        .unwrap();
        let graphql_operation_duration_seconds = HistogramVec::new(
            HistogramOpts::new(
                "subgate_graphql_operation_duration_seconds",
                "GraphQL execution time by type",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            &["type"],
        )
        .unwrap();
        let ws_closes_total = IntCounterVec::new(
            Opts::new(
                "subgate_ws_closes_total",
                "WebSocket closes sent by the node, by close code",
            ),
            &["code"],
        )
        .unwrap();
        let redis_reconnects_total = prometheus::IntCounter::new(
            "subgate_redis_reconnects_total",
            "Pub/Sub connections lost and restarted",
        )
        .unwrap();
        let redis_subscribed_channels = IntGauge::new(
            "subgate_redis_subscribed_channels",
            "Channels subscribed on this node's Pub/Sub connection",
        )
        .unwrap();
        let redis_probe_failures_total = prometheus::IntCounter::new(
            "subgate_redis_probe_failures_total",
            "Pub/Sub connections restarted because the probe did not come back",
        )
        .unwrap();
        let redis_command_duration_seconds = HistogramVec::new(
            HistogramOpts::new(
                "subgate_redis_command_duration_seconds",
                "Redis command latency by command",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ]),
            &["command"],
        )
        .unwrap();
        let rate_limited_total = IntCounterVec::new(
            Opts::new(
                "subgate_rate_limited_total",
                "Requests refused by a rate limit, by scope (connection, user, publish, typing)",
            ),
            &["scope"],
        )
        .unwrap();
        let presence_entries = IntGauge::new(
            "subgate_presence_entries",
            "(channel, user) pairs present on this node",
        )
        .unwrap();
        let presence_refresh_failures_total = prometheus::IntCounter::new(
            "subgate_presence_refresh_failures_total",
            "Presence writes to Redis (refreshes, joins, leaves, sweeps) that failed",
        )
        .unwrap();
        let draining = IntGauge::new(
            "subgate_draining",
            "1 while the node drains after a stop signal, else 0",
        )
        .unwrap();
        let ready = IntGauge::new(
            "subgate_ready",
            "1 while the node is ready for traffic (as /readyz), else 0",
        )
        .unwrap();
        let build_info = IntGaugeVec::new(
            Opts::new("subgate_build_info", "Always 1; the version in a label"),
            &["version"],
        )
        .unwrap();
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for c in [
            Box::new(connections.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(connections_total.clone()),
            Box::new(rejected_total.clone()),
            Box::new(subscriptions.clone()),
            Box::new(hub_topics.clone()),
            Box::new(events_published_total.clone()),
            Box::new(publish_failures_total.clone()),
            Box::new(events_delivered_total.clone()),
            Box::new(events_dropped_total.clone()),
            Box::new(slow_consumer_disconnects_total.clone()),
            Box::new(delivery_latency_seconds.clone()),
            Box::new(graphql_operations_total.clone()),
            Box::new(graphql_operation_duration_seconds.clone()),
            Box::new(ws_closes_total.clone()),
            Box::new(redis_reconnects_total.clone()),
            Box::new(redis_subscribed_channels.clone()),
            Box::new(redis_probe_failures_total.clone()),
            Box::new(redis_command_duration_seconds.clone()),
            Box::new(rate_limited_total.clone()),
            Box::new(presence_entries.clone()),
            Box::new(presence_refresh_failures_total.clone()),
            Box::new(draining.clone()),
            Box::new(ready.clone()),
            Box::new(build_info),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(super::process::ProcessCollector::new("subgate")))
            .expect("process collector registers once");
        // Every bounded label value is created up front, so that each series
        // exists (at 0) from the first scrape: dashboards and alert rules
        // then see a flat zero instead of "no data", and `rate()` sees the
        // first increment.
        for t in transport::DELIVERING {
            connections.with_label_values(&[t]);
            connections_total.with_label_values(&[t]);
            subscriptions.with_label_values(&[t]);
            events_delivered_total.with_label_values(&[t]);
            slow_consumer_disconnects_total.with_label_values(&[t]);
            delivery_latency_seconds.with_label_values(&[t]);
        }
        subscriptions.with_label_values(&[transport::HTTP]);
        for reason in ["origin", "draining", "max_connections", "max_subscriptions"] {
            rejected_total.with_label_values(&[reason]);
        }
        for reason in ["no_subscriber", "slow_consumer", "undecodable"] {
            events_dropped_total.with_label_values(&[reason]);
        }
        for reason in ["unavailable", "invalid_topic"] {
            publish_failures_total.with_label_values(&[reason]);
        }
        for namespace in ["posts", "post", "user", "notifications", "channel", "other"] {
            events_published_total.with_label_values(&[namespace]);
        }
        for scope in ["connection", "user", "publish", "typing"] {
            rate_limited_total.with_label_values(&[scope]);
        }
        for ty in ["query", "mutation", "subscription"] {
            graphql_operation_duration_seconds.with_label_values(&[ty]);
            for outcome in ["ok", "field_error", "request_error", "cancelled"] {
                graphql_operations_total.with_label_values(&[ty, outcome]);
            }
        }
        for code in ["1001", "1009", "1013"] {
            ws_closes_total.with_label_values(&[code]);
        }
        let delivery = transport::DELIVERING
            .iter()
            .map(|t| {
                (
                    *t,
                    events_delivered_total.with_label_values(&[t]),
                    delivery_latency_seconds.with_label_values(&[t]),
                )
            })
            .collect();
        Self {
            registry,
            delivery,
            connections,
            connections_total,
            rejected_total,
            subscriptions,
            hub_topics,
            events_published_total,
            publish_failures_total,
            events_delivered_total,
            events_dropped_total,
            slow_consumer_disconnects_total,
            delivery_latency_seconds,
            graphql_operations_total,
            graphql_operation_duration_seconds,
            ws_closes_total,
            redis_reconnects_total,
            redis_subscribed_channels,
            redis_probe_failures_total,
            redis_command_duration_seconds,
            rate_limited_total,
            presence_entries,
            presence_refresh_failures_total,
            draining,
            ready,
        }
    }

    /// The Prometheus text exposition of every collector.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }

    /// Records the delivery of one event published at `published_at_ms`.
    pub fn delivered(&self, transport: &str, published_at_ms: u64) {
        let secs = crate::event::now_ms().saturating_sub(published_at_ms) as f64 / 1000.0;
        match self.delivery.iter().find(|(t, _, _)| *t == transport) {
            Some((_, count, latency)) => {
                count.inc();
                latency.observe(secs);
            }
            None => {
                self.events_delivered_total
                    .with_label_values(&[transport])
                    .inc();
                self.delivery_latency_seconds
                    .with_label_values(&[transport])
                    .observe(secs);
            }
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Keeps a gauge raised while it lives.
pub struct GaugeGuard(IntGauge);

impl GaugeGuard {
    pub fn new(gauge: IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
