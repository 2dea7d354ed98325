//! The Redis store: the domain data in one Redis shared by every node, so
//! that nodes keep no state of their own.
//!
//! # Key layout
//!
//! Every key starts with the configured prefix `{p}` (e.g. `subgate:`), so
//! deployments can share one Redis.
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `{p}seq` | string (INCR) | the last position handed out; one counter for every list, as in the memory store |
//! | `{p}user:{id}` | hash | `id email email_norm name password_hash created_at updated_at seq` |
//! | `{p}email:{normalized}` | string | the id of the user owning that email (trimmed, lowercased) |
//! | `{p}post:{id}` | hash | `id author_id title content created_at updated_at seq` |
//! | `{p}comment:{id}` | hash | `id post_id author_id content created_at seq` |
//! | `{p}channel:{id}` | hash | `id name is_private owner_id member_ids created_at seq`; `member_ids` is a JSON array, in join order |
//! | `{p}message:{id}` | hash | `id channel_id author_id content created_at seq` |
//! | `{p}notification:{id}` | hash | `id user_id type message payload read created_at seq`; `payload` is JSON |
//! | `{p}readers:{topic}` | string | a backend topic's readers rule as JSON (`"public"`, `"authenticated"`, `{"users":[…]}`); no TTL |
//! | `{p}users`, `{p}posts`, `{p}channels` | sorted set | ids scored by `seq` |
//! | `{p}posts:author:{id}`, `{p}comments:post:{id}`, `{p}messages:channel:{id}`, `{p}notifications:user:{id}` | sorted set | ids scored by `seq` |
//!
//! Timestamps are RFC 3339 strings, booleans `"0"`/`"1"`.
//!
//! # Atomicity
//!
//! Every write is one Lua script, so an entity and its indexes change
//! together and the checks that guard a write (the unique email, the parent
//! post or channel of a comment or message, the owner of a notification) run
//! in the same step as the write. Two nodes racing for one email therefore
//! cannot both win. The scripts build a few keys from the prefix and a stored
//! field (the old email, a post's author): this store targets one Redis
//! server (or a primary with replicas), not Redis Cluster.
//!
//! # Failure
//!
//! No connection is made up front: a node starts while Redis is down. Every
//! call goes through one helper (`call`), which bounds taking a pooled
//! connection plus the command by `command_timeout`; a timeout or a broken
//! connection answers [`StoreError::Unavailable`] and makes
//! [`Store::readiness`] report the reason until Redis answers again. Before
//! the first call nothing is known to be wrong and readiness is `Ok`; the
//! node learns the truth at once by calling [`RedisStore::ping`] when it
//! starts.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use deadpool_redis::redis::{
    self, AsyncConnectionConfig, Cmd, FromRedisValue, Pipeline, RedisError, Script,
    ScriptInvocation,
};
use deadpool_redis::{Connection, Manager, Pool, PoolError, Runtime};

use super::*;

/// A hash as Redis returns it; empty when the key does not exist.
type Fields = HashMap<String, String>;

pub struct RedisStore {
    pool: Pool,
    keys: Keys,
    scripts: Scripts,
    command_timeout: Duration,
    health: Health,
    metrics: Option<Arc<crate::telemetry::metrics::Metrics>>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may carry a password, so it is deliberately left out.
        f.debug_struct("RedisStore")
            .field("prefix", &self.keys.prefix)
            .field("command_timeout", &self.command_timeout)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store on the Redis at `url`, its keys under `prefix`.
    ///
    /// Connects lazily: only a malformed `url` fails here. Each call may take
    /// at most `command_timeout`, waiting for a pooled connection included.
    pub fn new(
        url: &str,
        prefix: &str,
        pool_size: usize,
        command_timeout: Duration,
    ) -> Result<Self, StoreError> {
        // The client would otherwise time responses out after its own 500 ms;
        // our deadline bounds every call instead, so the configured timeout
        // is the one that applies. Connecting keeps a bound of its own
        // because the pool may also connect outside any call.
        let connection = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(command_timeout))
            .set_response_timeout(None);
        let manager = Manager::new_with_config(url, connection)
            .map_err(|e| StoreError::Unavailable(format!("invalid Redis URL: {e}")))?;
        let pool = Pool::builder(manager)
            // A pool of zero would make every call wait for the timeout.
            .max_size(pool_size.max(1))
            .wait_timeout(Some(command_timeout))
            .create_timeout(Some(command_timeout))
            .recycle_timeout(Some(command_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Unavailable(format!("cannot build the Redis pool: {e}")))?;
        Ok(Self {
            pool,
            keys: Keys {
                prefix: prefix.to_owned(),
            },
            scripts: Scripts::new(),
            command_timeout,
            health: Health::default(),
            metrics: None,
        })
    }

    /// Records every call's latency in `subgate_redis_command_duration_seconds`.
    pub fn with_metrics(mut self, metrics: Arc<crate::telemetry::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// One round trip to Redis; the node calls it when it starts and then
    /// periodically, so that [`Store::readiness`] follows Redis even while
    /// no request arrives.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let _: String = self.call(Request::Cmd(&redis::cmd("PING"))).await?;
        Ok(())
    }

    /// The one way to Redis: a pooled connection and one request, together
    /// bounded by `command_timeout`, with failures mapped and recorded.
    async fn call<T: FromRedisValue>(&self, request: Request<'_>) -> StoreResult<T> {
        let label = match request {
            Request::Cmd(_) => "store_command",
            Request::Pipe(_) => "store_pipeline",
            Request::Script(_) => "store_script",
        };
        let started = std::time::Instant::now();
        let outcome = self.attempt(request).await;
        if let Some(metrics) = &self.metrics {
            metrics
                .redis_command_duration_seconds
                .with_label_values(&[label])
                .observe(started.elapsed().as_secs_f64());
        }
        match outcome {
            Ok(value) => {
                self.health.up();
                Ok(value)
            }
            Err(Failure::Connection(why)) => {
                self.health.down(&why);
                Err(StoreError::Unavailable(why))
            }
            Err(Failure::Command(why)) => {
                // Redis answered, so it is reachable; the request itself
                // was wrong, which readiness cannot help with.
                self.health.up();
                Err(StoreError::Unavailable(why))
            }
        }
    }

