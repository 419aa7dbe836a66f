//! Who owns a node's volumes, and the fence that stops a stale owner.
//!
//! `<aggregate>/node-<id>.owner` names the node serving node `<id>`'s
//! volumes and an epoch that rises at every change of hands (takeover,
//! giveback). A node holds a [`Fence`] for each volume set it serves: the
//! epoch it acquired. Before every volume-file write and before every
//! acknowledgement it checks the file (a `stat` when nothing changed); once
//! the file names another owner or a higher epoch, the fence trips for
//! good and every later check fails.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fsutil::{read_small, write_atomically};
use crate::storage::mailbox::now_unix_ms;

pub const OWNER_FORMAT_VERSION: u32 = 1;
const OWNER_MAX_BYTES: u64 = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ownership {
    pub format_version: u32,
    /// Whose volumes these are.
    pub volumes_of: u32,
    /// The node serving them.
    pub owner: u32,
    /// Rises at every change of hands.
    pub epoch: u64,
    /// Set when a takeover was forced over an out-of-sync mirror: writes the
    /// mirror lacked are lost, and the operator was warned.
    pub forced: bool,
    /// Set by a giveback after a takeover that replayed the node's mirrored
    /// log onto its volumes: the node must discard its own log, whose
    /// records are already in the volumes (replaying them again would
    /// overwrite newer data).
    #[serde(default)]
    pub log_replayed: bool,
    pub reason: String,
    pub updated_unix_ms: u64,
}

/// Decode an owner file's bytes; `Err` says what is wrong.
pub fn decode(bytes: &[u8]) -> std::result::Result<Ownership, String> {
    let ownership: Ownership = serde_json::from_slice(bytes).map_err(|error| error.to_string())?;
    if ownership.format_version != OWNER_FORMAT_VERSION {
        return Err(format!(
            "unknown owner file format version {}",
            ownership.format_version
        ));
    }
    if !(1..=2).contains(&ownership.owner) || !(1..=2).contains(&ownership.volumes_of) {
        return Err(format!(
            "owner {} of node {}'s volumes is not a node of the pair",
            ownership.owner, ownership.volumes_of
        ));
    }
    Ok(ownership)
}

pub fn owner_path(aggregate_dir: &Path, volumes_of: u32) -> PathBuf {
    aggregate_dir.join(format!("node-{volumes_of}.owner"))
}

/// Read the owner file of node `volumes_of`'s volumes; a missing file means
/// the node owns its own volumes at epoch 0.
pub fn read(aggregate_dir: &Path, volumes_of: u32) -> Result<Ownership> {
    let path = owner_path(aggregate_dir, volumes_of);
    match read_small(&path, OWNER_MAX_BYTES)? {
        None => Ok(Ownership {
            format_version: OWNER_FORMAT_VERSION,
            volumes_of,
            owner: volumes_of,
            epoch: 0,
            forced: false,
            log_replayed: false,
            reason: "initial".into(),
            updated_unix_ms: 0,
        }),
        Some(bytes) => decode(&bytes).map_err(|reason| Error::Corrupt { path, reason }),
    }
}

/// How long a change of hands waits for another to finish with the owner
/// file (one takes milliseconds: a read, a write, two fsyncs).
const OWNER_LOCK_WAIT: Duration = Duration::from_secs(5);

/// Hand node `volumes_of`'s volumes to `owner` at the next epoch, durably.
/// Fails if the epoch moved since `seen` (someone else changed hands): the
/// check and the write are one step for every node that shares the
/// aggregate, so of two changes from one epoch exactly one wins.
pub fn change_hands(
    aggregate_dir: &Path,
    seen: &Ownership,
    owner: u32,
    forced: bool,
    log_replayed: bool,
    reason: &str,
) -> Result<Ownership> {
    let _exclusive = lock_owner_file(aggregate_dir, seen.volumes_of)?;
    let current = read_unchanged(aggregate_dir, seen)?;
    let next = Ownership {
        format_version: OWNER_FORMAT_VERSION,
        volumes_of: seen.volumes_of,
        owner,
        epoch: seen.epoch + 1,
        forced: forced || current.forced,
        log_replayed,
        reason: reason.to_owned(),
        updated_unix_ms: now_unix_ms(),
    };
    write(aggregate_dir, &next)?;
    tracing::warn!(
        volumes_of = next.volumes_of,
        owner,
        epoch = next.epoch,
        forced,
        reason,
        "volumes changed hands"
    );
    Ok(next)
}

