//! What a run needs before anyone subscribes: how it publishes, its topics
//! (channels for `/ws`), the rule that lets subscribers read them, and the
//! tokens it uses.

use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use serde_json::{json, Value};

use crate::churn::ChurnPlan;
use crate::marker;
use crate::plan::{Args, Plan, PublisherKind, Transport};
use crate::publisher::{first_error, graphql, Publisher};

/// Distinct users the `/ws` subscribers are spread over when tokens can be
/// minted: each user's presence is announced once per channel, and each
/// user's messages are rate-limited per node, so neither one user nor one
/// per connection.
const ENVELOPE_USERS: usize = 32;

/// Connections per minted user at most: well under the node's default
/// `server.max_connections_per_user` (100), so that a large run spreads
/// over more users instead of being refused with 429.
const CONNECTIONS_PER_USER: usize = 50;

/// The built-in subscription of the `mutation` publisher.
const POSTS_QUERY: &str = "subscription LoadgenPosts { postCreated { id title content } }";
/// The built-in subscription of the `api` publisher: the client fills in
/// `topics` and, when resuming, `after`.
pub const EVENTS_QUERY: &str = "subscription LoadgenEvents($topics: [String!]!, $after: String) { events(topics: $topics, after: $after) { id topic type payload } }";

pub struct Prepared {
    pub plan: Plan,
    pub publisher: Publisher,
    /// `--churn`, when asked for.
    pub churn: Option<ChurnPlan>,
}

