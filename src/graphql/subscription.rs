//! Subscriptions: each opens hub subscriptions for its topics (after the
//! one authorization policy says yes) and maps the shared events to the
//! schema's types.
//!
//! The connection's [`Cutoff`] (in the request data on long-lived
//! transports) is registered with the hub; when this subscriber falls behind
//! the hub cuts it off and its stream stalls instead of ending, so the
//! transport closes with the slow-consumer code rather than `complete`.

use std::sync::Arc;

use async_graphql::{Context, Json, Result, Subscription as SubscriptionMacro, ID};
use futures_util::{future, stream, Stream, StreamExt};
use serde::de::DeserializeOwned;

use super::types::{Event, Message, Notification, Post, User};
use super::{coded_error, ctx_deps, require_viewer, viewer};
use crate::auth::policy::authorize;
use crate::error::ErrorCode;
use crate::event::{topic, SharedEvent};
use crate::hub::Cutoff;
use crate::store;

/// The most topics one `events` subscription may name.
pub const MAX_TOPICS: usize = 20;

/// The transport label of the connection running a subscription, put in
/// the request data by the transport (defaults to `graphql_ws`).
#[derive(Clone, Copy, Debug)]
pub struct TransportLabel(pub &'static str);

pub struct Subscription;

#[SubscriptionMacro]
impl Subscription {
    /// Every new post.
    async fn post_created(&self, ctx: &Context<'_>) -> Result<impl Stream<Item = Post>> {
        let events = open(ctx, vec![topic::POSTS.to_owned()]).await?;
        Ok(typed::<store::Post>(events, "post.created").map(Post))
    }

    /// Edits of one post.
    async fn post_updated(&self, ctx: &Context<'_>, id: ID) -> Result<impl Stream<Item = Post>> {
        let events = open(ctx, vec![topic::post(&id)]).await?;
        Ok(typed::<store::Post>(events, "post.updated").map(Post))
    }

    /// Profile updates of one user.
    async fn user_updated(&self, ctx: &Context<'_>, id: ID) -> Result<impl Stream<Item = User>> {
        let events = open(ctx, vec![topic::user(&id)]).await?;
        Ok(typed::<store::User>(events, "user.updated").map(User))
    }

    /// The caller's own notifications.
    async fn notification_received(&self, ctx: &Context<'_>) -> Result<impl Stream<Item = Notification>> {
        let me = require_viewer(ctx)?.user_id.clone();
        let events = open(ctx, vec![topic::notifications(&me)]).await?;
        Ok(typed::<store::Notification>(events, "notification.created").map(Notification))
    }

    /// Messages sent to a channel (members only when it is private).
    async fn message_received(&self, ctx: &Context<'_>, channel_id: ID) -> Result<impl Stream<Item = Message>> {
        let events = open(ctx, vec![topic::channel(&channel_id)]).await?;
        Ok(typed::<MessageCreated>(events, "message.created").map(|m| Message(m.message)))
    }

    /// Events of any topics, as published. `after` (a resume position)
    /// needs event history, which this node does not keep yet.
    async fn events(
        &self,
        ctx: &Context<'_>,
        topics: Vec<String>,
        after: Option<String>,
    ) -> Result<impl Stream<Item = Event>> {
        if after.is_some() {
            return Err(coded_error(
                ErrorCode::ValidationError,
                "resuming with `after` needs event history, which this node does not keep; subscribe without it",
            ));
        }
        if topics.is_empty() || topics.len() > MAX_TOPICS {
            return Err(coded_error(
                ErrorCode::ValidationError,
                format!("name between 1 and {MAX_TOPICS} topics"),
            ));
        }
        let mut unique = topics;
        unique.sort();
        unique.dedup();
        let events = open(ctx, unique).await?;
        Ok(events.map(|shared| Event {
            id: ID(shared.event.id.clone()),
            topic: shared.event.topic.clone(),
            kind: shared.event.kind.clone(),
            payload: Json(shared.event.payload.clone()),
            timestamp_text: shared.event.timestamp.clone(),
        }))
    }
}

/// Authorizes and opens hub subscriptions to `topics`, merged.
async fn open(ctx: &Context<'_>, topics: Vec<String>) -> Result<impl Stream<Item = Arc<SharedEvent>>> {
    let deps = ctx_deps(ctx);
    let principal = viewer(ctx);
    for name in &topics {
        authorize(deps.store.as_ref(), principal, name)
            .await
            .map_err(|refusal| coded_error(refusal.code(), refusal.to_string()))?;
    }
    let cutoff = ctx.data_opt::<Arc<Cutoff>>().cloned();
    let label = ctx.data_opt::<TransportLabel>().map_or("graphql_ws", |l| l.0);
    let mut subs = Vec::with_capacity(topics.len());
    for name in &topics {
        let sub = deps.hub.subscribe(name, label, cutoff.clone()).await.map_err(|e| {
            coded_error(ErrorCode::Internal, format!("could not subscribe to {name}: {e}"))
        })?;
        subs.push(sub);
    }
    // The transport counts the subscription (it knows when it ends); this
    // counts the deliveries.
    let metrics = deps.metrics.clone();
    let merged = stream::select_all(subs).map(move |event| {
        metrics.delivered(label, event.published_at_ms);
        event
    });
    // When cut off, stall rather than end: the transport closes with the
    // slow-consumer code instead of reporting a normal completion.
    let tail = stream::once(async move {
        if cutoff.as_ref().is_some_and(|c| c.reason().is_some()) {
            future::pending::<()>().await;
        }
    })
    .filter_map(|_| future::ready(None));
    Ok(merged.chain(tail))
}

/// The payload of `message.created`: `{"message": …}`.
#[derive(Clone, serde::Deserialize)]
struct MessageCreated {
    message: store::Message,
}

/// Events of `kind` decoded into `T` (once per node, not per subscriber);
/// others, and undecodable ones, skipped.
fn typed<T: DeserializeOwned + Clone + Send + Sync + 'static>(
    events: impl Stream<Item = Arc<SharedEvent>>,
    kind: &'static str,
) -> impl Stream<Item = T> {
    events.filter_map(move |shared| {
        let item = if shared.event.kind == kind {
            let decoded = shared.payload_as::<T>();
            if decoded.is_none() {
                tracing::warn!(kind, id = %shared.event.id, "an event payload did not decode; skipped");
            }
            decoded.map(|v| T::clone(&v))
        } else {
            None
        };
        future::ready(item)
    })
}
