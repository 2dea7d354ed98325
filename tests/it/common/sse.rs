//! An event-stream client as a browser's `EventSource` would be: it reads
//! the response body and splits it into blocks at blank lines, keeping the
//! fields and comments of each, and keeps the last event id as a browser
//! does (what it would send back as `Last-Event-ID`); every read is bounded
//! in time.

use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use serde_json::Value;

use super::gql::Reply;
use super::node::Node;

/// One block of the stream: what came before a blank line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Block {
    /// `name: value` lines, in order (the one space after the colon removed).
    pub fields: Vec<(String, String)>,
    /// `: text` lines, without the colon.
    pub comments: Vec<String>,
}

impl Block {
    /// The last value of field `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn event(&self) -> Option<&str> {
        self.get("event")
    }

    pub fn id(&self) -> Option<&str> {
        self.get("id")
    }

    /// The `data:` lines joined with `\n`, as `EventSource` joins them.
    pub fn data(&self) -> String {
        self.fields
            .iter()
            .filter(|(n, _)| n == "data")
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The data as JSON; panics with the block when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data())
            .unwrap_or_else(|e| panic!("the data of {self:?} is not JSON: {e}"))
    }

    /// Whether the block is only comments (a heartbeat).
    pub fn is_comment(&self) -> bool {
        self.fields.is_empty() && !self.comments.is_empty()
    }

    /// Whether an `EventSource` would fire an event for it: only when it
    /// has data (a block of only `id:` or `retry:` fires nothing).
    pub fn dispatches(&self) -> bool {
        self.fields.iter().any(|(name, _)| name == "data")
    }

    fn parse(text: &str) -> Block {
        let mut block = Block::default();
        for line in text.split('\n') {
            if let Some(comment) = line.strip_prefix(':') {
                block.comments.push(comment.trim_start().to_owned());
            } else if !line.is_empty() {
                let (name, value) = line.split_once(':').unwrap_or((line, ""));
                block.fields.push((
                    name.to_owned(),
                    value.strip_prefix(' ').unwrap_or(value).to_owned(),
                ));
            }
        }
        block
    }
}

/// What one bounded read of the stream gave.
#[derive(Debug)]
pub enum SseRead {
    Block(Block),
    /// Nothing complete arrived within the time given.
    TimedOut,
    /// The server ended the response (cleanly: the final chunk arrived).
    Ended,
    /// The connection broke.
    Failed(String),
}

/// An open event stream.
pub struct SseStream {
    pub status: StatusCode,
    pub headers: HeaderMap,
    response: reqwest::Response,
    buf: Vec<u8>,
    last_id: Option<String>,
}

/// A client without a total timeout (streams outlive any) or a proxy.
pub fn stream_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("build the HTTP client")
}

/// Opens `GET path` on `node` with `headers`; a status other than 200 is
/// `Err` with the whole (JSON) answer.
pub async fn open_stream(
    node: &Node,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<SseStream, Reply> {
    let mut request = stream_client()
        .get(node.http_url(path))
        .header("accept", "text/event-stream");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    SseStream::from_response(response).await
}

impl SseStream {
    /// Wraps a response: 200 is a stream, anything else `Err`.
    pub async fn from_response(response: reqwest::Response) -> Result<SseStream, Reply> {
        let status = response.status();
        let headers = response.headers().clone();
        if status != StatusCode::OK {
            let body = response.text().await.unwrap_or_default();
            return Err(Reply {
                status,
                headers,
                body,
            });
        }
        Ok(SseStream {
            status,
            headers,
            response,
            buf: Vec::new(),
            last_id: None,
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The last `id:` read, as a reconnecting `EventSource` would send it.
    pub fn last_id(&self) -> Option<&str> {
        self.last_id.as_deref()
    }

    /// The next block, within `timeout`.
    pub async fn read(&mut self, timeout: Duration) -> SseRead {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                let text = String::from_utf8(block).expect("the stream is UTF-8");
                let block = Block::parse(&text[..end]);
                if let Some(id) = block.id() {
                    self.last_id = Some(id.to_owned());
                }
                return SseRead::Block(block);
            }
            match tokio::time::timeout_at(deadline, self.response.chunk()).await {
                Err(_) => return SseRead::TimedOut,
                Ok(Ok(Some(chunk))) => self.buf.extend_from_slice(&chunk),
                Ok(Ok(None)) => return SseRead::Ended,
                Ok(Err(e)) => return SseRead::Failed(e.to_string()),
            }
        }
    }

    /// The next block an `EventSource` would fire an event for (heartbeats
    /// and `id:`-only blocks are skipped); panics when none arrives within
    /// `timeout`.
    pub async fn next_event(&mut self, timeout: Duration) -> Block {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read(left).await {
                SseRead::Block(block) if !block.dispatches() => continue,
                SseRead::Block(block) => return block,
                other => panic!("expected an event within {timeout:?}, got {other:?}"),
            }
        }
    }

    /// The next `n` events (heartbeats skipped), each within `timeout`.
    pub async fn events(&mut self, n: usize, timeout: Duration) -> Vec<Block> {
        let mut events = Vec::with_capacity(n);
        for _ in 0..n {
            events.push(self.next_event(timeout).await);
        }
        events
    }

    /// Reads until the server ends the stream; the blocks read meanwhile.
    /// Panics when it has not ended within `timeout`.
    pub async fn until_ended(&mut self, timeout: Duration) -> Vec<Block> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut blocks = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read(left).await {
                SseRead::Block(block) => blocks.push(block),
                SseRead::Ended => return blocks,
                other => panic!(
                    "expected the stream to end within {timeout:?}, got {other:?} after {blocks:?}"
                ),
            }
        }
    }
}
