//! The fixed-newstyle handshake: options until `NBD_OPT_GO` (or the legacy
//! `NBD_OPT_EXPORT_NAME`) picks an export, or the client aborts.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Instant;

use tracing::debug;

use crate::connection::{
    io_error, is_disconnect, ConnectionError, Shared, OPTION_DISCARD_BYTES_MAX,
};
use crate::proto::{self, InfoRequest, OptionHeader};
use crate::Export;

// ---------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------

pub(crate) enum HandshakeEnd {
    Transmission(Negotiated),
    /// NBD_OPT_ABORT, or the client left.
    Closed,
}

/// The export a client chose.
pub(crate) struct Negotiated {
    pub(crate) name: String,
    pub(crate) export: Arc<dyn Export>,
    /// As sent to the client: requests are checked against this size.
    pub(crate) size_bytes: u64,
}

/// Makes reads on `stream` fail once `deadline` has passed.
pub(crate) fn read_until(
    stream: &TcpStream,
    deadline: Instant,
    during: &'static str,
) -> Result<(), ConnectionError> {
    let remaining = deadline
        .checked_duration_since(Instant::now())
        .filter(|remaining| !remaining.is_zero())
        .ok_or(ConnectionError::HandshakeTimeout)?;
    stream
        .set_read_timeout(Some(remaining))
        .map_err(io_error(during))
}

/// A read error during the handshake; a timeout is the deadline passing.
pub(crate) fn handshake_read_error(
    during: &'static str,
) -> impl FnOnce(io::Error) -> ConnectionError {
    move |source| match source.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ConnectionError::HandshakeTimeout,
        _ => ConnectionError::Io { during, source },
    }
}

/// Reads exactly `buf.len()` bytes before the handshake deadline.
pub(crate) fn read_before(
    mut stream: &TcpStream,
    deadline: Instant,
    buf: &mut [u8],
    during: &'static str,
) -> Result<(), ConnectionError> {
    read_until(stream, deadline, during)?;
    stream.read_exact(buf).map_err(handshake_read_error(during))
}

pub(crate) fn handshake(
    shared: &Shared,
    stream: &TcpStream,
) -> Result<HandshakeEnd, ConnectionError> {
    let deadline = Instant::now() + shared.handshake_deadline;
    let mut writer = stream;
    writer
        .write_all(&proto::greeting())
        .map_err(io_error("sending the greeting"))?;
    let mut flags = [0; 4];
    read_before(stream, deadline, &mut flags, "reading client flags")?;
    let flags = u32::from_be_bytes(flags);
    if flags & !proto::CLIENT_FLAGS_KNOWN != 0 {
        return Err(ConnectionError::UnknownClientFlags { flags });
    }
    let no_zeroes = flags & proto::NBD_FLAG_C_NO_ZEROES != 0;

    loop {
        let mut header = [0; proto::OPTION_HEADER_BYTES];
        match read_before(stream, deadline, &mut header, "reading an option") {
            Ok(()) => {}
            // Between options, end of file is the client leaving (e.g. after
            // NBD_OPT_ABORT without waiting for our reply).
            Err(ConnectionError::Io { source, .. }) if is_disconnect(&source) => {
                return Ok(HandshakeEnd::Closed)
            }
            Err(err) => return Err(err),
        }
        let OptionHeader {
            option,
            length_bytes,
        } = OptionHeader::decode(&header).map_err(ConnectionError::BadOptionMagic)?;
        let option_name = proto::option_name(option);
        debug!(option = option_name, length_bytes, "NBD option");

        if length_bytes > shared.config.max_option_bytes {
            // NBD_OPT_EXPORT_NAME cannot be answered with an error.
            if u64::from(length_bytes) > OPTION_DISCARD_BYTES_MAX
                || option == proto::NBD_OPT_EXPORT_NAME
            {
                return Err(ConnectionError::OptionTooLarge {
                    option: option_name,
                    length_bytes,
                });
            }
            read_until(stream, deadline, "discarding an option")?;
            let discarded = io::copy(&mut stream.take(u64::from(length_bytes)), &mut io::sink())
                .map_err(handshake_read_error("discarding an option"))?;
            if discarded < u64::from(length_bytes) {
                return Ok(HandshakeEnd::Closed);
            }
            let message = format!(
                "option data of {length_bytes} bytes exceeds the server's limit of {}",
                shared.config.max_option_bytes
            );
            send_option_reply(
                stream,
                option,
                proto::NBD_REP_ERR_TOO_BIG,
                message.as_bytes(),
            )?;
            continue;
        }

        // Bounded by max_option_bytes.
        let mut data = vec![0; length_bytes as usize];
        read_before(stream, deadline, &mut data, "reading option data")?;

        if shared.service.is_shutting_down() {
            match option {
                proto::NBD_OPT_ABORT => {}
                // Cannot be answered with an error: hard disconnect.
                proto::NBD_OPT_EXPORT_NAME => return Ok(HandshakeEnd::Closed),
                _ => {
                    send_option_reply(
                        stream,
                        option,
                        proto::NBD_REP_ERR_SHUTDOWN,
                        b"server is shutting down",
                    )?;
                    continue;
                }
            }
        }

        match option {
            proto::NBD_OPT_EXPORT_NAME => {
                let name = proto::decode_name(&data).map_err(ConnectionError::InvalidExportName)?;
                let export =
                    shared
                        .exports
                        .lookup(name)
                        .ok_or_else(|| ConnectionError::UnknownExport {
                            name: name.to_owned(),
                        })?;
                let size_bytes = export.size_bytes();
                let reply =
                    proto::export_name_reply(size_bytes, proto::TRANSMISSION_FLAGS, no_zeroes);
                writer
                    .write_all(&reply)
                    .map_err(io_error("answering NBD_OPT_EXPORT_NAME"))?;
                return Ok(HandshakeEnd::Transmission(Negotiated {
                    name: name.to_owned(),
                    export,
                    size_bytes,
                }));
            }
            proto::NBD_OPT_ABORT => {
                // The client may close without reading the ACK; that is fine.
                let _ = send_option_reply(stream, option, proto::NBD_REP_ACK, &[]);
                return Ok(HandshakeEnd::Closed);
            }
            proto::NBD_OPT_LIST => {
                if !data.is_empty() {
                    send_option_reply(
                        stream,
                        option,
                        proto::NBD_REP_ERR_INVALID,
                        b"NBD_OPT_LIST carries no data",
                    )?;
                    continue;
                }
                let mut reply = Vec::new();
                for name in shared.exports.names() {
                    reply.extend(proto::option_reply(
                        option,
                        proto::NBD_REP_SERVER,
                        &proto::rep_server_data(&name),
                    ));
                }
                reply.extend(proto::option_reply(option, proto::NBD_REP_ACK, &[]));
                writer
                    .write_all(&reply)
                    .map_err(io_error("answering NBD_OPT_LIST"))?;
            }
            proto::NBD_OPT_INFO | proto::NBD_OPT_GO => {
                if let Some(negotiated) = answer_info(shared, stream, option, &data)? {
                    if option == proto::NBD_OPT_GO {
                        return Ok(HandshakeEnd::Transmission(negotiated));
                    }
                }
            }
            // STARTTLS (NOTLS mode answers UNSUP or POLICY), STRUCTURED_REPLY,
            // meta contexts, extended headers, and options we do not know.
            _ => {
                let message = format!("{option_name} ({option}) is not supported");
                send_option_reply(stream, option, proto::NBD_REP_ERR_UNSUP, message.as_bytes())?;
            }
        }
    }
}

