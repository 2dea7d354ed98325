//! Presence shared by a fleet through Redis, as leases each node renews.
//!
//! # Key layout
//!
//! Under the configured prefix `{p}`:
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `{p}presence:members:{channel}` | sorted set | user -> when their presence lapses (ms), the latest of their holders' leases |
//! | `{p}presence:holders:{len(user)}:{user}:{channel}` | hash | node id -> that node's lease (ms): which nodes hold the user there (the length prefix keeps ids with `:` apart) |
//! | `{p}presence:user:{user}` | sorted set | channel -> lease: the channels a user is present in, for status announcements |
//! | `{p}presence:status:{user}` | string | `away` / `busy`, with a TTL renewed while the user is present; absent means `online` |
//! | `{p}presence:channels` | sorted set | channel -> its earliest lease: what the sweep looks at |
//!
//! # Semantics
//!
//! - A join is written at once (the background task wakes on it); every
//!   `refresh` each node renews the leases of all its pairs to now + `ttl`.
//!   A pair whose members entry was absent or lapsed is announced online by
//!   the node whose write found it so, inside the same script: once.
//! - A node whose last guard for a pair drops removes its own lease only.
//!   If another node still holds a live lease, the user stays listed (with
//!   that lease) and nothing is announced: a present user is never shown
//!   offline because one of their nodes let go. If no live lease is left,
//!   the user is removed and announced offline by that node, at once.
//! - A node killed outright renews nothing: its leases lapse within `ttl`.
//!   Reads ignore lapsed entries from that instant, and within one
//!   `sweep_interval` some node's sweep removes them and announces the
//!   users offline; the removal is an atomic ZREM in a script, so exactly
//!   one node announces each.
//! - Times are Redis' own clock (`TIME` inside the scripts), so nodes with
//!   skewed clocks agree on what has lapsed.
//! - While Redis is unreachable, writes fail and are counted
//!   (`subgate_presence_refresh_failures_total`); leaves are retried, and a
//!   node unable to renew for longer than `ttl` sees its users lapse (and
//!   come back, announced, when it can write again).
//!
//! Calls go through the one Redis layer ([`crate::infra::redis`]), whose
//! key layout lists these keys: the scripts build them from
//! [`Keys::presence`](crate::infra::redis::Keys::presence) and the ids, so
//! this targets one Redis server (or a primary with replicas), not Redis
//! Cluster. Presence's calls count towards the layer's readiness.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::{FromRedisValue, ScriptInvocation};

use super::{
    updated_event, OnlineUser, Pair, Presence, PresenceError, PresenceGuard, Registry, Status,
    TaskGuard, OFFLINE,
};
use crate::hub::Hub;
use crate::infra::redis::{CallError, Redis, Script};
use crate::telemetry::metrics::Metrics;

/// Pairs written by one script call: bounds how long Redis is busy with
/// one node's refresh.
const BATCH: usize = 500;

/// Lapsed users one sweep call removes at most; a sweep that hits it goes
/// on at once with the next call.
const SWEEP_BUDGET: usize = 1000;

/// Tunables of the Redis presence.
#[derive(Debug, Clone)]
pub struct RedisPresenceOptions {
    /// How long a lease lasts unless renewed.
    pub ttl: Duration,
    /// How often this node renews its leases; below `ttl`.
    pub refresh: Duration,
    /// How often this node sweeps lapsed entries.
    pub sweep_interval: Duration,
}

/// Shared by every script: Redis' clock and the key names.
/// ARGV[1] is what every presence key starts with (`{prefix}presence:`);
/// the scripts' own arguments start at ARGV[2].
const PRELUDE: &str = r#"
if redis.replicate_commands then pcall(redis.replicate_commands) end
local ns = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local index = ns .. 'channels'
local function members(ch) return ns .. 'members:' .. ch end
local function holders(ch, user) return ns .. 'holders:' .. #user .. ':' .. user .. ':' .. ch end
local function channels_of(user) return ns .. 'user:' .. user end
local function status_key(user) return ns .. 'status:' .. user end
local function status_of(user) return redis.call('GET', status_key(user)) or 'online' end
-- Keeps the channel's place in the sweep index at its earliest lease.
local function reindex(ch)
  local first = redis.call('ZRANGE', members(ch), 0, 0, 'WITHSCORES')
  if first[1] then redis.call('ZADD', index, first[2], ch) else redis.call('ZREM', index, ch) end
