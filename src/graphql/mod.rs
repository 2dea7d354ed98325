//! The GraphQL schema: queries, mutations, subscriptions, loaders, limits.
//!
//! Per-request data: [`Viewer`] (who is calling), [`ClientAddr`] (from
//! where: the unauthenticated mutations are limited by it) and, on long-lived
//! connections, the connection's [`crate::hub::Cutoff`]. Schema data: the
//! [`SchemaDeps`] and the loaders.

pub mod document;
pub mod groups;
pub mod limits;
pub mod loaders;
pub mod mutation;
pub mod query;
pub mod subscription;
pub mod types;

use std::sync::Arc;

use async_graphql::{Context, ErrorExtensions, Schema};

use crate::auth::{Authenticator, Principal};
use crate::config::Settings;
use crate::error::ErrorCode;
use crate::hub::Hub;
use crate::presence::Presence;
use crate::store::{PageRequest, Store, StoreError};
use crate::telemetry::metrics::Metrics;

pub use mutation::Mutation;
pub use query::Query;
pub use subscription::Subscription;

/// The caller of one request or connection (`None`: anonymous).
#[derive(Clone, Debug, Default)]
pub struct Viewer(pub Option<Principal>);

/// The address of the client making a request or holding a connection
/// (after `server.trusted_proxies`); `None` when there is no network
/// client (a test executing the schema directly).
#[derive(Clone, Copy, Debug, Default)]
pub struct ClientAddr(pub Option<std::net::IpAddr>);

/// What resolvers reach through the schema's data.
pub struct SchemaDeps {
    pub settings: Arc<Settings>,
    /// The rules every mutation follows (the resolvers only adapt).
    pub domain: Arc<crate::domain::Domain>,
    pub store: Arc<dyn Store>,
    pub hub: Arc<Hub>,
    pub auth: Arc<Authenticator>,
    pub metrics: Arc<Metrics>,
    pub presence: Arc<dyn Presence>,
}

pub type AppSchema = Schema<Query, Mutation, Subscription>;

/// Builds the schema with every limit of `deps.settings` in force.
pub fn build_schema(deps: SchemaDeps) -> AppSchema {
    let settings = deps.settings.clone();
    let deps = Arc::new(deps);
    let mut builder = Schema::build(Query, Mutation, Subscription)
        .limit_depth(settings.graphql.max_depth)
        .limit_complexity(settings.graphql.max_complexity)
        .limit_recursive_depth(64)
        .limit_directives(20)
        .extension(limits::DocumentLimits::new(
            settings.graphql.max_tokens,
            settings.graphql.max_aliases,
            settings.introspection_enabled(),
        ))
        .data(loaders::Loaders::new(deps.store.clone()))
        .data(deps);
    if !settings.introspection_enabled() {
        builder = builder.disable_introspection().disable_suggestions();
    }
    builder.finish()
}

/// A response that failed before execution (parse, validation, limits):
/// errors, no data, and no error tied to a field path. A field error that
/// nulled the whole result still ran, and is answered 200.
pub fn is_request_error(response: &async_graphql::Response) -> bool {
    !response.errors.is_empty()
        && matches!(response.data, async_graphql::Value::Null)
        && response.errors.iter().all(|e| e.path.is_empty())
}

/// The `outcome` label of an operation, decided by its first result:
/// `request_error` (it never ran), `field_error` or `ok`.
pub fn outcome(response: &async_graphql::Response) -> &'static str {
    if is_request_error(response) {
        "request_error"
    } else if response.errors.is_empty() {
        "ok"
    } else {
        "field_error"
    }
}

/// The SDL of the schema, as `subgate schema` prints it and `schema.graphql` holds it.
pub fn sdl() -> String {
    Schema::build(Query, Mutation, Subscription).finish().sdl()
}

pub(crate) fn ctx_deps<'a>(ctx: &'a Context<'_>) -> &'a Arc<SchemaDeps> {
    ctx.data_unchecked::<Arc<SchemaDeps>>()
}