pub(crate) fn send_option_reply(
    mut stream: &TcpStream,
    option: u32,
    reply_type: u32,
    data: &[u8],
) -> Result<(), ConnectionError> {
    stream
        .write_all(&proto::option_reply(option, reply_type, data))
        .map_err(io_error("sending an option reply"))
}

/// Answers `NBD_OPT_INFO` or `NBD_OPT_GO`; the chosen export if the answer
/// was a success.
pub(crate) fn answer_info(
    shared: &Shared,
    stream: &TcpStream,
    option: u32,
    data: &[u8],
) -> Result<Option<Negotiated>, ConnectionError> {
    let request = match InfoRequest::decode(data) {
        Ok(request) => request,
        Err(err) => {
            debug!(error = %err, "invalid NBD_OPT_INFO/GO data");
            send_option_reply(
                stream,
                option,
                proto::NBD_REP_ERR_INVALID,
                err.to_string().as_bytes(),
            )?;
            return Ok(None);
        }
    };
    let Some(export) = shared.exports.lookup(&request.name) else {
        debug!(
            name = request.name,
            "NBD client asked for an unknown export"
        );
        let message = format!("no export named {:?}", request.name);
        send_option_reply(
            stream,
            option,
            proto::NBD_REP_ERR_UNKNOWN,
            message.as_bytes(),
        )?;
        return Ok(None);
    };
    let size_bytes = export.size_bytes();
    let mut reply = proto::option_reply(
        option,
        proto::NBD_REP_INFO,
        &proto::info_export_data(size_bytes, proto::TRANSMISSION_FLAGS),
    );
    // The name the client used is the canonical one, except for the default
    // export, whose canonical name the Exports trait does not tell.
    if request.wants(proto::NBD_INFO_NAME) && !request.name.is_empty() {
        reply.extend(proto::option_reply(
            option,
            proto::NBD_REP_INFO,
            &proto::info_name_data(&request.name),
        ));
    }
    if request.wants(proto::NBD_INFO_BLOCK_SIZE) {
        reply.extend(proto::option_reply(
            option,
            proto::NBD_REP_INFO,
            &proto::info_block_size_data(
                proto::BLOCK_SIZE_MIN_BYTES,
                proto::BLOCK_SIZE_PREFERRED_BYTES,
                shared.config.max_request_bytes,
            ),
        ));
    }
    reply.extend(proto::option_reply(option, proto::NBD_REP_ACK, &[]));
    let mut writer = stream;
    writer
        .write_all(&reply)
        .map_err(io_error("answering NBD_OPT_INFO/GO"))?;
    Ok(Some(Negotiated {
        name: request.name,
        export,
        size_bytes,
    }))
}