end
-- Removes the user from the channel; true when this call removed them, so
-- that exactly one caller announces it.
local function drop(ch, user)
  redis.call('DEL', holders(ch, user))
  redis.call('ZREM', channels_of(user), ch)
  return redis.call('ZREM', members(ch), user) == 1
end
-- Calls f(ch, user) for each channel, user pair in ARGV from index `first`
-- on, then keeps the sweep index right for every channel it touched.
local function each_pair(first, f)
  local touched = {}
  for i = first, #ARGV, 2 do
    f(ARGV[i], ARGV[i + 1])
    touched[ARGV[i]] = true
  end
  for ch in pairs(touched) do reindex(ch) end
end
"#;

/// Renews this node's leases. ARGV[2] node id, ARGV[3] ttl ms, then
/// channel, user pairs. Answers channel, user, status for each pair that
/// was absent or lapsed: those came online.
static HOLD: Script = Script::with_prelude(
    PRELUDE,
    r#"
local node = ARGV[2]
local ttl = tonumber(ARGV[3])
local lease = now + ttl
local came = {}
each_pair(4, function(ch, user)
  local h = holders(ch, user)
  redis.call('HSET', h, node, lease)
  redis.call('PEXPIRE', h, ttl)
  local old = redis.call('ZSCORE', members(ch), user)
  if (not old) or tonumber(old) <= now then
    table.insert(came, ch)
    table.insert(came, user)
    table.insert(came, status_of(user))
  end
  redis.call('ZADD', members(ch), 'GT', lease, user)
  -- A safety net only: a channel nobody renews for twice the TTL has no
  -- node left to sweep it either.
  redis.call('PEXPIRE', members(ch), ttl * 2)
  redis.call('ZADD', channels_of(user), 'GT', lease, ch)
  redis.call('PEXPIRE', channels_of(user), ttl)
  redis.call('PEXPIRE', status_key(user), ttl)
end)
return came
"#,
);

/// Gives up this node's leases. ARGV[2] node id, then channel, user pairs.
/// Answers channel, user for each pair that no live lease holds any more:
/// those went offline.
static LEAVE: Script = Script::with_prelude(
    PRELUDE,
    r#"
local node = ARGV[2]
local gone = {}
each_pair(3, function(ch, user)
  local h = holders(ch, user)
  redis.call('HDEL', h, node)
  local best = nil
  local rest = redis.call('HGETALL', h)
  for j = 1, #rest, 2 do
    local lease = tonumber(rest[j + 1])
    if lease > now and (best == nil or lease > best) then best = lease end
  end
  if best then
    -- Another node holds them: listed with that node's lease, unannounced.
    redis.call('ZADD', members(ch), 'XX', best, user)
    redis.call('ZADD', channels_of(user), 'XX', best, ch)
  elseif drop(ch, user) then
    table.insert(gone, ch)
    table.insert(gone, user)
  end
end)
return gone
"#,
);

/// Removes lapsed entries, at most ARGV[2] of them. Answers channel, user
/// for each removed.
static SWEEP: Script = Script::with_prelude(
    PRELUDE,
    r#"
local budget = tonumber(ARGV[2])
local gone = {}
local due = redis.call('ZRANGEBYSCORE', index, '-inf', now, 'LIMIT', 0, budget)
for _, ch in ipairs(due) do
  if budget <= 0 then break end
  local lapsed = redis.call('ZRANGEBYSCORE', members(ch), '-inf', now, 'LIMIT', 0, budget)
  for _, user in ipairs(lapsed) do
    if drop(ch, user) then
      table.insert(gone, ch)
      table.insert(gone, user)
    end
    budget = budget - 1
  end
  reindex(ch)
end
return gone
"#,
);

/// The users present in channel ARGV[2], each followed by their status.
static ONLINE: Script = Script::with_prelude(
    PRELUDE,
    r#"
local users = redis.call('ZRANGEBYSCORE', members(ARGV[2]), '(' .. now, '+inf')
local out = {}
for _, user in ipairs(users) do
  table.insert(out, user)
  table.insert(out, status_of(user))
end
return out
"#,
);

