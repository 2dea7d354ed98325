//! The mark every published event carries, and finding it in a frame.
//!
//! A mark is one plain token, `lgm1_{run}_{kind}_{topic}_{seq}_{sent_us}`,
//! made of letters, digits and `_` only, so it survives every encoding on
//! the way (a post's `content` string inside a GraphQL result inside a
//! WebSocket frame, an event payload inside an SSE `data:` line) without
//! escaping, and a subscriber finds it by a scan of the raw frame instead
//! of decoding every message into a tree: at hundreds of thousands of
//! deliveries a second the load generator must cost far less than the
//! server it measures.

use std::time::{SystemTime, UNIX_EPOCH};

const PREFIX: &str = "lgm1_";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Published until every subscriber has seen one: the subscription is
    /// live end to end. Not measured.
    Warmup,
    /// Published in the measured phase: counted for latency, loss and
    /// duplicates.
    Measured,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark<'a> {
    pub run: &'a str,
    pub kind: Kind,
    pub topic: usize,
    pub seq: u64,
    pub sent_us: u64,
}

/// Microseconds since the Unix epoch: publisher and subscribers share the
/// machine's clock (or the host's, in containers).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The mark of one event, stamped with the time now.
pub fn make(run: &str, kind: Kind, topic: usize, seq: u64) -> String {
    let k = match kind {
        Kind::Warmup => 'w',
        Kind::Measured => 'm',
    };
    format!("{PREFIX}{run}_{k}_{topic}_{seq}_{}", now_us())
}

/// A run id: letters and digits only, unique enough across runs.
pub fn new_run_id() -> String {
    format!("{:x}", now_us() ^ (u64::from(std::process::id()) << 40))
}

/// Finds the first mark of `run` in `frame` (marks of other runs on the
/// same topics are skipped).
pub fn find<'a>(frame: &'a str, run: &str) -> Option<Mark<'a>> {
    let mut rest = frame;
    while let Some(at) = rest.find(PREFIX) {
        let token_start = &rest[at + PREFIX.len()..];
        let len = token_start
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(token_start.len());
        if let Some(mark) = parse(&token_start[..len]) {
            if mark.run == run {
                return Some(mark);
            }
        }
        rest = &token_start[len..];
    }
    None
}

fn parse(token: &str) -> Option<Mark<'_>> {
    let mut parts = token.split('_');
    let run = parts.next()?;
    let kind = match parts.next()? {
        "w" => Kind::Warmup,
        "m" => Kind::Measured,
        _ => return None,
    };
    let topic = parts.next()?.parse().ok()?;
    let seq = parts.next()?.parse().ok()?;
    let sent_us = parts.next()?.parse().ok()?;
    if parts.next().is_some() || run.is_empty() {
        return None;
    }
    Some(Mark {
        run,
        kind,
        topic,
        seq,
        sent_us,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_is_found_through_any_encoding() {
        let mark = make("abc1", Kind::Measured, 3, 42);
        let post = serde_json::json!({"content": mark}).to_string();
        let frame =
            serde_json::json!({"type":"next","payload":{"data":{"postCreated":post}}}).to_string();
        let found = find(&frame, "abc1").unwrap();
        assert_eq!(
            (found.kind, found.topic, found.seq),
            (Kind::Measured, 3, 42)
        );
        assert!(found.sent_us > 0);
        let sse = format!("event: x\nid: a:1\ndata: {post}\n\n");
        assert_eq!(find(&sse, "abc1").unwrap().seq, 42);
    }

    #[test]
    fn other_runs_and_broken_marks_are_skipped() {
        let other = make("zzz", Kind::Measured, 0, 1);
        let ours = make("abc1", Kind::Warmup, 0, 7);
        let frame = format!("{other} lgm1_abc1_q_0_1_2 lgm1_abc1_m_x {ours}");
        let found = find(&frame, "abc1").unwrap();
        assert_eq!((found.kind, found.seq), (Kind::Warmup, 7));
        assert!(find("nothing here", "abc1").is_none());
        assert!(find("lgm1_", "abc1").is_none());
    }
}