pub async fn prepare(
    args: &Args,
    urls: &[String],
    publish_urls: &[String],
) -> Result<Prepared, String> {
    let run = marker::new_run_id();
    let client = crate::publisher::client(args.max_in_flight)?;
    let kind = publisher_kind(args)?;
    if args.topics == 0 {
        return Err("--topics must be at least 1".into());
    }
    check_subscriptions_per_connection(args)?;
    if kind == PublisherKind::Mutation && args.topics != 1 {
        return Err("--publisher mutation publishes to one topic (posts): use --publisher api for --topics > 1".into());
    }
    let finite = args.churn.is_finite() && args.churn_lifetime_ms.is_finite();
    if !finite || args.churn < 0.0 || (args.churn > 0.0 && args.churn_lifetime_ms <= 0.0) {
        return Err("--churn must be >= 0 and --churn-lifetime-ms > 0".into());
    }
    if args.churn_connections == Some(0) {
        return Err("--churn-connections must be at least 1".into());
    }
    let churning = args.churn > 0.0;
    let needs_user = kind == PublisherKind::Mutation
        || args.transport == Transport::Envelope
        || (churning && args.jwt_secret.is_none());
    let user_token = match (&args.token, needs_user) {
        (Some(t), _) => Some(t.clone()),
        (None, true) => Some(sign_up(&client, &publish_urls[0], &run).await?),
        (None, false) => None,
    };
    let authorization = match kind {
        PublisherKind::Mutation => format!("Bearer {}", user_token.clone().unwrap_or_default()),
        PublisherKind::Api => match (&args.api_key, &args.jwt_secret) {
            (Some(key), _) => format!("Bearer {key}"),
            (None, Some(secret)) => format!("Bearer {}", mint(secret, &format!("loadgen-{run}"), Some("publish"))?),
            (None, None) => {
                return Err("publishing through POST /api/v1/publish needs --api-key (one of publish.api_keys) or --jwt-secret".into())
            }
        },
    };
    let topics: Vec<String> = match (kind, args.transport) {
        (PublisherKind::Mutation, _) => vec!["posts".to_owned()],
        (PublisherKind::Api, Transport::Envelope) => {
            let token = user_token.as_deref().unwrap_or_default();
            let (client, run) = (&client, &run);
            futures_util::stream::iter(0..args.topics)
                .map(|k| async move {
                    let name = format!("loadgen {run} {k}");
                    create_channel(client, &publish_urls[0], token, &name)
                        .await
                        .map(|id| format!("channel:{id}"))
                })
                .buffered(args.max_in_flight.max(1))
                .try_collect()
                .await?
        }
        (PublisherKind::Api, _) => (0..args.topics)
            .map(|k| format!("loadgen.{run}.{k}"))
            .collect(),
    };
    let publisher = Publisher {
        client,
        kind,
        urls: publish_urls.to_vec(),
        authorization,
        run: run.clone(),
        topics: topics.clone(),
    };
    // Backend topics are readable by any authenticated caller until a
    // publish says otherwise; the run's topics are made public so that
    // subscribers need no token (the `/ws` channels are public channels).
    // At 100,000 topics one at a time would take minutes: as many at once
    // as the publisher's pool holds (`--max-in-flight`), on its kept-alive
    // connections.
    if kind == PublisherKind::Api && args.transport != Transport::Envelope {
        let publisher = &publisher;
        let mut setups = futures_util::stream::iter(&topics)
            .map(|topic| async move {
                let body = json!({"topic": topic, "type": "loadgen.setup", "payload": {}, "readers": "public"});
                publisher
                    .post_api(&publish_urls[0], &body)
                    .await
                    .map_err(|e| format!("setting up topic {topic}: {e}"))
            })
            .buffer_unordered(args.max_in_flight.max(1));
        while let Some(done) = setups.next().await {
            done?;
        }
    }
    let tokens = match (args.transport, &args.jwt_secret, &user_token, &args.token) {
        (_, _, _, Some(t)) => vec![t.clone()],
        (Transport::Envelope, Some(secret), _, None) => (0..ENVELOPE_USERS
            .max(args.connections.div_ceil(CONNECTIONS_PER_USER))
            .min(args.connections.max(1)))
            .map(|i| mint(secret, &format!("loadgen-{run}-{i}"), None))
            .collect::<Result<_, _>>()?,
        (Transport::Envelope, None, Some(t), None) => vec![t.clone()],
        _ => Vec::new(),
    };
    let (query, variables, events_query) = match (&args.query, kind) {
        (Some(q), _) => {
            let vars = match &args.variables {
                Some(v) => Some(serde_json::from_str(v).map_err(|e| format!("--variables: {e}"))?),
                None => None,
            };
            (Some(q.clone()), vars, false)
        }
        (None, PublisherKind::Mutation) => (Some(POSTS_QUERY.to_owned()), None, false),
        (None, PublisherKind::Api) => (Some(EVENTS_QUERY.to_owned()), None, true),
    };
    if args.resume && args.transport.is_graphql() && !events_query {
        return Err("--resume on a GraphQL transport resumes `events(topics, after)`: use --publisher api (postCreated has no resume position)".into());
    }
    let plan = Plan {
        run,
        urls: urls.to_vec(),
        transport: args.transport,
        topics,
        query: if args.transport.is_graphql() {
            query
        } else {
            None
        },
        variables,
        events_query,
        subscriptions_per_connection: args.subscriptions_per_connection,
        tokens,
        resume: args.resume,
        ramp: args.ramp,
    };
    let churn = if churning {
        let authorization = match (&args.jwt_secret, &user_token) {
            (_, Some(token)) => format!("Bearer {token}"),
            (Some(secret), None) => {
                format!(
                    "Bearer {}",
                    mint(secret, &format!("loadgen-{}-churn", plan.run), None)?
                )
            }
            (None, None) => return Err("--churn needs a user: --jwt-secret or --token".into()),
        };
        let lifetime = Duration::from_secs_f64(args.churn_lifetime_ms / 1000.0);
        Some(ChurnPlan {
            run: plan.run.clone(),
            urls: urls.to_vec(),
            rate: args.churn,
            connections: args
                .churn_connections
                .unwrap_or_else(|| ChurnPlan::default_connections(args.churn, lifetime)),
            lifetime,
            authorization,
        })
    } else {
        None
    };
    Ok(Prepared {
        plan,
        publisher,
        churn,
    })
}

/// Topics one SSE event stream may name (the node's own bound, its
/// `MAX_TOPICS`).
const SSE_MAX_TOPICS: usize = 20;

