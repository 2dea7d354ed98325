//! Sentinel mode: connections go to whichever server the sentinels name as
//! the master of `redis.sentinel_master`, asked anew for every connection
//! made, so that after a failover the next connection reaches the new
//! master. A connection to a server that is no longer master fails its
//! next write (`READONLY`) or breaks, is dropped by the layer, and the next
//! one asks the sentinels again.

use std::sync::Mutex;

use deadpool::managed::{self, Metrics as PoolMetrics, RecycleResult};
use redis::aio::MultiplexedConnection;
use redis::sentinel::{Sentinel, SentinelNodeConnectionInfo};
use redis::{AsyncConnectionConfig, IntoConnectionInfo, RedisError, RedisResult};

use super::settings::SetupError;

/// The master the sentinels name, and the one last reached.
pub(super) struct Master {
    sentinels: tokio::sync::Mutex<Sentinel>,
    name: String,
    /// Credentials, database and TLS of the master connections.
    node: SentinelNodeConnectionInfo,
    /// `host:port` of the master last connected to.
    current: Mutex<Option<String>>,
}

impl Master {
    /// `sentinels`: their URLs; `name`: the monitored master's name; `url`:
    /// lends its credentials and database to the master connections.
    pub(super) fn new(sentinels: &[String], name: &str, url: &str) -> Result<Self, SetupError> {
        let invalid = |key: &'static str| move |source| SetupError::InvalidNodeUrl { key, source };
        let sentinels =
            Sentinel::build(sentinels.to_vec()).map_err(invalid("redis.sentinel_urls"))?;
        let info = url.into_connection_info().map_err(SetupError::InvalidUrl)?;
        let mut node = SentinelNodeConnectionInfo::default()
            .set_redis_connection_info(info.redis_settings().clone());
        if url.starts_with("rediss://") {
            node = node.set_tls_mode(redis::TlsMode::Secure);
        }
        Ok(Self {
            sentinels: tokio::sync::Mutex::new(sentinels),
            name: name.trim().to_owned(),
            node,
            current: Mutex::new(None),
        })
    }

    /// A client of the master the sentinels name now (they are asked, and
    /// the master is checked to consider itself one).
    pub(super) async fn client(&self) -> RedisResult<redis::Client> {
        let client = self
            .sentinels
            .lock()
            .await
            .async_master_for(&self.name, Some(&self.node))
            .await?;
        let addr = client.get_connection_info().addr().to_string();
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.as_deref() != Some(addr.as_str()) {
            tracing::info!(master = %addr, name = %self.name, "redis sentinel: using master");
            *current = Some(addr);
        }
        Ok(client)
    }

    /// `host:port` of the master last reached, if any.
    pub(super) fn current(&self) -> Option<String> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(super) fn name(&self) -> &str {
        &self.name
    }
}

/// Makes the pool's connections to the master of the moment.
pub(super) struct MasterManager {
    pub(super) master: std::sync::Arc<Master>,
    pub(super) config: AsyncConnectionConfig,
}

impl managed::Manager for MasterManager {
    type Type = MultiplexedConnection;
    type Error = RedisError;

    async fn create(&self) -> Result<MultiplexedConnection, RedisError> {
        let client = self.master.client().await?;
        client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await
    }

    async fn recycle(
        &self,
        conn: &mut MultiplexedConnection,
        _: &PoolMetrics,
    ) -> RecycleResult<RedisError> {
        let _: String = redis::cmd("PING").query_async(conn).await?;
        Ok(())
    }
}

pub(super) type MasterPool = managed::Pool<MasterManager>;
