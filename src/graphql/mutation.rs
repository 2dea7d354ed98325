//! Mutations: adapters over [`crate::domain`]. Each turns its input into a
//! domain call and the outcome into a payload carrying its entity beside
//! `errors` (user errors are data, not GraphQL errors, so clients can show
//! them field by field). The rules themselves live in the domain.

use async_graphql::{Context, InputObject, Object, SimpleObject, ID};

use super::types::{Channel, Comment, Message, Notification, Post, User, UserError};
use super::{ctx_deps, viewer};
use crate::domain::channels::NewChannel;
use crate::domain::messages::Allowance;
use crate::domain::posts::PostChange;
use crate::domain::users::{ProfileChange, SignUp};
use crate::domain::{DomainError, Written};
use crate::error::ErrorCode;

pub struct Mutation;

#[derive(InputObject)]
pub struct CreateUserInput {
    pub email: String,
    pub name: String,
    pub password: String,
}

#[derive(SimpleObject, Default)]
pub struct CreateUserPayload {
    pub user: Option<User>,
    pub errors: Vec<UserError>,
}

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

#[derive(SimpleObject, Default)]
pub struct UpdateUserPayload {
    pub user: Option<User>,
    pub errors: Vec<UserError>,
}

#[derive(InputObject)]
pub struct DeleteUserInput {
    pub id: ID,
}

#[derive(SimpleObject, Default)]
pub struct DeleteUserPayload {
    pub user: Option<User>,
    pub errors: Vec<UserError>,
}

#[derive(InputObject)]
pub struct CreatePostInput {
    pub title: String,
    pub content: String,
}

#[derive(SimpleObject, Default)]
pub struct CreatePostPayload {
    pub post: Option<Post>,
    pub errors: Vec<UserError>,
}

#[derive(InputObject)]
pub struct UpdatePostInput {
    pub id: ID,
    pub title: Option<String>,
    pub content: Option<String>,
}

#[derive(SimpleObject, Default)]
pub struct UpdatePostPayload {
    pub post: Option<Post>,
    pub errors: Vec<UserError>,
}

#[derive(InputObject)]
pub struct DeletePostInput {
    pub id: ID,
}

#[derive(SimpleObject, Default)]
pub struct DeletePostPayload {
    pub post: Option<Post>,
    pub errors: Vec<UserError>,
}

#[derive(InputObject)]
pub struct CreateCommentInput {
    pub post_id: ID,
    pub content: String,
}

#[derive(SimpleObject, Default)]
pub struct CreateCommentPayload {
    pub comment: Option<Comment>,
    pub errors: Vec<UserError>,
}

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

#[derive(SimpleObject, Default)]
pub struct CreateChannelPayload {
    pub channel: Option<Channel>,
    pub errors: Vec<UserError>,
}

#[derive(InputObject)]
pub struct JoinChannelInput {
    pub channel_id: ID,
}

#[derive(SimpleObject, Default)]
pub struct JoinChannelPayload {
    pub channel: Option<Channel>,
    pub errors: Vec<UserError>,
}

#[derive(InputObject)]
pub struct SendMessageInput {
    pub channel_id: ID,
    pub content: String,
}

#[derive(SimpleObject, Default)]
pub struct SendMessagePayload {
    pub message: Option<Message>,
    pub errors: Vec<UserError>,
}

#[derive(InputObject)]
pub struct MarkNotificationReadInput {
    pub id: ID,
}

#[derive(SimpleObject, Default)]
pub struct MarkNotificationReadPayload {
    pub notification: Option<Notification>,
    pub errors: Vec<UserError>,
}

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
    /// Signs up a user.
    async fn create_user(&self, ctx: &Context<'_>, input: CreateUserInput) -> CreateUserPayload {
        let domain = &ctx_deps(ctx).domain;
        let signup = SignUp {
            email: input.email,
            name: input.name,
            password: input.password,
        };
        let (user, errors) = plain(domain.create_user(signup).await, User::new);
        CreateUserPayload { user, errors }
    }

    /// Exchanges an email and password for a bearer token.
    async fn login(&self, ctx: &Context<'_>, input: LoginInput) -> LoginPayload {
        let domain = &ctx_deps(ctx).domain;
        match domain.login(&input.email, input.password).await {
            Ok(session) => LoginPayload {
                token: Some(session.token),
                user: Some(User::new(session.user)),
                errors: vec![],
            },
            Err(e) => LoginPayload {
                errors: refused(e),
                ..Default::default()
            },
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
        let (user, errors) = outcome(domain.update_user(viewer(ctx), change).await, User::new);
        UpdateUserPayload { user, errors }
    }

    /// Deletes the caller's own account.
    async fn delete_user(&self, ctx: &Context<'_>, input: DeleteUserInput) -> DeleteUserPayload {
        let domain = &ctx_deps(ctx).domain;
        let (user, errors) = outcome(domain.delete_user(viewer(ctx), &input.id).await, User::new);
        DeleteUserPayload { user, errors }
    }

    /// Creates a post by the caller; publishes `post.created` on `posts`.
    async fn create_post(&self, ctx: &Context<'_>, input: CreatePostInput) -> CreatePostPayload {
        let domain = &ctx_deps(ctx).domain;
        let result = domain
            .create_post(viewer(ctx), input.title, input.content)
            .await;
        let (post, errors) = outcome(result, Post::new);
        CreatePostPayload { post, errors }
    }

    /// Edits one of the caller's posts; publishes `post.updated` on `post:{id}`.
    async fn update_post(&self, ctx: &Context<'_>, input: UpdatePostInput) -> UpdatePostPayload {
        let domain = &ctx_deps(ctx).domain;
        let change = PostChange {
            id: input.id.0,
            title: input.title,
            content: input.content,
        };
        let (post, errors) = outcome(domain.update_post(viewer(ctx), change).await, Post::new);
        UpdatePostPayload { post, errors }
    }

    /// Deletes one of the caller's posts; publishes `post.deleted` on `post:{id}`.
    async fn delete_post(&self, ctx: &Context<'_>, input: DeletePostInput) -> DeletePostPayload {
        let domain = &ctx_deps(ctx).domain;
        let (post, errors) = outcome(domain.delete_post(viewer(ctx), &input.id).await, Post::new);
        DeletePostPayload { post, errors }
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
        let (comment, errors) = outcome(result, Comment);
        CreateCommentPayload { comment, errors }
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
        let (channel, errors) = plain(domain.create_channel(viewer(ctx), new).await, Channel);
        CreateChannelPayload { channel, errors }
    }

    /// Joins a public channel.
    async fn join_channel(&self, ctx: &Context<'_>, input: JoinChannelInput) -> JoinChannelPayload {
        let domain = &ctx_deps(ctx).domain;
        let result = domain.join_channel(viewer(ctx), &input.channel_id).await;
        let (channel, errors) = plain(result, Channel);
        JoinChannelPayload { channel, errors }
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
        let (message, errors) = outcome(result, Message::new);
        SendMessagePayload { message, errors }
    }

    /// Marks one of the caller's notifications read.
    async fn mark_notification_read(
        &self,
        ctx: &Context<'_>,
        input: MarkNotificationReadInput,
    ) -> MarkNotificationReadPayload {
        let domain = &ctx_deps(ctx).domain;
        let result = domain.mark_notification_read(viewer(ctx), &input.id).await;
        let (notification, errors) = plain(result, Notification::new);
        MarkNotificationReadPayload {
            notification,
            errors,
        }
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
