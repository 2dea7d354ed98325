//! The command line, and the plan derived from it that every worker gets.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use serde::{Deserialize, Serialize};

/// Load-test subgate: hold N subscribers, publish at a paced rate, measure
/// delivery latency, loss and duplicates, and the servers' own CPU and
/// memory.
#[derive(Parser, Debug, Clone)]
#[command(name = "subgate-loadgen", version)]
pub struct Args {
    /// A node or a load balancer, `http://host:port`; repeat to spread
    /// subscribers (round-robin) and publishes over several.
    #[arg(long = "url", default_value = "http://127.0.0.1:8080")]
    pub urls: Vec<String>,
    /// Where publishes go (repeatable); default: the `--url`s.
    #[arg(long = "publish-url")]
    pub publish_urls: Vec<String>,
    /// Whose `/metrics` to scrape for server CPU and RSS (repeatable). A
    /// host name that resolves to several addresses (a compose service, a
    /// headless Kubernetes service) is scraped at each. Default: the
    /// `--url`s, which is wrong behind a load balancer: name the nodes.
    #[arg(long = "metrics-url")]
    pub metrics_urls: Vec<String>,
    /// Subscriber connections to hold.
    #[arg(long, default_value_t = 100)]
    pub connections: usize,
    /// Subscriptions each subscriber connection opens, each on a topic of
    /// its own when `--topics` allows: subscription `j` of connection `i`
    /// reads topic `(i * K + j) % --topics`, so `--topics` equal to
    /// `--connections` times K is the per-user shape (every topic one
    /// subscriber) and `--topics 1` a broadcast. graphql-ws and
    /// graphql-ws-legacy open K operations (several may share a topic when
    /// `--topics` is below K), `envelope` K channels, `sse` one stream of K
    /// topics (at most 20, and K distinct: `--topics` at least K);
    /// graphql-sse carries one. A node allows
    /// `websocket.max_subscriptions_per_connection` per WebSocket (100 by
    /// default; `SUBGATE__WEBSOCKET__MAX_SUBSCRIPTIONS_PER_CONNECTION`):
    /// above it the node refuses the rest and the run fails, saying so.
    #[arg(long, default_value_t = 1, value_name = "K")]
    pub subscriptions_per_connection: usize,
    /// New connections per second while connecting.
    #[arg(long, default_value_t = 1000.0)]
    pub ramp: f64,
    /// Events per second in the measured phase; 0 holds the connections
    /// without publishing (a soak: reports server RSS per connection).
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Seconds of the measured phase (or of the soak).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// The subscribers' transport.
    #[arg(long, value_enum, default_value_t = Transport::GraphqlWs)]
    pub transport: Transport,
    /// How events are published: `mutation` (GraphQL `createPost`, seen by
    /// `postCreated`) or `api` (`POST /api/v1/publish` to loadgen topics,
    /// seen by `events(topics)`, `/ws` channels and the SSE stream).
    /// Default: `mutation` where it works (GraphQL transports, one topic,
    /// no resume), else `api`.
    #[arg(long, value_enum)]
    pub publisher: Option<PublisherKind>,
    /// Topics: subscribers and events spread over K topics (1: broadcast).
    #[arg(long, default_value_t = 1)]
    pub topics: usize,
    /// A subscription document of your own for the GraphQL transports; its
    /// result must include the field carrying the published marker
    /// (`content` of a post, `payload` of an event).
    #[arg(long)]
    pub query: Option<String>,
    /// Variables (JSON) for `--query`.
    #[arg(long)]
    pub variables: Option<String>,
    /// Churn: topics a second that a client of its own subscribes to and
    /// unsubscribes from during the measured phase (fresh topics, never
    /// published to, each held `--churn-lifetime-ms`), on
    /// `--churn-connections` graphql-transport-ws connections of its own.
    /// The report gives the subscribes and unsubscribes a second achieved,
    /// the errors and a ping's round trip on those connections beside the
    /// measured latency; the churn never counts toward loss or duplicates.
    /// It subscribes as an authenticated user (`--jwt-secret`, `--token`, or
    /// a user signed up for the run): a topic nobody has published to is
    /// readable by any authenticated caller only.
    #[arg(long, default_value_t = 0.0, value_name = "R")]
    pub churn: f64,
    /// Connections of the churn client; default: enough that none holds
    /// more than 50 churn subscriptions at once (R × lifetime / 50, at
    /// least 2), well within the node's
    /// `websocket.max_subscriptions_per_connection` (100 by default).
    #[arg(long, value_name = "N")]
    pub churn_connections: Option<usize>,
    /// How long each churn subscription is held before it is let go of.
    #[arg(long, default_value_t = 100.0, value_name = "MS")]
    pub churn_lifetime_ms: f64,
    /// Reconnect a subscriber whose connection closes, to the next URL,
    /// and resume from the last event id it saw.
    #[arg(long)]
    pub resume: bool,
    /// A backend key for `POST /api/v1/publish` (one of `publish.api_keys`).
    #[arg(long, env = "SUBGATE_LOADGEN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// The nodes' HS256 secret: mint a publisher token and the subscribers'
    /// user tokens instead of signing a user up.
    #[arg(long, env = "SUBGATE_LOADGEN_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// A bearer token for the subscribers and the `createPost` publisher
    /// (otherwise a user is signed up for the run).
    #[arg(long, env = "SUBGATE_LOADGEN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Publish requests in flight at most; when they are all busy the
    /// publisher falls behind and says so (the achieved rate).
    #[arg(long, default_value_t = 64)]
    pub max_in_flight: usize,
    /// Worker processes holding the subscribers; default: enough that none
    /// holds more than `--per-worker`.
    #[arg(long)]
    pub workers: Option<usize>,
    /// Subscribers per worker process when `--workers` is not given.
    #[arg(long, default_value_t = 10_000)]
    pub per_worker: usize,
    /// Longest wait for every subscriber to be live (see a warm-up marker),
    /// after the last connection attempt.
    #[arg(long, default_value_t = 30.0)]
    pub warmup_timeout: f64,
    /// Longest wait after the last publish for deliveries still in flight.
    #[arg(long, default_value_t = 10.0)]
    pub drain_timeout: f64,
    /// Connection failures tolerated before the run fails.
    #[arg(long, default_value_t = 0)]
    pub max_connect_errors: u64,
    /// Write every figure of the report here as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Instead of subscribers and publishers: `--connections` hostile
    /// requests at once, each on a connection of its own, with `/healthz`
    /// probed every 20 ms and the nodes' memory read before and after.
    #[arg(long, value_enum)]
    pub storm: Option<crate::storm::Storm>,
    /// With `--storm`: fail when the slowest `/healthz` took longer (ms).
    #[arg(long)]
    pub max_healthz_ms: Option<f64>,
    /// With `--storm`: fail when a node's peak RSS is above this (MiB).
    #[arg(long)]
    pub max_rss_mib: Option<f64>,
    /// Run as a worker (internal: the coordinator starts these).
    #[arg(long, hide = true)]
    pub worker: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// GraphQL over WebSocket, `graphql-transport-ws` on `/graphql/ws`.
    GraphqlWs,
    /// The legacy `graphql-ws` subprotocol on `/graphql/ws`.
    GraphqlWsLegacy,
    /// The event-envelope protocol on `/ws` (channels).
    Envelope,
    /// The SSE event stream `/api/v1/events/stream`.
    Sse,
    /// GraphQL over SSE on `/graphql/stream`.
    GraphqlSse,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::GraphqlWs => "graphql-ws",
            Transport::GraphqlWsLegacy => "graphql-ws-legacy",
            Transport::Envelope => "envelope",
            Transport::Sse => "sse",
            Transport::GraphqlSse => "graphql-sse",
        }
    }

    pub fn is_graphql(self) -> bool {
        matches!(
            self,
            Transport::GraphqlWs | Transport::GraphqlWsLegacy | Transport::GraphqlSse
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PublisherKind {
    Mutation,
    Api,
}

/// What a worker needs to run its subscribers: everything is decided by the
/// coordinator, so every worker subscribes the same way.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// Tells this run's events from any other's on the same topics.
    pub run: String,
    pub urls: Vec<String>,
    pub transport: Transport,
    /// The topics ([`Plan::topic_of`]); for the `/ws` transport these are
    /// `channel:{id}`.
    pub topics: Vec<String>,
    /// Subscriptions per subscriber connection.
    pub subscriptions_per_connection: usize,
    /// The GraphQL document and its variables, without the per-subscriber
    /// `topics` / `after` (added by the client).
    pub query: Option<String>,
    pub variables: Option<serde_json::Value>,
    /// Whether the document is the built-in `events(topics, after)` one,
    /// whose variables the client fills in.
    pub events_query: bool,
    /// Bearer tokens for the subscribers, used round-robin (empty: anonymous).
    pub tokens: Vec<String>,
    pub resume: bool,
    /// Connections per second, for this worker.
    pub ramp: f64,
}

impl Plan {
    /// The topic index subscription `sub` of connection `connection`
    /// reads: subscriptions are numbered connection by connection and
    /// spread round-robin over the topics.
    pub fn topic_of(&self, connection: usize, sub: usize) -> usize {
        (connection * self.subscriptions_per_connection + sub) % self.topics.len()
    }
}

/// Subscriptions the `--topics` of a run give topic `topic`, of
/// `subscriptions` in all (the inverse of [`Plan::topic_of`]).
pub fn subscribers_of(topic: usize, topics: usize, subscriptions: usize) -> u64 {
    (subscriptions / topics + usize::from(topic < subscriptions % topics)) as u64
}

/// What the coordinator tells a worker, one JSON object per stdin line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Run subscribers `first .. first + count` (global indices).
    Start {
        plan: Plan,
        first: usize,
        count: usize,
    },
    /// The measured phase is over: per topic index, the last sequence number
    /// published and those whose publish was not acknowledged. Count what
    /// each subscriber lost or saw twice, and report.
    Finish {
        published: Vec<u64>,
        unacked: Vec<Vec<u64>>,
    },
}

