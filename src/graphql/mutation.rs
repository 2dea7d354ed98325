//! Mutations. Each writes to the store, publishes its event, and answers a
//! payload carrying its entity beside `errors` (user errors are data, not
//! GraphQL errors, so clients can show them field by field).

use async_graphql::{Context, InputObject, Object, Result, SimpleObject, ID};
use serde::Serialize;

use super::types::{Channel, Comment, Message, Notification, Post, User, UserError};
use super::{ctx_deps, viewer, SchemaDeps};
use crate::domain::{self, SendRefusal};
use crate::error::ErrorCode;
use crate::event::{topic, NewEvent};
use crate::store::{self, NewUser, PostPatch, StoreError, UserPatch};

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

/// Limits of the domain's text fields (characters).
const MAX_NAME: usize = 100;
const MAX_TITLE: usize = 200;
const MAX_CONTENT: usize = 100_000;
const MAX_COMMENT: usize = 10_000;
const MIN_PASSWORD: usize = 8;
const MAX_PASSWORD: usize = 128;

fn invalid(field: &str, message: impl Into<String>) -> UserError {
    UserError::new(Some(field), message, ErrorCode::ValidationError)
}

fn unauthorized() -> UserError {
    UserError::new(None, "authentication required", ErrorCode::Unauthorized)
}

fn forbidden(message: &str) -> UserError {
    UserError::new(None, message, ErrorCode::Forbidden)
}

fn not_found(field: &str, what: &str) -> UserError {
    UserError::new(
        Some(field),
        format!("{what} not found"),
        ErrorCode::NotFound,
    )
}

/// The user error for a store failure.
fn store_user_error(err: StoreError, field: &str, what: &str) -> UserError {
    match err {
        StoreError::NotFound => not_found(field, what),
        StoreError::Conflict { field } => UserError::new(
            Some(field),
            format!("{field} is already taken"),
            ErrorCode::Conflict,
        ),
        StoreError::Unavailable(why) => {
            tracing::warn!(%why, "store unavailable during a mutation");
            UserError::new(
                None,
                "the store is unavailable; nothing was changed; try again",
                ErrorCode::Internal,
            )
        }
    }
}

/// Checks an email address the way a sign-up form should: one `@`, a
/// non-empty local part, a dotted domain, no spaces, at most 254 bytes.
pub fn valid_email(email: &str) -> bool {
    if email.len() > 254 || email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return false;
    }
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..")
}

fn check_text(errors: &mut Vec<UserError>, field: &str, value: &str, max: usize) {
    if value.trim().is_empty() {
        errors.push(invalid(field, format!("{field} must not be empty")));
    } else if value.chars().count() > max {
        errors.push(invalid(
            field,
            format!("{field} must be at most {max} characters"),
        ));
    }
}

fn check_password(errors: &mut Vec<UserError>, password: &str) {
    let n = password.chars().count();
    if !(MIN_PASSWORD..=MAX_PASSWORD).contains(&n) {
        errors.push(invalid(
            "password",
            format!("password must be {MIN_PASSWORD} to {MAX_PASSWORD} characters"),
        ));
    }
}

/// Hashes off the async threads: argon2 is deliberately slow.
async fn hash_password(password: String) -> Result<String, UserError> {
    tokio::task::spawn_blocking(move || {
        use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
        let salt = SaltString::generate(&mut OsRng);
        argon2::Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
    })
    .await
    .ok()
    .and_then(Result::ok)
    .ok_or_else(|| {
        UserError::new(
            Some("password"),
            "the password could not be hashed",
            ErrorCode::Internal,
        )
    })
}

async fn verify_password(password: String, hash: String) -> bool {
    tokio::task::spawn_blocking(move || {
        use argon2::password_hash::{PasswordHash, PasswordVerifier};
        PasswordHash::new(&hash)
            .map(|parsed| {
                argon2::Argon2::default()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok()
            })
            .unwrap_or(false)
    })
    .await
    .unwrap_or(false)
}

/// Publishes `payload` as an event; a failure becomes a user error (the
/// write stands, and the client is told the event did not go out).
async fn publish(
    deps: &SchemaDeps,
    topic: String,
    kind: &str,
    payload: &impl Serialize,
) -> Option<UserError> {
    let payload = match serde_json::to_value(payload) {
        Ok(v) => v,
        Err(_) => {
            return Some(UserError::new(
                None,
                "the event could not be encoded",
                ErrorCode::Internal,
            ))
        }
    };
    match deps.hub.publish(NewEvent::new(topic, kind, payload)).await {
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(error = %e, kind, "publish failed after a write");
            Some(UserError::new(
                None,
                format!("saved, but the {kind} event could not be published: {e}"),
                ErrorCode::Internal,
            ))
        }
    }
}

