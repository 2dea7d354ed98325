//! Users: sign-up, login, profile updates, account deletion.
//!
//! Passwords are hashed with argon2 (about 19 MiB and tens of milliseconds
//! each), so the operations that hash are bounded before they start:
//! `login` and `createUser` per client address, `login` per email, and
//! every hash by the node's hashing slots (`auth.max_concurrent_password_hashes`).
//! Whatever is over a bound is refused at once with `RateLimited`, never
//! queued.

use std::net::IpAddr;

use crate::auth::Principal;
use crate::domain::entities::Create;
use crate::store::{self, NewUser, UserPatch};

use super::events::{UserDeleted, UserUpdated};
use super::{Checks, Domain, DomainError, ForInput, Written};

/// Limits of a user's fields (characters).
pub const MAX_NAME: usize = 100;
const MIN_PASSWORD: usize = 8;
const MAX_PASSWORD: usize = 128;

pub struct SignUp {
    pub email: String,
    pub name: String,
    pub password: String,
}

/// A profile change; `None` leaves a field as it is.
pub struct ProfileChange {
    pub id: String,
    pub name: Option<String>,
    pub email: Option<String>,
    pub password: Option<String>,
}

/// A successful login.
pub struct Session {
    pub token: String,
    pub user: store::User,
}

/// Checks an email address the way a sign-up form should: one `@`, a
/// non-empty local part, a dotted domain, no spaces, at most 254 bytes.
pub fn valid_email(email: &str) -> bool {
    if email.len() > 254 || email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return false;
    }
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..")
}

impl Checks {
    fn email(&mut self, email: &str) {
        if !valid_email(email) {
            self.fail("email", "email is not a valid address");
        }
    }

    fn password(&mut self, password: &str) {
        let n = password.chars().count();
        if !(MIN_PASSWORD..=MAX_PASSWORD).contains(&n) {
            self.fail(
                "password",
                format!("password must be {MIN_PASSWORD} to {MAX_PASSWORD} characters"),
            );
        }
    }
}

/// An argon2 hash of `password` with a fresh salt.
fn argon2_hash(password: &[u8]) -> Option<String> {
    use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
    let salt = SaltString::generate(&mut OsRng);
    argon2::Argon2::default()
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .ok()
}

/// The hash `login` checks a password against when no user has the email:
/// made once when the node starts, of a random password nobody knows, so
/// that an unknown email costs what a known one does (timing does not tell
/// which emails exist) without a fresh hash per attempt.
pub fn unknown_email_hash() -> String {
    use argon2::password_hash::rand_core::{OsRng, RngCore};
    let mut secret = [0u8; 32];
    OsRng.fill_bytes(&mut secret);
    // Hashing 32 random bytes with default parameters cannot fail; should
    // it, the empty hash matches no password and the refusal stays the same.
    argon2_hash(&secret).unwrap_or_default()
}

impl Domain {
    /// Hashes off the async threads (argon2 is deliberately slow), in one
    /// of the node's hashing slots.
    async fn hash_password(&self, password: String) -> Result<String, DomainError> {
        let slot = self
            .limits
            .password_hash()
            .await
            .map_err(DomainError::RateLimited)?;
        tokio::task::spawn_blocking(move || {
            // The slot is released when the hash is done, not when the
            // request goes: a cancelled request still holds its memory.
            let _slot = slot;
            argon2_hash(password.as_bytes())
        })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| DomainError::Internal("the password could not be hashed".into()))
    }

    /// Whether `password` matches `hash`, in one of the hashing slots.
    async fn verify_password(&self, password: String, hash: String) -> Result<bool, DomainError> {
        let slot = self
            .limits
            .password_hash()
            .await
            .map_err(DomainError::RateLimited)?;
        let matched = tokio::task::spawn_blocking(move || {
            use argon2::password_hash::{PasswordHash, PasswordVerifier};
            let _slot = slot;
            PasswordHash::new(&hash).is_ok_and(|parsed| {
                argon2::Argon2::default()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok()
            })
        })
        .await
        .unwrap_or(false);
        Ok(matched)
    }

    /// One `login` or `createUser` call from `client` (unknown when the
    /// caller is not a network client).
    fn count_login_address(&self, client: Option<IpAddr>) -> Result<(), DomainError> {
        match client {
            Some(ip) => self
                .limits
                .login_address(ip)
                .map_err(DomainError::RateLimited),
            None => Ok(()),
        }
    }
}

