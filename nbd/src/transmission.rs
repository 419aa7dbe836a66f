//! The transmission phase: the reader parses and judges requests, workers
//! execute them, replies go out whole under the writer lock.

use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use parking_lot::Mutex;
use tracing::{debug, info, trace, warn, Span};

use crate::admission::{InFlight, Slot};
use crate::connection::{
    io_error, is_disconnect, ConnectionError, ServerConfig, Shared, FLAGS_VALID,
    FLAGS_VALID_WRITE_ZEROES, READ_BUFFER_BYTES, WRITE_DISCARD_BYTES_MAX,
};
use crate::handshake::Negotiated;
use crate::proto::{self, RequestHeader};
use crate::{Errno, Export, ExportError};

// ---------------------------------------------------------------------------
// Transmission
// ---------------------------------------------------------------------------

/// A request that passed every check, ready for a worker.
#[derive(Debug)]
pub(crate) enum Op {
    Read {
        offset: u64,
        length_bytes: u32,
    },
    Write {
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        length_bytes: u32,
        fua: bool,
    },
    Trim {
        offset: u64,
        length_bytes: u32,
        fua: bool,
    },
    Flush,
}

/// What the reader does with a request header.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Dispatch to a worker.
    Execute,
    /// Answer at once with success: a zero-length READ, WRITE, TRIM or
    /// WRITE_ZEROES has nothing to do.
    Nothing,
    /// Answer at once with this error (after skipping a WRITE's payload).
    Reject { errno: Errno, reason: &'static str },
    /// NBD_CMD_DISC: stop reading, finish, close.
    Disconnect,
    /// A WRITE whose payload is too large to skip: close.
    Close,
}

/// Checks a request against the spec and the export, in the spec's order of
/// errors: unknown command, bad flags, too long, out of range.
pub(crate) fn judge(header: &RequestHeader, size_bytes: u64, max_request_bytes: u32) -> Verdict {
    let reject = |errno, reason| Verdict::Reject { errno, reason };
    let flags_valid = match header.command {
        proto::NBD_CMD_READ
        | proto::NBD_CMD_WRITE
        | proto::NBD_CMD_FLUSH
        | proto::NBD_CMD_TRIM
        | proto::NBD_CMD_DISC => FLAGS_VALID,
        proto::NBD_CMD_WRITE_ZEROES => FLAGS_VALID_WRITE_ZEROES,
        // CACHE and BLOCK_STATUS were not negotiated; the rest are unknown.
        _ => return reject(Errno::Inval, "unknown or unnegotiated command"),
    };
    let length_bytes = header.length_bytes;
    // Before anything that would skip a WRITE's payload.
    if header.command == proto::NBD_CMD_WRITE
        && length_bytes > max_request_bytes.max(WRITE_DISCARD_BYTES_MAX)
    {
        return Verdict::Close;
    }
    if header.command == proto::NBD_CMD_DISC {
        // Flags, offset and length of DISC do not matter: there is no reply.
        return Verdict::Disconnect;
    }
    if header.flags & !flags_valid != 0 {
        return reject(Errno::Inval, "command flags not valid for this command");
    }
    if header.command == proto::NBD_CMD_FLUSH {
        // Offset and length are reserved; nothing to check.
        return Verdict::Execute;
    }
    // The maximum binds the requests that carry a payload. The spec also
    // binds WRITE_ZEROES, but nbdcopy (libnbd 1.14) zeroes whole holes in one
    // request regardless; TRIM the spec leaves unbound. Both are passed to
    // the export in pieces no longer than the maximum.
    let carries_payload = matches!(header.command, proto::NBD_CMD_READ | proto::NBD_CMD_WRITE);
    if carries_payload && length_bytes > max_request_bytes {
        return reject(Errno::Inval, "request longer than the maximum block size");
    }
    let in_range = header
        .offset
        .checked_add(u64::from(length_bytes))
        .is_some_and(|end| end <= size_bytes);
    if !in_range {
        // The spec: ENOSPC for a write beyond the end, EINVAL for a read or
        // trim.
        return match header.command {
            proto::NBD_CMD_WRITE | proto::NBD_CMD_WRITE_ZEROES => {
                reject(Errno::NoSpc, "write beyond the end of the export")
            }
            _ => reject(Errno::Inval, "request beyond the end of the export"),
        };
    }
    if length_bytes == 0 {
        return Verdict::Nothing;
    }
    Verdict::Execute
}

