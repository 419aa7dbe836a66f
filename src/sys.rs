//! Every `unsafe` of the nvmirror package: handing the NVRAM region's log
//! areas to the interconnect.

use std::sync::Arc;

use interconnect::SharedMemory;
use nvlog::{Area, Region};

/// The bytes of `area` of `region` as interconnect memory: the local log
/// (which the transport reads) or the partner mirror (which it writes).
pub fn area_memory(region: &Arc<Region>, area: Area) -> SharedMemory {
    assert!(
        area.offset + area.len <= region.len(),
        "area outside the region"
    );
    let owner: Arc<dyn std::any::Any + Send + Sync> = region.clone();
    // SAFETY: the pointer is inside the region's live mapping (checked
    // above) and `owner` keeps the region, hence the mapping, alive as long
    // as the SharedMemory exists. The region never hands out references to
    // its bytes (only raw copies), so no `&[u8]` aliases these bytes while
    // the transport reads or writes them; the node keeps the byte ranges
    // the transport touches disjoint from those it writes concurrently
    // (a record is posted only after it is written; the mirror area is read
    // only once its connection is gone).
    unsafe {
        SharedMemory::from_raw(
            region.as_ptr().add(area.offset as usize),
            area.len as usize,
            owner,
        )
    }
}