/// The caller, when authenticated.
pub(crate) fn viewer<'a>(ctx: &'a Context<'_>) -> Option<&'a Principal> {
    // A connection's token may expire while it is open: from then on its
    // operations run as nobody (and the connection is closed).
    ctx.data_opt::<Viewer>()
        .and_then(|v| v.0.as_ref())
        .filter(|p| !p.is_expired())
}

/// A GraphQL error with `extensions.code`.
pub(crate) fn coded_error(code: ErrorCode, message: impl Into<String>) -> async_graphql::Error {
    async_graphql::Error::new(message).extend_with(|_, e| e.set("code", code.as_str()))
}

/// The client's address, when the transport gave one.
pub(crate) fn client_addr(ctx: &Context<'_>) -> Option<std::net::IpAddr> {
    ctx.data_opt::<ClientAddr>().and_then(|c| c.0)
}

/// A RATE_LIMITED error saying when to retry: `extensions.retryAfterMs`
/// and `extensions.scope` (the `subgate_rate_limited_total` label).
pub(crate) fn rate_limited_error(limited: &crate::ratelimit::Limited) -> async_graphql::Error {
    let (ms, scope) = (limited.retry_after_ms(), limited.scope.as_str());
    async_graphql::Error::new(limited.to_string()).extend_with(move |_, e| {
        e.set("code", ErrorCode::RateLimited.as_str());
        e.set("retryAfterMs", ms);
        e.set("scope", scope);
    })
}

/// The caller, or an UNAUTHORIZED error.
pub(crate) fn require_viewer<'a>(ctx: &'a Context<'_>) -> async_graphql::Result<&'a Principal> {
    viewer(ctx).ok_or_else(|| coded_error(ErrorCode::Unauthorized, "authentication required"))
}

pub(crate) fn store_error(err: StoreError) -> async_graphql::Error {
    match err {
        StoreError::NotFound => coded_error(ErrorCode::NotFound, "not found"),
        StoreError::Conflict { field } => {
            coded_error(ErrorCode::Conflict, format!("{field} is already taken"))
        }
        StoreError::Unavailable(why) => {
            tracing::warn!(%why, "store unavailable");
            coded_error(ErrorCode::Internal, "the store is unavailable; try again")
        }
    }
}

/// Validates `first`/`after` into a store page request.
/// One page of a list field: `first`/`after` checked against the limits,
/// the page read by `fetch`, its items wrapped into the schema's type.
pub(crate) async fn paged<S, T, Fut>(
    ctx: &Context<'_>,
    first: Option<i32>,
    after: Option<String>,
    fetch: impl FnOnce(Arc<dyn Store>, PageRequest) -> Fut,
    wrap: impl Fn(S) -> T,
) -> async_graphql::Result<types::Conn<T>>
where
    T: async_graphql::OutputType,
    Fut: std::future::Future<Output = crate::store::StoreResult<crate::store::Page<S>>>,
{
    let request = page_request(ctx, first, after)?;
    let page = fetch(ctx_deps(ctx).store.clone(), request)
        .await
        .map_err(store_error)?;
    Ok(types::connection(page, wrap))
}

/// A page of posts, newest first; one author's when `author` is given.
pub(crate) async fn posts_page(
    ctx: &Context<'_>,
    first: Option<i32>,
    after: Option<String>,
    author: Option<&str>,
) -> async_graphql::Result<types::Conn<types::Post>> {
    let fetch = |s: Arc<dyn Store>, p| async move { s.list_posts(author, p).await };
    paged(ctx, first, after, fetch, types::Post::new).await
}