/// A request handed to a worker, with its slot.
#[derive(Debug)]
pub(crate) struct Job<'a> {
    pub(crate) cookie: u64,
    pub(crate) command: u16,
    pub(crate) op: Op,
    pub(crate) _slot: Slot<'a>,
}

/// What the reader and the workers of one connection share.
pub(crate) struct Transmission<'a> {
    pub(crate) export: &'a dyn Export,
    /// WRITE_ZEROES and TRIM reach the export in pieces of at most this.
    pub(crate) piece_bytes_max: u64,
    /// Replies are written whole under this lock.
    pub(crate) writer: Mutex<&'a TcpStream>,
    pub(crate) socket: &'a TcpStream,
    /// A reply could not be written: the client is gone.
    pub(crate) broken: AtomicBool,
}

impl Transmission<'_> {
    /// Writes one whole reply; after the first failure, none.
    pub(crate) fn send(&self, reply: &[u8], cookie: u64) {
        if self.broken.load(Ordering::SeqCst) {
            return;
        }
        let result = self.writer.lock().write_all(reply);
        if let Err(err) = result {
            if !self.broken.swap(true, Ordering::SeqCst) {
                info!(cookie, error = %err, "cannot send NBD reply; closing the connection");
                // Stops the reader: nothing more will reach the client.
                let _ = self.socket.shutdown(Shutdown::Both);
            }
        }
    }

    /// Runs `operation` over `offset..offset + length_bytes` in pieces of at
    /// most `piece_bytes_max`, stopping at the first error (the request then
    /// fails: nothing partial is acknowledged).
    pub(crate) fn in_pieces(
        &self,
        offset: u64,
        length_bytes: u32,
        mut operation: impl FnMut(u64, u64) -> Result<(), ExportError>,
    ) -> Result<(), ExportError> {
        let end = offset + u64::from(length_bytes);
        let mut piece_offset = offset;
        while piece_offset < end {
            let piece_bytes = (end - piece_offset).min(self.piece_bytes_max);
            operation(piece_offset, piece_bytes)?;
            piece_offset += piece_bytes;
        }
        Ok(())
    }

    /// Executes a job and builds its reply: header, plus data for a READ
    /// that succeeded.
    pub(crate) fn execute(&self, job: &Job<'_>) -> Vec<u8> {
        // A READ's data goes in the same buffer as its header: one write.
        let data_bytes = match job.op {
            Op::Read { length_bytes, .. } => length_bytes as usize,
            _ => 0,
        };
        let mut reply = vec![0; proto::SIMPLE_REPLY_BYTES + data_bytes];
        let result = match &job.op {
            Op::Read { offset, .. } => {
                let result = self
                    .export
                    .read(*offset, &mut reply[proto::SIMPLE_REPLY_BYTES..]);
                if result.is_err() {
                    // The spec: an error reply carries no data.
                    reply.truncate(proto::SIMPLE_REPLY_BYTES);
                }
                result
            }
            Op::Write { offset, data, fua } => self.export.write(*offset, data, *fua),
            Op::WriteZeroes {
                offset,
                length_bytes,
                fua,
            } => self.in_pieces(*offset, *length_bytes, |offset, len| {
                self.export.write_zeroes(offset, len, *fua)
            }),
            Op::Trim {
                offset,
                length_bytes,
                fua,
            } => self.in_pieces(*offset, *length_bytes, |offset, len| {
                self.export.trim(offset, len, *fua)
            }),
            Op::Flush => self.export.flush(),
        };
        let error = match result {
            Ok(()) => 0,
            Err(err) => {
                warn!(
                    cookie = job.cookie,
                    command = proto::command_name(job.command),
                    errno = %err.errno,
                    error = %err.message,
                    "NBD request failed"
                );
                err.errno.code()
            }
        };
        let header: &mut [u8; proto::SIMPLE_REPLY_BYTES] = (&mut reply
            [..proto::SIMPLE_REPLY_BYTES])
            .try_into()
            .expect("reply starts with a header");
        proto::encode_simple_reply(header, error, job.cookie);
        reply
    }
}

