//! The one Redis layer: what the broker, the store and presence share to
//! reach Redis.
//!
//! - [`RedisConfig`]: the `redis` settings, read once, for the command pool
//!   and the broker's Pub/Sub connection alike.
//! - [`Redis`]: the node's handle: one deadpool-redis pool, and
//!   [`Redis::call`], the only way a command reaches Redis. Every call
//!   takes a pooled connection and sends one request (a command, a
//!   pipeline or a script) under one deadline, `redis.command_timeout_seconds`;
//!   its latency is recorded in
//!   `subgate_redis_command_duration_seconds{command}`; a broken or hung
//!   connection is dropped rather than pooled again; and the outcome feeds
//!   [`Redis::readiness`], which `/readyz` reports for every component on
//!   the layer. Failures come back as a [`CallError`] that says whether
//!   Redis is unreachable or refused the request.
//! - [`Redis::pubsub`]: the dedicated Pub/Sub connection the broker holds
//!   (a pool cannot share one), made from the same settings under the same
//!   deadline.
//! - [`Keys`]: the key layout, every key and channel name under
//!   `redis.prefix`, in one table.
//! - [`Script`]: Lua scripts, hashed once and loaded into Redis once.
//!
//! Nothing connects while the layer is built: a node starts while Redis is
//! down, reports it through readiness, and serves once Redis answers. Only
//! settings that cannot work fail at build time, as a [`SetupError`].

mod call;
mod health;
mod keys;
mod script;
mod sentinel;
mod settings;

use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_redis::{Connection, Manager, Pool, Runtime};
use redis::aio::ConnectionLike;
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, FromRedisValue, RedisResult};

pub use call::{CallError, Request};
pub use keys::{slot_of, Keys};
pub use script::Script;
pub use settings::{RedisConfig, SetupError, Topology};

use crate::telemetry::metrics::Metrics;
use health::Health;

/// A node's way to Redis; cheap to clone, every clone shares one pool and
/// one health.
#[derive(Clone)]
pub struct Redis {
    inner: Arc<Inner>,
}

struct Inner {
    config: RedisConfig,
    keys: Keys,
    /// The parsed URL, for connections outside the pool (Pub/Sub).
    client: redis::Client,
    commands: Commands,
    health: Health,
    metrics: Arc<Metrics>,
}

/// Where commands go, by `redis.mode`.
enum Commands {
    /// One server: a pool of connections to `redis.url`.
    Single(Pool),
    /// The master the sentinels name: a pool whose connections are made to
    /// the master of the moment.
    Sentinel {
        pool: sentinel::MasterPool,
        master: Arc<sentinel::Master>,
    },
    /// Redis Cluster: one multiplexed connection per node, each command
    /// routed to the node that owns its key's slot (MOVED and ASK followed
    /// by the client), made at the first call.
    Cluster {
        client: ClusterClient,
        connection: tokio::sync::Mutex<Option<ClusterConnection>>,
    },
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // RedisConfig's Debug leaves the URL (and its password) out.
        f.debug_struct("Redis")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Redis {
    /// The layer for `config`. Connects lazily: only settings that cannot
    /// work fail here.
    pub fn new(config: RedisConfig, metrics: Arc<Metrics>) -> Result<Self, SetupError> {
        let client = redis::Client::open(config.url.as_str()).map_err(SetupError::InvalidUrl)?;
        // The call's deadline bounds every command, so the client's own
        // shorter response timeout is turned off; connecting keeps a bound
        // of its own because the pool may also connect outside any call.
        let connection = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(config.command_timeout))
            .set_response_timeout(None);
        let commands = match &config.topology {
            Topology::Single => {
                let manager =
                    Manager::new_with_config(client.get_connection_info().clone(), connection)
                        .map_err(SetupError::InvalidUrl)?;
                let pool = Pool::builder(manager)
                    // A pool of zero would make every call wait for the timeout.
                    .max_size(config.pool_size.max(1))
                    .wait_timeout(Some(config.command_timeout))
                    .create_timeout(Some(config.command_timeout))
                    .recycle_timeout(Some(config.command_timeout))
                    .runtime(Runtime::Tokio1)
                    .build()
                    .map_err(SetupError::Pool)?;
                Commands::Single(pool)
            }
            Topology::Sentinel { sentinels, master } => {
                let master = Arc::new(sentinel::Master::new(sentinels, master, &config.url)?);
                let manager = sentinel::MasterManager {
                    master: master.clone(),
                    config: connection,
                };
                let pool = deadpool::managed::Pool::builder(manager)
                    .max_size(config.pool_size.max(1))
                    .wait_timeout(Some(config.command_timeout))
                    .create_timeout(Some(config.command_timeout))
                    .recycle_timeout(Some(config.command_timeout))
                    .runtime(deadpool::Runtime::Tokio1)
                    .build()
                    .map_err(|e| SetupError::Pool(deadpool_redis::BuildError::from(e)))?;
                Commands::Sentinel { pool, master }
            }
            Topology::Cluster { seeds } => Commands::Cluster {
                client: cluster_client(
                    &config,
                    seeds,
                    None::<tokio::sync::mpsc::UnboundedSender<redis::PushInfo>>,
                )?,
                connection: tokio::sync::Mutex::new(None),
            },
        };
        Ok(Self {
            inner: Arc::new(Inner {
                keys: Keys::with_tags(
                    config.prefix.clone(),
                    matches!(config.topology, Topology::Cluster { .. }),
                ),
                config,
                client,
                commands,
                health: Health::default(),
                metrics,
            }),
        })
    }

