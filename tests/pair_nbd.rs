//! A pair of node processes on loopback (TCP interconnect) with stock NBD
//! clients: qemu-io, qemu-img, nbdsh, nbdinfo, nbdcopy.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn stock_clients_write_and_read_back_and_the_mirror_is_identical() {
    let mut pair = Pair::start();
    let uri0 = pair.node(1).uri("vol0");
    let uri1 = pair.node(1).uri("vol1");

    let list = tool_ok(
        "nbdinfo",
        &[
            "--list",
            &format!("nbd://127.0.0.1:{}", pair.node(1).nbd.port()),
        ],
    );
    assert!(
        list.contains("vol0") && list.contains("vol1"),
        "nbdinfo --list: {list}"
    );
    let info = tool_ok("nbdinfo", &["--json", &uri0]);
    assert!(
        info.contains(&format!("\"export-size\": {VOLUME_BYTES}")),
        "{info}"
    );

    // qemu-io: patterns at aligned and unaligned offsets, with FUA, then
    // verified reads.
    tool_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri0,
            "-c",
            "write -P 0xa1 0 64k",
            "-c",
            "write -P 0xb2 1M 1M",
            "-c",
            "write -f -P 0xc3 100001 3000",
            "-c",
            "write -z 2M 128k",
            "-c",
            "discard 3M 64k",
        ],
    );
    let verify = tool_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri0,
            "-c",
            "read -P 0xa1 0 64k",
            "-c",
            "read -P 0xb2 1M 1M",
            "-c",
            "read -P 0xc3 100001 3000",
            "-c",
            "read -P 0 2M 128k",
            "-c",
            "read -P 0 3M 64k",
        ],
    );
    assert!(!verify.contains("Pattern verification failed"), "{verify}");

    // nbdsh: pipelined writes of distinct patterns, read back.
    let script = r#"
import os
blocks = 64
for i in range(blocks):
    h.aio_pwrite(bytes([i + 1]) * 4096, i * 8192)
while h.aio_in_flight() > 0:
    h.poll(-1)
h.flush()
for i in range(blocks):
    assert h.pread(4096, i * 8192) == bytes([i + 1]) * 4096, i
    assert h.pread(4096, i * 8192 + 4096) == bytes(4096), i
print("nbdsh ok")
"#;
    let output = nbdsh(&uri1, script);
    assert!(
        output.status.success() && String::from_utf8_lossy(&output.stdout).contains("nbdsh ok"),
        "nbdsh: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    // nbdcopy in and out; qemu-img compares.
    let source = pair.dir.path().join("source.img");
    let data: Vec<u8> = (0..VOLUME_BYTES)
        .map(|i| ((i * 2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&source, &data).expect("write source image");
    tool_ok("nbdcopy", &[source.to_str().expect("utf-8"), &uri1]);
    let copy = pair.dir.path().join("copy.img");
    tool_ok("nbdcopy", &[&uri1, copy.to_str().expect("utf-8")]);
    assert!(
        std::fs::read(&copy).expect("copy") == data,
        "nbdcopy round trip differs"
    );
    let compare = tool_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            source.to_str().expect("utf-8"),
            &uri1,
        ],
    );
    assert!(compare.contains("Images are identical"), "{compare}");

    // The partner's mirror is byte-identical to the writer's live log.
    wait_for(
        "node 2's mirror to match node 1's log",
        Duration::from_secs(10),
        || pair.mirror_matches(1, 2),
    );
    let dump = std::process::Command::new(nvmirror_bin())
        .args(["nvlog", "dump", "--area", "mirror"])
        .arg(pair.nvram(2))
        .output()
        .expect("nvlog dump");
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(
        dump.contains("header: node 1"),
        "node 2 mirrors node 1's log:\n{dump}"
    );

    // A clean stop: SIGTERM, a final consistency point, exit 0.
    let stopped = pair.node(1).stop(Duration::from_secs(30)).expect("SIGTERM");
    assert!(stopped.success(), "{}", pair.node(1).log());
    let dump = std::process::Command::new(nvmirror_bin())
        .args(["nvlog", "dump"])
        .arg(pair.nvram(1))
        .output()
        .expect("nvlog dump");
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(
        dump.contains("0 live records"),
        "the final CP flushed everything:\n{dump}"
    );
    pair.node(1).start(START).expect("restart node 1");
    let verify = tool_ok("qemu-io", &["-f", "raw", &uri0, "-c", "read -P 0xb2 1M 1M"]);
    assert!(!verify.contains("Pattern verification failed"), "{verify}");
    let compare = tool_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            source.to_str().expect("utf-8"),
            &uri1,
        ],
    );
    assert!(compare.contains("Images are identical"), "{compare}");
}

