//! Authentication: JWT verification, the [`Principal`], token minting, and
//! where a request's token comes from ([`credentials`]).
//!
//! Tokens are HS256 (`auth.jwt_secret`) or RS256
//! (`auth.jwt_public_key_file`); `exp` is required, `nbf` honoured, `iss` and
//! `aud` checked when configured. `alg: none` and every algorithm other than
//! the configured one are refused. Tokens never reach a log line: errors
//! carry a reason, never the token.

pub mod credentials;
pub mod policy;

use std::collections::HashSet;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::Settings;

pub use self::credentials::{verifier, Verify};

/// Who is making a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The `sub` claim.
    pub user_id: String,
    /// The granted scopes: the `scope` and `scp` claims, each either an
    /// OAuth 2 space-separated string or a JSON array of strings.
    pub scopes: Vec<String>,
    /// When the token stops counting (its `exp` plus `auth.leeway_seconds`),
    /// in seconds since the Unix epoch; `None` for a principal no token
    /// bounds. A connection authenticated by the token ends then.
    pub expires_at: Option<u64>,
}

impl Principal {
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }

    /// How long the principal still counts; `None` when no token bounds it.
    pub fn remaining(&self) -> Option<std::time::Duration> {
        let expires_at = self.expires_at?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Some(std::time::Duration::from_secs(expires_at).saturating_sub(now))
    }

    /// Whether the token that made this principal has expired.
    pub fn is_expired(&self) -> bool {
        self.remaining().is_some_and(|left| left.is_zero())
    }
}

/// The claims a token is read for; `nbf`, `iss` and `aud` are checked by
/// the validation itself and not kept.
#[derive(Debug, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    pub scope: Option<ScopeClaim>,
    /// The same as `scope`, under the name some identity providers use.
    pub scp: Option<ScopeClaim>,
}

/// A scope claim as identity providers write it: the OAuth 2
/// space-separated string (`"publish read"`, RFC 8693) or a JSON array
/// (`["publish", "read"]`). Anything else makes the token malformed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ScopeClaim {
    Text(String),
    List(Vec<String>),
}

impl ScopeClaim {
    /// The scopes named, in order; an array's items are split on spaces
    /// too, so both spellings grant the same.
    pub fn scopes(&self) -> impl Iterator<Item = &str> {
        let items: &[String] = match self {
            ScopeClaim::Text(text) => std::slice::from_ref(text),
            ScopeClaim::List(list) => list,
        };
        items.iter().flat_map(|item| item.split_whitespace())
    }
}

/// Why a token was refused; the message is safe to show and to log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("the token is malformed")]
    Malformed,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token signature or algorithm is not accepted")]
    BadSignature,
    #[error("the token issuer or audience is not accepted")]
    BadClaims,
    #[error("tokens cannot be minted: no HS256 secret is configured")]
    CannotMint,
}

/// Verifies (and, with a secret, mints) tokens.
pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
    encoding: Option<EncodingKey>,
    issuer: Option<String>,
    audience: Option<String>,
}

