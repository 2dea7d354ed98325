//! The broker seam: where events enter the fleet and come back to this node.
//!
//! Contract of every [`Broker`]:
//! - [`Broker::publish`] assigns the event its id and timestamp, makes it
//!   reach the sink of every node subscribed to the topic (this one
//!   included), and returns the stamped event; an `Err` means it was not
//!   published, never "maybe".
//! - [`Broker::subscribe`] resolves once the broker delivers the topic's
//!   events to the sink; it is idempotent and the hub calls it for every
//!   local subscription.
//! - [`Broker::release`] says the hub has no local subscriber left for a
//!   topic; it is synchronous and must not block (called from `Drop`).
//! - Delivery to the sink never waits on a subscriber.
//! - Each topic keeps a bounded, expiring history written together with the
//!   publish, so the id a subscriber sees is the id in the history;
//!   [`Broker::history`] reads it after a [`Position`] and says
//!   [`History::Gap`] when it cannot resume exactly from there;
//!   [`Broker::head`] names its latest position, where a subscriber that
//!   has seen nothing yet stands.
//!
//! Implementations: [`memory::MemoryBroker`] (one node) and
//! [`redis::RedisBroker`] (a fleet sharing Redis); both pass one
//! conformance suite (`conformance.rs`), the contract above as tests.

#[cfg(test)]
mod conformance;
pub mod memory;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::event::{NewEvent, Position, SharedEvent};

/// What each topic's history keeps.
#[derive(Debug, Clone, Copy)]
pub struct HistoryLimits {
    /// Events kept per topic (approximate on Redis, `MAXLEN ~`).
    pub size: usize,
    /// How long a topic's history lives after its last event; then its
    /// epoch ends.
    pub ttl: Duration,
}

/// Where a broker hands the events it receives: the node's hub.
pub trait EventSink: Send + Sync + 'static {
    fn dispatch(&self, event: Arc<SharedEvent>);
    /// The topics this node has local subscribers for: what a broker must
    /// be subscribed to, no more, no less.
    fn topics(&self) -> Vec<String>;
    /// Whether this node has a local subscriber for `topic`.
    fn wants(&self, topic: &str) -> bool;
}

/// Why a resume position cannot be resumed from exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapReason {
    /// The position is older than the retained history.
    Expired,
    /// The position belongs to a history that was lost (another epoch), or
    /// the topic has no history at all.
    EpochChanged,
    /// The position is not one subgate wrote.
    Malformed,
    /// The history could not be read (the bus is unavailable).
    Unavailable,
}

impl GapReason {
    /// The stable string clients see.
    pub fn as_str(self) -> &'static str {
        match self {
            GapReason::Expired => "expired",
            GapReason::EpochChanged => "epoch_changed",
            GapReason::Malformed => "malformed",
            GapReason::Unavailable => "unavailable",
        }
    }
}

/// What a topic's history says after a position.
#[derive(Debug, Clone)]
pub enum History {
    /// Every event after the position, oldest first (at most the limit).
    Complete(Vec<Arc<SharedEvent>>),
    /// The position cannot be resumed from exactly; `retained` is what the
    /// history holds now (current epoch), oldest first.
    Gap {
        reason: GapReason,
        retained: Vec<Arc<SharedEvent>>,
    },
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error("the event bus is unavailable: {0}")]
    Unavailable(String),
    #[error("invalid topic {0:?}")]
    InvalidTopic(String),
}

pub type BrokerResult<T> = Result<T, BrokerError>;

#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Connects the broker to the node's sink; called once at start.
    fn start(&self, sink: Arc<dyn EventSink>);
    async fn publish(&self, event: NewEvent) -> BrokerResult<Arc<SharedEvent>>;
    async fn subscribe(&self, topic: &str) -> BrokerResult<()>;
    fn release(&self, topic: &str);
    /// `Err(why)` while the broker cannot serve (readiness says why).
    fn readiness(&self) -> Result<(), String>;

    /// Which bus this is, for `/readyz` (`None`: the in-memory bus).
    fn describe(&self) -> Option<String> {
        None
    }
    /// The events of `topic` after `after`, at most `limit`, oldest first.
    async fn history(&self, topic: &str, after: &Position, limit: usize) -> BrokerResult<History>;
    /// The position of `topic`'s latest event; `None` when the topic has no
    /// history (never published to, or expired).
    async fn head(&self, topic: &str) -> BrokerResult<Option<Position>>;
}
