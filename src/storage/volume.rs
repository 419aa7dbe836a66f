//! A volume's backing file in the aggregate directory, its dirty map, and
//! the fence that keeps a stale owner off it.
//!
//! The backing is a real file, or in the simulation ([`crate::testing::sim`]) a
//! simulated disk with the same interface, which loses unsynced writes when
//! their node loses power and can be told to fail.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::error::{Error, Result};
use crate::ha::ownership::Fence;
use crate::storage::extents::ExtentMap;
use crate::testing::sim::{Shelf, SimDisk};

/// Where volume files live: the file system (the aggregate directory), or
/// the simulation's shelf of simulated disks.
#[derive(Debug, Clone, Default)]
pub enum Disks {
    #[default]
    Files,
    Simulated(Arc<Shelf>),
}

#[derive(Debug)]
enum Backing {
    File(File),
    Simulated(Arc<SimDisk>),
}

/// The id of volume `index` of node `set` in log records: unique across the
/// pair, so a survivor logs writes to its partner's volumes in its own log.
pub fn volume_id(set: u32, index: usize) -> u32 {
    assert!(index < 1 << 16, "at most 65536 volumes per node");
    (set << 16) | index as u32
}

/// The directory of node `set`'s volume files in the aggregate.
pub fn volume_dir(aggregate_dir: &Path, set: u32) -> PathBuf {
    aggregate_dir.join(format!("node-{set}"))
}

/// One volume: a sparse file of a fixed size, plus the extents of a log that
/// are newer than the file.
#[derive(Debug)]
pub struct Volume {
    /// The volume id in log records ([`volume_id`]).
    pub id: u32,
    /// Whose volume it is (the node that owns it when both are up).
    pub set: u32,
    pub name: String,
    pub size_bytes: u64,
    path: PathBuf,
    backing: Backing,
    /// Data logged but not yet in the file. Lock order: the log's order lock,
    /// then this.
    pub extents: Mutex<ExtentMap>,
    /// Checked before every file write and every acknowledgement.
    pub fence: Arc<Fence>,
    /// Consistency points and the takeover replay write the file one at a
    /// time, each from a snapshot of the extents taken under this lock, so a
    /// replay never writes older data over what a consistency point wrote.
    pub file_lock: Mutex<()>,
    /// Whether writes are accepted. Writers hold it shared from their check
    /// to their append; a giveback takes it exclusively to close the gate.
    pub write_gate: RwLock<bool>,
}

impl Volume {
    /// Open (creating if missing) the backing file of a volume and make sure
    /// it has `size_bytes`. A file that exists with another size is refused:
    /// resizing a volume is an explicit operation, never a side effect.
    pub fn open(
        disks: &Disks,
        aggregate_dir: &Path,
        set: u32,
        index: usize,
        name: &str,
        size_bytes: u64,
        fence: Arc<Fence>,
    ) -> Result<Volume> {
        let dir = volume_dir(aggregate_dir, set);
        let path = dir.join(format!("{name}.vol"));
        let backing = match disks {
            Disks::Files => Backing::File(open_file(&dir, &path, size_bytes)?),
            Disks::Simulated(shelf) => Backing::Simulated(shelf.open(&path, set, size_bytes)?),
        };
        Ok(Volume {
            id: volume_id(set, index),
            set,
            name: name.to_owned(),
            size_bytes,
            path,
            backing,
            extents: Mutex::new(ExtentMap::new()),
            fence,
            file_lock: Mutex::new(()),
            write_gate: RwLock::new(true),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn read_file(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        match &self.backing {
            Backing::File(file) => file.read_exact_at(buf, offset),
            Backing::Simulated(disk) => disk.read(offset, buf),
        }
        .map_err(|source| Error::Io {
            what: "reading a volume file",
            path: self.path.clone(),
            source,
        })
    }

    /// Write to the file, if this node still owns the volume.
    pub fn write_file(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.fence.check()?;
        match &self.backing {
            Backing::File(file) => file.write_all_at(data, offset),
            Backing::Simulated(disk) => disk.write(offset, data),
        }
        .map_err(|source| Error::Io {
            what: "writing a volume file",
            path: self.path.clone(),
            source,
        })
    }

    /// Make the range read back as zeros: with `release`, deallocating it
    /// (trim), else keeping it allocated (write-zeroes).
    pub fn zero_file(&self, offset: u64, len: u64, release: bool) -> Result<()> {
        use nix::fcntl::{fallocate, FallocateFlags};
        use std::os::fd::AsRawFd;
        self.fence.check()?;
        let Backing::File(file) = &self.backing else {
            return self.write_zeros(offset, len);
        };
        let mode = if release {
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE
        } else {
            FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE
        };
        if fallocate(file.as_raw_fd(), mode, offset as i64, len as i64).is_ok() {
            return Ok(());
        }
        // The file system cannot do it in place.
        self.write_zeros(offset, len)
    }

    fn write_zeros(&self, offset: u64, len: u64) -> Result<()> {
        const CHUNK: usize = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len as usize)];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            self.write_file(offset + done, &zeros[..n])?;
            done += n as u64;
        }
        Ok(())
    }

    /// fdatasync: the file's data is on stable storage. A failure is final:
    /// the kernel may have dropped the dirty pages, so it is never retried.
    pub fn sync(&self) -> Result<()> {
        match &self.backing {
            Backing::File(file) => file.sync_data(),
            Backing::Simulated(disk) => disk.sync(),
        }
        .map_err(|source| Error::Io {
            what: "syncing a volume file",
            path: self.path.clone(),
            source,
        })
    }
}

/// Open (creating if missing) a volume file of `size_bytes`.
fn open_file(dir: &Path, path: &Path, size_bytes: u64) -> Result<File> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        what: "creating the volume directory",
        path: dir.to_owned(),
        source,
    })?;
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
