//! How many long-lived connections one user holds, limited to
//! `server.max_connections_per_user`: across the fleet when `redis.url` is
//! set, on this node otherwise.
//!
//! # Fleet-wide, as leases
//!
//! Each node keeps its own count per user in memory, authoritative for
//! that node. In Redis, one hash per user,
//! `{prefix}user-connections:{user}`, holds `node id -> "count:lease_ms"`:
//! each node's count with the instant (Redis' clock) it lapses unless
//! renewed. Admitting a connection is one script over that one key: it
//! removes lapsed entries, adds the other nodes' live counts to this node's
//! new count, and writes this node's entry only when the sum is within the
//! limit. A background task (supervised) writes changed counts at once
//! (a closed connection, a refusal) and renews every entry of this node
//! every `presence.refresh_seconds`, for `presence.ttl_seconds`: a node
//! killed outright stops renewing, and its connections stop counting
//! within the TTL.
//!
//! While Redis is unreachable the limit holds per node (admitted against
//! this node's own count; the counts reach Redis with the next renewal).
//! Two connections of one user admitted at the same instant on two nodes
//! see each other (the script is atomic); on one node, the count written
//! may be one behind for at most one renewal.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

use crate::infra::redis::{Redis, Script};
use crate::supervise::Supervised;
use crate::telemetry::metrics::Metrics;

/// A refusal: the user holds the limit already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverLimit {
    /// `node` (this node's memory, or Redis unreachable) or `fleet`.
    pub scope: &'static str,
}

/// Admits one connection of this node's `ARGV[1]` when the live counts of
/// the other nodes plus `ARGV[2]` (this node's count with it) stay within
/// `ARGV[3]`; the entry lasts `ARGV[4]` ms. Answers 1 (admitted) or 0.
static ADMIT: Script = Script::new(
    r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local others = 0
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  if entries[i] ~= ARGV[1] then
    local sep = string.find(entries[i + 1], ':', 1, true)
    local count = tonumber(string.sub(entries[i + 1], 1, sep - 1))
    local lease = tonumber(string.sub(entries[i + 1], sep + 1))
    if lease < now then
      redis.call('HDEL', KEYS[1], entries[i])
    else
      others = others + count
    end
  end
end
if others + tonumber(ARGV[2]) > tonumber(ARGV[3]) then
  return 0
end
local ttl = tonumber(ARGV[4])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. (now + ttl))
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
"#,
);

/// Writes this node's (`ARGV[1]`) counts: `KEYS[i]` gets `ARGV[i + 2]`,
/// lasting `ARGV[2]` ms; a count of 0 removes the entry.
static WRITE: Script = Script::new(
    r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  local count = ARGV[i + 2]
  if count == '0' then
    redis.call('HDEL', key, ARGV[1])
  else
    redis.call('HSET', key, ARGV[1], count .. ':' .. (now + ttl))
    redis.call('PEXPIRE', key, ttl)
  end
end
return 0
"#,
);

/// Users written by one script call.
const BATCH: usize = 500;

/// Leases in Redis: this node's name and timings.
struct Fleet {
    redis: Redis,
    node_id: String,
    ttl: Duration,
    refresh: Duration,
}

struct Inner {
    limit: usize,
    fleet: Option<Fleet>,
    /// This node's connections per user.
    counts: Mutex<HashMap<String, usize>>,
    /// Users whose count changed since it was last written to Redis.
    dirty: Mutex<HashSet<String>>,
    changed: Notify,
    metrics: Arc<Metrics>,
}

/// The per-user connection limit of one node.
pub struct UserConnections {
    inner: Arc<Inner>,
    _writer: Option<Supervised>,
}

/// One admitted connection of a user; released when dropped.
pub struct UserLease {
    inner: Arc<Inner>,
    user: String,
}

impl Drop for UserLease {
    fn drop(&mut self) {
        self.inner.release(&self.user);
    }
}

impl UserConnections {
    /// `limit` connections per user; across the fleet through `redis`
    /// (with leases of `ttl`, renewed every `refresh`) when given. With
    /// Redis, call inside a Tokio runtime (it starts the writer).
    pub fn new(
        limit: usize,
        redis: Option<(Redis, Duration, Duration)>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let fleet = redis.map(|(redis, ttl, refresh)| Fleet {
            redis,
            node_id: crate::store::new_id(),
            ttl,
            refresh,
        });
        let inner = Arc::new(Inner {
            limit,
            fleet,
            counts: Mutex::new(HashMap::new()),
            dirty: Mutex::new(HashSet::new()),
            changed: Notify::new(),
            metrics,
        });
        let writer = inner.fleet.as_ref().map(|_| {
            let restarts = inner.metrics.task_restarts_total.clone();
            let task = inner.clone();
            crate::supervise::spawn("user_connections_write", restarts, move || {
                write(task.clone())
            })
        });
        Self {
            inner,
            _writer: writer,
        }
    }

