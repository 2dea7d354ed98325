//! The topic authorization policy: one decision for every transport.
//!
//! Public topics (`posts`, `post:*`, `user:*`) are open to everyone;
//! `notifications:{userId}` only to that user; `channel:*` to everyone
//! unless the channel is private, then to members (checked against the
//! store); any other topic is a backend topic, readable as the publish
//! request that set its rule said ([`crate::store::TopicReaders`]: anyone,
//! any authenticated caller, or listed users), and by any authenticated
//! caller while no rule was set.

use super::Principal;

/// What the policy says of a subscribe request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// The caller must authenticate first.
    Unauthorized,
    /// The caller is known and may not.
    Forbidden,
    /// Allowed if the caller is a member of the private channel.
    ChannelMembership,
    /// A backend topic: as its readers rule in the store says.
    TopicReaders,
}

pub fn can_subscribe(principal: Option<&Principal>, topic: &str) -> Decision {
    let (namespace, rest) = topic.split_once(':').unwrap_or((topic, ""));
    match namespace {
        "posts" if rest.is_empty() => Decision::Allow,
        "post" | "user" => Decision::Allow,
        "notifications" => match principal {
            None => Decision::Unauthorized,
            Some(p) if p.user_id == rest => Decision::Allow,
            Some(_) => Decision::Forbidden,
        },
        "channel" => Decision::ChannelMembership,
        _ => Decision::TopicReaders,
    }
}

/// Whether `topic` is one of the domain's own topics (whose rules are
/// built in) rather than a backend topic (whose rule a publish sets).
pub fn is_domain_topic(topic: &str) -> bool {
    !matches!(can_subscribe(None, topic), Decision::TopicReaders)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: &str) -> Principal {
        Principal {
            user_id: id.into(),
            scopes: vec![],
            expires_at: None,
        }
    }

    #[test]
    fn notifications_are_private() {
        assert_eq!(
            can_subscribe(None, "notifications:u1"),
            Decision::Unauthorized
        );
        assert_eq!(
            can_subscribe(Some(&user("u2")), "notifications:u1"),
            Decision::Forbidden
        );
        assert_eq!(
            can_subscribe(Some(&user("u1")), "notifications:u1"),
            Decision::Allow
        );
    }

    #[test]
    fn public_topics_are_open() {
        assert_eq!(can_subscribe(None, "posts"), Decision::Allow);
        assert_eq!(can_subscribe(None, "post:1"), Decision::Allow);
        assert_eq!(can_subscribe(None, "user:1"), Decision::Allow);
    }

    #[test]
    fn backend_topics_follow_their_readers_rule() {
        assert_eq!(can_subscribe(None, "orders"), Decision::TopicReaders);
        assert_eq!(
            can_subscribe(Some(&user("u")), "orders:eu"),
            Decision::TopicReaders
        );
        // `posts:x` is not the `posts` topic.
        assert_eq!(can_subscribe(None, "posts:x"), Decision::TopicReaders);
        for domain in ["posts", "post:1", "user:1", "notifications:u1", "channel:c"] {
            assert!(is_domain_topic(domain), "{domain}");
        }
        assert!(!is_domain_topic("orders"));
    }

    #[tokio::test]
    async fn authorize_consults_the_readers_rule_of_backend_topics() {
        use crate::store::{memory::MemoryStore, Store, TopicReaders};
        let store = MemoryStore::new();
        let (u1, u2) = (user("u1"), user("u2"));
        // No rule yet: any authenticated caller.
        assert_eq!(
            authorize(&store, None, "orders").await,
            Err(Refusal::Unauthorized("orders".into()))
        );
        assert_eq!(authorize(&store, Some(&u2), "orders").await, Ok(()));

        store
            .set_topic_readers("orders", &TopicReaders::Public)
            .await
            .unwrap();
        assert_eq!(authorize(&store, None, "orders").await, Ok(()));

        store
            .set_topic_readers("orders", &TopicReaders::Users(vec!["u1".into()]))
            .await
            .unwrap();
        assert_eq!(authorize(&store, Some(&u1), "orders").await, Ok(()));
        assert_eq!(
            authorize(&store, Some(&u2), "orders").await,
            Err(Refusal::Forbidden("orders".into()))
        );
        assert_eq!(
            authorize(&store, None, "orders").await,
            Err(Refusal::Unauthorized("orders".into()))
        );

        assert_eq!(
            authorize(&store, None, "bad topic").await,
            Err(Refusal::InvalidTopic("bad topic".into()))
        );
    }
}

