//! Subscriptions: each opens hub subscriptions for its topics (after the
//! one authorization policy says yes) and maps the shared events to the
//! schema's types.
//!
//! The connection's [`Cutoff`] (in the request data on long-lived
//! transports) is registered with the hub; when this subscriber falls behind
//! the hub cuts it off and its stream stalls instead of ending, so the
//! transport closes with the slow-consumer code rather than `complete`.

use std::sync::Arc;

use async_graphql::{
    Context, ErrorExtensions, Json, Result, Subscription as SubscriptionMacro, ID,
};
use futures_util::stream::BoxStream;
use futures_util::{future, stream, Stream, StreamExt};

use super::groups::{AuthorizeOnly, GroupLeader, Tracker};
use super::types::{Event, Message, Notification, Post, User};
use super::{coded_error, ctx_deps, require_viewer, viewer};
use crate::auth::policy::authorize;
use crate::broker::GapReason;
use crate::domain::events::{
    EventKind, MessageCreated, NotificationCreated, PostCreated, PostUpdated, UserUpdated,
};
use crate::error::ErrorCode;
use crate::event::{topic, SharedEvent};
use crate::hub::resume::Delivery;
use crate::hub::Cutoff;

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
    async fn post_created(&self, ctx: &Context<'_>) -> Result<impl Stream<Item = Result<Post>>> {
        watch::<PostCreated, _>(ctx, topic::POSTS.to_owned(), Post).await
    }

    /// Edits of one post.
    async fn post_updated(
        &self,
        ctx: &Context<'_>,
        id: ID,
    ) -> Result<impl Stream<Item = Result<Post>>> {
        watch::<PostUpdated, _>(ctx, topic::post(&id), Post).await
    }

    /// Profile updates of one user.
    async fn user_updated(
        &self,
        ctx: &Context<'_>,
        id: ID,
    ) -> Result<impl Stream<Item = Result<User>>> {
        watch::<UserUpdated, _>(ctx, topic::user(&id), User::shared).await
    }

    /// The caller's own notifications.
    async fn notification_received(
        &self,
        ctx: &Context<'_>,
    ) -> Result<impl Stream<Item = Result<Notification>>> {
        let me = require_viewer(ctx)?.user_id.clone();
        watch::<NotificationCreated, _>(ctx, topic::notifications(&me), Notification).await
    }

    /// Messages sent to a channel (members only when it is private). With
    /// `after` (the `eventId` of the last message seen) the messages sent
    /// since are replayed first, none twice; a position that cannot be
    /// resumed from yields a `HISTORY_GAP` error before the rest.
    async fn message_received(
        &self,
        ctx: &Context<'_>,
        channel_id: ID,
        after: Option<String>,
    ) -> Result<impl Stream<Item = Result<Message>>> {
        let events = open(ctx, vec![(topic::channel(&channel_id), after)]).await?;
        Ok(typed::<MessageCreated>(events)
            .map(|r| r.map(|(m, id)| Message(m.message.clone(), Some(id)))))
    }

    /// Events of any topics, as published. `after` resumes: with one topic
    /// the `id` of the last event seen; with several, `topic~id,…` naming
    /// the last id seen per topic. Missed events are replayed first, none
    /// twice; a position that cannot be resumed from yields a `HISTORY_GAP`
    /// error (with `extensions.topic` and `reason`) before the rest.
    async fn events(
        &self,
        ctx: &Context<'_>,
        topics: Vec<String>,
        after: Option<String>,
    ) -> Result<impl Stream<Item = Result<Event>>> {
        if topics.is_empty() || topics.len() > MAX_TOPICS {
            return Err(coded_error(
                ErrorCode::ValidationError,
                format!("name between 1 and {MAX_TOPICS} topics"),
            ));
        }
        let mut unique = topics;
        unique.sort();
        unique.dedup();
        let mut positions = match &after {
            Some(text) => crate::event::cursor::parse(text, &unique).map_err(|why| {
                coded_error(ErrorCode::ValidationError, format!("`after`: {why}"))
            })?,
            None => Default::default(),
        };
        let wanted = unique.into_iter().map(|t| {
            let p = positions.remove(&t);
            (t, p)
        });
        let events = open(ctx, wanted.collect()).await?;
        Ok(events.map(|item| {
            item.map(|shared| Event {
                id: ID(shared.event.id.clone()),
                topic: shared.event.topic.clone(),
                kind: shared.event.kind.clone(),
                payload: Json(shared.event.payload.clone()),
                timestamp_text: shared.event.timestamp.clone(),
            })
        }))
    }
}

/// The error a subscription yields where events were lost.
fn gap_error(topic: &str, reason: GapReason) -> async_graphql::Error {
    let topic = topic.to_owned();
    async_graphql::Error::new(format!(
        "events of {topic} were lost here ({})",
        reason.as_str()
    ))
    .extend_with(move |_, e| {
        e.set("code", ErrorCode::HistoryGap.as_str());
        e.set("topic", topic.clone());
        e.set("reason", reason.as_str());
    })
}