/// The owner has discarded its log after a giveback (see
/// [`Ownership::log_replayed`]): clear the flag, same owner and epoch, so a
/// restart from now on recovers the log it writes again.
pub fn log_discarded(aggregate_dir: &Path, seen: &Ownership) -> Result<Ownership> {
    let _exclusive = lock_owner_file(aggregate_dir, seen.volumes_of)?;
    let current = read_unchanged(aggregate_dir, seen)?;
    let next = Ownership {
        log_replayed: false,
        reason: "log discarded after the giveback".into(),
        updated_unix_ms: now_unix_ms(),
        ..current
    };
    write(aggregate_dir, &next)?;
    Ok(next)
}

/// An exclusive lock (flock) on node `volumes_of`'s owner lock file, held
/// from the check of the epoch to the rename of the new owner file. The
/// kernel drops it when its holder dies; a holder that is stopped (SIGSTOP)
/// holds it, so the wait is bounded.
fn lock_owner_file(aggregate_dir: &Path, volumes_of: u32) -> Result<Flock<File>> {
    let path = aggregate_dir.join(format!("node-{volumes_of}.owner.lock"));
    let io = |what: &'static str| {
        let path = path.clone();
        move |source| Error::Io { what, path, source }
    };
    let deadline = Instant::now() + OWNER_LOCK_WAIT;
    loop {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io("opening"))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => return Ok(locked),
            Err((_, Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err((_, Errno::EWOULDBLOCK)) => {
                return Err(Error::OwnerFileBusy {
                    path,
                    waited: OWNER_LOCK_WAIT,
                })
            }
            Err((_, errno)) => return Err(io("locking")(std::io::Error::from(errno))),
        }
    }
}

/// The owner file as `seen`, or an error if its owner or epoch moved since.
fn read_unchanged(aggregate_dir: &Path, seen: &Ownership) -> Result<Ownership> {
    let current = read(aggregate_dir, seen.volumes_of)?;
    if current.epoch != seen.epoch || current.owner != seen.owner {
        return Err(Error::ChangedHands {
            volumes_of: seen.volumes_of,
            owner: current.owner,
            epoch: current.epoch,
        });
    }
    Ok(current)
}

/// Replace the owner file, durably.
fn write(aggregate_dir: &Path, ownership: &Ownership) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(ownership).expect("ownership serializes");
    bytes.push(b'\n');
    write_atomically(&owner_path(aggregate_dir, ownership.volumes_of), &bytes)
}

/// Proof that this node serves node `volumes_of`'s volumes at `epoch`.
#[derive(Debug)]
pub struct Fence {
    path: PathBuf,
    me: u32,
    volumes_of: u32,
    epoch: u64,
    /// (inode, size, mtime ns) of the owner file when last read as ours.
    seen: Mutex<Option<(u64, u64, i64)>>,
    tripped: AtomicBool,
}