pub(crate) fn page_request(
    ctx: &Context<'_>,
    first: Option<i32>,
    after: Option<String>,
) -> async_graphql::Result<PageRequest> {
    use async_graphql::connection::CursorType;
    let max = ctx_deps(ctx).settings.graphql.max_page_size;
    let first = first.unwrap_or(20);
    if first < 0 || first as usize > max {
        return Err(coded_error(
            ErrorCode::ValidationError,
            format!("`first` must be between 0 and {max}"),
        ));
    }
    let after = match after {
        Some(cursor) => Some(
            types::Cursor::decode_cursor(&cursor)
                .map_err(|_| {
                    coded_error(ErrorCode::ValidationError, "`after` is not a valid cursor")
                })?
                .0,
        ),
        None => None,
    };
    Ok(PageRequest {
        first: first as usize,
        after,
    })
}

/// Complexity of a list field: its page size times what each item costs.
pub(crate) fn list_complexity(first: Option<i32>, child_complexity: usize) -> usize {
    let first = first.unwrap_or(20).max(1) as usize;
    first.saturating_mul(child_complexity).saturating_add(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::memory::MemoryBroker;
    use crate::domain::entities::Create;
    use crate::store::memory::MemoryStore;

    /// The response was refused with an error whose message says `why`.
    fn assert_refused(response: &async_graphql::Response, why: &str) {
        assert!(
            response.errors.iter().any(|e| e.message.contains(why)),
            "no error mentions {why:?}: {:?}",
            response.errors
        );
    }

    fn schema_with(store: Arc<MemoryStore>) -> (AppSchema, Arc<Settings>) {
        let (schema, settings, _) = schema_and_presence(store);
        (schema, settings)
    }

    /// The schema over `store` with default settings and the memory
    /// presence it reads.
    fn schema_and_presence(
        store: Arc<MemoryStore>,
    ) -> (
        AppSchema,
        Arc<Settings>,
        Arc<crate::presence::memory::MemoryPresence>,
    ) {
        let dir = std::env::temp_dir().join("subgate-graphql-test-empty");
        let settings = Arc::new(Settings::load_from(&dir, None, Vec::new()).unwrap());
        let metrics = Arc::new(Metrics::new());
        let hub = Hub::new(Arc::new(MemoryBroker::default()), metrics.clone(), 16);
        let auth = Arc::new(Authenticator::from_settings(&settings).unwrap());
        let presence = Arc::new(crate::presence::memory::MemoryPresence::new(
            hub.clone(),
            &metrics,
            std::time::Duration::from_secs(15),
        ));
        let schema = build_schema(SchemaDeps {
            domain: Arc::new(crate::domain::Domain {
                store: store.clone(),
                hub: hub.clone(),
                auth: auth.clone(),
                limits: Arc::new(crate::ratelimit::Limits::new(
                    &settings.ratelimit,
                    settings.max_concurrent_password_hashes(),
                    &metrics,
                )),
                login_token_ttl: std::time::Duration::from_secs(3600),
                unknown_email_hash: crate::domain::users::unknown_email_hash(),
                max_payload_bytes: settings.publish.max_payload_bytes,
            }),
            settings: settings.clone(),
            store,
            hub,
            auth,
            metrics,
            presence: presence.clone(),
        });
        (schema, settings, presence)
    }

    #[test]
    fn the_checked_in_schema_is_the_code_schema() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schema.graphql");
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == sdl(),
            "schema.graphql differs from the code: regenerate it with `cargo run -- schema > schema.graphql`"
        );
    }

    #[tokio::test]
    async fn a_page_of_posts_with_authors_costs_a_bounded_number_of_store_calls() {
        let store = Arc::new(MemoryStore::new());
        let mut authors = Vec::new();
        for i in 0..10 {
            let user = store
                .create_user(crate::store::NewUser {
                    email: format!("u{i}@example.com"),
                    name: format!("u{i}"),
                    password_hash: "x".into(),
                })
                .await
                .unwrap();
            authors.push(user.id);
        }
        for i in 0..60 {
            store
                .create_post(&authors[i % 10], format!("p{i}"), String::new())
                .await
                .unwrap();
        }
        let (schema, _) = schema_with(store.clone());
        let before = store.calls();
        let response = schema
            .execute("{ posts(first: 50) { totalCount nodes { title author { name } } } }")
            .await;
        assert!(response.errors.is_empty(), "{:?}", response.errors);
        let calls = store.calls() - before;
        let data = response.data.into_json().unwrap();
        let nodes = data["posts"]["nodes"].as_array().unwrap();
        assert_eq!(nodes.len(), 50);
        assert!(nodes.iter().all(|n| n["author"]["name"].is_string()));
        // One call for the page and one batched call for the authors; a
        // loaded machine may split the batch window, never into 50 calls.
        assert!(
            calls <= 6,
            "{calls} store calls for one page of 50 posts (unbatched: 51)"
        );
    }

    #[tokio::test]
    async fn depth_is_counted_through_fragments() {
        let (schema, settings) = schema_with(Arc::new(MemoryStore::new()));
        assert_eq!(settings.graphql.max_depth, 10);
        // Depth 10: posts nodes author posts nodes author posts nodes author id.
        let ten = "{ posts(first: 1) { nodes { ...A } } } fragment A on Post { author { posts(first: 1) { nodes { author { posts(first: 1) { nodes { author { id } } } } } } } }";
        let response = schema.execute(ten).await;
        assert!(response.errors.is_empty(), "{:?}", response.errors);
        // Depth 11, the extra level hidden inside the fragment.
        let eleven = "{ posts(first: 1) { nodes { ...A } } } fragment A on Post { author { posts(first: 1) { nodes { author { posts(first: 1) { nodes { author { posts(first: 1) { totalCount } } } } } } } } }";
        let response = schema.execute(eleven).await;
        assert_refused(&response, "nested too deep");
    }

    #[tokio::test]
    async fn too_many_aliases_are_refused() {
        let (schema, _) = schema_with(Arc::new(MemoryStore::new()));
        let query = format!(
            "{{ {} }}",
            (0..31)
                .map(|i| format!("a{i}: me {{ id }}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let response = schema.execute(query).await;
        assert_refused(&response, "aliases");
    }

    #[tokio::test]
    async fn a_channel_lists_its_online_users_with_their_status() {
        use crate::presence::{Presence, Status};
        let store = Arc::new(MemoryStore::new());
        let ann = store
            .create_user(crate::store::NewUser {
                email: "ann@example.com".into(),
                name: "Ann".into(),
                password_hash: "x".into(),
            })
            .await
            .unwrap();
        let channel = store
            .create_channel(&ann.id, "general".into(), false, vec![ann.id.clone()])
            .await
            .unwrap();
        let (schema, _, presence) = schema_and_presence(store);
        let query = format!(
            "{{ channel(id: \"{}\") {{ onlineUsers {{ userId status user {{ name }} }} }} }}",
            channel.id
        );

        let response = schema.execute(query.as_str()).await;
        assert!(response.errors.is_empty(), "{:?}", response.errors);
        assert_eq!(
            response.data.into_json().unwrap()["channel"]["onlineUsers"],
            serde_json::json!([])
        );

        let _ann = presence.join(&channel.id, &ann.id);
        let _ghost = presence.join(&channel.id, "no-such-account");
        presence.set_status(&ann.id, Status::Away).await.unwrap();
        let response = schema.execute(query.as_str()).await;
        assert!(response.errors.is_empty(), "{:?}", response.errors);
        let mut online = response.data.into_json().unwrap()["channel"]["onlineUsers"]
            .as_array()
            .unwrap()
            .clone();
        online.sort_by_key(|u| u["userId"].as_str().unwrap().to_owned());
        let mut expected = vec![
            serde_json::json!({"userId": ann.id, "status": "AWAY", "user": {"name": "Ann"}}),
            serde_json::json!({"userId": "no-such-account", "status": "ONLINE", "user": null}),
        ];
        expected.sort_by_key(|u| u["userId"].as_str().unwrap().to_owned());
        assert_eq!(online, expected);
    }
}
