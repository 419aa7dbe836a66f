//! The NBD wire format: the protocol numbers this server uses, named as in
//! the spec (NetworkBlockDevice/nbd, doc/proto.md), and the encoders and
//! decoders of the messages it sends and receives.
//!
//! Every integer on the wire is big-endian. Only the fixed-newstyle
//! handshake and simple replies are spoken here: no oldstyle negotiation,
//! no structured replies, no extended headers, no TLS.

// ---------------------------------------------------------------------------
// Handshake phase
// ---------------------------------------------------------------------------

/// `NBDMAGIC`, the first 8 bytes the server sends (`INIT_PASSWD`).
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic the server sends next, and the magic that
/// starts every option the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Starts every option reply.
pub const NBD_REP_MAGIC: u64 = 0x0003_e889_0455_65a9;

const _: () = assert!(NBDMAGIC == u64::from_be_bytes(*b"NBDMAGIC"));
const _: () = assert!(IHAVEOPT == u64::from_be_bytes(*b"IHAVEOPT"));

/// Handshake flags (16 bits, server → client).
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
/// What this server offers: fixed newstyle, and no 124 zero bytes after
/// `NBD_OPT_EXPORT_NAME` for clients that agree.
pub const HANDSHAKE_FLAGS: u16 = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES;

/// Client flags (32 bits, client → server). Any other bit, or a bit for
/// something the server did not offer, makes the server drop the connection.
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;
pub const CLIENT_FLAGS_KNOWN: u32 = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;

// Every client flag we accept matches a handshake flag we send.
const _: () = assert!(CLIENT_FLAGS_KNOWN == HANDSHAKE_FLAGS as u32);

/// Option types.
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
pub const NBD_OPT_ABORT: u32 = 2;
pub const NBD_OPT_LIST: u32 = 3;
pub const NBD_OPT_PEEK_EXPORT: u32 = 4;
pub const NBD_OPT_STARTTLS: u32 = 5;
pub const NBD_OPT_INFO: u32 = 6;
pub const NBD_OPT_GO: u32 = 7;
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;
pub const NBD_OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply types. Errors have bit 31 set.
pub const NBD_REP_ACK: u32 = 1;
pub const NBD_REP_SERVER: u32 = 2;
pub const NBD_REP_INFO: u32 = 3;
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR | 1;
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR | 3;
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR | 6;
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR | 7;
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR | 9;
// Not sent by this server: NBD_REP_META_CONTEXT (no meta contexts),
// NBD_REP_ERR_POLICY, NBD_REP_ERR_PLATFORM, NBD_REP_ERR_TLS_REQD (NOTLS
// mode must never send it), NBD_REP_ERR_BLOCK_SIZE_REQD (clients that do
// not ask for block sizes are served, and their oversized requests errored).

