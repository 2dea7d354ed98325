//! The expiry of the token a long-lived connection runs as: a timer that
//! follows the connection's principal (a later `connection_init` or `auth`
//! may replace it) and fires once when its token stops counting.

use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::{Instant, Sleep};

/// A timer armed for the expiry of the connection's current principal.
pub struct Expiry {
    /// The expiry armed (seconds since the Unix epoch), if any.
    armed_for: Option<u64>,
    fired: bool,
    sleep: Pin<Box<Sleep>>,
}

impl Default for Expiry {
    fn default() -> Self {
        Self::new()
    }
}

impl Expiry {
    pub fn new() -> Self {
        Self {
            armed_for: None,
            fired: false,
            // Never reached while nothing is armed: `wait` does not poll it.
            sleep: Box::pin(tokio::time::sleep(Duration::from_secs(3600))),
        }
    }

    /// Arms the timer for `expires_at` (seconds since the Unix epoch, as
    /// [`crate::auth::Principal::expires_at`]); cheap when it is unchanged,
    /// so a pump calls it every turn.
    pub fn follow(&mut self, expires_at: Option<u64>) {
        if expires_at == self.armed_for {
            return;
        }
        self.armed_for = expires_at;
        self.fired = false;
        if let Some(at) = expires_at {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            let left = Duration::from_secs(at).saturating_sub(now);
            self.sleep.as_mut().reset(Instant::now() + left);
        }
    }

    /// Resolves once when the armed expiry passes; pends forever while
    /// nothing is armed or after it fired.
    pub async fn wait(&mut self) {
        if self.armed_for.is_none() || self.fired {
            return std::future::pending().await;
        }
        self.sleep.as_mut().await;
        self.fired = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_secs(secs: u64) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + secs
    }

    #[tokio::test(start_paused = true)]
    async fn fires_once_at_the_expiry_it_follows() {
        let mut expiry = Expiry::new();
        expiry.follow(None);
        let never = tokio::time::timeout(Duration::from_secs(7200), expiry.wait()).await;
        assert!(never.is_err(), "nothing armed, nothing fires");
        expiry.follow(Some(in_secs(10)));
        tokio::time::timeout(Duration::from_secs(12), expiry.wait())
            .await
            .expect("fires at the expiry");
        let again = tokio::time::timeout(Duration::from_secs(60), expiry.wait()).await;
        assert!(again.is_err(), "fires once");
        // A new principal re-arms it.
        expiry.follow(Some(in_secs(100)));
        let early = tokio::time::timeout(Duration::from_secs(50), expiry.wait()).await;
        assert!(early.is_err(), "not before the new expiry");
    }
}
