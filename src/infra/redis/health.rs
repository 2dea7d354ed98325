//! Whether Redis answered the last call, and why not: what `/readyz` says
//! for every component on the layer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

#[derive(Default)]
pub(super) struct Health {
    down: AtomicBool,
    why: Mutex<String>,
}

impl Health {
    pub(super) fn up(&self) {
        self.down.store(false, Ordering::Release);
    }

    pub(super) fn down(&self, why: &str) {
        // The reason is written before the flag, so a reader that sees the
        // flag also sees a reason (possibly a newer one, never an empty one).
        *self.why.lock().unwrap_or_else(|p| p.into_inner()) = why.to_owned();
        self.down.store(true, Ordering::Release);
    }

    pub(super) fn check(&self) -> Result<(), String> {
        if self.down.load(Ordering::Acquire) {
            Err(self.why.lock().unwrap_or_else(|p| p.into_inner()).clone())
        } else {
            Ok(())
        }
    }
}
