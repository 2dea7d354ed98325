//! Mutations: adapters over [`crate::domain`]. Each turns its input into a
//! domain call and the outcome into a payload carrying its entity beside
//! `errors` (user errors are data, not GraphQL errors, so clients can show
//! them field by field). The rules themselves live in the domain.

use async_graphql::{Context, InputObject, Object, SimpleObject, ID};

use super::types::{Channel, Comment, Message, Notification, Post, User, UserError};
use super::{client_addr, ctx_deps, rate_limited_error, viewer};
use crate::domain::channels::NewChannel;
use crate::domain::messages::Allowance;
use crate::domain::posts::PostChange;
use crate::domain::users::{ProfileChange, SignUp};
use crate::domain::{DomainError, Written};
use crate::error::ErrorCode;

pub struct Mutation;

/// A mutation payload: the entity under its type's name beside `errors`,
/// built from an outcome split by [`outcome`] or [`plain`].
macro_rules! payload {
    ($name:ident, $field:ident: $ty:ty) => {
        #[derive(SimpleObject, Default)]
        pub struct $name {
            pub $field: Option<$ty>,
            pub errors: Vec<UserError>,
        }

        impl From<(Option<$ty>, Vec<UserError>)> for $name {
            fn from(($field, errors): (Option<$ty>, Vec<UserError>)) -> Self {
                Self { $field, errors }
            }
        }
    };
}

#[derive(InputObject)]
pub struct CreateUserInput {
    pub email: String,
    pub name: String,
    pub password: String,
}

payload!(CreateUserPayload, user: User);

#[derive(InputObject)]
pub struct LoginInput {
    pub email: String,
    pub password: String,
}

#[derive(SimpleObject, Default)]
pub struct LoginPayload {
    /// A bearer token for HTTP and WebSocket.
    pub token: Option<String>,
    pub user: Option<User>,
    pub errors: Vec<UserError>,
}

#[derive(InputObject)]
pub struct UpdateUserInput {
    pub id: ID,
    pub name: Option<String>,
    pub email: Option<String>,
    pub password: Option<String>,
}

payload!(UpdateUserPayload, user: User);

#[derive(InputObject)]
pub struct DeleteUserInput {
    pub id: ID,
}

payload!(DeleteUserPayload, user: User);

#[derive(InputObject)]
pub struct CreatePostInput {
    pub title: String,
    pub content: String,
}

payload!(CreatePostPayload, post: Post);

#[derive(InputObject)]
pub struct UpdatePostInput {
    pub id: ID,
    pub title: Option<String>,
    pub content: Option<String>,
}

payload!(UpdatePostPayload, post: Post);

#[derive(InputObject)]
pub struct DeletePostInput {
    pub id: ID,
}

payload!(DeletePostPayload, post: Post);

#[derive(InputObject)]
pub struct CreateCommentInput {
    pub post_id: ID,
    pub content: String,
}

payload!(CreateCommentPayload, comment: Comment);

#[derive(InputObject)]
pub struct CreateChannelInput {
    pub name: String,
    /// Private channels are readable and writable by their members only.
    #[graphql(default)]
    pub is_private: bool,
    /// Members besides the creator.
    #[graphql(default)]
    pub member_ids: Vec<ID>,
}

payload!(CreateChannelPayload, channel: Channel);

#[derive(InputObject)]
pub struct JoinChannelInput {
    pub channel_id: ID,
}

payload!(JoinChannelPayload, channel: Channel);

#[derive(InputObject)]
pub struct SendMessageInput {
    pub channel_id: ID,
    pub content: String,
}

payload!(SendMessagePayload, message: Message);

#[derive(InputObject)]
pub struct MarkNotificationReadInput {
    pub id: ID,
}

payload!(MarkNotificationReadPayload, notification: Notification);

