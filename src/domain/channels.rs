//! Channels: creating one, joining a public one.

use crate::auth::Principal;
use crate::domain::entities::Create;
use crate::store;

use super::users::MAX_NAME;
use super::{Checks, Domain, DomainError, ForInput};

/// Whether `user_id` (`None`: anonymous) may read `channel`: anyone when
/// it is public, its members when it is private.
pub fn readable_by(channel: &store::Channel, user_id: Option<&str>) -> bool {
    !channel.is_private || user_id.is_some_and(|u| channel.member_ids.iter().any(|m| m == u))
}

/// The most members a channel may be created with.
pub const MAX_INITIAL_MEMBERS: usize = 1000;

pub struct NewChannel {
    pub name: String,
    /// Readable and writable by members only.
    pub is_private: bool,
    /// Members besides the creator.
    pub member_ids: Vec<String>,
}

impl Domain {
    /// Creates a channel owned by the caller, with `member_ids` (who must
    /// exist) as members.
    pub async fn create_channel(
        &self,
        principal: Option<&Principal>,
        input: NewChannel,
    ) -> Result<store::Channel, DomainError> {
        let me = Self::actor(principal)?;
        let mut checks = Checks::default();
        checks.text("name", &input.name, MAX_NAME);
        if input.member_ids.len() > MAX_INITIAL_MEMBERS {
            checks.fail(
                "member_ids",
                format!("at most {MAX_INITIAL_MEMBERS} members at creation"),
            );
        }
        checks.done()?;
        let found = self
            .store
            .get_users(&input.member_ids)
            .await
            .for_input("member_ids", "user")?;
        if let Some((missing, _)) = input
            .member_ids
            .iter()
            .zip(&found)
            .find(|(_, u)| u.is_none())
        {
            return Err(DomainError::MissingMember(missing.clone()));
        }
        self.store
            .create_channel(
                me,
                input.name.trim().to_owned(),
                input.is_private,
                input.member_ids,
            )
            .await
            .for_input("name", "channel")
    }

    /// Joins a public channel (or one the caller is already in).
    pub async fn join_channel(
        &self,
        principal: Option<&Principal>,
        channel_id: &str,
    ) -> Result<store::Channel, DomainError> {
        let me = Self::actor(principal)?;
        let channel = self.channel(channel_id).await?;
        if !readable_by(&channel, Some(me)) {
            // A private channel the caller is not in looks absent.
            return Err(DomainError::NotFound {
                field: "channel_id",
                what: "channel",
            });
        }
        self.store
            .add_channel_member(&channel.id, me)
            .await
            .for_input("channel_id", "channel")
    }

    /// The channel `id`, named by the input `channel_id`.
    pub(super) async fn channel(&self, id: &str) -> Result<store::Channel, DomainError> {
        self.store
            .get_channels(&[id.to_owned()])
            .await
            .for_input("channel_id", "channel")?
            .pop()
            .flatten()
            .ok_or(DomainError::NotFound {
                field: "channel_id",
                what: "channel",
            })
    }
}