fn viewer_id(ctx: &Context<'_>) -> Option<String> {
    viewer(ctx).map(|p| p.user_id.clone())
}

#[Object]
impl Mutation {
    /// Signs up a user.
    async fn create_user(&self, ctx: &Context<'_>, input: CreateUserInput) -> CreateUserPayload {
        let deps = ctx_deps(ctx);
        let mut errors = Vec::new();
        let email = input.email.trim().to_owned();
        if !valid_email(&email) {
            errors.push(invalid("email", "email is not a valid address"));
        }
        check_text(&mut errors, "name", &input.name, MAX_NAME);
        check_password(&mut errors, &input.password);
        if !errors.is_empty() {
            return CreateUserPayload { user: None, errors };
        }
        let password_hash = match hash_password(input.password).await {
            Ok(h) => h,
            Err(e) => {
                return CreateUserPayload {
                    user: None,
                    errors: vec![e],
                }
            }
        };
        let new = NewUser {
            email,
            name: input.name.trim().to_owned(),
            password_hash,
        };
        match deps.store.create_user(new).await {
            Ok(user) => CreateUserPayload {
                user: Some(User::new(user)),
                errors: vec![],
            },
            Err(e) => CreateUserPayload {
                user: None,
                errors: vec![store_user_error(e, "email", "user")],
            },
        }
    }

    /// Exchanges an email and password for a bearer token.
    async fn login(&self, ctx: &Context<'_>, input: LoginInput) -> LoginPayload {
        let deps = ctx_deps(ctx);
        let refused = || LoginPayload {
            token: None,
            user: None,
            errors: vec![UserError::new(
                None,
                "the email or password is wrong",
                ErrorCode::Unauthorized,
            )],
        };
        let user = match deps.store.find_user_by_email(input.email.trim()).await {
            Ok(Some(user)) => user,
            Ok(None) => {
                // Same cost as a real check, so timing does not reveal which emails exist.
                let _ = hash_password(input.password).await;
                return refused();
            }
            Err(e) => {
                return LoginPayload {
                    errors: vec![store_user_error(e, "email", "user")],
                    ..Default::default()
                }
            }
        };
        if !verify_password(input.password, user.password_hash.clone()).await {
            return refused();
        }
        let ttl = std::time::Duration::from_secs(deps.settings.auth.login_token_ttl_seconds);
        match deps.auth.mint(&user.id, ttl, None) {
            Ok(token) => LoginPayload {
                token: Some(token),
                user: Some(User::new(user)),
                errors: vec![],
            },
            Err(e) => LoginPayload {
                errors: vec![UserError::new(None, e.to_string(), ErrorCode::Internal)],
                ..Default::default()
            },
        }
    }

    /// Updates the caller's own profile.
    async fn update_user(&self, ctx: &Context<'_>, input: UpdateUserInput) -> UpdateUserPayload {
        let deps = ctx_deps(ctx);
        let Some(me) = viewer_id(ctx) else {
            return UpdateUserPayload {
                user: None,
                errors: vec![unauthorized()],
            };
        };
        if me != input.id.as_str() {
            return UpdateUserPayload {
                user: None,
                errors: vec![forbidden("you may only update your own profile")],
            };
        }
        let mut errors = Vec::new();
        let email = input.email.map(|e| e.trim().to_owned());
        if let Some(email) = &email {
            if !valid_email(email) {
                errors.push(invalid("email", "email is not a valid address"));
            }
        }
        if let Some(name) = &input.name {
            check_text(&mut errors, "name", name, MAX_NAME);
        }
        if let Some(password) = &input.password {
            check_password(&mut errors, password);
        }
        if !errors.is_empty() {
            return UpdateUserPayload { user: None, errors };
        }
        let password_hash = match input.password {
            Some(p) => match hash_password(p).await {
                Ok(h) => Some(h),
                Err(e) => {
                    return UpdateUserPayload {
                        user: None,
                        errors: vec![e],
                    }
                }
            },
            None => None,
        };
        let patch = UserPatch {
            email,
            name: input.name.map(|n| n.trim().to_owned()),
            password_hash,
        };
        match deps.store.update_user(&me, patch).await {
            Ok(user) => {
                let errors = publish(deps, topic::user(&user.id), "user.updated", &user)
                    .await
                    .into_iter()
                    .collect();
                UpdateUserPayload {
                    user: Some(User::new(user)),
                    errors,
                }
            }
            Err(e) => UpdateUserPayload {
                user: None,
                errors: vec![store_user_error(e, "id", "user")],
            },
        }
    }