/// An input field's name as the schema spells it (`channel_id` →
/// `channelId`).
fn schema_field(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut upper = false;
    for c in field.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// The user errors of a refusal.
fn refused(error: DomainError) -> Vec<UserError> {
    let one =
        |field: Option<&str>, message: String, code| vec![UserError::new(field, message, code)];
    match error {
        DomainError::Invalid(problems) => problems
            .into_iter()
            .map(|p| {
                UserError::new(
                    Some(&schema_field(p.field)),
                    p.message,
                    ErrorCode::ValidationError,
                )
            })
            .collect(),
        DomainError::Unauthorized => one(
            None,
            "authentication required".into(),
            ErrorCode::Unauthorized,
        ),
        DomainError::WrongCredentials => one(
            None,
            "the email or password is wrong".into(),
            ErrorCode::Unauthorized,
        ),
        DomainError::Forbidden(message) => one(None, message.into(), ErrorCode::Forbidden),
        DomainError::NotFound { field, what } => one(
            Some(&schema_field(field)),
            format!("{what} not found"),
            ErrorCode::NotFound,
        ),
        DomainError::MissingMember(id) => one(
            Some("memberIds"),
            format!("user {id} not found"),
            ErrorCode::NotFound,
        ),
        DomainError::Conflict { field } => one(
            Some(&schema_field(field)),
            format!("{field} is already taken"),
            ErrorCode::Conflict,
        ),
        DomainError::RateLimited(limited) => {
            one(None, format!("{limited}"), ErrorCode::RateLimited)
        }
        DomainError::Unavailable(_) => one(
            None,
            "the store is unavailable; nothing was changed; try again".into(),
            ErrorCode::Internal,
        ),
        DomainError::Internal(message) => one(None, message, ErrorCode::Internal),
    }
}

/// A write's entity, and user errors for what did not follow it (events
/// not published, follow-up writes that failed): the write stands.
fn written<T, E>(written: Written<T>, wrap: impl FnOnce(T) -> E) -> (Option<E>, Vec<UserError>) {
    let mut errors: Vec<UserError> = written
        .unpublished
        .into_iter()
        .map(|u| {
            UserError::new(
                None,
                format!(
                    "saved, but the {} event could not be published: {}",
                    u.kind, u.error
                ),
                ErrorCode::Internal,
            )
        })
        .collect();
    errors.extend(written.incomplete.into_iter().flat_map(refused));
    (Some(wrap(written.value)), errors)
}

/// Splits a domain outcome into a payload's entity and errors.
fn outcome<T, E>(
    result: Result<Written<T>, DomainError>,
    wrap: impl FnOnce(T) -> E,
) -> (Option<E>, Vec<UserError>) {
    match result {
        Ok(w) => written(w, wrap),
        Err(e) => (None, refused(e)),
    }
}

/// The same for writes that publish nothing.
fn plain<T, E>(
    result: Result<T, DomainError>,
    wrap: impl FnOnce(T) -> E,
) -> (Option<E>, Vec<UserError>) {
    match result {
        Ok(v) => (Some(wrap(v)), Vec::new()),
        Err(e) => (None, refused(e)),
    }
}

#[Object]
impl Mutation {
    /// Signs up a user. Limited per client address
    /// (`ratelimit.login_per_second`, shared with `login`) and by the
    /// node's password hashing slots: over either, a `RATE_LIMITED` error
    /// with `extensions.retryAfterMs`.
    async fn create_user(
        &self,
        ctx: &Context<'_>,
        input: CreateUserInput,
    ) -> async_graphql::Result<CreateUserPayload> {
        let domain = &ctx_deps(ctx).domain;
        let signup = SignUp {
            email: input.email,
            name: input.name,
            password: input.password,
        };
        match domain.create_user(client_addr(ctx), signup).await {
            Err(DomainError::RateLimited(limited)) => Err(rate_limited_error(&limited)),
            // The caller typed this email: it is theirs to see.
            result => Ok(plain(result, User::for_owner).into()),
        }
    }

    /// Exchanges an email and password for a bearer token. Limited per
    /// client address (`ratelimit.login_per_second`), per email
    /// (`ratelimit.login_email_per_second`) and by the node's password
    /// hashing slots: over any, a `RATE_LIMITED` error with
    /// `extensions.retryAfterMs`.
    async fn login(
        &self,
        ctx: &Context<'_>,
        input: LoginInput,
    ) -> async_graphql::Result<LoginPayload> {
        let domain = &ctx_deps(ctx).domain;
        match domain
            .login(client_addr(ctx), &input.email, input.password)
            .await
        {
            Ok(session) => Ok(LoginPayload {
                token: Some(session.token),
                user: Some(User::for_owner(session.user)),
                errors: vec![],
            }),
            Err(DomainError::RateLimited(limited)) => Err(rate_limited_error(&limited)),
            Err(e) => Ok(LoginPayload {
                errors: refused(e),
                ..Default::default()
            }),
        }
    }

    /// Updates the caller's own profile.
    async fn update_user(&self, ctx: &Context<'_>, input: UpdateUserInput) -> UpdateUserPayload {
        let domain = &ctx_deps(ctx).domain;
        let change = ProfileChange {
            id: input.id.0,
            name: input.name,
            email: input.email,
            password: input.password,
        };
        outcome(domain.update_user(viewer(ctx), change).await, User::new).into()
    }

    /// Deletes the caller's own account.
    async fn delete_user(&self, ctx: &Context<'_>, input: DeleteUserInput) -> DeleteUserPayload {
        let domain = &ctx_deps(ctx).domain;
        outcome(domain.delete_user(viewer(ctx), &input.id).await, User::new).into()
    }

    /// Creates a post by the caller; publishes `post.created` on `posts`.
    async fn create_post(&self, ctx: &Context<'_>, input: CreatePostInput) -> CreatePostPayload {
        let domain = &ctx_deps(ctx).domain;
        let result = domain
            .create_post(viewer(ctx), input.title, input.content)
            .await;
        outcome(result, Post::new).into()
    }

    /// Edits one of the caller's posts; publishes `post.updated` on `post:{id}`.
    async fn update_post(&self, ctx: &Context<'_>, input: UpdatePostInput) -> UpdatePostPayload {
        let domain = &ctx_deps(ctx).domain;
        let change = PostChange {
            id: input.id.0,
            title: input.title,
            content: input.content,
        };
        outcome(domain.update_post(viewer(ctx), change).await, Post::new).into()
    }

    /// Deletes one of the caller's posts; publishes `post.deleted` on `post:{id}`.
    async fn delete_post(&self, ctx: &Context<'_>, input: DeletePostInput) -> DeletePostPayload {
        let domain = &ctx_deps(ctx).domain;
        outcome(domain.delete_post(viewer(ctx), &input.id).await, Post::new).into()
    }

    /// Comments on a post; publishes `comment.created` on `post:{id}` and
    /// notifies the post's author.
    async fn create_comment(
        &self,
        ctx: &Context<'_>,
        input: CreateCommentInput,
    ) -> CreateCommentPayload {
        let domain = &ctx_deps(ctx).domain;
        let result = domain
            .create_comment(viewer(ctx), &input.post_id, input.content)
            .await;
        outcome(result, Comment).into()
    }

    /// Creates a channel owned by the caller.
    async fn create_channel(
        &self,
        ctx: &Context<'_>,
        input: CreateChannelInput,
    ) -> CreateChannelPayload {
        let domain = &ctx_deps(ctx).domain;
        let new = NewChannel {
            name: input.name,
            is_private: input.is_private,
            member_ids: input.member_ids.into_iter().map(|id| id.0).collect(),
        };
        plain(domain.create_channel(viewer(ctx), new).await, Channel).into()
    }

    /// Joins a public channel.
    async fn join_channel(&self, ctx: &Context<'_>, input: JoinChannelInput) -> JoinChannelPayload {
        let domain = &ctx_deps(ctx).domain;
        let result = domain.join_channel(viewer(ctx), &input.channel_id).await;
        plain(result, Channel).into()
    }

    /// Sends a message to a channel; publishes `message.created`
    /// `{"message": …}` on `channel:{id}`, the same event the envelope
    /// WebSocket's `message.send` publishes, within the same per-user
    /// allowance (`ratelimit.user_messages_per_second`).
    async fn send_message(&self, ctx: &Context<'_>, input: SendMessageInput) -> SendMessagePayload {
        let domain = &ctx_deps(ctx).domain;
        let result = domain
            .send_message(
                viewer(ctx),
                &input.channel_id,
                input.content,
                Allowance::Charge,
            )
            .await;
        outcome(result, Message::new).into()
    }

    /// Marks one of the caller's notifications read.
    async fn mark_notification_read(
        &self,
        ctx: &Context<'_>,
        input: MarkNotificationReadInput,
    ) -> MarkNotificationReadPayload {
        let domain = &ctx_deps(ctx).domain;
        let result = domain.mark_notification_read(viewer(ctx), &input.id).await;
        plain(result, Notification::new).into()
    }
}

#[cfg(test)]
mod tests {
    use super::schema_field;

    #[test]
    fn domain_fields_are_spelt_as_the_schema_spells_them() {
        assert_eq!(schema_field("channel_id"), "channelId");
        assert_eq!(schema_field("member_ids"), "memberIds");
        assert_eq!(schema_field("email"), "email");
    }
}