/// Information types in `NBD_REP_INFO` replies to `NBD_OPT_INFO`/`NBD_OPT_GO`.
pub const NBD_INFO_EXPORT: u16 = 0;
pub const NBD_INFO_NAME: u16 = 1;
// NBD_INFO_DESCRIPTION (2) is optional and never sent: exports have no
// description.
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags (16 bits, sent with the export's size).
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// What every export offers. `CAN_MULTI_CONN`: a flush or FUA on one
/// connection covers writes acknowledged on every connection, because the
/// node's flush is global to the volume, not per connection.
pub const TRANSMISSION_FLAGS: u16 = NBD_FLAG_HAS_FLAGS
    | NBD_FLAG_SEND_FLUSH
    | NBD_FLAG_SEND_FUA
    | NBD_FLAG_SEND_TRIM
    | NBD_FLAG_SEND_WRITE_ZEROES
    | NBD_FLAG_CAN_MULTI_CONN;

// Features this server must not advertise: DF needs structured replies,
// FAST_ZERO a promise about speed the node cannot make, CACHE a command we
// do not implement; and volumes are writable.
const _: () = assert!(
    TRANSMISSION_FLAGS
        & (NBD_FLAG_READ_ONLY | NBD_FLAG_SEND_DF | NBD_FLAG_SEND_CACHE | NBD_FLAG_SEND_FAST_ZERO)
        == 0
);

/// The longest string (export name, message) the spec allows.
pub const NBD_STRING_BYTES_MAX: usize = 4096;

/// Block size constraints sent in `NBD_INFO_BLOCK_SIZE`: any alignment is
/// served (the node does its own read-modify-write), 4 KiB is efficient.
/// The maximum is the server's `max_request_bytes`.
pub const BLOCK_SIZE_MIN_BYTES: u32 = 1;
pub const BLOCK_SIZE_PREFERRED_BYTES: u32 = 4096;
// The spec: minimum a power of two ≤ 64 KiB; preferred a power of two at
// least max(minimum, 512).
const _: () = assert!(BLOCK_SIZE_MIN_BYTES.is_power_of_two() && BLOCK_SIZE_MIN_BYTES <= 65536);
const _: () = assert!(BLOCK_SIZE_PREFERRED_BYTES.is_power_of_two());
const _: () = assert!(BLOCK_SIZE_PREFERRED_BYTES >= 512);

// ---------------------------------------------------------------------------
// Transmission phase
// ---------------------------------------------------------------------------

pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Command flags.
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Request types.
pub const NBD_CMD_READ: u16 = 0;
pub const NBD_CMD_WRITE: u16 = 1;
pub const NBD_CMD_DISC: u16 = 2;
pub const NBD_CMD_FLUSH: u16 = 3;
pub const NBD_CMD_TRIM: u16 = 4;
pub const NBD_CMD_CACHE: u16 = 5;
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;

/// Error values in simple replies.
pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

// ---------------------------------------------------------------------------
// Message sizes
// ---------------------------------------------------------------------------

/// Option: magic (8), option (4), length of data (4).
pub const OPTION_HEADER_BYTES: usize = 8 + 4 + 4;
/// Option reply: magic (8), option (4), reply type (4), length of data (4).
pub const OPTION_REPLY_HEADER_BYTES: usize = 8 + 4 + 4 + 4;
/// Reply to `NBD_OPT_EXPORT_NAME`: size (8), transmission flags (2), then
/// 124 zero bytes unless `NBD_FLAG_C_NO_ZEROES`.
pub const EXPORT_NAME_REPLY_BYTES: usize = 8 + 2;
pub const EXPORT_NAME_ZEROES_BYTES: usize = 124;
/// `NBD_INFO_EXPORT`: type (2), size (8), transmission flags (2).
pub const INFO_EXPORT_BYTES: usize = 2 + 8 + 2;
/// `NBD_INFO_BLOCK_SIZE`: type (2), minimum, preferred, maximum (4 each).
pub const INFO_BLOCK_SIZE_BYTES: usize = 2 + 4 + 4 + 4;
/// `NBD_OPT_INFO`/`NBD_OPT_GO` data without the name: name length (4),
/// number of information requests (2).
pub const INFO_REQUEST_FIXED_BYTES: usize = 4 + 2;
/// Request: magic (4), flags (2), type (2), cookie (8), offset (8), length (4).
pub const REQUEST_HEADER_BYTES: usize = 4 + 2 + 2 + 8 + 8 + 4;
/// Simple reply: magic (4), error (4), cookie (8); READ data follows.
pub const SIMPLE_REPLY_BYTES: usize = 4 + 4 + 8;

const _: () = assert!(OPTION_HEADER_BYTES == 16);
const _: () = assert!(OPTION_REPLY_HEADER_BYTES == 20);
const _: () = assert!(EXPORT_NAME_REPLY_BYTES + EXPORT_NAME_ZEROES_BYTES == 134);
const _: () = assert!(INFO_EXPORT_BYTES == 12);
const _: () = assert!(INFO_BLOCK_SIZE_BYTES == 14);
const _: () = assert!(REQUEST_HEADER_BYTES == 28);
const _: () = assert!(SIMPLE_REPLY_BYTES == 16);

// ---------------------------------------------------------------------------
// Names, for logs
// ---------------------------------------------------------------------------

/// The spec's name of an option type.
pub fn option_name(option: u32) -> &'static str {
    match option {
        NBD_OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        NBD_OPT_ABORT => "NBD_OPT_ABORT",
        NBD_OPT_LIST => "NBD_OPT_LIST",
        NBD_OPT_PEEK_EXPORT => "NBD_OPT_PEEK_EXPORT",
        NBD_OPT_STARTTLS => "NBD_OPT_STARTTLS",
        NBD_OPT_INFO => "NBD_OPT_INFO",
        NBD_OPT_GO => "NBD_OPT_GO",
        NBD_OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        NBD_OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        NBD_OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        NBD_OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
        _ => "unknown",
    }
}

