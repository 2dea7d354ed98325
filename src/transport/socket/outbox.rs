//! The socket's sending half: one send buffer, written when the connection's
//! task has finished a turn, its bound, and how the connection closes.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix_web::web::{Buf, BytesMut};
use tokio::net::TcpStream;

use super::wire::{self, frame_bytes, opcode};
use super::End;
use crate::error::close;
use crate::hub::{Cutoff, CutoffReason};

/// How long a close may wait on a congested socket, and then for the peer
/// to close its side, before the connection is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// The most a send buffer holds when `hub.subscriber_queue_bytes` is set
/// higher (or effectively off): the connection then stops taking results,
/// and its subscriptions' bounded queues take the strain (cutting it off
/// when they overflow). Under the byte bound (256 KiB by default) the
/// bound itself cuts the connection off first.
const BACKED_UP_BYTES: usize = 1024 * 1024;
/// A send buffer emptied with more room than this is released: a burst
/// does not leave every connection holding its high-water mark.
const KEEP_BYTES: usize = 1024;

/// The socket's sending half. Frames are appended to the send buffer
/// ([`Outbox::text`]) and go out in one write per turn of the connection's
/// task ([`Outbox::flush`]); nothing here waits on the socket, so a client
/// that stopped reading cannot wedge the task.
pub struct Outbox {
    stream: Rc<TcpStream>,
    /// Frames the socket has not taken yet.
    pending: BytesMut,
    /// How many bytes at the front of `pending` finish a frame the socket
    /// has taken part of: nothing may be sent before them.
    partial: usize,
    cutoff: Arc<Cutoff>,
    /// `hub.subscriber_queue_bytes`: a frame that would take the send
    /// buffer above it cuts the connection off as a slow consumer.
    max_buffered_bytes: usize,
    /// `slow_consumer_disconnects_total` for this connection's transport.
    slow_consumers: prometheus::IntCounter,
}

impl Outbox {
    pub(super) fn new(
        stream: Rc<TcpStream>,
        cutoff: Arc<Cutoff>,
        max_buffered_bytes: usize,
        slow_consumers: prometheus::IntCounter,
    ) -> Self {
        Self {
            stream,
            pending: BytesMut::new(),
            partial: 0,
            cutoff,
            max_buffered_bytes,
            slow_consumers,
        }
    }

    /// Queues a text frame, unless the frames the socket has not taken
    /// and this one would exceed the connection's byte bound: the client is
    /// then cut off (1013, counted as a slow consumer) before the node
    /// holds more for it. A frame alone over the bound still goes out when
    /// nothing waits.
    pub fn text(&mut self, text: &str) -> Result<(), End> {
        let size = frame_bytes(text.len());
        if self.over_bound(size) {
            // The socket may simply not have been offered what waits yet.
            self.flush()?;
            if self.over_bound(size) {
                if self.cutoff.reason().is_none() {
                    self.slow_consumers.inc();
                    self.cutoff.cut(CutoffReason::SlowConsumer);
                }
                return Err(slow_consumer());
            }
        }
        wire::write_frame(&mut self.pending, opcode::TEXT, text.as_bytes());
        Ok(())
    }

    fn over_bound(&self, size: usize) -> bool {
        let waiting = self.pending.len();
        waiting > 0 && waiting + size > self.max_buffered_bytes
    }

    pub fn ping(&mut self) {
        wire::write_frame(&mut self.pending, opcode::PING, b"");
    }

    pub(super) fn pong(&mut self, payload: &[u8]) {
        wire::write_frame(&mut self.pending, opcode::PONG, payload);
    }