    pub fn config(&self) -> &RedisConfig {
        &self.inner.config
    }

    pub fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    /// Sends `request` on a pooled connection; `command` labels its latency
    /// in `subgate_redis_command_duration_seconds` (a fixed, bounded set).
    pub async fn call<'a, T: FromRedisValue>(
        &self,
        command: &'static str,
        request: impl Into<Request<'a>>,
    ) -> Result<T, CallError> {
        let started = Instant::now();
        let outcome = self.attempt(request.into()).await;
        self.inner
            .metrics
            .redis_command_duration_seconds
            .with_label_values(&[command])
            .observe(started.elapsed().as_secs_f64());
        self.record(&outcome);
        outcome
    }

    /// Takes a connection and sends the request, both within one deadline.
    async fn attempt<T: FromRedisValue>(&self, request: Request<'_>) -> Result<T, CallError> {
        let deadline = tokio::time::Instant::now() + self.inner.config.command_timeout;
        let late = || self.too_late();
        match &self.inner.commands {
            Commands::Single(pool) => {
                let mut conn = match tokio::time::timeout_at(deadline, pool.get()).await {
                    Ok(got) => got.map_err(CallError::from_pool)?,
                    Err(_) => return Err(late()),
                };
                let outcome = send(request, &mut conn, deadline)
                    .await
                    .map_err(|e| e.or(late()));
                if matches!(outcome, Err(CallError::Unreachable(_))) {
                    // A broken or hung connection must not go back to the
                    // pool for the next caller to trip over (or to wait on
                    // while recycling).
                    drop(Connection::take(conn));
                }
                outcome
            }
            Commands::Sentinel { pool, .. } => {
                let mut conn = match tokio::time::timeout_at(deadline, pool.get()).await {
                    Ok(Ok(conn)) => conn,
                    Ok(Err(deadpool::managed::PoolError::Backend(e))) => {
                        return Err(CallError::from_redis(e))
                    }
                    Ok(Err(other)) => {
                        return Err(CallError::Unreachable(format!(
                            "no pooled connection: {other}"
                        )))
                    }
                    Err(_) => return Err(late()),
                };
                let outcome = send(request, &mut *conn, deadline)
                    .await
                    .map_err(|e| e.or(late()));
                if matches!(outcome, Err(CallError::Unreachable(_))) {
                    // Also what a demoted master's READONLY comes to: the
                    // next connection asks the sentinels again.
                    drop(deadpool::managed::Object::take(conn));
                }
                outcome
            }
            Commands::Cluster { client, connection } => {
                let mut conn = {
                    let mut held = match tokio::time::timeout_at(deadline, connection.lock()).await
                    {
                        Ok(held) => held,
                        Err(_) => return Err(late()),
                    };
                    match &*held {
                        Some(conn) => conn.clone(),
                        None => {
                            let made =
                                tokio::time::timeout_at(deadline, client.get_async_connection())
                                    .await
                                    .map_err(|_| late())?
                                    .map_err(CallError::from_redis)?;
                            *held = Some(made.clone());
                            made
                        }
                    }
                };
                send(request, &mut conn, deadline)
                    .await
                    .map_err(|e| e.or(late()))
            }
        }
    }

    /// Bounds `fut`, work on a connection of the caller's own (Pub/Sub), by
    /// the same deadline and reads its failure the same way as a call.
    pub async fn bounded<T>(
        &self,
        fut: impl std::future::Future<Output = RedisResult<T>>,
    ) -> Result<T, CallError> {
        let outcome = match tokio::time::timeout(self.inner.config.command_timeout, fut).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(CallError::from_redis(e)),
            Err(_) => Err(self.too_late()),
        };
        self.record(&outcome);
        outcome
    }

    /// A dedicated Pub/Sub connection, from the same settings: to
    /// `redis.url`, or in Sentinel mode to the master the sentinels name
    /// now. (Redis Cluster's sharded Pub/Sub has its own connection, see
    /// [`Redis::cluster_pubsub`].)
    pub async fn pubsub(&self) -> Result<redis::aio::PubSub, CallError> {
        match &self.inner.commands {
            Commands::Sentinel { master, .. } => {
                self.bounded(async {
                    let client = master.client().await?;
                    client.get_async_pubsub().await
                })
                .await
            }
            _ => self.bounded(self.inner.client.get_async_pubsub()).await,
        }
    }

    /// A cluster connection of its own for sharded Pub/Sub (RESP3): every
    /// push it receives (messages, subscription confirmations, the server
    /// ending a subscription, a node's connection dropping) goes to `pushes`.
    pub async fn cluster_pubsub(
        &self,
        pushes: impl redis::aio::AsyncPushSender,
    ) -> Result<ClusterConnection, CallError> {
        let Topology::Cluster { seeds } = &self.inner.config.topology else {
            return Err(CallError::Refused("not in redis.mode = cluster".into()));
        };
        let client = cluster_client(&self.inner.config, seeds, Some(pushes))
            .map_err(|e| CallError::Refused(e.to_string()))?;
        self.bounded(client.get_async_connection()).await
    }

    /// Which Redis this node uses, for readiness: the mode and, in
    /// Sentinel mode, the master reached last.
    pub fn describe(&self) -> String {
        match &self.inner.commands {
            Commands::Single(_) => "single".to_owned(),
            Commands::Cluster { .. } => "cluster".to_owned(),
            Commands::Sentinel { master, .. } => match master.current() {
                Some(addr) => format!("sentinel, master {} at {addr}", master.name()),
                None => format!("sentinel, master {} not reached yet", master.name()),
            },
        }
    }

    /// One round trip; see [`Redis::watch`].
    pub async fn ping(&self) -> Result<(), CallError> {
        let _: String = self.call("ping", &redis::cmd("PING")).await?;
        Ok(())
    }

    /// Pings Redis every `every` for as long as the node runs, so that
    /// readiness follows Redis even while no request arrives.
    pub fn watch(&self, every: Duration) {
        let layer = self.clone();
        let restarts = self.inner.metrics.task_restarts_total.clone();
        crate::supervise::spawn("redis_health", restarts, move || {
            let layer = layer.clone();
            async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    let _ = layer.ping().await;
                }
            }
        })
        .detach();
    }

    /// `Err(why)` while the last call could not reach Redis. Before the
    /// first call nothing is known to be wrong, and it is `Ok`.
    pub fn readiness(&self) -> Result<(), String> {
        self.inner.health.check()
    }

    fn record<T>(&self, outcome: &Result<T, CallError>) {
        match outcome {
            Err(e @ CallError::Unreachable(_)) => self.inner.health.down(&e.to_string()),
            // Redis answered, so it is reachable.
            Ok(_) | Err(CallError::Refused(_)) => self.inner.health.up(),
        }
    }

    fn too_late(&self) -> CallError {
        CallError::Unreachable(format!(
            "no answer within {:?}",
            self.inner.config.command_timeout
        ))
    }
}

