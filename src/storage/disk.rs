//! What a volume's bytes live on: a [`Disk`] per volume, opened through
//! [`Disks`]. A running node uses files in the aggregate directory
//! ([`FileDisks`]); anything else that honours the same contract (reads
//! return what was written, `sync` makes it durable or fails for good) can
//! stand in.

use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};

/// The backing store of one volume.
pub trait Disk: Send + Sync + Debug {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Make the range read back as zeros in place: with `release`,
    /// deallocating it (trim), else keeping it allocated (write-zeroes).
    /// `Ok(false)` when the disk cannot: the caller writes zeros instead.
    fn zero_in_place(&self, _offset: u64, _len: u64, _release: bool) -> io::Result<bool> {
        Ok(false)
    }
    /// Everything written is on stable storage. A failure is final: what
    /// was not written may be lost, so it is never retried.
    fn sync(&self) -> io::Result<()>;
}

/// Opens the disk of a volume.
pub trait Disks: Send + Sync + Debug {
    /// The disk at `path`, of node `set`'s volume, `size_bytes` long;
    /// created zeroed when missing, refused when it exists at another size.
    fn open(&self, path: &Path, set: u32, size_bytes: u64) -> Result<Arc<dyn Disk>>;
}

/// Sparse files in the aggregate directory.
#[derive(Debug, Clone, Copy, Default)]
pub struct FileDisks;

#[derive(Debug)]
struct FileDisk(File);

impl Disk for FileDisk {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write_all_at(data, offset)
    }

    fn zero_in_place(&self, offset: u64, len: u64, release: bool) -> io::Result<bool> {
        use nix::fcntl::{fallocate, FallocateFlags};
        let mode = if release {
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE
        } else {
            FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE
        };
        // A file system that cannot do it in place gets zeros written.
        Ok(fallocate(self.0.as_raw_fd(), mode, offset as i64, len as i64).is_ok())
    }

    fn sync(&self) -> io::Result<()> {
        self.0.sync_data()
    }
}

impl Disks for FileDisks {
    fn open(&self, path: &Path, _set: u32, size_bytes: u64) -> Result<Arc<dyn Disk>> {
        Ok(Arc::new(FileDisk(open_file(path, size_bytes)?)))
    }
}

/// Open (creating if missing, with its directory) a volume file of
/// `size_bytes`. A file that exists with another size is refused: resizing
/// a volume is an explicit operation, never a side effect.
fn open_file(path: &Path, size_bytes: u64) -> Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            what: "creating the volume directory",
            path: dir.to_owned(),
            source,
        })?;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|source| Error::Io {
            what: "opening a volume file",
            path: path.to_owned(),
            source,
        })?;
    let actual = file
        .metadata()
        .map_err(|source| Error::Io {
            what: "reading a volume file's size",
            path: path.to_owned(),
            source,
        })?
        .len();
    if actual == 0 {
        file.set_len(size_bytes).map_err(|source| Error::Io {
            what: "sizing a new volume file",
            path: path.to_owned(),
            source,
        })?;
    } else if actual != size_bytes {
        return Err(Error::VolumeSizeMismatch {
            path: path.to_owned(),
            configured_bytes: size_bytes,
            actual_bytes: actual,
        });
    }
    Ok(file)
}
