//! Writes the seed corpora of nvmirror's fuzz targets (see
//! `tests/fuzz_checks/mod.rs`): what clients send, and the files the node
//! writes, so the fuzzer starts from real inputs.
//!
//! `cargo run -p nvmirror --example fuzz_seeds -- fuzz/corpus`

#[path = "../tests/fuzz_checks/mod.rs"]
mod fuzz_checks;

use std::path::Path;

use fuzz_checks::{encode_info_request, encode_option, encode_request, INDEX_APPEND_CRC};
use nvmirror::ha::index::TakeoverIndex;
use nvmirror::nbd::proto::*;
use nvmirror::storage::mailbox::{self, Mailbox};
use nvmirror::storage::ownership;
use nvmirror::testing::fixtures::{example_index, example_mailbox_state, MINIMAL_CONFIG};

type Seeds = Vec<(&'static str, Vec<u8>)>;

fn main() {
    let dir = std::env::args()
        .nth(1)
        .expect("usage: fuzz_seeds <corpus dir>");
    let dir = Path::new(&dir);
    write_seeds(dir, "nbd_request", nbd_requests());
    write_seeds(dir, "nbd_handshake", nbd_handshakes());
    let scratch = tempfile::tempdir().expect("scratch dir");
    write_seeds(dir, "mailbox", mailboxes(scratch.path()));
    write_seeds(dir, "owner", owners(scratch.path()));
    write_seeds(dir, "takeover_index", takeover_indexes());
    write_seeds(dir, "config", configs());
}

fn request(command: u16, flags: u16, cookie: u64, offset: u64, length_bytes: u32) -> Vec<u8> {
    encode_request(&RequestHeader {
        flags,
        command,
        cookie,
        offset,
        length_bytes,
    })
    .to_vec()
}

fn nbd_requests() -> Seeds {
    let payload = vec![0xa5; 512];
    let mut write = request(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 2, 4096, 512);
    write.extend_from_slice(&payload);
    let mut session = Vec::new();
    session.extend(request(NBD_CMD_READ, 0, 1, 0, 4096));
    session.extend(&write);
    session.extend(request(NBD_CMD_FLUSH, 0, 3, 0, 0));
    session.extend(request(NBD_CMD_TRIM, 0, 4, 8192, 4096));
    session.extend(request(
        NBD_CMD_WRITE_ZEROES,
        NBD_CMD_FLAG_NO_HOLE,
        5,
        1 << 20,
        1 << 16,
    ));
    session.extend(request(NBD_CMD_DISC, 0, 6, 0, 0));
    let mut bad_magic = request(NBD_CMD_READ, 0, 7, 0, 512);
    bad_magic[0] ^= 0xff;
    vec![
        ("read", request(NBD_CMD_READ, 0, 1, 0, 4096)),
        ("write-fua", write),
        ("session", session),
        ("unsupported", {
            let mut requests = request(NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_REQ_ONE, 8, 0, 512);
            requests.extend(request(NBD_CMD_CACHE, 0, 9, 0, 512));
            requests
        }),
        ("bad-magic", bad_magic),
    ]
}

fn handshake(options: &[Vec<u8>]) -> Vec<u8> {
    let flags = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;
    let mut out = flags.to_be_bytes().to_vec();
    for option in options {
        out.extend_from_slice(option);
    }
    out
}

fn nbd_handshakes() -> Seeds {
    let go =
        |name: &[u8], infos: &[u16]| encode_option(NBD_OPT_GO, &encode_info_request(name, infos));
    let info =
        |name: &[u8], infos: &[u16]| encode_option(NBD_OPT_INFO, &encode_info_request(name, infos));
    vec![
        // What nvmirror's own client sends.
        ("go", handshake(&[go(b"vol0", &[])])),
        (
            "go-with-infos",
            handshake(&[go(b"vol0", &[NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME])]),
        ),
        (
            "info-then-go",
            handshake(&[info(b"db", &[NBD_INFO_EXPORT]), go(b"db", &[])]),
        ),
        (
            "list-then-export-name",
            handshake(&[
                encode_option(NBD_OPT_LIST, &[]),
                encode_option(NBD_OPT_EXPORT_NAME, b"vol0"),
            ]),
        ),
        ("default-export", handshake(&[go(b"", &[])])),
        ("abort", handshake(&[encode_option(NBD_OPT_ABORT, &[])])),
        (
            // Roughly qemu's opening: structured replies and meta contexts
            // (refused), then GO.
            "unsupported-then-go",
            handshake(&[
                encode_option(NBD_OPT_STRUCTURED_REPLY, &[]),
                encode_option(
                    NBD_OPT_SET_META_CONTEXT,
                    &[0, 0, 0, 4, b'v', b'o', b'l', b'0'],
                ),
                encode_option(NBD_OPT_STARTTLS, &[]),
                go(b"vol0", &[NBD_INFO_BLOCK_SIZE]),
            ]),
        ),
        (
            "bad-names",
            handshake(&[
                go(b"a\0b", &[]),
                info(b"vol0", &[NBD_INFO_NAME, NBD_INFO_NAME]),
                encode_option(NBD_OPT_EXPORT_NAME, &[0xff, 0xfe]),
            ]),
        ),
    ]
}

/// Mailboxes as `Mailbox::update` writes them.
fn mailboxes(aggregate_dir: &Path) -> Seeds {
    let mailbox = Mailbox::new(aggregate_dir, example_mailbox_state());
    let mut seeds = Vec::new();
    mailbox.update(|_| {}).expect("write mailbox");
    seeds.push(("starting", std::fs::read(mailbox.path()).expect("read")));
    mailbox
        .update(|state| {
            state.heartbeat_seq = 12_345;
            state.state = "serving".into();
            state.mirror_in_sync = true;
            state.out_of_sync_reason = None;
        })
        .expect("write mailbox");
    seeds.push(("serving", std::fs::read(mailbox.path()).expect("read")));
    assert!(mailbox::read(aggregate_dir, 1).expect("read").is_some());
    seeds
}

/// Owner files as `change_hands` writes them: a takeover, then a giveback.
fn owners(aggregate_dir: &Path) -> Seeds {
    let path = ownership::owner_path(aggregate_dir, 1);
    let initial = ownership::read(aggregate_dir, 1).expect("initial owner");
    let taken = ownership::change_hands(aggregate_dir, &initial, 2, true, false, "takeover")
        .expect("takeover");
    let takeover = std::fs::read(&path).expect("read");
    ownership::change_hands(aggregate_dir, &taken, 1, false, true, "giveback").expect("giveback");
    let giveback = std::fs::read(&path).expect("read");
    vec![("takeover", takeover), ("giveback", giveback)]
}

fn takeover_indexes() -> Seeds {
    let index = example_index();
    let empty = TakeoverIndex {
        partner: 1,
        epoch: 1,
        entries: Vec::new(),
    };
    let whole = |index: &TakeoverIndex| {
        let mut seed = vec![0];
        seed.extend(index.encode());
        seed
    };
    let without_crc = |index: &TakeoverIndex| {
        let encoded = index.encode();
        let mut seed = vec![INDEX_APPEND_CRC];
        seed.extend_from_slice(&encoded[..encoded.len() - 4]);
        seed
    };
    vec![
        ("three-entries", whole(&index)),
        ("three-entries-crc-appended", without_crc(&index)),
        ("empty", whole(&empty)),
        ("empty-crc-appended", without_crc(&empty)),
    ]
}

const MINIMAL: &str = MINIMAL_CONFIG;

const FULL: &str = r#"node_id = 2
data_dir = "/var/lib/nvmirror"
aggregate_dir = "/shared/nvmirror"
durability = "persist"
log_level = "info,nvmirror=debug"

[nvram]
half_size = "32MiB"

[nbd]
listen = "0.0.0.0:10809"

[[volume]]
name = "db"
size = "10GiB"

[[volume]]
name = "logs_2"
size = 1073741824

[interconnect]
transport = "tcp"
listen = "10.0.0.2:7100"
partner = "10.0.0.1:7100"
key = "a long random secret"
slots = 64
heartbeat_interval_ms = 100
heartbeat_timeout_ms = 2000

[checkpoint]
interval_ms = 5000
threshold_percent = 50

[ha]
admin_listen = "127.0.0.1:7180"
mailbox_interval_ms = 200
mailbox_timeout_ms = 2000
auto_takeover = true
auto_giveback_delay_ms = 30000
hook = "/etc/nvmirror/move-ip.sh"
replay_max_bytes_per_s = "100MiB"
"#;

fn configs() -> Seeds {
    for valid in [MINIMAL, FULL] {
        nvmirror::config::Config::parse(valid).expect("a valid seed");
    }
    let text = |s: String| s.into_bytes();
    vec![
        ("minimal", text(MINIMAL.into())),
        ("full", text(FULL.into())),
        (
            "ipv6",
            text(
                MINIMAL
                    .replace("127.0.0.1:7001", "[::1]:7001")
                    .replace("127.0.0.1:7002", "[fe80::1%2]:7002"),
            ),
        ),
        (
            "rdma",
            text(FULL.replace(
                "transport = \"tcp\"",
                "transport = \"rdma\"\ndevice = \"rxe0\"",
            )),
        ),
        (
            "key-file-missing",
            text(MINIMAL.replace(
                "key = \"a secret of sixteen bytes or more\"",
                "key_file = \"/nonexistent/nvmirror-fuzz/key\"",
            )),
        ),
        (
            "node-id-3",
            text(MINIMAL.replace("node_id = 1", "node_id = 3")),
        ),
        (
            "size-unit",
            text(MINIMAL.replace("\"64MiB\"", "\"64 parsecs\"")),
        ),
        (
            "volume-twice",
            text(format!(
                "{MINIMAL}\n[[volume]]\nname = \"vol0\"\nsize = 4096\n"
            )),
        ),
        (
            "unknown-field",
            text(MINIMAL.replace("node_id = 1", "node_id = 1\nnode_idd = 2")),
        ),
        (
            "heartbeat-order",
            text(format!(
                "{}heartbeat_interval_ms = 500\nheartbeat_timeout_ms = 500\n",
                MINIMAL
            )),
        ),
        (
            "unterminated",
            text(MINIMAL.replace("\"/tmp/agg\"", "\"/tmp/agg")),
        ),
    ]
}

fn write_seeds(dir: &Path, target: &str, seeds: Seeds) {
    let dir = dir.join(target);
    std::fs::create_dir_all(&dir).expect("create corpus dir");
    for (name, seed) in seeds {
        std::fs::write(dir.join(name), seed).expect("write seed");
    }
}
