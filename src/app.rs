//! The composition root: builds [`AppState`] once and the HTTP service.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpServer};

use crate::auth::Authenticator;
use crate::broker::{memory::MemoryBroker, Broker};
use crate::config::{ConfigError, Settings};
use crate::graphql::{self, AppSchema};
use crate::hub::Hub;
use crate::shutdown::Shutdown;
use crate::store::{memory::MemoryStore, Store};
use crate::telemetry::{health, metrics::Metrics};
use crate::transport;

/// Everything a request handler may need, built once per node.
#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub store: Arc<dyn Store>,
    pub hub: Arc<Hub>,
    pub auth: Arc<Authenticator>,
    pub schema: AppSchema,
    pub metrics: Arc<Metrics>,
    pub shutdown: Shutdown,
}

impl AppState {
    /// Builds the node: the memory bus and store unless `redis.url` is set.
    pub fn build(settings: Settings) -> Result<Self, ConfigError> {
        let settings = Arc::new(settings);
        let metrics = Arc::new(Metrics::new());
        let auth = Arc::new(Authenticator::from_settings(&settings)?);
        if settings.redis.url.is_some() {
            return Err(ConfigError {
                key: "redis.url".into(),
                message: "the Redis bus and store are not available in this build yet; unset redis.url".into(),
            });
        }
        let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new());
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let hub = Hub::new(broker, metrics.clone(), settings.hub.subscriber_queue_capacity);
        let schema = graphql::build_schema(graphql::SchemaDeps {
            settings: settings.clone(),
            store: store.clone(),
            hub: hub.clone(),
            auth: auth.clone(),
            metrics: metrics.clone(),
        });
        Ok(Self { settings, store, hub, auth, schema, metrics, shutdown: Shutdown::new() })
    }
}

/// Routes of a node.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(health::healthz))
        .route("/readyz", web::get().to(health::readyz))
        .route("/metrics", web::get().to(health::metrics));
    transport::configure(cfg);
}

/// Serves on `listener` until SIGTERM/SIGINT, then drains.
pub async fn serve(state: AppState, listener: TcpListener) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    let workers = match state.settings.server.workers {
        0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        n => n,
    };
    let drain_timeout = Duration::from_secs(state.settings.server.drain_timeout_seconds);
    let drain_grace = Duration::from_secs(state.settings.server.drain_grace_seconds).min(drain_timeout);
    let data = web::Data::new(state.clone());
    let server = HttpServer::new(move || App::new().app_data(data.clone()).configure(routes))
        .workers(workers)
        // Long-lived connections are closed by the drain itself; this bounds
        // what actix waits for after that.
        .shutdown_timeout(drain_timeout.as_secs().max(1))
        .disable_signals()
        .listen(listener)?
        .run();
    let signals = crate::shutdown::Signals::install()?;
    tracing::info!(%addr, "listening on {addr}");
    let handle = server.handle();
    let shutdown = state.shutdown.clone();
    tokio::spawn(async move {
        signals.recv().await;
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
    });
    server.await?;
    tracing::info!("stopped");
    Ok(())
}