    /// Admits one more connection of `user`, or refuses it when the user
    /// holds the limit already (on this node, or across the fleet).
    pub async fn acquire(&self, user: &str) -> Result<UserLease, OverLimit> {
        let inner = &self.inner;
        let mine = {
            let mut counts = inner.counts();
            let count = counts.entry(user.to_owned()).or_insert(0);
            *count += 1;
            *count
        };
        let lease = UserLease {
            inner: inner.clone(),
            user: user.to_owned(),
        };
        if mine > inner.limit {
            // Dropping the lease takes the reservation back.
            drop(lease);
            return Err(self.refuse("node"));
        }
        let Some(fleet) = &inner.fleet else {
            return Ok(lease);
        };
        let mut inv = ADMIT.invocation();
        inv.key(fleet.redis.keys().user_connections(user))
            .arg(&fleet.node_id)
            .arg(mine)
            .arg(inner.limit)
            .arg(fleet.ttl.as_millis() as u64);
        match fleet.redis.call::<i64>("user_connections", &inv).await {
            Ok(1) => Ok(lease),
            Ok(_) => {
                drop(lease);
                Err(self.refuse("fleet"))
            }
            Err(why) => {
                // Redis away: this node's own count decides; the renewal
                // writes it once Redis is back.
                tracing::debug!(%why, "user connection limit: Redis unreachable, counting per node");
                inner.mark_dirty(user);
                Ok(lease)
            }
        }
    }
}

impl UserConnections {
    fn refuse(&self, scope: &'static str) -> OverLimit {
        self.inner
            .metrics
            .user_connections_rejected_total
            .with_label_values(&[scope])
            .inc();
        OverLimit { scope }
    }
}

impl Inner {
    fn counts(&self) -> MutexGuard<'_, HashMap<String, usize>> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mark_dirty(&self, user: &str) {
        if self.fleet.is_none() {
            return;
        }
        self.dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(user.to_owned());
        self.changed.notify_one();
    }

    fn release(&self, user: &str) {
        {
            let mut counts = self.counts();
            if let Some(count) = counts.get_mut(user) {
                *count -= 1;
                if *count == 0 {
                    counts.remove(user);
                }
            }
        }
        self.mark_dirty(user);
    }

    /// This node's counts of `users` (0 for those gone) into Redis.
    async fn write(&self, fleet: &Fleet, users: &[String]) -> Result<(), String> {
        for batch in users.chunks(BATCH) {
            let mut inv = WRITE.invocation();
            inv.arg(&fleet.node_id).arg(fleet.ttl.as_millis() as u64);
            {
                let counts = self.counts();
                for user in batch {
                    inv.key(fleet.redis.keys().user_connections(user))
                        .arg(counts.get(user).copied().unwrap_or(0));
                }
            }
            fleet
                .redis
                .call::<i64>("user_connections", &inv)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// The writer: changed counts at once, every count once per refresh.
async fn write(inner: Arc<Inner>) {
    let Some(fleet) = &inner.fleet else {
        return std::future::pending().await;
    };
    let mut refresh = tokio::time::interval(fleet.refresh);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let users: Vec<String> = tokio::select! {
            _ = inner.changed.notified() => {
                std::mem::take(&mut *inner.dirty.lock().unwrap_or_else(|p| p.into_inner()))
                    .into_iter()
                    .collect()
            }
            _ = refresh.tick() => {
                let mut users: HashSet<String> = inner.counts().keys().cloned().collect();
                users.extend(std::mem::take(
                    &mut *inner.dirty.lock().unwrap_or_else(|p| p.into_inner()),
                ));
                users.into_iter().collect()
            }
        };
        if users.is_empty() {
            continue;
        }
        if let Err(why) = inner.write(fleet, &users).await {
            tracing::debug!(%why, "user connection counts not written; retrying");
            // Written with the next change or renewal.
            inner
                .dirty
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(users);
            tokio::time::sleep(fleet.refresh / 4).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_node_admits_up_to_the_limit_per_user_and_again_after_a_release() {
        let metrics = Arc::new(Metrics::new());
        let limits = UserConnections::new(2, None, metrics.clone());
        let a = limits.acquire("ann").await.unwrap();
        let _b = limits.acquire("ann").await.unwrap();
        assert_eq!(
            limits.acquire("ann").await.err(),
            Some(OverLimit { scope: "node" })
        );
        let _other = limits.acquire("bob").await.expect("per user");
        drop(a);
        let _c = limits.acquire("ann").await.expect("room again");
        assert_eq!(
            metrics
                .user_connections_rejected_total
                .with_label_values(&["node"])
                .get(),
            1
        );
    }
}