/// Sets user ARGV[2]'s status to ARGV[3] for ARGV[4] ms. Answers the
/// channels they are present in when the status changed, else nothing.
static SET_STATUS: Script = Script::with_prelude(
    PRELUDE,
    r#"
local user, status = ARGV[2], ARGV[3]
local old = status_of(user)
if status == 'online' then
  redis.call('DEL', status_key(user))
else
  redis.call('SET', status_key(user), status, 'PX', ARGV[4])
end
if old == status then return {} end
return redis.call('ZRANGEBYSCORE', channels_of(user), '(' .. now, '+inf')
"#,
);

pub struct RedisPresence {
    shared: Arc<Shared>,
    /// The writer and the sweeper; aborted when this handle drops, which is
    /// what a killed node looks like to the rest of the fleet.
    _tasks: [TaskGuard; 2],
}

struct Shared {
    registry: Arc<Registry>,
    hub: Arc<Hub>,
    redis: Redis,
    opts: RedisPresenceOptions,
    /// This node's name in the holders hashes; fresh per process, so a
    /// restarted node never inherits the leases of its previous life.
    node_id: String,
    metrics: Arc<Metrics>,
}

impl RedisPresence {
    /// Presence on `redis`, announced through `hub`; connects lazily.
    pub fn new(
        redis: Redis,
        opts: RedisPresenceOptions,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let shared = Arc::new(Shared {
            registry: Registry::new(metrics.presence_entries.clone()),
            hub,
            redis,
            opts,
            node_id: crate::store::new_id(),
            metrics,
        });
        let restarts = shared.metrics.task_restarts_total.clone();
        let tasks = [
            TaskGuard::supervise("presence_write", restarts.clone(), {
                let shared = shared.clone();
                move || write(shared.clone())
            }),
            TaskGuard::supervise("presence_sweep", restarts, {
                let shared = shared.clone();
                move || sweep(shared.clone())
            }),
        ];
        Self {
            shared,
            _tasks: tasks,
        }
    }
}

impl From<CallError> for PresenceError {
    fn from(e: CallError) -> Self {
        PresenceError::Unavailable(e.to_string())
    }
}

impl Shared {
    /// One script through the layer's timed call.
    async fn run<T: FromRedisValue>(&self, inv: &ScriptInvocation<'_>) -> Result<T, CallError> {
        self.redis.call("presence_script", inv).await
    }

