//! Presence on one node: the local table is the whole truth.
//!
//! Nothing is leased, since there is no other node to outlive; the
//! background task only announces transitions, reading each changed pair's
//! count when it gets to it and comparing it with what it last announced.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{
    updated_event, OnlineUser, Pair, Presence, PresenceError, PresenceGuard, Registry, Status,
    TaskGuard, OFFLINE,
};
use crate::hub::Hub;
use crate::telemetry::metrics::Metrics;

pub struct MemoryPresence {
    shared: Arc<Shared>,
    _task: TaskGuard,
}

struct Shared {
    registry: Arc<Registry>,
    hub: Arc<Hub>,
    /// How long a status outlives its user's last channel.
    status_ttl: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Pairs announced online and not yet announced offline.
    announced: HashSet<Pair>,
    /// Statuses other than `online`, with when they were last set.
    statuses: HashMap<String, (Status, Instant)>,
}

impl MemoryPresence {
    /// Presence announced through `hub`; statuses of users present in no
    /// channel are forgotten after `status_ttl`.
    pub fn new(hub: Arc<Hub>, metrics: &Metrics, status_ttl: Duration) -> Self {
        let shared = Arc::new(Shared {
            registry: Registry::new(metrics.presence_entries.clone()),
            hub,
            status_ttl,
            state: Mutex::new(State::default()),
        });
        let task =
            TaskGuard::supervise("presence_announce", metrics.task_restarts_total.clone(), {
                let shared = shared.clone();
                move || announce(shared.clone())
            });
        Self {
            shared,
            _task: task,
        }
    }
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn status(state: &State, user_id: &str) -> Status {
        state
            .statuses
            .get(user_id)
            .map_or(Status::Online, |(s, _)| *s)
    }
}

/// The background task: announces each changed pair's transition, and
/// forgets the statuses of users who left long enough ago.
async fn announce(shared: Arc<Shared>) {
    let mut prune = tokio::time::interval(shared.status_ttl.max(Duration::from_secs(1)));
    loop {
        tokio::select! {
            _ = shared.registry.changed() => {}
            _ = prune.tick() => {
                let now = Instant::now();
                let mut state = shared.state();
                let ttl = shared.status_ttl;
                state.statuses.retain(|user, (_, set_at)| {
                    shared.registry.has_user(user) || now.duration_since(*set_at) < ttl
                });
                continue;
            }
        }
        for (pair, held) in shared.registry.take_dirty() {
            let announcement = {
                let mut state = shared.state();
                if held && !state.announced.contains(&pair) {
                    let status = Shared::status(&state, &pair.1);
                    state.announced.insert(pair.clone());
                    Some(status.as_str())
                } else if !held && state.announced.remove(&pair) {
                    Some(OFFLINE)
                } else {
                    None
                }
            };
            if let Some(status) = announcement {
                // A refused publish (an id that is no valid topic) is counted
                // by the hub; presence itself is still right.
                let _ = shared
                    .hub
                    .publish(updated_event(&pair.0, &pair.1, status))
                    .await;
            }
        }
    }
}

#[async_trait]
impl Presence for MemoryPresence {
    fn join(&self, channel_id: &str, user_id: &str) -> PresenceGuard {
        self.shared.registry.join(channel_id, user_id)
    }

    async fn set_status(&self, user_id: &str, status: Status) -> Result<(), PresenceError> {
        let channels: Vec<String> = {
            let mut state = self.shared.state();
            let old = match status {
                Status::Online => state.statuses.remove(user_id),
                other => state
                    .statuses
                    .insert(user_id.to_owned(), (other, Instant::now())),
            };
            if old.map_or(Status::Online, |(s, _)| s) == status {
                return Ok(());
            }
            // Only channels already announced: a pending one is announced
            // by the task with the status current then.
            self.shared
                .registry
                .channels_of(user_id)
                .into_iter()
                .filter(|c| state.announced.contains(&(c.clone(), user_id.to_owned())))
                .collect()
        };
        for channel in channels {
            let _ = self
                .shared
                .hub
                .publish(updated_event(&channel, user_id, status.as_str()))
                .await;
        }
        Ok(())
    }

