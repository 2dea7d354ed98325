//! The one path every entity takes to and from Redis: batch reads, pages
//! of a sorted-set list, the create and patch scripts, and the scripts
//! that answer an entity. Each works for any [`Stored`] entity, so an
//! entity's storage is its declaration in [`super::codec`] plus the keys
//! of its lists.

use redis::ScriptInvocation;

use super::codec::{Fields, Record, Stored};
use super::scripts;
use super::RedisStore;
use crate::store::{Page, PageRequest, StoreError, StoreResult};

#[derive(Clone, Copy)]
pub(super) enum Direction {
    OldestFirst,
    NewestFirst,
}

impl RedisStore {
    /// The key of entity `id` of type `E`.
    pub(super) fn key<E: Stored>(&self, id: &str) -> String {
        self.redis.keys().record(E::KIND, id)
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
        self.call(&pipe).await
    }

    /// Entities of `ids` in one round trip, in order, `None` where missing.
    pub(super) async fn get<E: Stored>(&self, ids: &[String]) -> StoreResult<Vec<Option<E>>> {
        let found = self.hashes(ids.iter().map(|id| self.key::<E>(id))).await?;
        found
            .into_iter()
            .map(|fields| {
                Record::found(fields, E::KIND)
                    .map(|r| r.decode().map(|(_, e)| e))
                    .transpose()
            })
            .collect()
    }

    /// One page of the sorted set `list`: ids, count and the previous-page
    /// probe in one pipeline, then the page's hashes in another.
    /// O(log N + page) on the Redis side.
    pub(super) async fn list<E: Stored>(
        &self,
        list: &str,
        req: PageRequest,
        dir: Direction,
    ) -> StoreResult<Page<E>> {
        // One more than asked tells whether a next page exists. Redis takes
        // the count as a signed 64-bit number.
        let take = req.first.min(i64::MAX as usize - 1);
        // The cursor's own item is excluded: `(` makes the bound exclusive.
        let from = req.after.map(|a| format!("({a}"));
        let (range, from, to) = match dir {
            Direction::OldestFirst => ("ZRANGEBYSCORE", from.unwrap_or("-inf".into()), "+inf"),
            Direction::NewestFirst => ("ZREVRANGEBYSCORE", from.unwrap_or("+inf".into()), "-inf"),
        };
        let mut pipe = redis::pipe();
        pipe.cmd(range)
            .arg(list)
            .arg(from)
            .arg(to)
            .arg("LIMIT")
            .arg(0)
            .arg(take + 1);
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
        let (mut ids, total_count, before): (Vec<String>, usize, usize) = self.call(&pipe).await?;
        let has_next_page = ids.len() > take;
        ids.truncate(take);
        let mut items = Vec::with_capacity(ids.len());
        for fields in self.hashes(ids.iter().map(|id| self.key::<E>(id))).await? {
            // An id whose hash vanished between the two round trips was
            // deleted meanwhile: skipped, as the memory store would.
            if let Some(record) = Record::found(fields, E::KIND) {
                items.push(record.decode()?);
            }
        }
        Ok(Page {
            items,
            total_count,
            has_next_page,
            has_previous_page: req.after.is_some() && before > 0,
        })
    }

    /// Writes a new entity and its `indexes` in one step, after checking
    /// that every `guards` key (a parent post or channel) exists; answers
    /// its position.
    pub(super) async fn insert<E: Stored>(
        &self,
        entity: &E,
        guards: &[String],
        indexes: &[String],
    ) -> StoreResult<u64> {
        let mut inv = scripts::CREATE.invocation();
        inv.key(self.redis.keys().seq())
            .key(self.key::<E>(entity.id()))
            .key(guards)
            .key(indexes);
        inv.arg(entity.id()).arg(guards.len());
        for (name, value) in entity.encode() {
            inv.arg(name).arg(value);
        }
        let seq: i64 = self.call(&inv).await?;
        // -1: a guard key is missing, i.e. the parent post or channel.
        u64::try_from(seq).map_err(|_| StoreError::NotFound)
    }

    /// Sets `fields` on entity `id` if it exists and, when `guard` is given,
    /// only if that field holds that value; answers the whole entity.
    pub(super) async fn patch<E: Stored>(
        &self,
        id: &str,
        guard: Option<(&str, &str)>,
        fields: &[(&str, String)],
    ) -> StoreResult<E> {
        let mut inv = scripts::PATCH.invocation();
        let (guard_field, guard_value) = guard.unwrap_or(("", ""));
        inv.key(self.key::<E>(id)).arg(guard_field).arg(guard_value);
        for (name, value) in fields {
            inv.arg(*name).arg(value);
        }
        self.outcome(&inv).await
    }

    /// Runs a script that answers `{status, fields}` of an entity.
    pub(super) async fn outcome<E: Stored>(&self, inv: &ScriptInvocation<'_>) -> StoreResult<E> {
        let (status, fields): (String, Fields) = self.call(inv).await?;
        match status.as_str() {
            "ok" => match Record::found(fields, E::KIND) {
                Some(record) => record.decode().map(|(_, e)| e),
                None => Err(StoreError::Unavailable(format!(
                    "the {} script answered no fields",
                    E::KIND
                ))),
            },
            "notfound" => Err(StoreError::NotFound),
            "conflict" => Err(StoreError::Conflict { field: "email" }),
            other => Err(StoreError::Unavailable(format!(
                "unexpected script status {other:?}"
            ))),
        }
    }
}