#[test]
fn partner_down_marks_out_of_sync_and_partner_back_resyncs() {
    let mut pair = Pair::start();
    let uri = pair.node(1).uri("vol0");
    assert!(pair.in_sync(1));
    pair.node(2).kill9();
    tool_ok(
        "qemu-io",
        &["-f", "raw", &uri, "-c", "write -P 0x5a 0 256k"],
    );
    let mailbox = pair.mailbox(1);
    assert!(!mailbox.mirror_in_sync, "{mailbox:?}");
    assert!(
        mailbox
            .out_of_sync_reason
            .as_deref()
            .is_some_and(|r| !r.is_empty()),
        "{mailbox:?}"
    );

    pair.node(2).start(START).expect("restart node 2");
    pair.wait_in_sync(1);
    tool_ok(
        "qemu-io",
        &["-f", "raw", &uri, "-c", "write -P 0x6b 256k 256k"],
    );
    wait_for(
        "the mirror to match after the resync",
        Duration::from_secs(10),
        || pair.mirror_matches(1, 2),
    );
    let verify = tool_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "read -P 0x5a 0 256k",
            "-c",
            "read -P 0x6b 256k 256k",
        ],
    );
    assert!(!verify.contains("Pattern verification failed"), "{verify}");
}

/// kill -9 the writing node in the middle of a stream of writes, and again
/// during its recovery; after a restart every acknowledged write reads back
/// and nothing else changed.
#[test]
fn kill9_mid_stream_loses_no_acknowledged_write() {
    let mut pair = Pair::start();
    let uri = pair.node(1).uri("vol0");
    // The writer reports every acknowledged write on stdout, at once.
    let script = r#"
import sys
i = 0
try:
    while i < 100000:
        block = (i * 7919) % 4096
        h.pwrite(((i % 250) + 1).to_bytes(1, "little") * 4096, block * 4096)
        print("acked", i, block, flush=True)
        i += 1
except Exception as e:
    print("stopped", e, flush=True)
"#;
    let mut writer = nbdsh_command(&uri, script)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("nbdsh writer");
    let mut writer_stdout = writer.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut text = String::new();
        let _ = writer_stdout.read_to_string(&mut text);
        text
    });
    std::thread::sleep(Duration::from_millis(1500));
    pair.node(1).kill9();
    wait_for(
        "the writer to notice the kill",
        Duration::from_secs(30),
        || writer.try_wait().expect("try_wait").is_some(),
    );
    let stdout = reader.join().expect("reader thread");
    // The latest acknowledged value of each block.
    let mut latest = std::collections::HashMap::new();
    let mut acked = 0;
    for line in stdout.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if let ["acked", i, block] = fields[..] {
            let i: u64 = i.parse().expect("index");
            latest.insert(block.parse::<u64>().expect("block"), (i % 250) + 1);
            acked += 1;
        }
    }
    assert!(
        acked > 20,
        "the writer got only {acked} writes acknowledged before the kill:\n{stdout}"
    );
    let in_flight_block = (acked * 7919) % 4096;

    // A crash during recovery is recovered the same way: start node 1,
    // kill it while it replays its log, then start it for good.
    for delay_ms in [5u64, 40, 150] {
        let mut recovering = std::process::Command::new(nvmirror_bin())
            .args(["node", "--config"])
            .arg(&pair.node(1).config_path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start node 1");
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = recovering.kill();
        let _ = recovering.wait();
    }
    pair.node(1).start(START).expect("restart node 1");
    // After an unclean stop with its mirror in sync node 1 does not trust
    // its log: node 2 takes its volumes over and gives them back first.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !pair
        .node(1)
        .status()
        .is_ok_and(|status| status.state == nvmirror::ha::Role::Serving)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "node 1 does not serve again\nnode 1:\n{}\nnode 2:\n{}",
            pair.node(1).log(),
            pair.node(2).log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let expected = latest
        .iter()
        .map(|(b, v)| format!("{b}: {v}"))
        .collect::<Vec<_>>()
        .join(", ");
    let script = format!(
        r#"
expected = {{{expected}}}
bad = []
for block in range(4096):
    data = h.pread(4096, block * 4096)
    want = expected.get(block)
    if block == {in_flight_block}:
        continue  # the write in flight at the kill may or may not have landed
    if want is None:
        if data != bytes(4096):
            bad.append((block, "changed"))
    elif data != bytes([want]) * 4096:
        bad.append((block, data[0], want))
print("bad", bad[:10], len(bad))
"#
    );
    // Node 1 binds its NBD address again once node 2, which served it
    // during the handover, has let it go: until then a client is refused
    // (or finds no export) and tries again, as a client would.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let output = loop {
        let output = nbdsh(&uri, &script);
        if String::from_utf8_lossy(&output.stdout).contains("bad ")
            || std::time::Instant::now() > deadline
        {
            break output;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        report.contains("bad [] 0"),
        "after kill -9 and restart ({acked} acknowledged): {report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
