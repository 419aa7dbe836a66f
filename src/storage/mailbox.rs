//! A node's mailbox: a small file on the shared storage that the partner
//! reads even when the interconnect is down. It carries
//!
//! - a heartbeat: a sequence number the node raises every
//!   `mailbox_interval_ms` (the partner watches it change, by its own clock,
//!   so the two clocks never need to agree);
//! - whether this node's log is mirrored in full ("in sync"), and in which
//!   start (`boot`) of the partner. Before a node acknowledges a write its
//!   partner's mirror may lack, the mailbox says "out of sync", durably, so
//!   a takeover never trusts a mirror that lacks acknowledged writes;
//! - what a takeover needs to serve this node's volumes: their names and
//!   sizes, and the NBD address clients use.
//!
//! The file is JSON, replaced atomically ([`write_atomically`]).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fsutil::{read_small, write_atomically};

pub const MAILBOX_FORMAT_VERSION: u32 = 1;
/// A mailbox is a few hundred bytes; anything much larger is not one.
const MAILBOX_MAX_BYTES: u64 = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeInfo {
    pub name: String,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MailboxState {
    pub format_version: u32,
    pub node_id: u32,
    /// Raised every mailbox interval while the node runs.
    pub heartbeat_seq: u64,
    /// What the node is doing ("serving", "waiting for giveback", …).
    pub state: String,
    /// Whether the partner's mirror holds every write this node acknowledged.
    pub mirror_in_sync: bool,
    /// Why not, for the operator.
    pub out_of_sync_reason: Option<String>,
    /// The NBD address of this node's volumes.
    pub nbd_listen: String,
    /// This node's own volumes, in volume-id order.
    pub volumes: Vec<VolumeInfo>,
    /// Half length of its log, to check the pair's geometry agrees.
    pub half_bytes: u64,
    /// Milliseconds since the Unix epoch of this update (for people; the
    /// partner judges liveness by `heartbeat_seq` alone).
    pub updated_unix_ms: u64,
    /// New (random) at every start of the node. The mirror it holds of its
    /// partner's log is only as good as the start that received it: a
    /// restart after a power loss may have lost mirrored bytes it had not
    /// persisted.
    #[serde(default)]
    pub boot: u64,
    /// With `mirror_in_sync`: the partner's `boot` whose mirror is in sync.
    /// A takeover by a partner that has restarted since does not trust it.
    #[serde(default)]
    pub in_sync_with_boot: Option<u64>,
    /// Set by a clean stop, once every write it acknowledged is in the
    /// volume files or persisted in its log; cleared at start. A start that
    /// finds it unset follows an unclean stop (a crash, a power loss).
    #[serde(default)]
    pub clean_stop: bool,
    /// The node restarted after an unclean stop with its mirror in sync: its
    /// own log may lack writes it acknowledged (a power loss takes what was
    /// not persisted), the partner's mirror has them. It asks the partner
    /// to take its volumes over, which replays that mirror, and to give
    /// them back as soon as the replay is done.
    #[serde(default)]
    pub asks_takeover: bool,
    /// The machine's boot identity (`node::read_host_boot`) when this node
    /// last served from its own log. The same at a later start: the
    /// machine did not restart since the log was last written, so a crash
    /// lost nothing of it. A start that does not serve from its log (it
    /// hands over) leaves it as it was.
    #[serde(default)]
    pub log_host_boot: String,
}

/// This node's own mailbox: the one writer of its file.
#[derive(Debug)]
pub struct Mailbox {
    path: PathBuf,
    /// The file system the aggregate was on when the node started. A
    /// shared file system that goes away can leave its mount point behind,
    /// an empty directory of the local disk: a mailbox written there would
    /// look alive here and stale to the partner.
    aggregate_device: Option<u64>,
    state: Mutex<MailboxState>,
}

pub fn mailbox_path(aggregate_dir: &Path, node_id: u32) -> PathBuf {
    aggregate_dir.join(format!("node-{node_id}.mailbox"))
}

impl Mailbox {
    /// The mailbox of `initial.node_id` in `aggregate_dir`; nothing is
    /// written until the first update.
    pub fn new(aggregate_dir: &Path, initial: MailboxState) -> Mailbox {
        Mailbox {
            path: mailbox_path(aggregate_dir, initial.node_id),
            aggregate_device: std::fs::metadata(aggregate_dir)
                .ok()
                .map(|metadata| metadata.dev()),
            state: Mutex::new(initial),
        }
    }

    /// Whether the aggregate is still where it was at start: there, and on
    /// the same file system.
    fn check_aggregate(&self) -> Result<()> {
        let dir = self.path.parent().expect("a mailbox lives in a directory");
        let now = std::fs::metadata(dir).map_err(|source| Error::Io {
            what: "looking at the shared storage (the aggregate) at",
            path: dir.to_owned(),
            source,
        })?;
        match self.aggregate_device {
            Some(device) if device != now.dev() => Err(Error::SharedStorageChanged {
                path: dir.to_owned(),
                was: device,
                now: now.dev(),
            }),
            _ => Ok(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn current(&self) -> MailboxState {
        self.state.lock().clone()
    }

    /// Change the state and write it durably. Updates are serialized: the
    /// file always holds the latest.
    pub fn update(&self, change: impl FnOnce(&mut MailboxState)) -> Result<()> {
        let mut state = self.state.lock();
        let mut next = state.clone();
        change(&mut next);
        next.updated_unix_ms = now_unix_ms();
        let mut bytes = serde_json::to_vec_pretty(&next).expect("a mailbox state serializes");
        bytes.push(b'\n');
        self.check_aggregate()?;
        write_atomically(&self.path, &bytes)?;
        *state = next;
        Ok(())
    }
}

/// Read node `node_id`'s mailbox, or `None` if it never wrote one.
pub fn read(aggregate_dir: &Path, node_id: u32) -> Result<Option<MailboxState>> {
    let path = mailbox_path(aggregate_dir, node_id);
    let Some(bytes) = read_small(&path, MAILBOX_MAX_BYTES)? else {
        return Ok(None);
    };
    decode(&bytes)
        .map(Some)
        .map_err(|reason| Error::Corrupt { path, reason })
}

/// Decode a mailbox's bytes; `Err` says what is wrong.
pub fn decode(bytes: &[u8]) -> std::result::Result<MailboxState, String> {
    let state: MailboxState = serde_json::from_slice(bytes).map_err(|error| error.to_string())?;
    if state.format_version != MAILBOX_FORMAT_VERSION {
        return Err(format!(
            "unknown mailbox format version {}",
            state.format_version
        ));
    }
    Ok(state)
}

pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::fixtures::example_mailbox_state;

    #[test]
    fn round_trip_and_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read(dir.path(), 1).expect("read"), None);
        let mailbox = Mailbox::new(dir.path(), example_mailbox_state());
        mailbox.update(|s| s.heartbeat_seq = 7).expect("write");
        let read_back = read(dir.path(), 1).expect("read").expect("written");
        assert_eq!(read_back.heartbeat_seq, 7);
        assert_eq!(read_back, mailbox.current());
        std::fs::write(mailbox.path(), b"{ not json").expect("write");
        assert!(matches!(read(dir.path(), 1), Err(Error::Corrupt { .. })));
        let mut future = serde_json::to_value(example_mailbox_state()).expect("json");
        future["format_version"] = 9.into();
        assert!(decode(future.to_string().as_bytes()).is_err());
    }
}
