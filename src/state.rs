//! The state every request handler shares, built once per node by
//! [`crate::app::build`]. It names the components it holds and depends on
//! nothing above them: transports import it, it imports no transport.

use std::sync::Arc;

use crate::auth::Authenticator;
use crate::config::Settings;
use crate::domain::Domain;
use crate::graphql::groups::Groups;
use crate::graphql::AppSchema;
use crate::hub::Hub;
use crate::presence::Presence;
use crate::ratelimit::Limits;
use crate::shutdown::Shutdown;
use crate::store::Store;
use crate::telemetry::metrics::Metrics;
use crate::user_connections::UserConnections;

/// Everything a request handler may need, built once per node.
#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    /// The domain's operations, shared by every transport.
    pub domain: Arc<Domain>,
    pub store: Arc<dyn Store>,
    pub hub: Arc<Hub>,
    pub auth: Arc<Authenticator>,
    pub schema: AppSchema,
    /// Identical GraphQL subscriptions, each executed once per event.
    pub groups: Arc<Groups<AppSchema>>,
    pub metrics: Arc<Metrics>,
    /// Shared rate limiters: per user, per publisher, typing; and the
    /// factory of per-connection buckets.
    pub limits: Arc<Limits>,
    /// Who is online where: Redis when `redis.url` is set.
    pub presence: Arc<dyn Presence>,
    pub shutdown: Shutdown,
    /// `server.max_connections_per_user`: fleet-wide on Redis.
    pub user_connections: Arc<UserConnections>,
}
