//! Every `unsafe` operation of the crate: mapping the NVRAM file, raw copies
//! into and out of the mapping, msync and CPU cache flushes.
//!
//! The rest of the crate sees a [`Mapping`]: a fixed range of bytes that many
//! threads read and write through bounds-checked copies. Two threads never
//! touch the same bytes at once by construction of the callers (a log
//! position is handed out once; the partner-mirror area is written only by
//! the interconnect receiver and read only after it stopped), so the copies
//! never race. Bytes written by another process or a NIC (RDMA) are outside
//! Rust's memory model, which is why every access is a raw copy and no
//! `&[u8]` into the mapping ever escapes this module.

use std::fs::File;
use std::io;
use std::num::NonZeroUsize;
use std::ptr::NonNull;

use nix::sys::mman::{mmap, msync, munmap, MapFlags, MsFlags, ProtFlags};

/// Bytes of one CPU cache line, the unit of a cache flush.
pub(crate) const CACHE_LINE_BYTES: usize = 64;

/// How the mapped bytes are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backing {
    /// MAP_SYNC on a DAX file or device: stores reach media once the CPU
    /// cache lines are flushed; no system call needed.
    MapSync,
    /// A page-cache mapping: msync(MS_SYNC) writes dirty pages back.
    Msync,
    /// Process memory: nothing survives the process; for tests and
    /// simulation.
    Heap,
}

/// A fixed, owned range of memory: a shared file mapping or a heap buffer.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    backing: Backing,
}

// SAFETY: the mapping is a plain range of bytes with no thread affinity; all
// access goes through raw copies on ranges that callers keep disjoint
// between threads (see the module comment), so sharing it across threads
// creates no data race on Rust-visible state.
unsafe impl Send for Mapping {}
// SAFETY: as for Send; `&Mapping` only offers copies, never references.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Map `len` bytes of `file` shared. With `try_map_sync`, first ask for
    /// MAP_SYNC (DAX only) and fall back to a page-cache mapping when the
    /// file system refuses it.
    pub(crate) fn map_file(file: &File, len: usize, try_map_sync: bool) -> io::Result<Mapping> {
        let length = NonZeroUsize::new(len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "zero-length mapping"))?;
        let prot = ProtFlags::PROT_READ | ProtFlags::PROT_WRITE;
        if try_map_sync {
            // SAFETY: we map a fresh range chosen by the kernel (addr None),
            // so no existing Rust object is aliased; the file is open
            // read-write and at least `len` bytes long (the caller sized it).
            let synced = unsafe {
                mmap(
                    None,
                    length,
                    prot,
                    // nix names neither flag; libc has both.
                    MapFlags::from_bits_retain(libc::MAP_SHARED_VALIDATE | libc::MAP_SYNC),
                    file,
                    0,
                )
            };
            match synced {
                Ok(ptr) => {
                    return Ok(Mapping {
                        ptr: ptr.cast(),
                        len,
                        backing: Backing::MapSync,
                    })
                }
                // EOPNOTSUPP: not DAX; EINVAL: kernel without MAP_SYNC.
                Err(nix::errno::Errno::EOPNOTSUPP) | Err(nix::errno::Errno::EINVAL) => {}
                Err(errno) => return Err(errno.into()),
            }
        }
        // SAFETY: as above: a fresh kernel-chosen range over a read-write
        // file that is at least `len` bytes long.
        let ptr = unsafe { mmap(None, length, prot, MapFlags::MAP_SHARED, file, 0) }?;
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
            backing: Backing::Msync,
        })
    }

    /// A zeroed heap buffer of `len` bytes.
    pub(crate) fn heap(len: usize) -> Mapping {
        assert!(len > 0, "zero-length heap region");
        let buffer: Box<[u8]> = vec![0u8; len].into_boxed_slice();
        let ptr =
            NonNull::new(Box::into_raw(buffer).cast::<u8>()).expect("Box pointer is non-null");
        Mapping {
            ptr,
            len,
            backing: Backing::Heap,
        }
    }

    pub(crate) fn backing(&self) -> Backing {
        self.backing
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The base address, for registering the range with a NIC or handing it
    /// to the interconnect. Valid as long as `self` lives.
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn check(&self, offset: usize, len: usize) {
        let end = offset.checked_add(len).expect("range end overflows");
        assert!(
            end <= self.len,
            "range {offset}..{end} outside the {}-byte mapping",
            self.len
        );
    }

    /// Copy `data` into the mapping at `offset`.
    pub(crate) fn copy_in(&self, offset: usize, data: &[u8]) {
        self.check(offset, data.len());
        // SAFETY: the range is inside the mapping (checked above), `data` is
        // a distinct Rust allocation so the ranges do not overlap, and
        // callers never copy into bytes another thread is accessing.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len())
        }
    }

    /// Copy bytes at `offset` out of the mapping into `buf`.
    pub(crate) fn copy_out(&self, offset: usize, buf: &mut [u8]) {
        self.check(offset, buf.len());
        // SAFETY: the range is inside the mapping (checked above) and `buf`
        // is an exclusive Rust buffer that cannot overlap the mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                buf.as_mut_ptr(),
                buf.len(),
            )
        }
    }

    /// Set `len` bytes at `offset` to `byte`.
    pub(crate) fn fill(&self, offset: usize, len: usize, byte: u8) {
        self.check(offset, len);
        // SAFETY: the range is inside the mapping (checked above) and no
        // other thread accesses it (callers' discipline, module comment).
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(offset), byte, len) }
    }

    /// msync(MS_SYNC) the pages that hold `offset..offset + len`.
    pub(crate) fn msync(&self, offset: usize, len: usize) -> io::Result<()> {
        self.check(offset, len);
        if len == 0 {
            return Ok(());
        }
        let page = page_size();
        let start = offset / page * page;
        let end = (offset + len).div_ceil(page) * page;
        let end = end.min(self.len);
        // SAFETY: start is page-aligned and inside the mapping (the mapping
        // itself starts on a page boundary), end is clamped to the mapping,
        // and msync neither reads nor writes Rust-visible state.
        let base = unsafe { NonNull::new_unchecked(self.ptr.as_ptr().add(start)) };
        // SAFETY: `base..base + (end - start)` lies inside our live mapping.
        unsafe { msync(base.cast(), end - start, MsFlags::MS_SYNC) }?;
        Ok(())
    }

    /// Write back the CPU cache lines that hold `offset..offset + len`, then
    /// fence, so that stores to a MAP_SYNC mapping are on media.
    pub(crate) fn flush_cache_lines(&self, offset: usize, len: usize) {
        self.check(offset, len);
        #[cfg(target_arch = "x86_64")]
        {
            let start = offset / CACHE_LINE_BYTES * CACHE_LINE_BYTES;
            let mut line = start;
            while line < offset + len {
                // SAFETY: `line` is inside the mapping (start is aligned down
                // from an in-range offset and the loop stops before the
                // range's end); clflush only evicts a cache line and is
                // available on every x86_64 CPU.
                unsafe { std::arch::x86_64::_mm_clflush(self.ptr.as_ptr().add(line)) };
                line += CACHE_LINE_BYTES;
            }
            // SAFETY: sfence has no memory-safety preconditions; it orders
            // the flushes above before any later store.
            unsafe { std::arch::x86_64::_mm_sfence() };
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            // No portable cache-flush instruction: fall back to msync, which
            // is always correct for a shared mapping.
            let _ = self.msync(offset, len);
        }
    }
}

