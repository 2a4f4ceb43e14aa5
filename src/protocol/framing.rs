//! Length-prefixed framing. The length is checked before anything is buffered
//! beyond the 4-byte prefix, so a peer announcing 2^31 bytes costs nothing.

use bytes::{Buf, Bytes, BytesMut};

/// Size of the little-endian length that precedes every frame.
pub const LENGTH_PREFIX_BYTES: usize = 4;

/// Why a byte stream cannot be split into frames. "Need more bytes" is not an
/// error: [`FrameDecoder::next_frame`] returns `Ok(None)` for it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {length} bytes exceeds the limit of {max} bytes")]
    TooLarge { length: usize, max: usize },
    #[error("empty frame")]
    Empty,
}

/// Splits a receive buffer into whole frames.
#[derive(Debug, Clone, Copy)]
pub struct FrameDecoder {
    frame_size_max_bytes: usize,
}

impl FrameDecoder {
    pub fn new(frame_size_max_bytes: usize) -> FrameDecoder {
        FrameDecoder {
            frame_size_max_bytes,
        }
    }

    /// Takes the next complete frame (without its prefix) off the front of
    /// `buf`, or returns `Ok(None)` when `buf` does not hold a whole frame
    /// yet. On an error the stream is unusable and must be closed.
    pub fn next_frame(&self, buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        let Some(length) = self.peek_length(buf)? else {
            return Ok(None);
        };
        if buf.len() < LENGTH_PREFIX_BYTES + length {
            // Make room for the rest of this frame in one allocation.
            buf.reserve(LENGTH_PREFIX_BYTES + length - buf.len());
            return Ok(None);
        }
        buf.advance(LENGTH_PREFIX_BYTES);
        Ok(Some(buf.split_to(length).freeze()))
    }

    /// The announced length of the frame at the front of `buf`, checked
    /// against the limit, or `None` if the prefix is incomplete.
    pub fn peek_length(&self, buf: &[u8]) -> Result<Option<usize>, FrameError> {
        let Some(prefix) = buf.get(..LENGTH_PREFIX_BYTES) else {
            return Ok(None);
        };
        let length = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        if length == 0 {
            return Err(FrameError::Empty);
        }
        if length > self.frame_size_max_bytes {
            return Err(FrameError::TooLarge {
                length,
                max: self.frame_size_max_bytes,
            });
        }
        Ok(Some(length))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn framed(body: &[u8]) -> Vec<u8> {
        let mut out = (body.len() as u32).to_le_bytes().to_vec();
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn splits_every_complete_frame_and_keeps_the_partial_one() {
        let decoder = FrameDecoder::new(64);
        let mut buf = BytesMut::new();
        buf.put_slice(&framed(b"one"));
        buf.put_slice(&framed(b"two!"));
        let partial = framed(b"three");
        buf.put_slice(&partial[..6]);
        assert_eq!(decoder.next_frame(&mut buf).unwrap().unwrap(), &b"one"[..]);
        assert_eq!(decoder.next_frame(&mut buf).unwrap().unwrap(), &b"two!"[..]);
        assert_eq!(decoder.next_frame(&mut buf).unwrap(), None);
        buf.put_slice(&partial[6..]);
        assert_eq!(
            decoder.next_frame(&mut buf).unwrap().unwrap(),
            &b"three"[..]
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn rejects_an_oversized_length_before_buffering_the_body() {
        let decoder = FrameDecoder::new(64);
        let mut buf = BytesMut::from(&(1u32 << 31).to_le_bytes()[..]);
        assert_eq!(
            decoder.next_frame(&mut buf),
            Err(FrameError::TooLarge {
                length: 1 << 31,
                max: 64
            })
        );
        assert!(buf.capacity() < 1024);
    }

    #[test]
    fn rejects_an_empty_frame() {
        let decoder = FrameDecoder::new(64);
        let mut buf = BytesMut::from(&0u32.to_le_bytes()[..]);
        assert_eq!(decoder.next_frame(&mut buf), Err(FrameError::Empty));
    }
}