/// Whether the transport can hold `--subscriptions-per-connection` on one
/// connection, each on a topic of its own where it must.
fn check_subscriptions_per_connection(args: &Args) -> Result<(), String> {
    let k = args.subscriptions_per_connection;
    let topics = if publisher_kind(args)? == PublisherKind::Mutation {
        1
    } else {
        args.topics
    };
    match args.transport {
        _ if k == 0 => Err("--subscriptions-per-connection must be at least 1".into()),
        Transport::GraphqlSse if k > 1 => Err(
            "--subscriptions-per-connection: graphql-sse carries one operation per request; \
             use graphql-ws, graphql-ws-legacy, envelope or sse"
                .into(),
        ),
        Transport::Sse if k > SSE_MAX_TOPICS => Err(format!(
            "--subscriptions-per-connection {k}: an SSE event stream names at most \
             {SSE_MAX_TOPICS} topics"
        )),
        Transport::Sse | Transport::Envelope if k > topics => Err(format!(
            "--subscriptions-per-connection {k} needs {k} distinct topics per connection on {} \
             (a stream names a topic once, a /ws connection joins a channel once): \
             --topics {topics} is fewer (--publisher api with --topics {k} or more)",
            args.transport.name()
        )),
        _ => Ok(()),
    }
}

fn publisher_kind(args: &Args) -> Result<PublisherKind, String> {
    let kind = args.publisher.unwrap_or(
        if (args.transport.is_graphql() || args.transport == Transport::Sse)
            && args.topics == 1
            && !args.resume
        {
            PublisherKind::Mutation
        } else {
            PublisherKind::Api
        },
    );
    if kind == PublisherKind::Mutation && args.transport == Transport::Envelope {
        return Err("the /ws transport reads channels: use --publisher api".into());
    }
    Ok(kind)
}

/// Signs a user up for this run and logs in; the user's bearer token.
async fn sign_up(client: &reqwest::Client, url: &str, run: &str) -> Result<String, String> {
    let email = format!("loadgen-{run}@loadgen.invalid");
    let password = format!("loadgen-password-{run}");
    let create = json!({
        "query": "mutation SignUp($input: CreateUserInput!) { createUser(input: $input) { user { id } errors { code message } } }",
        "variables": {"input": {"email": email, "name": "loadgen", "password": password}},
    });
    let answer = graphql(client, url, None, &create)
        .await
        .map_err(|e| format!("signing a user up on {url}: {e}"))?;
    if answer.pointer("/data/createUser/user/id").is_none() {
        return Err(format!(
            "signing a user up on {url}: {}",
            first_error(&answer)
        ));
    }
    let login = json!({
        "query": "mutation LogIn($input: LoginInput!) { login(input: $input) { token errors { code message } } }",
        "variables": {"input": {"email": email, "password": password}},
    });
    let answer = graphql(client, url, None, &login)
        .await
        .map_err(|e| format!("logging in on {url}: {e}"))?;
    match answer.pointer("/data/login/token") {
        Some(Value::String(t)) => Ok(t.clone()),
        _ => Err(format!("logging in on {url}: {}", first_error(&answer))),
    }
}

async fn create_channel(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    name: &str,
) -> Result<String, String> {
    let body = json!({
        "query": "mutation Channel($input: CreateChannelInput!) { createChannel(input: $input) { channel { id } errors { code message } } }",
        "variables": {"input": {"name": name, "isPrivate": false}},
    });
    let auth = format!("Bearer {token}");
    let answer = graphql(client, url, Some(&auth), &body)
        .await
        .map_err(|e| format!("creating a channel: {e}"))?;
    match answer.pointer("/data/createChannel/channel/id") {
        Some(Value::String(id)) => Ok(id.clone()),
        _ => Err(format!("creating a channel: {}", first_error(&answer))),
    }
}

/// An HS256 token for `sub`, valid for a day.
fn mint(secret: &str, sub: &str, scope: Option<&str>) -> Result<String, String> {
    let now = chrono::Utc::now().timestamp();
    let mut claims = json!({"sub": sub, "iat": now, "exp": now + 86_400});
    if let Some(scope) = scope {
        claims["scope"] = json!(scope);
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| format!("minting a token: {e}"))
}