impl Authenticator {
    /// Builds the verifier from validated settings.
    pub fn from_settings(settings: &Settings) -> Result<Self, crate::config::ConfigError> {
        let auth = &settings.auth;
        let (key, algorithm) = if let Some(path) = &auth.jwt_public_key_file {
            let pem = std::fs::read(path).map_err(|e| crate::config::ConfigError {
                key: "auth.jwt_public_key_file".into(),
                message: e.to_string(),
            })?;
            let key = DecodingKey::from_rsa_pem(&pem).map_err(|e| crate::config::ConfigError {
                key: "auth.jwt_public_key_file".into(),
                message: e.to_string(),
            })?;
            (key, Algorithm::RS256)
        } else {
            let secret =
                settings
                    .effective_jwt_secret()
                    .ok_or_else(|| crate::config::ConfigError {
                        key: "auth.jwt_secret".into(),
                        message: "no secret configured".into(),
                    })?;
            (
                DecodingKey::from_secret(secret.as_bytes()),
                Algorithm::HS256,
            )
        };
        // Minting uses the HS256 secret only; an RS256 node verifies only.
        let encoding = if algorithm == Algorithm::HS256 {
            settings
                .effective_jwt_secret()
                .map(|s| EncodingKey::from_secret(s.as_bytes()))
        } else {
            None
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = auth.leeway_seconds;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.required_spec_claims = HashSet::from(["exp".to_owned(), "sub".to_owned()]);
        match &auth.issuer {
            Some(iss) => validation.set_issuer(&[iss]),
            None => validation.iss = None,
        }
        match &auth.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        Ok(Self {
            key,
            validation,
            encoding,
            issuer: auth.issuer.clone(),
            audience: auth.audience.clone(),
        })
    }

    /// Verifies `token` and returns who it speaks for.
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        let token = token.trim();
        if token.is_empty() || token.len() > 8192 {
            return Err(AuthError::Malformed);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidSignature
                | ErrorKind::InvalidAlgorithm
                | ErrorKind::InvalidAlgorithmName => AuthError::BadSignature,
                ErrorKind::InvalidIssuer
                | ErrorKind::InvalidAudience
                | ErrorKind::InvalidSubject => AuthError::BadClaims,
                ErrorKind::MissingRequiredClaim(_) => AuthError::Malformed,
                _ => AuthError::Malformed,
            },
        )?;
        let claims = data.claims;
        if claims.sub.is_empty() {
            return Err(AuthError::Malformed);
        }
        let mut scopes: Vec<String> = Vec::new();
        for claim in [&claims.scope, &claims.scp].into_iter().flatten() {
            for scope in claim.scopes() {
                if !scopes.iter().any(|s| s == scope) {
                    scopes.push(scope.to_owned());
                }
            }
        }
        Ok(Principal {
            expires_at: Some(claims.exp.saturating_add(self.validation.leeway)),
            user_id: claims.sub,
            scopes,
        })
    }

    /// Mints an HS256 token for `sub`, valid for `ttl`.
    pub fn mint(
        &self,
        sub: &str,
        ttl: std::time::Duration,
        scope: Option<&str>,
    ) -> Result<String, AuthError> {
        let key = self.encoding.as_ref().ok_or(AuthError::CannotMint)?;
        let now = crate::event::now_ms() / 1000;
        let mut claims = serde_json::json!({
            "sub": sub,
            "exp": now + ttl.as_secs().max(1),
            "iat": now,
        });
        for (name, value) in [
            ("iss", self.issuer.as_deref()),
            ("aud", self.audience.as_deref()),
            ("scope", scope),
        ] {
            if let Some(value) = value {
                claims[name] = value.into();
            }
        }
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, key)
            .map_err(|_| AuthError::CannotMint)
    }
}

