//! What HTTP handlers read from a request before deciding anything: whether
//! it is a WebSocket upgrade, its media type, and its body within a limit.

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest};
use futures_util::StreamExt;

/// Whether the request asks for a WebSocket (`Upgrade: websocket`).
pub fn is_websocket_upgrade(headers: &header::HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Why a request body was not read; its message is the GraphQL endpoints'.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    /// Over this many bytes.
    #[error("the request body exceeds {0} bytes")]
    TooLarge(usize),
    /// The connection failed mid-body.
    #[error("the request body could not be read")]
    Unreadable,
}

impl BodyError {
    /// 413 for a body over the limit, 400 for one that broke off.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            BodyError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::Unreadable => StatusCode::BAD_REQUEST,
        }
    }
}

/// Reads the whole body, refusing it as soon as it passes `limit` bytes
/// (so an oversized body is never buffered whole).
pub(crate) async fn read_body(
    payload: &mut web::Payload,
    limit: usize,
) -> Result<web::BytesMut, BodyError> {
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|_| BodyError::Unreadable)?;
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The media type of a request's `Content-Type`, lowercased, without parameters.
pub(crate) fn media_type(req: &HttpRequest) -> String {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    bare_media_type(content_type)
}

/// The media type of `value` (a `Content-Type`, or one range of an
/// `Accept`), lowercased, without parameters.
pub(crate) fn bare_media_type(value: &str) -> String {
    value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}
