//! What lives on the storage both nodes reach (the aggregate directory):
//! each volume's disk ([`disk`]) behind its [`volume`] with the dirty map
//! of data logged but not yet written ([`extents`]); the owner files and
//! the fence that keeps a stale owner off a volume ([`ownership`]); each
//! node's mailbox, its state for the partner to read ([`mailbox`]); and
//! which shared file systems can carry the fence at all ([`shared_fs`]).

pub mod disk;
pub mod extents;
pub mod mailbox;
pub mod ownership;
pub mod shared_fs;
pub mod volume;