/// The spec's name of a request type.
pub fn command_name(command: u16) -> &'static str {
    match command {
        NBD_CMD_READ => "NBD_CMD_READ",
        NBD_CMD_WRITE => "NBD_CMD_WRITE",
        NBD_CMD_DISC => "NBD_CMD_DISC",
        NBD_CMD_FLUSH => "NBD_CMD_FLUSH",
        NBD_CMD_TRIM => "NBD_CMD_TRIM",
        NBD_CMD_CACHE => "NBD_CMD_CACHE",
        NBD_CMD_WRITE_ZEROES => "NBD_CMD_WRITE_ZEROES",
        NBD_CMD_BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
        _ => "unknown",
    }
}

// ---------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------

/// The first `N` bytes of `bytes` from `at`. Only called with constant
/// offsets into fixed-size arrays, so it cannot fail on any input.
fn field<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut out = [0; N];
    out.copy_from_slice(&bytes[at..at + N]);
    out
}

/// A client's option header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length_bytes: u32,
}

/// A message did not start with the magic number it must start with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bad magic {found:#x} (expected {expected:#x})")]
pub struct BadMagic {
    pub found: u64,
    pub expected: u64,
}

impl OptionHeader {
    pub fn decode(bytes: &[u8; OPTION_HEADER_BYTES]) -> Result<OptionHeader, BadMagic> {
        let magic = u64::from_be_bytes(field(bytes, 0));
        if magic != IHAVEOPT {
            return Err(BadMagic {
                found: magic,
                expected: IHAVEOPT,
            });
        }
        Ok(OptionHeader {
            option: u32::from_be_bytes(field(bytes, 8)),
            length_bytes: u32::from_be_bytes(field(bytes, 12)),
        })
    }
}

/// A transmission-phase request header, as received; the command and flags
/// are checked by the server, not here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length_bytes: u32,
}

impl RequestHeader {
    pub fn decode(bytes: &[u8; REQUEST_HEADER_BYTES]) -> Result<RequestHeader, BadMagic> {
        let magic = u32::from_be_bytes(field(bytes, 0));
        if magic != NBD_REQUEST_MAGIC {
            return Err(BadMagic {
                found: magic.into(),
                expected: NBD_REQUEST_MAGIC.into(),
            });
        }
        Ok(RequestHeader {
            flags: u16::from_be_bytes(field(bytes, 4)),
            command: u16::from_be_bytes(field(bytes, 6)),
            cookie: u64::from_be_bytes(field(bytes, 8)),
            offset: u64::from_be_bytes(field(bytes, 16)),
            length_bytes: u32::from_be_bytes(field(bytes, 24)),
        })
    }
}

/// Why an option's data could not be decoded (answered with
/// `NBD_REP_ERR_INVALID`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionDataError {
    #[error("option data ends early")]
    Truncated,
    #[error("{extra_bytes} bytes after the end of the option data")]
    TrailingBytes { extra_bytes: usize },
    #[error("export name of {length_bytes} bytes (at most {NBD_STRING_BYTES_MAX})")]
    NameTooLong { length_bytes: usize },
    #[error("export name is not UTF-8")]
    NameNotUtf8,
    #[error("export name contains NUL")]
    NameContainsNul,
    #[error("information type {info} requested twice")]
    DuplicateInfoRequest { info: u16 },
}

/// Checks an export name against the spec's rules for strings.
pub fn decode_name(bytes: &[u8]) -> Result<&str, OptionDataError> {
    if bytes.len() > NBD_STRING_BYTES_MAX {
        return Err(OptionDataError::NameTooLong {
            length_bytes: bytes.len(),
        });
    }
    let name = std::str::from_utf8(bytes).map_err(|_| OptionDataError::NameNotUtf8)?;
    if name.contains('\0') {
        return Err(OptionDataError::NameContainsNul);
    }
    Ok(name)
}

/// Reads big-endian fields off the front of a byte slice; `None` when the
/// slice is too short.
struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn u16(&mut self) -> Option<u16> {
        let (head, rest) = self.rest.split_first_chunk::<2>()?;
        self.rest = rest;
        Some(u16::from_be_bytes(*head))
    }

    fn u32(&mut self) -> Option<u32> {
        let (head, rest) = self.rest.split_first_chunk::<4>()?;
        self.rest = rest;
        Some(u32::from_be_bytes(*head))
    }

    fn bytes(&mut self, len: usize) -> Option<&'a [u8]> {
        if self.rest.len() < len {
            return None;
        }
        let (head, rest) = self.rest.split_at(len);
        self.rest = rest;
        Some(head)
    }
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`:
///
/// ```text
/// 32 bits  length of name
/// String   name of the export
/// 16 bits  number of information requests
/// 16 bits × n  NBD_INFO_* types
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