/// Closes the socket if a worker panics (a broken invariant in an export),
/// so the reader stops and the connection ends instead of hanging.
pub(crate) struct CloseOnPanic<'a>(&'a TcpStream);

impl Drop for CloseOnPanic<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            let _ = self.0.shutdown(Shutdown::Both);
        }
    }
}

/// How the reader stopped without an error.
#[derive(Debug)]
pub(crate) enum ReaderEnd {
    Disconnect,
    ClientGone,
}

pub(crate) fn transmission(
    shared: &Shared,
    stream: &TcpStream,
    negotiated: &Negotiated,
    span: &Span,
) -> Result<(), ConnectionError> {
    stream
        .set_read_timeout(None)
        .map_err(io_error("entering transmission"))?;
    let config = &shared.config;
    let in_flight = InFlight::new(
        config.max_in_flight_per_connection,
        config.in_flight_payload_bytes_max(),
    );
    let state = Transmission {
        export: negotiated.export.as_ref(),
        piece_bytes_max: u64::from(config.max_request_bytes),
        writer: Mutex::new(stream),
        socket: stream,
        broken: AtomicBool::new(false),
    };
    // Never full: the in-flight slots bound what is queued.
    let (jobs, queue) = crossbeam_channel::bounded::<Job<'_>>(config.max_in_flight_per_connection);

    let result = thread::scope(|scope| {
        let mut spawn_error = None;
        let mut workers = 0;
        for index in 0..config.workers_per_connection {
            let queue = queue.clone();
            let state = &state;
            let span = span.clone();
            let spawned = thread::Builder::new()
                .name(format!("nbd-worker-{index}"))
                .spawn_scoped(scope, move || {
                    let _entered = span.enter();
                    let _close_on_panic = CloseOnPanic(state.socket);
                    for job in queue.iter() {
                        let reply = state.execute(&job);
                        state.send(&reply, job.cookie);
                        // The slot is released here, after the reply.
                    }
                });
            match spawned {
                Ok(_) => workers += 1,
                Err(err) => spawn_error = Some(err),
            }
        }
        drop(queue);
        if workers == 0 {
            let err = spawn_error.unwrap_or_else(|| io::Error::other("no workers configured"));
            return Err(ConnectionError::NoWorkers(err));
        }
        if let Some(err) = spawn_error {
            warn!(workers, error = %err, "NBD connection runs with fewer workers");
        }
        let result = read_requests(stream, negotiated, config, &in_flight, &state, &jobs);
        // Closing the queue ends the workers once they have answered every
        // dispatched request.
        drop(jobs);
        result
    });
    assert_eq!(
        in_flight.state.lock().requests,
        0,
        "every admitted request was answered"
    );
    match result? {
        ReaderEnd::Disconnect => debug!("NBD_CMD_DISC: in-flight requests answered"),
        ReaderEnd::ClientGone => debug!("NBD client closed the connection"),
    }
    Ok(())
}