    /// Hands the socket as much of the send buffer as it takes now; never
    /// waits. `Err` when the connection failed.
    pub fn flush(&mut self) -> Result<(), End> {
        while !self.pending.is_empty() {
            match self.stream.try_write(&self.pending) {
                Ok(0) => return Err(End::Gone),
                Ok(n) => self.taken(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(_) => return Err(End::Gone),
            }
        }
        if self.pending.capacity() > KEEP_BYTES {
            self.pending = BytesMut::new();
        }
        Ok(())
    }

    /// The socket took the first `n` bytes of `pending`.
    fn taken(&mut self, n: usize) {
        self.partial = left_of_frame(&self.pending, self.partial, n);
        self.pending.advance(n);
    }

    /// Whether frames wait for the socket: the task then also waits for
    /// [`Outbox::writable`].
    pub fn is_waiting(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Whether so much waits that the task should take no more results
    /// until the socket drains.
    pub fn is_backed_up(&self) -> bool {
        self.pending.len() >= BACKED_UP_BYTES.min(self.max_buffered_bytes)
    }

    /// Resolves when the socket may take more (then [`Outbox::flush`]).
    pub async fn writable(&self) {
        // An error shows in the flush that follows.
        let _ = self.stream.writable().await;
    }

    /// Sends a close frame (with `code` and `reason`, or empty) after what
    /// waits (a slow consumer's waiting frames are dropped: only the rest
    /// of a frame already begun goes first), then closes the sending side
    /// and waits a moment for the peer to close its own: a socket closed
    /// with bytes unread would be reset, and the peer could lose the close
    /// frame. A close the socket does not take within [`CLOSE_GRACE`] is
    /// left to [`linger`], so that the connection ends now.
    pub(super) async fn close(mut self, code: Option<u16>, reason: &str) {
        if code == Some(close::SLOW_CONSUMER) {
            self.pending.truncate(self.partial);
        }
        match code {
            Some(code) => wire::write_close(&mut self.pending, code, reason),
            None => wire::write_frame(&mut self.pending, opcode::CLOSE, b""),
        }
        let deadline = tokio::time::Instant::now() + CLOSE_GRACE;
        loop {
            if self.flush().is_err() {
                return;
            }
            if self.pending.is_empty() {
                break;
            }
            let writable = tokio::time::timeout_at(deadline, self.stream.writable()).await;
            match writable {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return,
                Err(_) => return linger(self.stream, self.pending),
            }
        }
        half_close(&self.stream, deadline).await;
    }
}

/// Closes the sending side, then reads until the peer closes its own (or
/// `deadline`).
async fn half_close(stream: &TcpStream, deadline: tokio::time::Instant) {
    let _ = socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Write);
    let _ = tokio::time::timeout_at(deadline, until_closed(stream)).await;
}

/// Closes whose frame waits for a client that is not reading: the peer that
/// reads again within [`LINGER`] still learns why it was closed (a slow
/// consumer's 1013 above all). The connection has ended for the node (its
/// place, its subscriptions); what lingers is the socket and a few bytes.
static LINGERING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// Most closes lingering on a node; past it a close that cannot go out is
/// dropped with its connection.
const MAX_LINGERING: usize = 1024;
/// How long a close frame waits for a client that is not reading.
const LINGER: Duration = Duration::from_secs(10);

fn linger(stream: Rc<TcpStream>, mut pending: BytesMut) {
    use std::sync::atomic::Ordering;
    if LINGERING.fetch_add(1, Ordering::Relaxed) >= MAX_LINGERING {
        LINGERING.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    actix_web::rt::spawn(async move {
        let deadline = tokio::time::Instant::now() + LINGER;
        let sent = tokio::time::timeout_at(deadline, async {
            while !pending.is_empty() {
                stream.writable().await?;
                match stream.try_write(&pending) {
                    Ok(n) => pending.advance(n),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })
        .await;
        if matches!(sent, Ok(Ok(()))) {
            half_close(&stream, tokio::time::Instant::now() + CLOSE_GRACE).await;
        }
        LINGERING.fetch_sub(1, Ordering::Relaxed);
    });
}

/// Of `pending` (whole server frames, but for the first `partial` bytes,
/// which end a frame), the bytes that are left of the frame the first `n`
/// end in.
fn left_of_frame(pending: &[u8], partial: usize, n: usize) -> usize {
    if n <= partial {
        return partial - n;
    }
    // Walk the frames the write finished, to the one it ends in.
    let mut end = partial;
    while end < n {
        end += wire::server_frame_len(&pending[end..]);
    }
    end - n
}

/// Reads and discards until the peer closes (or the connection fails).
async fn until_closed(stream: &TcpStream) {
    let mut sink = [0u8; 1024];
    loop {
        if stream.readable().await.is_err() {
            return;
        }
        match stream.try_read(&mut sink) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

pub fn slow_consumer() -> End {
    End::Close(close::SLOW_CONSUMER, "slow consumer".into())
}

pub fn going_away() -> End {
    End::Close(close::GOING_AWAY, "server shutting down".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_write_leaves_the_rest_of_its_frame_in_front() {
        let mut pending = BytesMut::new();
        wire::write_frame(&mut pending, opcode::TEXT, &[b'a'; 10]); // 12 bytes
        wire::write_frame(&mut pending, opcode::TEXT, &[b'b'; 200]); // 204 bytes
        wire::write_frame(&mut pending, opcode::PING, b""); // 2 bytes
        assert_eq!(left_of_frame(&pending, 0, 0), 0);
        assert_eq!(left_of_frame(&pending, 0, 5), 7);
        assert_eq!(left_of_frame(&pending, 0, 12), 0);
        assert_eq!(left_of_frame(&pending, 0, 13), 203);
        assert_eq!(left_of_frame(&pending, 0, 216), 0);
        assert_eq!(left_of_frame(&pending, 0, 217), 1);
        assert_eq!(left_of_frame(&pending, 0, 218), 0);
        // With 7 bytes of a frame already begun in front.
        let rest = &pending[5..];
        assert_eq!(left_of_frame(rest, 7, 3), 4);
        assert_eq!(left_of_frame(rest, 7, 7), 0);
        assert_eq!(left_of_frame(rest, 7, 8), 203);
    }
}
