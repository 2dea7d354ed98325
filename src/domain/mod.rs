//! The domain: what users, posts, comments, channels, messages and
//! notifications are allowed to do, decided once, below every transport.
//!
//! Each operation takes the caller (a [`Principal`], or none) and a plain
//! input, checks it, writes through the [`Store`], publishes its events
//! (kinds from the [`events`] catalogue) through the [`Hub`], and answers a
//! typed result or a [`DomainError`]. GraphQL resolvers, the `/ws` protocol
//! and the publish API are adapters: they turn inputs into these calls and
//! outcomes into their own error shapes (`UserError`, an envelope `error`,
//! an HTTP status). The stores only persist.
//!
//! - [`users`]: sign-up, login, profile updates, account deletion.
//! - [`posts`]: writing, editing and deleting posts.
//! - [`comments`]: comments, and the notification they give the author.
//! - [`channels`]: creating and joining channels.
//! - [`messages`]: sending messages, typing signals.
//! - [`notifications`]: marking them read.
//! - [`publishing`]: what a backend may publish, and its topics' readers.
//! - [`entities`]: what a new entity is (ids, timestamps, defaults), and
//!   [`entities::Create`], which builds one and has the store insert it.

pub mod channels;
pub mod comments;
pub mod entities;
pub mod events;
pub mod messages;
pub mod notifications;
pub mod posts;
pub mod publishing;
pub mod users;

use std::sync::Arc;
use std::time::Duration;

use crate::auth::{Authenticator, Principal};
use crate::broker::BrokerError;
use crate::hub::Hub;
use crate::ratelimit::{Limited, Limits};
use crate::store::{Store, StoreError};

pub use events::EventKind;
// The message operations as the `/ws` protocol calls them.
pub use messages::{
    check_message_content, send_message, signal_typing, SendRefusal, Sent, MAX_MESSAGE_CHARS,
    MESSAGE_CREATED, USER_TYPING,
};

/// What the domain needs, built once per node.
pub struct Domain {
    pub store: Arc<dyn Store>,
    pub hub: Arc<Hub>,
    pub auth: Arc<Authenticator>,
    pub limits: Arc<Limits>,
    /// Lifetime of the tokens `login` issues.
    pub login_token_ttl: Duration,
    /// What `login` checks a password against when no user has the email
    /// ([`users::unknown_email_hash`], made once at start).
    pub unknown_email_hash: String,
    /// The largest payload a backend may publish, encoded
    /// (`publish.max_payload_bytes`).
    pub max_payload_bytes: usize,
}

/// One input field that is wrong, by its domain name (`snake_case`; each
/// adapter spells it its own way).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldProblem {
    pub field: &'static str,
    pub message: String,
}

/// Why an operation did nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainError {
    /// Inputs are wrong; every problem found, not just the first.
    Invalid(Vec<FieldProblem>),
    /// The operation needs an authenticated user.
    Unauthorized,
    /// A login whose email or password is wrong (which one is not said).
    WrongCredentials,
    /// The caller may not do this.
    Forbidden(&'static str),
    /// `what` does not exist (or is hidden from the caller), named by the
    /// input `field` that pointed at it.
    NotFound {
        field: &'static str,
        what: &'static str,
    },
    /// A channel's initial member does not exist.
    MissingMember(String),
    /// `field` clashes with an existing entity (a taken email).
    Conflict { field: &'static str },
    /// Over a rate limit; try again after the delay.
    RateLimited(Limited),
    /// The store could not be reached; nothing was changed.
    Unavailable(String),
    /// Something of the node's own failed (hashing, minting a token).
    Internal(String),
}

impl DomainError {
    /// A store failure, with the input that named the missing entity.
    fn store(err: StoreError, field: &'static str, what: &'static str) -> Self {
        match err {
            StoreError::NotFound => DomainError::NotFound { field, what },
            StoreError::Conflict { field } => DomainError::Conflict { field },
            StoreError::Unavailable(why) => {
                tracing::warn!(%why, "store unavailable during a write");
                DomainError::Unavailable(why)
            }
        }
    }
}

/// A store outcome in the domain's terms: the input `field` named the
/// entity `what` (a missing one is `NotFound` on that field).
trait ForInput<T> {
    fn for_input(self, field: &'static str, what: &'static str) -> Result<T, DomainError>;
}

impl<T> ForInput<T> for crate::store::StoreResult<T> {
    fn for_input(self, field: &'static str, what: &'static str) -> Result<T, DomainError> {
        self.map_err(|e| DomainError::store(e, field, what))
    }
}

/// An event that was not published after its write succeeded: the write
/// stands, and the caller is told subscribers will not see it live.
#[derive(Debug)]
pub struct Unpublished {
    pub kind: &'static str,
    pub error: BrokerError,
}

/// A write that happened, the events of it that could not be published
/// (empty when all went out), and follow-up writes that failed while the
/// main one stands (a comment whose notification could not be stored).
#[derive(Debug)]
pub struct Written<T> {
    pub value: T,
    pub unpublished: Vec<Unpublished>,
    pub incomplete: Vec<DomainError>,
}

impl<T> Written<T> {
    fn new(value: T) -> Self {
        Self {
            value,
            unpublished: Vec::new(),
            incomplete: Vec::new(),
        }
    }
}

/// Collects every input problem of one request before answering.
#[derive(Default)]
struct Checks(Vec<FieldProblem>);

impl Checks {
    fn fail(&mut self, field: &'static str, message: impl Into<String>) {
        self.0.push(FieldProblem {
            field,
            message: message.into(),
        });
    }

    /// A required text: not blank, at most `max` characters.
    fn text(&mut self, field: &'static str, value: &str, max: usize) {
        if value.trim().is_empty() {
            self.fail(field, format!("{field} must not be empty"));
        } else {
            self.at_most(field, value, max);
        }
    }

    /// Any text of at most `max` characters.
    fn at_most(&mut self, field: &'static str, value: &str, max: usize) {
        if value.chars().count() > max {
            self.fail(field, format!("{field} must be at most {max} characters"));
        }
    }

    fn done(self) -> Result<(), DomainError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(DomainError::Invalid(self.0))
        }
    }
}

impl Domain {
    /// The caller's user id, or [`DomainError::Unauthorized`].
    fn actor(principal: Option<&Principal>) -> Result<&str, DomainError> {
        principal
            .map(|p| p.user_id.as_str())
            .ok_or(DomainError::Unauthorized)
    }

    /// Publishes one event of kind `K`; a failure is logged and returned
    /// for the caller to report (the write it follows stands).
    async fn publish<K: EventKind>(&self, payload: &K::Payload) -> Option<Unpublished> {
        match self.hub.publish(K::event(payload)).await {
            Ok(_) => None,
            Err(error) => {
                tracing::warn!(%error, kind = K::NAME, "publish failed after a write");
                Some(Unpublished {
                    kind: K::NAME,
                    error,
                })
            }
        }
    }

    /// A store write of the entity that the input `id` names (a `what`),
    /// then its event of kind `K`.
    async fn write<K: EventKind>(
        &self,
        stored: crate::store::StoreResult<K::Payload>,
        what: &'static str,
    ) -> Result<Written<K::Payload>, DomainError> {
        Ok(self.written::<K>(stored.for_input("id", what)?).await)
    }

    /// A write of `value` followed by its event of kind `K`.
    async fn written<K: EventKind>(&self, value: K::Payload) -> Written<K::Payload> {
        let mut out = Written::new(value);
        out.unpublished.extend(self.publish::<K>(&out.value).await);
        out
    }
}