    /// Takes a connection and sends the request, both within one deadline.
    async fn attempt<T: FromRedisValue>(&self, request: Request<'_>) -> Result<T, Failure> {
        let deadline = tokio::time::Instant::now() + self.command_timeout;
        let too_late = || {
            Failure::Connection(format!(
                "Redis did not answer within {:?}",
                self.command_timeout
            ))
        };
        let mut conn = match tokio::time::timeout_at(deadline, self.pool.get()).await {
            Ok(got) => got.map_err(Failure::from_pool)?,
            Err(_) => return Err(too_late()),
        };
        let sent = async {
            match request {
                Request::Cmd(cmd) => cmd.query_async(&mut conn).await,
                Request::Pipe(pipe) => pipe.query_async(&mut conn).await,
                Request::Script(script) => script.invoke_async(&mut conn).await,
            }
        };
        let failure = match tokio::time::timeout_at(deadline, sent).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => Failure::from_redis(e),
            Err(_) => too_late(),
        };
        if matches!(failure, Failure::Connection(_)) {
            // A broken or hung connection must not go back to the pool for
            // the next caller to trip over (or to wait on while recycling).
            drop(Connection::take(conn));
        }
        Err(failure)
    }

    /// Hashes of `keys` in one pipeline, in order; empty where missing.
    async fn hashes(&self, keys: impl IntoIterator<Item = String>) -> StoreResult<Vec<Fields>> {
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("HGETALL").arg(key);
        }
        if pipe.is_empty() {
            return Ok(Vec::new());
        }
        self.call(Request::Pipe(&pipe)).await
    }

    /// Entities of `ids` in one round trip, in order, `None` where missing.
    async fn batch<T>(
        &self,
        ids: &[String],
        key: impl Fn(&str) -> String,
        decode: fn(Record) -> StoreResult<(u64, T)>,
    ) -> StoreResult<Vec<Option<T>>> {
        let found = self.hashes(ids.iter().map(|id| key(id))).await?;
        found
            .into_iter()
            .map(|fields| {
                Record::found(fields, "")
                    .map(|r| decode(r).map(|(_, v)| v))
                    .transpose()
            })
            .collect()
    }

    /// One page of the sorted set `list`: ids, count and the previous-page
    /// probe in one pipeline, then the page's hashes in another.
    /// O(log N + page) on the Redis side.
    async fn page<T>(
        &self,
        list: &str,
        req: PageRequest,
        dir: Direction,
        key: impl Fn(&str) -> String,
        decode: fn(Record) -> StoreResult<(u64, T)>,
    ) -> StoreResult<Page<T>> {
        // One more than asked tells whether a next page exists. Redis takes
        // the count as a signed 64-bit number.
        let take = req.first.min(i64::MAX as usize - 1);
        let mut pipe = redis::pipe();
        match (dir, req.after) {
            (Direction::OldestFirst, after) => {
                let min = after.map_or_else(|| "-inf".to_owned(), |a| format!("({a}"));
                pipe.cmd("ZRANGEBYSCORE")
                    .arg(list)
                    .arg(min)
                    .arg("+inf")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(take + 1);
            }
            (Direction::NewestFirst, after) => {
                let max = after.map_or_else(|| "+inf".to_owned(), |a| format!("({a}"));
                pipe.cmd("ZREVRANGEBYSCORE")
                    .arg(list)
                    .arg(max)
                    .arg("-inf")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(take + 1);
            }
        }
        pipe.cmd("ZCARD").arg(list);
        // Whether anything lies on the far side of the cursor, as the memory
        // store answers it: at or before `after` oldest first, at or after it
        // newest first. Without a cursor the answer is no, and the probe is
        // ignored.
        let after = req.after.unwrap_or(0);
        match dir {
            Direction::OldestFirst => pipe.cmd("ZCOUNT").arg(list).arg("-inf").arg(after),
            Direction::NewestFirst => pipe.cmd("ZCOUNT").arg(list).arg(after).arg("+inf"),
        };
        let (mut ids, total_count, before): (Vec<String>, usize, usize) =
            self.call(Request::Pipe(&pipe)).await?;
        let has_next_page = ids.len() > take;
        ids.truncate(take);
        let mut items = Vec::with_capacity(ids.len());
        for fields in self.hashes(ids.iter().map(|id| key(id))).await? {
            // An id whose hash vanished between the two round trips was
            // deleted meanwhile: skipped, as the memory store would.
            if let Some(record) = Record::found(fields, "") {
                items.push(decode(record)?);
            }
        }
        Ok(Page {
            items,
            total_count,
            has_next_page,
            has_previous_page: req.after.is_some() && before > 0,
        })
    }

    /// Runs the create script: entity and indexes in one step, after
    /// checking that every `guards` key exists. Answers the new position.
    async fn create(
        &self,
        entity: String,
        id: &str,
        guards: &[String],
        indexes: &[String],
        fields: &[(&str, String)],
    ) -> StoreResult<u64> {
        let mut inv = self.scripts.create.prepare_invoke();
        inv.key(self.keys.seq())
            .key(entity)
            .key(guards)
            .key(indexes);
        inv.arg(id).arg(guards.len());
        for (name, value) in fields {
            inv.arg(*name).arg(value);
        }
        let seq: i64 = self.call(Request::Script(&inv)).await?;
        // -1: a guard key is missing, i.e. the parent post or channel.
        u64::try_from(seq).map_err(|_| StoreError::NotFound)
    }

    /// Runs a script that answers `{status, fields}`.
    async fn outcome(&self, inv: &ScriptInvocation<'_>, kind: &'static str) -> StoreResult<Record> {
        let (status, fields): (String, Fields) = self.call(Request::Script(inv)).await?;
        match status.as_str() {
            "ok" => Ok(Record { fields, kind }),
            "notfound" => Err(StoreError::NotFound),
            "conflict" => Err(StoreError::Conflict { field: "email" }),
            other => Err(StoreError::Unavailable(format!(
                "unexpected script status {other:?}"
            ))),
        }
    }

    /// Sets `fields` on the hash at `key` if it exists and, when `guard` is
    /// given, only if that field holds that value; answers the whole hash.
    async fn patch(
        &self,
        key: String,
        guard: Option<(&str, &str)>,
        fields: &[(&str, String)],
        kind: &'static str,
    ) -> StoreResult<Record> {
        let mut inv = self.scripts.patch.prepare_invoke();
        let (guard_field, guard_value) = guard.unwrap_or(("", ""));
        inv.key(key).arg(guard_field).arg(guard_value);
        for (name, value) in fields {
            inv.arg(*name).arg(value);
        }
        self.outcome(&inv, kind).await
    }
}

