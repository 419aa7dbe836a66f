//! What both TCP sides share: a frame reader that survives read timeouts,
//! and socket setup.

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use super::wire::{decode_frame, Frame, FRAME_HEADER_LEN};
use crate::Error;

/// Reads frames from a socket with a read timeout. A timeout in the middle
/// of a frame keeps the bytes read so far (unlike `read_exact`).
#[derive(Debug)]
pub(crate) struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max_payload_len_bytes: u32,
}

impl FrameReader {
    pub(crate) fn new(max_payload_len_bytes: u32) -> Self {
        // Room for two largest frames: one being parsed, one arriving.
        let len = 2 * (FRAME_HEADER_LEN + max_payload_len_bytes as usize);
        Self {
            buf: vec![0; len],
            start: 0,
            end: 0,
            max_payload_len_bytes,
        }
    }

    /// Reads what the socket has. `Ok(true)` if bytes arrived, `Ok(false)`
    /// if the read timed out.
    pub(crate) fn fill(&mut self, stream: &mut TcpStream, peer: SocketAddr) -> Result<bool, Error> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() || self.start > self.buf.len() / 2 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        assert!(
            self.end < self.buf.len(),
            "a whole frame always fits the buffer"
        );
        match stream.read(&mut self.buf[self.end..]) {
            Ok(0) => Err(Error::ConnectionClosed { peer }),
            Ok(read) => {
                self.end += read;
                Ok(true)
            }
            Err(error)
                if matches!(
                    error.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                Ok(false)
            }
            Err(source) => Err(Error::io("reading from the interconnect", peer, source)),
        }
    }

    /// The next complete frame in the buffer, if any.
    pub(crate) fn next_frame(&mut self) -> Result<Option<Frame<'_>>, Error> {
        match decode_frame(&self.buf[self.start..self.end], self.max_payload_len_bytes)? {
            None => Ok(None),
            Some((frame, used)) => {
                self.start += used;
                Ok(Some(frame))
            }
        }
    }
}

/// Socket options for an authenticated interconnect connection.
pub(crate) fn configure_stream(
    stream: &TcpStream,
    peer: SocketAddr,
    read_timeout: Duration,
    write_timeout: Duration,
) -> Result<(), Error> {
    let setup = |result: std::io::Result<()>| {
        result.map_err(|source| Error::io("configuring the socket", peer, source))
    };
    // Small writes (acks, 64-byte records) must not wait for Nagle.
    setup(stream.set_nodelay(true))?;
    setup(stream.set_read_timeout(Some(read_timeout)))?;
    setup(stream.set_write_timeout(Some(write_timeout)))
}
