//! In-memory exports for tests of the NBD front end (and of anything that
//! sits in front of it). Not for production: nothing here is durable.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::{Errno, Export, ExportError, Exports};

/// A volume held in memory: a `Vec<u8>` behind a lock, with counters of
/// the operations it served.
#[derive(Debug)]
pub struct MemExport {
    data: RwLock<Vec<u8>>,
    counters: Counters,
}

#[derive(Debug, Default)]
struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    fua_operations: AtomicU64,
    write_zeroes: AtomicU64,
    trims: AtomicU64,
    flushes: AtomicU64,
}

/// How many operations of each kind a [`MemExport`] has served.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemExportStats {
    pub reads: u64,
    pub writes: u64,
    /// Writes, zeroes and trims with `fua` set.
    pub fua_operations: u64,
    pub write_zeroes: u64,
    pub trims: u64,
    pub flushes: u64,
}

impl MemExport {
    /// A zero-filled export of `size_bytes`.
    pub fn new(size_bytes: usize) -> MemExport {
        MemExport {
            data: RwLock::new(vec![0; size_bytes]),
            counters: Counters::default(),
        }
    }

    /// A copy of the whole contents.
    pub fn contents(&self) -> Vec<u8> {
        self.data.read().clone()
    }

    pub fn stats(&self) -> MemExportStats {
        let c = &self.counters;
        MemExportStats {
            reads: c.reads.load(Ordering::SeqCst),
            writes: c.writes.load(Ordering::SeqCst),
            fua_operations: c.fua_operations.load(Ordering::SeqCst),
            write_zeroes: c.write_zeroes.load(Ordering::SeqCst),
            trims: c.trims.load(Ordering::SeqCst),
            flushes: c.flushes.load(Ordering::SeqCst),
        }
    }

    /// The byte range of a request, or the error the server should have
    /// prevented (it checks ranges first; this is a second line).
    fn range(
        &self,
        len_total: usize,
        offset: u64,
        len: u64,
    ) -> Result<std::ops::Range<usize>, ExportError> {
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= len_total as u64);
        match end {
            // Both fit in usize: they are at most the Vec's length.
            Some(end) => Ok(offset as usize..end as usize),
            None => Err(ExportError::new(
                Errno::Inval,
                format!("{offset}+{len} is outside the export of {len_total} bytes"),
            )),
        }
    }

    fn count_fua(&self, fua: bool) {
        if fua {
            self.counters.fua_operations.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Export for MemExport {
    fn size_bytes(&self) -> u64 {
        self.data.read().len() as u64
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        let data = self.data.read();
        let range = self.range(data.len(), offset, buf.len() as u64)?;
        buf.copy_from_slice(&data[range]);
        self.counters.reads.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn write(&self, offset: u64, bytes: &[u8], fua: bool) -> Result<(), ExportError> {
        let mut data = self.data.write();
        let range = self.range(data.len(), offset, bytes.len() as u64)?;
        data[range].copy_from_slice(bytes);
        self.counters.writes.fetch_add(1, Ordering::SeqCst);
        self.count_fua(fua);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        let mut data = self.data.write();
        let range = self.range(data.len(), offset, len)?;
        data[range].fill(0);
        self.counters.write_zeroes.fetch_add(1, Ordering::SeqCst);
        self.count_fua(fua);
        Ok(())
    }

    /// Discards by zeroing (a client may assume nothing about trimmed data).
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        let mut data = self.data.write();
        let range = self.range(data.len(), offset, len)?;
        data[range].fill(0);
        self.counters.trims.fetch_add(1, Ordering::SeqCst);
        self.count_fua(fua);
        Ok(())
    }

    fn flush(&self) -> Result<(), ExportError> {
        self.counters.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A fixed set of named exports.
#[derive(Debug, Default)]
pub struct ExportList {
    exports: RwLock<BTreeMap<String, Arc<dyn Export>>>,
}

impl ExportList {
    pub fn new() -> ExportList {
        ExportList::default()
    }

    /// Adds (or replaces) an export; returns the list for chaining.
    pub fn with(self, name: &str, export: Arc<dyn Export>) -> ExportList {
        self.insert(name, export);
        self
    }

    pub fn insert(&self, name: &str, export: Arc<dyn Export>) {
        self.exports.write().insert(name.to_owned(), export);
    }

    pub fn remove(&self, name: &str) -> Option<Arc<dyn Export>> {
        self.exports.write().remove(name)
    }
}

impl Exports for ExportList {
    fn lookup(&self, name: &str) -> Option<Arc<dyn Export>> {
        self.exports.read().get(name).cloned()
    }

    fn names(&self) -> Vec<String> {
        self.exports.read().keys().cloned().collect()
    }
}
