//! The storage node's error type, and why HA refuses a takeover or a
//! giveback ([`Refusal`], an answer the operator acts on rather than a
//! failure).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),

    #[error(transparent)]
    Log(#[from] nvlog::Error),

    #[error(transparent)]
    Interconnect(#[from] interconnect::Error),

    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "volume file {path} holds {actual_bytes} bytes but the volume is configured with \
         {configured_bytes}; fix the size in the config (resizing is not automatic)"
    )]
    VolumeSizeMismatch {
        path: PathBuf,
        configured_bytes: u64,
        actual_bytes: u64,
    },

    #[error("{path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },

    #[error(
        "fenced: node {volumes_of}'s volumes belong to another node now (this node held them at \
         epoch {epoch}); it no longer writes or acknowledges writes to them"
    )]
    Fenced { volumes_of: u32, epoch: u64 },

    #[error("refused: {0}")]
    Refused(#[from] Refusal),

    #[error(
        "the owner files say node {partner} serves this node's volumes and this node serves node \
         {partner}'s; resolve {} and {} by hand",
        own_file.display(),
        their_file.display()
    )]
    OwnershipConflict {
        partner: u32,
        own_file: PathBuf,
        their_file: PathBuf,
    },

    #[error(
        "node {volumes_of}'s volumes changed hands meanwhile (now node {owner} at epoch {epoch})"
    )]
    ChangedHands {
        volumes_of: u32,
        owner: u32,
        epoch: u64,
    },

    /// At boot, resuming the partner's volumes (a takeover refuses with
    /// [`Refusal::PartnerUnknown`] instead).
    #[error("node {partner} never wrote its mailbox: its volumes are unknown")]
    PartnerUnknown { partner: u32 },

    #[error(
        "{} is still locked after {waited:?}: another change of hands is under way (or its node \
         is stopped in the middle of one); try again",
        path.display()
    )]
    OwnerFileBusy {
        path: PathBuf,
        waited: std::time::Duration,
    },

    #[error(
        "the NVRAM file {} is {why}, but this node has started before (boot {boot}, says its \
         mailbox {}): its log and the writes in it are gone, and formatting a new one would serve \
         without them. Let the partner take over (its mirror holds them), give back, then start \
         this node; or, for a new node, remove the mailbox first",
        nvram.display(),
        mailbox.display()
    )]
    NvramLost {
        nvram: PathBuf,
        why: &'static str,
        boot: u64,
        mailbox: PathBuf,
    },

    #[error(
        "the shared storage at {} is not the file system it was when the node started (device \
         {was:#x}, now {now:#x}): is it unmounted? Nothing more is written there",
        path.display()
    )]
    SharedStorageChanged { path: PathBuf, was: u64, now: u64 },

    #[error(
        "the aggregate directory {} is on {fstype}, which cannot carry the fence as mounted: {why}",
        path.display()
    )]
    UnsafeSharedStorage {
        path: PathBuf,
        fstype: String,
        why: String,
    },

    #[error("the mirror holds node {found}'s log, not node {expected}'s")]
    WrongMirror { found: u32, expected: u32 },

    #[error("the link to the partner went down during the resync")]
    ResyncInterrupted,

    #[error(
        "writes still hold {reserved_bytes} bytes of log space after {waited:?}: the log is not \
         discarded; retried"
    )]
    WritersStuck {
        reserved_bytes: u64,
        waited: std::time::Duration,
    },

    #[error("no volume `{name}` is served here")]
    NoSuchVolume { name: String },

    #[error("request {offset}+{len} is outside volume `{volume}` of {size_bytes} bytes")]
    OutOfRange {
        volume: String,
        offset: u64,
        len: u64,
        size_bytes: u64,
    },

    /// Durability can no longer be promised (a failed fsync or msync):
    /// every later write fails until the node restarts.
    #[error("the node has stopped accepting writes: {reason}")]
    NodeFailed { reason: String },

    #[error("{during}: {errno}")]
    Signals {
        during: &'static str,
        errno: nix::errno::Errno,
    },

    #[error("cannot listen on {addr}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a takeover or a giveback is refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("this node already serves the partner's volumes")]
    AlreadyHolding,

    #[error("this node is {role}, it cannot take over")]
    NotServing { role: &'static str },

    #[error("this node's own volumes were taken over: it waits for giveback and cannot take over")]
    OwnVolumesTakenOver,

    #[error("node {partner} never wrote its mailbox: its volumes are unknown")]
    PartnerUnknown { partner: u32 },

    #[error(
        "node {partner}'s log halves are {theirs} bytes, ours {ours}: the mirror cannot be read"
    )]
    HalfSizeMismatch {
        partner: u32,
        theirs: u64,
        ours: u64,
    },

    #[error("node {partner}'s volumes belong to node {owner}")]
    OwnedByOther { partner: u32, owner: u32 },

    /// The mailbox says the mirror may lack acknowledged writes.
    #[error("{why}")]
    MirrorNotTrusted { why: String },

    /// The partner is fenced, its volumes are not served: a giveback
    /// returns them with their log.
    #[error("takeover stopped after fencing: {why}; `nvmirror giveback` hands the volumes back")]
    StoppedAfterFence { why: String },

    #[error("node {partner}'s volumes are not held here (owner: node {owner})")]
    NotHeld { partner: u32, owner: u32 },

    #[error(
        "this node is {role}: a forced recovery is only for a node handing over its volumes \
         after an unclean stop"
    )]
    NotHandingOver { role: &'static str },

    /// A giveback whose consistency points left records for the partner's
    /// volumes in this node's log (writes to this node's own volumes held
    /// the space the filling half needed to close).
    #[error(
        "node {partner}'s volumes still have {bytes} bytes only in this node's log: a consistency \
         point could not flush them yet (writes here hold the log); they stay served here, try \
         the giveback again"
    )]
    LogNotFlushed { partner: u32, bytes: u64 },

    /// STONITH (`ha.fence_command`) did not confirm the partner is off.
    #[error(
        "the fence command could not confirm node {partner} is off: {why}; its volumes stay \
         with it. Fix ha.fence_command, or power node {partner} off yourself and run \
         `nvmirror takeover --force`"
    )]
    FenceCommandFailed { partner: u32, why: String },
}
