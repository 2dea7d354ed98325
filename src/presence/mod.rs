//! Presence: who is online in which channel, and with what status.
//!
//! A connection that subscribes to a channel [`Presence::join`]s it and
//! holds the returned [`PresenceGuard`]; dropping the guard leaves. The
//! transports never wait on presence: `join` and the guard's `Drop` only
//! touch a node-local table (the [`Registry`]), and a background task per
//! node carries the changes to the shared state and announces them.
//!
//! # Contract of every [`Presence`]
//!
//! - **A user counts once.** Joins are reference-counted per node per
//!   (channel, user), so a user with several connections (on one node or
//!   on several) is one entry; the entry goes when the last of them leaves.
//! - **Transitions are announced, once.** `presence.updated {user_id,
//!   channel_id, status}` is published on `channel:{id}` when a user comes
//!   online in a channel (`status` is their current status), when their
//!   status changes (to each channel they are online in), and when they go
//!   offline there (`status: "offline"`). Each transition is announced by
//!   exactly one node; a join and a leave that cancel out before the node
//!   writes them may announce nothing.
//! - **[`Presence::online`] answers from any node** and never lists a user
//!   whose entry has expired.
//! - **A node that dies lets go.** Shared entries are leases the node
//!   renews; a node killed outright stops renewing, and its users go
//!   offline within the TTL (announced by whichever surviving node removes
//!   the entry first, once).
//! - **Statuses** (`online`, `away`, `busy`) belong to the user, fleet-wide,
//!   last write wins; a user with no status set is `online`. A status
//!   outlives a disconnect for at most the TTL, so a quick reconnect keeps it.
//!
//! Implementations: [`memory::MemoryPresence`] (one node: the local table
//! is the truth) and [`redis::RedisPresence`] (a fleet sharing Redis, with
//! leases; its module docs give the semantics, and
//! [`crate::infra::redis::Keys`] the key layout).

pub mod memory;
pub mod redis;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use prometheus::IntGauge;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::domain::events::{EventKind, PresencePayload, PresenceUpdated};
use crate::event::NewEvent;

/// The event type of every presence announcement.
pub const PRESENCE_UPDATED: &str = PresenceUpdated::NAME;

/// A status a user sets for themselves.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default, async_graphql::Enum,
)]
#[serde(rename_all = "lowercase")]
#[graphql(name = "PresenceStatus")]
pub enum Status {
    #[default]
    Online,
    Away,
    Busy,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Online => "online",
            Status::Away => "away",
            Status::Busy => "busy",
        }
    }

    /// Parses `online`, `away` or `busy`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "online" => Some(Status::Online),
            "away" => Some(Status::Away),
            "busy" => Some(Status::Busy),
            _ => None,
        }
    }
}

/// The `status` announced when a user leaves a channel; not a [`Status`]
/// because nobody can set it.
pub const OFFLINE: &str = "offline";

/// One user online in a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnlineUser {
    pub user_id: String,
    pub status: Status,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PresenceError {
    #[error("presence is unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// Marks `user_id` present in `channel_id` until the guard drops.
    /// Synchronous and cheap: the shared state follows in the background.
    fn join(&self, channel_id: &str, user_id: &str) -> PresenceGuard;

    /// Sets `user_id`'s status and announces it to the channels they are
    /// online in, if it changed.
    async fn set_status(&self, user_id: &str, status: Status) -> Result<(), PresenceError>;

    /// The users online in `channel_id` now, ordered by user id.
    async fn online(&self, channel_id: &str) -> Result<Vec<OnlineUser>, PresenceError>;

    /// `Err(why)` while presence cannot reach its shared state (readiness
    /// reports it); the node-local table of one node is always ready.
    fn readiness(&self) -> Result<(), String> {
        Ok(())
    }
}

/// A user's presence in a channel through one connection; dropping it
/// leaves, synchronously and without blocking.
#[must_use = "dropping the guard leaves the channel at once"]
pub struct PresenceGuard {
    registry: Arc<Registry>,
    channel_id: String,
    user_id: String,
}

impl PresenceGuard {
    pub fn channel_id(&self) -> &str {
        &self.channel_id
    }

    pub fn user_id(&self) -> &str {
        &self.user_id
    }
}

