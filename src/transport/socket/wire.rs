//! RFC 6455 framing on the connection's own TCP stream, server side: the
//! client's frames parsed out of the bytes read (an oversized frame is
//! refused from its header, before its payload is read), and the server's
//! frames written into the connection's send buffer.
//!
//! After the upgrade a WebSocket owns its socket: no HTTP dispatcher, no
//! channel between the connection's task and a writer, no buffer that lives
//! while the connection idles. Bytes are read into a buffer only when the
//! socket has some, and the buffer is released once parsed.

use actix_web::web::{Buf, Bytes, BytesMut};

/// Frame opcodes (RFC 6455 section 5.2).
pub(crate) mod opcode {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

const FIN: u8 = 0x80;
const RSV: u8 = 0x70;
const MASKED: u8 = 0x80;
/// The longest payload a control frame may carry.
const MAX_CONTROL_PAYLOAD: usize = 125;

/// One frame from the client, unmasked.
#[derive(Debug)]
pub struct Frame {
    pub(crate) fin: bool,
    pub(crate) opcode: u8,
    pub(crate) payload: Bytes,
}

/// What the bytes read so far hold.
#[derive(Debug)]
pub(crate) enum Parsed {
    /// A whole frame, taken out of the buffer.
    Frame(Frame),
    /// Not a whole frame yet: read more.
    Partial,
    /// A frame header announced more than the limit.
    TooBig,
    /// Not a frame a client may send (reserved bits, unknown opcode, an
    /// unmasked frame, a fragmented or long control frame).
    Broken,
}

/// Parses the first frame out of `buf` (bytes from the client), refusing
/// from its header alone a payload over `max_payload` bytes.
pub(crate) fn parse(buf: &mut BytesMut, max_payload: usize) -> Parsed {
    if buf.len() < 2 {
        return Parsed::Partial;
    }
    let (first, second) = (buf[0], buf[1]);
    let fin = first & FIN != 0;
    let opcode = first & 0x0F;
    if first & RSV != 0 || second & MASKED == 0 {
        // No extension is negotiated, and a client masks every frame.
        return Parsed::Broken;
    }
    let control = match opcode {
        opcode::CONTINUATION | opcode::TEXT | opcode::BINARY => false,
        opcode::CLOSE | opcode::PING | opcode::PONG => true,
        _ => return Parsed::Broken,
    };
    let (length, header) = match second & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Parsed::Partial;
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Parsed::Partial;
            }
            let mut bytes = [0; 8];
            bytes.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(bytes), 10)
        }
        n => (u64::from(n), 2),
    };
    if control && (!fin || length > MAX_CONTROL_PAYLOAD as u64) {
        return Parsed::Broken;
    }
    if length > max_payload as u64 {
        return Parsed::TooBig;
    }
    // Within the limit, so it fits a usize.
    let length = length as usize;
    let total = header + 4 + length;
    if buf.len() < total {
        // Room for the rest of the frame, once, rather than in steps.
        buf.reserve(total - buf.len());
        return Parsed::Partial;
    }
    let mut mask = [0; 4];
    mask.copy_from_slice(&buf[header..header + 4]);
    buf.advance(header + 4);
    let mut payload = buf.split_to(length);
    unmask(&mut payload, mask);
    Parsed::Frame(Frame {
        fin,
        opcode,
        payload: payload.freeze(),
    })
}

/// XORs `data` with the client's masking key (RFC 6455 section 5.3).
fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = data.chunks_exact_mut(4);
    for chunk in &mut chunks {
        let value = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) ^ word;
        chunk.copy_from_slice(&value.to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i];
    }
}

/// The size on the wire of a server (unmasked) frame of `payload` bytes.
pub(crate) fn frame_bytes(payload: usize) -> usize {
    payload
        + match payload {
            0..=125 => 2,
            126..=65535 => 4,
            _ => 10,
        }
}

/// The length of the server frame at the start of `bytes` (whose header
/// must be there whole).
pub(crate) fn server_frame_len(bytes: &[u8]) -> usize {
    match bytes[1] & 0x7F {
        126 => 4 + usize::from(u16::from_be_bytes([bytes[2], bytes[3]])),
        127 => {
            let mut length = [0; 8];
            length.copy_from_slice(&bytes[2..10]);
            10 + u64::from_be_bytes(length) as usize
        }
        n => 2 + usize::from(n),
    }
}

