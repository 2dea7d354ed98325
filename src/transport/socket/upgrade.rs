//! A WebSocket upgrade request with the connection it came on, as the HTTP
//! server hands it over: the request head, the TCP stream, and any bytes
//! the client sent behind the head. The server's own buffers stay behind.

use std::net::SocketAddr;

use actix_codec::Framed;
use actix_http::{h1, Request, RequestHead};
use actix_web::body::MessageBody;
use actix_web::http::header;
use actix_web::web::BytesMut;
use actix_web::HttpResponse;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

/// An upgrade request and its connection.
pub struct Upgrade {
    request: Request,
    stream: TcpStream,
    /// What the client sent after the request head (a first frame, for a
    /// client in a hurry).
    read: BytesMut,
    /// Dropped when the connection ends.
    held: Held,
}

/// Held while a connection lives: the HTTP server waits for its drop.
pub struct Held(#[allow(dead_code)] oneshot::Sender<()>);

impl Upgrade {
    /// Takes the connection over from the HTTP server; the receiver
    /// resolves when the connection has ended.
    pub fn new(
        request: Request,
        framed: Framed<TcpStream, h1::Codec>,
    ) -> (Self, oneshot::Receiver<()>) {
        let parts = framed.into_parts();
        // The server's read buffer is sized for HTTP (8 KiB); keep only its
        // contents.
        let read = if parts.read_buf.is_empty() {
            BytesMut::new()
        } else {
            BytesMut::from(&parts.read_buf[..])
        };
        let (held, ended) = oneshot::channel();
        let upgrade = Self {
            request,
            stream: parts.io,
            read,
            held: Held(held),
        };
        (upgrade, ended)
    }

    pub fn head(&self) -> &RequestHead {
        self.request.head()
    }

    pub fn path(&self) -> &str {
        self.request.path()
    }

    /// The TCP peer.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.request.peer_addr()
    }

    /// Answers `response` instead of switching protocols, and closes the
    /// connection.
    pub async fn refuse(mut self, response: HttpResponse) {
        let (response, body) = response.into_parts();
        // Refusals are built in memory; a streamed body has no place here.
        let body = body.try_into_bytes().unwrap_or_default();
        let status = response.status();
        let mut head = format!(
            "HTTP/1.1 {} {}\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        )
        .into_bytes();
        for (name, value) in response.headers() {
            if name == header::CONTENT_LENGTH || name == header::CONNECTION {
                continue;
            }
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(
            format!(
                "content-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        head.extend_from_slice(&body);
        // A fresh connection's send buffer takes a response this small at
        // once; the bound is for a peer that never reads at all.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
            self.stream.write_all(&head).await?;
            self.stream.shutdown().await
        })
        .await;
    }

    /// Answers the handshake (`101 Switching Protocols`, naming
    /// `subprotocol` if given) and hands over the stream and the bytes
    /// already read; `None` when the client is gone.
    pub(super) async fn switch(
        mut self,
        subprotocol: Option<&'static str>,
    ) -> Option<(TcpStream, BytesMut, Held)> {
        // Present: the handshake was verified before anything was admitted.
        let key = self
            .request
            .head()
            .headers()
            .get(header::SEC_WEBSOCKET_KEY)?;
        let accept = actix_http::ws::hash_key(key.as_bytes());
        let mut response = Vec::with_capacity(160);
        response.extend_from_slice(
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-accept: ",
        );
        response.extend_from_slice(&accept);
        if let Some(protocol) = subprotocol {
            response.extend_from_slice(b"\r\nsec-websocket-protocol: ");
            response.extend_from_slice(protocol.as_bytes());
        }
        response.extend_from_slice(b"\r\n\r\n");
        let written = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            self.stream.write_all(&response),
        )
        .await;
        if !matches!(written, Ok(Ok(()))) {
            return None;
        }
        // The request head (a pooled buffer of the server's) goes now.
        drop(self.request);
        Some((self.stream, self.read, self.held))
    }
}