/// The token in an `Authorization: Bearer T` header value.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn auth_with(vars: &[(&str, &str)]) -> Authenticator {
        let dir = std::env::temp_dir().join("subgate-auth-test-empty");
        let mut all = vec![(
            "SUBGATE__AUTH__JWT_SECRET".to_string(),
            "test-secret".to_string(),
        )];
        all.extend(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let settings = Settings::load_from(&dir, None, all).unwrap();
        Authenticator::from_settings(&settings).unwrap()
    }

    fn sign(claims: serde_json::Value, secret: &str, alg: Algorithm) -> String {
        jsonwebtoken::encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn now() -> u64 {
        crate::event::now_ms() / 1000
    }

    #[test]
    fn a_minted_token_verifies() {
        let auth = auth_with(&[]);
        let token = auth
            .mint(
                "u1",
                std::time::Duration::from_secs(60),
                Some("publish read"),
            )
            .unwrap();
        let p = auth.verify(&token).unwrap();
        assert_eq!(p.user_id, "u1");
        assert!(p.has_scope("publish"));
    }

    #[test]
    fn expired_not_yet_valid_and_missing_exp_are_refused() {
        let auth = auth_with(&[]);
        let expired = sign(
            serde_json::json!({"sub": "u", "exp": now() - 100}),
            "test-secret",
            Algorithm::HS256,
        );
        assert_eq!(auth.verify(&expired), Err(AuthError::Expired));
        let early = sign(
            serde_json::json!({"sub": "u", "exp": now() + 100, "nbf": now() + 50}),
            "test-secret",
            Algorithm::HS256,
        );
        assert_eq!(auth.verify(&early), Err(AuthError::NotYetValid));
        let no_exp = sign(
            serde_json::json!({"sub": "u"}),
            "test-secret",
            Algorithm::HS256,
        );
        assert_eq!(auth.verify(&no_exp), Err(AuthError::Malformed));
    }

    #[test]
    fn tampered_wrong_key_wrong_alg_and_none_are_refused() {
        let auth = auth_with(&[]);
        let good = sign(
            serde_json::json!({"sub": "u", "exp": now() + 100}),
            "test-secret",
            Algorithm::HS256,
        );
        let wrong_key = sign(
            serde_json::json!({"sub": "u", "exp": now() + 100}),
            "other",
            Algorithm::HS256,
        );
        assert_eq!(auth.verify(&wrong_key), Err(AuthError::BadSignature));
        let hs512 = sign(
            serde_json::json!({"sub": "u", "exp": now() + 100}),
            "test-secret",
            Algorithm::HS512,
        );
        assert_eq!(auth.verify(&hs512), Err(AuthError::BadSignature));
        // Swap the payload for another user's, keeping the signature.
        let parts: Vec<&str> = good.split('.').collect();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let forged =
            b64.encode(serde_json::json!({"sub": "admin", "exp": now() + 100}).to_string());
        let tampered = format!("{}.{}.{}", parts[0], forged, parts[2]);
        assert_eq!(auth.verify(&tampered), Err(AuthError::BadSignature));
        let none_header = b64.encode(r#"{"alg":"none","typ":"JWT"}"#);
        let none = format!("{none_header}.{}.", parts[1]);
        assert!(auth.verify(&none).is_err());
        assert_eq!(auth.verify("garbage"), Err(AuthError::Malformed));
    }

    #[test]
    fn issuer_and_audience_are_checked_when_configured() {
        let auth = auth_with(&[
            ("SUBGATE__AUTH__ISSUER", "https://id.example"),
            ("SUBGATE__AUTH__AUDIENCE", "subgate"),
        ]);
        let ok = sign(
            serde_json::json!({"sub": "u", "exp": now() + 100, "iss": "https://id.example", "aud": "subgate"}),
            "test-secret",
            Algorithm::HS256,
        );
        assert!(auth.verify(&ok).is_ok());
        let wrong_iss = sign(
            serde_json::json!({"sub": "u", "exp": now() + 100, "iss": "https://evil.example", "aud": "subgate"}),
            "test-secret",
            Algorithm::HS256,
        );
        assert_eq!(auth.verify(&wrong_iss), Err(AuthError::BadClaims));
        let wrong_aud = sign(
            serde_json::json!({"sub": "u", "exp": now() + 100, "iss": "https://id.example", "aud": "other"}),
            "test-secret",
            Algorithm::HS256,
        );
        assert_eq!(auth.verify(&wrong_aud), Err(AuthError::BadClaims));
    }

    #[test]
    fn rs256_tokens_verify_with_the_public_key_and_hs256_ones_do_not() {
        let dir = std::env::temp_dir().join("subgate-auth-test-empty");
        let key = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src/auth/testdata/rs256-test-public.pem"
        );
        let settings = Settings::load_from(
            &dir,
            None,
            vec![(
                "SUBGATE__AUTH__JWT_PUBLIC_KEY_FILE".to_string(),
                key.to_string(),
            )],
        )
        .unwrap();
        let auth = Authenticator::from_settings(&settings).unwrap();
        let private = include_bytes!("testdata/rs256-test-private.pem");
        let claims = serde_json::json!({"sub": "u1", "exp": now() + 100});
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::RS256),
            &claims,
            &EncodingKey::from_rsa_pem(private).unwrap(),
        )
        .unwrap();
        assert_eq!(auth.verify(&token).unwrap().user_id, "u1");
        // An HS256 token signed with the public key's bytes (the classic
        // algorithm-confusion forgery) is refused.
        let forged = sign(
            claims,
            &std::fs::read_to_string(key).unwrap(),
            Algorithm::HS256,
        );
        assert_eq!(auth.verify(&forged), Err(AuthError::BadSignature));
        // An RS256 node cannot mint.
        assert_eq!(
            auth.mint("u1", std::time::Duration::from_secs(60), None),
            Err(AuthError::CannotMint)
        );
    }

    #[test]
    fn scopes_are_read_from_a_string_or_an_array_under_scope_or_scp() {
        let auth = auth_with(&[]);
        let scopes_of = |extra: serde_json::Value| {
            let mut claims = serde_json::json!({"sub": "u", "exp": now() + 100});
            claims
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            auth.verify(&sign(claims, "test-secret", Algorithm::HS256))
                .map(|p| p.scopes)
        };
        let both = vec!["publish".to_owned(), "read".to_owned()];
        use serde_json::json;
        assert_eq!(
            scopes_of(json!({"scope": "publish  read"})),
            Ok(both.clone())
        );
        assert_eq!(
            scopes_of(json!({"scope": ["publish", "read"]})),
            Ok(both.clone())
        );
        assert_eq!(
            scopes_of(json!({"scp": ["publish", "read"]})),
            Ok(both.clone())
        );
        assert_eq!(scopes_of(json!({"scp": "publish read"})), Ok(both.clone()));
        assert_eq!(
            scopes_of(json!({"scope": "read", "scp": ["publish", "read"]})),
            Ok(vec!["read".to_owned(), "publish".to_owned()]),
            "both claims count, each scope once"
        );
        assert_eq!(scopes_of(json!({"scope": []})), Ok(vec![]));
        assert_eq!(scopes_of(json!({})), Ok(vec![]));
        // Neither a string nor an array of strings: refused, not ignored.
        assert_eq!(scopes_of(json!({"scope": 7})), Err(AuthError::Malformed));
        assert_eq!(
            scopes_of(json!({"scope": ["publish", 7]})),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            scopes_of(json!({"scp": {"publish": true}})),
            Err(AuthError::Malformed)
        );
    }

    #[test]
    fn bearer_headers_parse() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
    }
}
