//! `SharedMemory`: a byte range this crate reads from (the local log) or
//! writes into (the partner mirror) without owning it. All of the crate's
//! `unsafe` lives in this module.
//!
//! Both ranges belong to the node (its NVRAM mapping); other threads of the
//! node, and later an RDMA NIC, touch the same bytes concurrently. So every
//! access here is an atomic access (byte-wise at the unaligned edges, 8 bytes
//! at a time in between, `Relaxed`). A racing reader may see a torn mix of old
//! and new bytes, which the log's own checksums detect, but never undefined
//! behaviour. Ordering between a writer and a reader comes from the hand-off
//! that publishes the range (a mutex, a channel, a completion), not from
//! these copies.

use std::any::Any;
use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use crate::Error;

const WORD_BYTES: usize = std::mem::size_of::<u64>();
const _: () = assert!(std::mem::align_of::<AtomicU64>() == WORD_BYTES);
const _: () = assert!(std::mem::size_of::<AtomicU64>() == WORD_BYTES);

/// An owner-kept range of memory, shared between threads (and devices).
///
/// Cloning is cheap and shares the range and its owner.
#[derive(Clone)]
pub struct SharedMemory {
    ptr: NonNull<u8>,
    len_bytes: usize,
    /// Keeps the memory mapped / allocated while any clone exists.
    _owner: Arc<dyn Any + Send + Sync>,
}

// SAFETY: `SharedMemory` is a pointer to memory that, per the contract of
// `from_raw` (or by construction in `zeroed`), stays valid while `_owner` is
// alive and is only ever accessed through atomic operations, which are sound
// from any thread concurrently. The owner itself is `Send + Sync`.
unsafe impl Send for SharedMemory {}
// SAFETY: as for `Send`: every access through `&SharedMemory` is atomic.
unsafe impl Sync for SharedMemory {}

impl fmt::Debug for SharedMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedMemory")
            .field("ptr", &self.ptr)
            .field("len_bytes", &self.len_bytes)
            .finish()
    }
}

impl SharedMemory {
    /// Wraps memory owned by someone else (the node's NVRAM mapping).
    ///
    /// # Safety
    ///
    /// The caller guarantees, for as long as `owner` (or any clone of the
    /// returned value) is alive:
    /// - `ptr` is non-null and valid for reads and writes of `len_bytes`
    ///   bytes, and `len_bytes <= isize::MAX`;
    /// - the memory is not unmapped or freed before `owner` is dropped;
    /// - nothing holds a Rust reference (`&[u8]`, `&mut [u8]`) to any of
    ///   these bytes while they may be written: other accesses go through
    ///   raw pointers with atomic or volatile operations, or through
    ///   another `SharedMemory`, or are done by a device (DMA/RDMA).
    pub unsafe fn from_raw(
        ptr: *mut u8,
        len_bytes: usize,
        owner: Arc<dyn Any + Send + Sync>,
    ) -> Self {
        let ptr = NonNull::new(ptr).expect("SharedMemory::from_raw: null pointer");
        assert!(
            len_bytes <= isize::MAX as usize,
            "SharedMemory::from_raw: length overflows isize"
        );
        Self {
            ptr,
            len_bytes,
            _owner: owner,
        }
    }

    /// Allocates a zeroed region of `len_bytes` that this value owns (tests,
    /// simulation, benchmarks).
    pub fn zeroed(len_bytes: usize) -> Self {
        let words = len_bytes.div_ceil(WORD_BYTES).max(1);
        let buffer: Arc<Box<[AtomicU64]>> =
            Arc::new((0..words).map(|_| AtomicU64::new(0)).collect());
        // `AtomicU64` has interior mutability, so writing through a pointer
        // derived from a shared borrow is allowed.
        let ptr = buffer.as_ptr().cast::<u8>().cast_mut();
        // SAFETY: `ptr` points at `words * 8 >= len_bytes` bytes of a heap
        // allocation kept alive by `buffer`, passed as the owner; the bytes
        // are atomics, never borrowed as plain `u8`; the length is bounded by
        // the allocation, hence by `isize::MAX`.
        unsafe { Self::from_raw(ptr, len_bytes, buffer) }
    }

    /// Length of the region in bytes.
    pub fn len(&self) -> usize {
        self.len_bytes
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.len_bytes == 0
    }

    /// Start of the region, for registering it with an RDMA device.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Checks that `offset..offset + len_bytes` lies inside the region.
    pub fn check_range(&self, offset: u64, len_bytes: usize) -> Result<usize, Error> {
        let out_of_bounds = || Error::OutOfBounds {
            offset,
            len_bytes: len_bytes as u64,
            region_len_bytes: self.len_bytes as u64,
        };
        let start = usize::try_from(offset).map_err(|_| out_of_bounds())?;
        let end = start.checked_add(len_bytes).ok_or_else(out_of_bounds)?;
        if end > self.len_bytes {
            return Err(out_of_bounds());
        }
        Ok(start)
    }