pub(crate) fn read_requests<'a>(
    stream: &TcpStream,
    negotiated: &Negotiated,
    config: &ServerConfig,
    in_flight: &'a InFlight,
    state: &Transmission<'_>,
    jobs: &crossbeam_channel::Sender<Job<'a>>,
) -> Result<ReaderEnd, ConnectionError> {
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, stream);
    loop {
        let mut bytes = [0; proto::REQUEST_HEADER_BYTES];
        match reader.read_exact(&mut bytes) {
            Ok(()) => {}
            Err(err) if is_disconnect(&err) => return Ok(ReaderEnd::ClientGone),
            Err(source) => {
                return Err(ConnectionError::Io {
                    during: "reading a request",
                    source,
                })
            }
        }
        let header = RequestHeader::decode(&bytes).map_err(ConnectionError::BadRequestMagic)?;
        let command = proto::command_name(header.command);
        trace!(
            cookie = header.cookie,
            command,
            flags = header.flags,
            offset = header.offset,
            length_bytes = header.length_bytes,
            "NBD request"
        );
        let verdict = judge(&header, negotiated.size_bytes, config.max_request_bytes);
        let payload_bytes = if header.command == proto::NBD_CMD_WRITE {
            u64::from(header.length_bytes)
        } else {
            0
        };
        match verdict {
            Verdict::Disconnect => return Ok(ReaderEnd::Disconnect),
            Verdict::Close => {
                return Err(ConnectionError::WriteTooLarge {
                    cookie: header.cookie,
                    length_bytes: header.length_bytes,
                    max_bytes: config.max_request_bytes,
                })
            }
            Verdict::Reject { errno, reason } => {
                debug!(
                    cookie = header.cookie,
                    command,
                    offset = header.offset,
                    length_bytes = header.length_bytes,
                    flags = header.flags,
                    %errno,
                    reason,
                    "NBD request rejected"
                );
                let skipped = io::copy(&mut (&mut reader).take(payload_bytes), &mut io::sink())
                    .map_err(io_error("skipping a rejected write's payload"))?;
                if skipped < payload_bytes {
                    return Ok(ReaderEnd::ClientGone);
                }
                state.send(
                    &proto::simple_reply(errno.code(), header.cookie),
                    header.cookie,
                );
            }
            Verdict::Nothing => {
                state.send(&proto::simple_reply(0, header.cookie), header.cookie);
            }
            Verdict::Execute => {
                let fua = header.flags & proto::NBD_CMD_FLAG_FUA != 0;
                let offset = header.offset;
                let length_bytes = header.length_bytes;
                let reply_payload_bytes = if header.command == proto::NBD_CMD_READ {
                    u64::from(length_bytes)
                } else {
                    0
                };
                let slot = in_flight.acquire(payload_bytes + reply_payload_bytes);
                let op = match header.command {
                    proto::NBD_CMD_READ => Op::Read {
                        offset,
                        length_bytes,
                    },
                    proto::NBD_CMD_WRITE => {
                        // Bounded by max_request_bytes (judge).
                        let mut data = vec![0; length_bytes as usize];
                        match reader.read_exact(&mut data) {
                            Ok(()) => {}
                            // A write cut short is never executed.
                            Err(err) if is_disconnect(&err) => return Ok(ReaderEnd::ClientGone),
                            Err(source) => {
                                return Err(ConnectionError::Io {
                                    during: "reading a write's payload",
                                    source,
                                })
                            }
                        }
                        Op::Write { offset, data, fua }
                    }
                    proto::NBD_CMD_WRITE_ZEROES => Op::WriteZeroes {
                        offset,
                        length_bytes,
                        fua,
                    },
                    proto::NBD_CMD_TRIM => Op::Trim {
                        offset,
                        length_bytes,
                        fua,
                    },
                    proto::NBD_CMD_FLUSH => Op::Flush,
                    other => unreachable!("judge executes only known commands, not {other}"),
                };
                let job = Job {
                    cookie: header.cookie,
                    command: header.command,
                    op,
                    _slot: slot,
                };
                // Workers outlive the sender unless they panicked; then the
                // socket is already closed.
                if jobs.send(job).is_err() {
                    return Ok(ReaderEnd::ClientGone);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(command: u16, flags: u16, offset: u64, length_bytes: u32) -> RequestHeader {
        RequestHeader {
            flags,
            command,
            cookie: 1,
            offset,
            length_bytes,
        }
    }

    const SIZE: u64 = 1 << 20;
    const MAX: u32 = 64 << 10;

    fn rejected(verdict: Verdict) -> Option<Errno> {
        match verdict {
            Verdict::Reject { errno, .. } => Some(errno),
            _ => None,
        }
    }

    #[test]
    fn judge_follows_the_spec_errors() {
        use proto::*;
        assert_eq!(
            judge(&header(NBD_CMD_READ, 0, 0, 4096), SIZE, MAX),
            Verdict::Execute
        );
        assert_eq!(
            judge(&header(NBD_CMD_READ, NBD_CMD_FLAG_FUA, 0, 4096), SIZE, MAX),
            Verdict::Execute
        );
        assert_eq!(
            judge(&header(NBD_CMD_READ, 0, SIZE, 0), SIZE, MAX),
            Verdict::Nothing
        );
        assert_eq!(
            judge(&header(NBD_CMD_WRITE, 0, 0, 0), SIZE, MAX),
            Verdict::Nothing
        );
        // Out of range: ENOSPC for writes, EINVAL for reads and trims.
        let past_end = SIZE - 512;
        assert_eq!(
            rejected(judge(&header(NBD_CMD_WRITE, 0, past_end, 1024), SIZE, MAX)),
            Some(Errno::NoSpc)
        );
        assert_eq!(
            rejected(judge(
                &header(NBD_CMD_WRITE_ZEROES, 0, past_end, 1024),
                SIZE,
                MAX
            )),
            Some(Errno::NoSpc)
        );
        assert_eq!(
            rejected(judge(&header(NBD_CMD_READ, 0, past_end, 1024), SIZE, MAX)),
            Some(Errno::Inval)
        );
        assert_eq!(
            rejected(judge(&header(NBD_CMD_TRIM, 0, past_end, 1024), SIZE, MAX)),
            Some(Errno::Inval)
        );
        // Offset + length overflowing u64 is out of range, not a wrap.
        assert_eq!(
            rejected(judge(&header(NBD_CMD_READ, 0, u64::MAX, 1), SIZE, MAX)),
            Some(Errno::Inval)
        );
        // Too long: EINVAL for READ and WRITE; TRIM and WRITE_ZEROES carry
        // no payload and are not bound.
        assert_eq!(
            rejected(judge(&header(NBD_CMD_READ, 0, 0, MAX + 1), SIZE, MAX)),
            Some(Errno::Inval)
        );
        assert_eq!(
            judge(&header(NBD_CMD_WRITE_ZEROES, 0, 0, MAX + 1), SIZE, MAX),
            Verdict::Execute
        );
        assert_eq!(
            rejected(judge(&header(NBD_CMD_WRITE, 0, 0, MAX + 1), SIZE, MAX)),
            Some(Errno::Inval)
        );
        assert_eq!(
            judge(&header(NBD_CMD_TRIM, 0, 0, MAX + 1), SIZE, MAX),
            Verdict::Execute
        );
        assert_eq!(
            judge(
                &header(NBD_CMD_WRITE, 0, 0, WRITE_DISCARD_BYTES_MAX + 1),
                SIZE,
                MAX
            ),
            Verdict::Close
        );
        // Flags.
        assert_eq!(
            judge(
                &header(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_NO_HOLE, 0, 512),
                SIZE,
                MAX
            ),
            Verdict::Execute
        );
        assert_eq!(
            rejected(judge(
                &header(NBD_CMD_WRITE, NBD_CMD_FLAG_NO_HOLE, 0, 512),
                SIZE,
                MAX
            )),
            Some(Errno::Inval)
        );
        assert_eq!(
            rejected(judge(
                &header(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 512),
                SIZE,
                MAX
            )),
            Some(Errno::Inval)
        );
        assert_eq!(
            rejected(judge(
                &header(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FAST_ZERO, 0, 512),
                SIZE,
                MAX
            )),
            Some(Errno::Inval)
        );
        assert_eq!(
            rejected(judge(&header(NBD_CMD_FLUSH, 1 << 15, 0, 0), SIZE, MAX)),
            Some(Errno::Inval)
        );
        // Commands.
        for command in [NBD_CMD_CACHE, NBD_CMD_BLOCK_STATUS, 99] {
            assert_eq!(
                rejected(judge(&header(command, 0, 0, 512), SIZE, MAX)),
                Some(Errno::Inval)
            );
        }
        assert_eq!(
            judge(&header(NBD_CMD_DISC, 0, 0, 0), SIZE, MAX),
            Verdict::Disconnect
        );
        assert_eq!(
            judge(&header(NBD_CMD_FLUSH, 0, 0, 0), SIZE, MAX),
            Verdict::Execute
        );
    }
}
