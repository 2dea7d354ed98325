//! How a node reaches Redis: the `redis` section of the settings, read once,
//! for the command pool and the Pub/Sub connection alike.

use std::fmt;
use std::time::Duration;

use crate::config::{RedisMode, RedisSettings};

/// Where the Redis servers are: `redis.mode` and its addresses.
#[derive(Clone, PartialEq, Eq)]
pub enum Topology {
    /// `url` is the server.
    Single,
    /// `url` and these are seed nodes of a Redis Cluster.
    Cluster { seeds: Vec<String> },
    /// The master named `master`, found through these sentinels; `url`
    /// only lends its credentials and database to the master connections.
    Sentinel {
        sentinels: Vec<String>,
        master: String,
    },
}

impl Topology {
    pub fn mode(&self) -> RedisMode {
        match self {
            Topology::Single => RedisMode::Single,
            Topology::Cluster { .. } => RedisMode::Cluster,
            Topology::Sentinel { .. } => RedisMode::Sentinel,
        }
    }
}

/// The connection settings every Redis user of a node shares.
#[derive(Clone)]
pub struct RedisConfig {
    /// `redis.url`: `redis://`, `rediss://` or `unix://`. It may carry a
    /// password, so `Debug` leaves it out.
    pub url: String,
    /// `redis.mode` and the addresses it needs.
    pub topology: Topology,
    /// `redis.prefix`: the prefix of every key and channel.
    pub prefix: String,
    /// Bound on every call, waiting for a pooled connection included.
    pub command_timeout: Duration,
    /// How long a new subscription waits for Redis to confirm it.
    pub subscribe_timeout: Duration,
    /// How often the Pub/Sub connection is probed for silent loss.
    pub probe_interval: Duration,
    /// Longest wait between Pub/Sub reconnect attempts (jittered).
    pub max_backoff: Duration,
    /// Pooled connections for commands: publishes, the store, presence.
    pub pool_size: usize,
    /// Pub/Sub messages received and not yet handed to the hub, at most.
    pub pubsub_queue: usize,
}

impl RedisConfig {
    /// The settings in `redis`; `None` without Redis (no `redis.url`
    /// outside Sentinel mode: the in-memory node).
    pub fn from_settings(redis: &RedisSettings) -> Option<Self> {
        let secs = Duration::from_secs_f64;
        let (url, topology) = match redis.mode {
            RedisMode::Single => (redis.url.clone()?, Topology::Single),
            RedisMode::Cluster => (
                redis.url.clone()?,
                Topology::Cluster {
                    seeds: redis.cluster_urls.clone(),
                },
            ),
            RedisMode::Sentinel => {
                let master = redis.sentinel_master.clone().unwrap_or_default();
                // Without a URL the master's name stands in for its host:
                // only credentials and the database are read from it.
                let url = redis
                    .url
                    .clone()
                    .unwrap_or_else(|| "redis://master/".to_owned());
                (
                    url,
                    Topology::Sentinel {
                        sentinels: redis.sentinel_urls.clone(),
                        master,
                    },
                )
            }
        };
        Some(Self {
            url,
            topology,
            prefix: redis.prefix.clone(),
            command_timeout: secs(redis.command_timeout_seconds),
            subscribe_timeout: secs(redis.subscribe_timeout_seconds),
            probe_interval: secs(redis.probe_interval_seconds),
            max_backoff: secs(redis.max_backoff_seconds),
            pool_size: redis.pool_size,
            pubsub_queue: redis.pubsub_queue_messages,
        })
    }

    /// The Redis at `url`, keys under `prefix`, every other setting at its
    /// default.
    pub fn new(url: impl Into<String>, prefix: impl Into<String>) -> Self {
        let defaults = RedisSettings {
            url: Some(url.into()),
            prefix: prefix.into(),
            ..RedisSettings::default()
        };
        Self::from_settings(&defaults).expect("the URL is set")
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("mode", &self.topology.mode())
            .field("prefix", &self.prefix)
            .field("command_timeout", &self.command_timeout)
            .field("subscribe_timeout", &self.subscribe_timeout)
            .field("probe_interval", &self.probe_interval)
            .field("max_backoff", &self.max_backoff)
            .field("pool_size", &self.pool_size)
            .finish_non_exhaustive()
    }
}

/// Why the Redis layer could not be built. Nothing connects while it is
/// built (a Redis that is down at start is waited for), so only the
/// settings can be wrong; each message names the setting.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// `redis.url` passed the syntax check but does not parse as a Redis
    /// connection (a bad port, a bad database number…).
    #[error("redis.url: not a valid Redis URL: {0}")]
    InvalidUrl(#[source] redis::RedisError),
    /// The command pool could not be built.
    #[error("redis.pool_size: cannot build the Redis connection pool: {0}")]
    Pool(#[source] deadpool_redis::BuildError),
    /// A seed node or a sentinel address does not parse.
    #[error("{key}: not a valid Redis URL: {source}")]
    InvalidNodeUrl {
        key: &'static str,
        #[source]
        source: redis::RedisError,
    },
}
