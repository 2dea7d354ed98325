//! The GraphQL schema: queries, mutations, subscriptions, loaders, limits.

use std::sync::Arc;

use async_graphql::{EmptyMutation, EmptySubscription, Object, Schema};

use crate::auth::{Authenticator, Principal};
use crate::config::Settings;
use crate::hub::Hub;
use crate::store::Store;
use crate::telemetry::metrics::Metrics;

/// The caller of one request or connection (`None`: anonymous).
#[derive(Clone, Debug, Default)]
pub struct Viewer(pub Option<Principal>);

pub struct SchemaDeps {
    pub settings: Arc<Settings>,
    pub store: Arc<dyn Store>,
    pub hub: Arc<Hub>,
    pub auth: Arc<Authenticator>,
    pub metrics: Arc<Metrics>,
}

pub struct Query;

#[Object]
impl Query {
    async fn ping(&self) -> &str {
        "pong"
    }
}

pub type AppSchema = Schema<Query, EmptyMutation, EmptySubscription>;

pub fn build_schema(deps: SchemaDeps) -> AppSchema {
    Schema::build(Query, EmptyMutation, EmptySubscription)
        .limit_depth(deps.settings.graphql.max_depth)
        .data(deps.store)
        .finish()
}

/// The SDL of the schema, as `subgate schema` prints it.
pub fn sdl() -> String {
    Schema::build(Query, EmptyMutation, EmptySubscription).finish().sdl()
}
