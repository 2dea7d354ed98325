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

/// Declares event kinds: a unit type each, its name, payload type and
/// topic (computed from the payload).
macro_rules! kinds {
    ($($(#[$doc:meta])* $kind:ident = $name:literal, $payload:ty, |$p:pat_param| $topic:expr;)*) => {
        $(
            $(#[$doc])*
            pub struct $kind;
            impl EventKind for $kind {
                const NAME: &'static str = $name;
                type Payload = $payload;
                fn topic($p: &$payload) -> String {
                    $topic
                }
            }
        )*
    };
}

kinds! {
    /// A post was written: `post.created` on `posts`.
    PostCreated = "post.created", store::Post, |_| topic::POSTS.to_owned();
    /// A post was edited: `post.updated` on `post:{id}`.
    PostUpdated = "post.updated", store::Post, |post| topic::post(&post.id);
    /// A post was deleted: `post.deleted` on `post:{id}`.
    PostDeleted = "post.deleted", store::Post, |post| topic::post(&post.id);
    /// A post got a comment: `comment.created` on `post:{postId}`.
    CommentCreated = "comment.created", store::Comment, |c| topic::post(&c.post_id);
    /// A profile changed: `user.updated` on `user:{id}`.
    UserUpdated = "user.updated", store::User, |user| topic::user(&user.id);
    /// An account was deleted: `user.deleted` on `user:{id}`.
    UserDeleted = "user.deleted", store::User, |user| topic::user(&user.id);
    /// A user was notified: `notification.created` on `notifications:{userId}`.
    NotificationCreated = "notification.created", store::Notification, |n| topic::notifications(&n.user_id);
    /// A message was sent: `message.created {"message": …}` on `channel:{id}`.
    MessageCreated = "message.created", MessagePayload, |m| topic::channel(&m.message.channel_id);
    /// Someone's presence in a channel changed: `presence.updated
    /// {user_id, channel_id, status}` on `channel:{id}`.
    PresenceUpdated = "presence.updated", PresencePayload, |p| topic::channel(&p.channel_id);
}

/// The payload of `presence.updated`; `status` is `online`, `away`,
/// `busy` or `offline`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PresencePayload {
    pub user_id: String,
    pub channel_id: String,
    pub status: String,
}

/// The payload of `message.created`, on every transport.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MessagePayload {
    /// Shared: a node decodes an event once and hands the same message to
    /// every local subscriber.
    pub message: Arc<store::Message>,
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
    PresenceUpdated::NAME,
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