impl InfoRequest {
    pub fn decode(data: &[u8]) -> Result<InfoRequest, OptionDataError> {
        let mut cursor = Cursor { rest: data };
        let name_bytes = cursor.u32().ok_or(OptionDataError::Truncated)?;
        // A length that does not fit in usize cannot fit in the data either.
        let name_bytes = usize::try_from(name_bytes).map_err(|_| OptionDataError::Truncated)?;
        let name = cursor.bytes(name_bytes).ok_or(OptionDataError::Truncated)?;
        let name = decode_name(name)?.to_owned();
        let count = cursor.u16().ok_or(OptionDataError::Truncated)?;
        let mut infos = Vec::with_capacity(usize::from(count).min(cursor.rest.len() / 2));
        for _ in 0..count {
            let info = cursor.u16().ok_or(OptionDataError::Truncated)?;
            if infos.contains(&info) {
                return Err(OptionDataError::DuplicateInfoRequest { info });
            }
            infos.push(info);
        }
        if !cursor.rest.is_empty() {
            return Err(OptionDataError::TrailingBytes {
                extra_bytes: cursor.rest.len(),
            });
        }
        Ok(InfoRequest { name, infos })
    }

    pub fn wants(&self, info: u16) -> bool {
        self.infos.contains(&info)
    }
}

// ---------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn greeting() -> [u8; 8 + 8 + 2] {
    let mut out = [0; 18];
    out[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&HANDSHAKE_FLAGS.to_be_bytes());
    out
}

