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
    /// transport, resolved once (`delivered` runs per event per subscriber
    /// and should not hash its label every time) and sharded by thread.
    delivery: super::deliveries::Deliveries,
    /// Open long-lived connections by transport.
    pub connections: IntGaugeVec,
    // --- node hardening (issue 9: items 5 and 14) ---
    /// Supervised background tasks restarted after they died, by task.
    pub task_restarts_total: IntCounterVec,
    /// Long-lived connections refused by the per-user limit, by where it
    /// was enforced (`node` memory, `fleet` Redis).
    pub user_connections_rejected_total: IntCounterVec,
    // --- end node hardening ---
    /// Connections accepted, by transport.
    pub connections_total: IntCounterVec,
    /// Connections refused at admission, by reason.
    pub rejected_total: IntCounterVec,
    /// Active subscriptions by transport.
    pub subscriptions: IntGaugeVec,
    /// Topics with at least one local subscriber.
    pub hub_topics: IntGauge,
    /// GraphQL subscription results executed: once per event per group, and
    /// once per event per subscription that runs on its own.
    pub subscription_executions_total: prometheus::IntCounter,
    /// Groups of subscribers sharing one execution.
    pub subscription_groups: IntGauge,
    /// Redis Pub/Sub messages received and not yet dispatched to the hub.
    pub pubsub_queue: IntGauge,
    /// Holes in topics' live streams filled from history by the hub (once
    /// per topic per hole, whatever the number of subscribers).
    pub history_fills_total: prometheus::IntCounter,
    /// Times the Pub/Sub queue filled and the connection was ended to catch
    /// up from history.
    pub pubsub_overflows_total: prometheus::IntCounter,
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
    /// Redis Cluster: channels this node subscribes on each shard (by the
    /// shard master's address).
    pub redis_shard_subscribed_channels: IntGaugeVec,
    /// Redis Cluster: topics this node wants and could not subscribe on
    /// each shard now (its master down, its slot moving).
    pub redis_shard_unsubscribed_topics: IntGaugeVec,
    /// Redis Cluster: 1 per shard whose master is online, 0 otherwise.
    pub redis_shard_up: IntGaugeVec,
    /// Redis Cluster: subscriptions lost on a shard and made again (a
    /// node's connection dropped, a slot moved, a failover).
    pub redis_shard_resubscribes_total: IntCounterVec,
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

    // -- issue 9 (hardening): inputs and memory bounds --
    /// Topic histories the in-memory broker evicted to stay within
    /// `history.max_topics`.
    pub history_evictions_total: prometheus::IntCounter,
}

/// Creates collectors already registered in one registry. A labelled one
/// is declared with every value its label takes, and each of those series
/// is created up front, so that it exists (at 0) from the first scrape:
/// dashboards and alert rules then see a flat zero instead of "no data",
/// and `rate()` sees the first increment.
struct Registering<'a>(&'a Registry);

impl Registering<'_> {
    fn register<C: prometheus::core::Collector + Clone + 'static>(&self, collector: C) -> C {
        self.0
            .register(Box::new(collector.clone()))
            .expect("metric names are unique");
        collector
    }

    fn counter(&self, name: &str, help: &str) -> prometheus::IntCounter {
        self.register(prometheus::IntCounter::new(name, help).unwrap())
    }

    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.register(IntGauge::new(name, help).unwrap())
    }

    fn counter_vec(&self, name: &str, help: &str, label: &str, values: &[&str]) -> IntCounterVec {
        let vec = IntCounterVec::new(Opts::new(name, help), &[label]).unwrap();
        for value in values {
            vec.with_label_values(&[value]);
        }
        self.register(vec)
    }

    fn gauge_vec(&self, name: &str, help: &str, label: &str, values: &[&str]) -> IntGaugeVec {
        let vec = IntGaugeVec::new(Opts::new(name, help), &[label]).unwrap();
        for value in values {
            vec.with_label_values(&[value]);
        }
        self.register(vec)
    }

    fn histogram_vec(
        &self,
        (name, help): (&str, &str),
        buckets: &[f64],
        label: &str,
        values: &[&str],
    ) -> HistogramVec {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        let vec = HistogramVec::new(opts, &[label]).unwrap();
        for value in values {
            vec.with_label_values(&[value]);
        }
        self.register(vec)
    }
}