/// Authorizes and opens resumable hub subscriptions to `topics` (each with
/// the position to resume after, if any), merged.
///
/// In a member's probe ([`AuthorizeOnly`]) it stops after authorizing; in a
/// group's own request ([`GroupLeader`]) it does not authorize (each member
/// did) and reports to the group instead of counting deliveries (see
/// [`super::groups`]).
async fn open(
    ctx: &Context<'_>,
    topics: Vec<(String, Option<String>)>,
) -> Result<BoxStream<'static, Result<Arc<SharedEvent>>>> {
    let deps = ctx_deps(ctx);
    let principal = viewer(ctx);
    let leader = ctx.data_opt::<GroupLeader>().map(|l| l.0.clone());
    if leader.is_none() {
        for (name, _) in &topics {
            authorize(deps.store.as_ref(), principal, name)
                .await
                .map_err(|refusal| coded_error(refusal.code(), refusal.to_string()))?;
        }
    }
    if ctx.data_opt::<AuthorizeOnly>().is_some() {
        return Ok(stream::empty().boxed());
    }
    let cutoff = match &leader {
        Some(group) => Some(group.cutoff()),
        None => ctx.data_opt::<Arc<Cutoff>>().cloned(),
    };
    let label = ctx
        .data_opt::<TransportLabel>()
        .map_or("graphql_ws", |l| l.0);
    let mut streams = Vec::with_capacity(topics.len());
    for (name, after) in topics {
        let recheck = match &leader {
            Some(group) => group.recheck(&name),
            None => crate::auth::policy::recheck(deps.store.clone(), principal.cloned(), &name),
        };
        let resumed = deps
            .hub
            .subscribe_from(&name, after.as_deref(), label, cutoff.clone(), recheck)
            .await
            .map_err(|e| {
                coded_error(
                    ErrorCode::Internal,
                    format!("could not subscribe to {name}: {e}"),
                )
            })?;
        let initial = resumed.gap.map(|reason| Err(gap_error(&name, reason)));
        let topic_name = name.clone();
        let rest = resumed.stream.map(move |delivery| match delivery {
            Delivery::Event(event) => Ok(event),
            Delivery::Gap(reason) => Err(gap_error(&topic_name, reason)),
            Delivery::Revoked => Err(coded_error(
                ErrorCode::Forbidden,
                format!("no longer allowed to read {topic_name}: its readers changed"),
            )),
        });
        streams.push(stream::iter(initial).chain(rest).boxed());
    }
    let metrics = deps.metrics.clone();
    // A resuming member of a group notes where its replay stands.
    let tracker = ctx.data_opt::<Arc<Tracker>>().cloned();
    let merged = stream::select_all(streams).map(move |item| {
        if let Ok(event) = &item {
            match &leader {
                // Counted per member, as each takes the shared result.
                Some(group) => group.note(event),
                None => {
                    metrics.delivered(label, event.published_at_ms);
                    if let Some(tracker) = &tracker {
                        tracker.note(event);
                    }
                }
            }
        }
        item
    });
    // When cut off, stall rather than end: the transport closes with the
    // slow-consumer code instead of reporting a normal completion.
    let tail = stream::once(async move {
        if cutoff.as_ref().is_some_and(|c| c.reason().is_some()) {
            future::pending::<()>().await;
        }
    })
    .filter_map(|_| future::ready(None));
    Ok(merged.chain(tail).boxed())
}

/// Events of `kind` decoded into `T` (once per node, not per subscriber),
/// each with its event id; others, and undecodable ones, skipped; errors
/// passed through.
/// The events of kind `K` on one topic, live, each wrapped into the
/// schema's type.
async fn watch<K: EventKind, T>(
    ctx: &Context<'_>,
    topic: String,
    wrap: impl Fn(Arc<K::Payload>) -> T + Send + Sync + 'static,
) -> Result<impl Stream<Item = Result<T>>> {
    let events = open(ctx, vec![(topic, None)]).await?;
    Ok(typed::<K>(events).map(move |r| r.map(|(payload, _)| wrap(payload))))
}

fn typed<K: EventKind>(
    events: impl Stream<Item = Result<Arc<SharedEvent>>>,
) -> impl Stream<Item = Result<(Arc<K::Payload>, String)>> {
    let kind = K::NAME;
    events.filter_map(move |item| {
        let out = match item {
            Err(e) => Some(Err(e)),
            Ok(shared) if shared.event.kind == kind => {
                let decoded = shared.payload_as::<K::Payload>();
                if decoded.is_none() {
                    tracing::warn!(kind, id = %shared.event.id, "an event payload did not decode; skipped");
                }
                decoded.map(|v| Ok((v, shared.event.id.clone())))
            }
            Ok(_) => None,
        };
        future::ready(out)
    })
}