/// Why a subscribe was refused; the same decision on every transport,
/// each saying it its own way (envelope `forbidden`, SSE 403, GraphQL
/// 4403 or an error with this code).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("authentication required for {0}")]
    Unauthorized(String),
    #[error("not allowed to subscribe to {0}")]
    Forbidden(String),
    #[error("{0} does not exist")]
    NotFound(String),
    #[error("{0:?} is not a valid topic name")]
    InvalidTopic(String),
    #[error("the authorization could not be checked: {0}")]
    Unavailable(String),
}

impl Refusal {
    /// The GraphQL/envelope error code.
    pub fn code(&self) -> crate::error::ErrorCode {
        use crate::error::ErrorCode;
        match self {
            Refusal::Unauthorized(_) => ErrorCode::Unauthorized,
            Refusal::Forbidden(_) => ErrorCode::Forbidden,
            Refusal::NotFound(_) => ErrorCode::NotFound,
            Refusal::InvalidTopic(_) => ErrorCode::ValidationError,
            Refusal::Unavailable(_) => ErrorCode::Internal,
        }
    }
}

/// For a backend topic (whose readers rule a publish may change), the check
/// a stream runs again when the rule changes: the same decision as at
/// subscribe time, revoking only on a definite refusal (a store that cannot
/// answer keeps the stream). `None` for the domain's topics: their rules are
/// built in, and channel membership is never taken away.
pub fn recheck(
    store: std::sync::Arc<dyn crate::store::Store>,
    principal: Option<Principal>,
    topic: &str,
) -> Option<crate::hub::resume::Recheck> {
    if is_domain_topic(topic) {
        return None;
    }
    let topic = topic.to_owned();
    Some(std::sync::Arc::new(move || {
        let (store, principal, topic) = (store.clone(), principal.clone(), topic.clone());
        Box::pin(async move {
            !matches!(
                authorize(store.as_ref(), principal.as_ref(), &topic).await,
                Err(Refusal::Unauthorized(_) | Refusal::Forbidden(_))
            )
        })
    }))
}

/// The one authorization decision for subscribing to `topic`, used by every
/// transport: the static rules of [`can_subscribe`], then channel
/// membership or a backend topic's readers rule from the store.
pub async fn authorize(
    store: &dyn crate::store::Store,
    principal: Option<&Principal>,
    topic: &str,
) -> Result<(), Refusal> {
    if !crate::event::topic::is_valid(topic) {
        return Err(Refusal::InvalidTopic(topic.to_owned()));
    }
    // An expired token authorizes nothing, whatever the connection it
    // opened still holds.
    let principal = principal.filter(|p| !p.is_expired());
    match can_subscribe(principal, topic) {
        Decision::Allow => Ok(()),
        Decision::Unauthorized => Err(Refusal::Unauthorized(topic.to_owned())),
        Decision::Forbidden => Err(Refusal::Forbidden(topic.to_owned())),
        Decision::ChannelMembership => {
            let id = topic.split_once(':').map_or("", |(_, id)| id);
            let channel = store
                .get_channels(&[id.to_owned()])
                .await
                .map_err(|e| Refusal::Unavailable(e.to_string()))?
                .pop()
                .flatten()
                .ok_or_else(|| Refusal::NotFound(format!("channel {id}")))?;
            let member = principal.is_some_and(|p| channel.member_ids.contains(&p.user_id));
            if channel.is_private && !member {
                return Err(Refusal::Forbidden(topic.to_owned()));
            }
            Ok(())
        }
        Decision::TopicReaders => {
            let rule = store
                .topic_readers(topic)
                .await
                .map_err(|e| Refusal::Unavailable(e.to_string()))?
                .unwrap_or(crate::store::TopicReaders::Authenticated);
            let user_id = principal.map(|p| p.user_id.as_str());
            match (rule.admits(user_id), user_id) {
                (true, _) => Ok(()),
                // Anonymous and refused: a token might change the answer.
                (false, None) => Err(Refusal::Unauthorized(topic.to_owned())),
                (false, Some(_)) => Err(Refusal::Forbidden(topic.to_owned())),
            }
        }
    }
}
