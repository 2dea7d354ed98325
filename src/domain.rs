//! Domain operations that more than one transport performs, decided in one
//! place so that GraphQL's `sendMessage` and the envelope protocol's
//! `message.send` (and its `user.typing`) cannot drift apart.
//!
//! Each function checks, writes to the store, publishes through the hub and
//! says what happened; turning the outcome into a `UserError` or an
//! envelope `error` is the transport's business.

use serde::Serialize;

use crate::broker::BrokerError;
use crate::event::{topic, NewEvent};
use crate::hub::Hub;
use crate::store::{self, Store, StoreError};

/// The longest message, in characters.
pub const MAX_MESSAGE_CHARS: usize = 4_000;

/// The event type of a stored message.
pub const MESSAGE_CREATED: &str = "message.created";
/// The event type of a typing signal.
pub const USER_TYPING: &str = "user.typing";

/// The payload of `message.created` on `channel:{id}`, on every transport.
#[derive(Serialize)]
pub struct MessageCreated<'a> {
    pub message: &'a store::Message,
}

/// The payload of `user.typing` on `channel:{id}`.
#[derive(Serialize)]
pub struct UserTyping<'a> {
    pub user_id: &'a str,
    pub channel_id: &'a str,
}

/// Why a message was not stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendRefusal {
    /// An input field is wrong; `field` is the input's own name.
    Invalid {
        field: &'static str,
        message: String,
    },
    /// No such channel.
    NotFound,
    /// The channel is private and the author is not a member.
    NotMember,
    /// The store failed; nothing was written.
    Store(StoreError),
}

/// A stored message, and whether its event went out.
#[derive(Debug)]
pub struct Sent {
    pub message: store::Message,
    /// The message is stored but `message.created` was not published (the
    /// bus is down): subscribers will not see it live.
    pub publish_error: Option<BrokerError>,
}

/// Checks `content` as a message body: not blank, at most
/// [`MAX_MESSAGE_CHARS`] characters.
pub fn check_message_content(content: &str) -> Result<(), SendRefusal> {
    let invalid = |message: String| {
        Err(SendRefusal::Invalid {
            field: "content",
            message,
        })
    };
    if content.trim().is_empty() {
        return invalid("content must not be empty".into());
    }
    if content.chars().count() > MAX_MESSAGE_CHARS {
        return invalid(format!(
            "content must be at most {MAX_MESSAGE_CHARS} characters"
        ));
    }
    Ok(())
}

/// Sends `content` to `channel_id` as `author_id`: validates, stores the
/// message and publishes `message.created {"message": …}` on its channel.
pub async fn send_message(
    store: &dyn Store,
    hub: &Hub,
    author_id: &str,
    channel_id: &str,
    content: String,
) -> Result<Sent, SendRefusal> {
    check_message_content(&content)?;
    let channel = store
        .get_channels(&[channel_id.to_owned()])
        .await
        .map_err(SendRefusal::Store)?
        .pop()
        .flatten()
        .ok_or(SendRefusal::NotFound)?;
    if channel.is_private && !channel.member_ids.iter().any(|m| m == author_id) {
        return Err(SendRefusal::NotMember);
    }
    let message = store
        .create_message(&channel.id, author_id, content)
        .await
        .map_err(|e| match e {
            // The channel went away between the read and the write.
            StoreError::NotFound => SendRefusal::NotFound,
            other => SendRefusal::Store(other),
        })?;
    let payload = serde_json::to_value(MessageCreated { message: &message })
        .expect("a message always serializes");
    let publish_error = hub
        .publish(NewEvent::new(
            topic::channel(&channel.id),
            MESSAGE_CREATED,
            payload,
        ))
        .await
        .err();
    if let Some(e) = &publish_error {
        tracing::warn!(error = %e, "message stored but message.created not published");
    }
    Ok(Sent {
        message,
        publish_error,
    })
}

/// Publishes `user.typing {user_id, channel_id}` on `channel:{id}`. Not
/// stored: a typing signal matters for seconds. The caller has checked that
/// the user may read the channel and throttled the signal.
pub async fn signal_typing(hub: &Hub, user_id: &str, channel_id: &str) -> Result<(), BrokerError> {
    let payload = serde_json::to_value(UserTyping {
        user_id,
        channel_id,
    })
    .expect("strings always serialize");
    hub.publish(NewEvent::new(topic::channel(channel_id), USER_TYPING, payload).ephemeral())
        .await
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::memory::MemoryBroker;
    use crate::store::memory::MemoryStore;
    use crate::telemetry::metrics::Metrics;
    use std::sync::Arc;

    async fn setup() -> (Arc<MemoryStore>, Arc<Hub>, store::Channel, store::Channel) {
        let store = Arc::new(MemoryStore::new());
        let hub = Hub::new(
            Arc::new(MemoryBroker::default()),
            Arc::new(Metrics::new()),
            16,
        );
        let public = store
            .create_channel("owner", "general".into(), false, vec![])
            .await
            .unwrap();
        let private = store
            .create_channel("owner", "secret".into(), true, vec![])
            .await
            .unwrap();
        (store, hub, public, private)
    }

    #[tokio::test]
    async fn a_message_is_stored_and_published_as_message_created() {
        let (store, hub, public, _) = setup().await;
        let mut sub = hub
            .subscribe(&topic::channel(&public.id), "test", None)
            .await
            .unwrap();
        let sent = send_message(store.as_ref(), &hub, "u1", &public.id, "hello".into())
            .await
            .unwrap();
        assert!(sent.publish_error.is_none());
        let event = sub.recv().await.unwrap();
        assert_eq!(event.event.kind, MESSAGE_CREATED);
        assert_eq!(
            event.event.payload["message"]["id"],
            sent.message.id.as_str()
        );
        assert_eq!(event.event.payload["message"]["content"], "hello");
    }

    #[tokio::test]
    async fn bad_content_missing_channels_and_outsiders_are_refused() {
        let (store, hub, public, private) = setup().await;
        let send = |channel: String, content: String| {
            let (store, hub) = (store.clone(), hub.clone());
            async move {
                send_message(store.as_ref(), &hub, "u1", &channel, content)
                    .await
                    .map(|s| s.message)
            }
        };
        assert!(matches!(
            send(public.id.clone(), "  ".into()).await,
            Err(SendRefusal::Invalid {
                field: "content",
                ..
            })
        ));
        assert!(matches!(
            send(public.id.clone(), "x".repeat(MAX_MESSAGE_CHARS + 1)).await,
            Err(SendRefusal::Invalid {
                field: "content",
                ..
            })
        ));
        assert!(send(public.id.clone(), "é".repeat(MAX_MESSAGE_CHARS))
            .await
            .is_ok());
        assert_eq!(
            send("nope".into(), "hi".into()).await.unwrap_err(),
            SendRefusal::NotFound
        );
        assert_eq!(
            send(private.id.clone(), "hi".into()).await.unwrap_err(),
            SendRefusal::NotMember
        );
        assert!(
            send_message(store.as_ref(), &hub, "owner", &private.id, "hi".into())
                .await
                .is_ok()
        );
    }
}