/// Start writeback of the dirty pages of `file` in `offset..offset + len`
/// (sync_file_range with SYNC_FILE_RANGE_WRITE): it waits for neither the
/// pages nor the file's metadata, so it promises nothing durable.
pub(crate) fn start_writeback(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (offset, len) = (
        i64::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?,
        i64::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?,
    );
    // SAFETY: sync_file_range takes an open descriptor (borrowed from `file`
    // for the call) and plain integers; it touches no memory of ours.
    let rc = unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        match self.backing {
            Backing::Heap => {
                let slice = std::ptr::slice_from_raw_parts_mut(self.ptr.as_ptr(), self.len);
                // SAFETY: the pointer came from `Box::into_raw` of a boxed
                // slice of exactly `len` bytes in `heap`, and is freed once.
                drop(unsafe { Box::from_raw(slice) });
            }
            Backing::Msync | Backing::MapSync => {
                // SAFETY: ptr/len are exactly what mmap returned, nothing
                // borrows the mapping past its owner's life (no reference
                // into it escapes this module), and it is unmapped once.
                if let Err(errno) = unsafe { munmap(self.ptr.cast(), self.len) } {
                    tracing::error!(%errno, len_bytes = self.len, "munmap of the NVRAM region failed");
                }
            }
        }
    }
}

fn page_size() -> usize {
    // sysconf(_SC_PAGESIZE) cannot fail on Linux; 4 KiB is the floor.
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map(|size| size as usize)
        .unwrap_or(4096)
}
