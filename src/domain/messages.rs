//! Messages and typing signals: what GraphQL's `sendMessage` and the
//! envelope protocol's `message.send` (and its `user.typing`) both do,
//! decided here so that they cannot drift apart.
//!
//! Each function checks, writes to the store, publishes through the hub and
//! says what happened; turning the outcome into a `UserError` or an
//! envelope `error` is the transport's business.

use crate::auth::Principal;
use crate::broker::BrokerError;
use crate::domain::entities::Create;
use crate::hub::Hub;
use crate::store::{self, Store, StoreError};

use super::channels::readable_by;
use super::events::{
    EventKind, MessageCreated as MessageKind, MessagePayload, TypingPayload,
    UserTyping as TypingKind,
};
use super::{Domain, DomainError, FieldProblem, Unpublished, Written};

/// The longest message, in characters.
pub const MAX_MESSAGE_CHARS: usize = 4_000;

/// The event type of a stored message.
pub const MESSAGE_CREATED: &str = MessageKind::NAME;
/// The event type of a typing signal.
pub const USER_TYPING: &str = TypingKind::NAME;

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
    if !readable_by(&channel, Some(author_id)) {
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
    let payload = MessagePayload {
        message: std::sync::Arc::new(message),
    };
    let publish_error = hub.publish(MessageKind::event(&payload)).await.err();
    let message = std::sync::Arc::try_unwrap(payload.message).unwrap_or_else(|m| (*m).clone());
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
    let payload = TypingPayload {
        user_id: user_id.to_owned(),
        channel_id: channel_id.to_owned(),
    };
    hub.publish(TypingKind::event(&payload)).await.map(drop)
}

/// Whether a message's sender still has to be charged against their
/// per-user message allowance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowance {
    /// Charge it now (a GraphQL mutation).
    Charge,
    /// Already charged for the frame that carried it (the `/ws` protocol
    /// charges every frame it reads against the same allowance).
    Charged,
}

impl Domain {
    /// Sends `content` to `channel_id` as the caller, within the caller's
    /// message allowance (`ratelimit.user_messages_per_second` per user on
    /// this node, shared with the `/ws` protocol).
    pub async fn send_message(
        &self,
        principal: Option<&Principal>,
        channel_id: &str,
        content: String,
        allowance: Allowance,
    ) -> Result<Written<store::Message>, DomainError> {
        let me = Self::actor(principal)?;
        if allowance == Allowance::Charge {
            self.limits
                .user_message(me)
                .map_err(DomainError::RateLimited)?;
        }
        match send_message(self.store.as_ref(), &self.hub, me, channel_id, content).await {
            Ok(sent) => Ok(Written {
                value: sent.message,
                unpublished: sent
                    .publish_error
                    .map(|error| Unpublished {
                        kind: MESSAGE_CREATED,
                        error,
                    })
                    .into_iter()
                    .collect(),
                incomplete: Vec::new(),
            }),
            Err(refusal) => Err(refusal.into()),
        }
    }
}

impl From<SendRefusal> for DomainError {
    fn from(refusal: SendRefusal) -> Self {
        match refusal {
            SendRefusal::Invalid { field, message } => {
                DomainError::Invalid(vec![FieldProblem { field, message }])
            }
            // A private channel the sender is not in looks absent.
            SendRefusal::NotFound | SendRefusal::NotMember => DomainError::NotFound {
                field: "channel_id",
                what: "channel",
            },
            SendRefusal::Store(e) => DomainError::store(e, "channel_id", "channel"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::memory::MemoryBroker;
    use crate::event::topic;
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
