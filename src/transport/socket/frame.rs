//! Messages from the client's frames: the [`Assembler`] joins a fragmented
//! message within the frame limit, and checks that text is UTF-8.

use actix_web::web::BytesMut;
use bytestring::ByteString;

use super::wire::{opcode, Frame};

pub(crate) enum Assembled {
    Text(ByteString),
    Binary,
}

#[derive(Debug)]
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

    /// Takes one data frame (text, binary or continuation); a whole message
    /// when this frame completes one.
    pub(crate) fn push(&mut self, frame: Frame) -> Result<Option<Assembled>, FrameError> {
        match frame.opcode {
            // A new message may not start inside another.
            opcode::TEXT | opcode::BINARY if self.active => Err(FrameError::Protocol),
            // The usual case, a message in one frame: no copy.
            opcode::TEXT if frame.fin => ByteString::try_from(frame.payload)
                .map(|t| Some(Assembled::Text(t)))
                .map_err(|_| FrameError::NotUtf8),
            opcode::BINARY if frame.fin => Ok(Some(Assembled::Binary)),
            opcode::TEXT | opcode::BINARY => {
                self.active = true;
                self.text = frame.opcode == opcode::TEXT;
                self.buf = BytesMut::new();
                self.append(&frame.payload).map(|()| None)
            }
            _ if !self.active => Err(FrameError::Protocol),
            _ if !frame.fin => self.append(&frame.payload).map(|()| None),
            _ => {
                self.append(&frame.payload)?;
                self.active = false;
                // The buffer goes with the message: none kept while idle.
                let whole = std::mem::take(&mut self.buf).freeze();
                if !self.text {
                    return Ok(Some(Assembled::Binary));
                }
                ByteString::try_from(whole)
                    .map(|t| Some(Assembled::Text(t)))
                    .map_err(|_| FrameError::NotUtf8)
            }
        }
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
    use actix_web::web::Bytes;

    fn frame(fin: bool, opcode: u8, payload: &'static [u8]) -> Frame {
        Frame {
            fin,
            opcode,
            payload: Bytes::from_static(payload),
        }
    }

    #[test]
    fn fragments_join_within_the_limit() {
        let mut a = Assembler::new(10);
        assert!(matches!(
            a.push(frame(false, opcode::TEXT, b"ab")),
            Ok(None)
        ));
        assert!(matches!(
            a.push(frame(false, opcode::CONTINUATION, b"cd")),
            Ok(None)
        ));
        match a.push(frame(true, opcode::CONTINUATION, b"ef")) {
            Ok(Some(Assembled::Text(t))) => assert_eq!(&*t, "abcdef"),
            _ => panic!("expected text"),
        }
        match a.push(frame(true, opcode::TEXT, b"whole")) {
            Ok(Some(Assembled::Text(t))) => assert_eq!(&*t, "whole"),
            _ => panic!("expected text"),
        }
        assert!(matches!(
            a.push(frame(false, opcode::BINARY, b"x")),
            Ok(None)
        ));
        assert!(matches!(
            a.push(frame(true, opcode::CONTINUATION, b"y")),
            Ok(Some(Assembled::Binary))
        ));
        assert!(matches!(
            a.push(frame(false, opcode::TEXT, b"123456")),
            Ok(None)
        ));
        assert!(matches!(
            a.push(frame(true, opcode::CONTINUATION, b"78901")),
            Err(FrameError::TooBig)
        ));
        let mut a = Assembler::new(10);
        assert!(matches!(
            a.push(frame(true, opcode::CONTINUATION, b"")),
            Err(FrameError::Protocol)
        ));
        assert!(matches!(
            a.push(frame(false, opcode::TEXT, &[0xff])),
            Ok(None)
        ));
        assert!(matches!(
            a.push(frame(true, opcode::TEXT, b"")),
            Err(FrameError::Protocol)
        ));
        let mut a = Assembler::new(10);
        a.push(frame(false, opcode::TEXT, &[0xff])).ok();
        assert!(matches!(
            a.push(frame(true, opcode::CONTINUATION, b"")),
            Err(FrameError::NotUtf8)
        ));
        assert!(matches!(
            Assembler::new(10).push(frame(true, opcode::TEXT, &[0xff])),
            Err(FrameError::NotUtf8)
        ));
    }
}