    /// Deletes the caller's own account.
    async fn delete_user(&self, ctx: &Context<'_>, input: DeleteUserInput) -> DeleteUserPayload {
        let deps = ctx_deps(ctx);
        let Some(me) = viewer_id(ctx) else {
            return DeleteUserPayload {
                user: None,
                errors: vec![unauthorized()],
            };
        };
        if me != input.id.as_str() {
            return DeleteUserPayload {
                user: None,
                errors: vec![forbidden("you may only delete your own account")],
            };
        }
        match deps.store.delete_user(&me).await {
            Ok(user) => {
                let errors = publish(deps, topic::user(&user.id), "user.deleted", &user)
                    .await
                    .into_iter()
                    .collect();
                DeleteUserPayload {
                    user: Some(User::new(user)),
                    errors,
                }
            }
            Err(e) => DeleteUserPayload {
                user: None,
                errors: vec![store_user_error(e, "id", "user")],
            },
        }
    }

    /// Creates a post by the caller; publishes `post.created` on `posts`.
    async fn create_post(&self, ctx: &Context<'_>, input: CreatePostInput) -> CreatePostPayload {
        let deps = ctx_deps(ctx);
        let Some(me) = viewer_id(ctx) else {
            return CreatePostPayload {
                post: None,
                errors: vec![unauthorized()],
            };
        };
        let mut errors = Vec::new();
        check_text(&mut errors, "title", &input.title, MAX_TITLE);
        if input.content.chars().count() > MAX_CONTENT {
            errors.push(invalid(
                "content",
                format!("content must be at most {MAX_CONTENT} characters"),
            ));
        }
        if !errors.is_empty() {
            return CreatePostPayload { post: None, errors };
        }
        match deps
            .store
            .create_post(&me, input.title.trim().to_owned(), input.content)
            .await
        {
            Ok(post) => {
                let errors = publish(deps, topic::POSTS.to_owned(), "post.created", &post)
                    .await
                    .into_iter()
                    .collect();
                CreatePostPayload {
                    post: Some(Post::new(post)),
                    errors,
                }
            }
            Err(e) => CreatePostPayload {
                post: None,
                errors: vec![store_user_error(e, "id", "post")],
            },
        }
    }

    /// Edits one of the caller's posts; publishes `post.updated` on `post:{id}`.
    async fn update_post(&self, ctx: &Context<'_>, input: UpdatePostInput) -> UpdatePostPayload {
        let deps = ctx_deps(ctx);
        let Some(me) = viewer_id(ctx) else {
            return UpdatePostPayload {
                post: None,
                errors: vec![unauthorized()],
            };
        };
        let mut errors = Vec::new();
        if let Some(title) = &input.title {
            check_text(&mut errors, "title", title, MAX_TITLE);
        }
        if input
            .content
            .as_ref()
            .is_some_and(|c| c.chars().count() > MAX_CONTENT)
        {
            errors.push(invalid(
                "content",
                format!("content must be at most {MAX_CONTENT} characters"),
            ));
        }
        if !errors.is_empty() {
            return UpdatePostPayload { post: None, errors };
        }
        match owned_post(deps, &input.id, &me).await {
            Ok(_) => {}
            Err(e) => {
                return UpdatePostPayload {
                    post: None,
                    errors: vec![e],
                }
            }
        }
        let patch = PostPatch {
            title: input.title.map(|t| t.trim().to_owned()),
            content: input.content,
        };
        match deps.store.update_post(&input.id, patch).await {
            Ok(post) => {
                let errors = publish(deps, topic::post(&post.id), "post.updated", &post)
                    .await
                    .into_iter()
                    .collect();
                UpdatePostPayload {
                    post: Some(Post::new(post)),
                    errors,
                }
            }
            Err(e) => UpdatePostPayload {
                post: None,
                errors: vec![store_user_error(e, "id", "post")],
            },
        }
    }

    /// Deletes one of the caller's posts; publishes `post.deleted` on `post:{id}`.
    async fn delete_post(&self, ctx: &Context<'_>, input: DeletePostInput) -> DeletePostPayload {
        let deps = ctx_deps(ctx);
        let Some(me) = viewer_id(ctx) else {
            return DeletePostPayload {
                post: None,
                errors: vec![unauthorized()],
            };
        };
        if let Err(e) = owned_post(deps, &input.id, &me).await {
            return DeletePostPayload {
                post: None,
                errors: vec![e],
            };
        }
        match deps.store.delete_post(&input.id).await {
            Ok(post) => {
                let errors = publish(deps, topic::post(&post.id), "post.deleted", &post)
                    .await
                    .into_iter()
                    .collect();
                DeletePostPayload {
                    post: Some(Post::new(post)),
                    errors,
                }
            }
            Err(e) => DeletePostPayload {
                post: None,
                errors: vec![store_user_error(e, "id", "post")],
            },
        }
    }