/// What a worker tells the coordinator, one JSON object per stdout line.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Status {
    /// Connections whose first attempt has ended (in success or failure)
    /// or asked for every subscription.
    pub attempted: u64,
    /// Connections established now.
    pub open: u64,
    /// Subscriptions that have seen a warm-up marker: live end to end.
    pub live: u64,
    /// Subscriptions the server refused (never live).
    #[serde(default)]
    pub refused: u64,
    /// Measured deliveries received, one per subscription and event
    /// (duplicates included).
    pub received: u64,
    /// Every frame that carried an event of this run.
    pub frames: u64,
    pub reconnects: u64,
    pub connect_errors: u64,
    /// The topics this worker still waits on (a subscriber not yet live),
    /// when few enough to list (at most [`WAITING_LISTED`]): the warm-up
    /// marks only those. `None`: too many, mark every topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_topics: Option<Vec<u32>>,
}

/// Most topics a worker lists as waiting in one status line.
pub const WAITING_LISTED: usize = 10_000;

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct WorkerReport {
    pub status: Status,
    pub lost: u64,
    pub duplicates: u64,
    /// History gaps the server announced (it could not resume exactly).
    pub gaps: u64,
    /// Subscriptions that never saw a warm-up marker (refused ones apart).
    pub never_live: u64,
    /// Subscriptions the server refused, by reason (an error code).
    #[serde(default)]
    pub refused_reasons: std::collections::BTreeMap<String, u64>,
    /// Connection failures by reason (`refused`, `http_503`, `timeout`, …).
    pub connect_error_reasons: std::collections::BTreeMap<String, u64>,
    /// Connections the server or the network ended, by close code or kind
    /// (`1001`, `1013`, `reset`, `eof`, …).
    pub closes: std::collections::BTreeMap<String, u64>,
    /// Protocol errors the server sent (GraphQL errors, `error` messages).
    pub server_errors: std::collections::BTreeMap<String, u64>,
    /// The latency histogram in microseconds, as (value, count) pairs.
    pub latency_us: Vec<(u64, u64)>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerMessage {
    Status(Status),
    Final(Box<WorkerReport>),
    Fatal(String),
}

/// `http://host:port[/…]` without a trailing slash; refuses anything else
/// (TLS is for the load balancer in front, not for a load generator).
/// The nodes whose `/metrics` are scraped: the `--metrics-url`s, or else
/// `urls` (normalised, each once).
pub fn metrics_urls(args: &Args, urls: &[String]) -> Result<Vec<String>, String> {
    if args.metrics_urls.is_empty() {
        let mut u = urls.to_vec();
        u.dedup();
        return Ok(u);
    }
    args.metrics_urls.iter().map(|u| normalize_url(u)).collect()
}

pub fn normalize_url(url: &str) -> Result<String, String> {
    let trimmed = url.trim().trim_end_matches('/');
    let rest = trimmed
        .strip_prefix("http://")
        .ok_or_else(|| format!("--url {url}: expected http://host:port"))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("--url {url}: no host"));
    }
    Ok(trimmed.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscriptions_spread_over_topics_and_subscribers_of_counts_them() {
        let plan = |k: usize, topics: usize| Plan {
            run: "r".into(),
            urls: vec![],
            transport: Transport::GraphqlWs,
            topics: (0..topics).map(|t| t.to_string()).collect(),
            subscriptions_per_connection: k,
            query: None,
            variables: None,
            events_query: true,
            tokens: vec![],
            resume: false,
            ramp: 1.0,
        };
        // Per-user: 3 connections × 4 subscriptions on 12 topics, each once.
        let p = plan(4, 12);
        let mut seen: Vec<usize> = (0..3)
            .flat_map(|c| (0..4).map(move |j| (c, j)))
            .map(|(c, j)| p.topic_of(c, j))
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..12).collect::<Vec<_>>());
        assert!((0..12).all(|t| subscribers_of(t, 12, 12) == 1));
        // Fewer topics than subscriptions per connection: they repeat.
        let p = plan(4, 3);
        assert_eq!(
            (0..4).map(|j| p.topic_of(1, j)).collect::<Vec<_>>(),
            [1, 2, 0, 1]
        );
        // 10 subscriptions over 3 topics: 4, 3, 3.
        let counts: Vec<u64> = (0..3).map(|t| subscribers_of(t, 3, 10)).collect();
        assert_eq!(counts, [4, 3, 3]);
    }

    #[test]
    fn urls_are_plain_http_without_a_trailing_slash() {
        assert_eq!(
            normalize_url("http://127.0.0.1:8080/").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert!(normalize_url("https://x").is_err());
        assert!(normalize_url("http://").is_err());
        assert!(normalize_url("127.0.0.1:8080").is_err());
    }
}