impl std::fmt::Debug for PresenceGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PresenceGuard")
            .field("channel_id", &self.channel_id)
            .field("user_id", &self.user_id)
            .finish()
    }
}

impl Drop for PresenceGuard {
    fn drop(&mut self) {
        self.registry.leave(&self.channel_id, &self.user_id);
    }
}

/// A (channel, user) pair.
pub(crate) type Pair = (String, String);

/// The node-local table of present pairs, reference-counted, with the set
/// of pairs that changed since the background task last looked.
///
/// Changes are recorded as a set of *dirty pairs*, not as a queue of
/// operations: the task reads each pair's current count when it gets to
/// it, so a burst of joins and leaves costs one write per pair, nothing can
/// overflow, and nothing is lost (a leave in `Drop` is never dropped).
pub(crate) struct Registry {
    tables: Mutex<Tables>,
    /// Wakes the background task; `notify_one` keeps a permit, so a change
    /// made while the task is busy is seen on its next round.
    wake: Notify,
    /// `subgate_presence_entries`: pairs present on this node.
    entries: IntGauge,
}

#[derive(Default)]
struct Tables {
    /// channel -> user -> live guards on this node.
    channels: HashMap<String, HashMap<String, usize>>,
    /// user -> channels they are present in on this node.
    users: HashMap<String, HashSet<String>>,
    dirty: HashSet<Pair>,
}

