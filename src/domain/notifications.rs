//! Notifications: a user marks their own read.

use crate::auth::Principal;
use crate::store;

use super::{Domain, DomainError, ForInput};

impl Domain {
    /// Marks one of the caller's notifications read (someone else's looks
    /// absent).
    pub async fn mark_notification_read(
        &self,
        principal: Option<&Principal>,
        id: &str,
    ) -> Result<store::Notification, DomainError> {
        let me = Self::actor(principal)?;
        self.store
            .mark_notification_read(me, id)
            .await
            .for_input("id", "notification")
    }
}
