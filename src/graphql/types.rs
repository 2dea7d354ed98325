//! The object types of the schema, their cursors and connections.

use std::sync::Arc;

use async_graphql::connection::{Connection, CursorType, Edge};
use async_graphql::{ComplexObject, Context, Json, Object, Result, SimpleObject, ID};
use base64::Engine;
use chrono::{DateTime, Utc};

use super::{ctx_deps, loaders, paged, posts_page, store_error, viewer};
use crate::error::ErrorCode;
use crate::store::Store;
use crate::store::{self, Page};

/// An opaque cursor: the item's position in its list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor(pub u64);

impl CursorType for Cursor {
    type Error = String;

    fn decode_cursor(s: &str) -> Result<Self, Self::Error> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| "invalid cursor".to_owned())?;
        let text = String::from_utf8(bytes).map_err(|_| "invalid cursor".to_owned())?;
        text.strip_prefix("c1:")
            .and_then(|n| n.parse().ok())
            .map(Cursor)
            .ok_or_else(|| "invalid cursor".to_owned())
    }

    fn encode_cursor(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("c1:{}", self.0))
    }
}

/// Fields every connection carries beside edges and pageInfo.
#[derive(SimpleObject)]
pub struct ConnectionFields {
    /// The number of items in the whole list.
    pub total_count: usize,
}

pub type Conn<T> = Connection<Cursor, T, ConnectionFields>;

/// Turns a store page into a connection of `T`.
pub fn connection<S, T: async_graphql::OutputType>(
    page: Page<S>,
    wrap: impl Fn(S) -> T,
) -> Conn<T> {
    let mut conn = Connection::with_additional_fields(
        page.has_previous_page,
        page.has_next_page,
        ConnectionFields {
            total_count: page.total_count,
        },
    );
    conn.edges.extend(
        page.items
            .into_iter()
            .map(|(seq, item)| Edge::new(Cursor(seq), wrap(item))),
    );
    conn
}

/// A mutation error carried in its payload.
#[derive(SimpleObject, Debug, Clone)]
pub struct UserError {
    /// The input field at fault, when there is one.
    pub field: Option<String>,
    pub message: String,
    pub code: ErrorCode,
}

impl UserError {
    pub fn new(field: Option<&str>, message: impl Into<String>, code: ErrorCode) -> Self {
        Self {
            field: field.map(str::to_owned),
            message: message.into(),
            code,
        }
    }
}

/// Shared, so that one decoded event serves every subscriber without a copy.
/// The second field says the caller is known to own the account although
/// no token says so yet (the payloads of `createUser` and `login`).
pub struct User(pub Arc<store::User>, bool);

impl User {
    pub fn new(value: store::User) -> Self {
        Self::shared(Arc::new(value))
    }

    pub fn shared(value: Arc<store::User>) -> Self {
        Self(value, false)
    }

    /// A user shown to whoever just proved to own it (signed up with or
    /// logged in as it): its email included.
    pub fn for_owner(value: store::User) -> Self {
        Self(Arc::new(value), true)
    }
}