/// An option reply: header, then `data`.
pub fn option_reply(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    // Option data we send is bounded by the names and messages we put in it.
    let length_bytes = u32::try_from(data.len()).expect("option reply data fits in 32 bits");
    let mut out = Vec::with_capacity(OPTION_REPLY_HEADER_BYTES + data.len());
    out.extend_from_slice(&NBD_REP_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&length_bytes.to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// `NBD_REP_SERVER` data: name length, name.
pub fn rep_server_data(name: &str) -> Vec<u8> {
    let length_bytes = u32::try_from(name.len()).expect("export name fits in 32 bits");
    let mut out = Vec::with_capacity(4 + name.len());
    out.extend_from_slice(&length_bytes.to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

/// `NBD_REP_INFO` data of type `NBD_INFO_EXPORT`.
pub fn info_export_data(size_bytes: u64, transmission_flags: u16) -> [u8; INFO_EXPORT_BYTES] {
    let mut out = [0; INFO_EXPORT_BYTES];
    out[0..2].copy_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
    out[2..10].copy_from_slice(&size_bytes.to_be_bytes());
    out[10..12].copy_from_slice(&transmission_flags.to_be_bytes());
    out
}

/// `NBD_REP_INFO` data of type `NBD_INFO_NAME`.
pub fn info_name_data(name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + name.len());
    out.extend_from_slice(&NBD_INFO_NAME.to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

/// `NBD_REP_INFO` data of type `NBD_INFO_BLOCK_SIZE`.
pub fn info_block_size_data(
    minimum_bytes: u32,
    preferred_bytes: u32,
    maximum_bytes: u32,
) -> [u8; INFO_BLOCK_SIZE_BYTES] {
    let mut out = [0; INFO_BLOCK_SIZE_BYTES];
    out[0..2].copy_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
    out[2..6].copy_from_slice(&minimum_bytes.to_be_bytes());
    out[6..10].copy_from_slice(&preferred_bytes.to_be_bytes());
    out[10..14].copy_from_slice(&maximum_bytes.to_be_bytes());
    out
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags, and the
/// 124 reserved zero bytes unless the client set `NBD_FLAG_C_NO_ZEROES`.
pub fn export_name_reply(size_bytes: u64, transmission_flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(EXPORT_NAME_REPLY_BYTES + EXPORT_NAME_ZEROES_BYTES);
    out.extend_from_slice(&size_bytes.to_be_bytes());
    out.extend_from_slice(&transmission_flags.to_be_bytes());
    if !no_zeroes {
        out.resize(EXPORT_NAME_REPLY_BYTES + EXPORT_NAME_ZEROES_BYTES, 0);
    }
    out
}

/// Writes a simple reply header into the first 16 bytes of `out` (for a
/// READ, the data follows in the same buffer).
pub fn encode_simple_reply(out: &mut [u8; SIMPLE_REPLY_BYTES], error: u32, cookie: u64) {
    out[0..4].copy_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
}

/// A simple reply without data.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_BYTES] {
    let mut out = [0; SIMPLE_REPLY_BYTES];
    encode_simple_reply(&mut out, error, cookie);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info_data(name: &[u8], infos: &[u16]) -> Vec<u8> {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name);
        data.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for info in infos {
            data.extend_from_slice(&info.to_be_bytes());
        }
        data
    }

    #[test]
    fn info_request_round_trip() {
        let data = info_data(b"vol0", &[NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME]);
        let request = InfoRequest::decode(&data).expect("valid");
        assert_eq!(request.name, "vol0");
        assert!(request.wants(NBD_INFO_BLOCK_SIZE));
        assert!(request.wants(NBD_INFO_NAME));
        assert!(!request.wants(NBD_INFO_EXPORT));
    }

    #[test]
    fn info_request_rejects_every_truncation_and_trailing_bytes() {
        let data = info_data(b"vol0", &[NBD_INFO_BLOCK_SIZE]);
        for len in 0..data.len() {
            assert_eq!(
                InfoRequest::decode(&data[..len]),
                Err(OptionDataError::Truncated),
                "truncated at {len}"
            );
        }
        let mut long = data.clone();
        long.push(0);
        assert_eq!(
            InfoRequest::decode(&long),
            Err(OptionDataError::TrailingBytes { extra_bytes: 1 })
        );
    }

    #[test]
    fn info_request_rejects_bad_names_and_duplicates() {
        let huge_name_length = u32::MAX.to_be_bytes();
        assert_eq!(
            InfoRequest::decode(&huge_name_length),
            Err(OptionDataError::Truncated)
        );
        assert_eq!(
            InfoRequest::decode(&info_data(b"a\0b", &[])),
            Err(OptionDataError::NameContainsNul)
        );
        assert_eq!(
            InfoRequest::decode(&info_data(&[0xff, 0xfe], &[])),
            Err(OptionDataError::NameNotUtf8)
        );
        assert_eq!(
            InfoRequest::decode(&info_data(&[b'a'; NBD_STRING_BYTES_MAX + 1], &[])),
            Err(OptionDataError::NameTooLong {
                length_bytes: NBD_STRING_BYTES_MAX + 1
            })
        );
        assert_eq!(
            InfoRequest::decode(&info_data(b"v", &[NBD_INFO_NAME, NBD_INFO_NAME])),
            Err(OptionDataError::DuplicateInfoRequest {
                info: NBD_INFO_NAME
            })
        );
    }

    #[test]
    fn request_header_decodes_fields_and_checks_magic() {
        let mut bytes = [0u8; REQUEST_HEADER_BYTES];
        bytes[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        bytes[4..6].copy_from_slice(&NBD_CMD_FLAG_FUA.to_be_bytes());
        bytes[6..8].copy_from_slice(&NBD_CMD_WRITE.to_be_bytes());
        bytes[8..16].copy_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
        bytes[16..24].copy_from_slice(&4096u64.to_be_bytes());
        bytes[24..28].copy_from_slice(&512u32.to_be_bytes());
        let header = RequestHeader::decode(&bytes).expect("valid");
        assert_eq!(
            header,
            RequestHeader {
                flags: NBD_CMD_FLAG_FUA,
                command: NBD_CMD_WRITE,
                cookie: 0x0102_0304_0506_0708,
                offset: 4096,
                length_bytes: 512,
            }
        );
        bytes[0] ^= 1;
        assert!(RequestHeader::decode(&bytes).is_err());
    }

    #[test]
    fn replies_have_the_spec_layout() {
        let reply = simple_reply(NBD_EINVAL, 7);
        assert_eq!(&reply[0..4], &[0x67, 0x44, 0x66, 0x98]);
        assert_eq!(&reply[4..8], &22u32.to_be_bytes());
        assert_eq!(&reply[8..16], &7u64.to_be_bytes());

        let reply = option_reply(NBD_OPT_LIST, NBD_REP_ACK, &[]);
        assert_eq!(reply.len(), OPTION_REPLY_HEADER_BYTES);
        assert_eq!(&reply[0..8], &[0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9]);

        assert_eq!(export_name_reply(1, TRANSMISSION_FLAGS, false).len(), 134);
        assert_eq!(export_name_reply(1, TRANSMISSION_FLAGS, true).len(), 10);
        assert_eq!(&greeting()[0..8], b"NBDMAGIC");
        assert_eq!(&greeting()[8..16], b"IHAVEOPT");
    }
}
