//! Queries.

use async_graphql::{Context, Object, Result, ID};

use super::types::{connection, Channel, Conn, Notification, Post, User};
use super::{ctx_deps, loaders, page_request, require_viewer, store_error, viewer};

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
        let page = page_request(ctx, first, after)?;
        let page = ctx_deps(ctx)
            .store
            .list_users(page)
            .await
            .map_err(store_error)?;
        Ok(connection(page, User::new))
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
        let page = page_request(ctx, first, after)?;
        let page = ctx_deps(ctx)
            .store
            .list_posts(author_id.as_ref().map(|id| id.as_str()), page)
            .await
            .map_err(store_error)?;
        Ok(connection(page, Post::new))
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
        let page = page_request(ctx, first, after)?;
        let me = viewer(ctx).map(|p| p.user_id.clone());
        let mut page = ctx_deps(ctx)
            .store
            .list_channels(page)
            .await
            .map_err(store_error)?;
        // Private channels the caller cannot see are left out of the page;
        // totalCount still counts every channel.
        page.items
            .retain(|(_, c)| Channel(c.clone()).readable_by(me.as_deref()));
        Ok(connection(page, Channel))
    }

    /// The caller's notifications, newest first.
    #[graphql(complexity = "super::list_complexity(first, child_complexity)")]
    async fn notifications(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
        after: Option<String>,
    ) -> Result<Conn<Notification>> {
        let me = require_viewer(ctx)?;
        let page = page_request(ctx, first, after)?;
        let page = ctx_deps(ctx)
            .store
            .list_notifications(&me.user_id, page)
            .await
            .map_err(store_error)?;
        Ok(connection(page, Notification::new))
    }
}
