//! Queries.

use async_graphql::{Context, Object, Result, ID};

use super::types::{Channel, Conn, Notification, Post, User};
use super::{loaders, paged, posts_page, require_viewer, viewer};
use crate::domain::channels::readable_by;
use std::sync::Arc;

use crate::store::Store;

pub struct Query;

#[Object]
impl Query {
    /// The authenticated caller; null when anonymous.
    async fn me(&self, ctx: &Context<'_>) -> Result<Option<User>> {
        match viewer(ctx) {
            Some(p) => loaders::user(ctx, &p.user_id).await,
            None => Ok(None),
        }
    }

    async fn user(&self, ctx: &Context<'_>, id: ID) -> Result<Option<User>> {
        loaders::user(ctx, &id).await
    }

    async fn post(&self, ctx: &Context<'_>, id: ID) -> Result<Option<Post>> {
        loaders::post(ctx, &id).await
    }

    /// Users, oldest first.
    #[graphql(complexity = "super::list_complexity(first, child_complexity)")]
    async fn users(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
        after: Option<String>,
    ) -> Result<Conn<User>> {
        paged(
            ctx,
            first,
            after,
            |s, p| async move { s.list_users(p).await },
            User::new,
        )
        .await
    }

    /// Posts, newest first; only one author's with `authorId`.
    #[graphql(complexity = "super::list_complexity(first, child_complexity)")]
    async fn posts(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
        after: Option<String>,
        author_id: Option<ID>,
    ) -> Result<Conn<Post>> {
        posts_page(ctx, first, after, author_id.as_ref().map(|id| id.as_str())).await
    }

    /// A channel; null when it does not exist or is private and the caller
    /// is not a member.
    async fn channel(&self, ctx: &Context<'_>, id: ID) -> Result<Option<Channel>> {
        let me = viewer(ctx).map(|p| p.user_id.clone());
        Ok(loaders::channel(ctx, &id)
            .await?
            .filter(|c| c.readable_by(me.as_deref())))
    }

    /// Channels, oldest first; private ones only to their members.
    #[graphql(complexity = "super::list_complexity(first, child_complexity)")]
    async fn channels(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
        after: Option<String>,
    ) -> Result<Conn<Channel>> {
        let me = viewer(ctx).map(|p| p.user_id.as_str());
        let visible = |s: Arc<dyn Store>, p| async move {
            let mut page = s.list_channels(p).await?;
            // Private channels the caller cannot see are left out of the
            // page; totalCount still counts every channel.
            page.items.retain(|(_, c)| readable_by(c, me));
            Ok(page)
        };
        paged(ctx, first, after, visible, Channel).await
    }

    /// The caller's notifications, newest first.
    #[graphql(complexity = "super::list_complexity(first, child_complexity)")]
    async fn notifications(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
        after: Option<String>,
    ) -> Result<Conn<Notification>> {
        let me = &require_viewer(ctx)?.user_id;
        let list = |s: Arc<dyn Store>, p| async move { s.list_notifications(me, p).await };
        paged(ctx, first, after, list, Notification::new).await
    }
}