/// What one call sends.
enum Request<'a> {
    Cmd(&'a Cmd),
    Pipe(&'a Pipeline),
    Script(&'a ScriptInvocation<'a>),
}

/// Why a call failed, split by what it says about Redis' reachability.
enum Failure {
    /// Redis cannot be reached or cannot serve: readiness goes down.
    Connection(String),
    /// Redis answered, but with an error.
    Command(String),
}

impl Failure {
    fn from_pool(e: PoolError) -> Self {
        match e {
            PoolError::Backend(e) => Self::from_redis(e),
            other => Self::Connection(format!("no Redis connection: {other}")),
        }
    }

    fn from_redis(e: RedisError) -> Self {
        use redis::{ErrorKind, ServerErrorKind};
        // Only failures that say nothing was (or can be) served count
        // against readiness; a script or type error is a bug in a request,
        // not an outage.
        let unreachable = e.is_io_error()
            || e.is_connection_dropped()
            || matches!(
                e.kind(),
                ErrorKind::AuthenticationFailed
                    | ErrorKind::Server(
                        ServerErrorKind::BusyLoading
                            | ServerErrorKind::MasterDown
                            | ServerErrorKind::ReadOnly
                    )
            );
        if unreachable {
            Self::Connection(format!("Redis unreachable: {e}"))
        } else {
            Self::Command(format!("Redis refused the request: {e}"))
        }
    }
}

/// Whether the last call reached Redis, and why not.
#[derive(Default)]
struct Health {
    down: AtomicBool,
    why: Mutex<String>,
}

impl Health {
    fn up(&self) {
        self.down.store(false, Ordering::Release);
    }

    fn down(&self, why: &str) {
        // The reason is written before the flag, so a reader that sees the
        // flag also sees a reason (possibly a newer one, never an empty one).
        *self.why.lock().unwrap_or_else(|p| p.into_inner()) = why.to_owned();
        self.down.store(true, Ordering::Release);
    }

    fn check(&self) -> Result<(), String> {
        if self.down.load(Ordering::Acquire) {
            Err(self.why.lock().unwrap_or_else(|p| p.into_inner()).clone())
        } else {
            Ok(())
        }
    }
}

#[derive(Clone, Copy)]
enum Direction {
    OldestFirst,
    NewestFirst,
}

/// Key names; the layout table in the module docs is their specification.
struct Keys {
    prefix: String,
}

impl Keys {
    fn seq(&self) -> String {
        format!("{}seq", self.prefix)
    }
    fn user_prefix(&self) -> String {
        format!("{}user:", self.prefix)
    }
    fn user(&self, id: &str) -> String {
        format!("{}user:{id}", self.prefix)
    }
    fn email_prefix(&self) -> String {
        format!("{}email:", self.prefix)
    }
    fn email(&self, normalized: &str) -> String {
        format!("{}email:{normalized}", self.prefix)
    }
    fn users(&self) -> String {
        format!("{}users", self.prefix)
    }
    fn post(&self, id: &str) -> String {
        format!("{}post:{id}", self.prefix)
    }
    fn posts(&self) -> String {
        format!("{}posts", self.prefix)
    }
    fn posts_by_author_prefix(&self) -> String {
        format!("{}posts:author:", self.prefix)
    }
    fn posts_by_author(&self, author_id: &str) -> String {
        format!("{}posts:author:{author_id}", self.prefix)
    }
    fn comment(&self, id: &str) -> String {
        format!("{}comment:{id}", self.prefix)
    }
    fn comments_of_post(&self, post_id: &str) -> String {
        format!("{}comments:post:{post_id}", self.prefix)
    }
    fn channel(&self, id: &str) -> String {
        format!("{}channel:{id}", self.prefix)
    }
    fn channels(&self) -> String {
        format!("{}channels", self.prefix)
    }
    fn message(&self, id: &str) -> String {
        format!("{}message:{id}", self.prefix)
    }
    fn messages_of_channel(&self, channel_id: &str) -> String {
        format!("{}messages:channel:{channel_id}", self.prefix)
    }
    fn notification(&self, id: &str) -> String {
        format!("{}notification:{id}", self.prefix)
    }
    fn notifications_of_user(&self, user_id: &str) -> String {
        format!("{}notifications:user:{user_id}", self.prefix)
    }
    fn topic_readers(&self, topic: &str) -> String {
        format!("{}readers:{topic}", self.prefix)
    }
}

/// The same normalization as the memory store: emails differing only in
/// case or surrounding blanks are one email.
fn normalize_email(email: &str) -> String {
    email.trim().to_lowercase()
}

fn timestamp(t: DateTime<Utc>) -> String {
    // Only as many fraction digits as needed, so reading it back yields the
    // very same instant.
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

fn flag(b: bool) -> String {
    if b { "1" } else { "0" }.to_owned()
}

/// A stored hash being decoded into an entity.
struct Record {
    fields: Fields,
    kind: &'static str,
}

impl Record {
    /// `None` for the empty hash Redis answers for a missing key.
    fn found(fields: Fields, kind: &'static str) -> Option<Self> {
        (!fields.is_empty()).then_some(Self { fields, kind })
    }

    fn malformed(&self, field: &str) -> StoreError {
        // Only a bug or a foreign writer under our prefix gets here; the
        // caller sees an unavailable store rather than a half-read entity.
        StoreError::Unavailable(format!(
            "malformed {} record in Redis: field {field}",
            self.kind
        ))
    }

    fn text(&mut self, field: &str) -> StoreResult<String> {
        self.fields
            .remove(field)
            .ok_or_else(|| self.malformed(field))
    }

    fn time(&mut self, field: &str) -> StoreResult<DateTime<Utc>> {
        let raw = self.text(field)?;
        DateTime::parse_from_rfc3339(&raw)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|_| self.malformed(field))
    }

    fn flag(&mut self, field: &str) -> StoreResult<bool> {
        match self.text(field)?.as_str() {
            "1" => Ok(true),
            "0" => Ok(false),
            _ => Err(self.malformed(field)),
        }
    }

    fn json<T: serde::de::DeserializeOwned>(&mut self, field: &str) -> StoreResult<T> {
        let raw = self.text(field)?;
        serde_json::from_str(&raw).map_err(|_| self.malformed(field))
    }

    fn seq(&mut self) -> StoreResult<u64> {
        let raw = self.text("seq")?;
        raw.parse().map_err(|_| self.malformed("seq"))
    }

    fn kind(mut self, kind: &'static str) -> Self {
        self.kind = kind;
        self
    }
}

fn decode_user(r: Record) -> StoreResult<(u64, User)> {
    let mut r = r.kind("user");
    let user = User {
        id: r.text("id")?,
        email: r.text("email")?,
        name: r.text("name")?,
        password_hash: r.text("password_hash")?,
        created_at: r.time("created_at")?,
        updated_at: r.time("updated_at")?,
    };
    Ok((r.seq()?, user))
}

fn decode_post(r: Record) -> StoreResult<(u64, Post)> {
    let mut r = r.kind("post");
    let post = Post {
        id: r.text("id")?,
        author_id: r.text("author_id")?,
        title: r.text("title")?,
        content: r.text("content")?,
        created_at: r.time("created_at")?,
        updated_at: r.time("updated_at")?,
    };
    Ok((r.seq()?, post))
}

fn decode_comment(r: Record) -> StoreResult<(u64, Comment)> {
    let mut r = r.kind("comment");
    let comment = Comment {
        id: r.text("id")?,
        post_id: r.text("post_id")?,
        author_id: r.text("author_id")?,
        content: r.text("content")?,
        created_at: r.time("created_at")?,
    };
    Ok((r.seq()?, comment))
}

fn decode_channel(r: Record) -> StoreResult<(u64, Channel)> {
    let mut r = r.kind("channel");
    let channel = Channel {
        id: r.text("id")?,
        name: r.text("name")?,
        is_private: r.flag("is_private")?,
        owner_id: r.text("owner_id")?,
        member_ids: r.json("member_ids")?,
        created_at: r.time("created_at")?,
    };
    Ok((r.seq()?, channel))
}

fn decode_message(r: Record) -> StoreResult<(u64, Message)> {
    let mut r = r.kind("message");
    let message = Message {
        id: r.text("id")?,
        channel_id: r.text("channel_id")?,
        author_id: r.text("author_id")?,
        content: r.text("content")?,
        created_at: r.time("created_at")?,
    };
    Ok((r.seq()?, message))
}

fn decode_notification(r: Record) -> StoreResult<(u64, Notification)> {
    let mut r = r.kind("notification");
    let notification = Notification {
        id: r.text("id")?,
        user_id: r.text("user_id")?,
        kind: r.text("type")?,
        message: r.text("message")?,
        payload: r.json("payload")?,
        read: r.flag("read")?,
        created_at: r.time("created_at")?,
    };
    Ok((r.seq()?, notification))
}

fn without_seq<T>(decoded: StoreResult<(u64, T)>) -> StoreResult<T> {
    decoded.map(|(_, v)| v)
}

/// The Lua scripts behind every write (and the one two-step read).
///
/// Conventions: `redis.call` answers `false` for a nil reply; scripts that
/// answer an entity answer `{status, HGETALL}` with status `ok`,
/// `notfound` or `conflict`.
struct Scripts {
    create_user: Script,
    create: Script,
    update_user: Script,
    delete_user: Script,
    delete_post: Script,
    patch: Script,
    add_member: Script,
    user_by_email: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            // KEYS: email, seq, user, users. ARGV: id, then field/value
            // pairs. Claiming the email with SET NX is the uniqueness check
            // and the write at once; -1 means it was taken.
            create_user: Script::new(
                r"
                if not redis.call('SET', KEYS[1], ARGV[1], 'NX') then return -1 end
                local seq = redis.call('INCR', KEYS[2])
                redis.call('HSET', KEYS[3], 'seq', seq, unpack(ARGV, 2))
                redis.call('ZADD', KEYS[4], seq, ARGV[1])
                return seq
                ",
            ),
            // KEYS: seq, entity, guards..., indexes. ARGV: id, number of
            // guards, then field/value pairs. -1 when a guard (the parent
            // post or channel) is missing; nothing is written then.
            create: Script::new(
                r"
                local guards = tonumber(ARGV[2])
                for i = 3, 2 + guards do
                    if redis.call('EXISTS', KEYS[i]) == 0 then return -1 end
                end
                local seq = redis.call('INCR', KEYS[1])
                redis.call('HSET', KEYS[2], 'seq', seq, unpack(ARGV, 3))
                for i = 3 + guards, #KEYS do
                    redis.call('ZADD', KEYS[i], seq, ARGV[1])
                end
                return seq
                ",
            ),
            // KEYS: user, and the new email key when the email changes.
            // ARGV: id, email key prefix, then field/value pairs. The new
            // email must be free or already this user's (a change of case);
            // the old one is released only if this user still holds it.
            update_user: Script::new(
                r"
                if redis.call('EXISTS', KEYS[1]) == 0 then return {'notfound', {}} end
                if KEYS[2] then
                    local owner = redis.call('GET', KEYS[2])
                    if owner and owner ~= ARGV[1] then return {'conflict', {}} end
                    local norm = redis.call('HGET', KEYS[1], 'email_norm')
                    if norm then
                        local old = ARGV[2] .. norm
                        if old ~= KEYS[2] and redis.call('GET', old) == ARGV[1] then
                            redis.call('DEL', old)
                        end
                    end
                    redis.call('SET', KEYS[2], ARGV[1])
                end
                redis.call('HSET', KEYS[1], unpack(ARGV, 3))
                return {'ok', redis.call('HGETALL', KEYS[1])}
                ",
            ),
            // KEYS: user, users. ARGV: id, email key prefix. Frees the email
            // so that it can be registered again.
            delete_user: Script::new(
                r"
                local fields = redis.call('HGETALL', KEYS[1])
                if #fields == 0 then return {'notfound', {}} end
                local norm = redis.call('HGET', KEYS[1], 'email_norm')
                if norm and redis.call('GET', ARGV[2] .. norm) == ARGV[1] then
                    redis.call('DEL', ARGV[2] .. norm)
                end
                redis.call('ZREM', KEYS[2], ARGV[1])
                redis.call('DEL', KEYS[1])
                return {'ok', fields}
                ",
            ),
            // KEYS: post, posts. ARGV: id, author index prefix. The post's
            // comments stay, as in the memory store; they are unreachable
            // without the post.
            delete_post: Script::new(
                r"
                local fields = redis.call('HGETALL', KEYS[1])
                if #fields == 0 then return {'notfound', {}} end
                local author = redis.call('HGET', KEYS[1], 'author_id')
                redis.call('ZREM', KEYS[2], ARGV[1])
                if author then redis.call('ZREM', ARGV[2] .. author, ARGV[1]) end
                redis.call('DEL', KEYS[1])
                return {'ok', fields}
                ",
            ),
            // KEYS: entity. ARGV: guard field ('' for none), guard value,
            // then field/value pairs. A failed guard reads as not found, so
            // that a notification of someone else's is indistinguishable
            // from one that does not exist.
            patch: Script::new(
                r"
                if redis.call('EXISTS', KEYS[1]) == 0 then return {'notfound', {}} end
                if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
                    return {'notfound', {}}
                end
                redis.call('HSET', KEYS[1], unpack(ARGV, 3))
                return {'ok', redis.call('HGETALL', KEYS[1])}
                ",
            ),
            // KEYS: channel. ARGV: user id. Appends to the JSON member list
            // unless present; the list is never empty (the owner is in it),
            // so cjson's encoding of an empty table as an object never
            // arises.
            add_member: Script::new(
                r"
                local raw = redis.call('HGET', KEYS[1], 'member_ids')
                if not raw then return {'notfound', {}} end
                local members = cjson.decode(raw)
                for _, m in ipairs(members) do
                    if m == ARGV[1] then return {'ok', redis.call('HGETALL', KEYS[1])} end
                end
                table.insert(members, ARGV[1])
                redis.call('HSET', KEYS[1], 'member_ids', cjson.encode(members))
                return {'ok', redis.call('HGETALL', KEYS[1])}
                ",
            ),
            // KEYS: email. ARGV: user key prefix. The owner's hash, or an
            // empty one: one round trip instead of two.
            user_by_email: Script::new(
                r"
                local id = redis.call('GET', KEYS[1])
                if not id then return {} end
                return redis.call('HGETALL', ARGV[1] .. id)
                ",
            ),
        }
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn create_user(&self, new: NewUser) -> StoreResult<User> {
        let now = Utc::now();
        let user = User {
            id: new_id(),
            email: new.email,
            name: new.name,
            password_hash: new.password_hash,
            created_at: now,
            updated_at: now,
        };
        let normalized = normalize_email(&user.email);
        let mut inv = self.scripts.create_user.prepare_invoke();
        inv.key(self.keys.email(&normalized))
            .key(self.keys.seq())
            .key(self.keys.user(&user.id))
            .key(self.keys.users());
        inv.arg(&user.id);
        for (name, value) in [
            ("id", user.id.clone()),
            ("email", user.email.clone()),
            ("email_norm", normalized),
            ("name", user.name.clone()),
            ("password_hash", user.password_hash.clone()),
            ("created_at", timestamp(now)),
            ("updated_at", timestamp(now)),
        ] {
            inv.arg(name).arg(value);
        }
        let seq: i64 = self.call(Request::Script(&inv)).await?;
        if seq < 0 {
            return Err(StoreError::Conflict { field: "email" });
        }
        Ok(user)
    }

    async fn get_users(&self, ids: &[String]) -> StoreResult<Vec<Option<User>>> {
        self.batch(ids, |id| self.keys.user(id), decode_user).await
    }

    async fn find_user_by_email(&self, email: &str) -> StoreResult<Option<User>> {
        let mut inv = self.scripts.user_by_email.prepare_invoke();
        inv.key(self.keys.email(&normalize_email(email)))
            .arg(self.keys.user_prefix());
        let fields: Fields = self.call(Request::Script(&inv)).await?;
        Record::found(fields, "user")
            .map(|r| without_seq(decode_user(r)))
            .transpose()
    }

    async fn update_user(&self, id: &str, patch: UserPatch) -> StoreResult<User> {
        let mut inv = self.scripts.update_user.prepare_invoke();
        inv.key(self.keys.user(id));
        let mut fields = vec![("updated_at", timestamp(Utc::now()))];
        if let Some(email) = patch.email {
            let normalized = normalize_email(&email);
            inv.key(self.keys.email(&normalized));
            fields.push(("email", email));
            fields.push(("email_norm", normalized));
        }
        if let Some(name) = patch.name {
            fields.push(("name", name));
        }
        if let Some(hash) = patch.password_hash {
            fields.push(("password_hash", hash));
        }
        inv.arg(id).arg(self.keys.email_prefix());
        for (name, value) in &fields {
            inv.arg(*name).arg(value);
        }
        without_seq(decode_user(self.outcome(&inv, "user").await?))
    }

    async fn delete_user(&self, id: &str) -> StoreResult<User> {
        let mut inv = self.scripts.delete_user.prepare_invoke();
        inv.key(self.keys.user(id))
            .key(self.keys.users())
            .arg(id)
            .arg(self.keys.email_prefix());
        without_seq(decode_user(self.outcome(&inv, "user").await?))
    }

    async fn list_users(&self, page: PageRequest) -> StoreResult<Page<User>> {
        self.page(
            &self.keys.users(),
            page,
            Direction::OldestFirst,
            |id| self.keys.user(id),
            decode_user,
        )
        .await
    }

    async fn create_post(
        &self,
        author_id: &str,
        title: String,
        content: String,
    ) -> StoreResult<Post> {
        let now = Utc::now();
        let post = Post {
            id: new_id(),
            author_id: author_id.to_owned(),
            title,
            content,
            created_at: now,
            updated_at: now,
        };
        self.create(
            self.keys.post(&post.id),
            &post.id,
            &[],
            &[self.keys.posts(), self.keys.posts_by_author(author_id)],
            &[
                ("id", post.id.clone()),
                ("author_id", post.author_id.clone()),
                ("title", post.title.clone()),
                ("content", post.content.clone()),
                ("created_at", timestamp(now)),
                ("updated_at", timestamp(now)),
            ],
        )
        .await?;
        Ok(post)
    }

    async fn get_posts(&self, ids: &[String]) -> StoreResult<Vec<Option<Post>>> {
        self.batch(ids, |id| self.keys.post(id), decode_post).await
    }

    async fn update_post(&self, id: &str, patch: PostPatch) -> StoreResult<Post> {
        let mut fields = vec![("updated_at", timestamp(Utc::now()))];
        if let Some(title) = patch.title {
            fields.push(("title", title));
        }
        if let Some(content) = patch.content {
            fields.push(("content", content));
        }
        without_seq(decode_post(
            self.patch(self.keys.post(id), None, &fields, "post")
                .await?,
        ))
    }

    async fn delete_post(&self, id: &str) -> StoreResult<Post> {
        let mut inv = self.scripts.delete_post.prepare_invoke();
        inv.key(self.keys.post(id))
            .key(self.keys.posts())
            .arg(id)
            .arg(self.keys.posts_by_author_prefix());
        without_seq(decode_post(self.outcome(&inv, "post").await?))
    }

    async fn list_posts(
        &self,
        author_id: Option<&str>,
        page: PageRequest,
    ) -> StoreResult<Page<Post>> {
        let list = match author_id {
            Some(author) => self.keys.posts_by_author(author),
            None => self.keys.posts(),
        };
        self.page(
            &list,
            page,
            Direction::NewestFirst,
            |id| self.keys.post(id),
            decode_post,
        )
        .await
    }

    async fn create_comment(
        &self,
        post_id: &str,
        author_id: &str,
        content: String,
    ) -> StoreResult<Comment> {
        let comment = Comment {
            id: new_id(),
            post_id: post_id.to_owned(),
            author_id: author_id.to_owned(),
            content,
            created_at: Utc::now(),
        };
        self.create(
            self.keys.comment(&comment.id),
            &comment.id,
            &[self.keys.post(post_id)],
            &[self.keys.comments_of_post(post_id)],
            &[
                ("id", comment.id.clone()),
                ("post_id", comment.post_id.clone()),
                ("author_id", comment.author_id.clone()),
                ("content", comment.content.clone()),
                ("created_at", timestamp(comment.created_at)),
            ],
        )
        .await?;
        Ok(comment)
    }

    async fn list_comments(&self, post_id: &str, page: PageRequest) -> StoreResult<Page<Comment>> {
        let list = self.keys.comments_of_post(post_id);
        self.page(
            &list,
            page,
            Direction::OldestFirst,
            |id| self.keys.comment(id),
            decode_comment,
        )
        .await
    }

    async fn create_channel(
        &self,
        owner_id: &str,
        name: String,
        is_private: bool,
        member_ids: Vec<String>,
    ) -> StoreResult<Channel> {
        // The owner first, then the others in the order given, once each.
        let mut members = vec![owner_id.to_owned()];
        for m in member_ids {
            if !members.contains(&m) {
                members.push(m);
            }
        }
        let channel = Channel {
            id: new_id(),
            name,
            is_private,
            owner_id: owner_id.to_owned(),
            member_ids: members,
            created_at: Utc::now(),
        };
        let members_json = serde_json::to_string(&channel.member_ids)
            .map_err(|e| StoreError::Unavailable(format!("cannot encode channel members: {e}")))?;
        self.create(
            self.keys.channel(&channel.id),
            &channel.id,
            &[],
            &[self.keys.channels()],
            &[
                ("id", channel.id.clone()),
                ("name", channel.name.clone()),
                ("is_private", flag(channel.is_private)),
                ("owner_id", channel.owner_id.clone()),
                ("member_ids", members_json),
                ("created_at", timestamp(channel.created_at)),
            ],
        )
        .await?;
        Ok(channel)
    }

    async fn get_channels(&self, ids: &[String]) -> StoreResult<Vec<Option<Channel>>> {
        self.batch(ids, |id| self.keys.channel(id), decode_channel)
            .await
    }

    async fn add_channel_member(&self, channel_id: &str, user_id: &str) -> StoreResult<Channel> {
        let mut inv = self.scripts.add_member.prepare_invoke();
        inv.key(self.keys.channel(channel_id)).arg(user_id);
        without_seq(decode_channel(self.outcome(&inv, "channel").await?))
    }

    async fn list_channels(&self, page: PageRequest) -> StoreResult<Page<Channel>> {
        self.page(
            &self.keys.channels(),
            page,
            Direction::OldestFirst,
            |id| self.keys.channel(id),
            decode_channel,
        )
        .await
    }

    async fn create_message(
        &self,
        channel_id: &str,
        author_id: &str,
        content: String,
    ) -> StoreResult<Message> {
        let message = Message {
            id: new_id(),
            channel_id: channel_id.to_owned(),
            author_id: author_id.to_owned(),
            content,
            created_at: Utc::now(),
        };
        self.create(
            self.keys.message(&message.id),
            &message.id,
            &[self.keys.channel(channel_id)],
            &[self.keys.messages_of_channel(channel_id)],
            &[
                ("id", message.id.clone()),
                ("channel_id", message.channel_id.clone()),
                ("author_id", message.author_id.clone()),
                ("content", message.content.clone()),
                ("created_at", timestamp(message.created_at)),
            ],
        )
        .await?;
        Ok(message)
    }

    async fn list_messages(
        &self,
        channel_id: &str,
        page: PageRequest,
    ) -> StoreResult<Page<Message>> {
        let list = self.keys.messages_of_channel(channel_id);
        self.page(
            &list,
            page,
            Direction::NewestFirst,
            |id| self.keys.message(id),
            decode_message,
        )
        .await
    }

    async fn create_notification(
        &self,
        user_id: &str,
        kind: String,
        message: String,
        payload: serde_json::Value,
    ) -> StoreResult<Notification> {
        let notification = Notification {
            id: new_id(),
            user_id: user_id.to_owned(),
            kind,
            message,
            payload,
            read: false,
            created_at: Utc::now(),
        };
        self.create(
            self.keys.notification(&notification.id),
            &notification.id,
            &[],
            &[self.keys.notifications_of_user(user_id)],
            &[
                ("id", notification.id.clone()),
                ("user_id", notification.user_id.clone()),
                ("type", notification.kind.clone()),
                ("message", notification.message.clone()),
                ("payload", notification.payload.to_string()),
                ("read", flag(false)),
                ("created_at", timestamp(notification.created_at)),
            ],
        )
        .await?;
        Ok(notification)
    }

    async fn list_notifications(
        &self,
        user_id: &str,
        page: PageRequest,
    ) -> StoreResult<Page<Notification>> {
        let list = self.keys.notifications_of_user(user_id);
        self.page(
            &list,
            page,
            Direction::NewestFirst,
            |id| self.keys.notification(id),
            decode_notification,
        )
        .await
    }

    async fn mark_notification_read(&self, user_id: &str, id: &str) -> StoreResult<Notification> {
        let key = self.keys.notification(id);
        let record = self
            .patch(
                key,
                Some(("user_id", user_id)),
                &[("read", flag(true))],
                "notification",
            )
            .await?;
        without_seq(decode_notification(record))
    }

    async fn set_topic_readers(&self, topic: &str, readers: &TopicReaders) -> StoreResult<()> {
        let json = serde_json::to_string(readers).map_err(|e| {
            StoreError::Unavailable(format!("the readers rule does not encode: {e}"))
        })?;
        let mut set = redis::cmd("SET");
        set.arg(self.keys.topic_readers(topic)).arg(json);
        let _: () = self.call(Request::Cmd(&set)).await?;
        Ok(())
    }

    async fn topic_readers(&self, topic: &str) -> StoreResult<Option<TopicReaders>> {
        let mut get = redis::cmd("GET");
        get.arg(self.keys.topic_readers(topic));
        let json: Option<String> = self.call(Request::Cmd(&get)).await?;
        json.map(|json| {
            serde_json::from_str(&json).map_err(|e| {
                StoreError::Unavailable(format!("the readers rule of {topic} does not decode: {e}"))
            })
        })
        .transpose()
    }

    fn readiness(&self) -> Result<(), String> {
        self.health.check()
    }
}

