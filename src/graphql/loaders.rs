//! DataLoaders: batch the `author`/`post`/`channel` lookups of one
//! execution into one store call per kind. No cache: data changes under us
//! and other nodes write too.

use std::collections::HashMap;
use std::sync::Arc;

use async_graphql::dataloader::{DataLoader, Loader};
use async_graphql::Context;

use super::store_error;
use super::types::{Channel, Post, User};
use crate::store::{self, Store};

pub struct Loaders {
    by_id: DataLoader<ByIdLoader>,
}

impl Loaders {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            by_id: DataLoader::new(ByIdLoader(store), tokio::spawn),
        }
    }
}

pub struct ByIdLoader(Arc<dyn Store>);

/// A user id.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct UserId(pub String);
/// A post id.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PostId(pub String);
/// A channel id.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ChannelId(pub String);

fn by_id<T>(ids: &[String], found: Vec<Option<T>>) -> HashMap<String, T> {
    ids.iter()
        .cloned()
        .zip(found)
        .filter_map(|(id, v)| v.map(|v| (id, v)))
        .collect()
}

impl Loader<UserId> for ByIdLoader {
    type Value = store::User;
    type Error = async_graphql::Error;

    async fn load(&self, keys: &[UserId]) -> Result<HashMap<UserId, Self::Value>, Self::Error> {
        let ids: Vec<String> = keys.iter().map(|k| k.0.clone()).collect();
        let found = self.0.get_users(&ids).await.map_err(store_error)?;
        Ok(by_id(&ids, found)
            .into_iter()
            .map(|(k, v)| (UserId(k), v))
            .collect())
    }
}

impl Loader<PostId> for ByIdLoader {
    type Value = store::Post;
    type Error = async_graphql::Error;

    async fn load(&self, keys: &[PostId]) -> Result<HashMap<PostId, Self::Value>, Self::Error> {
        let ids: Vec<String> = keys.iter().map(|k| k.0.clone()).collect();
        let found = self.0.get_posts(&ids).await.map_err(store_error)?;
        Ok(by_id(&ids, found)
            .into_iter()
            .map(|(k, v)| (PostId(k), v))
            .collect())
    }
}

impl Loader<ChannelId> for ByIdLoader {
    type Value = store::Channel;
    type Error = async_graphql::Error;

    async fn load(
        &self,
        keys: &[ChannelId],
    ) -> Result<HashMap<ChannelId, Self::Value>, Self::Error> {
        let ids: Vec<String> = keys.iter().map(|k| k.0.clone()).collect();
        let found = self.0.get_channels(&ids).await.map_err(store_error)?;
        Ok(by_id(&ids, found)
            .into_iter()
            .map(|(k, v)| (ChannelId(k), v))
            .collect())
    }
}

fn loaders<'a>(ctx: &'a Context<'_>) -> &'a Loaders {
    ctx.data_unchecked::<Loaders>()
}

pub async fn user(ctx: &Context<'_>, id: &str) -> async_graphql::Result<Option<User>> {
    Ok(loaders(ctx)
        .by_id
        .load_one(UserId(id.to_owned()))
        .await?
        .map(User::new))
}

pub async fn post(ctx: &Context<'_>, id: &str) -> async_graphql::Result<Option<Post>> {
    Ok(loaders(ctx)
        .by_id
        .load_one(PostId(id.to_owned()))
        .await?
        .map(Post::new))
}

pub async fn channel(ctx: &Context<'_>, id: &str) -> async_graphql::Result<Option<Channel>> {
    Ok(loaders(ctx)
        .by_id
        .load_one(ChannelId(id.to_owned()))
        .await?
        .map(Channel))
}
