//! The NBD front end against stock clients: qemu-io and qemu-img (Debian
//! package qemu-utils), nbdinfo and nbdcopy (libnbd-bin), nbdsh
//! (python3-libnbd). A missing client fails the test with the package to
//! install: a skipped test would hide a regression.
//!
//! Every client runs with a deadline and is killed when it passes it, so no
//! test can hang.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nbd::testing::{ExportList, MemExport};
use nbd::{Exports, NbdServer, ServerConfig};

/// No client invocation may take longer.
const CLIENT_DEADLINE: Duration = Duration::from_secs(30);

/// The path of a client program, or a failure naming the Debian package
/// that provides it.
fn client_program(program: &str) -> PathBuf {
    let package = match program {
        "qemu-io" | "qemu-img" => "qemu-utils",
        "nbdinfo" | "nbdcopy" => "libnbd-bin",
        "nbdsh" => "python3-libnbd",
        other => panic!("no package known for client {other}"),
    };
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "NBD client `{program}` is not installed: install the Debian package \
                 {package} (apt-get install -y {package})"
            )
        })
}

/// What a client printed, and how it ended.
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Run {
    fn describe(&self) -> String {
        format!(
            "status {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs a client with a deadline: killed (and the test failed) past it.
/// Output goes to files, so a chatty client cannot block on a full pipe.
fn run(program: &str, args: &[&str]) -> Run {
    let path = client_program(program);
    let mut stdout_file = tempfile::tempfile().expect("temp file");
    let mut stderr_file = tempfile::tempfile().expect("temp file");
    // The program's own directory first in PATH: a packaged script (nbdsh)
    // then runs with the distribution's interpreter, not one a developer
    // put earlier in PATH without the library it imports.
    let mut search_path = vec![path.parent().expect("program in a directory").to_owned()];
    search_path.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    let search_path = std::env::join_paths(search_path).expect("PATH");
    let mut child = Command::new(&path)
        .args(args)
        .env("PATH", search_path)
        .stdin(Stdio::null())
        .stdout(stdout_file.try_clone().expect("clone"))
        .stderr(stderr_file.try_clone().expect("clone"))
        .spawn()
        .unwrap_or_else(|err| panic!("cannot run {}: {err}", path.display()));
    let deadline = Instant::now() + CLIENT_DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for client") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let read_all = |file: &mut File| {
        let mut text = String::new();
        file.rewind().expect("rewind");
        file.read_to_string(&mut text).expect("read output");
        text
    };
    let stdout = read_all(&mut stdout_file);
    let stderr = read_all(&mut stderr_file);
    let Some(status) = status else {
        panic!(
            "{program} {args:?} ran past {CLIENT_DEADLINE:?} and was killed\n\
             --- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
        );
    };
    Run {
        status,
        stdout,
        stderr,
    }
}

/// Runs a client that must succeed.
fn run_ok(program: &str, args: &[&str]) -> Run {
    let run = run(program, args);
    assert!(
        run.status.success(),
        "{program} {args:?} failed: {}",
        run.describe()
    );
    run
}

struct Fixture {
    server: NbdServer,
    exports: Arc<ExportList>,
}

impl Fixture {
    /// A server on loopback with one export per `(name, size)`.
    fn new(volumes: &[(&str, usize)]) -> Fixture {
        let exports = Arc::new(ExportList::new());
        for (name, size_bytes) in volumes {
            exports.insert(name, Arc::new(MemExport::new(*size_bytes)));
        }
        let addr = "127.0.0.1:0".parse().expect("address");
        let server = NbdServer::bind(addr, exports.clone(), ServerConfig::default()).expect("bind");
        Fixture { server, exports }
    }

    fn uri(&self, name: &str) -> String {
        format!("nbd://{}/{name}", self.server.local_addr())
    }

    fn contents(&self, name: &str) -> Vec<u8> {
        let export = self.exports.lookup(name).expect("export");
        let mut data = vec![0; export.size_bytes() as usize];
        export.read(0, &mut data).expect("read export");
        data
    }

    /// Waits (bounded) until every client has disconnected.
    fn wait_idle(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.server.connections() != 0 {
            assert!(Instant::now() < deadline, "clients stayed connected");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// A sparse raw image: data in a few places, holes (zeroes) elsewhere,
/// including one hole longer than the server's maximum request.
fn sparse_image(dir: &Path, size_bytes: u64) -> (PathBuf, Vec<u8>) {
    let path = dir.join("source.img");
    let mut file = File::create(&path).expect("create image");
    file.set_len(size_bytes).expect("size image");
    let mut expected = vec![0; size_bytes as usize];
    for (index, offset) in [0u64, 1 << 20, (3 << 20) + 512, size_bytes - 8192]
        .into_iter()
        .enumerate()
    {
        let chunk: Vec<u8> = (0..8192u32)
            .map(|i| (i as u8) ^ (index as u8 * 0x35 + 1))
            .collect();
        file.seek(std::io::SeekFrom::Start(offset)).expect("seek");
        file.write_all(&chunk).expect("write image");
        expected[offset as usize..offset as usize + chunk.len()].copy_from_slice(&chunk);
    }
    file.sync_all().expect("sync image");
    (path, expected)
}

#[test]
fn nbdinfo_lists_and_describes_the_exports() {
    let fixture = Fixture::new(&[("vol0", 4 << 20), ("vol1", 1 << 20)]);
    let addr = fixture.server.local_addr();
    let list = run_ok("nbdinfo", &["--list", &format!("nbd://{addr}")]);
    assert!(list.stdout.contains("vol0"), "{}", list.describe());
    assert!(list.stdout.contains("vol1"), "{}", list.describe());

    let info = run_ok("nbdinfo", &["--json", &fixture.uri("vol0")]);
    let json: serde_json::Value = serde_json::from_str(&info.stdout)
        .unwrap_or_else(|err| panic!("nbdinfo --json: {err}\n{}", info.describe()));
    let export = &json["exports"][0];
    assert_eq!(export["export-name"], "vol0", "{}", info.stdout);
    assert_eq!(export["export-size"], 4 << 20, "{}", info.stdout);
    for capability in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
    ] {
        assert_eq!(export[capability], true, "{capability}: {}", info.stdout);
    }
    assert_eq!(export["is_read_only"], false, "{}", info.stdout);
    assert_eq!(export["block_size_maximum"], 32 << 20, "{}", info.stdout);

    // An unknown export is a clean error.
    let missing = run("nbdinfo", &[&fixture.uri("nope")]);
    assert!(!missing.status.success(), "{}", missing.describe());
    fixture.wait_idle();
}

#[test]
fn nbdsh_writes_and_reads_back_patterns() {
    let fixture = Fixture::new(&[("vol0", 4 << 20)]);
    let script = r#"
size = h.get_size()
assert size == 4 << 20, size
pattern = bytes((i * 7) % 251 for i in range(1 << 20))
h.pwrite(pattern, 4096)
h.pwrite(b"\xab" * 4096, 0, nbd.CMD_FLAG_FUA)
h.flush()
assert h.pread(1 << 20, 4096) == pattern
assert h.pread(4096, 0) == b"\xab" * 4096
h.zero(65536, 8192)
assert h.pread(65536, 8192) == bytes(65536)
h.trim(4096, (3 << 20))
# Beyond the end: the server refuses, the connection survives.
try:
    h.pread(4096, size - 512)
    raise AssertionError("read beyond the end succeeded")
except nbd.Error:
    pass
h.pwrite(b"tail", size - 4)
assert h.pread(4, size - 4) == b"tail"
h.shutdown()
"#;
    run_ok("nbdsh", &["-u", &fixture.uri("vol0"), "-c", script]);
    let contents = fixture.contents("vol0");
    assert_eq!(&contents[0..4096], &[0xab; 4096][..]);
    assert_eq!(&contents[(4 << 20) - 4..], b"tail");
    fixture.wait_idle();
}

#[test]
fn qemu_io_writes_and_verifies_patterns() {
    let fixture = Fixture::new(&[("vol0", 8 << 20)]);
    let uri = fixture.uri("vol0");
    let run = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0xab 0 64k",
            "-c",
            "write -f -P 0xcd 1M 4k",
            "-c",
            "write -z 64k 64k",
            "-c",
            "aio_write -P 0x11 2M 1M",
            "-c",
            "aio_write -P 0x22 3M 1M",
            "-c",
            "aio_flush",
            "-c",
            "flush",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "read -P 0xcd 1M 4k",
            "-c",
            "read -P 0 64k 64k",
            "-c",
            "read -P 0x11 2M 1M",
            "-c",
            "read -P 0x22 3M 1M",
            "-c",
            "discard 4M 1M",
        ],
    );
    assert!(
        !run.stdout.contains("failed") && !run.stderr.contains("failed"),
        "{}",
        run.describe()
    );
    // A second run verifies what the first left, through a new connection.
    run_ok("qemu-io", &["-f", "raw", &uri, "-c", "read -P 0x22 3M 1M"]);
    let contents = fixture.contents("vol0");
    assert!(contents[0..64 << 10].iter().all(|&b| b == 0xab));
    assert!(contents[1 << 20..(1 << 20) + 4096]
        .iter()
        .all(|&b| b == 0xcd));

    // A pattern that is not there fails verification: the check is real.
    let mismatch = self::run("qemu-io", &["-f", "raw", &uri, "-c", "read -P 0x99 0 4k"]);
    assert!(
        !mismatch.status.success() || mismatch.stdout.contains("Pattern verification failed"),
        "{}",
        mismatch.describe()
    );
    fixture.wait_idle();
}

#[test]
fn qemu_img_converts_compares_and_reports_info() {
    const SIZE: u64 = 64 << 20;
    let dir = tempfile::tempdir().expect("temp dir");
    let (source, expected) = sparse_image(dir.path(), SIZE);
    let fixture = Fixture::new(&[("vol0", SIZE as usize)]);
    let uri = fixture.uri("vol0");
    let source = source.to_str().expect("utf-8 path");

    let info = run_ok("qemu-img", &["info", "-f", "raw", &uri]);
    assert!(
        info.stdout.contains("virtual size: 64 MiB"),
        "{}",
        info.describe()
    );
    run_ok(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", source, &uri],
    );
    assert!(
        fixture.contents("vol0") == expected,
        "converted image differs"
    );
    run_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", source, &uri],
    );

    // compare notices a difference.
    let copy = dir.path().join("changed.img");
    std::fs::copy(source, &copy).expect("copy");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(&copy)
        .expect("open copy");
    file.seek(std::io::SeekFrom::Start(5 << 20)).expect("seek");
    file.write_all(b"different").expect("write");
    drop(file);
    let differs = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            copy.to_str().unwrap(),
            &uri,
        ],
    );
    assert_eq!(differs.status.code(), Some(1), "{}", differs.describe());
    fixture.wait_idle();
}

#[test]
fn nbdcopy_copies_in_and_out() {
    const SIZE: u64 = 64 << 20;
    let dir = tempfile::tempdir().expect("temp dir");
    let (source, expected) = sparse_image(dir.path(), SIZE);
    let fixture = Fixture::new(&[("vol0", SIZE as usize), ("vol1", SIZE as usize)]);
    let source = source.to_str().expect("utf-8 path");

    run_ok("nbdcopy", &[source, &fixture.uri("vol0")]);
    assert!(fixture.contents("vol0") == expected, "copied image differs");

    // Server to server (several connections each, multi-conn), then out to
    // a file.
    run_ok("nbdcopy", &[&fixture.uri("vol0"), &fixture.uri("vol1")]);
    assert!(fixture.contents("vol1") == expected, "vol0 → vol1 differs");
    let out = dir.path().join("out.img");
    File::create(&out)
        .and_then(|f| f.set_len(SIZE))
        .expect("create target");
    run_ok("nbdcopy", &[&fixture.uri("vol1"), out.to_str().unwrap()]);
    assert!(std::fs::read(&out).expect("read copy") == expected);
    fixture.wait_idle();
}
