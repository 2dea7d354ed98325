//! Posts: writing, editing and deleting one's own.

use crate::auth::Principal;
use crate::domain::entities::Create;
use crate::store::{self, PostPatch};

use super::events::{PostCreated, PostDeleted, PostUpdated};
use super::{Checks, Domain, DomainError, Written};

/// Limits of a post's fields (characters).
pub const MAX_TITLE: usize = 200;
pub const MAX_CONTENT: usize = 100_000;

/// An edit; `None` leaves a field as it is.
pub struct PostChange {
    pub id: String,
    pub title: Option<String>,
    pub content: Option<String>,
}

impl Domain {
    /// Writes a post by the caller; publishes `post.created` on `posts`.
    pub async fn create_post(
        &self,
        principal: Option<&Principal>,
        title: String,
        content: String,
    ) -> Result<Written<store::Post>, DomainError> {
        let me = Self::actor(principal)?;
        let mut checks = Checks::default();
        checks.text("title", &title, MAX_TITLE);
        checks.at_most("content", &content, MAX_CONTENT);
        checks.done()?;
        let stored = self
            .store
            .create_post(me, title.trim().to_owned(), content)
            .await;
        self.write::<PostCreated>(stored, "post").await
    }

    /// Edits one of the caller's posts; publishes `post.updated`.
    pub async fn update_post(
        &self,
        principal: Option<&Principal>,
        input: PostChange,
    ) -> Result<Written<store::Post>, DomainError> {
        let me = Self::actor(principal)?;
        let mut checks = Checks::default();
        if let Some(title) = &input.title {
            checks.text("title", title, MAX_TITLE);
        }
        if let Some(content) = &input.content {
            checks.at_most("content", content, MAX_CONTENT);
        }
        checks.done()?;
        self.owned_post(&input.id, me).await?;
        let patch = PostPatch {
            title: input.title.map(|t| t.trim().to_owned()),
            content: input.content,
        };
        let stored = self.store.update_post(&input.id, patch).await;
        self.write::<PostUpdated>(stored, "post").await
    }

    /// Deletes one of the caller's posts; publishes `post.deleted`.
    pub async fn delete_post(
        &self,
        principal: Option<&Principal>,
        id: &str,
    ) -> Result<Written<store::Post>, DomainError> {
        let me = Self::actor(principal)?;
        self.owned_post(id, me).await?;
        let stored = self.store.delete_post(id).await;
        self.write::<PostDeleted>(stored, "post").await
    }

    /// The post `id` if `me` wrote it.
    async fn owned_post(&self, id: &str, me: &str) -> Result<store::Post, DomainError> {
        let post = self.post(id, "id").await?;
        if post.author_id != me {
            return Err(DomainError::Forbidden("you may only change your own posts"));
        }
        Ok(post)
    }

    /// The post `id`, named by the input `field`.
    pub(super) async fn post(
        &self,
        id: &str,
        field: &'static str,
    ) -> Result<store::Post, DomainError> {
        self.store
            .get_posts(&[id.to_owned()])
            .await
            .map_err(|e| DomainError::store(e, field, "post"))?
            .pop()
            .flatten()
            .ok_or(DomainError::NotFound {
                field,
                what: "post",
            })
    }
}
