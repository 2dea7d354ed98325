//! What a new entity is, decided once: its id, its timestamps, its
//! defaults (a notification starts unread) and its invariants (a channel's
//! owner is its first member, each member once). The stores only persist
//! what these build.
//!
//! [`Create`] puts the two together for any [`Store`]: build the entity,
//! insert it.

use async_trait::async_trait;
use chrono::Utc;

use crate::store::{
    new_id, Channel, Comment, Message, NewUser, Notification, Post, Store, StoreResult, User,
};

pub fn user(new: NewUser) -> User {
    let now = Utc::now();
    User {
        id: new_id(),
        email: new.email,
        name: new.name,
        password_hash: new.password_hash,
        created_at: now,
        updated_at: now,
    }
}

pub fn post(author_id: &str, title: String, content: String) -> Post {
    let now = Utc::now();
    Post {
        id: new_id(),
        author_id: author_id.to_owned(),
        title,
        content,
        created_at: now,
        updated_at: now,
    }
}

pub fn comment(post_id: &str, author_id: &str, content: String) -> Comment {
    Comment {
        id: new_id(),
        post_id: post_id.to_owned(),
        author_id: author_id.to_owned(),
        content,
        created_at: Utc::now(),
    }
}

/// A channel owned by `owner_id`: the owner first among its members, then
/// the others in the order given, each once.
pub fn channel(owner_id: &str, name: String, is_private: bool, others: Vec<String>) -> Channel {
    let mut member_ids = vec![owner_id.to_owned()];
    for m in others {
        if !member_ids.contains(&m) {
            member_ids.push(m);
        }
    }
    Channel {
        id: new_id(),
        name,
        is_private,
        owner_id: owner_id.to_owned(),
        member_ids,
        created_at: Utc::now(),
    }
}

pub fn message(channel_id: &str, author_id: &str, content: String) -> Message {
    Message {
        id: new_id(),
        channel_id: channel_id.to_owned(),
        author_id: author_id.to_owned(),
        content,
        created_at: Utc::now(),
    }
}

/// A notification for `user_id`, unread.
pub fn notification(
    user_id: &str,
    kind: String,
    message: String,
    payload: serde_json::Value,
) -> Notification {
    Notification {
        id: new_id(),
        user_id: user_id.to_owned(),
        kind,
        message,
        payload,
        read: false,
        created_at: Utc::now(),
    }
}

/// Builds an entity and inserts it: what the domain (and tests) call, on
/// any [`Store`].
#[async_trait]
pub trait Create: Store {
    async fn create_user(&self, new: NewUser) -> StoreResult<User> {
        self.insert_user(user(new)).await
    }

    async fn create_post(
        &self,
        author_id: &str,
        title: String,
        content: String,
    ) -> StoreResult<Post> {
        self.insert_post(post(author_id, title, content)).await
    }

    async fn create_comment(
        &self,
        post_id: &str,
        author_id: &str,
        content: String,
    ) -> StoreResult<Comment> {
        self.insert_comment(comment(post_id, author_id, content))
            .await
    }

    async fn create_channel(
        &self,
        owner_id: &str,
        name: String,
        is_private: bool,
        member_ids: Vec<String>,
    ) -> StoreResult<Channel> {
        self.insert_channel(channel(owner_id, name, is_private, member_ids))
            .await
    }

    async fn create_message(
        &self,
        channel_id: &str,
        author_id: &str,
        content: String,
    ) -> StoreResult<Message> {
        self.insert_message(message(channel_id, author_id, content))
            .await
    }

    async fn create_notification(
        &self,
        user_id: &str,
        kind: String,
        message: String,
        payload: serde_json::Value,
    ) -> StoreResult<Notification> {
        self.insert_notification(notification(user_id, kind, message, payload))
            .await
    }
}

impl<S: Store + ?Sized> Create for S {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_is_the_first_member_and_members_are_listed_once() {
        let c = channel(
            "owner",
            "room".into(),
            true,
            vec!["a".into(), "owner".into(), "b".into(), "a".into()],
        );
        assert_eq!(c.member_ids, ["owner", "a", "b"]);
        assert_eq!(c.owner_id, "owner");
    }

    #[test]
    fn new_entities_have_fresh_ids_and_notifications_start_unread() {
        let a = notification("u", "k".into(), "m".into(), serde_json::json!({}));
        let b = notification("u", "k".into(), "m".into(), serde_json::json!({}));
        assert_ne!(a.id, b.id);
        assert!(!a.read);
        let p = post("u", "t".into(), "c".into());
        assert_eq!(p.created_at, p.updated_at);
    }
}
