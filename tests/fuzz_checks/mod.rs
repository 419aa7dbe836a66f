//! The properties nvmirror's fuzz targets check, shared with the test that
//! replays the committed corpora and every crash the fuzzer ever found
//! (`fuzz/regressions/<target>/`), and with the seed writer
//! (`examples/fuzz_seeds.rs`), which uses the encoders.
//!
//! | target           | parser                                   | check                       |
//! |------------------|------------------------------------------|-----------------------------|
//! | `nbd_request`    | `nbd::proto::RequestHeader::decode`      | [`check_nbd_request`]       |
//! | `nbd_handshake`  | `OptionHeader`, `decode_name`, `InfoRequest` | [`check_nbd_handshake`] |
//! | `mailbox`        | `mailbox::decode`                        | [`check_mailbox`]           |
//! | `owner`          | `ha::ownership::decode`                  | [`check_owner`]             |
//! | `takeover_index` | `ha::index::TakeoverIndex::decode`       | [`check_takeover_index`]    |
//! | `config`         | `config::Config::parse`                  | [`check_config`]            |

// Each fuzz target includes this module and uses one of its checks.
#![allow(dead_code)]

use std::collections::HashSet;

use nvmirror::config::{Config, ConfigError};
use nvmirror::ha::index::TakeoverIndex;
use nvmirror::nbd::proto::{
    command_name, decode_name, option_name, BadMagic, InfoRequest, OptionDataError, OptionHeader,
    RequestHeader, IHAVEOPT, NBD_CMD_WRITE, NBD_OPT_EXPORT_NAME, NBD_OPT_GO, NBD_OPT_INFO,
    NBD_REQUEST_MAGIC, NBD_STRING_BYTES_MAX, OPTION_HEADER_BYTES, REQUEST_HEADER_BYTES,
};
use nvmirror::storage::extents::Source;
use nvmirror::storage::mailbox::{self, MAILBOX_FORMAT_VERSION};
use nvmirror::storage::ownership::{self, OWNER_FORMAT_VERSION};

// ---------------------------------------------------------------------------
// NBD: encoders written from the spec (doc/proto.md), as a client sends
// ---------------------------------------------------------------------------

/// A request header as a client sends it (all big-endian).
pub fn encode_request(header: &RequestHeader) -> [u8; REQUEST_HEADER_BYTES] {
    let mut out = [0; REQUEST_HEADER_BYTES];
    out[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&header.flags.to_be_bytes());
    out[6..8].copy_from_slice(&header.command.to_be_bytes());
    out[8..16].copy_from_slice(&header.cookie.to_be_bytes());
    out[16..24].copy_from_slice(&header.offset.to_be_bytes());
    out[24..28].copy_from_slice(&header.length_bytes.to_be_bytes());
    out
}

/// An option as a client sends it: header, then `data`.
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let length_bytes = u32::try_from(data.len()).expect("option data fits in 32 bits");
    let mut out = Vec::with_capacity(OPTION_HEADER_BYTES + data.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&length_bytes.to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// The data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub fn encode_info_request(name: &[u8], infos: &[u16]) -> Vec<u8> {
    let name_bytes = u32::try_from(name.len()).expect("name fits in 32 bits");
    let count = u16::try_from(infos.len()).expect("at most 65535 information requests");
    let mut out = Vec::with_capacity(4 + name.len() + 2 + 2 * infos.len());
    out.extend_from_slice(&name_bytes.to_be_bytes());
    out.extend_from_slice(name);
    out.extend_from_slice(&count.to_be_bytes());
    for info in infos {
        out.extend_from_slice(&info.to_be_bytes());
    }
    out
}

fn check_bad_magic(error: BadMagic, found: u64, expected: u64) {
    assert_eq!(error, BadMagic { found, expected });
    assert_ne!(found, expected, "the right magic was refused");
    assert!(!error.to_string().is_empty());
}

/// Input: the transmission-phase byte stream from a client: request
/// headers, each WRITE followed by its payload. Every header with the
/// request magic decodes to exactly the fields a client encoded; any other
/// is refused as a bad magic, naming what was found (the server then drops
/// the connection, so the stream ends there).
pub fn check_nbd_request(data: &[u8]) {
    let mut rest = data;
    while let Some((bytes, after)) = rest.split_first_chunk::<REQUEST_HEADER_BYTES>() {
        let magic = u32::from_be_bytes(bytes[0..4].try_into().expect("four bytes"));
        let header = match RequestHeader::decode(bytes) {
            Ok(header) => header,
            Err(error) => {
                check_bad_magic(error, magic.into(), NBD_REQUEST_MAGIC.into());
                return;
            }
        };
        assert_eq!(magic, NBD_REQUEST_MAGIC);
        assert_eq!(&encode_request(&header), bytes, "a field was misread");
        assert!(!command_name(header.command).is_empty());
        rest = after;
        if header.command == NBD_CMD_WRITE {
            let payload_bytes = rest.len().min(header.length_bytes as usize);
            rest = &rest[payload_bytes..];
        }
    }
}

