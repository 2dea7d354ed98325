//! The topic authorization policy: one decision for every transport.
//!
//! Public topics (`posts`, `post:*`, `user:*`) are open to everyone;
//! `notifications:{userId}` only to that user; `channel:*` to everyone
//! unless the channel is private, then to members (checked by the caller
//! against the store); any other topic (backend topics) needs a principal.

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
        _ => match principal {
            None => Decision::Unauthorized,
            Some(_) => Decision::Allow,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: &str) -> Principal {
        Principal { user_id: id.into(), scopes: vec![] }
    }

    #[test]
    fn notifications_are_private() {
        assert_eq!(can_subscribe(None, "notifications:u1"), Decision::Unauthorized);
        assert_eq!(can_subscribe(Some(&user("u2")), "notifications:u1"), Decision::Forbidden);
        assert_eq!(can_subscribe(Some(&user("u1")), "notifications:u1"), Decision::Allow);
    }

    #[test]
    fn public_topics_are_open() {
        assert_eq!(can_subscribe(None, "posts"), Decision::Allow);
        assert_eq!(can_subscribe(None, "post:1"), Decision::Allow);
        assert_eq!(can_subscribe(None, "user:1"), Decision::Allow);
        assert_eq!(can_subscribe(None, "orders"), Decision::Unauthorized);
        assert_eq!(can_subscribe(Some(&user("u")), "orders"), Decision::Allow);
    }
}