/// Sends `request` on `conn` before `deadline`; `Err(None)` when the
/// deadline passed first.
async fn send<T: FromRedisValue, C: ConnectionLike + Send>(
    request: Request<'_>,
    conn: &mut C,
    deadline: tokio::time::Instant,
) -> Result<T, Late> {
    let sent = async {
        match request {
            Request::Cmd(cmd) => cmd.query_async(conn).await,
            Request::Pipe(pipe) => pipe.query_async(conn).await,
            Request::Script(script) => script.invoke_async(conn).await,
        }
    };
    match tokio::time::timeout_at(deadline, sent).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(Late(Some(CallError::from_redis(e)))),
        Err(_) => Err(Late(None)),
    }
}

/// A failed send: the error, or `None` when the deadline passed first.
struct Late(Option<CallError>);

impl Late {
    fn or(self, late: CallError) -> CallError {
        self.0.unwrap_or(late)
    }
}

/// A Redis Cluster client for `config.url` and `seeds`, under the layer's
/// timeouts; with `pushes`, a RESP3 client whose pushes go there.
fn cluster_client(
    config: &RedisConfig,
    seeds: &[String],
    pushes: Option<impl redis::aio::AsyncPushSender>,
) -> Result<ClusterClient, SetupError> {
    let mut nodes = vec![config.url.clone()];
    nodes.extend(seeds.iter().cloned());
    // Few retries inside the client: a request for a shard that is down
    // fails within the call's deadline (the caller decides what next)
    // instead of reconnecting to the seeds over and over.
    let mut builder = ClusterClientBuilder::new(nodes)
        .connection_timeout(config.command_timeout)
        .response_timeout(config.command_timeout)
        .retries(3);
    if let Some(pushes) = pushes {
        builder = builder
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(pushes);
    }
    builder
        .build()
        .map_err(|source| SetupError::InvalidNodeUrl {
            key: "redis.cluster_urls",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{free_port, RedisServer};

    fn layer(url: &str) -> Redis {
        let mut config = RedisConfig::new(url, "t:");
        config.command_timeout = Duration::from_millis(300);
        Redis::new(config, Arc::new(Metrics::new())).unwrap()
    }

    #[test]
    fn a_url_that_does_not_parse_is_a_typed_error_naming_the_setting() {
        let config = RedisConfig::new("redis://127.0.0.1:notaport", "t:");
        let err = Redis::new(config, Arc::new(Metrics::new())).unwrap_err();
        assert!(matches!(err, SetupError::InvalidUrl(_)), "{err:?}");
        let message = err.to_string();
        assert!(message.starts_with("redis.url: "), "{message}");
        assert_eq!(message.lines().count(), 1, "{message}");
    }

    #[test]
    fn the_url_stays_out_of_debug_output() {
        let r = layer("redis://:secret@127.0.0.1:1/");
        assert!(!format!("{r:?}").contains("secret"));
    }

    #[tokio::test]
    async fn health_follows_calls_and_every_call_is_timed_by_label() {
        let port = free_port();
        let metrics = Arc::new(Metrics::new());
        let mut config = RedisConfig::new(format!("redis://127.0.0.1:{port}/"), "t:");
        config.command_timeout = Duration::from_millis(300);
        let r = Redis::new(config, metrics.clone()).unwrap();
        assert!(r.readiness().is_ok(), "nothing is known before a call");
        assert!(matches!(r.ping().await, Err(CallError::Unreachable(_))));
        assert!(r.readiness().unwrap_err().contains("Redis"));

        let _server = RedisServer::start_on(port);
        r.ping().await.unwrap();
        assert!(r.readiness().is_ok());
        // A request Redis refuses says nothing against its reachability.
        let refused: Result<String, _> = r.call("test", &redis::cmd("NOSUCHCOMMAND")).await;
        assert!(matches!(refused, Err(CallError::Refused(_))), "{refused:?}");
        assert!(r.readiness().is_ok());
        let timed = metrics
            .redis_command_duration_seconds
            .with_label_values(&["ping"])
            .get_sample_count();
        assert_eq!(timed, 2);
    }

    #[tokio::test]
    async fn scripts_are_loaded_again_into_a_server_that_lost_them() {
        static ECHO: Script = Script::new("return ARGV[1]");
        let server = RedisServer::start();
        let r = layer(&server.url());
        let mut inv = ECHO.invocation();
        inv.arg("one");
        let got: String = r.call("test", &inv).await.unwrap();
        assert_eq!(got, "one");
        let mut flush = redis::cmd("SCRIPT");
        flush.arg("FLUSH");
        let _: () = r.call("test", &flush).await.unwrap();
        let got: String = r.call("test", &inv).await.unwrap();
        assert_eq!(got, "one");
    }
}
