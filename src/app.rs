//! The composition root: builds the node's [`AppState`] once from its
//! settings, mounts the transports and serves until the drain ends.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::web;

use crate::auth::Authenticator;
use crate::broker::redis::RedisBroker;
use crate::broker::{memory::MemoryBroker, Broker, HistoryLimits};
use crate::config::{ConfigError, Settings};
use crate::domain::Domain;
use crate::graphql;
use crate::hub::Hub;
use crate::infra::redis::{Redis, RedisConfig, SetupError};
use crate::presence::redis::{RedisPresence, RedisPresenceOptions};
use crate::presence::{memory::MemoryPresence, Presence};
use crate::ratelimit::Limits;
use crate::shutdown::Shutdown;
use crate::state::AppState;
use crate::store::{memory::MemoryStore, redis::RedisStore, Store};
use crate::telemetry::metrics::Metrics;
use crate::transport;
use crate::user_connections::UserConnections;

/// Why a node could not be built; each message is one line naming the
/// setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("invalid configuration: {0}")]
    Redis(#[from] SetupError),
}

/// Builds the node: the memory bus and store unless `redis.url` is set.
pub fn build(settings: Settings) -> Result<AppState, BuildError> {
    let settings = Arc::new(settings);
    let metrics = Arc::new(Metrics::new());
    let auth = Arc::new(Authenticator::from_settings(&settings)?);
    let redis = match RedisConfig::from_settings(&settings.redis) {
        Some(config) => {
            let redis = Redis::new(config, metrics.clone())?;
            // Readiness follows Redis even while no request comes: a ping
            // now, then every second.
            redis.watch(Duration::from_secs(1));
            Some(redis)
        }
        None => None,
    };
    let history = HistoryLimits {
        size: settings.history.size,
        ttl: Duration::from_secs(settings.history.ttl_seconds),
    };
    let (broker, store): (Arc<dyn Broker>, Arc<dyn Store>) = match &redis {
        Some(redis) => (
            Arc::new(RedisBroker::new(redis.clone(), history, metrics.clone())),
            Arc::new(RedisStore::new(redis.clone())),
        ),
        None => (
            Arc::new(
                MemoryBroker::new(history.size, history.ttl).with_max_topics(
                    settings.history.max_topics,
                    metrics.history_evictions_total.clone(),
                ),
            ),
            Arc::new(MemoryStore::new()),
        ),
    };
    let hub = Hub::new(
        broker,
        metrics.clone(),
        settings.hub.subscriber_queue_capacity,
    );
    let presence_ttl = Duration::from_secs(settings.presence.ttl_seconds);
    // Leases of the per-user connection counts follow presence's timing:
    // both say "this node still holds these users".
    let user_connections = Arc::new(UserConnections::new(
        settings.server.max_connections_per_user,
        redis.clone().map(|redis| {
            (
                redis,
                presence_ttl,
                Duration::from_secs(settings.presence.refresh_seconds),
            )
        }),
        metrics.clone(),
    ));
    let presence: Arc<dyn Presence> = match redis {
        Some(redis) => {
            let options = RedisPresenceOptions {
                ttl: presence_ttl,
                refresh: Duration::from_secs(settings.presence.refresh_seconds),
                sweep_interval: Duration::from_secs_f64(settings.presence.sweep_interval_seconds),
            };
            Arc::new(RedisPresence::new(
                redis,
                options,
                hub.clone(),
                metrics.clone(),
            ))
        }
        None => Arc::new(MemoryPresence::new(hub.clone(), &metrics, presence_ttl)),
    };
    let limits = Arc::new(Limits::new(
        &settings.ratelimit,
        settings.max_concurrent_password_hashes(),
        &metrics,
    ));
    let domain = Arc::new(Domain {
        store: store.clone(),
        hub: hub.clone(),
        auth: auth.clone(),
        limits: limits.clone(),
        login_token_ttl: Duration::from_secs(settings.auth.login_token_ttl_seconds),
        unknown_email_hash: crate::domain::users::unknown_email_hash(),
        max_payload_bytes: settings.publish.max_payload_bytes,
    });
    let schema = graphql::build_schema(graphql::SchemaDeps {
        settings: settings.clone(),
        domain: domain.clone(),
        store: store.clone(),
        hub: hub.clone(),
        auth: auth.clone(),
        metrics: metrics.clone(),
        presence: presence.clone(),
    });
    let groups = graphql::groups::Groups::new(
        schema.clone(),
        store.clone(),
        metrics.clone(),
        settings.hub.subscriber_queue_capacity,
    );
    Ok(AppState {
        settings,
        domain,
        store,
        hub,
        auth,
        schema,
        groups,
        metrics,
        limits,
        presence,
        shutdown: Shutdown::new(),
        user_connections,
    })
}

