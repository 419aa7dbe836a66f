//! The NVRAM region of a node and its fixed layout.
//!
//! ```text
//! region offset
//! 0                      region header (4 KiB): magic, version, node id, geometry
//! 4 KiB                  local log (log_len bytes): this node's NVLog
//!   + 0                    log header block (4 KiB, two ping-pong slots)
//!   + 4 KiB                half 0 (half_len bytes)
//!   + 4 KiB + half_len     half 1 (half_len bytes)
//! 4 KiB + log_len        partner mirror (log_len bytes): byte image of the
//!                        partner's local log, written only by the partner
//! 4 KiB + 2 * log_len    end
//! ```
//!
//! Both nodes of a pair compute the same offsets from the same `half_len`,
//! so a byte range of the local log (log-relative offset) lands at the same
//! log-relative offset of the partner's mirror.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::record::RECORD_ALIGN_BYTES;
use crate::sys::{Backing, Mapping, CACHE_LINE_BYTES};

/// Size of the region header block at offset 0.
pub const REGION_HEADER_BYTES: u64 = 4096;
/// Size of the log header block at the start of each log area.
pub const LOG_HEADER_BYTES: u64 = 4096;
/// Smallest half the log accepts: room for a few maximum-size records.
pub const MIN_HALF_BYTES: u64 = 64 * 1024;
/// Largest payload of one record, whatever the half size. Larger client
/// writes are split into several records by the caller.
pub const MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

const REGION_MAGIC: [u8; 8] = *b"NVMIRRGN";
const REGION_FORMAT_VERSION: u16 = 1;
/// Bytes of the region header covered by its CRC (the CRC sits right after).
const REGION_HEADER_CRC_AT: usize = 60;

/// The sizes and offsets both nodes of a pair derive from one number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    half_len: u64,
}

impl Geometry {
    /// A layout whose log halves are `half_len_bytes` each (a multiple of
    /// 4 KiB, at least 64 KiB).
    pub fn new(half_len_bytes: u64) -> Result<Geometry> {
        if half_len_bytes < MIN_HALF_BYTES {
            return Err(Error::Geometry {
                reason: format!(
                    "half_len {half_len_bytes} is below the minimum of {MIN_HALF_BYTES} bytes"
                ),
            });
        }
        if half_len_bytes % 4096 != 0 {
            return Err(Error::Geometry {
                reason: format!("half_len {half_len_bytes} is not a multiple of 4096"),
            });
        }
        if half_len_bytes > (1 << 40) {
            return Err(Error::Geometry {
                reason: format!("half_len {half_len_bytes} exceeds 1 TiB"),
            });
        }
        Ok(Geometry {
            half_len: half_len_bytes,
        })
    }

    pub fn half_len(&self) -> u64 {
        self.half_len
    }

    /// Bytes of one log area: its header block and both halves.
    pub fn log_len(&self) -> u64 {
        LOG_HEADER_BYTES + 2 * self.half_len
    }

    /// Region offset of this node's local log.
    pub fn local_log_offset(&self) -> u64 {
        REGION_HEADER_BYTES
    }

    /// Region offset of the partner-mirror area.
    pub fn mirror_offset(&self) -> u64 {
        REGION_HEADER_BYTES + self.log_len()
    }

    /// Bytes of the whole region.
    pub fn region_len(&self) -> u64 {
        REGION_HEADER_BYTES + 2 * self.log_len()
    }

    /// Log-relative offset of half `half` (0 or 1).
    pub fn half_offset(&self, half: usize) -> u64 {
        assert!(half < 2, "a log has two halves, not {half}");
        LOG_HEADER_BYTES + half as u64 * self.half_len
    }

    /// The largest payload a single record may carry in this geometry: a
    /// quarter of a half (so that the waste at a half's end stays bounded),
    /// at most [`MAX_PAYLOAD_BYTES`].
    pub fn max_payload_len(&self) -> usize {
        let quarter = (self.half_len / 4) as usize - RECORD_ALIGN_BYTES;
        quarter.min(MAX_PAYLOAD_BYTES)
    }
}

/// How `Region::persist` makes bytes durable; logged at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PersistMode {
    /// DAX mapping with MAP_SYNC: CPU cache-line flushes, no system call.
    MapSync,
    /// Page-cache mapping: msync(MS_SYNC).
    Msync,
    /// Process memory for tests and simulation: "durable" bytes are tracked
    /// in a shadow image that [`Region::crash_image`] returns.
    Memory,
}

