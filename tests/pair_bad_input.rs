//! Bad input gets a clear error and loses nothing: malformed NBD traffic
//! against a running pair, and bad configuration files.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::*;

#[test]
fn bad_nbd_requests_get_errors_and_disturb_no_one() {
    let mut pair = Pair::start();
    let uri = pair.node(1).uri("vol0");
    tool_ok("qemu-io", &["-f", "raw", &uri, "-c", "write -P 0x11 0 64k"]);

    // Garbage instead of a handshake reply: the server drops that
    // connection only.
    let mut garbage = TcpStream::connect(("127.0.0.1", pair.node(1).nbd.port())).expect("connect");
    garbage
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut greeting = [0u8; 18];
    garbage.read_exact(&mut greeting).expect("server greeting");
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    garbage.write_all(&[0xde; 64]).expect("send garbage");
    let mut rest = Vec::new();
    let closed = garbage.read_to_end(&mut rest);
    assert!(
        closed.is_ok() || closed.is_err(),
        "the server closes the bad connection"
    );

    // Out of range, and an unknown command, with libnbd's client-side
    // checks off: the server's own error replies.
    let script = r#"
import errno
h.set_strict_mode(0)
size = h.get_size()
for what, call in [
    ("read past the end", lambda: h.pread(4096, size - 512)),
    ("write past the end", lambda: h.pwrite(bytes(4096), size - 512)),
    ("trim past the end", lambda: h.trim(4096, size)),
]:
    try:
        call()
        print(what, "succeeded")
    except nbd.Error as e:
        print(what, "errno", e.errno)
assert h.pread(65536, 0) == b"\x11" * 65536
print("data intact")
"#;
    let output = nbdsh(&uri, script);
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        report.contains("read past the end errno EINVAL"),
        "EINVAL for a read past the end: {report}"
    );
    assert!(
        report.contains("write past the end errno ENOSPC"),
        "ENOSPC for a write past the end: {report}"
    );
    assert!(
        report.contains("trim past the end errno EINVAL"),
        "EINVAL for a trim past the end: {report}"
    );
    assert!(
        report.contains("data intact"),
        "{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // An unknown export name is refused by name.
    let output = tool("nbdinfo", &[&pair.node(1).uri("no-such-volume")]);
    assert!(!output.status.success());

    // Everyone else is fine.
    let verify = tool_ok("qemu-io", &["-f", "raw", &uri, "-c", "read -P 0x11 0 64k"]);
    assert!(!verify.contains("Pattern verification failed"), "{verify}");
}

fn free_port() -> u16 {
    nvmirror::testing::harness::free_port().expect("a free port")
}

fn node_with_config(dir: &std::path::Path, text: &str) -> (bool, String) {
    let path = dir.join("bad.toml");
    std::fs::write(&path, text).expect("write config");
    let output = run_with_deadline(
        Command::new(nvmirror_bin())
            .arg("node")
            .arg("--config")
            .arg(&path),
        Duration::from_secs(20),
    );
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn bad_configs_name_the_field_and_start_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let good = format!(
        r#"node_id = 1
data_dir = "{data}"
aggregate_dir = "{data}/aggregate"
[nbd]
listen = "127.0.0.1:{nbd}"
[[volume]]
name = "vol0"
size = "16MiB"
[interconnect]
listen = "127.0.0.1:{ic}"
partner = "127.0.0.1:{partner}"
key = "a pre-shared key for the test pair"
"#,
        data = data_dir.display(),
        nbd = free_port(),
        ic = free_port(),
        partner = free_port(),
    );
    let cases = [
        (good.replace("node_id = 1", "node_id = 0"), "node_id"),
        (
            good.replace("\"16MiB\"", "\"16 megs\""),
            "unknown size unit",
        ),
        (
            good.replace("size = \"16MiB\"", "size = 1000"),
            "volume[0].size",
        ),
        (
            good.replace("key = \"a pre-shared key for the test pair\"", ""),
            "interconnect.key",
        ),
        (
            good.replace(
                "key = \"a pre-shared key for the test pair\"",
                "key = \"short\"",
            ),
            "interconnect.key",
        ),
        (
            good.replace("[nbd]", "[nbd]\nlisten_address = \"x\""),
            "listen_address",
        ),
        (
            good.replace("name = \"vol0\"", "name = \"a/b\""),
            "volume[0].name",
        ),
        ("this is not toml = = =".to_owned(), "bad.toml"),
    ];
    for (text, field) in cases {
        let (ok, stderr) = node_with_config(dir.path(), &text);
        assert!(!ok, "a config with a bad `{field}` was accepted");
        assert!(
            stderr.contains(field),
            "the error should name `{field}`: {stderr}"
        );
        assert!(
            !data_dir.join("nvram").exists(),
            "nothing may start on a bad config ({field})"
        );
    }
    let missing = run_with_deadline(
        Command::new(nvmirror_bin()).args(["node", "--config", "/nonexistent/nvmirror.toml"]),
        Duration::from_secs(20),
    );
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/nvmirror.toml"));

    let check = run_with_deadline(
        Command::new(nvmirror_bin())
            .arg("check-config")
            .arg(dir.path().join("bad.toml")),
        Duration::from_secs(20),
    );
    assert!(!check.status.success());
    std::fs::write(dir.path().join("good.toml"), &good).expect("write");
    let check = run_with_deadline(
        Command::new(nvmirror_bin())
            .arg("check-config")
            .arg(dir.path().join("good.toml")),
        Duration::from_secs(20),
    );
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(String::from_utf8_lossy(&check.stdout).contains("config OK"));
}
