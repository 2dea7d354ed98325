//! The server's heartbeat.

use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};

use super::{End, Outbox};
use crate::error::close;

/// A peer silent for this many ping intervals is presumed gone.
const IDLE_INTERVALS: u32 = 3;

/// The server's heartbeat: a WebSocket ping every interval, and the idle
/// rule (a peer silent for three intervals is presumed gone).
pub struct Heartbeat {
    interval: tokio::time::Interval,
    idle_limit: Duration,
    last_heard: Instant,
}

impl Heartbeat {
    pub fn new(ping_interval: Duration) -> Self {
        // A zero period would make the interval panic; settings forbid it,
        // this keeps a hand-built config from doing so.
        let period = ping_interval.max(Duration::from_millis(1));
        let mut interval = tokio::time::interval_at(Instant::now() + period, period);
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self {
            interval,
            idle_limit: period * IDLE_INTERVALS,
            last_heard: Instant::now(),
        }
    }

    /// Resolves at the next beat.
    pub async fn tick(&mut self) {
        self.interval.tick().await;
    }

    /// The peer sent something (any frame, a pong included).
    pub fn heard(&mut self) {
        self.last_heard = Instant::now();
    }

    /// At a beat: closes an idle peer with 1001 "idle timeout" (1001 because
    /// a client that is in fact alive should simply reconnect), else pings.
    pub fn beat(&mut self, outbox: &mut Outbox) -> Result<(), End> {
        if self.last_heard.elapsed() >= self.idle_limit {
            return Err(End::Close(close::GOING_AWAY, "idle timeout".into()));
        }
        outbox.ping();
        Ok(())
    }
}
