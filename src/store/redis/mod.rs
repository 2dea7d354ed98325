//! The Redis store: the domain data in one Redis shared by every node, so
//! that nodes keep no state of their own.
//!
//! - [`codec`]: how each entity lies in its hash, declared once per entity.
//! - [`entities`]: the one path every entity takes: batch reads, pages,
//!   creates, patches.
//! - [`scripts`]: the Lua scripts behind every write.
//! - The keys are [`Keys`](crate::infra::redis::Keys)' store rows: the
//!   layout table of every Redis name subgate uses is there.
//!
//! # Atomicity
//!
//! Every write is one Lua script, so an entity and its indexes change
//! together and the checks that guard a write (the unique email, the parent
//! post or channel of a comment or message, the owner of a notification) run
//! in the same step as the write. Two nodes racing for one email therefore
//! cannot both win. The scripts build a few keys from the prefix and a stored
//! field (the old email, a post's author): this store targets one Redis
//! server (or a primary with replicas), not Redis Cluster.
//!
//! # Failure
//!
//! No connection is made up front: a node starts while Redis is down. Every
//! call goes through the Redis layer's timed call
//! ([`Redis::call`](crate::infra::redis::Redis::call)), which bounds taking
//! a pooled connection plus the command by `redis.command_timeout_seconds`; a
//! failure answers [`StoreError::Unavailable`], and one that says Redis is
//! unreachable makes [`Store::readiness`] report the reason until Redis
//! answers again. Before the first call nothing is known to be wrong and
//! readiness is `Ok`; the node learns the truth at once by pinging Redis
//! when it starts.

mod codec;
mod entities;
mod scripts;
#[cfg(test)]
mod tests;

use ::redis::{self, FromRedisValue};
use async_trait::async_trait;
use chrono::Utc;

use self::codec::{normalize_email, Column, Fields, Record, Stored};
use self::entities::Direction;
use super::*;
use crate::infra::redis::{CallError, Redis, Request};

/// The store on the node's Redis layer.
#[derive(Debug)]
pub struct RedisStore {
    redis: Redis,
}

impl RedisStore {
    /// The store on `redis`, its keys under the layer's prefix. Connects
    /// lazily.
    pub fn new(redis: Redis) -> Self {
        Self { redis }
    }

    /// One round trip to Redis.
    pub async fn ping(&self) -> StoreResult<()> {
        Ok(self.redis.ping().await?)
    }

    /// The one way to Redis, labelled by what is sent.
    async fn call<'a, T: FromRedisValue>(&self, request: impl Into<Request<'a>>) -> StoreResult<T> {
        let request = request.into();
        let label = match request {
            Request::Cmd(_) => "store_command",
            Request::Pipe(_) => "store_pipeline",
            Request::Script(_) => "store_script",
        };
        Ok(self.redis.call(label, request).await?)
    }
}

impl From<CallError> for StoreError {
    fn from(e: CallError) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn insert_user(&self, user: User) -> StoreResult<User> {
        let normalized = normalize_email(&user.email);
        let keys = self.redis.keys();
        let mut inv = scripts::CREATE_USER.invocation();
        inv.key(keys.email(&normalized))
            .key(keys.seq())
            .key(self.key::<User>(&user.id))
            .key(keys.users());
        inv.arg(&user.id).arg("email_norm").arg(&normalized);
        for (name, value) in user.encode() {
            inv.arg(name).arg(value);
        }
        let seq: i64 = self.call(&inv).await?;
        if seq < 0 {
            return Err(StoreError::Conflict { field: "email" });
        }
        Ok(user)
    }

    async fn get_users(&self, ids: &[String]) -> StoreResult<Vec<Option<User>>> {
        self.get(ids).await
    }

    async fn find_user_by_email(&self, email: &str) -> StoreResult<Option<User>> {
        let keys = self.redis.keys();
        let mut inv = scripts::USER_BY_EMAIL.invocation();
        inv.key(keys.email(&normalize_email(email)))
            .arg(keys.record_prefix(User::KIND));
        let fields: Fields = self.call(&inv).await?;
        Record::found(fields, User::KIND)
            .map(|r| r.decode().map(|(_, user)| user))
            .transpose()
    }

    async fn update_user(&self, id: &str, patch: UserPatch) -> StoreResult<User> {
        let keys = self.redis.keys();
        let mut inv = scripts::UPDATE_USER.invocation();
        inv.key(self.key::<User>(id));
        let mut fields = vec![("updated_at", Utc::now().to_field())];
        if let Some(email) = patch.email {
            let normalized = normalize_email(&email);
            inv.key(keys.email(&normalized));
            fields.push(("email", email));
            fields.push(("email_norm", normalized));
        }
        fields.extend(patch.name.map(|name| ("name", name)));
        fields.extend(patch.password_hash.map(|hash| ("password_hash", hash)));
        inv.arg(id).arg(keys.email_prefix());
        for (name, value) in &fields {
            inv.arg(*name).arg(value);
        }
        self.outcome(&inv).await
    }

    async fn delete_user(&self, id: &str) -> StoreResult<User> {
        let keys = self.redis.keys();
        let mut inv = scripts::DELETE_USER.invocation();
        inv.key(self.key::<User>(id))
            .key(keys.users())
            .arg(id)
            .arg(keys.email_prefix());
        self.outcome(&inv).await
    }

