//! Typed, strict, defaulted settings and the layered loader.
//!
//! Layers, later wins: built-in defaults < `config/default.toml` <
//! built-in production defaults ([`PRODUCTION_DEFAULTS`], when production
//! is chosen) < `config/$SUBGATE_ENV.toml` < `--config FILE` <
//! `SUBGATE__SECTION__KEY` environment variables. `SUBGATE_ENV=production`
//! makes a production node whether or not `config/production.toml`
//! exists; another name needs its file. [`Settings::validate`] lists every problem, each
//! naming its key, so a bad deployment fails before it listens.

pub mod capacity;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Which defaults apply: `development` is friendly, `production` is strict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    #[default]
    Development,
    Production,
}

impl Environment {
    /// The name, as `environment` and `SUBGATE_ENV` spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Development => "development",
            Environment::Production => "production",
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Everything a node can be told.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// `development` (default) or `production` (introspection off, no dev defaults).
    pub environment: Environment,
    pub server: ServerSettings,
    pub redis: RedisSettings,
    pub auth: AuthSettings,
    pub graphql: GraphqlSettings,
    pub websocket: WebsocketSettings,
    pub hub: HubSettings,
    pub history: HistorySettings,
    pub publish: PublishSettings,
    pub sse: SseSettings,
    pub ratelimit: RatelimitSettings,
    pub presence: PresenceSettings,
    pub log: LogSettings,
    /// What loading found out, beside the settings themselves.
    #[serde(skip)]
    pub loaded: Loaded,
}

/// What loading the settings found out: reported at start, never set.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    /// Deprecated keys that were used, one warning each (logged at start).
    pub deprecations: Vec<String>,
    /// The configuration files layered, in order (those found).
    pub sources: Vec<String>,
    /// What the open-files limit allows, once [`Settings::apply_file_limit`]
    /// ran (the binary does, before it serves).
    pub capacity: Option<capacity::Capacity>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Listen host.
    pub host: String,
    /// Listen port; 0 picks a free one (the `listening on ADDR` log line says which).
    pub port: u16,
    /// HTTP worker threads; 0 means one per core.
    pub workers: usize,
    /// When non-empty, WebSocket and SSE upgrades must carry one of these `Origin`s.
    pub allowed_origins: Vec<String>,
    /// Largest accepted HTTP request body.
    pub max_body_bytes: usize,
    /// Most concurrent long-lived connections (WebSocket and SSE) per node.
    /// Unset: derived from the open-files limit (see [`capacity`]); set
    /// above what that limit allows: refused at start.
    pub max_connections: Option<usize>,
    /// How long a drain may take before the process exits anyway.
    pub drain_timeout_seconds: u64,
    // --- node hardening (issue 9, item 14) ---
    /// Most long-lived connections (WebSockets of every protocol, event
    /// streams) one user may hold: across the fleet when `redis.url` is
    /// set (leases timed by `presence.ttl_seconds`), on this node otherwise.
    pub max_connections_per_user: usize,
    // --- end node hardening ---
    /// How long a draining node keeps answering HTTP (`/readyz` 503, new
    /// WebSockets refused) so that load balancers take it out of rotation
    /// before it stops listening; within `drain_timeout_seconds`.
    pub drain_grace_seconds: u64,
    /// Proxies (addresses or CIDR blocks, `10.0.0.0/8`) whose
    /// `X-Forwarded-For` names the client. Empty (the default): the header
    /// is ignored and the client is the TCP peer, so no client can choose
    /// the address its rate limits are counted under.
    pub trusted_proxies: Vec<String>,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            workers: 0,
            allowed_origins: Vec::new(),
            max_body_bytes: 1024 * 1024,
            max_connections: None,
            max_connections_per_user: 100,
            drain_timeout_seconds: 10,
            drain_grace_seconds: 0,
            trusted_proxies: Vec::new(),
        }
    }
}

/// How the node reaches Redis: `redis.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    /// One Redis server (or a primary behind a fixed address).
    #[default]
    Single,
    /// Redis Cluster: `redis.url` is one seed node (plus
    /// `redis.cluster_urls`), the rest is discovered; events use sharded
    /// Pub/Sub.
    Cluster,
    /// Redis with Sentinel: the master is found through
    /// `redis.sentinel_urls` by the name `redis.sentinel_master`.
    Sentinel,
}

