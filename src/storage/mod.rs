//! Where the volumes' data lives: a volume's backing file and its fence
//! ([`volume`]), and the dirty map of data logged but not yet in the file
//! ([`extents`]).

pub mod extents;
pub mod volume;