#[cfg(test)]
mod tests {
    //! What only the Redis store has: the key layout, its behaviour while
    //! Redis is down, hung or shared. The trait's behaviour is checked by the
    //! conformance suite.

    use std::collections::BTreeSet;
    use std::net::TcpListener;
    use std::sync::Arc;
    use std::time::Instant;

    use super::*;
    use crate::test_support::{free_port, RedisServer};

    const TIMEOUT: Duration = Duration::from_millis(300);
    /// Scheduling slack on a busy test machine; far below "hangs".
    const SLACK: Duration = Duration::from_secs(1);

    fn store(url: &str, prefix: &str) -> RedisStore {
        RedisStore::new(url, prefix, 4, TIMEOUT).expect("a valid URL builds a store")
    }

    fn new_user(email: &str) -> NewUser {
        NewUser {
            email: email.into(),
            name: "n".into(),
            password_hash: "h".into(),
        }
    }

    async fn raw(server: &RedisServer) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(server.url()).unwrap();
        client.get_multiplexed_async_connection().await.unwrap()
    }

    fn assert_unavailable<T: fmt::Debug>(what: &str, result: StoreResult<T>) {
        assert!(
            matches!(result, Err(StoreError::Unavailable(_))),
            "{what}: expected Unavailable, got {result:?}"
        );
    }

    /// Every kind of call fails, and fails fast, while Redis is away. The
    /// calls run together, so together they must finish within one timeout.
    async fn assert_every_call_unavailable(s: &RedisStore) {
        let page = PageRequest {
            first: 10,
            after: None,
        };
        let ids = ["a".to_owned(), "b".to_owned()];
        let started = Instant::now();
        let (ping, create, get, find, list, send, mark) = tokio::join!(
            s.ping(),
            s.create_user(new_user("x@example.com")),
            s.get_users(&ids),
            s.find_user_by_email("x@example.com"),
            s.list_posts(None, page),
            s.create_message("c", "u", "hi".into()),
            s.mark_notification_read("u", "n"),
        );
        assert!(
            started.elapsed() < TIMEOUT + SLACK,
            "answered after {:?}",
            started.elapsed()
        );
        assert_unavailable("ping", ping);
        assert_unavailable("create_user", create);
        assert_unavailable("get_users", get);
        assert_unavailable("find_user_by_email", find);
        assert_unavailable("list_posts", list);
        assert_unavailable("create_message", send);
        assert_unavailable("mark_notification_read", mark);
    }

    #[test]
    fn a_malformed_url_is_refused_up_front() {
        assert!(matches!(
            RedisStore::new("not a url", "p:", 4, TIMEOUT),
            Err(StoreError::Unavailable(_))
        ));
    }

    #[tokio::test]
    async fn a_node_starts_while_redis_is_down_and_serves_once_it_is_up() {
        let port = free_port();
        let s = store(&format!("redis://127.0.0.1:{port}/"), "subgate:");
        // No call yet: nothing is known to be wrong.
        assert!(s.readiness().is_ok());

        assert_every_call_unavailable(&s).await;
        let why = s.readiness().expect_err("not ready while Redis is down");
        assert!(why.contains("Redis"), "{why}");

        let _server = RedisServer::start_on(port);
        s.ping().await.unwrap();
        assert!(s.readiness().is_ok());
        s.create_user(new_user("first@example.com")).await.unwrap();
    }

    #[tokio::test]
    async fn a_stopped_redis_answers_unavailable_and_a_restarted_one_serves_again() {
        let mut server = RedisServer::start();
        let s = store(&server.url(), "subgate:");
        let before = s.create_user(new_user("before@example.com")).await.unwrap();
        // Several pooled connections, all of which go stale together.
        let reads: Vec<_> = (0..8)
            .map(|_| s.get_users(std::slice::from_ref(&before.id)))
            .collect();
        for read in futures_util::future::join_all(reads).await {
            read.unwrap();
        }
        assert!(s.readiness().is_ok());

        server.stop();
        assert_every_call_unavailable(&s).await;
        assert!(s.readiness().is_err());

        // A new, empty server on the same address: no stale connection and
        // no missing script may get in the way.
        let _server = RedisServer::start_on(server.port());
        s.ping().await.unwrap();
        assert!(s.readiness().is_ok());
        s.create_user(new_user("after@example.com")).await.unwrap();
        assert_eq!(s.get_users(&[before.id]).await.unwrap(), vec![None]);
    }

    #[tokio::test]
    async fn a_redis_that_never_answers_cannot_hang_a_call() {
        // The kernel completes connections into the backlog, nobody ever
        // reads or answers: the worst kind of outage for a client.
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let s = store(
            &format!("redis://{}/", silent.local_addr().unwrap()),
            "subgate:",
        );
        assert_every_call_unavailable(&s).await;
        assert!(s.readiness().is_err());
    }

    #[tokio::test]
    async fn a_paused_redis_times_out_and_serves_again_when_resumed() {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;

        let server = RedisServer::start();
        let s = store(&server.url(), "subgate:");
        let user = s.create_user(new_user("p@example.com")).await.unwrap();
        let pid = Pid::from_raw(server.pid().unwrap() as i32);

        kill(pid, Signal::SIGSTOP).unwrap();
        assert_every_call_unavailable(&s).await;
        // Whichever layer noticed first (connecting, or our deadline), the
        // node is not ready.
        assert!(s.readiness().is_err());

        kill(pid, Signal::SIGCONT).unwrap();
        // Answers to the abandoned requests may still arrive; they must not
        // be taken for answers to new ones.
        assert_eq!(
            s.get_users(std::slice::from_ref(&user.id)).await.unwrap(),
            vec![Some(user.clone())]
        );
        assert_eq!(
            s.find_user_by_email("p@example.com").await.unwrap(),
            Some(user)
        );
        assert!(s.readiness().is_ok());
    }

    #[tokio::test]
    async fn a_refused_request_is_unavailable_without_costing_readiness() {
        let server = RedisServer::start();
        let s = store(&server.url(), "bad:");
        let mut con = raw(&server).await;
        // A foreign writer put the wrong type under our prefix.
        let _: () = redis::cmd("SET")
            .arg("bad:users")
            .arg("not a sorted set")
            .query_async(&mut con)
            .await
            .unwrap();
        let _: () = redis::cmd("HSET")
            .arg("bad:post:half")
            .arg("id")
            .arg("half")
            .query_async(&mut con)
            .await
            .unwrap();

        let listed = s
            .list_users(PageRequest {
                first: 5,
                after: None,
            })
            .await;
        assert!(
            matches!(listed, Err(StoreError::Unavailable(_))),
            "{listed:?}"
        );
        let half = s.get_posts(&["half".into()]).await;
        assert!(
            matches!(&half, Err(StoreError::Unavailable(why)) if why.contains("malformed post")),
            "{half:?}"
        );
        assert!(s.readiness().is_ok(), "Redis answered; it is reachable");
    }

    #[tokio::test]
    async fn two_nodes_racing_for_one_email_have_one_winner() {
        let server = RedisServer::start();
        let nodes = [
            Arc::new(store(&server.url(), "subgate:")),
            Arc::new(store(&server.url(), "subgate:")),
        ];
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let node = nodes[i % 2].clone();
                tokio::spawn(async move { node.create_user(new_user("shared@example.com")).await })
            })
            .collect();
        let mut wins = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(_) => wins += 1,
                Err(e) => assert_eq!(e, StoreError::Conflict { field: "email" }),
            }
        }
        assert_eq!(wins, 1);
        // Either node sees the one user.
        for node in &nodes {
            assert_eq!(
                node.list_users(PageRequest {
                    first: 5,
                    after: None
                })
                .await
                .unwrap()
                .total_count,
                1
            );
        }
    }

    #[tokio::test]
    async fn prefixes_keep_deployments_apart() {
        let server = RedisServer::start();
        let (blue, green) = (
            store(&server.url(), "blue:"),
            store(&server.url(), "green:"),
        );
        let b = blue
            .create_user(new_user("same@example.com"))
            .await
            .unwrap();
        let g = green
            .create_user(new_user("same@example.com"))
            .await
            .unwrap();
        assert_eq!(
            blue.get_users(&[b.id.clone(), g.id.clone()]).await.unwrap(),
            vec![Some(b), None]
        );
        assert_eq!(
            green
                .list_users(PageRequest {
                    first: 5,
                    after: None
                })
                .await
                .unwrap()
                .total_count,
            1
        );
    }

    #[tokio::test]
    async fn keys_follow_the_documented_layout() {
        let server = RedisServer::start();
        let s = store(&server.url(), "lay:");
        let u = s.create_user(new_user(" Lay@Example.com")).await.unwrap();
        let p = s.create_post(&u.id, "t".into(), "c".into()).await.unwrap();
        let c = s.create_comment(&p.id, &u.id, "c".into()).await.unwrap();
        let ch = s
            .create_channel(&u.id, "ch".into(), true, vec!["x\"y".into()])
            .await
            .unwrap();
        let m = s.create_message(&ch.id, &u.id, "m".into()).await.unwrap();
        let n = s
            .create_notification(&u.id, "k".into(), "m".into(), serde_json::json!({"a": 1}))
            .await
            .unwrap();
        s.set_topic_readers("orders:eu", &TopicReaders::Users(vec![u.id.clone()]))
            .await
            .unwrap();

        let mut con = raw(&server).await;
        let keys: BTreeSet<String> = redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut con)
            .await
            .unwrap();
        let expected: BTreeSet<String> = [
            "lay:seq".to_owned(),
            format!("lay:user:{}", u.id),
            "lay:email:lay@example.com".to_owned(),
            "lay:users".to_owned(),
            format!("lay:post:{}", p.id),
            "lay:posts".to_owned(),
            format!("lay:posts:author:{}", u.id),
            format!("lay:comment:{}", c.id),
            format!("lay:comments:post:{}", p.id),
            format!("lay:channel:{}", ch.id),
            "lay:channels".to_owned(),
            format!("lay:message:{}", m.id),
            format!("lay:messages:channel:{}", ch.id),
            format!("lay:notification:{}", n.id),
            format!("lay:notifications:user:{}", u.id),
            "lay:readers:orders:eu".to_owned(),
        ]
        .into();
        assert_eq!(keys, expected);

        let reader = con.clone();
        let get = |key: String, field: &'static str| {
            let mut con = reader.clone();
            async move {
                redis::cmd("HGET")
                    .arg(key)
                    .arg(field)
                    .query_async::<String>(&mut con)
                    .await
                    .unwrap()
            }
        };
        let owner: String = redis::cmd("GET")
            .arg("lay:email:lay@example.com")
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(owner, u.id);
        assert_eq!(
            get(format!("lay:user:{}", u.id), "email").await,
            " Lay@Example.com"
        );
        assert_eq!(
            get(format!("lay:channel:{}", ch.id), "is_private").await,
            "1"
        );
        let members = get(format!("lay:channel:{}", ch.id), "member_ids").await;
        assert_eq!(
            serde_json::from_str::<Vec<String>>(&members).unwrap(),
            vec![u.id.clone(), "x\"y".into()]
        );
        assert_eq!(get(format!("lay:notification:{}", n.id), "read").await, "0");
        assert_eq!(
            get(format!("lay:notification:{}", n.id), "payload").await,
            r#"{"a":1}"#
        );
        let readers: String = redis::cmd("GET")
            .arg("lay:readers:orders:eu")
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(readers, format!(r#"{{"users":["{}"]}}"#, u.id));
        let created = get(format!("lay:message:{}", m.id), "created_at").await;
        assert_eq!(
            DateTime::parse_from_rfc3339(&created).unwrap(),
            m.created_at
        );
        // The position in the hash is the score in the index.
        let seq = get(format!("lay:post:{}", p.id), "seq").await;
        let score: String = redis::cmd("ZSCORE")
            .arg("lay:posts")
            .arg(&p.id)
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(seq, score);

        // Deleting removes the entity and its index entries, not the lists.
        s.delete_post(&p.id).await.unwrap();
        s.delete_user(&u.id).await.unwrap();
        let keys: BTreeSet<String> = redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut con)
            .await
            .unwrap();
        for gone in [
            format!("lay:post:{}", p.id),
            format!("lay:user:{}", u.id),
            "lay:email:lay@example.com".into(),
        ] {
            assert!(!keys.contains(&gone), "{gone} is left behind");
        }
        let indexed: usize = redis::cmd("ZCARD")
            .arg(format!("lay:posts:author:{}", u.id))
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(indexed, 0);
    }
}
