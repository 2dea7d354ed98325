//! Lua scripts: each is a `static`, hashed once per process, and sent by
//! its hash (`EVALSHA`). Redis learns a script's body once, the first time
//! it answers `NOSCRIPT` (a fresh or restarted server), and redis-rs then
//! loads it and retries within the same call.

use std::sync::OnceLock;

use redis::ScriptInvocation;

/// A Lua script, optionally preceded by a prelude shared by a family of
/// scripts (presence's helpers, say).
pub struct Script {
    prelude: &'static str,
    body: &'static str,
    compiled: OnceLock<redis::Script>,
}

impl Script {
    pub const fn new(body: &'static str) -> Self {
        Self::with_prelude("", body)
    }

    pub const fn with_prelude(prelude: &'static str, body: &'static str) -> Self {
        Self {
            prelude,
            body,
            compiled: OnceLock::new(),
        }
    }

    /// A call of the script, to fill with keys and arguments and pass to
    /// [`super::Redis::call`].
    pub fn invocation(&self) -> ScriptInvocation<'_> {
        self.compiled
            .get_or_init(|| redis::Script::new(&format!("{}{}", self.prelude, self.body)))
            .prepare_invoke()
    }
}