#[Object]
impl User {
    async fn id(&self) -> ID {
        ID(self.0.id.clone())
    }
    /// The email address, shown to the user it belongs to only: null for
    /// anyone else (and events never carry it).
    async fn email(&self, ctx: &Context<'_>) -> Result<Option<String>> {
        let owner = self.1 || super::viewer(ctx).is_some_and(|me| me.user_id == self.0.id);
        if !owner {
            return Ok(None);
        }
        if !self.0.email.is_empty() {
            return Ok(Some(self.0.email.clone()));
        }
        // Decoded from an event, which carries no email: the owner's is read.
        Ok(super::loaders::user(ctx, &self.0.id)
            .await?
            .map(|me| me.0.email.clone()))
    }
    async fn name(&self) -> &str {
        &self.0.name
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
    async fn updated_at(&self) -> DateTime<Utc> {
        self.0.updated_at
    }
    /// The user's posts, newest first.
    #[graphql(complexity = "super::list_complexity(first, child_complexity)")]
    async fn posts(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
        after: Option<String>,
    ) -> Result<Conn<Post>> {
        posts_page(ctx, first, after, Some(&self.0.id)).await
    }
}

/// Shared, so that one decoded event serves every subscriber without a copy.
pub struct Post(pub Arc<store::Post>);

impl Post {
    pub fn new(value: store::Post) -> Self {
        Self(Arc::new(value))
    }
}

#[Object]
impl Post {
    async fn id(&self) -> ID {
        ID(self.0.id.clone())
    }
    async fn title(&self) -> &str {
        &self.0.title
    }
    async fn content(&self) -> &str {
        &self.0.content
    }
    /// The author; null when the account was deleted.
    async fn author(&self, ctx: &Context<'_>) -> Result<Option<User>> {
        loaders::user(ctx, &self.0.author_id).await
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
    async fn updated_at(&self) -> DateTime<Utc> {
        self.0.updated_at
    }
    /// Comments, oldest first.
    #[graphql(complexity = "super::list_complexity(first, child_complexity)")]
    async fn comments(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
        after: Option<String>,
    ) -> Result<Conn<Comment>> {
        let post = &self.0.id;
        paged(
            ctx,
            first,
            after,
            |s, p| async move { s.list_comments(post, p).await },
            Comment,
        )
        .await
    }
}

pub struct Comment(pub store::Comment);

#[Object]
impl Comment {
    async fn id(&self) -> ID {
        ID(self.0.id.clone())
    }
    async fn content(&self) -> &str {
        &self.0.content
    }
    async fn author(&self, ctx: &Context<'_>) -> Result<Option<User>> {
        loaders::user(ctx, &self.0.author_id).await
    }
    async fn post(&self, ctx: &Context<'_>) -> Result<Option<Post>> {
        loaders::post(ctx, &self.0.post_id).await
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
}

pub struct Channel(pub store::Channel);

#[Object]
impl Channel {
    async fn id(&self) -> ID {
        ID(self.0.id.clone())
    }
    async fn name(&self) -> &str {
        &self.0.name
    }
    /// Private channels are readable by their members only.
    async fn is_private(&self) -> bool {
        self.0.is_private
    }
    async fn owner(&self, ctx: &Context<'_>) -> Result<Option<User>> {
        loaders::user(ctx, &self.0.owner_id).await
    }
    #[graphql(complexity = "10 * child_complexity")]
    async fn members(&self, ctx: &Context<'_>) -> Result<Vec<User>> {
        let users = ctx_deps(ctx)
            .store
            .get_users(&self.0.member_ids)
            .await
            .map_err(store_error)?;
        Ok(users.into_iter().flatten().map(User::new).collect())
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
    /// Messages, newest first.
    #[graphql(complexity = "super::list_complexity(first, child_complexity)")]
    async fn messages(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
        after: Option<String>,
    ) -> Result<Conn<Message>> {
        let channel = &self.0.id;
        let list = |s: Arc<dyn Store>, p| async move { s.list_messages(channel, p).await };
        paged(ctx, first, after, list, Message::new).await
    }
    /// The users online in this channel now, on any node, ordered by user
    /// id. Changes arrive as `presence.updated` events on `channel:{id}`.
    #[graphql(complexity = "10 * child_complexity")]
    async fn online_users(&self, ctx: &Context<'_>) -> Result<Vec<OnlineUser>> {
        let online = ctx_deps(ctx)
            .presence
            .online(&self.0.id)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "presence unavailable");
                super::coded_error(ErrorCode::Internal, "presence is unavailable; try again")
            })?;
        Ok(online.into_iter().map(OnlineUser).collect())
    }
}

/// A user present in a channel, with the status they set.
pub struct OnlineUser(pub crate::presence::OnlineUser);

#[Object]
impl OnlineUser {
    async fn user_id(&self) -> ID {
        ID(self.0.user_id.clone())
    }
    /// The user's profile; null when the id has no account (a token may
    /// name any subject).
    async fn user(&self, ctx: &Context<'_>) -> Result<Option<User>> {
        loaders::user(ctx, &self.0.user_id).await
    }
    async fn status(&self) -> crate::presence::Status {
        self.0.status
    }
}

impl Channel {
    /// Whether the caller of `ctx` may read this channel.
    pub fn readable_by(&self, user_id: Option<&str>) -> bool {
        crate::domain::channels::readable_by(&self.0, user_id)
    }
}

/// A message; `.1` is the resume position of the event that delivered it,
/// when it came through a subscription.
pub struct Message(pub Arc<store::Message>, pub Option<String>);

impl Message {
    /// A message read or written here, not delivered by an event.
    pub fn new(value: store::Message) -> Self {
        Self(Arc::new(value), None)
    }
}

#[Object]
impl Message {
    async fn id(&self) -> ID {
        ID(self.0.id.clone())
    }
    async fn channel_id(&self) -> ID {
        ID(self.0.channel_id.clone())
    }
    async fn content(&self) -> &str {
        &self.0.content
    }
    async fn author(&self, ctx: &Context<'_>) -> Result<Option<User>> {
        loaders::user(ctx, &self.0.author_id).await
    }
    async fn channel(&self, ctx: &Context<'_>) -> Result<Option<Channel>> {
        let channel = loaders::channel(ctx, &self.0.channel_id).await?;
        let me = viewer(ctx).map(|p| p.user_id.clone());
        Ok(channel.filter(|c| c.readable_by(me.as_deref())))
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
    /// On a subscription, the resume position of the event that delivered
    /// this message: pass it as `messageReceived(after:)` to resume after it.
    /// Null when the message was read by a query.
    async fn event_id(&self) -> Option<ID> {
        self.1.clone().map(ID)
    }
}

/// Shared, so that one decoded event serves every subscriber without a copy.
pub struct Notification(pub Arc<store::Notification>);

impl Notification {
    pub fn new(value: store::Notification) -> Self {
        Self(Arc::new(value))
    }
}

#[Object]
impl Notification {
    async fn id(&self) -> ID {
        ID(self.0.id.clone())
    }
    /// What happened, such as `comment.created`.
    #[graphql(name = "type")]
    async fn kind(&self) -> &str {
        &self.0.kind
    }
    async fn message(&self) -> &str {
        &self.0.message
    }
    async fn payload(&self) -> Json<serde_json::Value> {
        Json(self.0.payload.clone())
    }
    async fn read(&self) -> bool {
        self.0.read
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
}

/// An event of any topic, as backends publish them.
#[derive(SimpleObject)]
#[graphql(complex)]
pub struct Event {
    /// The resume position.
    pub id: ID,
    pub topic: String,
    #[graphql(name = "type")]
    pub kind: String,
    pub payload: Json<serde_json::Value>,
    #[graphql(skip)]
    pub timestamp_text: String,
}

#[ComplexObject]
impl Event {
    async fn timestamp(&self) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(&self.timestamp_text)
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_else(|_| Utc::now())
    }
}
