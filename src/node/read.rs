//! The read path: the dirty map first (data logged but not yet in the
//! volume's file, in the local log or the partner's mirror), then the file.

use std::sync::atomic::Ordering;

use crate::error::Result;
use crate::node::Node;
use crate::storage::extents::Source;
use crate::storage::volume::Volume;

impl Node {
    /// Read `buf.len()` bytes at `offset`: the dirty map first, then the file.
    pub fn read(&self, volume: &Volume, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(volume, offset, buf.len() as u64)?;
        // The owner file, not only the flag: a node that was stopped while
        // its partner took over must not serve what it had before (a stat
        // of the owner file per read).
        volume.fence.check()?;
        let end = offset + buf.len() as u64;
        let mut gaps = Vec::new();
        {
            let extents = volume.extents.lock();
            let mut cursor = offset;
            for piece in extents.pieces(offset..end) {
                if piece.start > cursor {
                    gaps.push(cursor..piece.start);
                }
                let at = (piece.start - offset) as usize;
                let target = &mut buf[at..at + piece.len as usize];
                match piece.source {
                    Source::Region { offset } => self.region.read(offset, target),
                    Source::Zero | Source::Hole => target.fill(0),
                }
                cursor = piece.start + piece.len;
            }
            if cursor < end {
                gaps.push(cursor..end);
            }
        }
        // Gaps have no newer data in any log; a consistency point or the
        // replay removes an extent only after its bytes are in the file.
        for gap in gaps {
            let at = (gap.start - offset) as usize;
            volume.read_file(gap.start, &mut buf[at..at + (gap.end - gap.start) as usize])?;
        }
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        self.stats
            .read_bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        if let Some(hooks) = self.hooks() {
            hooks.read_served();
        }
        Ok(())
    }
}