/// Operation types, the `type` label of the GraphQL metrics.
const OPERATION_TYPES: &[&str] = &["query", "mutation", "subscription"];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = Registering(&registry);
        let connections = r.gauge_vec(
            "subgate_connections",
            "Open long-lived connections by transport",
            "transport",
            transport::DELIVERING,
        );
        let connections_total = r.counter_vec(
            "subgate_connections_total",
            "Connections accepted by transport",
            "transport",
            transport::DELIVERING,
        );
        let rejected_total = r.counter_vec(
            "subgate_rejected_total",
            "Connections or subscriptions refused at admission by reason",
            "reason",
            &[
                "origin",
                "draining",
                "max_connections",
                "max_subscriptions",
                "max_connections_per_user",
            ],
        );
        let subscriptions = r.gauge_vec(
            "subgate_subscriptions",
            "Active subscriptions by transport",
            "transport",
            transport::DELIVERING,
        );
        subscriptions.with_label_values(&[transport::HTTP]);
        let hub_topics = r.gauge(
            "subgate_hub_topics",
            "Topics with at least one local subscriber",
        );
        let subscription_executions_total = r.counter(
            "subgate_graphql_subscription_executions_total",
            "GraphQL subscription results executed (once per event per group of identical \
             subscriptions, once per event per subscription that runs on its own)",
        );
        let subscription_groups = r.gauge(
            "subgate_subscription_groups",
            "Groups of identical GraphQL subscriptions sharing one execution",
        );
        let pubsub_queue = r.gauge(
            "subgate_pubsub_queue",
            "Redis Pub/Sub messages received and not yet dispatched to the hub",
        );
        let history_fills_total = r.counter(
            "subgate_history_fills_total",
            "Holes in topics' live streams filled from history, once per topic per hole",
        );
        let pubsub_overflows_total = r.counter(
            "subgate_pubsub_overflows_total",
            "Times the node fell a whole queue behind its Redis Pub/Sub connection and \
             reconnected to catch up from history",
        );
        let events_published_total = r.counter_vec(
            "subgate_events_published_total",
            "Events accepted by the broker by topic namespace",
            "namespace",
            &["posts", "post", "user", "notifications", "channel", "other"],
        );
        let publish_failures_total = r.counter_vec(
            "subgate_publish_failures_total",
            "Publishes the broker refused by reason",
            "reason",
            &["unavailable", "invalid_topic"],
        );
        let events_delivered_total = r.counter_vec(
            "subgate_events_delivered_total",
            "Events handed to clients by transport",
            "transport",
            transport::DELIVERING,
        );
        let events_dropped_total = r.counter_vec(
            "subgate_events_dropped_total",
            "Events not delivered by reason",
            "reason",
            &["no_subscriber", "slow_consumer", "undecodable"],
        );
        let slow_consumer_disconnects_total = r.counter_vec(
            "subgate_slow_consumer_disconnects_total",
            "Subscribers cut off because their queue was full, by transport",
            "transport",
            transport::DELIVERING,
        );
        let delivery_latency_seconds = r.histogram_vec(
            (
                "subgate_delivery_latency_seconds",
                "Time from publish to the hand-off to the client's socket",
            ),
            &[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ],
            "transport",
            transport::DELIVERING,
        );
        // The one metric with two labels: every (type, outcome) pair.
        let graphql_operations_total = r.register(
            IntCounterVec::new(
                Opts::new(
                    "subgate_graphql_operations_total",
                    "GraphQL operations by type and outcome",
                ),
                &["type", "outcome"],
            )
            .unwrap(),
        );
        for ty in OPERATION_TYPES {
            for outcome in ["ok", "field_error", "request_error", "cancelled"] {
                graphql_operations_total.with_label_values(&[ty, outcome]);
            }
        }
        let graphql_operation_duration_seconds = r.histogram_vec(
            (
                "subgate_graphql_operation_duration_seconds",
                "GraphQL execution time by type",
            ),
            &[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ],
            "type",
            OPERATION_TYPES,
        );
        let ws_closes_total = r.counter_vec(
            "subgate_ws_closes_total",
            "WebSocket closes sent by the node, by close code",
            "code",
            &["1001", "1009", "1013"],
        );
        let redis_reconnects_total = r.counter(
            "subgate_redis_reconnects_total",
            "Pub/Sub connections lost and restarted",
        );
        let redis_subscribed_channels = r.gauge(
            "subgate_redis_subscribed_channels",
            "Channels subscribed on this node's Pub/Sub connection",
        );
        let redis_shard_subscribed_channels = r.gauge_vec(
            "subgate_redis_shard_subscribed_channels",
            "Redis Cluster: channels this node subscribes on each shard",
            "shard",
            &[],
        );
        let redis_shard_unsubscribed_topics = r.gauge_vec(
            "subgate_redis_shard_unsubscribed_topics",
            "Redis Cluster: topics wanted and not subscribed on each shard now",
            "shard",
            &[],
        );
        let redis_shard_up = r.gauge_vec(
            "subgate_redis_shard_up",
            "Redis Cluster: 1 per shard whose master is online",
            "shard",
            &[],
        );
        let redis_shard_resubscribes_total = r.counter_vec(
            "subgate_redis_shard_resubscribes_total",
            "Redis Cluster: subscriptions lost on a shard and made again",
            "shard",
            &[],
        );
        let redis_probe_failures_total = r.counter(
            "subgate_redis_probe_failures_total",
            "Pub/Sub connections restarted because the probe did not come back",
        );
        let redis_command_duration_seconds = r.histogram_vec(
            (
                "subgate_redis_command_duration_seconds",
                "Redis command latency by command",
            ),
            &[
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ],
            "command",
            &[],
        );
        let rate_limited_total = r.counter_vec(
            "subgate_rate_limited_total",
            "Requests refused by a rate limit, by scope (connection, user, publish, typing, \
             login, login_email, password_hash, publish_auth, large_document)",
            "scope",
            &crate::ratelimit::Scope::ALL.map(crate::ratelimit::Scope::as_str),
        );
        let presence_entries = r.gauge(
            "subgate_presence_entries",
            "(channel, user) pairs present on this node",
        );
        let presence_refresh_failures_total = r.counter(
            "subgate_presence_refresh_failures_total",
            "Presence writes to Redis (refreshes, joins, leaves, sweeps) that failed",
        );
        let draining = r.gauge(
            "subgate_draining",
            "1 while the node drains after a stop signal, else 0",
        );
        let ready = r.gauge(
            "subgate_ready",
            "1 while the node is ready for traffic (as /readyz), else 0",
        );
        // --- node hardening (issue 9: items 5 and 14) ---
        registry
            .register(Box::new(super::sink::LOG_WRITE_ERRORS.clone()))
            .expect("the log counter registers once per registry");
        let task_restarts_total = r.counter_vec(
            "subgate_task_restarts_total",
            "Supervised background tasks that died (panicked or returned) and were restarted, by task",
            "task",
            &[],
        );
        let user_connections_rejected_total = r.counter_vec(
            "subgate_user_connections_rejected_total",
            "Long-lived connections refused by server.max_connections_per_user, by scope (node, fleet)",
            "scope",
            &["node", "fleet"],
        );
        // --- end node hardening ---
        // -- issue 9 (hardening): inputs and memory bounds --
        let history_evictions_total = r.counter(
            "subgate_history_evictions_total",
            "Topic histories the in-memory broker evicted to stay within history.max_topics",
        );

        let version = env!("CARGO_PKG_VERSION");
        r.gauge_vec(
            "subgate_build_info",
            "Always 1; the version in a label",
            "version",
            &[version],
        )
        .with_label_values(&[version])
        .set(1);
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(super::process::ProcessCollector::new("subgate")))
            .expect("process collector registers once");
        let delivery = super::deliveries::Deliveries::new(
            transport::DELIVERING
                .iter()
                .map(|t| {
                    (
                        *t,
                        events_delivered_total.with_label_values(&[t]),
                        delivery_latency_seconds.with_label_values(&[t]),
                    )
                })
                .collect(),
        );
        Self {
            registry,
            delivery,
            connections,
            task_restarts_total,
            user_connections_rejected_total,
            connections_total,
            rejected_total,
            subscriptions,
            hub_topics,
            subscription_executions_total,
            subscription_groups,
            pubsub_queue,
            pubsub_overflows_total,
            history_fills_total,
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
            redis_shard_subscribed_channels,
            redis_shard_unsubscribed_topics,
            redis_shard_up,
            redis_shard_resubscribes_total,
            redis_probe_failures_total,
            redis_command_duration_seconds,
            rate_limited_total,
            presence_entries,
            presence_refresh_failures_total,
            draining,
            ready,
            history_evictions_total,
        }
    }

    /// The Prometheus text exposition of every collector.
    pub fn render(&self) -> String {
        self.delivery.flush();
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }

    /// Records the delivery of one event published at `published_at_ms`.
    pub fn delivered(&self, transport: &str, published_at_ms: u64) {
        let secs = crate::event::now_ms().saturating_sub(published_at_ms) as f64 / 1000.0;
        if !self.delivery.record(transport, secs) {
            self.events_delivered_total
                .with_label_values(&[transport])
                .inc();
            self.delivery_latency_seconds
                .with_label_values(&[transport])
                .observe(secs);
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
