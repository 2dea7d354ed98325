//! What HTTP handlers read from a request before deciding anything: whether
//! it is a WebSocket upgrade, its media type, its body within a limit, and
//! which client address it comes from.

use std::net::IpAddr;

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

/// The address of the client that made `req`: the TCP peer, unless the
/// peer is one of `trusted` proxies, in which case `X-Forwarded-For` is read
/// from the right (each proxy appends the address it received from) and
/// the first address that is not a trusted proxy is the client. A header
/// that does not parse is ignored: the peer stands. Only a trusted proxy's
/// header is believed, so a client cannot pick the address its rate limits
/// are counted under.
pub fn client_ip(req: &HttpRequest, trusted: &[ipnet::IpNet]) -> Option<IpAddr> {
    let peer = req.peer_addr()?.ip();
    Some(client_behind(peer, req.headers(), trusted))
}

/// [`client_of`] for a request known by its `peer` and `headers` (a
/// WebSocket upgrade, which the HTTP application never sees).
pub fn client_from(
    peer: Option<std::net::SocketAddr>,
    headers: &header::HeaderMap,
    settings: &crate::config::Settings,
) -> Option<IpAddr> {
    let trusted = settings.trusted_proxies();
    Some(client_behind(peer?.ip(), headers, &trusted))
}

/// [`client_ip`] with the node's `server.trusted_proxies`.
pub fn client_of(req: &HttpRequest, settings: &crate::config::Settings) -> Option<IpAddr> {
    let trusted = settings.trusted_proxies();
    client_ip(req, &trusted)
}

fn client_behind(peer: IpAddr, headers: &header::HeaderMap, trusted: &[ipnet::IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    // Every X-Forwarded-For header, in order, as one list.
    let mut hops = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        let Ok(value) = value.to_str() else {
            return peer;
        };
        for hop in value.split(',') {
            match hop.trim().parse::<IpAddr>() {
                Ok(ip) => hops.push(ip),
                Err(_) => return peer,
            }
        }
    }
    let mut client = peer;
    for hop in hops.into_iter().rev() {
        client = hop;
        if !is_trusted(&hop) {
            break;
        }
    }
    client
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

#[cfg(test)]
mod tests {
    use super::*;

    fn behind(peer: &str, forwarded: &[&str], trusted: &[&str]) -> String {
        let mut headers = header::HeaderMap::new();
        for value in forwarded {
            headers.append(
                header::HeaderName::from_static("x-forwarded-for"),
                header::HeaderValue::from_str(value).unwrap(),
            );
        }
        let trusted: Vec<ipnet::IpNet> = trusted.iter().map(|t| t.parse().unwrap()).collect();
        client_behind(peer.parse().unwrap(), &headers, &trusted).to_string()
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        // Nothing trusted (the default): the header changes nothing.
        assert_eq!(
            behind("198.51.100.9", &["203.0.113.5"], &[]),
            "198.51.100.9"
        );
        // From a proxy that is not trusted: the same.
        assert_eq!(
            behind("198.51.100.9", &["203.0.113.5"], &["10.0.0.0/8"]),
            "198.51.100.9"
        );
        // Through a trusted proxy: the address it received from.
        assert_eq!(
            behind("10.0.0.2", &["203.0.113.5"], &["10.0.0.0/8"]),
            "203.0.113.5"
        );
        // A client's own forged entries sit left of what the proxies
        // appended and are never reached.
        assert_eq!(
            behind(
                "10.0.0.2",
                &["1.2.3.4, 203.0.113.5", "10.0.0.7"],
                &["10.0.0.0/8"]
            ),
            "203.0.113.5"
        );
        // Only trusted hops: the farthest one.
        assert_eq!(
            behind("10.0.0.2", &["10.0.0.3"], &["10.0.0.0/8"]),
            "10.0.0.3"
        );
        // No header, or one that does not parse: the peer.
        assert_eq!(behind("10.0.0.2", &[], &["10.0.0.0/8"]), "10.0.0.2");
        assert_eq!(
            behind("10.0.0.2", &["203.0.113.5, junk"], &["10.0.0.0/8"]),
            "10.0.0.2"
        );
    }
}