impl Domain {
    /// Signs a user up, counted against `client`'s allowance.
    pub async fn create_user(
        &self,
        client: Option<IpAddr>,
        input: SignUp,
    ) -> Result<store::User, DomainError> {
        self.count_login_address(client)?;
        let email = input.email.trim().to_owned();
        let mut checks = Checks::default();
        checks.email(&email);
        checks.text("name", &input.name, MAX_NAME);
        checks.password(&input.password);
        checks.done()?;
        let password_hash = self.hash_password(input.password).await?;
        let new = NewUser {
            email,
            name: input.name.trim().to_owned(),
            password_hash,
        };
        self.store.create_user(new).await.for_input("email", "user")
    }

    /// Exchanges an email and password for a bearer token, counted against
    /// `client`'s and the email's allowances. A wrong email and a wrong
    /// password are the same refusal, in the same time.
    pub async fn login(
        &self,
        client: Option<IpAddr>,
        email: &str,
        password: String,
    ) -> Result<Session, DomainError> {
        self.count_login_address(client)?;
        let email = email.trim();
        self.limits
            .login_email(email)
            .map_err(DomainError::RateLimited)?;
        let user = match self.store.find_user_by_email(email).await {
            Ok(user) => user,
            Err(e) => return Err(DomainError::store(e, "email", "user")),
        };
        // An unknown email is checked against the start-up hash: the same
        // work as a real check, so timing does not reveal which emails exist.
        let hash = user.as_ref().map_or_else(
            || self.unknown_email_hash.clone(),
            |u| u.password_hash.clone(),
        );
        let matched = self.verify_password(password, hash).await?;
        let user = match user {
            Some(user) if matched => user,
            _ => return Err(DomainError::WrongCredentials),
        };
        let token = self
            .auth
            .mint(&user.id, self.login_token_ttl, None)
            .map_err(|e| DomainError::Internal(e.to_string()))?;
        Ok(Session { token, user })
    }

    /// Updates the caller's own profile; publishes `user.updated`.
    pub async fn update_user(
        &self,
        principal: Option<&Principal>,
        input: ProfileChange,
    ) -> Result<Written<store::User>, DomainError> {
        let me = Self::actor(principal)?;
        if me != input.id {
            return Err(DomainError::Forbidden(
                "you may only update your own profile",
            ));
        }
        let email = input.email.map(|e| e.trim().to_owned());
        let mut checks = Checks::default();
        if let Some(email) = &email {
            checks.email(email);
        }
        if let Some(name) = &input.name {
            checks.text("name", name, MAX_NAME);
        }
        if let Some(password) = &input.password {
            checks.password(password);
        }
        checks.done()?;
        let password_hash = match input.password {
            Some(p) => Some(self.hash_password(p).await?),
            None => None,
        };
        let patch = UserPatch {
            email,
            name: input.name.map(|n| n.trim().to_owned()),
            password_hash,
        };
        let stored = self.store.update_user(me, patch).await;
        self.write::<UserUpdated>(stored, "user").await
    }

    /// Deletes the caller's own account; publishes `user.deleted`.
    pub async fn delete_user(
        &self,
        principal: Option<&Principal>,
        id: &str,
    ) -> Result<Written<store::User>, DomainError> {
        let me = Self::actor(principal)?;
        if me != id {
            return Err(DomainError::Forbidden(
                "you may only delete your own account",
            ));
        }
        let stored = self.store.delete_user(me).await;
        self.write::<UserDeleted>(stored, "user").await
    }
}

#[cfg(test)]
mod tests {
    use super::{unknown_email_hash, valid_email};

    #[test]
    fn the_unknown_email_hash_matches_no_password_anyone_types() {
        use argon2::password_hash::{PasswordHash, PasswordVerifier};
        let hash = unknown_email_hash();
        let parsed = PasswordHash::new(&hash).expect("a well-formed argon2 hash");
        for guess in ["", "password", "correct horse battery staple"] {
            assert!(argon2::Argon2::default()
                .verify_password(guess.as_bytes(), &parsed)
                .is_err());
        }
        assert_ne!(hash, unknown_email_hash(), "a fresh secret each start");
    }

    #[test]
    fn emails_are_checked() {
        for ok in ["a@b.co", "first.last+tag@sub.example.org"] {
            assert!(valid_email(ok), "{ok}");
        }
        for bad in [
            "", "a", "a@b", "@b.co", "a@@b.co", "a b@c.de", "a@.b.co", "a@b.co.", "a@b..co",
        ] {
            assert!(!valid_email(bad), "{bad}");
        }
    }
}
