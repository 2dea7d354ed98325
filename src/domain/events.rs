//! The catalogue of event kinds: each kind's name on the wire, the topic it
//! goes to and its payload type, in one place. Publishers build events from
//! a kind and a payload and subscriptions decode by kind, so a name or a
//! payload shape cannot be misspelt in one place and right in another.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::event::{topic, NewEvent};
use crate::store;

/// One kind of event the domain publishes.
pub trait EventKind {
    /// The envelope's `type`.
    const NAME: &'static str;
    /// What `payload` holds.
    type Payload: Serialize + DeserializeOwned + Send + Sync + 'static;
    /// The topic an event of this kind about `payload` goes to.
    fn topic(payload: &Self::Payload) -> String;

    /// The event, ready for the hub.
    fn event(payload: &Self::Payload) -> NewEvent {
        let value = serde_json::to_value(payload).expect("domain payloads always encode");
        NewEvent::new(Self::topic(payload), Self::NAME, value)
    }
}

/// A post was written: `post.created` on `posts`.
pub struct PostCreated;
impl EventKind for PostCreated {
    const NAME: &'static str = "post.created";
    type Payload = store::Post;
    fn topic(_: &store::Post) -> String {
        topic::POSTS.to_owned()
    }
}

/// A post was edited: `post.updated` on `post:{id}`.
pub struct PostUpdated;
impl EventKind for PostUpdated {
    const NAME: &'static str = "post.updated";
    type Payload = store::Post;
    fn topic(post: &store::Post) -> String {
        topic::post(&post.id)
    }
}

/// A post was deleted: `post.deleted` on `post:{id}`.
pub struct PostDeleted;
impl EventKind for PostDeleted {
    const NAME: &'static str = "post.deleted";
    type Payload = store::Post;
    fn topic(post: &store::Post) -> String {
        topic::post(&post.id)
    }
}

/// A post got a comment: `comment.created` on `post:{postId}`.
pub struct CommentCreated;
impl EventKind for CommentCreated {
    const NAME: &'static str = "comment.created";
    type Payload = store::Comment;
    fn topic(comment: &store::Comment) -> String {
        topic::post(&comment.post_id)
    }
}

/// A profile changed: `user.updated` on `user:{id}`.
pub struct UserUpdated;
impl EventKind for UserUpdated {
    const NAME: &'static str = "user.updated";
    type Payload = store::User;
    fn topic(user: &store::User) -> String {
        topic::user(&user.id)
    }
}

/// An account was deleted: `user.deleted` on `user:{id}`.
pub struct UserDeleted;
impl EventKind for UserDeleted {
    const NAME: &'static str = "user.deleted";
    type Payload = store::User;
    fn topic(user: &store::User) -> String {
        topic::user(&user.id)
    }
}

/// A user was notified: `notification.created` on `notifications:{userId}`.
pub struct NotificationCreated;
impl EventKind for NotificationCreated {
    const NAME: &'static str = "notification.created";
    type Payload = store::Notification;
    fn topic(n: &store::Notification) -> String {
        topic::notifications(&n.user_id)
    }
}

/// The payload of `message.created`, on every transport.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MessagePayload {
    /// Shared: a node decodes an event once and hands the same message to
    /// every local subscriber.
    pub message: Arc<store::Message>,
}

/// A message was sent: `message.created {"message": …}` on `channel:{id}`.
pub struct MessageCreated;
impl EventKind for MessageCreated {
    const NAME: &'static str = "message.created";
    type Payload = MessagePayload;
    fn topic(p: &MessagePayload) -> String {
        topic::channel(&p.message.channel_id)
    }
}

/// The payload of `user.typing`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TypingPayload {
    pub user_id: String,
    pub channel_id: String,
}

/// Someone is typing: `user.typing {user_id, channel_id}` on
/// `channel:{id}`. Live only: never numbered, kept or replayed.
pub struct UserTyping;
impl EventKind for UserTyping {
    const NAME: &'static str = "user.typing";
    type Payload = TypingPayload;
    fn topic(p: &TypingPayload) -> String {
        topic::channel(&p.channel_id)
    }
    fn event(p: &TypingPayload) -> NewEvent {
        let value = serde_json::to_value(p).expect("strings always encode");
        NewEvent::new(Self::topic(p), Self::NAME, value).ephemeral()
    }
}

/// Every kind's name, for documents and tests that list them.
pub const NAMES: &[&str] = &[
    PostCreated::NAME,
    PostUpdated::NAME,
    PostDeleted::NAME,
    CommentCreated::NAME,
    UserUpdated::NAME,
    UserDeleted::NAME,
    NotificationCreated::NAME,
    MessageCreated::NAME,
    UserTyping::NAME,
    crate::presence::PRESENCE_UPDATED,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_dotted() {
        let mut seen = std::collections::HashSet::new();
        for name in NAMES {
            assert!(seen.insert(*name), "{name} twice");
            assert!(name.contains('.') && name.chars().all(|c| c.is_ascii_lowercase() || c == '.'));
        }
    }

    #[test]
    fn typing_is_live_only_and_messages_go_to_their_channel() {
        let typing = UserTyping::event(&TypingPayload {
            user_id: "u1".into(),
            channel_id: "c1".into(),
        });
        assert_eq!(typing.topic, "channel:c1");
        let message = MessageCreated::event(&MessagePayload {
            message: Arc::new(store::Message {
                id: "m1".into(),
                channel_id: "c2".into(),
                author_id: "u1".into(),
                content: "hi".into(),
                created_at: chrono::Utc::now(),
            }),
        });
        assert_eq!(message.topic, "channel:c2");
        assert_eq!(message.kind, "message.created");
        assert_eq!(message.payload["message"]["id"], "m1");
    }
}
