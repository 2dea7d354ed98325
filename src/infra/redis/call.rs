//! The one policy for a call to Redis: a pooled connection and one request
//! under one deadline (`redis.command_timeout_seconds`), and one reading of what
//! a failure says about Redis.

use deadpool_redis::PoolError;
use redis::{Cmd, ErrorKind, Pipeline, RedisError, ScriptInvocation, ServerErrorKind};

/// What one call sends.
pub enum Request<'a> {
    Cmd(&'a Cmd),
    Pipe(&'a Pipeline),
    Script(&'a ScriptInvocation<'a>),
}

impl<'a> From<&'a Cmd> for Request<'a> {
    fn from(cmd: &'a Cmd) -> Self {
        Request::Cmd(cmd)
    }
}

impl<'a> From<&'a Pipeline> for Request<'a> {
    fn from(pipe: &'a Pipeline) -> Self {
        Request::Pipe(pipe)
    }
}

impl<'a, 'b: 'a> From<&'a ScriptInvocation<'b>> for Request<'a> {
    fn from(script: &'a ScriptInvocation<'b>) -> Self {
        Request::Script(script)
    }
}

/// Why a call failed, split by what it says about Redis.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// Redis cannot be reached or cannot serve now: no connection, a broken
    /// or hung one, a server loading its data or read-only. Readiness is
    /// down until a call gets through, and the connection is not reused.
    #[error("Redis unreachable: {0}")]
    Unreachable(String),
    /// Redis answered, with an error: the request was wrong (a script or
    /// type error), not Redis. Readiness cannot help with that.
    #[error("Redis refused the request: {0}")]
    Refused(String),
}

impl CallError {
    pub(super) fn from_pool(e: PoolError) -> Self {
        match e {
            PoolError::Backend(e) => Self::from_redis(e),
            other => Self::Unreachable(format!("no pooled connection: {other}")),
        }
    }

    pub(super) fn from_redis(e: RedisError) -> Self {
        let unreachable = e.is_io_error()
            || e.is_connection_dropped()
            || e.is_timeout()
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
            Self::Unreachable(e.to_string())
        } else {
            Self::Refused(e.to_string())
        }
    }

    /// What went wrong, without the kind.
    pub fn cause(&self) -> &str {
        match self {
            CallError::Unreachable(why) | CallError::Refused(why) => why,
        }
    }
}