    async fn list_users(&self, page: PageRequest) -> StoreResult<Page<User>> {
        let list = self.redis.keys().users();
        self.list(&list, page, Direction::OldestFirst).await
    }

    async fn insert_post(&self, post: Post) -> StoreResult<Post> {
        let keys = self.redis.keys();
        let indexes = [keys.posts(), keys.posts_by_author(&post.author_id)];
        self.insert(&post, &[], &indexes).await?;
        Ok(post)
    }

    async fn get_posts(&self, ids: &[String]) -> StoreResult<Vec<Option<Post>>> {
        self.get(ids).await
    }

    async fn update_post(&self, id: &str, patch: PostPatch) -> StoreResult<Post> {
        let mut fields = vec![("updated_at", Utc::now().to_field())];
        fields.extend(patch.title.map(|title| ("title", title)));
        fields.extend(patch.content.map(|content| ("content", content)));
        self.patch::<Post>(id, None, &fields).await
    }

    async fn delete_post(&self, id: &str) -> StoreResult<Post> {
        let keys = self.redis.keys();
        let mut inv = scripts::DELETE_POST.invocation();
        inv.key(self.key::<Post>(id))
            .key(keys.posts())
            .arg(id)
            .arg(keys.posts_by_author_prefix());
        self.outcome(&inv).await
    }

    async fn list_posts(
        &self,
        author_id: Option<&str>,
        page: PageRequest,
    ) -> StoreResult<Page<Post>> {
        let keys = self.redis.keys();
        let list = match author_id {
            Some(author) => keys.posts_by_author(author),
            None => keys.posts(),
        };
        self.list(&list, page, Direction::NewestFirst).await
    }

    async fn insert_comment(&self, comment: Comment) -> StoreResult<Comment> {
        let parent = self.key::<Post>(&comment.post_id);
        let list = self.redis.keys().comments_of_post(&comment.post_id);
        self.insert(&comment, &[parent], &[list]).await?;
        Ok(comment)
    }

    async fn list_comments(&self, post_id: &str, page: PageRequest) -> StoreResult<Page<Comment>> {
        let list = self.redis.keys().comments_of_post(post_id);
        self.list(&list, page, Direction::OldestFirst).await
    }

    async fn insert_channel(&self, channel: Channel) -> StoreResult<Channel> {
        let list = self.redis.keys().channels();
        self.insert(&channel, &[], &[list]).await?;
        Ok(channel)
    }

    async fn get_channels(&self, ids: &[String]) -> StoreResult<Vec<Option<Channel>>> {
        self.get(ids).await
    }

    async fn add_channel_member(&self, channel_id: &str, user_id: &str) -> StoreResult<Channel> {
        let mut inv = scripts::ADD_MEMBER.invocation();
        inv.key(self.key::<Channel>(channel_id)).arg(user_id);
        self.outcome(&inv).await
    }

    async fn list_channels(&self, page: PageRequest) -> StoreResult<Page<Channel>> {
        let list = self.redis.keys().channels();
        self.list(&list, page, Direction::OldestFirst).await
    }

    async fn insert_message(&self, message: Message) -> StoreResult<Message> {
        let parent = self.key::<Channel>(&message.channel_id);
        let list = self.redis.keys().messages_of_channel(&message.channel_id);
        self.insert(&message, &[parent], &[list]).await?;
        Ok(message)
    }

    async fn list_messages(
        &self,
        channel_id: &str,
        page: PageRequest,
    ) -> StoreResult<Page<Message>> {
        let list = self.redis.keys().messages_of_channel(channel_id);
        self.list(&list, page, Direction::NewestFirst).await
    }

    async fn insert_notification(&self, notification: Notification) -> StoreResult<Notification> {
        let list = self
            .redis
            .keys()
            .notifications_of_user(&notification.user_id);
        self.insert(&notification, &[], &[list]).await?;
        Ok(notification)
    }

    async fn list_notifications(
        &self,
        user_id: &str,
        page: PageRequest,
    ) -> StoreResult<Page<Notification>> {
        let list = self.redis.keys().notifications_of_user(user_id);
        self.list(&list, page, Direction::NewestFirst).await
    }

    async fn mark_notification_read(&self, user_id: &str, id: &str) -> StoreResult<Notification> {
        // Someone else's notification reads as not found.
        let read = [("read", true.to_field())];
        self.patch(id, Some(("user_id", user_id)), &read).await
    }

    async fn set_topic_readers(&self, topic: &str, readers: &TopicReaders) -> StoreResult<()> {
        let json = serde_json::to_string(readers).map_err(|e| {
            StoreError::Unavailable(format!("the readers rule does not encode: {e}"))
        })?;
        let mut set = redis::cmd("SET");
        set.arg(self.redis.keys().topic_readers(topic)).arg(json);
        let _: () = self.call(&set).await?;
        Ok(())
    }

    async fn topic_readers(&self, topic: &str) -> StoreResult<Option<TopicReaders>> {
        let mut get = redis::cmd("GET");
        get.arg(self.redis.keys().topic_readers(topic));
        let json: Option<String> = self.call(&get).await?;
        json.map(|json| {
            serde_json::from_str(&json).map_err(|e| {
                StoreError::Unavailable(format!("the readers rule of {topic} does not decode: {e}"))
            })
        })
        .transpose()
    }

    fn readiness(&self) -> Result<(), String> {
        self.redis.readiness()
    }
}