    fn invocation(&self, script: &'static Script) -> ScriptInvocation<'static> {
        let mut inv = script.invocation();
        let prefix = self.redis.keys().presence();
        // The scripts derive their keys from the prefix; the one key named
        // (the index of channels, never read through KEYS) routes the call
        // to the node that owns presence's slot in a cluster.
        inv.key(format!("{prefix}channels")).arg(prefix);
        inv
    }

    /// Renews this node's leases on `pairs` and announces who came online.
    async fn hold(&self, pairs: &[Pair]) -> Result<(), CallError> {
        for batch in pairs.chunks(BATCH) {
            let mut inv = self.invocation(&HOLD);
            inv.arg(&self.node_id).arg(self.opts.ttl.as_millis() as u64);
            for (channel, user) in batch {
                inv.arg(channel).arg(user);
            }
            let came: Vec<String> = self.run(&inv).await?;
            for entry in came.chunks_exact(3) {
                self.announce(&entry[0], &entry[1], &entry[2]).await;
            }
        }
        Ok(())
    }

    /// Gives up this node's leases on `pairs`; announces who went offline.
    async fn leave(&self, pairs: &[Pair]) -> Result<(), CallError> {
        for batch in pairs.chunks(BATCH) {
            let mut inv = self.invocation(&LEAVE);
            inv.arg(&self.node_id);
            for (channel, user) in batch {
                inv.arg(channel).arg(user);
            }
            let gone: Vec<String> = self.run(&inv).await?;
            for entry in gone.chunks_exact(2) {
                self.announce(&entry[0], &entry[1], OFFLINE).await;
            }
        }
        Ok(())
    }

    async fn announce(&self, channel_id: &str, user_id: &str, status: &str) {
        // A refused publish (the bus is down, an id that is no topic) is
        // counted by the hub; the presence entries themselves are right.
        let _ = self
            .hub
            .publish(updated_event(channel_id, user_id, status))
            .await;
    }

    /// Writes the pairs that changed: joins as leases, last leaves as
    /// releases. Failed pairs go back for the next round.
    async fn write_changes(&self) -> Result<(), CallError> {
        let (held, left): (Vec<_>, Vec<_>) = self
            .registry
            .take_dirty()
            .into_iter()
            .partition(|(_, held)| *held);
        let held: Vec<Pair> = held.into_iter().map(|(pair, _)| pair).collect();
        let left: Vec<Pair> = left.into_iter().map(|(pair, _)| pair).collect();
        let mut failure = None;
        if !held.is_empty() {
            if let Err(why) = self.hold(&held).await {
                self.registry.mark_dirty(held);
                failure = Some(why);
            }
        }
        if !left.is_empty() {
            if let Err(why) = self.leave(&left).await {
                self.registry.mark_dirty(left);
                failure = Some(why);
            }
        }
        failure.map_or(Ok(()), Err)
    }

    fn failed(&self, what: &str, why: &CallError) {
        self.metrics.presence_refresh_failures_total.inc();
        tracing::debug!(%why, "presence {what} failed");
    }
}

/// The writer: changes as they happen, every lease once per `refresh`.
async fn write(shared: Arc<Shared>) {
    let mut refresh = tokio::time::interval(shared.opts.refresh);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // After a failure, changes wait this long before the next try, so that
    // an unreachable Redis is not hammered by a retry loop.
    let backoff = (shared.opts.refresh / 4).max(Duration::from_millis(50));
    loop {
        tokio::select! {
            _ = shared.registry.changed() => {
                if let Err(why) = shared.write_changes().await {
                    shared.failed("write", &why);
                    tokio::time::sleep(backoff).await;
                }
            }
            _ = refresh.tick() => {
                let pairs = shared.registry.pairs();
                if let Err(why) = shared.hold(&pairs).await {
                    shared.failed("refresh", &why);
                }
            }
        }
    }
}

/// The sweeper: removes lapsed entries and announces those users offline.
async fn sweep(shared: Arc<Shared>) {
    let mut every = tokio::time::interval(shared.opts.sweep_interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        loop {
            let mut inv = shared.invocation(&SWEEP);
            inv.arg(SWEEP_BUDGET);
            let gone: Vec<String> = match shared.run(&inv).await {
                Ok(gone) => gone,
                Err(why) => {
                    shared.failed("sweep", &why);
                    break;
                }
            };
            for entry in gone.chunks_exact(2) {
                shared.announce(&entry[0], &entry[1], OFFLINE).await;
            }
            if gone.len() / 2 < SWEEP_BUDGET {
                break;
            }
        }
    }
}

#[async_trait]
impl Presence for RedisPresence {
    fn join(&self, channel_id: &str, user_id: &str) -> PresenceGuard {
        self.shared.registry.join(channel_id, user_id)
    }

    async fn set_status(&self, user_id: &str, status: Status) -> Result<(), PresenceError> {
        let shared = &self.shared;
        let mut inv = shared.invocation(&SET_STATUS);
        inv.arg(user_id)
            .arg(status.as_str())
            .arg(shared.opts.ttl.as_millis() as u64);
        let channels: Vec<String> = shared.run(&inv).await?;
        for channel in channels {
            shared.announce(&channel, user_id, status.as_str()).await;
        }
        Ok(())
    }

    async fn online(&self, channel_id: &str) -> Result<Vec<OnlineUser>, PresenceError> {
        let shared = &self.shared;
        let mut inv = shared.invocation(&ONLINE);
        inv.arg(channel_id);
        let flat: Vec<String> = shared.run(&inv).await?;
        let mut users: Vec<OnlineUser> = flat
            .chunks_exact(2)
            .map(|entry| OnlineUser {
                user_id: entry[0].clone(),
                // A status written by a newer node that this one does not
                // know reads as online rather than failing the whole list.
                status: Status::parse(&entry[1]).unwrap_or_default(),
            })
            .collect();
        users.sort_by(|a, b| a.user_id.cmp(&b.user_id));
        Ok(users)
    }