    /// Comments on a post; publishes `comment.created` on `post:{id}` and
    /// notifies the post's author.
    async fn create_comment(
        &self,
        ctx: &Context<'_>,
        input: CreateCommentInput,
    ) -> CreateCommentPayload {
        let deps = ctx_deps(ctx);
        let Some(me) = viewer_id(ctx) else {
            return CreateCommentPayload {
                comment: None,
                errors: vec![unauthorized()],
            };
        };
        let mut errors = Vec::new();
        check_text(&mut errors, "content", &input.content, MAX_COMMENT);
        if !errors.is_empty() {
            return CreateCommentPayload {
                comment: None,
                errors,
            };
        }
        let post = match deps.store.get_posts(&[input.post_id.to_string()]).await {
            Ok(mut found) => match found.pop().flatten() {
                Some(post) => post,
                None => {
                    return CreateCommentPayload {
                        comment: None,
                        errors: vec![not_found("postId", "post")],
                    }
                }
            },
            Err(e) => {
                return CreateCommentPayload {
                    comment: None,
                    errors: vec![store_user_error(e, "postId", "post")],
                }
            }
        };
        let comment = match deps
            .store
            .create_comment(&post.id, &me, input.content)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                return CreateCommentPayload {
                    comment: None,
                    errors: vec![store_user_error(e, "postId", "post")],
                }
            }
        };
        let mut errors: Vec<UserError> =
            publish(deps, topic::post(&post.id), "comment.created", &comment)
                .await
                .into_iter()
                .collect();
        if post.author_id != me {
            let payload =
                serde_json::json!({ "postId": post.id, "commentId": comment.id, "authorId": me });
            match deps
                .store
                .create_notification(
                    &post.author_id,
                    "comment.created".into(),
                    format!("New comment on \"{}\"", post.title),
                    payload,
                )
                .await
            {
                Ok(n) => errors.extend(
                    publish(
                        deps,
                        topic::notifications(&n.user_id),
                        "notification.created",
                        &n,
                    )
                    .await,
                ),
                Err(e) => errors.push(store_user_error(e, "postId", "post")),
            }
        }
        CreateCommentPayload {
            comment: Some(Comment(comment)),
            errors,
        }
    }

    /// Creates a channel owned by the caller.
    async fn create_channel(
        &self,
        ctx: &Context<'_>,
        input: CreateChannelInput,
    ) -> CreateChannelPayload {
        let deps = ctx_deps(ctx);
        let Some(me) = viewer_id(ctx) else {
            return CreateChannelPayload {
                channel: None,
                errors: vec![unauthorized()],
            };
        };
        let mut errors = Vec::new();
        check_text(&mut errors, "name", &input.name, MAX_NAME);
        if input.member_ids.len() > 1000 {
            errors.push(invalid("memberIds", "at most 1000 members at creation"));
        }
        if !errors.is_empty() {
            return CreateChannelPayload {
                channel: None,
                errors,
            };
        }
        let member_ids: Vec<String> = input.member_ids.into_iter().map(|id| id.0).collect();
        match deps.store.get_users(&member_ids).await {
            Ok(found) => {
                if let Some(missing) = member_ids.iter().zip(&found).find(|(_, u)| u.is_none()) {
                    return CreateChannelPayload {
                        channel: None,
                        errors: vec![UserError::new(
                            Some("memberIds"),
                            format!("user {} not found", missing.0),
                            ErrorCode::NotFound,
                        )],
                    };
                }
            }
            Err(e) => {
                return CreateChannelPayload {
                    channel: None,
                    errors: vec![store_user_error(e, "memberIds", "user")],
                }
            }
        }
        match deps
            .store
            .create_channel(
                &me,
                input.name.trim().to_owned(),
                input.is_private,
                member_ids,
            )
            .await
        {
            Ok(channel) => CreateChannelPayload {
                channel: Some(Channel(channel)),
                errors: vec![],
            },
            Err(e) => CreateChannelPayload {
                channel: None,
                errors: vec![store_user_error(e, "name", "channel")],
            },
        }
    }

    /// Joins a public channel.
    async fn join_channel(&self, ctx: &Context<'_>, input: JoinChannelInput) -> JoinChannelPayload {
        let deps = ctx_deps(ctx);
        let Some(me) = viewer_id(ctx) else {
            return JoinChannelPayload {
                channel: None,
                errors: vec![unauthorized()],
            };
        };
        let channel = match find_channel(deps, &input.channel_id).await {
            Ok(c) => c,
            Err(e) => {
                return JoinChannelPayload {
                    channel: None,
                    errors: vec![e],
                }
            }
        };
        if !Channel(channel.clone()).readable_by(Some(&me)) {
            // A private channel the caller is not in looks absent.
            return JoinChannelPayload {
                channel: None,
                errors: vec![not_found("channelId", "channel")],
            };
        }
        match deps.store.add_channel_member(&channel.id, &me).await {
            Ok(channel) => JoinChannelPayload {
                channel: Some(Channel(channel)),
                errors: vec![],
            },
            Err(e) => JoinChannelPayload {
                channel: None,
                errors: vec![store_user_error(e, "channelId", "channel")],
            },
        }
    }

    /// Sends a message to a channel; publishes `message.created`
    /// `{"message": …}` on `channel:{id}`, the same event the envelope
    /// WebSocket's `message.send` publishes.
    // Both go through `domain::send_message`, so they cannot drift apart.
    async fn send_message(&self, ctx: &Context<'_>, input: SendMessageInput) -> SendMessagePayload {
        let deps = ctx_deps(ctx);
        let Some(me) = viewer_id(ctx) else {
            return SendMessagePayload {
                message: None,
                errors: vec![unauthorized()],
            };
        };
        match domain::send_message(
            deps.store.as_ref(),
            &deps.hub,
            &me,
            &input.channel_id,
            input.content,
        )
        .await
        {
            Ok(sent) => {
                let errors = sent
                    .publish_error
                    .map(|e| {
                        UserError::new(
                            None,
                            format!(
                                "saved, but the {} event could not be published: {e}",
                                domain::MESSAGE_CREATED
                            ),
                            ErrorCode::Internal,
                        )
                    })
                    .into_iter()
                    .collect();
                SendMessagePayload {
                    message: Some(Message::new(sent.message)),
                    errors,
                }
            }
            Err(refusal) => {
                let error = match refusal {
                    SendRefusal::Invalid { field, message } => invalid(field, message),
                    // A private channel the caller is not in looks absent.
                    SendRefusal::NotFound | SendRefusal::NotMember => {
                        not_found("channelId", "channel")
                    }
                    SendRefusal::Store(e) => store_user_error(e, "channelId", "channel"),
                };
                SendMessagePayload {
                    message: None,
                    errors: vec![error],
                }
            }
        }
    }

    /// Marks one of the caller's notifications read.
    async fn mark_notification_read(
        &self,
        ctx: &Context<'_>,
        input: MarkNotificationReadInput,
    ) -> MarkNotificationReadPayload {
        let deps = ctx_deps(ctx);
        let Some(me) = viewer_id(ctx) else {
            return MarkNotificationReadPayload {
                notification: None,
                errors: vec![unauthorized()],
            };
        };
        match deps.store.mark_notification_read(&me, &input.id).await {
            Ok(n) => MarkNotificationReadPayload {
                notification: Some(Notification::new(n)),
                errors: vec![],
            },
            Err(e) => MarkNotificationReadPayload {
                notification: None,
                errors: vec![store_user_error(e, "id", "notification")],
            },
        }
    }
}

