//! What the process's open-file limit allows: how many long-lived
//! connections a node admits, and how many sockets of any kind it accepts.
//!
//! Every connection is a file descriptor, and so are the Redis pool, the
//! Pub/Sub connection, the listener, the runtimes' event queues and the log.
//! A node that accepts until its file table is full can no longer answer
//! `/healthz` nor reconnect to Redis, so both limits are drawn from
//! `RLIMIT_NOFILE` (its soft limit, first raised to the hard limit when the
//! process may):
//!
//! - long-lived connections (WebSockets, event streams; admission's
//!   `server.max_connections`): the limit minus a reserve of
//!   max(256, 5 %), which keeps room for plain HTTP requests (probes,
//!   metrics, GraphQL queries) and everything the node holds itself;
//! - sockets accepted by the HTTP server, all kinds: the limit minus what
//!   the node holds itself (64 plus `redis.pool_size`), shared among the
//!   workers, so that the server stops accepting (the kernel's backlog
//!   holds the rest) before `accept` could fail for want of a descriptor.
//!
//! An explicit `server.max_connections` above what the limit allows is a
//! start-up error naming the key: the operator raises `ulimit -n` or lowers
//! the setting, rather than learning of it at the worst moment.

use super::{ConfigError, Settings};

/// Descriptors the node holds besides its clients' sockets, on top of its
/// Redis pool: listener, runtimes, Pub/Sub, stdio, the log.
const OWN_FILES: u64 = 64;

/// Where the reserve for plain HTTP and the node's own files starts.
const MIN_RESERVE: u64 = 256;

/// The open-file limit in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileLimit {
    /// The soft limit, after raising it.
    pub soft: u64,
    /// The hard limit.
    pub hard: u64,
    /// The soft limit before the raise, when it was raised.
    pub raised_from: Option<u64>,
}

/// What the node may hold, derived from the file limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// The open-file limit the numbers come from; `None` where the
    /// platform has none to read.
    pub files: Option<FileLimit>,
    /// Most long-lived connections (admission's limit).
    pub max_connections: usize,
    /// Most sockets each HTTP worker holds at once, of any kind.
    pub max_sockets_per_worker: usize,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit where allowed and
/// answers the limit in force; `None` where there is none to read.
pub fn raise_file_limit() -> Option<FileLimit> {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct it is given.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
            return None;
        }
        let before = limit.rlim_cur;
        // An unlimited hard limit cannot be the soft one (the kernel caps
        // descriptors at fs.nr_open); a million is as many as is useful.
        let target = if limit.rlim_max == libc::RLIM_INFINITY {
            (1u64 << 20).max(before)
        } else {
            limit.rlim_max
        };
        let mut soft = before;
        if target > before {
            let raised = libc::rlimit {
                rlim_cur: target,
                rlim_max: limit.rlim_max,
            };
            // SAFETY: setrlimit reads the struct it is given.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                soft = target;
            }
        }
        Some(FileLimit {
            soft,
            hard: limit.rlim_max,
            raised_from: (soft != before).then_some(before),
        })
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// The long-lived connections allowed under `files` descriptors.
pub fn connections_allowed(files: u64) -> u64 {
    files.saturating_sub(MIN_RESERVE.max(files / 20))
}

/// What a node of `settings` may hold under `files`, with `workers` HTTP
/// workers; an error naming `server.max_connections` when an explicit
/// value does not fit, or when the limit leaves no room at all.
pub fn plan(
    settings: &Settings,
    files: Option<FileLimit>,
    workers: usize,
) -> Result<Capacity, ConfigError> {
    let workers = workers.max(1) as u64;
    let configured = settings.server.max_connections;
    let Some(limit) = files else {
        // Nothing to derive from: the setting, or the historical default.
        let max_connections = configured.unwrap_or(50_000);
        return Ok(Capacity {
            files: None,
            max_connections,
            max_sockets_per_worker: (max_connections as u64 * 2 / workers).max(1) as usize,
        });
    };
    let allowed = connections_allowed(limit.soft);
    if allowed == 0 {
        return Err(ConfigError::new(
            "server.max_connections",
            format!(
                "the open-files limit (ulimit -n) of {} leaves no room for connections; raise it above {}",
                limit.soft,
                MIN_RESERVE
            ),
        ));
    }
    let max_connections = match configured {
        Some(n) if n as u64 > allowed => {
            return Err(ConfigError::new(
                "server.max_connections",
                format!(
                    "{n} is more than the open-files limit (ulimit -n {}) allows: at most {allowed}; raise the limit or unset the key",
                    limit.soft
                ),
            ))
        }
        Some(n) => n,
        None => allowed as usize,
    };
    let own = OWN_FILES + settings.redis.pool_size as u64;
    let sockets = limit
        .soft
        .saturating_sub(own)
        .max(max_connections as u64 + 1);
    Ok(Capacity {
        files: Some(limit),
        max_connections,
        max_sockets_per_worker: (sockets / workers).max(1) as usize,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(soft: u64) -> Option<FileLimit> {
        Some(FileLimit {
            soft,
            hard: soft,
            raised_from: None,
        })
    }

    #[test]
    fn the_default_leaves_a_reserve_of_the_larger_of_256_and_5_percent() {
        let s = Settings::default();
        assert_eq!(plan(&s, files(300), 2).unwrap().max_connections, 44);
        assert_eq!(plan(&s, files(20_000), 2).unwrap().max_connections, 19_000);
        let c = plan(&s, files(1024), 2).unwrap();
        assert_eq!(c.max_connections, 768);
        // Every socket the workers accept together fits beside the node's own.
        assert_eq!(c.max_sockets_per_worker, (1024 - 64 - 32) / 2);
    }

    #[test]
    fn an_explicit_limit_must_fit_under_the_file_limit() {
        let mut s = Settings::default();
        s.server.max_connections = Some(50_000);
        let err = plan(&s, files(20_000), 2).unwrap_err();
        assert_eq!(err.key, "server.max_connections");
        assert!(err.message.contains("19000"), "{}", err.message);
        s.server.max_connections = Some(100);
        assert_eq!(plan(&s, files(20_000), 2).unwrap().max_connections, 100);
        let err = plan(&Settings::default(), files(200), 2).unwrap_err();
        assert_eq!(err.key, "server.max_connections");
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let limit = raise_file_limit().expect("a unix limit");
        assert!(limit.soft <= limit.hard.max(1 << 20));
        assert!(limit.soft > 0);
    }
}
