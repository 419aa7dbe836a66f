//! Simulated volume storage: the shared shelf both nodes reach, with a
//! per-node write cache that a power loss of that node loses in part (each
//! unsynced sector reaches the disk or not), and faults on demand (a
//! failing write or fsync).
//!
//! Every write is also checked against the owner files: a write by a node
//! that does not own the volume at that moment is recorded as a violation
//! (a stale owner wrote after it was fenced).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::rng::SplitMix64;
use crate::error::Result;
use crate::storage::disk::{Disk, Disks};
use crate::storage::ownership;

/// Sector size of the simulated disks: a torn write keeps a prefix of whole
/// sectors.
pub const SECTOR_BYTES: usize = 512;

/// The simulated shared storage: every volume's disk, by path.
#[derive(Debug)]
pub struct Shelf {
    /// Itself, for the disks it hands out.
    this: std::sync::Weak<Shelf>,
    aggregate_dir: PathBuf,
    disks: Mutex<BTreeMap<PathBuf, Arc<SimDisk>>>,
    /// The node whose step is running (the simulation is single-threaded).
    actor: AtomicU32,
    violations: Mutex<Vec<String>>,
}

impl Shelf {
    pub fn new(aggregate_dir: &Path) -> Arc<Shelf> {
        Arc::new_cyclic(|this| Shelf {
            this: this.clone(),
            aggregate_dir: aggregate_dir.to_owned(),
            disks: Mutex::new(BTreeMap::new()),
            actor: AtomicU32::new(u32::MAX),
            violations: Mutex::new(Vec::new()),
        })
    }

    /// The disk of the volume file at `path` (node `set`'s), created zeroed.
    pub fn open(&self, path: &Path, set: u32, size_bytes: u64) -> Result<Arc<SimDisk>> {
        let mut disks = self.disks.lock();
        let disk = disks
            .entry(path.to_owned())
            .or_insert_with(|| Arc::new(SimDisk::new(self.this.clone(), path, set, size_bytes)));
        if disk.len() != size_bytes {
            return Err(crate::Error::VolumeSizeMismatch {
                path: path.to_owned(),
                configured_bytes: size_bytes,
                actual_bytes: disk.len(),
            });
        }
        Ok(disk.clone())
    }

    /// From now on, I/O is done by node `node`.
    pub fn set_actor(&self, node: u32) {
        self.actor.store(node, Ordering::Release);
    }

    pub fn disks(&self) -> Vec<Arc<SimDisk>> {
        self.disks.lock().values().cloned().collect()
    }

    /// Node `node` lost power: its unsynced writes survive in part.
    pub fn crash(&self, node: u32, rng: &mut SplitMix64) {
        for disk in self.disks() {
            disk.crash(node, rng);
        }
    }

    pub fn take_violations(&self) -> Vec<String> {
        std::mem::take(&mut self.violations.lock())
    }

    fn check_writer(&self, disk: &SimDisk) {
        let actor = self.actor.load(Ordering::Acquire);
        let owner = ownership::read(&self.aggregate_dir, disk.set).map(|o| (o.owner, o.epoch));
        match owner {
            Ok((owner, _)) if owner == actor => {}
            Ok((owner, epoch)) => self.violations.lock().push(format!(
                "node {actor} wrote {} while node {owner} owns it (epoch {epoch})",
                disk.path.display()
            )),
            Err(error) => self.violations.lock().push(format!(
                "owner file of node {} unreadable: {error}",
                disk.set
            )),
        }
    }
}

impl Disks for Shelf {
    fn open(&self, path: &Path, set: u32, size_bytes: u64) -> Result<Arc<dyn Disk>> {
        Ok(Shelf::open(self, path, set, size_bytes)?)
    }
}

impl Disk for SimDisk {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read(offset, buf)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.write(offset, data)
    }

    fn sync(&self) -> io::Result<()> {
        SimDisk::sync(self)
    }
}

/// One volume file on the shelf.
#[derive(Debug)]
pub struct SimDisk {
    shelf: std::sync::Weak<Shelf>,
    path: PathBuf,
    /// Whose volume it is.
    set: u32,
    state: Mutex<DiskState>,
}