    async fn online(&self, channel_id: &str) -> Result<Vec<OnlineUser>, PresenceError> {
        let mut users = self.shared.registry.users_in(channel_id);
        users.sort();
        let state = self.shared.state();
        Ok(users
            .into_iter()
            .map(|user_id| {
                let status = Shared::status(&state, &user_id);
                OnlineUser { user_id, status }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::memory::MemoryBroker;
    use crate::hub::Subscription;

    fn node() -> (MemoryPresence, Arc<Hub>, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let hub = Hub::new(Arc::new(MemoryBroker::default()), metrics.clone(), 64);
        (
            MemoryPresence::new(hub.clone(), &metrics, Duration::from_secs(15)),
            hub,
            metrics,
        )
    }

    async fn next(sub: &mut Subscription) -> serde_json::Value {
        crate::presence::next_announcement(sub, Duration::from_secs(5)).await
    }

    async fn quiet(sub: &mut Subscription) {
        let more = tokio::time::timeout(Duration::from_millis(100), sub.recv()).await;
        assert!(more.is_err(), "unexpected announcement: {more:?}");
    }

    fn user(id: &str, status: Status) -> OnlineUser {
        OnlineUser {
            user_id: id.into(),
            status,
        }
    }

    #[tokio::test]
    async fn several_connections_of_a_user_count_once() {
        let (presence, hub, metrics) = node();
        let mut sub = hub.subscribe("channel:c1", "test", None).await.unwrap();
        let a = presence.join("c1", "ann");
        let b = presence.join("c1", "ann");
        let bob = presence.join("c1", "bob");
        let mut seen = [next(&mut sub).await, next(&mut sub).await];
        seen.sort_by_key(|v| v["user_id"].as_str().unwrap().to_owned());
        assert_eq!(
            seen[0],
            serde_json::json!({"user_id": "ann", "channel_id": "c1", "status": "online"})
        );
        assert_eq!(seen[1]["user_id"], "bob");
        quiet(&mut sub).await;
        assert_eq!(
            presence.online("c1").await.unwrap(),
            vec![user("ann", Status::Online), user("bob", Status::Online)]
        );
        assert_eq!(metrics.presence_entries.get(), 2);

        drop(a);
        quiet(&mut sub).await;
        assert_eq!(
            presence.online("c1").await.unwrap().len(),
            2,
            "ann still has a connection"
        );
        drop(b);
        assert_eq!(
            next(&mut sub).await,
            serde_json::json!({"user_id": "ann", "channel_id": "c1", "status": "offline"})
        );
        assert_eq!(
            presence.online("c1").await.unwrap(),
            vec![user("bob", Status::Online)]
        );
        drop(bob);
        assert_eq!(next(&mut sub).await["status"], "offline");
        assert!(presence.online("c1").await.unwrap().is_empty());
        assert_eq!(metrics.presence_entries.get(), 0);
    }

    #[tokio::test]
    async fn a_status_change_reaches_every_channel_of_the_user() {
        let (presence, hub, _) = node();
        let mut c1 = hub.subscribe("channel:c1", "test", None).await.unwrap();
        let mut c2 = hub.subscribe("channel:c2", "test", None).await.unwrap();
        let _g1 = presence.join("c1", "ann");
        let _g2 = presence.join("c2", "ann");
        next(&mut c1).await;
        next(&mut c2).await;
        presence.set_status("ann", Status::Away).await.unwrap();
        assert_eq!(
            next(&mut c1).await,
            serde_json::json!({"user_id": "ann", "channel_id": "c1", "status": "away"})
        );
        assert_eq!(next(&mut c2).await["status"], "away");
        // Setting the same status again is no transition.
        presence.set_status("ann", Status::Away).await.unwrap();
        quiet(&mut c1).await;
        assert_eq!(
            presence.online("c1").await.unwrap(),
            vec![user("ann", Status::Away)]
        );
    }

    #[tokio::test]
    async fn a_status_set_before_joining_is_the_one_announced() {
        let (presence, hub, _) = node();
        let mut sub = hub.subscribe("channel:c1", "test", None).await.unwrap();
        presence.set_status("ann", Status::Busy).await.unwrap();
        let _g = presence.join("c1", "ann");
        assert_eq!(next(&mut sub).await["status"], "busy");
    }

    #[tokio::test]
    async fn a_quick_join_and_leave_may_announce_nothing_but_never_leaves_a_ghost() {
        let (presence, hub, _) = node();
        let mut sub = hub.subscribe("channel:c1", "test", None).await.unwrap();
        for _ in 0..100 {
            drop(presence.join("c1", "ann"));
        }
        // Whatever was announced, the last word is not "online".
        let mut last = None;
        while let Ok(Some(event)) =
            tokio::time::timeout(Duration::from_millis(100), sub.recv()).await
        {
            last = Some(event.event.payload["status"].clone());
        }
        assert!(
            last.is_none() || last == Some(serde_json::json!("offline")),
            "{last:?}"
        );
        assert!(presence.online("c1").await.unwrap().is_empty());
    }
}
