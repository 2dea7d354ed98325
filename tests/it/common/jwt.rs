//! Tokens, good and bad, signed here with the secret the node is given,
//! plus `subgate token` itself.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use super::node::{run_cli, Node};

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs() as i64
}

/// Signs `claims` with `secret` under `alg` (an HMAC algorithm).
pub fn sign(alg: Algorithm, claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign a token")
}

/// A valid HS256 token for `sub`, one hour long.
pub fn token(secret: &str, sub: &str) -> String {
    sign(
        Algorithm::HS256,
        &json!({ "sub": sub, "exp": now() + 3600, "iat": now() }),
        secret,
    )
}

/// A valid HS256 token for `sub` whose `scope` claim is `scope`.
pub fn scoped_token(secret: &str, sub: &str, scope: &str) -> String {
    sign(
        Algorithm::HS256,
        &json!({ "sub": sub, "exp": now() + 3600, "iat": now(), "scope": scope }),
        secret,
    )
}

/// Every way a token can be wrong that the node must refuse, by name.
/// Each is otherwise a perfectly good token for `sub`.
pub fn bad_tokens(secret: &str, sub: &str) -> Vec<(&'static str, String)> {
    let good = token(secret, sub);
    let parts: Vec<&str> = good.split('.').collect();
    // Another user's claims under the original signature.
    let forged_claims =
        URL_SAFE_NO_PAD.encode(json!({ "sub": "admin", "exp": now() + 3600 }).to_string());
    let none_header = URL_SAFE_NO_PAD.encode(json!({ "alg": "none", "typ": "JWT" }).to_string());
    vec![
        (
            "expired",
            sign(
                Algorithm::HS256,
                &json!({ "sub": sub, "exp": now() - 3600 }),
                secret,
            ),
        ),
        (
            "not yet valid",
            sign(
                Algorithm::HS256,
                &json!({ "sub": sub, "exp": now() + 7200, "nbf": now() + 3600 }),
                secret,
            ),
        ),
        (
            "wrong secret",
            token("an-entirely-different-secret-of-some-length", sub),
        ),
        (
            "tampered payload",
            format!("{}.{forged_claims}.{}", parts[0], parts[2]),
        ),
        ("alg none", format!("{none_header}.{}.", parts[1])),
        (
            "HS512",
            sign(
                Algorithm::HS512,
                &json!({ "sub": sub, "exp": now() + 3600 }),
                secret,
            ),
        ),
        (
            "no exp",
            sign(Algorithm::HS256, &json!({ "sub": sub }), secret),
        ),
        ("garbage", "not-a-jwt".to_owned()),
    ]
}

/// The claims of a token, decoded without verification (to inspect what
/// `subgate token` minted).
pub fn claims(token: &str) -> Value {
    let payload = token
        .split('.')
        .nth(1)
        .unwrap_or_else(|| panic!("{token:?} is not a JWT"));
    let bytes = URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap_or_else(|e| panic!("{token:?}: bad base64 payload: {e}"));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{token:?}: payload is not JSON: {e}"))
}

/// Runs `subgate token ARGS` with the node's environment and working
/// directory; returns the printed token.
pub fn cli_token(node: &Node, args: &[&str]) -> String {
    let mut full = vec!["token"];
    full.extend_from_slice(args);
    let out = run_cli(
        &full,
        &node.env(),
        node.dir(),
        std::time::Duration::from_secs(20),
    );
    assert!(
        out.status.success(),
        "`subgate {}` failed: {:?}\nstderr:\n{}",
        full.join(" "),
        out.status,
        out.stderr
    );
    out.stdout.trim().to_owned()
}