/// Input: the handshake byte stream from a client after the greeting:
/// client flags (4 bytes), then options. Every option header with the
/// magic decodes to exactly its fields; the data of `NBD_OPT_EXPORT_NAME`
/// goes through [`check_export_name`], that of `NBD_OPT_INFO` and
/// `NBD_OPT_GO` through [`check_info_request`]. Unlike the server, this
/// goes on after an option that would end the handshake, to reach more
/// options per input.
pub fn check_nbd_handshake(data: &[u8]) {
    let Some((_client_flags, mut rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    while let Some((bytes, after)) = rest.split_first_chunk::<OPTION_HEADER_BYTES>() {
        let magic = u64::from_be_bytes(bytes[0..8].try_into().expect("eight bytes"));
        let header = match OptionHeader::decode(bytes) {
            Ok(header) => header,
            Err(error) => {
                check_bad_magic(error, magic, IHAVEOPT);
                return;
            }
        };
        assert_eq!(magic, IHAVEOPT);
        assert_eq!(
            &encode_option(header.option, &[])[..OPTION_HEADER_BYTES - 4],
            &bytes[..OPTION_HEADER_BYTES - 4]
        );
        assert_eq!(header.length_bytes.to_be_bytes(), bytes[12..16]);
        assert!(!option_name(header.option).is_empty());
        let Some((option_data, after)) = after.split_at_checked(header.length_bytes as usize)
        else {
            // The server would wait for the rest of the data.
            return;
        };
        match header.option {
            NBD_OPT_EXPORT_NAME => check_export_name(option_data),
            NBD_OPT_INFO | NBD_OPT_GO => check_info_request(option_data),
            _ => {}
        }
        rest = after;
    }
}

/// An export name is accepted exactly when the spec's string rules hold
/// (at most 4096 bytes, UTF-8, no NUL), and otherwise refused for the
/// first rule broken, in that order.
pub fn check_export_name(bytes: &[u8]) {
    let expected = if bytes.len() > NBD_STRING_BYTES_MAX {
        Err(OptionDataError::NameTooLong {
            length_bytes: bytes.len(),
        })
    } else {
        match std::str::from_utf8(bytes) {
            Err(_) => Err(OptionDataError::NameNotUtf8),
            Ok(name) if name.contains('\0') => Err(OptionDataError::NameContainsNul),
            Ok(name) => Ok(name),
        }
    };
    let decoded = decode_name(bytes);
    assert_eq!(decoded, expected);
    if let Err(error) = decoded {
        assert!(!error.to_string().is_empty());
    }
}

/// An accepted `NBD_OPT_INFO`/`NBD_OPT_GO` request is exactly the encoding
/// of what it decoded to: a valid name, and information types each asked
/// for once.
pub fn check_info_request(data: &[u8]) {
    match InfoRequest::decode(data) {
        Ok(request) => {
            assert_eq!(
                encode_info_request(request.name.as_bytes(), &request.infos),
                data,
                "an accepted request is not what a client sends for it"
            );
            assert_eq!(decode_name(request.name.as_bytes()), Ok(&*request.name));
            let distinct: HashSet<u16> = request.infos.iter().copied().collect();
            assert_eq!(distinct.len(), request.infos.len(), "a duplicate passed");
            assert!(request.infos.iter().all(|&info| request.wants(info)));
        }
        Err(error) => assert!(!error.to_string().is_empty()),
    }
}

// ---------------------------------------------------------------------------
// Files on the shared storage and in the data directory
// ---------------------------------------------------------------------------

/// Input: a mailbox file. An accepted mailbox has the known format
/// version, and writing it the way `Mailbox::update` does reads back the
/// same.
pub fn check_mailbox(data: &[u8]) {
    match mailbox::decode(data) {
        Ok(state) => {
            assert_eq!(state.format_version, MAILBOX_FORMAT_VERSION);
            let written = serde_json::to_vec_pretty(&state).expect("a mailbox serializes");
            assert_eq!(mailbox::decode(&written), Ok(state));
        }
        Err(reason) => assert!(!reason.is_empty()),
    }
}

/// Input: an owner file. An accepted one has the known format version and
/// names nodes of the pair, and writing it the way `change_hands` does
/// reads back the same.
pub fn check_owner(data: &[u8]) {
    match ownership::decode(data) {
        Ok(owner) => {
            assert_eq!(owner.format_version, OWNER_FORMAT_VERSION);
            assert!((1..=2).contains(&owner.owner) && (1..=2).contains(&owner.volumes_of));
            let written = serde_json::to_vec_pretty(&owner).expect("an owner serializes");
            assert_eq!(ownership::decode(&written), Ok(owner));
        }
        Err(reason) => assert!(!reason.is_empty()),
    }
}

/// Bit of a `takeover_index` input's first byte: the rest is an index
/// without its CRC, which the check appends, so the fuzzer reaches the
/// checks behind the checksum. Without it the rest is a whole index file.
pub const INDEX_APPEND_CRC: u8 = 0x01;

/// Byte ranges of an index the decoder ignores: the header's reserved
/// word, each entry's reserved bytes, and the region offset of an entry
/// whose source is not the region (see the layout in `src/ha/index.rs`).
const INDEX_HEADER_BYTES: usize = 32;
const INDEX_ENTRY_BYTES: usize = 40;

/// Input: an options byte ([`INDEX_APPEND_CRC`]), then an index. An
/// accepted index holds only non-empty, non-overflowing ranges; it
/// re-encodes to an index of the same length that decodes to the same, and
/// to the input's very bytes once the input's ignored bytes (reserved, and
/// offsets of entries not in the region) are zeroed.
pub fn check_takeover_index(data: &[u8]) {
    let Some((&options, rest)) = data.split_first() else {
        return;
    };
    let mut file = rest.to_vec();
    if options & INDEX_APPEND_CRC != 0 {
        let crc = crc32c::crc32c(&file);
        file.extend_from_slice(&crc.to_le_bytes());
    }
    let Ok(index) = TakeoverIndex::decode(&file) else {
        return;
    };
    for entry in &index.entries {
        assert!(entry.len > 0 && entry.start.checked_add(entry.len).is_some());
    }
    let encoded = index.encode();
    assert_eq!(encoded.len(), file.len());
    assert_eq!(TakeoverIndex::decode(&encoded).as_ref(), Ok(&index));
    assert_eq!(
        encoded,
        without_ignored_bytes(&file, &index),
        "the decoder ignored bytes it should have checked"
    );
}

/// `file` with the bytes the decoder ignores zeroed, and its CRC redone.
fn without_ignored_bytes(file: &[u8], index: &TakeoverIndex) -> Vec<u8> {
    let mut canonical = file[..file.len() - 4].to_vec();
    canonical[12..16].fill(0);
    for (i, entry) in index.entries.iter().enumerate() {
        let at = INDEX_HEADER_BYTES + i * INDEX_ENTRY_BYTES;
        canonical[at + 5..at + 8].fill(0);
        if !matches!(entry.source, Source::Region { .. }) {
            canonical[at + 32..at + 40].fill(0);
        }
    }
    let crc = crc32c::crc32c(&canonical);
    canonical.extend_from_slice(&crc.to_le_bytes());
    canonical
}

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

/// `Config::parse` reads `interconnect.key_file` when it is a regular file
/// (anything else is refused unread). A pseudo-file such as `/proc/kmsg`
/// says it is regular and blocks its reader, so inputs naming one under
/// /proc or /sys are skipped (a limit of the harness: the parser would
/// block as well, as `cat` would).
fn key_file_may_block(text: &str) -> bool {
    if !text.contains("key_file") {
        return false;
    }
    let Ok(raw) = toml::from_str::<Config>(text) else {
        return false;
    };
    let Some(path) = raw.interconnect.key_file.as_deref() else {
        return false;
    };
    std::fs::canonicalize(path)
        .is_ok_and(|path| path.starts_with("/proc") || path.starts_with("/sys"))
}

/// Input: TOML text (inputs that are not UTF-8 are skipped: the config is
/// read as a string). `Config::parse` never panics; it refuses with a
/// parse or field error, never a read error, or returns a configuration
/// that holds every rule `validate` states. Parsing is deterministic.
pub fn check_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if key_file_may_block(text) {
        return;
    }
    match Config::parse(text) {
        Ok(config) => {
            check_valid_config(&config);
            let again = Config::parse(text).expect("parsing is deterministic");
            assert_eq!(format!("{again:?}"), format!("{config:?}"));
        }
        Err(error @ (ConfigError::Parse { .. } | ConfigError::Invalid { .. })) => {
            assert!(!error.to_string().is_empty());
        }
        Err(error @ ConfigError::Read { .. }) => {
            panic!("parsing text gave a read error: {error}")
        }
    }
}

fn check_valid_config(config: &Config) {
    assert!((1..=2).contains(&config.node_id));
    assert_eq!(config.partner_id() + config.node_id, 3);
    nvlog::Geometry::new(config.nvram.half_size.0).expect("a valid log geometry");
    assert!(!config.volumes.is_empty());
    let mut names = HashSet::new();
    for (index, volume) in config.volumes.iter().enumerate() {
        let name = &volume.name;
        assert!((1..=64).contains(&name.len()), "volume name {name:?}");
        assert!(!name.starts_with('-'));
        assert!(name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert!(names.insert(name.clone()), "volume {name:?} twice");
        let size = config.volume_size(index);
        assert!(size > 0 && size % 512 == 0);
    }
    let ic = &config.interconnect;
    assert!((1..=4096).contains(&ic.slots));
    assert!(0 < ic.heartbeat_interval_ms && ic.heartbeat_interval_ms < ic.heartbeat_timeout_ms);
    assert_ne!(ic.listen, ic.partner);
    assert!(ic.key.is_some() != ic.key_file.is_some());
    let key = config.key_bytes().expect("a valid config has a key");
    assert!(key.len() >= interconnect::PresharedKey::MIN_LEN_BYTES);
    assert!(config.consistency_point.interval_ms > 0);
    assert!((1..=100).contains(&config.consistency_point.threshold_percent));
}
