//! Comments, and the notification a comment gives the post's author.

use crate::auth::Principal;
use crate::domain::entities::Create;
use crate::store;

use super::events::{CommentCreated, EventKind, NotificationCreated};
use super::{Checks, Domain, DomainError, ForInput, Written};

/// The longest comment (characters).
pub const MAX_COMMENT: usize = 10_000;

impl Domain {
    /// Comments on a post; publishes `comment.created` on `post:{id}` and,
    /// when someone else wrote the post, notifies its author
    /// (`notification.created` on `notifications:{authorId}`).
    pub async fn create_comment(
        &self,
        principal: Option<&Principal>,
        post_id: &str,
        content: String,
    ) -> Result<Written<store::Comment>, DomainError> {
        let me = Self::actor(principal)?;
        let mut checks = Checks::default();
        checks.text("content", &content, MAX_COMMENT);
        checks.done()?;
        let post = self.post(post_id, "post_id").await?;
        let comment = self
            .store
            .create_comment(&post.id, me, content)
            .await
            .for_input("post_id", "post")?;
        let mut written = self.written::<CommentCreated>(comment).await;
        if post.author_id != me {
            let payload = serde_json::json!({
                "postId": post.id, "commentId": written.value.id, "authorId": me,
            });
            let stored = self
                .store
                .create_notification(
                    &post.author_id,
                    CommentCreated::NAME.into(),
                    format!("New comment on \"{}\"", post.title),
                    payload,
                )
                .await;
            // The comment stands whatever becomes of its notification.
            match stored {
                Ok(n) => written
                    .unpublished
                    .extend(self.publish::<NotificationCreated>(&n).await),
                Err(e) => written
                    .incomplete
                    .push(DomainError::store(e, "post_id", "post")),
            }
        }
        Ok(written)
    }
}