impl Fence {
    pub fn new(aggregate_dir: &Path, me: u32, ownership: &Ownership) -> Fence {
        assert_eq!(ownership.owner, me, "a fence is held by the owner");
        Fence {
            path: owner_path(aggregate_dir, ownership.volumes_of),
            me,
            volumes_of: ownership.volumes_of,
            epoch: ownership.epoch,
            seen: Mutex::new(None),
            tripped: AtomicBool::new(false),
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn volumes_of(&self) -> u32 {
        self.volumes_of
    }

    pub fn is_tripped(&self) -> bool {
        self.tripped.load(Ordering::Acquire)
    }

    /// Trip the fence by hand (giveback in progress).
    pub fn trip(&self) {
        self.tripped.store(true, Ordering::Release);
    }

    /// Ok while the owner file still names this node at this epoch.
    pub fn check(&self) -> Result<()> {
        if self.is_tripped() {
            return Err(self.fenced());
        }
        let stamp = match std::fs::metadata(&self.path) {
            Ok(metadata) => Some((
                metadata.ino(),
                metadata.size(),
                metadata.mtime_nsec() + metadata.mtime() * 1_000_000_000,
            )),
            // No file: the initial state, ours only at epoch 0.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
            Err(_) => return Err(self.fenced()),
        };
        let mut seen = self.seen.lock();
        if stamp.is_some() && *seen == stamp {
            return Ok(());
        }
        // Only an owner file that names another owner or epoch trips the
        // fence for good; one that is gone or reads as garbage (a storage
        // fault: a change of hands always writes a whole file) refuses
        // this write and is looked at again at the next.
        let still_ours = match stamp {
            None if self.epoch == 0 && self.volumes_of == self.me => true,
            None => {
                tracing::warn!(path = %self.path.display(), "the owner file is gone: no write until it is back");
                return Err(self.fenced());
            }
            Some(_) => {
                let read = std::fs::read(&self.path)
                    .map_err(|error| error.to_string())
                    .and_then(|bytes| decode(&bytes));
                match read {
                    Ok(o) => o.owner == self.me && o.epoch == self.epoch,
                    Err(reason) => {
                        tracing::warn!(path = %self.path.display(), %reason, "the owner file cannot be read: no write until it can");
                        return Err(self.fenced());
                    }
                }
            }
        };
        if still_ours {
            *seen = stamp;
            Ok(())
        } else {
            self.tripped.store(true, Ordering::Release);
            tracing::error!(
                volumes_of = self.volumes_of,
                epoch = self.epoch,
                "fenced: another node owns these volumes now"
            );
            Err(self.fenced())
        }
    }

    fn fenced(&self) -> Error {
        Error::Fenced {
            volumes_of: self.volumes_of,
            epoch: self.epoch,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_of_hands_trips_the_old_owners_fence() {
        let dir = tempfile::tempdir().expect("tempdir");
        let initial = read(dir.path(), 1).expect("read");
        assert_eq!((initial.owner, initial.epoch), (1, 0));
        let fence = Fence::new(dir.path(), 1, &initial);
        fence.check().expect("ours at epoch 0");
        let taken =
            change_hands(dir.path(), &initial, 2, false, false, "takeover").expect("takeover");
        assert_eq!((taken.owner, taken.epoch), (2, 1));
        assert!(matches!(
            fence.check(),
            Err(Error::Fenced {
                volumes_of: 1,
                epoch: 0
            })
        ));
        // A stale view cannot change hands again.
        assert!(change_hands(dir.path(), &initial, 2, false, false, "again").is_err());
        let survivor = Fence::new(dir.path(), 2, &taken);
        survivor.check().expect("the survivor's fence holds");
        let back = change_hands(dir.path(), &taken, 1, false, true, "giveback").expect("giveback");
        assert!(survivor.check().is_err());
        let returned = Fence::new(dir.path(), 1, &back);
        returned.check().expect("home again");
        assert!(fence.check().is_err(), "a tripped fence stays tripped");
    }

    /// An owner file that reads as garbage for a while (a storage fault)
    /// says nothing about who owns the volumes: the owner writes nothing
    /// meanwhile, and goes on once the file reads right again.
    #[test]
    fn an_owner_file_that_reads_as_garbage_refuses_writes_until_it_reads_right() {
        let dir = tempfile::tempdir().expect("tempdir");
        let initial = read(dir.path(), 1).expect("read");
        let ours = change_hands(dir.path(), &initial, 1, false, false, "start").expect("epoch 1");
        let fence = Fence::new(dir.path(), 1, &ours);
        fence.check().expect("ours");
        let path = owner_path(dir.path(), 1);
        let good = std::fs::read(&path).expect("owner file");
        std::fs::write(&path, b"\x00garbage of another length").expect("garble");
        assert!(matches!(fence.check(), Err(Error::Fenced { .. })));
        assert!(
            !fence.is_tripped(),
            "garbage is no proof of a change of hands"
        );
        std::fs::remove_file(&path).expect("remove");
        assert!(
            fence.check().is_err(),
            "a missing file past epoch 0 is not ours"
        );
        std::fs::write(&path, &good).expect("restore");
        fence.check().expect("ours again once the file reads right");
    }

    #[test]
    fn corrupt_owner_files_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(owner_path(dir.path(), 1), b"{").expect("write");
        assert!(matches!(read(dir.path(), 1), Err(Error::Corrupt { .. })));
        assert!(decode(br#"{"format_version":1,"volumes_of":1,"owner":7,"epoch":1,"forced":false,"log_replayed":false,"reason":"","updated_unix_ms":0}"#).is_err());
    }

    /// Two changes of hands from the same epoch (a takeover racing a
    /// giveback or another takeover): exactly one wins, the other is told
    /// the volumes changed hands, and the file holds the winner's.
    #[test]
    fn racing_changes_of_hands_from_one_epoch_have_one_winner() {
        for round in 0..40 {
            let dir = tempfile::tempdir().expect("tempdir");
            let seen = read(dir.path(), 2).expect("read");
            let barrier = std::sync::Barrier::new(2);
            let results: Vec<Result<Ownership>> = std::thread::scope(|scope| {
                let racers: Vec<_> = [1u32, 2]
                    .into_iter()
                    .map(|owner| {
                        let (dir, seen, barrier) = (dir.path(), &seen, &barrier);
                        scope.spawn(move || {
                            barrier.wait();
                            change_hands(dir, seen, owner, false, false, "race")
                        })
                    })
                    .collect();
                racers
                    .into_iter()
                    .map(|r| r.join().expect("racer"))
                    .collect()
            });
            let winners: Vec<&Ownership> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
            assert_eq!(winners.len(), 1, "round {round}: {results:?}");
            assert!(
                results
                    .iter()
                    .any(|r| matches!(r, Err(Error::ChangedHands { epoch: 1, .. }))),
                "round {round}: {results:?}"
            );
            let now = read(dir.path(), 2).expect("read");
            assert_eq!(&now, winners[0], "round {round}");
            assert_eq!(now.epoch, 1);
        }
    }
}