/// Appends a final, unmasked frame of `opcode` carrying `payload` to `out`.
pub(crate) fn write_frame(out: &mut BytesMut, opcode: u8, payload: &[u8]) {
    out.reserve(frame_bytes(payload.len()));
    out.extend_from_slice(&[FIN | opcode]);
    match payload.len() {
        n @ 0..=125 => out.extend_from_slice(&[n as u8]),
        n @ 126..=65535 => {
            out.extend_from_slice(&[126]);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.extend_from_slice(&[127]);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

/// Appends a close frame with `code` and as much of `reason` as fits a
/// control frame, cut on a character boundary.
pub(crate) fn write_close(out: &mut BytesMut, code: u16, reason: &str) {
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    write_frame(out, opcode::CLOSE, &payload);
}

/// The code of a close frame's payload: `Ok(None)` for an empty one,
/// `Err` for one too short to hold a code or whose reason is not UTF-8.
pub(crate) fn close_code(payload: &[u8]) -> Result<Option<u16>, ()> {
    match payload {
        [] => Ok(None),
        [_] => Err(()),
        [high, low, reason @ ..] => {
            std::str::from_utf8(reason).map_err(|_| ())?;
            Ok(Some(u16::from_be_bytes([*high, *low])))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame as a client sends it: masked with `mask`.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut out = BytesMut::new();
        write_frame(&mut out, opcode, payload);
        let mut frame = out.to_vec();
        frame[0] = if fin { frame[0] } else { frame[0] & !FIN };
        frame[1] |= MASKED;
        let header = frame_bytes(payload.len()) - payload.len();
        let mut masked = payload.to_vec();
        unmask(&mut masked, mask);
        frame.truncate(header);
        frame.extend_from_slice(&mask);
        frame.extend_from_slice(&masked);
        frame
    }

    fn parse_all(bytes: &[u8], max: usize) -> Vec<Parsed> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        loop {
            match parse(&mut buf, max) {
                Parsed::Partial => return out,
                other => {
                    let last = !matches!(other, Parsed::Frame(_));
                    out.push(other);
                    if last {
                        return out;
                    }
                }
            }
        }
    }

    #[test]
    fn frames_of_every_length_parse_across_any_split() {
        let mut stream = Vec::new();
        let lengths = [0, 1, 5, 125, 126, 1000, 65535, 65536, 70000];
        for (i, len) in lengths.iter().enumerate() {
            let payload: Vec<u8> = (0..*len).map(|b| (b % 251) as u8).collect();
            stream.extend(client_frame(
                true,
                opcode::TEXT,
                &payload,
                [1, 2, 3, i as u8],
            ));
        }
        for chunk in [1, 3, 7, 100, 4096, stream.len()] {
            let mut buf = BytesMut::new();
            let mut seen = Vec::new();
            for piece in stream.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Parsed::Frame(frame) = parse(&mut buf, 70000) {
                    assert!(frame.fin);
                    assert_eq!(frame.opcode, opcode::TEXT);
                    let expected: Vec<u8> =
                        (0..frame.payload.len()).map(|b| (b % 251) as u8).collect();
                    assert_eq!(&frame.payload[..], &expected[..]);
                    seen.push(frame.payload.len());
                }
            }
            assert_eq!(seen, lengths, "chunks of {chunk}");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn an_oversized_frame_is_refused_from_its_header() {
        for len in [126usize, 70000, 1 << 40] {
            // Only the header: the payload is never needed to refuse it.
            let mut header = vec![0x81, 0x80 | 127];
            header.extend_from_slice(&(len as u64).to_be_bytes());
            header.extend_from_slice(&[0; 4]);
            let parsed = parse_all(&header, 125);
            assert!(matches!(parsed[..], [Parsed::TooBig]), "{len}: {parsed:?}");
        }
        let at_limit = client_frame(true, opcode::BINARY, &[7; 125], [9; 4]);
        assert!(matches!(parse_all(&at_limit, 125)[..], [Parsed::Frame(_)]));
    }

    #[test]
    fn frames_a_client_may_not_send_are_broken() {
        let unmasked = {
            let mut out = BytesMut::new();
            write_frame(&mut out, opcode::TEXT, b"hi");
            out.to_vec()
        };
        let mut reserved = client_frame(true, opcode::TEXT, b"hi", [1; 4]);
        reserved[0] |= 0x40;
        let unknown = client_frame(true, 0x3, b"", [1; 4]);
        let fragmented_ping = client_frame(false, opcode::PING, b"", [1; 4]);
        let long_ping = client_frame(true, opcode::PING, &[0; 126], [1; 4]);
        for frame in [unmasked, reserved, unknown, fragmented_ping, long_ping] {
            assert!(
                matches!(parse_all(&frame, 4096)[..], [Parsed::Broken]),
                "{frame:?}"
            );
        }
    }

    #[test]
    fn server_frames_are_framed_as_rfc_6455_says() {
        for len in [0, 125, 126, 65535, 65536] {
            let mut out = BytesMut::new();
            write_frame(&mut out, opcode::TEXT, &vec![b'x'; len]);
            assert_eq!(out.len(), frame_bytes(len), "{len}");
            assert_eq!(server_frame_len(&out), frame_bytes(len), "{len}");
            // As actix's codec frames them.
            let mut theirs = BytesMut::new();
            actix_http::ws::Parser::write_message(
                &mut theirs,
                vec![b'x'; len],
                actix_http::ws::OpCode::Text,
                true,
                false,
            );
            assert_eq!(out, theirs, "{len}");
        }
    }

    #[test]
    fn close_frames_carry_a_code_and_a_reason_that_fits() {
        let mut out = BytesMut::new();
        write_close(&mut out, 4400, &"é".repeat(100));
        assert!(out.len() <= 2 + MAX_CONTROL_PAYLOAD);
        assert_eq!(&out[2..4], &4400u16.to_be_bytes());
        assert!(std::str::from_utf8(&out[4..]).is_ok());
        assert_eq!(close_code(&out[2..]), Ok(Some(4400)));
        assert_eq!(close_code(&[]), Ok(None));
        assert_eq!(close_code(&[3]), Err(()));
        assert_eq!(close_code(&[3, 232, 0xff]), Err(()));
    }
}