impl RedisMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RedisMode::Single => "single",
            RedisMode::Cluster => "cluster",
            RedisMode::Sentinel => "sentinel",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSettings {
    /// Set: Redis bus and store (stateless node). Unset: in-memory (one node).
    /// In `cluster` mode one seed node; in `sentinel` mode optional, and
    /// only its credentials and database apply to the master.
    pub url: Option<String>,
    /// `single`, `cluster` or `sentinel`.
    pub mode: RedisMode,
    /// `cluster` mode: more seed nodes, tried when `url` does not answer.
    pub cluster_urls: Vec<String>,
    /// `sentinel` mode: the sentinels, `redis://[:password@]host:port`.
    pub sentinel_urls: Vec<String>,
    /// `sentinel` mode: the name the sentinels monitor the master by.
    pub sentinel_master: Option<String>,
    /// Prefix of every key and channel, so deployments can share one Redis.
    pub prefix: String,
    /// Bound on every Redis command.
    #[serde(alias = "command_timeout_ms")]
    pub command_timeout_seconds: f64,
    /// How long a new subscription waits for Redis to confirm it.
    #[serde(alias = "subscribe_timeout_ms")]
    pub subscribe_timeout_seconds: f64,
    /// How often the Pub/Sub connection is probed for silent loss.
    #[serde(alias = "probe_interval_ms")]
    pub probe_interval_seconds: f64,
    /// Longest wait between reconnect attempts (backoff is jittered).
    #[serde(alias = "max_backoff_ms")]
    pub max_backoff_seconds: f64,
    /// Pooled connections for commands (publish, store).
    pub pool_size: usize,
    /// Pub/Sub messages received and not yet handed to the hub, at most; a
    /// node that falls this far behind reconnects and catches up from
    /// history.
    pub pubsub_queue_messages: usize,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: None,
            mode: RedisMode::Single,
            cluster_urls: Vec::new(),
            sentinel_urls: Vec::new(),
            sentinel_master: None,
            prefix: "subgate:".into(),
            command_timeout_seconds: 2.0,
            subscribe_timeout_seconds: 5.0,
            probe_interval_seconds: 5.0,
            max_backoff_seconds: 2.0,
            pool_size: 32,
            pubsub_queue_messages: 16 * 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// HS256 secret. Has a development default; required in production
    /// unless `jwt_public_key_file` is set.
    pub jwt_secret: Option<String>,
    /// PEM RSA public key for RS256 tokens.
    pub jwt_public_key_file: Option<PathBuf>,
    /// When set, tokens must carry this `iss`.
    pub issuer: Option<String>,
    /// When set, tokens must carry this `aud`.
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`.
    pub leeway_seconds: u64,
    /// Lifetime of the tokens the `login` mutation issues.
    pub login_token_ttl_seconds: u64,
    /// Password hashes (argon2, about 19 MiB and tens of milliseconds
    /// each) computed at once by `login`, `createUser` and password
    /// changes; 0 means one per two cores (at least one), so that hashing
    /// never takes every core from serving requests. Up to four callers per slot wait at
    /// most a second for one; any more are refused with `RATE_LIMITED` at
    /// once, so memory stays bounded whatever the number of callers.
    pub max_concurrent_password_hashes: usize,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            jwt_secret: None,
            jwt_public_key_file: None,
            issuer: None,
            audience: None,
            leeway_seconds: 0,
            login_token_ttl_seconds: 3600,
            max_concurrent_password_hashes: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GraphqlSettings {
    /// Deepest selection accepted, counted through fragments.
    pub max_depth: usize,
    /// Highest complexity score accepted (one per field, lists multiplied by `first`).
    pub max_complexity: usize,
    /// Most aliases in one document.
    pub max_aliases: usize,
    /// Most operations in one batched HTTP request.
    pub max_batch_size: usize,
    /// Introspection; `None` means on in development, off in production.
    pub introspection: Option<bool>,
    /// Most items a connection page may ask for.
    pub max_page_size: usize,
    // -- issue 9 (hardening): document size --
    /// Most lexical tokens in one document (names, punctuators, numbers,
    /// strings; white space, commas and comments not counted). Checked
    /// before the parse, on every transport: a larger document is refused
    /// with `TOO_MANY_TOKENS` without being parsed or validated.
    pub max_tokens: usize,
}

impl Default for GraphqlSettings {
    fn default() -> Self {
        Self {
            max_depth: 10,
            max_complexity: 1000,
            max_aliases: 30,
            max_batch_size: 10,
            introspection: None,
            max_page_size: 100,
            max_tokens: 15_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebsocketSettings {
    /// Server ping interval; a peer silent for three intervals is dropped.
    pub ping_interval_seconds: u64,
    /// Time a client has to send `connection_init` (4408 after it).
    pub connection_init_timeout_seconds: u64,
    /// Largest accepted frame (1009 above it).
    pub max_frame_bytes: usize,
    /// Most concurrent subscriptions on one connection.
    pub max_subscriptions_per_connection: usize,
    /// Envelope protocol (`/ws`): time a client has to authenticate (by
    /// `?token=` or a first `auth` message); `auth.failed` and 4401 after it.
    pub auth_timeout_seconds: u64,
    /// Envelope protocol: largest text message handled; a longer one (up to
    /// `max_frame_bytes`) is answered `error too_large` and dropped.
    pub max_message_bytes: usize,
}

impl Default for WebsocketSettings {
    fn default() -> Self {
        Self {
            ping_interval_seconds: 30,
            connection_init_timeout_seconds: 10,
            max_frame_bytes: 64 * 1024,
            max_subscriptions_per_connection: 100,
            auth_timeout_seconds: 10,
            max_message_bytes: 16 * 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HubSettings {
    /// Events queued per subscriber before it is cut off as a slow consumer.
    pub subscriber_queue_capacity: usize,
    // -- issue 9 (hardening): memory bounds --
    /// WebSockets: bytes sent to a connection that its socket has not taken
    /// yet; a frame that would exceed them cuts the connection off as a
    /// slow consumer (1013), whichever of this and
    /// `subscriber_queue_capacity` comes first.
    pub subscriber_queue_bytes: usize,
}

impl Default for HubSettings {
    fn default() -> Self {
        Self {
            subscriber_queue_capacity: 256,
            subscriber_queue_bytes: 256 * 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistorySettings {
    /// Events kept per topic for resuming (approximate on Redis).
    pub size: usize,
    /// How long a topic's history lives after its last event.
    pub ttl_seconds: u64,
    // -- issue 9 (hardening): memory bounds --
    /// In-memory store only (no `redis.url`): most topics with a history.
    /// Publishing to one more evicts the least recently published topic's
    /// history (`subgate_history_evictions_total`); a topic still read on
    /// the node keeps its lineage, so its live subscribers see no gap (see
    /// `broker::memory`). Redis expires histories by `ttl_seconds`.
    pub max_topics: usize,
}

impl Default for HistorySettings {
    fn default() -> Self {
        Self {
            size: 1000,
            ttl_seconds: 86400,
            max_topics: crate::broker::memory::DEFAULT_MAX_TOPICS,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PublishSettings {
    /// Keys accepted as `Authorization: Bearer K` on `POST /api/v1/publish`.
    pub api_keys: Vec<String>,
    /// Largest accepted event payload.
    pub max_payload_bytes: usize,
}

impl Default for PublishSettings {
    fn default() -> Self {
        Self {
            api_keys: Vec::new(),
            max_payload_bytes: 64 * 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SseSettings {
    /// How often a quiet event stream gets a `: ping` comment, so that
    /// proxies and load balancers do not close it as idle.
    pub heartbeat_seconds: u64,
    /// The reconnection delay the stream tells `EventSource` clients
    /// (its first line, `retry:`).
    #[serde(alias = "retry_ms")]
    pub retry_seconds: f64,
}

impl Default for SseSettings {
    fn default() -> Self {
        Self {
            heartbeat_seconds: 15,
            retry_seconds: 3.0,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RatelimitSettings {
    /// Envelope messages one connection may send per second, sustained.
    pub messages_per_second: f64,
    /// Envelope messages one connection may send at once above the rate.
    pub messages_burst: u32,
    /// Envelope messages one user may send per second across all their
    /// connections on one node.
    pub user_messages_per_second: f64,
    /// The per-user burst.
    pub user_messages_burst: u32,
    /// Publishes per second by one API key or token subject.
    pub publish_per_second: f64,
    /// The per-publisher burst.
    pub publish_burst: u32,
    /// Shortest time between two typing indicators of one user in one channel.
    #[serde(alias = "typing_interval_ms")]
    pub typing_interval_seconds: f64,
    /// `login` and `createUser` calls per second from one client address
    /// (an IPv6 client counts by its /64), sustained.
    pub login_per_second: f64,
    /// The per-address burst of `login` and `createUser`.
    pub login_burst: u32,
    /// `login` attempts per second for one email address, whoever makes
    /// them: guessing one account's password stays slow from any number
    /// of addresses.
    pub login_email_per_second: f64,
    /// The per-email burst of `login`.
    pub login_email_burst: u32,
    /// Failed authentications (a wrong API key, a bad token) on
    /// `POST /api/v1/publish` per second from one client address.
    pub publish_auth_failures_per_second: f64,
    /// The per-address burst of failed publish authentications.
    pub publish_auth_failures_burst: u32,
    /// Most keys (users, publishers, typing pairs, addresses, emails) each
    /// keyed limiter tracks; idle ones are dropped, and a new key is refused while the
    /// limiter is full of active ones.
    pub max_keys: usize,
}

impl Default for RatelimitSettings {
    fn default() -> Self {
        Self {
            messages_per_second: 10.0,
            messages_burst: 20,
            user_messages_per_second: 20.0,
            user_messages_burst: 40,
            publish_per_second: 100.0,
            publish_burst: 200,
            typing_interval_seconds: 2.0,
            login_per_second: 1.0,
            login_burst: 20,
            login_email_per_second: 0.2,
            login_email_burst: 5,
            publish_auth_failures_per_second: 0.2,
            publish_auth_failures_burst: 10,
            max_keys: 100_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceSettings {
    /// How long a node's claim that a user is in a channel lasts in Redis
    /// unless renewed: a node killed outright lets its users go offline
    /// within this.
    pub ttl_seconds: u64,
    /// How often a node renews the claims of its connections; below
    /// `ttl_seconds`, so that one late renewal does not expire anyone.
    pub refresh_seconds: u64,
    /// How often each node looks for expired claims to remove and announce.
    #[serde(alias = "sweep_interval_ms")]
    pub sweep_interval_seconds: f64,
}

impl Default for PresenceSettings {
    fn default() -> Self {
        Self {
            ttl_seconds: 15,
            refresh_seconds: 5,
            sweep_interval_seconds: 1.0,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `subgate=debug,info`.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// The development HS256 secret, used only when `environment = development`
/// and no key is configured.
pub const DEV_JWT_SECRET: &str = "subgate-development-secret-do-not-use-in-production";

/// The built-in production defaults: layered over `config/default.toml`
/// and under `config/production.toml` whenever production is chosen (by
/// `SUBGATE_ENV=production`, or by `environment = "production"` in any
/// layer), so that a production node without its file is still one.
pub const PRODUCTION_DEFAULTS: &str = r#"
environment = "production"
[server]
drain_timeout_seconds = 25
drain_grace_seconds = 5
[graphql]
introspection = false
[log]
format = "json"
"#;

/// A configuration that cannot be used, naming the key at fault.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

/// Every problem of one configuration, each on a line of its own naming
/// its key: an operator fixes them in one go, not one start at a time.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// The first problem (there is always one).
    pub fn first(&self) -> &ConfigError {
        &self.0[0]
    }
}

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }
}

impl ConfigError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl Settings {
    /// Loads the layers from `dir` (normally the working directory), then the
    /// optional `--config` file, then the environment.
    pub fn load(dir: &Path, file: Option<&Path>) -> Result<Self, ConfigErrors> {
        Self::load_from(dir, file, std::env::vars())
    }

    /// [`Settings::load`] with the environment given explicitly (for tests).
    pub fn load_from(
        dir: &Path,
        file: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigErrors> {
        let vars: Vec<(String, String)> = vars.into_iter().collect();
        let env_name = vars
            .iter()
            .find(|(k, _)| k == "SUBGATE_ENV")
            .map(|(_, v)| v.clone());
        let default_file = dir.join("config/default.toml");
        let env_file = match &env_name {
            None => None,
            Some(name) => Some(Self::environment_file(dir, name)?),
        };
        if let Some(file) = file {
            if !file.is_file() {
                return Err(ConfigError::new(
                    "--config",
                    format!("{} is not a readable file", file.display()),
                )
                .into());
            }
        }
        let env_map: std::collections::HashMap<String, String> = vars
            .into_iter()
            .filter(|(k, _)| k.starts_with("SUBGATE__"))
            .collect();
        // The layers, with the built-in production defaults between
        // config/default.toml and the environment's file when asked.
        let layers = |production_defaults: bool| {
            let mut builder = config::Config::builder()
                .add_source(config::File::from(default_file.clone()).required(false));
            if production_defaults {
                builder = builder.add_source(config::File::from_str(
                    PRODUCTION_DEFAULTS,
                    config::FileFormat::Toml,
                ));
            }
            if let Some(env_file) = &env_file {
                builder = builder.add_source(config::File::from(env_file.clone()).required(false));
            }
            if let Some(file) = file {
                builder = builder.add_source(config::File::from(file).required(true));
            }
            builder.add_source(
                config::Environment::with_prefix("SUBGATE")
                    .prefix_separator("__")
                    .separator("__")
                    .list_separator(",")
                    .with_list_parse_key("server.allowed_origins")
                    .with_list_parse_key("server.trusted_proxies")
                    .with_list_parse_key("publish.api_keys")
                    .with_list_parse_key("redis.cluster_urls")
                    .with_list_parse_key("redis.sentinel_urls")
                    .try_parsing(true)
                    .source(Some(env_map.clone())),
            )
        };
        let raw = layers(false).build().map_err(config_error)?;
        let production = Self::production_chosen(&raw, env_name.as_deref())?;
        let raw = if production {
            layers(true).build().map_err(config_error)?
        } else {
            raw
        };
        let mut sources: Vec<String> = Vec::new();
        if default_file.is_file() {
            sources.push(default_file.display().to_string());
        }
        if let Some(env_file) = env_file.filter(|f| f.is_file()) {
            sources.push(env_file.display().to_string());
        }
        if let Some(file) = file {
            sources.push(file.display().to_string());
        }
        let renamed = Self::deprecated_keys(&raw)?;
        let mut settings = Self::deserialize_every_key(&raw)?;
        settings.loaded.deprecations = settings.convert_deprecated(&renamed);
        settings.loaded.sources = sources;
        settings.validate().map_err(ConfigErrors)?;
        Ok(settings)
    }

    /// `config/NAME.toml` in `dir`, for `SUBGATE_ENV=NAME`. `development`
    /// and `production` are built in, so their files are optional; any
    /// other name was asked for explicitly and its file must exist.
    fn environment_file(dir: &Path, name: &str) -> Result<PathBuf, ConfigErrors> {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ConfigError::new(
                "SUBGATE_ENV",
                format!("{name:?} is not a valid environment name"),
            )
            .into());
        }
        let path = dir.join(format!("config/{name}.toml"));
        if !matches!(name, "development" | "production") && !path.is_file() {
            return Err(ConfigError::new(
                "SUBGATE_ENV",
                format!("{name:?} names {}, which does not exist", path.display()),
            )
            .into());
        }
        Ok(path)
    }

    /// Whether this node runs in production: `SUBGATE_ENV=production`
    /// says so whether or not `config/production.toml` exists, as does an
    /// `environment = "production"` key in any layer. `SUBGATE_ENV`
    /// naming one built-in environment while the `environment` key names
    /// the other is refused, naming the key.
    fn production_chosen(
        raw: &config::Config,
        env_name: Option<&str>,
    ) -> Result<bool, ConfigErrors> {
        let key = raw.get_string("environment").ok();
        let from_env = env_name.filter(|n| matches!(*n, "development" | "production"));
        match (key.as_deref(), from_env) {
            (Some(key), Some(name))
                if key != name && matches!(key, "development" | "production") =>
            {
                Err(ConfigError::new(
                    "environment",
                    format!("is {key:?}, but SUBGATE_ENV={name}: set one of them, or both alike"),
                )
                .into())
            }
            (Some(key), _) => Ok(key == "production"),
            (None, name) => Ok(name == Some("production")),
        }
    }

    /// Deserializes `raw`, listing every key of the wrong type, unknown
    /// name or unknown choice, not only the first: serde stops at the first
    /// problem, so each one is set aside (the key removed) and the rest read
    /// again, until the remainder reads cleanly.
    fn deserialize_every_key(raw: &config::Config) -> Result<Settings, ConfigErrors> {
        use config::Source;
        let mut table = raw.collect().map_err(config_error)?;
        let mut errors = Vec::new();
        // Enum-valued keys are checked by name first: the config crate's own
        // message for an unknown variant does not say which key it was.
        for (key, allowed) in [
            ("environment", &["development", "production"][..]),
            ("log.format", &["text", "json"][..]),
            ("redis.mode", &["single", "cluster", "sentinel"][..]),
        ] {
            if let Ok(value) = raw.get_string(key) {
                if !allowed.contains(&value.as_str()) {
                    remove_key(&mut table, key);
                    errors.push(ConfigError::new(
                        key,
                        format!("{value:?} is not one of {}", allowed.join(", ")),
                    ));
                }
            }
        }
        loop {
            let root = config::Value::new(None, config::ValueKind::Table(table.clone()));
            match root.try_deserialize::<Settings>() {
                Ok(settings) if errors.is_empty() => return Ok(settings),
                Ok(_) => return Err(ConfigErrors(errors)),
                Err(err) => {
                    let mut err = config_error(err);
                    if err.message.starts_with("unknown field") && !err.key.contains('.') {
                        if let Some(section) = Self::section_of_unknown(&table, &err.key) {
                            err.key = format!("{section}.{}", err.key);
                        }
                    }
                    // A problem without a key that can be removed ends the
                    // search (every pass removes a key, so it ends).
                    let removed = remove_key(&mut table, &err.key);
                    errors.push(err);
                    if !removed {
                        return Err(ConfigErrors(errors));
                    }
                }
            }
        }
    }

    /// serde names an unknown field without its section: the section is
    /// the one holding `field` that fails on its own.
    fn section_of_unknown(
        table: &config::Map<String, config::Value>,
        field: &str,
    ) -> Option<String> {
        table.iter().find_map(|(section, value)| {
            let config::ValueKind::Table(inner) = &value.kind else {
                return None;
            };
            if !inner.contains_key(field) {
                return None;
            }
            let alone = config::Map::from_iter([(section.clone(), value.clone())]);
            let root = config::Value::new(None, config::ValueKind::Table(alone));
            let fails_alone = root
                .try_deserialize::<Settings>()
                .is_err_and(|e| config_error(e).key == field);
            fails_alone.then(|| section.clone())
        })
    }

    /// Durations used to mix milliseconds and seconds; they are all in
    /// seconds now (fractions allowed). An old `_ms` name is a serde alias
    /// of its `_seconds` key, read here in milliseconds and converted,
    /// with a warning for each (logged once telemetry is up); setting a key
    /// under both names is an error.
    const RENAMED_DURATIONS: [(&'static str, &'static str); 7] = [
        ("redis.command_timeout_ms", "redis.command_timeout_seconds"),
        (
            "redis.subscribe_timeout_ms",
            "redis.subscribe_timeout_seconds",
        ),
        ("redis.probe_interval_ms", "redis.probe_interval_seconds"),
        ("redis.max_backoff_ms", "redis.max_backoff_seconds"),
        ("sse.retry_ms", "sse.retry_seconds"),
        (
            "ratelimit.typing_interval_ms",
            "ratelimit.typing_interval_seconds",
        ),
        (
            "presence.sweep_interval_ms",
            "presence.sweep_interval_seconds",
        ),
    ];

    /// The old names used in `raw`: an error when a new name is set too.
    fn deprecated_keys(
        raw: &config::Config,
    ) -> Result<Vec<(&'static str, &'static str)>, ConfigErrors> {
        let set = |key: &str| raw.get::<config::Value>(key).is_ok();
        let used: Vec<_> = Self::RENAMED_DURATIONS
            .into_iter()
            .filter(|(old, _)| set(old))
            .collect();
        let both: Vec<ConfigError> = used
            .iter()
            .filter(|(_, new)| set(new))
            .map(|(old, new)| {
                ConfigError::new(
                    *old,
                    format!("set only {new} (this is its deprecated name, in milliseconds)"),
                )
            })
            .collect();
        if both.is_empty() {
            Ok(used)
        } else {
            Err(ConfigErrors(both))
        }
    }

    /// Converts the durations given under their old names from
    /// milliseconds; one warning each.
    fn convert_deprecated(&mut self, used: &[(&str, &str)]) -> Vec<String> {
        let mut warnings = Vec::new();
        for (old, new) in used {
            let value = match *new {
                "redis.command_timeout_seconds" => &mut self.redis.command_timeout_seconds,
                "redis.subscribe_timeout_seconds" => &mut self.redis.subscribe_timeout_seconds,
                "redis.probe_interval_seconds" => &mut self.redis.probe_interval_seconds,
                "redis.max_backoff_seconds" => &mut self.redis.max_backoff_seconds,
                "sse.retry_seconds" => &mut self.sse.retry_seconds,
                "ratelimit.typing_interval_seconds" => &mut self.ratelimit.typing_interval_seconds,
                "presence.sweep_interval_seconds" => &mut self.presence.sweep_interval_seconds,
                _ => unreachable!("every renamed key is listed"),
            };
            *value /= 1000.0;
            warnings.push(format!("{old} is deprecated: use {new} = {value}"));
        }
        warnings
    }

    /// Every problem with these settings, each naming its key.
    pub fn validate(&self) -> Result<(), Vec<ConfigError>> {
        let mut errors = Vec::new();
        // Every count, size and duration that 0 would make meaningless.
        macro_rules! must_be_positive {
            ($($section:ident . $key:ident),* $(,)?) => {
                $(
                    if self.$section.$key == 0 {
                        errors.push(ConfigError::new(
                            concat!(stringify!($section), ".", stringify!($key)),
                            "must be greater than 0",
                        ));
                    }
                )*
            };
        }
        // Durations in seconds: above 0 (NaN is not).
        macro_rules! must_be_positive_seconds {
            ($($section:ident . $key:ident),* $(,)?) => {
                $(
                    if self.$section.$key.is_nan() || self.$section.$key <= 0.0 {
                        errors.push(ConfigError::new(
                            concat!(stringify!($section), ".", stringify!($key)),
                            "must be a number of seconds greater than 0",
                        ));
                    }
                )*
            };
        }
        must_be_positive_seconds!(
            redis.command_timeout_seconds,
            redis.subscribe_timeout_seconds,
            redis.probe_interval_seconds,
            redis.max_backoff_seconds,
            sse.retry_seconds,
            ratelimit.typing_interval_seconds,
            presence.sweep_interval_seconds,
        );
        must_be_positive!(
            server.max_body_bytes,
            server.max_connections_per_user,
            graphql.max_depth,
            graphql.max_complexity,
            graphql.max_batch_size,
            graphql.max_page_size,
            graphql.max_tokens,
            websocket.ping_interval_seconds,
            websocket.connection_init_timeout_seconds,
            websocket.max_frame_bytes,
            websocket.max_subscriptions_per_connection,
            websocket.auth_timeout_seconds,
            websocket.max_message_bytes,
            hub.subscriber_queue_capacity,
            hub.subscriber_queue_bytes,
            redis.pool_size,
            redis.pubsub_queue_messages,
            history.size,
            history.ttl_seconds,
            history.max_topics,
            auth.login_token_ttl_seconds,
            publish.max_payload_bytes,
            sse.heartbeat_seconds,
            ratelimit.messages_burst,
            ratelimit.user_messages_burst,
            ratelimit.publish_burst,
            ratelimit.login_burst,
            ratelimit.login_email_burst,
            ratelimit.publish_auth_failures_burst,
            ratelimit.max_keys,
            presence.ttl_seconds,
            presence.refresh_seconds,
        );
        if self.server.max_connections == Some(0) {
            errors.push(ConfigError::new(
                "server.max_connections",
                "must be greater than 0",
            ));
        }
        if self.presence.refresh_seconds >= self.presence.ttl_seconds {
            errors.push(ConfigError::new(
                "presence.refresh_seconds",
                "must be less than presence.ttl_seconds",
            ));
        }
        for (key, rate) in [
            (
                "ratelimit.messages_per_second",
                self.ratelimit.messages_per_second,
            ),
            (
                "ratelimit.user_messages_per_second",
                self.ratelimit.user_messages_per_second,
            ),
            (
                "ratelimit.publish_per_second",
                self.ratelimit.publish_per_second,
            ),
            (
                "ratelimit.login_per_second",
                self.ratelimit.login_per_second,
            ),
            (
                "ratelimit.login_email_per_second",
                self.ratelimit.login_email_per_second,
            ),
            (
                "ratelimit.publish_auth_failures_per_second",
                self.ratelimit.publish_auth_failures_per_second,
            ),
        ] {
            if !(rate.is_finite() && rate > 0.0) {
                errors.push(ConfigError::new(key, "must be a number greater than 0"));
            }
        }
        if self.server.drain_grace_seconds > self.server.drain_timeout_seconds {
            errors.push(ConfigError::new(
                "server.drain_grace_seconds",
                "must not exceed server.drain_timeout_seconds",
            ));
        }
        if self.server.host.trim().is_empty() {
            errors.push(ConfigError::new("server.host", "must not be empty"));
        }
        self.validate_redis(&mut errors);
        if let Some(secret) = &self.auth.jwt_secret {
            if secret.is_empty() {
                errors.push(ConfigError::new("auth.jwt_secret", "must not be empty"));
            } else if self.environment == Environment::Production && secret == DEV_JWT_SECRET {
                errors.push(ConfigError::new(
                    "auth.jwt_secret",
                    "is the public development secret, refused in production",
                ));
            } else if self.environment == Environment::Production && secret.len() < 32 {
                errors.push(ConfigError::new(
                    "auth.jwt_secret",
                    "must be at least 32 bytes in production",
                ));
            }
        }
        if let Some(path) = &self.auth.jwt_public_key_file {
            match std::fs::read(path) {
                Ok(pem) => {
                    if jsonwebtoken::DecodingKey::from_rsa_pem(&pem).is_err() {
                        errors.push(ConfigError::new(
                            "auth.jwt_public_key_file",
                            format!("{} is not a PEM RSA public key", path.display()),
                        ));
                    }
                }
                Err(e) => errors.push(ConfigError::new(
                    "auth.jwt_public_key_file",
                    format!("cannot read {}: {e}", path.display()),
                )),
            }
        }
        if self.environment == Environment::Production
            && self.auth.jwt_secret.is_none()
            && self.auth.jwt_public_key_file.is_none()
        {
            errors.push(ConfigError::new(
                "auth.jwt_secret",
                "production needs auth.jwt_secret or auth.jwt_public_key_file",
            ));
        }
        for key in &self.publish.api_keys {
            if key.len() < 16 {
                errors.push(ConfigError::new(
                    "publish.api_keys",
                    "every key must be at least 16 characters",
                ));
                break;
            }
        }
        for proxy in &self.server.trusted_proxies {
            if parse_proxy(proxy).is_none() {
                errors.push(ConfigError::new(
                    "server.trusted_proxies",
                    format!("{proxy:?} is not an IP address or a CIDR block such as 10.0.0.0/8"),
                ));
            }
        }
        for origin in &self.server.allowed_origins {
            if !(origin.starts_with("http://") || origin.starts_with("https://")) {
                errors.push(ConfigError::new(
                    "server.allowed_origins",
                    format!("{origin:?} is not an origin such as https://app.example.com"),
                ));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// Whether introspection and field suggestions are served.
    pub fn introspection_enabled(&self) -> bool {
        self.graphql
            .introspection
            .unwrap_or(self.environment == Environment::Development)
    }

    /// The proxies of `server.trusted_proxies` (validated: none is dropped).
    pub fn trusted_proxies(&self) -> Vec<ipnet::IpNet> {
        self.server
            .trusted_proxies
            .iter()
            .filter_map(|p| parse_proxy(p))
            .collect()
    }

    /// How many password hashes may run at once: the setting, or one per
    /// two cores, at least one.
    pub fn max_concurrent_password_hashes(&self) -> usize {
        match self.auth.max_concurrent_password_hashes {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get().div_ceil(2)),
            n => n,
        }
    }

    /// HTTP worker threads: `server.workers`, or one per core.
    pub fn http_workers(&self) -> usize {
        match self.server.workers {
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            n => n,
        }
    }

    /// Sizes the node to the open-files limit `files` (see [`capacity`]):
    /// `server.max_connections` becomes the limit in force.
    pub fn apply_file_limit(
        &mut self,
        files: Option<capacity::FileLimit>,
    ) -> Result<(), ConfigError> {
        let planned = capacity::plan(self, files, self.http_workers())?;
        self.server.max_connections = Some(planned.max_connections);
        self.loaded.capacity = Some(planned);
        Ok(())
    }

    /// Most long-lived connections admitted; unlimited before
    /// [`Settings::apply_file_limit`] when the key is unset.
    pub fn connection_limit(&self) -> usize {
        self.server.max_connections.unwrap_or(usize::MAX)
    }

    /// `redis.*`: the URL schemes, and the keys each `redis.mode` needs
    /// or cannot use (a key that the mode would ignore is an error, not a
    /// silent no-op).
    fn validate_redis(&self, errors: &mut Vec<ConfigError>) {
        let redis = &self.redis;
        let network = |url: &str| url.starts_with("redis://") || url.starts_with("rediss://");
        if let Some(url) = &redis.url {
            if !(network(url) || url.starts_with("unix://")) {
                errors.push(ConfigError::new(
                    "redis.url",
                    "must start with redis://, rediss:// or unix://",
                ));
            } else if redis.mode != RedisMode::Single && !network(url) {
                errors.push(ConfigError::new(
                    "redis.url",
                    format!(
                        "must start with redis:// or rediss:// in redis.mode = {}",
                        redis.mode.as_str()
                    ),
                ));
            }
        }
        for (key, urls) in [
            ("redis.cluster_urls", &redis.cluster_urls),
            ("redis.sentinel_urls", &redis.sentinel_urls),
        ] {
            if urls.iter().any(|u| !network(u)) {
                errors.push(ConfigError::new(
                    key,
                    "each must start with redis:// or rediss://",
                ));
            }
        }
        let only =
            |key: &'static str, set: bool, mode: RedisMode, errors: &mut Vec<ConfigError>| {
                if set && redis.mode != mode {
                    errors.push(ConfigError::new(
                        key,
                        format!(
                            "is only read in redis.mode = {}, not {}",
                            mode.as_str(),
                            redis.mode.as_str()
                        ),
                    ));
                }
            };
        only(
            "redis.cluster_urls",
            !redis.cluster_urls.is_empty(),
            RedisMode::Cluster,
            errors,
        );
        only(
            "redis.sentinel_urls",
            !redis.sentinel_urls.is_empty(),
            RedisMode::Sentinel,
            errors,
        );
        only(
            "redis.sentinel_master",
            redis.sentinel_master.is_some(),
            RedisMode::Sentinel,
            errors,
        );
        match redis.mode {
            RedisMode::Single => {}
            RedisMode::Cluster => {
                if redis.url.is_none() {
                    errors.push(ConfigError::new(
                        "redis.url",
                        "is required in redis.mode = cluster (a seed node of the cluster)",
                    ));
                }
                // A brace in the prefix would become every key's hash tag
                // and put the whole deployment in one slot.
                if redis.prefix.contains(['{', '}']) {
                    errors.push(ConfigError::new(
                        "redis.prefix",
                        "must not contain { or } in redis.mode = cluster (subgate sets the hash tags)",
                    ));
                }
            }
            RedisMode::Sentinel => {
                if redis.sentinel_urls.is_empty() {
                    errors.push(ConfigError::new(
                        "redis.sentinel_urls",
                        "is required in redis.mode = sentinel (the sentinels' addresses)",
                    ));
                }
                if redis
                    .sentinel_master
                    .as_deref()
                    .is_none_or(|m| m.trim().is_empty())
                {
                    errors.push(ConfigError::new(
                        "redis.sentinel_master",
                        "is required in redis.mode = sentinel (the name the sentinels monitor)",
                    ));
                }
            }
        }
    }

    /// Whether the node runs on Redis (a bus and store shared by the
    /// fleet) rather than in memory.
    pub fn uses_redis(&self) -> bool {
        self.redis.url.is_some() || self.redis.mode == RedisMode::Sentinel
    }

    /// The effective settings as JSON with every secret replaced by
    /// `"<redacted>"`: `auth.jwt_secret`, each of `publish.api_keys` and
    /// the password of `redis.url`. What `subgate config` prints and the
    /// start-up log records.
    pub fn redacted(&self) -> serde_json::Value {
        const REDACTED: &str = "<redacted>";
        let mut value = serde_json::to_value(self).unwrap_or_default();
        if let Some(secret) = value.pointer_mut("/auth/jwt_secret") {
            if !secret.is_null() {
                *secret = REDACTED.into();
            }
        }
        if let Some(serde_json::Value::Array(keys)) = value.pointer_mut("/publish/api_keys") {
            for key in keys {
                *key = REDACTED.into();
            }
        }
        if let Some(url) = value.pointer_mut("/redis/url") {
            if let Some(text) = url.as_str() {
                *url = redact_url_password(text, REDACTED).into();
            }
        }
        for list in ["/redis/cluster_urls", "/redis/sentinel_urls"] {
            if let Some(serde_json::Value::Array(urls)) = value.pointer_mut(list) {
                for url in urls {
                    if let Some(text) = url.as_str() {
                        *url = redact_url_password(text, REDACTED).into();
                    }
                }
            }
        }
        value
    }

    /// The HS256 secret in force, with the development default applied.
    pub fn effective_jwt_secret(&self) -> Option<&str> {
        match (&self.auth.jwt_secret, self.environment) {
            (Some(secret), _) => Some(secret),
            (None, Environment::Development) if self.auth.jwt_public_key_file.is_none() => {
                Some(DEV_JWT_SECRET)
            }
            _ => None,
        }
    }
}

/// A trusted proxy: one address (a block of one) or a CIDR block.
fn parse_proxy(text: &str) -> Option<ipnet::IpNet> {
    let text = text.trim();
    text.parse::<ipnet::IpNet>().ok().or_else(|| {
        text.parse::<std::net::IpAddr>()
            .ok()
            .map(ipnet::IpNet::from)
    })
}

/// `url` with the password of its user info (`scheme://user:PASSWORD@host`)
/// replaced by `mask`.
fn redact_url_password(url: &str, mask: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:{mask}{}",
            &url[..scheme_end],
            &rest[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

/// Turns a `config` crate error into one that names the key.
/// Removes the dotted `key` (`section.name`) from `table`; false when it
/// is not there.
fn remove_key(table: &mut config::Map<String, config::Value>, key: &str) -> bool {
    match key.split_once('.') {
        None => table.remove(key).is_some(),
        Some((section, rest)) => match table.get_mut(section) {
            Some(config::Value {
                kind: config::ValueKind::Table(inner),
                ..
            }) => remove_key(inner, rest),
            _ => false,
        },
    }
}

fn config_error(err: config::ConfigError) -> ConfigError {
    use config::ConfigError as E;
    match err {
        E::Type {
            key: Some(key),
            unexpected,
            expected,
            ..
        } => ConfigError::new(key, format!("expected {expected}, found {unexpected}")),
        E::NotFound(key) => ConfigError::new(key, "missing"),
        E::FileParse { uri, cause } => ConfigError::new(
            uri.unwrap_or_else(|| "config file".into()),
            cause.to_string(),
        ),
        E::Message(message) => {
            // serde messages: "unknown field `x`, expected one of ..." or
            // "unknown variant `x` ... for key `environment`".
            let key = message
                .split("for key `")
                .nth(1)
                .and_then(|rest| rest.split('`').next())
                .map(str::to_owned)
                .or_else(|| {
                    message
                        .split("unknown field `")
                        .nth(1)
                        .and_then(|rest| rest.split('`').next())
                        .map(str::to_owned)
                })
                .unwrap_or_else(|| "configuration".into());
            ConfigError::new(key, message)
        }
        other => ConfigError::new("configuration", other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads with `vars`; the first problem when it fails.
    fn load(vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        load_all(vars).map_err(|mut e| e.0.remove(0))
    }

    fn load_all(vars: &[(&str, &str)]) -> Result<Settings, ConfigErrors> {
        let dir = std::env::temp_dir().join("subgate-config-test-empty");
        Settings::load_from(
            &dir,
            None,
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    /// Loading `vars` fails naming exactly `keys`, one line each.
    fn assert_refused_naming(vars: &[(&str, &str)], keys: &[&str]) {
        let err = load_all(vars).unwrap_err();
        let named: Vec<&str> = err.0.iter().map(|e| e.key.as_str()).collect();
        for key in keys {
            assert!(named.contains(key), "{key} missing from {named:?}");
        }
        assert_eq!(named.len(), keys.len(), "{err}");
        let text = err.to_string();
        assert_eq!(text.lines().count(), keys.len(), "{text}");
        assert!(text
            .lines()
            .all(|l| l.starts_with("invalid configuration: ")));
    }

    #[test]
    fn every_invalid_value_is_reported_at_once_one_line_each() {
        assert_refused_naming(
            &[
                ("SUBGATE__RATELIMIT__PUBLISH_PER_SECOND", "0"),
                ("SUBGATE__RATELIMIT__MESSAGES_BURST", "0"),
                ("SUBGATE__PRESENCE__REFRESH_SECONDS", "15"),
            ],
            &[
                "ratelimit.publish_per_second",
                "ratelimit.messages_burst",
                "presence.refresh_seconds",
            ],
        );
        assert_refused_naming(
            &[
                ("SUBGATE__ENVIRONMENT", "staging"),
                ("SUBGATE__LOG__FORMAT", "xml"),
            ],
            &["environment", "log.format"],
        );
    }

    #[test]
    fn every_key_of_the_wrong_type_or_name_is_reported_at_once() {
        assert_refused_naming(
            &[
                ("SUBGATE__SERVER__PORT", "not-a-port"),
                ("SUBGATE__HUB__SUBSCRIBER_QUEUE_CAPACITY", "many"),
                ("SUBGATE__SSE__RETRY_SECONDS", "soon"),
                ("SUBGATE__WEBSOCKET__PING_INTERVALL_SECONDS", "5"),
                ("SUBGATE__NO_SUCH_SECTION__KEY", "1"),
                ("SUBGATE__LOG__FORMAT", "xml"),
            ],
            &[
                "server.port",
                "hub.subscriber_queue_capacity",
                "sse.retry_seconds",
                "websocket.ping_intervall_seconds",
                "no_such_section",
                "log.format",
            ],
        );
    }

    #[test]
    fn account_limits_and_trusted_proxies_are_checked() {
        assert_refused_naming(
            &[
                ("SUBGATE__RATELIMIT__LOGIN_PER_SECOND", "0"),
                ("SUBGATE__RATELIMIT__LOGIN_EMAIL_BURST", "0"),
                ("SUBGATE__RATELIMIT__PUBLISH_AUTH_FAILURES_PER_SECOND", "-1"),
                ("SUBGATE__SERVER__TRUSTED_PROXIES", "10.0.0.0/8,proxy.local"),
            ],
            &[
                "ratelimit.login_per_second",
                "ratelimit.login_email_burst",
                "ratelimit.publish_auth_failures_per_second",
                "server.trusted_proxies",
            ],
        );
        let s = load(&[(
            "SUBGATE__SERVER__TRUSTED_PROXIES",
            "10.0.0.0/8, 192.0.2.7,::1",
        )])
        .unwrap();
        let proxies = s.trusted_proxies();
        assert_eq!(proxies.len(), 3);
        assert!(proxies[0].contains(&"10.1.2.3".parse::<std::net::IpAddr>().unwrap()));
        assert!(proxies[1].contains(&"192.0.2.7".parse::<std::net::IpAddr>().unwrap()));
        assert!(!proxies[1].contains(&"192.0.2.8".parse::<std::net::IpAddr>().unwrap()));
        let defaults = load(&[]).unwrap();
        assert!(
            defaults.trusted_proxies().is_empty(),
            "no proxy is trusted by default"
        );
        assert!(defaults.max_concurrent_password_hashes() >= 1);
        let two = load(&[("SUBGATE__AUTH__MAX_CONCURRENT_PASSWORD_HASHES", "2")]).unwrap();
        assert_eq!(two.max_concurrent_password_hashes(), 2);
    }

    #[test]
    fn each_redis_mode_asks_for_its_own_keys_and_refuses_the_others() {
        // Cluster: a seed is required, the prefix may not carry braces,
        // Sentinel's keys mean nothing there.
        assert_refused_naming(
            &[
                ("SUBGATE__REDIS__MODE", "cluster"),
                ("SUBGATE__REDIS__PREFIX", "{app}:"),
                ("SUBGATE__REDIS__SENTINEL_MASTER", "mymaster"),
            ],
            &["redis.url", "redis.prefix", "redis.sentinel_master"],
        );
        // Sentinel: the sentinels and the master's name are required; a
        // unix socket cannot be a master found through sentinels.
        assert_refused_naming(
            &[
                ("SUBGATE__REDIS__MODE", "sentinel"),
                ("SUBGATE__REDIS__URL", "unix:///tmp/redis.sock"),
                ("SUBGATE__REDIS__CLUSTER_URLS", "redis://10.0.0.2:7000"),
            ],
            &[
                "redis.url",
                "redis.cluster_urls",
                "redis.sentinel_urls",
                "redis.sentinel_master",
            ],
        );
        // Single: extra addresses would be ignored, so they are refused.
        assert_refused_naming(
            &[
                ("SUBGATE__REDIS__URL", "redis://127.0.0.1:6379"),
                ("SUBGATE__REDIS__SENTINEL_URLS", "redis://127.0.0.1:26379"),
                ("SUBGATE__REDIS__MODE", "primary"),
            ],
            &["redis.mode"],
        );
        let cluster = load(&[
            ("SUBGATE__REDIS__MODE", "cluster"),
            ("SUBGATE__REDIS__URL", "redis://10.0.0.1:7000"),
            (
                "SUBGATE__REDIS__CLUSTER_URLS",
                "redis://10.0.0.2:7000,redis://:pw@10.0.0.3:7000",
            ),
        ])
        .unwrap();
        assert_eq!(cluster.redis.mode, RedisMode::Cluster);
        assert_eq!(cluster.redis.cluster_urls.len(), 2);
        assert!(cluster.uses_redis());
        assert!(!cluster.redacted().to_string().contains(":pw@"));
        let sentinel = load(&[
            ("SUBGATE__REDIS__MODE", "sentinel"),
            (
                "SUBGATE__REDIS__SENTINEL_URLS",
                "redis://10.0.0.5:26379,redis://10.0.0.6:26379",
            ),
            ("SUBGATE__REDIS__SENTINEL_MASTER", "mymaster"),
        ])
        .unwrap();
        assert!(sentinel.uses_redis(), "sentinel mode needs no redis.url");
        assert_eq!(sentinel.redis.sentinel_urls.len(), 2);
    }

    #[test]
    fn defaults_are_the_embedded_node() {
        let s = load(&[]).unwrap();
        assert_eq!(s.server.host, "127.0.0.1");
        assert_eq!(s.server.port, 8080);
        assert!(s.redis.url.is_none());
        assert_eq!(s.environment, Environment::Development);
        assert_eq!(s.effective_jwt_secret(), Some(DEV_JWT_SECRET));
        assert!(s.introspection_enabled());
    }

    #[test]
    fn environment_variables_override() {
        let s = load(&[
            ("SUBGATE__SERVER__PORT", "0"),
            ("SUBGATE__REDIS__URL", "redis://127.0.0.1:7000"),
            ("SUBGATE__AUTH__JWT_SECRET", "s3cret"),
            (
                "SUBGATE__SERVER__ALLOWED_ORIGINS",
                "https://a.example,https://b.example",
            ),
        ])
        .unwrap();
        assert_eq!(s.server.port, 0);
        assert_eq!(s.redis.url.as_deref(), Some("redis://127.0.0.1:7000"));
        assert_eq!(s.effective_jwt_secret(), Some("s3cret"));
        assert_eq!(s.server.allowed_origins.len(), 2);
    }

    #[test]
    fn a_bad_value_names_its_key() {
        for (var, value, key) in [
            ("SUBGATE__SERVER__PORT", "70000", "server.port"),
            ("SUBGATE__ENVIRONMENT", "staging", "environment"),
            (
                "SUBGATE__AUTH__JWT_PUBLIC_KEY_FILE",
                "/nonexistent/key.pem",
                "auth.jwt_public_key_file",
            ),
            // Production has no development secret.
            ("SUBGATE__ENVIRONMENT", "production", "auth.jwt_secret"),
            (
                "SUBGATE__RATELIMIT__PUBLISH_PER_SECOND",
                "0",
                "ratelimit.publish_per_second",
            ),
            (
                "SUBGATE__RATELIMIT__MESSAGES_BURST",
                "0",
                "ratelimit.messages_burst",
            ),
            // Presence must renew within its TTL.
            (
                "SUBGATE__PRESENCE__REFRESH_SECONDS",
                "15",
                "presence.refresh_seconds",
            ),
        ] {
            let err = load(&[(var, value)]).unwrap_err();
            assert_eq!(err.key, key, "{var}={value}: {err}");
        }
    }

    #[test]
    fn durations_are_seconds_and_old_millisecond_keys_still_work_with_a_warning() {
        let s = load(&[("SUBGATE__REDIS__COMMAND_TIMEOUT_SECONDS", "0.25")]).unwrap();
        assert_eq!(s.redis.command_timeout_seconds, 0.25);
        assert!(s.loaded.deprecations.is_empty());
        let s = load(&[
            ("SUBGATE__REDIS__MAX_BACKOFF_MS", "200"),
            ("SUBGATE__SSE__RETRY_MS", "1500"),
        ])
        .unwrap();
        assert_eq!(s.redis.max_backoff_seconds, 0.2);
        assert_eq!(s.sse.retry_seconds, 1.5);
        assert_eq!(
            s.loaded.deprecations.len(),
            2,
            "{:?}",
            s.loaded.deprecations
        );
        assert!(s
            .loaded
            .deprecations
            .iter()
            .any(|w| w.contains("redis.max_backoff_seconds")));
        let both_names = [
            ("SUBGATE__REDIS__MAX_BACKOFF_MS", "200"),
            ("SUBGATE__REDIS__MAX_BACKOFF_SECONDS", "0.3"),
        ];
        assert_eq!(load(&both_names).unwrap_err().key, "redis.max_backoff_ms");
        let err = load(&[("SUBGATE__PRESENCE__SWEEP_INTERVAL_SECONDS", "0")]).unwrap_err();
        assert_eq!(err.key, "presence.sweep_interval_seconds", "{err}");
    }

    #[test]
    fn production_with_a_secret_serves_no_introspection() {
        let s = load(&[
            ("SUBGATE__ENVIRONMENT", "production"),
            (
                "SUBGATE__AUTH__JWT_SECRET",
                "0123456789abcdef0123456789abcdef",
            ),
        ])
        .unwrap();
        assert!(!s.introspection_enabled());
    }

    #[test]
    fn production_is_chosen_by_either_name_and_brings_its_defaults() {
        let secret = (
            "SUBGATE__AUTH__JWT_SECRET",
            "0123456789abcdef0123456789abcdef",
        );
        for chosen in [
            ("SUBGATE_ENV", "production"),
            ("SUBGATE__ENVIRONMENT", "production"),
        ] {
            let s = load(&[chosen, secret]).unwrap();
            assert_eq!(s.environment, Environment::Production, "{chosen:?}");
            assert_eq!(s.server.drain_grace_seconds, 5, "{chosen:?}");
            assert_eq!(s.server.drain_timeout_seconds, 25, "{chosen:?}");
            assert_eq!(s.log.format, LogFormat::Json, "{chosen:?}");
            assert!(!s.introspection_enabled());
            // Still overridable, key by key.
            let s = load(&[
                chosen,
                secret,
                ("SUBGATE__SERVER__DRAIN_GRACE_SECONDS", "1"),
            ])
            .unwrap();
            assert_eq!(s.server.drain_grace_seconds, 1);
        }
        assert_refused_naming(&[("SUBGATE_ENV", "production")], &["auth.jwt_secret"]);
        assert_refused_naming(
            &[
                ("SUBGATE_ENV", "production"),
                ("SUBGATE__AUTH__JWT_SECRET", DEV_JWT_SECRET),
            ],
            &["auth.jwt_secret"],
        );
        assert_refused_naming(
            &[
                ("SUBGATE_ENV", "development"),
                ("SUBGATE__ENVIRONMENT", "production"),
                secret,
            ],
            &["environment"],
        );
        assert_refused_naming(&[("SUBGATE_ENV", "staging")], &["SUBGATE_ENV"]);
        let s = load(&[("SUBGATE_ENV", "development")]).unwrap();
        assert_eq!(s.environment, Environment::Development);
        assert_eq!(s.server.drain_grace_seconds, 0);
    }

    #[test]
    fn redaction_hides_every_secret_and_nothing_else() {
        let s = load(&[
            ("SUBGATE__AUTH__JWT_SECRET", "jwt-secret-value"),
            (
                "SUBGATE__PUBLISH__API_KEYS",
                "key-one-0123456789,key-two-0123456789",
            ),
            (
                "SUBGATE__REDIS__URL",
                "redis://user:pa:ss@db.example:6379/2",
            ),
        ])
        .unwrap();
        let text = s.redacted().to_string();
        for secret in ["jwt-secret-value", "key-one", "key-two", "pa:ss"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert!(
            text.contains("redis://user:<redacted>@db.example:6379/2"),
            "{text}"
        );
        assert_eq!(
            redact_url_password("redis://db.example:6379", "x"),
            "redis://db.example:6379"
        );
        assert_eq!(
            redact_url_password("redis://:pw@h/0", "x"),
            "redis://:x@h/0"
        );
    }

    #[test]
    fn rates_may_be_fractional() {
        let s = load(&[("SUBGATE__RATELIMIT__MESSAGES_PER_SECOND", "2.5")]).unwrap();
        assert_eq!(s.ratelimit.messages_per_second, 2.5);
    }

    #[test]
    fn every_shipped_config_file_parses() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for entry in std::fs::read_dir(root.join("config")).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let settings: Settings = config::Config::builder()
                .add_source(config::File::from_str(&text, config::FileFormat::Toml))
                .build()
                .and_then(|c| c.try_deserialize())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(settings.server.port > 0, "{}", path.display());
        }
    }
}
