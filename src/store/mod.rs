//! The domain data behind a [`Store`] trait, so that nodes stay stateless.
//!
//! Contract of every implementation:
//! - ids are opaque strings, unique fleet-wide;
//! - every list is ordered by a per-list position (`seq`) that never changes
//!   for an item, so cursor pagination neither skips nor repeats items while
//!   others are inserted; a page costs O(page), not O(list);
//! - `create_user` and `update_user` enforce the unique email atomically and
//!   answer [`StoreError::Conflict`];
//! - only password hashes are stored, never passwords;
//! - a backend topic's [`TopicReaders`] rule, once set, stays until it is
//!   replaced: it never expires, because a restricted topic that silently
//!   fell back to the default would open up to every user.
//!
//! Implementations: [`memory::MemoryStore`] (one node) and
//! [`redis::RedisStore`] (a fleet sharing Redis).

#[cfg(test)]
mod conformance;
pub mod memory;
pub mod redis;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct User {
    pub id: String,
    /// Shown to its owner only: never in events (`user.updated`,
    /// `user.deleted`), where any subscriber of `user:{id}` would read it;
    /// an event decodes with it empty.
    #[serde(skip_serializing, default)]
    pub email: String,
    pub name: String,
    /// Never leaves the node: not in events, not in responses.
    #[serde(skip)]
    pub password_hash: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Post {
    pub id: String,
    pub author_id: String,
    pub title: String,
    pub content: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Comment {
    pub id: String,
    pub post_id: String,
    pub author_id: String,
    pub content: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Channel {
    pub id: String,
    pub name: String,
    pub is_private: bool,
    pub owner_id: String,
    pub member_ids: Vec<String>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    pub id: String,
    pub channel_id: String,
    pub author_id: String,
    pub content: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Notification {
    pub id: String,
    pub user_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
    pub payload: serde_json::Value,
    pub read: bool,
    pub created_at: DateTime<Utc>,
}

/// Who may subscribe to a backend topic (one that is not a domain topic),
/// as the publish request that created or last restricted it said.
///
/// On the wire (the publish body): `"public"`, `"authenticated"` or
/// `{"users": ["id", …]}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum TopicReaders {
    /// Anyone, without a token.
    Public,
    /// Any caller with a valid token: the rule of a topic that has none.
    Authenticated,
    /// Only these user ids.
    Users(Vec<String>),
}

impl TopicReaders {
    /// Whether `user_id` (`None`: anonymous) may read under this rule.
    pub fn admits(&self, user_id: Option<&str>) -> bool {
        match (self, user_id) {
            (TopicReaders::Public, _) => true,
            (_, None) => false,
            (TopicReaders::Authenticated, Some(_)) => true,
            (TopicReaders::Users(ids), Some(id)) => ids.iter().any(|allowed| allowed == id),
        }
    }
}

/// A request for one page: up to `first` items after position `after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    pub first: usize,
    pub after: Option<u64>,
}

impl PageRequest {
    /// The first `n` items, from the start.
    pub const fn first(n: usize) -> Self {
        Self {
            first: n,
            after: None,
        }
    }
}

/// One page; each item with its position (the cursor's content).
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<(u64, T)>,
    pub total_count: usize,
    pub has_next_page: bool,
    pub has_previous_page: bool,
}

impl<T> Page<T> {
    pub fn empty() -> Self {
        Self {
            items: Vec::new(),
            total_count: 0,
            has_next_page: false,
            has_previous_page: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("{field} is already taken")]
    Conflict { field: &'static str },
    #[error("not found")]
    NotFound,
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A new user; `password_hash` is an argon2 PHC string.
#[derive(Debug, Clone)]
pub struct NewUser {
    pub email: String,
    pub name: String,
    pub password_hash: String,
}

#[derive(Debug, Clone, Default)]
pub struct UserPatch {
    pub email: Option<String>,
    pub name: Option<String>,
    pub password_hash: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct PostPatch {
    pub title: Option<String>,
    pub content: Option<String>,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Stores a new user; `Conflict { field: "email" }` when the email
    /// (compared trimmed and case-insensitively) is taken.
    async fn insert_user(&self, user: User) -> StoreResult<User>;
    /// Users by id, in the order asked, `None` where missing (one round trip).
    async fn get_users(&self, ids: &[String]) -> StoreResult<Vec<Option<User>>>;
    async fn find_user_by_email(&self, email: &str) -> StoreResult<Option<User>>;
    async fn update_user(&self, id: &str, patch: UserPatch) -> StoreResult<User>;
    /// Deletes the user; their posts stay, attributed to a missing author.
    async fn delete_user(&self, id: &str) -> StoreResult<User>;
    /// Oldest first.
    async fn list_users(&self, page: PageRequest) -> StoreResult<Page<User>>;

    async fn insert_post(&self, post: Post) -> StoreResult<Post>;
    async fn get_posts(&self, ids: &[String]) -> StoreResult<Vec<Option<Post>>>;
    async fn update_post(&self, id: &str, patch: PostPatch) -> StoreResult<Post>;
    async fn delete_post(&self, id: &str) -> StoreResult<Post>;
    /// Newest first; only `author_id`'s when given.
    async fn list_posts(
        &self,
        author_id: Option<&str>,
        page: PageRequest,
    ) -> StoreResult<Page<Post>>;

    /// `NotFound` when its post does not exist.
    async fn insert_comment(&self, comment: Comment) -> StoreResult<Comment>;
    /// Oldest first.
    async fn list_comments(&self, post_id: &str, page: PageRequest) -> StoreResult<Page<Comment>>;

    async fn insert_channel(&self, channel: Channel) -> StoreResult<Channel>;
    async fn get_channels(&self, ids: &[String]) -> StoreResult<Vec<Option<Channel>>>;
    /// Adds `user_id` to the channel's members (idempotent).
    async fn add_channel_member(&self, channel_id: &str, user_id: &str) -> StoreResult<Channel>;
    /// Oldest first.
    async fn list_channels(&self, page: PageRequest) -> StoreResult<Page<Channel>>;

    /// `NotFound` when its channel does not exist.
    async fn insert_message(&self, message: Message) -> StoreResult<Message>;
    /// Newest first.
    async fn list_messages(
        &self,
        channel_id: &str,
        page: PageRequest,
    ) -> StoreResult<Page<Message>>;

    async fn insert_notification(&self, notification: Notification) -> StoreResult<Notification>;
    /// Newest first.
    async fn list_notifications(
        &self,
        user_id: &str,
        page: PageRequest,
    ) -> StoreResult<Page<Notification>>;
    /// Marks one of `user_id`'s notifications read.
    async fn mark_notification_read(&self, user_id: &str, id: &str) -> StoreResult<Notification>;

    /// Sets who may subscribe to the backend topic `topic`, replacing any
    /// earlier rule.
    async fn set_topic_readers(&self, topic: &str, readers: &TopicReaders) -> StoreResult<()>;
    /// The rule set for `topic`, `None` when none was ever set.
    async fn topic_readers(&self, topic: &str) -> StoreResult<Option<TopicReaders>>;

    /// `Err(why)` while the store cannot serve.
    fn readiness(&self) -> Result<(), String> {
        Ok(())
    }
}

/// A new opaque id.
pub fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

#[cfg(test)]
mod tests {
    use super::TopicReaders;

    #[test]
    fn readers_rules_read_as_the_publish_body_writes_them() {
        let parse = |s: &str| serde_json::from_str::<TopicReaders>(s);
        assert_eq!(parse(r#""public""#).unwrap(), TopicReaders::Public);
        assert_eq!(
            parse(r#""authenticated""#).unwrap(),
            TopicReaders::Authenticated
        );
        assert_eq!(
            parse(r#"{"users":["a","b"]}"#).unwrap(),
            TopicReaders::Users(vec!["a".into(), "b".into()])
        );
        for bad in [
            r#""everyone""#,
            r#"{"users":"a"}"#,
            r#"{"groups":["a"]}"#,
            "42",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            serde_json::to_string(&TopicReaders::Users(vec!["a".into()])).unwrap(),
            r#"{"users":["a"]}"#
        );
    }

    #[test]
    fn readers_rules_admit_whom_they_say() {
        let listed = TopicReaders::Users(vec!["u1".into()]);
        assert!(TopicReaders::Public.admits(None));
        assert!(!TopicReaders::Authenticated.admits(None));
        assert!(TopicReaders::Authenticated.admits(Some("anyone")));
        assert!(listed.admits(Some("u1")));
        assert!(!listed.admits(Some("u2")));
        assert!(!listed.admits(None));
    }
}
