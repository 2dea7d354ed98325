//! Frames from the client: a guard that refuses an oversized frame from its
//! header, before its payload is buffered, and the [`Assembler`] that joins
//! a fragmented message within the same limit.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use actix_http::error::PayloadError;
use actix_web::web::{self, Bytes, BytesMut};
use actix_web::{dev, FromRequest, HttpRequest};
use actix_ws::Item;
use bytestring::ByteString;
use futures_util::stream::Stream;

/// Wraps the request body so that a frame whose header announces more than
/// `max_frame_bytes` fails the stream at once. The frame decoder alone would
/// report it only after buffering the whole payload, however large.
pub async fn guard_frames(
    req: &HttpRequest,
    body: web::Payload,
    max_frame_bytes: usize,
) -> Result<(web::Payload, Arc<AtomicBool>), actix_web::Error> {
    let oversized = Arc::new(AtomicBool::new(false));
    let guard = FrameGuard {
        inner: body.into_inner(),
        scan: FrameScan::new(max_frame_bytes as u64),
        oversized: oversized.clone(),
        failed: false,
    };
    let boxed: actix_http::BoxedPayloadStream = Box::pin(guard);
    let mut payload = dev::Payload::from(boxed);
    // Extracting a `Payload` only moves it out; it does not fail in practice.
    let body = web::Payload::from_request(req, &mut payload).await?;
    Ok((body, oversized))
}

struct FrameGuard {
    inner: dev::Payload,
    scan: FrameScan,
    oversized: Arc<AtomicBool>,
    failed: bool,
}

impl Stream for FrameGuard {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.failed {
            return Poll::Ready(None);
        }
        match ready!(Pin::new(&mut self.inner).poll_next(cx)) {
            Some(Ok(bytes)) => {
                if self.scan.feed(&bytes) {
                    Poll::Ready(Some(Ok(bytes)))
                } else {
                    self.failed = true;
                    self.oversized.store(true, Ordering::Relaxed);
                    Poll::Ready(Some(Err(PayloadError::Overflow)))
                }
            }
            other => Poll::Ready(other),
        }
    }
}

/// Follows frame boundaries in the raw client byte stream, reading only the
/// headers (RFC 6455 section 5.2) and skipping payloads.
struct FrameScan {
    header: [u8; 14],
    have: usize,
    need: usize,
    skip: u64,
    max: u64,
}

impl FrameScan {
    fn new(max: u64) -> Self {
        Self {
            header: [0; 14],
            have: 0,
            need: 2,
            skip: 0,
            max,
        }
    }

    /// `false` once a header announces a payload over the limit.
    fn feed(&mut self, mut bytes: &[u8]) -> bool {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len() as u64) as usize;
                self.skip -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            self.header[self.have] = bytes[0];
            self.have += 1;
            bytes = &bytes[1..];
            if self.have == 2 {
                let extended = match self.header[1] & 0x7f {
                    126 => 2,
                    127 => 8,
                    _ => 0,
                };
                let mask = if self.header[1] & 0x80 != 0 { 4 } else { 0 };
                self.need = 2 + extended + mask;
            }
            if self.have == self.need {
                let len = match self.header[1] & 0x7f {
                    126 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
                    127 => self.header[2..10]
                        .iter()
                        .fold(0u64, |acc, b| acc << 8 | u64::from(*b)),
                    n => u64::from(n),
                };
                if len > self.max {
                    return false;
                }
                self.skip = len;
                self.have = 0;
                self.need = 2;
            }
        }
        true
    }
}

pub(crate) enum Assembled {
    Text(ByteString),
    Binary,
}

pub(crate) enum FrameError {
    TooBig,
    Protocol,
    NotUtf8,
}

/// Joins a fragmented message, bounded by the frame limit in total.
pub(crate) struct Assembler {
    buf: BytesMut,
    text: bool,
    active: bool,
    max: usize,
}

