//! The Lua scripts behind every write (and the one two-step read), each a
//! `static` loaded once.
//!
//! Conventions: `redis.call` answers `false` for a nil reply; scripts that
//! answer an entity answer `{status, HGETALL}` with status `ok`,
//! `notfound` or `conflict`. Every write is one script, so an entity and
//! its indexes change together, and the checks that guard a write run in
//! the same step as the write.

use crate::infra::redis::Script;

/// KEYS: email, seq, user, users. ARGV: id, then field/value pairs.
/// Claiming the email with SET NX is the uniqueness check and the write at
/// once; -1 means it was taken.
pub(super) static CREATE_USER: Script = Script::new(
    r"
if not redis.call('SET', KEYS[1], ARGV[1], 'NX') then return -1 end
local seq = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[3], 'seq', seq, unpack(ARGV, 2))
redis.call('ZADD', KEYS[4], seq, ARGV[1])
return seq
",
);

/// KEYS: seq, entity, guards..., indexes. ARGV: id, number of guards, then
/// field/value pairs. -1 when a guard (the parent post or channel) is
/// missing; nothing is written then.
pub(super) static CREATE: Script = Script::new(
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
);

/// KEYS: user, and the new email key when the email changes. ARGV: id,
/// email key prefix, then field/value pairs. The new email must be free or
/// already this user's (a change of case); the old one is released only if
/// this user still holds it.
pub(super) static UPDATE_USER: Script = Script::new(
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
);

/// KEYS: user, users. ARGV: id, email key prefix. Frees the email so that
/// it can be registered again.
pub(super) static DELETE_USER: Script = Script::new(
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
);

/// KEYS: post, posts. ARGV: id, author index prefix. The post's comments
/// stay, as in the memory store; they are unreachable without the post.
pub(super) static DELETE_POST: Script = Script::new(
    r"
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then return {'notfound', {}} end
local author = redis.call('HGET', KEYS[1], 'author_id')
redis.call('ZREM', KEYS[2], ARGV[1])
if author then redis.call('ZREM', ARGV[2] .. author, ARGV[1]) end
redis.call('DEL', KEYS[1])
return {'ok', fields}
",
);

/// KEYS: entity. ARGV: guard field ('' for none), guard value, then
/// field/value pairs. A failed guard reads as not found, so that a
/// notification of someone else's is indistinguishable from one that does
/// not exist.
pub(super) static PATCH: Script = Script::new(
    r"
if redis.call('EXISTS', KEYS[1]) == 0 then return {'notfound', {}} end
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
    return {'notfound', {}}
end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
return {'ok', redis.call('HGETALL', KEYS[1])}
",
);

/// KEYS: channel. ARGV: user id. Appends to the JSON member list unless
/// present; the list is never empty (the owner is in it), so cjson's
/// encoding of an empty table as an object never arises.
pub(super) static ADD_MEMBER: Script = Script::new(
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
);

/// KEYS: email. ARGV: user key prefix. The owner's hash, or an empty one:
/// one round trip instead of two.
pub(super) static USER_BY_EMAIL: Script = Script::new(
    r"
local id = redis.call('GET', KEYS[1])
if not id then return {} end
return redis.call('HGETALL', ARGV[1] .. id)
",
);