impl PersistMode {
    pub fn as_str(&self) -> &'static str {
        match self {
            PersistMode::MapSync => "map-sync (DAX, cache-line flush)",
            PersistMode::Msync => "msync (page cache)",
            PersistMode::Memory => "memory (tests/simulation, not durable)",
        }
    }
}

/// A byte range of the region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Area {
    pub offset: u64,
    pub len: u64,
}

/// A node's NVRAM: the mapped file (or a heap buffer) and its layout.
#[derive(Debug)]
pub struct Region {
    mapping: Mapping,
    geometry: Geometry,
    node_id: u32,
    path: Option<PathBuf>,
    /// The mapped file, kept open to start its writeback early
    /// ([`Region::start_writeback`]); None in memory.
    file: Option<File>,
    /// Memory mode only: the bytes a crash would keep.
    durable_image: Option<Mutex<Vec<u8>>>,
}

impl Region {
    /// Open (creating and formatting if new) the NVRAM file at `path` for
    /// `node_id` with `geometry`. An existing file must have been formatted
    /// for the same node and geometry.
    pub fn open(path: &Path, node_id: u32, geometry: Geometry) -> Result<Region> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|source| Error::Open {
                path: path.to_owned(),
                source,
            })?;
        let needed = geometry.region_len();
        // Check what the file holds before changing anything: a file that is
        // not this node's region is refused untouched.
        check_existing_header(&file, path, node_id, geometry)?;
        let is_device = size_device(&file, path, needed)?;
        let is_dax_candidate = is_device || on_dax_mount(path);
        let mapping =
            Mapping::map_file(&file, needed as usize, is_dax_candidate).map_err(|source| {
                Error::Map {
                    path: path.to_owned(),
                    len_bytes: needed,
                    source,
                }
            })?;
        let region = Region {
            mapping,
            geometry,
            node_id,
            path: Some(path.to_owned()),
            file: Some(file),
            durable_image: None,
        };
        region.format_or_check()?;
        tracing::info!(
            path = %path.display(),
            node_id,
            region_bytes = needed,
            half_bytes = geometry.half_len(),
            mode = region.mode().as_str(),
            "NVRAM region mapped"
        );
        Ok(region)
    }

    /// Open an existing NVRAM file with the node id and geometry its region
    /// header records (for inspection tools).
    pub fn open_existing(path: &Path) -> Result<Region> {
        let mut block = [0u8; REGION_HEADER_CRC_AT + 4];
        let mut file = File::open(path).map_err(|source| Error::Open {
            path: path.to_owned(),
            source,
        })?;
        std::io::Read::read_exact(&mut file, &mut block).map_err(|_| {
            Error::RegionHeaderCorrupt {
                reason: "file shorter than a region header",
            }
        })?;
        let (node_id, half_len) = decode_region_header(&block)?;
        Region::open(path, node_id, Geometry::new(half_len)?)
    }

    /// A zeroed, formatted region in process memory.
    pub fn in_memory(node_id: u32, geometry: Geometry) -> Region {
        let len = geometry.region_len() as usize;
        let region = Region {
            mapping: Mapping::heap(len),
            geometry,
            node_id,
            path: None,
            file: None,
            durable_image: Some(Mutex::new(vec![0; len])),
        };
        region
            .format_or_check()
            .expect("formatting a zeroed memory region cannot fail");
        region
    }

    /// A memory region holding `image` (typically a [`Region::crash_image`]),
    /// as a node would find its NVRAM after a restart. The image counts as
    /// durable.
    pub fn from_image(node_id: u32, geometry: Geometry, image: &[u8]) -> Result<Region> {
        let len = geometry.region_len() as usize;
        if image.len() != len {
            return Err(Error::Geometry {
                reason: format!("image of {} bytes for a {len}-byte region", image.len()),
            });
        }
        let mapping = Mapping::heap(len);
        mapping.copy_in(0, image);
        let region = Region {
            mapping,
            geometry,
            node_id,
            path: None,
            file: None,
            durable_image: Some(Mutex::new(image.to_vec())),
        };
        region.format_or_check()?;
        Ok(region)
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    pub fn node_id(&self) -> u32 {
        self.node_id
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn len(&self) -> u64 {
        self.mapping.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.mapping.len() == 0
    }

    pub fn mode(&self) -> PersistMode {
        match self.mapping.backing() {
            Backing::MapSync => PersistMode::MapSync,
            Backing::Msync => PersistMode::Msync,
            Backing::Heap => PersistMode::Memory,
        }
    }

    /// This node's local log.
    pub fn local_log(&self) -> Area {
        Area {
            offset: self.geometry.local_log_offset(),
            len: self.geometry.log_len(),
        }
    }

    /// The area the partner mirrors its log into.
    pub fn mirror(&self) -> Area {
        Area {
            offset: self.geometry.mirror_offset(),
            len: self.geometry.log_len(),
        }
    }

    /// Base address of the mapping, for registering it with a NIC or an
    /// interconnect. The pointer is valid while `self` lives; touching the
    /// bytes through it is the caller's `unsafe`, under the same rule as the
    /// copies here: never the same bytes from two threads at once.
    pub fn as_ptr(&self) -> *mut u8 {
        self.mapping.as_ptr()
    }

    pub fn write(&self, offset: u64, data: &[u8]) {
        self.mapping.copy_in(offset as usize, data);
    }

    pub fn read(&self, offset: u64, buf: &mut [u8]) {
        self.mapping.copy_out(offset as usize, buf);
    }

    pub fn fill(&self, offset: u64, len: u64, byte: u8) {
        self.mapping.fill(offset as usize, len as usize, byte);
    }

    /// A copy of `area`'s bytes (for scanning a log image).
    pub fn snapshot(&self, area: Area) -> Vec<u8> {
        let mut bytes = vec![0; area.len as usize];
        self.read(area.offset, &mut bytes);
        bytes
    }

    /// Start writing `offset..offset + len` back to the file without waiting
    /// (sync_file_range WRITE): no durability point, only less for a later
    /// [`Region::persist`] to wait for. A DAX mapping or process memory has
    /// no page cache to drain, so nothing is done there.
    pub fn start_writeback(&self, offset: u64, len: u64) -> Result<()> {
        let (Backing::Msync, Some(file)) = (self.mapping.backing(), &self.file) else {
            return Ok(());
        };
        crate::sys::start_writeback(file, offset, len).map_err(|source| Error::Persist {
            offset,
            end: offset + len,
            source,
        })
    }

    /// Make `offset..offset + len` durable in the region's mode.
    pub fn persist(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        match self.mapping.backing() {
            Backing::MapSync => self
                .mapping
                .flush_cache_lines(offset as usize, len as usize),
            Backing::Msync => {
                self.mapping
                    .msync(offset as usize, len as usize)
                    .map_err(|source| Error::Persist {
                        offset,
                        end: offset + len,
                        source,
                    })?
            }
            Backing::Heap => {
                let durable = self
                    .durable_image
                    .as_ref()
                    .expect("memory regions keep a durable image");
                let mut durable = durable.lock();
                let range = offset as usize..(offset + len) as usize;
                self.mapping.copy_out(range.start, &mut durable[range]);
            }
        }
        Ok(())
    }

    /// Memory mode: the bytes a crash right now could leave behind. Every
    /// persisted byte is kept; of the bytes written since, an arbitrary
    /// (seeded) subset of cache lines survives, each possibly torn at any
    /// byte: a line keeps the old bytes, the new bytes, or the new bytes up
    /// to a random point.
    pub fn crash_image(&self, seed: u64) -> Vec<u8> {
        let durable = self
            .durable_image
            .as_ref()
            .expect("crash_image needs a memory region")
            .lock();
        let mut image = durable.clone();
        let mut live = vec![0u8; image.len()];
        self.mapping.copy_out(0, &mut live);
        let mut rng = SplitMix64(seed);
        for (image_line, live_line) in image
            .chunks_mut(CACHE_LINE_BYTES)
            .zip(live.chunks(CACHE_LINE_BYTES))
        {
            if image_line == live_line {
                continue;
            }
            match rng.next() % 3 {
                0 => {} // the old bytes survive
                1 => image_line.copy_from_slice(live_line),
                _ => {
                    let torn_at = (rng.next() % live_line.len() as u64) as usize;
                    image_line[..torn_at].copy_from_slice(&live_line[..torn_at]);
                }
            }
        }
        image
    }

    /// Write the region header if the region is blank, else check that it
    /// was formatted for this node and geometry.
    fn format_or_check(&self) -> Result<()> {
        let mut block = [0u8; REGION_HEADER_CRC_AT + 4];
        self.read(0, &mut block);
        if block.iter().all(|&byte| byte == 0) {
            let header = self.encode_region_header();
            self.write(0, &header);
            self.persist(0, header.len() as u64)?;
            tracing::info!(node_id = self.node_id, "formatted a blank NVRAM region");
            return Ok(());
        }
        let (found_node, found_half) = decode_region_header(&block)?;
        if found_node != self.node_id || found_half != self.geometry.half_len() {
            return Err(Error::RegionMismatch {
                found: format!("node {found_node} with {found_half}-byte halves"),
                expected: format!(
                    "node {} with {}-byte halves",
                    self.node_id,
                    self.geometry.half_len()
                ),
            });
        }
        Ok(())
    }

    /// Region header layout (little-endian):
    ///
    /// | offset | size | field                          |
    /// |-------:|-----:|--------------------------------|
    /// |      0 |    8 | magic `NVMIRRGN`               |
    /// |      8 |    2 | format version (1)             |
    /// |     10 |    2 | reserved, zero                 |
    /// |     12 |    4 | node id                        |
    /// |     16 |    8 | half length in bytes           |
    /// |     24 |    8 | region length in bytes         |
    /// |     32 |    8 | local log offset               |
    /// |     40 |    8 | partner mirror offset          |
    /// |     48 |    8 | log area length                |
    /// |     56 |    4 | reserved, zero                 |
    /// |     60 |    4 | CRC32C of bytes 0..60          |
    fn encode_region_header(&self) -> [u8; REGION_HEADER_CRC_AT + 4] {
        let g = self.geometry;
        let mut block = [0u8; REGION_HEADER_CRC_AT + 4];
        block[0..8].copy_from_slice(&REGION_MAGIC);
        block[8..10].copy_from_slice(&REGION_FORMAT_VERSION.to_le_bytes());
        block[12..16].copy_from_slice(&self.node_id.to_le_bytes());
        block[16..24].copy_from_slice(&g.half_len().to_le_bytes());
        block[24..32].copy_from_slice(&g.region_len().to_le_bytes());
        block[32..40].copy_from_slice(&g.local_log_offset().to_le_bytes());
        block[40..48].copy_from_slice(&g.mirror_offset().to_le_bytes());
        block[48..56].copy_from_slice(&g.log_len().to_le_bytes());
        let crc = crc32c::crc32c(&block[..REGION_HEADER_CRC_AT]);
        block[REGION_HEADER_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        block
    }
}

/// Why the NVRAM at `path` holds no region that [`Region::open`] would keep
/// (it would format a new one): `Some("missing")`, `Some("blank")` or
/// `Some("shorter than the region")`; `None` when it holds one.
pub fn holds_no_region(path: &Path, geometry: Geometry) -> Result<Option<&'static str>> {
    use std::os::unix::fs::FileTypeExt;
    let open_error = |source| Error::Open {
        path: path.to_owned(),
        source,
    };
    let metadata = match std::fs::metadata(path) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Some("missing")),
        other => other.map_err(open_error)?,
    };
    // A block device's size is not its metadata's length.
    if !metadata.file_type().is_block_device() && metadata.len() < geometry.region_len() {
        return Ok(Some("shorter than the region"));
    }
    let file = File::open(path).map_err(open_error)?;
    let mut block = [0u8; REGION_HEADER_CRC_AT + 4];
    let mut read = 0;
    while read < block.len() {
        match std::os::unix::fs::FileExt::read_at(&file, &mut block[read..], read as u64) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(source) => return Err(open_error(source)),
        }
    }
    Ok(block[..read]
        .iter()
        .all(|&byte| byte == 0)
        .then_some("blank"))
}

