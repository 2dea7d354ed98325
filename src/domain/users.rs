//! Users: sign-up, login, profile updates, account deletion.

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

/// Hashes off the async threads: argon2 is deliberately slow.
async fn hash_password(password: String) -> Result<String, DomainError> {
    tokio::task::spawn_blocking(move || {
        use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
        let salt = SaltString::generate(&mut OsRng);
        argon2::Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
    })
    .await
    .ok()
    .and_then(Result::ok)
    .ok_or_else(|| DomainError::Internal("the password could not be hashed".into()))
}

async fn verify_password(password: String, hash: String) -> bool {
    tokio::task::spawn_blocking(move || {
        use argon2::password_hash::{PasswordHash, PasswordVerifier};
        PasswordHash::new(&hash)
            .map(|parsed| {
                argon2::Argon2::default()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok()
            })
            .unwrap_or(false)
    })
    .await
    .unwrap_or(false)
}

impl Domain {
    /// Signs a user up.
    pub async fn create_user(&self, input: SignUp) -> Result<store::User, DomainError> {
        let email = input.email.trim().to_owned();
        let mut checks = Checks::default();
        checks.email(&email);
        checks.text("name", &input.name, MAX_NAME);
        checks.password(&input.password);
        checks.done()?;
        let password_hash = hash_password(input.password).await?;
        let new = NewUser {
            email,
            name: input.name.trim().to_owned(),
            password_hash,
        };
        self.store.create_user(new).await.for_input("email", "user")
    }

    /// Exchanges an email and password for a bearer token. A wrong email
    /// and a wrong password are the same refusal, in the same time.
    pub async fn login(&self, email: &str, password: String) -> Result<Session, DomainError> {
        let user = match self.store.find_user_by_email(email.trim()).await {
            Ok(Some(user)) => user,
            Ok(None) => {
                // Same cost as a real check, so timing does not reveal which emails exist.
                let _ = hash_password(password).await;
                return Err(DomainError::WrongCredentials);
            }
            Err(e) => return Err(DomainError::store(e, "email", "user")),
        };
        if !verify_password(password, user.password_hash.clone()).await {
            return Err(DomainError::WrongCredentials);
        }
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
            Some(p) => Some(hash_password(p).await?),
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
    use super::valid_email;

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