    /// Copies `buf.len()` bytes starting at `offset` out of the region.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        let start = self.check_range(offset, buf.len())?;
        let (head, words, tail) = self.split(start, buf.len());
        let (buf_head, rest) = buf.split_at_mut(head);
        let (buf_words, buf_tail) = rest.split_at_mut(words.len() * WORD_BYTES);
        for (i, byte) in buf_head.iter_mut().enumerate() {
            *byte = self.byte(start + i).load(Ordering::Relaxed);
        }
        for (chunk, word) in buf_words.chunks_exact_mut(WORD_BYTES).zip(words) {
            chunk.copy_from_slice(&word.load(Ordering::Relaxed).to_ne_bytes());
        }
        let tail_at = start + head + words.len() * WORD_BYTES;
        debug_assert_eq!(buf_tail.len(), tail);
        for (i, byte) in buf_tail.iter_mut().enumerate() {
            *byte = self.byte(tail_at + i).load(Ordering::Relaxed);
        }
        Ok(())
    }

    /// Copies `data` into the region starting at `offset`.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), Error> {
        let start = self.check_range(offset, data.len())?;
        let (head, words, tail) = self.split(start, data.len());
        let (data_head, rest) = data.split_at(head);
        let (data_words, data_tail) = rest.split_at(words.len() * WORD_BYTES);
        for (i, &byte) in data_head.iter().enumerate() {
            self.byte(start + i).store(byte, Ordering::Relaxed);
        }
        for (chunk, word) in data_words.chunks_exact(WORD_BYTES).zip(words) {
            let bytes: [u8; WORD_BYTES] = chunk.try_into().expect("a whole word");
            word.store(u64::from_ne_bytes(bytes), Ordering::Relaxed);
        }
        let tail_at = start + head + words.len() * WORD_BYTES;
        debug_assert_eq!(data_tail.len(), tail);
        for (i, &byte) in data_tail.iter().enumerate() {
            self.byte(tail_at + i).store(byte, Ordering::Relaxed);
        }
        Ok(())
    }

    /// `start..start + len` (bounds-checked by the caller) as the bytes
    /// before the first 8-byte-aligned address, the whole aligned words,
    /// and the bytes after them: copying word by word is what makes a large
    /// copy (a mirrored record, an indexer window) run near memcpy speed.
    fn split(&self, start: usize, len: usize) -> (usize, &[AtomicU64], usize) {
        assert!(start + len <= self.len_bytes);
        let address = self.ptr.as_ptr() as usize + start;
        let head = (address.next_multiple_of(WORD_BYTES) - address).min(len);
        let words = (len - head) / WORD_BYTES;
        let tail = len - head - words * WORD_BYTES;
        if words == 0 {
            // `start + head` need not be aligned then: no slice of words.
            return (head, &[], tail);
        }
        // SAFETY: `start + head` is 8-byte aligned (AtomicU64's alignment)
        // and the `words * 8` bytes from it lie inside the region
        // (`start + len <= len_bytes`, asserted above), which is valid while
        // `self` lives; the bytes are never plainly borrowed (the `from_raw`
        // contract), so an atomic view of them aliases nothing.
        let words = unsafe {
            std::slice::from_raw_parts(
                self.ptr.as_ptr().add(start + head).cast::<AtomicU64>(),
                words,
            )
        };
        (head, words, tail)
    }

    /// The byte at `at`, which the caller has bounds-checked.
    fn byte(&self, at: usize) -> &AtomicU8 {
        assert!(at < self.len_bytes);
        // SAFETY: `at < len_bytes`, so the pointer is inside the region,
        // which is valid for reads and writes while `self` (and so the owner)
        // lives; `AtomicU8` has the size and alignment of `u8`; the
        // `from_raw` contract rules out plain references to these bytes, so
        // an atomic view of them aliases nothing.
        unsafe { AtomicU8::from_ptr(self.ptr.as_ptr().add(at)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_round_trip_at_every_alignment() {
        let memory = SharedMemory::zeroed(64);
        for offset in 0..16u64 {
            for len in 0..40usize {
                let data: Vec<u8> = (0..len)
                    .map(|i| (i as u8) ^ (offset as u8) ^ 0x5a)
                    .collect();
                memory.write_at(offset, &data).unwrap();
                let mut back = vec![0u8; len];
                memory.read_at(offset, &mut back).unwrap();
                assert_eq!(back, data, "offset {offset} len {len}");
            }
        }
    }

    #[test]
    fn out_of_range_copies_are_refused_and_write_nothing() {
        let memory = SharedMemory::zeroed(16);
        assert!(matches!(
            memory.write_at(10, &[1; 7]),
            Err(Error::OutOfBounds {
                offset: 10,
                len_bytes: 7,
                region_len_bytes: 16
            })
        ));
        assert!(memory.write_at(u64::MAX, &[1]).is_err());
        assert!(memory.read_at(17, &mut []).is_err());
        memory.write_at(16, &[]).unwrap();
        let mut all = [0xffu8; 16];
        memory.read_at(0, &mut all).unwrap();
        assert_eq!(all, [0u8; 16]);
    }

    #[test]
    fn clones_share_the_bytes() {
        let a = SharedMemory::zeroed(8);
        let b = a.clone();
        a.write_at(3, b"xyz").unwrap();
        let mut got = [0u8; 3];
        b.read_at(3, &mut got).unwrap();
        assert_eq!(&got, b"xyz");
        assert_eq!(a.as_ptr(), b.as_ptr());
        assert_eq!(b.len(), 8);
    }
}