/// Refuse a non-blank file whose region header is not this node's.
fn check_existing_header(file: &File, path: &Path, node_id: u32, geometry: Geometry) -> Result<()> {
    let mut block = [0u8; REGION_HEADER_CRC_AT + 4];
    let mut read = 0;
    while read < block.len() {
        match std::os::unix::fs::FileExt::read_at(file, &mut block[read..], read as u64) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(source) => {
                return Err(Error::Open {
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }
    if block[..read].iter().all(|&byte| byte == 0) {
        return Ok(()); // empty or blank: will be formatted
    }
    if read < block.len() {
        return Err(Error::RegionHeaderCorrupt {
            reason: "file shorter than a region header and not blank",
        });
    }
    let (found_node, found_half) = decode_region_header(&block)?;
    if found_node != node_id || found_half != geometry.half_len() {
        return Err(Error::RegionMismatch {
            found: format!("node {found_node} with {found_half}-byte halves"),
            expected: format!("node {node_id} with {}-byte halves", geometry.half_len()),
        });
    }
    Ok(())
}

/// Check a region header; returns its node id and half length.
fn decode_region_header(block: &[u8; REGION_HEADER_CRC_AT + 4]) -> Result<(u32, u64)> {
    if block.iter().all(|&byte| byte == 0) {
        return Err(Error::RegionHeaderCorrupt {
            reason: "blank: the region was never formatted",
        });
    }
    if block[0..8] != REGION_MAGIC {
        return Err(Error::RegionHeaderCorrupt {
            reason: "bad magic: not an nvmirror NVRAM region",
        });
    }
    let stored_crc = u32::from_le_bytes(block[REGION_HEADER_CRC_AT..].try_into().expect("4 bytes"));
    if crc32c::crc32c(&block[..REGION_HEADER_CRC_AT]) != stored_crc {
        return Err(Error::RegionHeaderCorrupt {
            reason: "header checksum mismatch",
        });
    }
    let version = u16::from_le_bytes([block[8], block[9]]);
    if version != REGION_FORMAT_VERSION {
        return Err(Error::RegionHeaderCorrupt {
            reason: "unknown region format version",
        });
    }
    let node_id = u32::from_le_bytes(block[12..16].try_into().expect("4 bytes"));
    let half_len = u64::from_le_bytes(block[16..24].try_into().expect("8 bytes"));
    Ok((node_id, half_len))
}

/// Size a regular file to `needed` bytes; check that a device is big enough.
/// Returns whether `file` is a device (a /dev/pmem or /dev/dax candidate).
fn size_device(file: &File, path: &Path, needed: u64) -> Result<bool> {
    let metadata = file.metadata().map_err(|source| Error::Open {
        path: path.to_owned(),
        source,
    })?;
    let file_type = metadata.file_type();
    if file_type.is_block_device() || file_type.is_char_device() {
        // A block device reports its size by seeking to the end; a DAX
        // character device does not, and mmap itself says if it is short.
        if file_type.is_block_device() {
            use std::io::Seek;
            let actual = (&*file).seek(std::io::SeekFrom::End(0)).unwrap_or(0);
            if actual < needed {
                return Err(Error::DeviceTooSmall {
                    path: path.to_owned(),
                    actual_bytes: actual,
                    needed_bytes: needed,
                });
            }
        }
        return Ok(true);
    }
    if metadata.len() < needed {
        file.set_len(needed).map_err(|source| Error::Size {
            path: path.to_owned(),
            len_bytes: needed,
            source,
        })?;
    }
    Ok(false)
}

/// Whether `path` lives on a file system mounted with `dax`, where MAP_SYNC
/// is worth asking for. Unknown means no; MAP_SYNC is attempted anyway on
/// devices.
fn on_dax_mount(path: &Path) -> bool {
    let Ok(canonical) = path.canonicalize() else {
        return false;
    };
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    // The longest mount point that prefixes the path is its file system.
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _source = fields.next()?;
            let mount_point = fields.next()?;
            let _fs_type = fields.next()?;
            let options = fields.next()?;
            canonical.starts_with(mount_point).then(|| {
                (
                    mount_point.len(),
                    options.split(',').any(|o| o == "dax" || o == "dax=always"),
                )
            })
        })
        .max_by_key(|(len, _)| *len)
        .is_some_and(|(_, dax)| dax)
}

/// A tiny seeded generator so crash images need no RNG dependency.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

const _: () = assert!(REGION_HEADER_CRC_AT + 4 <= REGION_HEADER_BYTES as usize);
const _: () = assert!(LOG_HEADER_BYTES % RECORD_ALIGN_BYTES as u64 == 0);
