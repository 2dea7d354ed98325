//! The socket's sending half, and how it closes.

use std::sync::Arc;
use std::time::Duration;

use actix_ws::{CloseCode, CloseReason, Closed, Session};
use bytestring::ByteString;

use super::End;
use crate::error::close;
use crate::hub::Cutoff;
use crate::shutdown::Shutdown;

/// How long a close may wait on a congested socket before the connection is
/// dropped without it.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// The longest close reason a WebSocket close frame carries.
const MAX_CLOSE_REASON_BYTES: usize = 123;

/// The socket's sending half; every write yields to the cut-off and the
/// drain, so a client that stopped reading cannot wedge the task.
pub struct Outbox {
    session: Session,
    cutoff: Arc<Cutoff>,
    shutdown: Shutdown,
}

impl Outbox {
    pub fn new(session: Session, cutoff: Arc<Cutoff>, shutdown: Shutdown) -> Self {
        Self {
            session,
            cutoff,
            shutdown,
        }
    }

    pub async fn text(&mut self, text: impl Into<ByteString>) -> Result<(), End> {
        let (cutoff, shutdown) = (self.cutoff.clone(), self.shutdown.clone());
        interruptible(self.session.text(text), &cutoff, &shutdown).await
    }

    pub async fn ping(&mut self) -> Result<(), End> {
        let (cutoff, shutdown) = (self.cutoff.clone(), self.shutdown.clone());
        interruptible(self.session.ping(b""), &cutoff, &shutdown).await
    }

    pub(super) async fn pong(&mut self, payload: &[u8]) -> Result<(), End> {
        let (cutoff, shutdown) = (self.cutoff.clone(), self.shutdown.clone());
        interruptible(self.session.pong(payload), &cutoff, &shutdown).await
    }

    /// Sends the close frame if the socket takes it within [`CLOSE_GRACE`];
    /// dropping the session afterwards ends the response and the connection.
    pub(super) async fn close(self, reason: Option<CloseReason>) {
        let _ = tokio::time::timeout(CLOSE_GRACE, self.session.close(reason)).await;
    }
}

async fn interruptible(
    send: impl std::future::Future<Output = Result<(), Closed>>,
    cutoff: &Cutoff,
    shutdown: &Shutdown,
) -> Result<(), End> {
    tokio::select! {
        biased;
        sent = send => sent.map_err(|Closed| End::Gone),
        _ = cutoff.fired() => Err(slow_consumer()),
        _ = shutdown.wait() => Err(going_away()),
    }
}

pub fn slow_consumer() -> End {
    End::Close(close::SLOW_CONSUMER, "slow consumer".into())
}

pub fn going_away() -> End {
    End::Close(close::GOING_AWAY, "server shutting down".into())
}

/// At most [`MAX_CLOSE_REASON_BYTES`] of `reason`, on a character boundary.
pub(super) fn close_reason(code: u16, reason: &str) -> CloseReason {
    let mut end = reason.len().min(MAX_CLOSE_REASON_BYTES);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    CloseReason {
        code: CloseCode::from(code),
        description: Some(reason[..end].to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reasons_fit_a_close_frame() {
        let long = "é".repeat(100);
        let reason = close_reason(4400, &long);
        assert!(reason.description.unwrap().len() <= MAX_CLOSE_REASON_BYTES);
    }
}
