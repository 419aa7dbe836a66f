//! A node's mailbox: a small file on the shared storage that the partner
//! can read even when the interconnect is down. It records whether this
//! node's log is mirrored in full ("in sync") — before a node acknowledges
//! a write its partner's mirror does not hold, the mailbox says "out of
//! sync", durably, so a takeover never trusts a mirror that lacks
//! acknowledged writes.
//!
//! The file is JSON, replaced atomically (write a temporary file, fsync,
//! rename, fsync the directory), so a reader sees the old or the new
//! content, never a mix.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const MAILBOX_FORMAT_VERSION: u32 = 1;
/// A mailbox is a few hundred bytes; anything much larger is not one.
const MAILBOX_MAX_BYTES: u64 = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MailboxState {
    pub format_version: u32,
    pub node_id: u32,
    /// Whether the partner's mirror holds every write this node acknowledged.
    pub mirror_in_sync: bool,
    /// Why not, for the operator.
    pub out_of_sync_reason: Option<String>,
    /// Milliseconds since the Unix epoch of this update.
    pub updated_unix_ms: u64,
}

#[derive(Debug)]
pub struct Mailbox {
    path: PathBuf,
}

impl Mailbox {
    /// The mailbox of `node_id` in `aggregate_dir`.
    pub fn new(aggregate_dir: &Path, node_id: u32) -> Mailbox {
        Mailbox {
            path: aggregate_dir.join(format!("node-{node_id}.mailbox")),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current state, or `None` if the node never wrote its mailbox.
    pub fn read(&self) -> Result<Option<MailboxState>> {
        let bytes = match std::fs::metadata(&self.path) {
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(Error::Io {
                    what: "reading a mailbox",
                    path: self.path.clone(),
                    source,
                })
            }
            Ok(metadata) if metadata.len() > MAILBOX_MAX_BYTES => {
                return Err(Error::CorruptMailbox {
                    path: self.path.clone(),
                    reason: format!("{} bytes is too large for a mailbox", metadata.len()),
                })
            }
            Ok(_) => std::fs::read(&self.path).map_err(|source| Error::Io {
                what: "reading a mailbox",
                path: self.path.clone(),
                source,
            })?,
        };
        decode(&bytes)
            .map(Some)
            .map_err(|reason| Error::CorruptMailbox {
                path: self.path.clone(),
                reason,
            })
    }

    /// Replace the mailbox durably with `state`.
    pub fn write(&self, state: &MailboxState) -> Result<()> {
        let io = |what: &'static str| {
            let path = self.path.clone();
            move |source| Error::Io { what, path, source }
        };
        let dir = self.path.parent().expect("a mailbox path has a directory");
        std::fs::create_dir_all(dir).map_err(io("creating the mailbox directory"))?;
        let temporary = self.path.with_extension("mailbox.tmp");
        let mut file = std::fs::File::create(&temporary).map_err(io("creating a mailbox"))?;
        let mut text = serde_json::to_vec_pretty(state).expect("a mailbox state serializes");
        text.push(b'\n');
        file.write_all(&text).map_err(io("writing a mailbox"))?;
        file.sync_all().map_err(io("syncing a mailbox"))?;
        std::fs::rename(&temporary, &self.path).map_err(io("replacing a mailbox"))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("syncing the mailbox directory"))?;
        Ok(())
    }
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

    #[test]
    fn round_trip_and_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mailbox = Mailbox::new(dir.path(), 1);
        assert_eq!(mailbox.read().expect("read"), None);
        let state = MailboxState {
            format_version: MAILBOX_FORMAT_VERSION,
            node_id: 1,
            mirror_in_sync: false,
            out_of_sync_reason: Some("partner unreachable".into()),
            updated_unix_ms: 5,
        };
        mailbox.write(&state).expect("write");
        assert_eq!(mailbox.read().expect("read"), Some(state));
        std::fs::write(mailbox.path(), b"{ not json").expect("write");
        assert!(matches!(mailbox.read(), Err(Error::CorruptMailbox { .. })));
        assert!(decode(br#"{"format_version":9,"node_id":1,"mirror_in_sync":true,"out_of_sync_reason":null,"updated_unix_ms":0}"#).is_err());
    }
}