    fn readiness(&self) -> Result<(), String> {
        self.shared.redis.readiness()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::memory::MemoryBroker;
    use crate::hub::Subscription;
    use crate::infra::redis::RedisConfig;
    use crate::test_support::RedisServer;

    /// Short leases so that a "killed" node lapses within the test.
    const TTL: Duration = Duration::from_millis(1500);

    /// The fleet's bus: one hub that both "nodes" announce through, so that
    /// every announcement, whichever node makes it, is seen (and counted)
    /// in one place.
    fn bus() -> Arc<Hub> {
        Hub::new(
            Arc::new(MemoryBroker::default()),
            Arc::new(Metrics::new()),
            256,
        )
    }

    fn node(server: &RedisServer, hub: &Arc<Hub>) -> RedisPresence {
        let opts = RedisPresenceOptions {
            ttl: TTL,
            refresh: Duration::from_millis(300),
            sweep_interval: Duration::from_millis(100),
        };
        let metrics = Arc::new(Metrics::new());
        let mut config = RedisConfig::new(server.url(), "subgate:");
        config.pool_size = 4;
        let redis = Redis::new(config, metrics.clone()).unwrap();
        RedisPresence::new(redis, opts, hub.clone(), metrics)
    }

    async fn next(sub: &mut Subscription) -> serde_json::Value {
        crate::presence::next_announcement(sub, Duration::from_secs(10)).await
    }

    /// Asserts that nothing is announced for `wait`.
    async fn quiet(sub: &mut Subscription, wait: Duration) {
        let more = tokio::time::timeout(wait, sub.recv()).await;
        assert!(
            more.is_err(),
            "unexpected announcement: {:?}",
            more.map(|e| e.map(|e| e.event.payload.clone()))
        );
    }

    async fn online_ids(p: &RedisPresence, channel: &str) -> Vec<String> {
        p.online(channel)
            .await
            .unwrap()
            .into_iter()
            .map(|u| u.user_id)
            .collect()
    }

    /// Polls until `channel` lists exactly `want` on `p`.
    async fn eventually(p: &RedisPresence, channel: &str, want: &[&str]) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let ids = online_ids(p, channel).await;
            if ids == want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{channel}: {ids:?}, expected {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A Redis, the bus, and a subscription to channel c1's announcements.
    async fn watching_c1() -> (RedisServer, Arc<Hub>, Subscription) {
        let server = RedisServer::start();
        let hub = bus();
        let sub = hub.subscribe("channel:c1", "test", None).await.unwrap();
        (server, hub, sub)
    }

    async fn assert_no_keys(server: &RedisServer, why: &str) {
        let left = presence_keys(server).await;
        assert!(left.is_empty(), "{why}: {left:?}");
    }

    async fn presence_keys(server: &RedisServer) -> Vec<String> {
        let client = redis::Client::open(server.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("KEYS")
            .arg("subgate:presence:*")
            .query_async(&mut conn)
            .await
            .unwrap()
    }

    fn status(payload: &serde_json::Value) -> (&str, &str, &str) {
        (
            payload["user_id"].as_str().unwrap(),
            payload["channel_id"].as_str().unwrap(),
            payload["status"].as_str().unwrap(),
        )
    }

    #[tokio::test]
    async fn a_join_on_one_node_is_seen_from_another_and_announced_once() {
        let (server, hub, mut sub) = watching_c1().await;
        let (a, b) = (node(&server, &hub), node(&server, &hub));

        let on_a = a.join("c1", "ann");
        eventually(&b, "c1", &["ann"]).await;
        assert_eq!(status(&next(&mut sub).await), ("ann", "c1", "online"));
        // The same user joining on the other node is no news.
        let on_b = b.join("c1", "ann");
        eventually(&a, "c1", &["ann"]).await;
        quiet(&mut sub, TTL).await;

        // Leaving on A while B still holds them keeps them online, unannounced.
        drop(on_a);
        quiet(&mut sub, TTL * 2).await;
        assert_eq!(online_ids(&a, "c1").await, ["ann"]);

        // The last leave anywhere announces it at once.
        drop(on_b);
        assert_eq!(status(&next(&mut sub).await), ("ann", "c1", "offline"));
        assert!(online_ids(&a, "c1").await.is_empty());
        quiet(&mut sub, TTL).await;
        assert_no_keys(&server, "a departed user leaves no key behind").await;
    }

    #[tokio::test]
    async fn a_killed_node_lets_its_users_go_offline_within_the_ttl_announced_once() {
        let (server, hub, mut sub) = watching_c1().await;
        let (a, b) = (node(&server, &hub), node(&server, &hub));
        let _bob = b.join("c1", "bob");
        let ann = a.join("c1", "ann");
        eventually(&b, "c1", &["ann", "bob"]).await;
        let mut came = vec![
            status(&next(&mut sub).await).0.to_owned(),
            status(&next(&mut sub).await).0.to_owned(),
        ];
        came.sort();
        assert_eq!(came, ["ann", "bob"]);

        // Killed: A's tasks stop, and its guard never writes a leave.
        let killed = tokio::time::Instant::now();
        drop(a);
        drop(ann);
        // Still listed while the lease runs, renewed until the kill.
        assert_eq!(online_ids(&b, "c1").await, ["ann", "bob"]);
        assert_eq!(status(&next(&mut sub).await), ("ann", "c1", "offline"));
        let took = killed.elapsed();
        assert!(
            took <= TTL + Duration::from_millis(500),
            "offline after {took:?}, TTL {TTL:?}"
        );
        assert_eq!(online_ids(&b, "c1").await, ["bob"]);
        // Bob's node keeps renewing him; nothing else is announced, and the
        // offline announcement was made once (two sweepers were running
        // until the kill, one after it).
        quiet(&mut sub, TTL * 2).await;
        assert_eq!(online_ids(&b, "c1").await, ["bob"]);
    }

    #[tokio::test]
    async fn two_sweepers_announce_each_lapse_once() {
        let (server, hub, mut sub) = watching_c1().await;
        let dying = node(&server, &hub);
        let guards: Vec<_> = (0..20)
            .map(|i| dying.join("c1", &format!("u{i:02}")))
            .collect();
        for _ in 0..20 {
            next(&mut sub).await;
        }
        // Three live nodes sweep concurrently.
        let survivors = [
            node(&server, &hub),
            node(&server, &hub),
            node(&server, &hub),
        ];
        drop(dying);
        drop(guards);
        let mut offline = Vec::new();
        for _ in 0..20 {
            let payload = next(&mut sub).await;
            let (user, _, state) = status(&payload);
            assert_eq!(state, "offline");
            offline.push(user.to_owned());
        }
        offline.sort();
        offline.dedup();
        assert_eq!(offline.len(), 20);
        quiet(&mut sub, TTL).await;
        assert!(online_ids(&survivors[0], "c1").await.is_empty());
        assert_no_keys(&server, "the sweep leaves no key behind").await;
    }

    #[tokio::test]
    async fn a_status_change_is_announced_to_the_users_channels_on_every_node() {
        let server = RedisServer::start();
        let hub = bus();
        let mut c1 = hub.subscribe("channel:c1", "test", None).await.unwrap();
        let mut c2 = hub.subscribe("channel:c2", "test", None).await.unwrap();
        let (a, b) = (node(&server, &hub), node(&server, &hub));
        let _g1 = a.join("c1", "ann");
        let _g2 = b.join("c2", "ann");
        assert_eq!(status(&next(&mut c1).await), ("ann", "c1", "online"));
        assert_eq!(status(&next(&mut c2).await), ("ann", "c2", "online"));

        // Set through A; announced in the channel that B holds too.
        a.set_status("ann", Status::Away).await.unwrap();
        assert_eq!(status(&next(&mut c1).await), ("ann", "c1", "away"));
        assert_eq!(status(&next(&mut c2).await), ("ann", "c2", "away"));
        assert_eq!(
            b.online("c1").await.unwrap(),
            vec![OnlineUser {
                user_id: "ann".into(),
                status: Status::Away
            }]
        );
        // No change, no announcement; and the status outlives a TTL while
        // the user stays (the refresh renews it).
        b.set_status("ann", Status::Away).await.unwrap();
        quiet(&mut c1, TTL * 2).await;
        assert_eq!(a.online("c2").await.unwrap()[0].status, Status::Away);

        a.set_status("ann", Status::Online).await.unwrap();
        assert_eq!(status(&next(&mut c1).await), ("ann", "c1", "online"));
        assert_eq!(status(&next(&mut c2).await), ("ann", "c2", "online"));
    }

    #[tokio::test]
    async fn reads_fail_cleanly_while_redis_is_away() {
        let mut server = RedisServer::start();
        let hub = bus();
        let a = node(&server, &hub);
        let _g = a.join("c1", "ann");
        eventually(&a, "c1", &["ann"]).await;
        server.stop();
        assert!(matches!(
            a.online("c1").await,
            Err(PresenceError::Unavailable(_))
        ));
        assert!(a.set_status("ann", Status::Busy).await.is_err());
        // Back, empty: the next refresh puts the node's users back.
        let _server = RedisServer::start_on(server.port());
        eventually(&a, "c1", &["ann"]).await;
    }
}