#[derive(Debug)]
struct DiskState {
    /// What survives any crash.
    durable: Vec<u8>,
    /// What reads see (the page cache).
    current: Vec<u8>,
    /// Per sector: written since its writer's last sync.
    pending: Vec<Option<Pending>>,
    fail_next_write: bool,
    fail_next_sync: bool,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    writer: u32,
    /// A sync failed since: as with Linux, whose failed fsync marks the
    /// pages clean, this sector will never reach the disk, and a retried
    /// sync that succeeds does not change that. A power loss of the writer
    /// loses it (unless it is written again first).
    doomed: bool,
}

impl SimDisk {
    fn new(shelf: std::sync::Weak<Shelf>, path: &Path, set: u32, size_bytes: u64) -> SimDisk {
        let len = size_bytes as usize;
        SimDisk {
            shelf,
            path: path.to_owned(),
            set,
            state: Mutex::new(DiskState {
                durable: vec![0; len],
                current: vec![0; len],
                pending: vec![None; len.div_ceil(SECTOR_BYTES)],
                fail_next_write: false,
                fail_next_sync: false,
            }),
        }
    }

    pub fn len(&self) -> u64 {
        self.state.lock().current.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let state = self.state.lock();
        let range = range_of(offset, buf.len(), state.current.len())?;
        buf.copy_from_slice(&state.current[range]);
        Ok(())
    }

    pub fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let shelf = self.shelf.upgrade().expect("the shelf outlives its disks");
        let mut state = self.state.lock();
        if std::mem::take(&mut state.fail_next_write) {
            return Err(io::Error::other("injected write error"));
        }
        let range = range_of(offset, data.len(), state.current.len())?;
        shelf.check_writer(self);
        let writer = shelf.actor.load(Ordering::Acquire);
        let sectors = range.start / SECTOR_BYTES..range.end.div_ceil(SECTOR_BYTES);
        state.current[range].copy_from_slice(data);
        for sector in sectors {
            state.pending[sector] = Some(Pending {
                writer,
                doomed: false,
            });
        }
        Ok(())
    }

    /// fdatasync by the acting node: the sectors it wrote become durable.
    /// A failed sync dooms them (see `Pending::doomed`).
    pub fn sync(&self) -> io::Result<()> {
        let shelf = self.shelf.upgrade().expect("the shelf outlives its disks");
        let actor = shelf.actor.load(Ordering::Acquire);
        let mut state = self.state.lock();
        let state = &mut *state;
        let failed = std::mem::take(&mut state.fail_next_sync);
        for sector in 0..state.pending.len() {
            let Some(pending) = &mut state.pending[sector] else {
                continue;
            };
            if pending.writer != actor || pending.doomed {
                continue;
            }
            if failed {
                pending.doomed = true;
                continue;
            }
            state.pending[sector] = None;
            let bytes = sector_range(sector, state.current.len());
            state.durable[bytes.clone()].copy_from_slice(&state.current[bytes]);
        }
        if failed {
            return Err(io::Error::other("injected fsync error"));
        }
        Ok(())
    }

    pub fn fail_next_write(&self) {
        self.state.lock().fail_next_write = true;
    }

    pub fn fail_next_sync(&self) {
        self.state.lock().fail_next_sync = true;
    }

    /// `node` lost power: each sector it wrote since its last sync reached
    /// the disk or not (a doomed one never did).
    fn crash(&self, node: u32, rng: &mut SplitMix64) {
        let mut state = self.state.lock();
        let state = &mut *state;
        for sector in 0..state.pending.len() {
            let Some(pending) = state.pending[sector] else {
                continue;
            };
            if pending.writer != node {
                continue;
            }
            state.pending[sector] = None;
            let bytes = sector_range(sector, state.current.len());
            if !pending.doomed && rng.chance(50) {
                state.durable[bytes.clone()].copy_from_slice(&state.current[bytes]);
            } else {
                state.current[bytes.clone()].copy_from_slice(&state.durable[bytes]);
            }
        }
        state.fail_next_write = false;
        state.fail_next_sync = false;
    }
}

fn sector_range(sector: usize, len: usize) -> std::ops::Range<usize> {
    sector * SECTOR_BYTES..((sector + 1) * SECTOR_BYTES).min(len)
}

fn range_of(offset: u64, len: usize, size: usize) -> io::Result<std::ops::Range<usize>> {
    let start = usize::try_from(offset).map_err(io::Error::other)?;
    match start.checked_add(len) {
        Some(end) if end <= size => Ok(start..end),
        _ => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "beyond the end of the simulated disk",
        )),
    }
}