impl Assembler {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            text: false,
            active: false,
            max,
        }
    }

    pub(crate) fn push(&mut self, item: Item) -> Result<Option<Assembled>, FrameError> {
        match item {
            // A new message may not start inside another.
            Item::FirstText(_) | Item::FirstBinary(_) if self.active => Err(FrameError::Protocol),
            Item::FirstText(bytes) => {
                self.begin(true);
                self.append(&bytes).map(|()| None)
            }
            Item::FirstBinary(bytes) => {
                self.begin(false);
                self.append(&bytes).map(|()| None)
            }
            Item::Continue(_) | Item::Last(_) if !self.active => Err(FrameError::Protocol),
            Item::Continue(bytes) => self.append(&bytes).map(|()| None),
            Item::Last(bytes) => {
                self.append(&bytes)?;
                self.active = false;
                let whole = self.buf.split().freeze();
                if !self.text {
                    return Ok(Some(Assembled::Binary));
                }
                ByteString::try_from(whole)
                    .map(|t| Some(Assembled::Text(t)))
                    .map_err(|_| FrameError::NotUtf8)
            }
        }
    }

    fn begin(&mut self, text: bool) {
        self.active = true;
        self.text = text;
        self.buf.clear();
    }

    fn append(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        if self.buf.len() + bytes.len() > self.max {
            return Err(FrameError::TooBig);
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(len: usize) -> Vec<u8> {
        // A masked text frame header, as a client sends it.
        let mut h = vec![0x81];
        if len < 126 {
            h.push(0x80 | len as u8);
        } else if len <= u16::MAX as usize {
            h.push(0x80 | 126);
            h.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            h.push(0x80 | 127);
            h.extend_from_slice(&(len as u64).to_be_bytes());
        }
        h.extend_from_slice(&[1, 2, 3, 4]);
        h
    }

    fn frame(len: usize) -> Vec<u8> {
        let mut f = header(len);
        f.extend(std::iter::repeat_n(b'x', len));
        f
    }

    #[test]
    fn the_scan_follows_frames_across_chunks() {
        let mut stream = Vec::new();
        for len in [0, 5, 125, 126, 1000, 65535, 70000] {
            stream.extend(frame(len));
        }
        for chunk_size in [1, 3, 7, 100, 4096, stream.len()] {
            let mut scan = FrameScan::new(70000);
            assert!(
                stream.chunks(chunk_size).all(|c| scan.feed(c)),
                "chunks of {chunk_size}"
            );
            assert_eq!((scan.have, scan.skip), (0, 0));
        }
    }

    #[test]
    fn the_scan_stops_at_an_oversized_header_before_its_payload() {
        for len in [126, 70000, 1 << 40] {
            let mut scan = FrameScan::new(125);
            assert!(scan.feed(&frame(10)));
            assert!(!scan.feed(&header(len)), "{len}");
        }
        let mut scan = FrameScan::new(125);
        assert!(scan.feed(&frame(125)));
    }

    #[test]
    fn fragments_join_within_the_limit() {
        let mut a = Assembler::new(10);
        assert!(matches!(
            a.push(Item::FirstText(Bytes::from_static(b"ab"))),
            Ok(None)
        ));
        assert!(matches!(
            a.push(Item::Continue(Bytes::from_static(b"cd"))),
            Ok(None)
        ));
        match a.push(Item::Last(Bytes::from_static(b"ef"))) {
            Ok(Some(Assembled::Text(t))) => assert_eq!(&*t, "abcdef"),
            _ => panic!("expected text"),
        }
        assert!(matches!(
            a.push(Item::FirstBinary(Bytes::from_static(b"x"))),
            Ok(None)
        ));
        assert!(matches!(
            a.push(Item::Last(Bytes::from_static(b"y"))),
            Ok(Some(Assembled::Binary))
        ));
        assert!(matches!(
            a.push(Item::FirstText(Bytes::from_static(b"123456"))),
            Ok(None)
        ));
        assert!(matches!(
            a.push(Item::Last(Bytes::from_static(b"78901"))),
            Err(FrameError::TooBig)
        ));
        let mut a = Assembler::new(10);
        assert!(matches!(
            a.push(Item::Continue(Bytes::new())),
            Err(FrameError::Protocol)
        ));
        assert!(matches!(
            a.push(Item::FirstText(Bytes::from_static(&[0xff]))),
            Ok(None)
        ));
        assert!(matches!(
            a.push(Item::FirstText(Bytes::new())),
            Err(FrameError::Protocol)
        ));
        let mut a = Assembler::new(10);
        a.push(Item::FirstText(Bytes::from_static(&[0xff]))).ok();
        assert!(matches!(
            a.push(Item::Last(Bytes::new())),
            Err(FrameError::NotUtf8)
        ));
    }
}
