//! Where a token comes from, and what checks it: the `Authorization: Bearer`
//! header, the `?token=` query parameter (browsers cannot set headers on a
//! WebSocket or an `EventSource`), a `connection_init` payload, and the
//! [`Verify`] closure the socket protocols check a token with.
//!
//! Every error here is a message safe to show the client: it says what is
//! wrong with the credential, never what the credential was.

use std::sync::Arc;

use actix_web::http::header::{self, HeaderMap};
use actix_web::web;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::{bearer, AuthError, Authenticator, Principal};

/// Why a credential was refused; its text is safe to show the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// The token itself did not verify.
    #[error(transparent)]
    Token(#[from] AuthError),
    #[error("the Authorization header is not text")]
    HeaderNotText,
    #[error("the Authorization header must be `Bearer <token>`")]
    HeaderNotBearer,
    #[error("the query string is malformed")]
    MalformedQuery,
    #[error("authorization must be a string")]
    InitNotString,
    #[error("authorization must be `Bearer <token>`")]
    InitNotBearer,
    #[error("token must be a non-empty string")]
    InitBadToken,
}

/// Verifies a token a client sent after connecting (a `connection_init`
/// payload, an `auth` message); the error is safe to show to the client.
pub type Verify = Arc<dyn Fn(&str) -> Result<Principal, CredentialError> + Send + Sync>;

/// The node's verifier as a [`Verify`].
pub fn verifier(auth: Arc<Authenticator>) -> Verify {
    Arc::new(move |token| Ok(auth.verify(token)?))
}

impl Authenticator {
    /// Who `token` speaks for: `None` without a token, `Err` when it does
    /// not verify.
    pub fn principal(&self, token: Option<&str>) -> Result<Option<Principal>, CredentialError> {
        Ok(token.map(|token| self.verify(token)).transpose()?)
    }

    /// Who an `Authorization: Bearer` header speaks for.
    pub fn from_header(&self, headers: &HeaderMap) -> Result<Option<Principal>, CredentialError> {
        self.principal(header_token(headers)?)
    }

    /// Who a long-lived request speaks for: the `Authorization` header when
    /// it has one, else `query_token` (its `?token=`).
    pub fn from_header_or_query(
        &self,
        headers: &HeaderMap,
        query_token: Option<&str>,
    ) -> Result<Option<Principal>, CredentialError> {
        if headers.contains_key(header::AUTHORIZATION) {
            return self.from_header(headers);
        }
        self.principal(query_token)
    }

    /// [`Self::from_header_or_query`] with the token read from
    /// `query_string` (only when no header is there); an unreadable query
    /// string is an `Err`.
    pub fn from_header_or_query_string(
        &self,
        headers: &HeaderMap,
        query_string: &str,
    ) -> Result<Option<Principal>, CredentialError> {
        if headers.contains_key(header::AUTHORIZATION) {
            return self.from_header(headers);
        }
        self.principal(query_token(query_string)?.as_deref())
    }
}

/// The token of an `Authorization: Bearer T` header; `Err` when the header
/// is there but is not one.
pub fn header_token(headers: &HeaderMap) -> Result<Option<&str>, CredentialError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.to_str().map_err(|_| CredentialError::HeaderNotText)?;
    bearer(value)
        .map(Some)
        .ok_or(CredentialError::HeaderNotBearer)
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// The `token` parameter of a query string (empty counts as none); `Err`
/// when the query string cannot be read.
pub fn query_token(query_string: &str) -> Result<Option<String>, CredentialError> {
    let query = web::Query::<TokenQuery>::from_query(query_string)
        .map_err(|_| CredentialError::MalformedQuery)?;
    Ok(query.into_inner().token.filter(|t| !t.is_empty()))
}

/// The token a `connection_init` payload carries: `{"authorization":
/// "Bearer T"}` (the key in any case, as clients copy header names) or
/// `{"token": "T"}`. `Err` when one is present but unusable.
pub fn init_token(payload: Option<&Map<String, Value>>) -> Result<Option<&str>, CredentialError> {
    let Some(payload) = payload else {
        return Ok(None);
    };
    if let Some((_, value)) = payload
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
    {
        let value = value.as_str().ok_or(CredentialError::InitNotString)?;
        return bearer(value)
            .map(Some)
            .ok_or(CredentialError::InitNotBearer);
    }
    match payload.get("token") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(t)) if !t.trim().is_empty() => Ok(Some(t)),
        Some(_) => Err(CredentialError::InitBadToken),
    }
}

/// A verifier that knows one token, `good`, for user `u1`: for the protocol
/// machines' unit tests.
#[cfg(test)]
pub fn test_verify() -> Verify {
    Arc::new(|token| match token {
        "good" => Ok(Principal {
            user_id: "u1".into(),
            scopes: vec![],
            expires_at: None,
        }),
        _ => Err(AuthError::Malformed.into()),
    })
}

#[cfg(test)]
mod tests {
    use actix_web::http::header::HeaderValue;
    use serde_json::json;

    use super::*;

    #[test]
    fn init_tokens_are_read_from_either_key() {
        let map = |v: Value| v.as_object().unwrap().clone();
        assert_eq!(init_token(None), Ok(None));
        assert_eq!(init_token(Some(&map(json!({})))), Ok(None));
        assert_eq!(
            init_token(Some(&map(json!({"authorization": "Bearer t"})))),
            Ok(Some("t"))
        );
        assert_eq!(
            init_token(Some(&map(json!({"AUTHORIZATION": "bearer t"})))),
            Ok(Some("t"))
        );
        assert_eq!(init_token(Some(&map(json!({"token": "t"})))), Ok(Some("t")));
        assert_eq!(init_token(Some(&map(json!({"token": null})))), Ok(None));
        assert!(init_token(Some(&map(json!({"authorization": "t"})))).is_err());
        assert!(init_token(Some(&map(json!({"token": 1})))).is_err());
    }

    #[test]
    fn the_header_comes_before_the_query() {
        let mut headers = HeaderMap::new();
        assert_eq!(header_token(&headers), Ok(None));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer h"));
        assert_eq!(header_token(&headers), Ok(Some("h")));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic h"));
        assert!(header_token(&headers).is_err());
        assert_eq!(query_token("token=q&x=1"), Ok(Some("q".into())));
        assert_eq!(query_token("token="), Ok(None));
        assert_eq!(query_token(""), Ok(None));
    }
}
