//! A volume: its disk in the aggregate, its dirty map, and the fence that
//! keeps a stale owner off it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::error::{Error, Result};
use crate::storage::disk::{Disk, Disks};
use crate::storage::extents::{ExtentMap, Piece, Source};
use crate::storage::ownership::Fence;

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
    disk: Arc<dyn Disk>,
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
        disks: &dyn Disks,
        aggregate_dir: &Path,
        set: u32,
        index: usize,
        name: &str,
        size_bytes: u64,
        fence: Arc<Fence>,
    ) -> Result<Volume> {
        let dir = volume_dir(aggregate_dir, set);
        let path = dir.join(format!("{name}.vol"));
        let disk = disks.open(&path, set, size_bytes)?;
        Ok(Volume {
            id: volume_id(set, index),
            set,
            name: name.to_owned(),
            size_bytes,
            path,
            disk,
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
        self.disk.read_at(offset, buf).map_err(|source| Error::Io {
            what: "reading a volume file",
            path: self.path.clone(),
            source,
        })
    }

    /// Write to the file, if this node still owns the volume.
    pub fn write_file(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.fence.check()?;
        self.disk
            .write_at(offset, data)
            .map_err(|source| Error::Io {
                what: "writing a volume file",
                path: self.path.clone(),
                source,
            })
    }

    /// Make the range read back as zeros: with `release`, deallocating it
    /// (trim), else keeping it allocated (write-zeroes).
    pub fn zero_file(&self, offset: u64, len: u64, release: bool) -> Result<()> {
        self.fence.check()?;
        let in_place = self
            .disk
            .zero_in_place(offset, len, release)
            .map_err(|source| Error::Io {
                what: "zeroing a range of a volume file",
                path: self.path.clone(),
                source,
            })?;
        if in_place {
            return Ok(());
        }
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

    /// Write the bytes of `pieces` (of this volume's dirty map) to the
    /// file: from the NVRAM `region`, or zeros, or a hole. The caller holds
    /// `file_lock` and syncs after. Returns the bytes written.
    pub fn write_pieces(
        &self,
        pieces: &[Piece],
        region: &nvlog::Region,
        buffer: &mut Vec<u8>,
    ) -> Result<u64> {
        let mut bytes = 0;
        for piece in pieces {
            match piece.source {
                Source::Region { offset } => {
                    buffer.resize(piece.len as usize, 0);
                    region.read(offset, buffer);
                    self.write_file(piece.start, buffer)?;
                }
                Source::Zero => self.zero_file(piece.start, piece.len, false)?,
                Source::Hole => self.zero_file(piece.start, piece.len, true)?,
            }
            bytes += piece.len;
        }
        Ok(bytes)
    }

    /// fdatasync: the file's data is on stable storage. A failure is final:
    /// the kernel may have dropped the dirty pages, so it is never retried.
    pub fn sync(&self) -> Result<()> {
        self.disk.sync().map_err(|source| Error::Io {
            what: "syncing a volume file",
            path: self.path.clone(),
            source,
        })
    }
}