impl Registry {
    pub(crate) fn new(entries: IntGauge) -> Arc<Self> {
        Arc::new(Self {
            tables: Mutex::new(Tables::default()),
            wake: Notify::new(),
            entries,
        })
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        // Every critical section is a few map operations that leave the
        // tables consistent, so a panic elsewhere must not wedge presence.
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn join(self: &Arc<Self>, channel_id: &str, user_id: &str) -> PresenceGuard {
        let first = {
            let mut t = self.tables();
            let count = t
                .channels
                .entry(channel_id.to_owned())
                .or_default()
                .entry(user_id.to_owned())
                .or_insert(0);
            *count += 1;
            let first = *count == 1;
            if first {
                t.users
                    .entry(user_id.to_owned())
                    .or_default()
                    .insert(channel_id.to_owned());
                t.dirty.insert((channel_id.to_owned(), user_id.to_owned()));
            }
            first
        };
        if first {
            self.entries.inc();
            self.wake.notify_one();
        }
        PresenceGuard {
            registry: self.clone(),
            channel_id: channel_id.to_owned(),
            user_id: user_id.to_owned(),
        }
    }

    fn leave(&self, channel_id: &str, user_id: &str) {
        let last = {
            let mut t = self.tables();
            let Some(users) = t.channels.get_mut(channel_id) else {
                return;
            };
            let Some(count) = users.get_mut(user_id) else {
                return;
            };
            *count -= 1;
            if *count > 0 {
                return;
            }
            users.remove(user_id);
            if users.is_empty() {
                t.channels.remove(channel_id);
            }
            if let Some(channels) = t.users.get_mut(user_id) {
                channels.remove(channel_id);
                if channels.is_empty() {
                    t.users.remove(user_id);
                }
            }
            t.dirty.insert((channel_id.to_owned(), user_id.to_owned()));
            true
        };
        if last {
            self.entries.dec();
            self.wake.notify_one();
        }
    }

    /// Waits until something changed since the last [`Registry::take_dirty`].
    pub(crate) async fn changed(&self) {
        self.wake.notified().await;
    }

    /// The pairs that changed, each with whether it is present now.
    pub(crate) fn take_dirty(&self) -> Vec<(Pair, bool)> {
        let mut t = self.tables();
        let dirty = std::mem::take(&mut t.dirty);
        dirty
            .into_iter()
            .map(|pair| {
                let held = t
                    .channels
                    .get(&pair.0)
                    .is_some_and(|users| users.contains_key(&pair.1));
                (pair, held)
            })
            .collect()
    }

    /// Puts pairs back for the next round (their write failed).
    pub(crate) fn mark_dirty(&self, pairs: impl IntoIterator<Item = Pair>) {
        self.tables().dirty.extend(pairs);
        self.wake.notify_one();
    }

    /// Whether `user_id` is present in `channel_id` on this node.
    #[cfg(test)]
    pub(crate) fn holds(&self, channel_id: &str, user_id: &str) -> bool {
        self.tables()
            .channels
            .get(channel_id)
            .is_some_and(|users| users.contains_key(user_id))
    }

    /// Every present pair on this node.
    pub(crate) fn pairs(&self) -> Vec<Pair> {
        let t = self.tables();
        t.channels
            .iter()
            .flat_map(|(channel, users)| {
                users
                    .keys()
                    .map(move |user| (channel.clone(), user.clone()))
            })
            .collect()
    }

    /// The users present in `channel_id` on this node.
    pub(crate) fn users_in(&self, channel_id: &str) -> Vec<String> {
        self.tables()
            .channels
            .get(channel_id)
            .map(|users| users.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The channels `user_id` is present in on this node.
    pub(crate) fn channels_of(&self, user_id: &str) -> Vec<String> {
        self.tables()
            .users
            .get(user_id)
            .map(|c| c.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Whether `user_id` is present in any channel on this node.
    pub(crate) fn has_user(&self, user_id: &str) -> bool {
        self.tables().users.contains_key(user_id)
    }
}

/// The announcement of `user_id`'s `status` (or [`OFFLINE`]) in `channel_id`.
pub fn updated_event(channel_id: &str, user_id: &str, status: &str) -> NewEvent {
    PresenceUpdated::event(&PresencePayload {
        user_id: user_id.to_owned(),
        channel_id: channel_id.to_owned(),
        status: status.to_owned(),
    })
}

/// A supervised background task (restarted when it dies, see
/// [`crate::supervise`]), stopped when the presence service that owns it
/// drops.
pub(crate) struct TaskGuard(#[allow(dead_code)] crate::supervise::Supervised);

impl TaskGuard {
    pub(crate) fn supervise<F, Fut>(
        task: &'static str,
        restarts: prometheus::IntCounterVec,
        make: F,
    ) -> Self
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        Self(crate::supervise::spawn(task, restarts, make))
    }
}

/// The payload of the next `presence.updated` on `sub`, within `wait`.
#[cfg(test)]
pub(crate) async fn next_announcement(
    sub: &mut crate::hub::Subscription,
    wait: std::time::Duration,
) -> serde_json::Value {
    let event = tokio::time::timeout(wait, sub.recv())
        .await
        .expect("an announcement")
        .unwrap();
    assert_eq!(event.event.kind, PRESENCE_UPDATED);
    event.event.payload.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> Arc<Registry> {
        Registry::new(IntGauge::new("entries", "test").unwrap())
    }

    #[test]
    fn joins_are_counted_per_pair_and_the_last_leave_removes_it() {
        let r = registry();
        let a = r.join("c1", "ann");
        let b = r.join("c1", "ann");
        let c = r.join("c2", "ann");
        assert_eq!(
            r.entries.get(),
            2,
            "one entry per pair, however many connections"
        );
        let mut dirty: Vec<_> = r.take_dirty();
        dirty.sort();
        assert_eq!(
            dirty,
            vec![
                (("c1".into(), "ann".into()), true),
                (("c2".into(), "ann".into()), true)
            ]
        );
        drop(a);
        assert!(r.holds("c1", "ann"));
        assert!(
            r.take_dirty().is_empty(),
            "a leave that is not the last changes nothing"
        );
        drop(b);
        assert!(!r.holds("c1", "ann"));
        assert_eq!(r.take_dirty(), vec![(("c1".into(), "ann".into()), false)]);
        assert_eq!(r.channels_of("ann"), vec!["c2".to_owned()]);
        drop(c);
        assert!(!r.has_user("ann"));
        assert!(r.pairs().is_empty());
        assert_eq!(r.entries.get(), 0);
    }

    #[test]
    fn a_join_and_leave_between_rounds_is_one_dirty_pair() {
        let r = registry();
        drop(r.join("c1", "ann"));
        let g = r.join("c1", "ann");
        assert_eq!(r.take_dirty(), vec![(("c1".into(), "ann".into()), true)]);
        drop(g);
        assert_eq!(r.take_dirty(), vec![(("c1".into(), "ann".into()), false)]);
    }

    #[test]
    fn statuses_parse_and_print() {
        for s in [Status::Online, Status::Away, Status::Busy] {
            assert_eq!(Status::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert_eq!(Status::parse(OFFLINE), None);
    }
}