/// Routes of a node.
pub fn routes(cfg: &mut web::ServiceConfig) {
    transport::configure(cfg);
}

/// Serves on `listener` until SIGTERM/SIGINT, then drains.
pub async fn serve(state: AppState, listener: TcpListener) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    let workers = state.settings.http_workers();
    let drain_timeout = Duration::from_secs(state.settings.server.drain_timeout_seconds);
    let drain_grace =
        Duration::from_secs(state.settings.server.drain_grace_seconds).min(drain_timeout);
    let data = web::Data::new(state.clone());
    let settings = transport::server::ServerSettings {
        workers,
        // Sockets of every kind, per worker: a worker at its share stops
        // accepting (the kernel's backlog waits) instead of running out of
        // descriptors, which would cost `/healthz` and Redis theirs.
        max_sockets_per_worker: state
            .settings
            .loaded
            .capacity
            .map(|c| c.max_sockets_per_worker),
        // Long-lived connections are closed by the drain itself; this bounds
        // what actix waits for after that.
        shutdown_timeout: drain_timeout,
    };
    let upgrades = {
        let state = state.clone();
        move |upgrade| transport::upgrade(state.clone(), upgrade)
    };
    let server = transport::server::start(
        listener,
        settings,
        move |cfg: &mut web::ServiceConfig| {
            cfg.app_data(data.clone());
            routes(cfg);
        },
        upgrades,
    )?;
    let mut signals = Some(crate::shutdown::Signals::install()?);
    tracing::info!(%addr, "listening on {addr}");
    let handle = server.handle();
    let shutdown = state.shutdown.clone();
    // Supervised: a drain task that died would leave a node that ignores
    // SIGTERM. A restarted run listens again (handlers installed anew),
    // or goes straight on with a drain already begun.
    let drain = crate::supervise::spawn(
        "drain",
        state.metrics.task_restarts_total.clone(),
        move || {
            let first = signals.take();
            let shutdown = shutdown.clone();
            let handle = handle.clone();
            async move {
                if !shutdown.is_draining() {
                    let signals = match first {
                        Some(signals) => signals,
                        None => match crate::shutdown::Signals::install() {
                            Ok(signals) => signals,
                            Err(e) => panic!("cannot listen for stop signals: {e}"),
                        },
                    };
                    signals.recv().await;
                }
                tracing::info!(
                    open = shutdown.open_connections(),
                    "shutdown requested: draining for at most {}s",
                    drain_timeout.as_secs()
                );
                shutdown.begin();
                let grace_until = tokio::time::Instant::now() + drain_grace;
                let left = shutdown.drained(drain_timeout).await;
                tokio::time::sleep_until(grace_until).await;
                if left > 0 {
                    tracing::warn!(left, "drain timeout passed with connections still open");
                }
                // Graceful only when everything drained: after the drain timeout,
                // what is left is dropped rather than waited for again.
                handle.stop(left == 0).await;
                // Done: the server stops, and this task must not count as dead.
                std::future::pending::<()>().await;
            }
        },
    );
    server.await?;
    drop(drain);
    tracing::info!("stopped");
    Ok(())
}