/// The post `id` if the caller wrote it.
async fn owned_post(deps: &SchemaDeps, id: &str, me: &str) -> Result<store::Post, UserError> {
    let post = deps
        .store
        .get_posts(&[id.to_owned()])
        .await
        .map_err(|e| store_user_error(e, "id", "post"))?
        .pop()
        .flatten()
        .ok_or_else(|| not_found("id", "post"))?;
    if post.author_id != me {
        return Err(forbidden("you may only change your own posts"));
    }
    Ok(post)
}

async fn find_channel(deps: &SchemaDeps, id: &str) -> Result<store::Channel, UserError> {
    deps.store
        .get_channels(&[id.to_owned()])
        .await
        .map_err(|e| store_user_error(e, "channelId", "channel"))?
        .pop()
        .flatten()
        .ok_or_else(|| not_found("channelId", "channel"))
}

#[cfg(test)]
mod tests {
    use super::valid_email;

    #[test]
    fn emails_are_checked() {
        for ok in ["a@b.co", "first.last+tag@sub.example.org"] {
            assert!(valid_email(ok), "{ok}");
        }
        for bad in [
            "", "a", "a@b", "@b.co", "a@@b.co", "a b@c.de", "a@.b.co", "a@b.co.", "a@b..co",
        ] {
            assert!(!valid_email(bad), "{bad}");
        }
    }
}
