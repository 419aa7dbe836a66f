//! High availability: who serves which volumes, failure detection,
//! takeover from the partner's mirror, the background replay, giveback.
//!
//! # Failure detection
//!
//! Two signals about the partner: the interconnect (our session into its
//! mirror, or its session into ours) and its mailbox heartbeat on shared
//! storage (a sequence number we watch change by our own clock).
//!
//! | interconnect | mailbox | meaning                    | action                                    |
//! |--------------|---------|----------------------------|-------------------------------------------|
//! | up           | any     | partner alive              | none                                      |
//! | silent       | alive   | the interconnect failed    | no takeover; mirror out of sync; status   |
//! | silent       | stale   | partner down               | takeover, unless its mirror is out of sync|
//!
//! # Takeover (survivor S takes partner P's volumes)
//!
//! 1. Fence: raise the epoch of P's volumes in the owner file. From then on
//!    P neither writes their files nor acknowledges a write to them.
//! 2. Read P's mailbox *after* the fence: if it says "out of sync", P may
//!    have acknowledged writes our mirror lacks; refuse (unless forced).
//!    Because P marks "out of sync" before its fence check and its
//!    acknowledgement, reading after the fence closes the race.
//! 3. Stop the receiver (nothing more lands in the mirror), make the mirror
//!    durable, scan it from P's flushed LSN.
//! 4. Build the metadata index (P's volume ranges → records in the mirror),
//!    persist it in S's data directory.
//! 5. Serve P's volumes at once: reads from the index, else from the files;
//!    writes through S's own log. Bind P's NBD address if possible, run the
//!    hook.
//! 6. Replay the index onto P's files in the background, never over data
//!    written since the takeover (consistency points and the replay write a
//!    volume's file one at a time, each from a fresh snapshot).
//!
//! # Giveback
//!
//! S finishes the replay, closes the write gate of P's volumes, flushes
//! everything, hands ownership back (epoch up, "log replayed"), stops
//! serving them. P, waiting, sees its ownership return, discards its own
//! log (its records reached the volumes through S's replay), and serves.

pub mod index;
pub mod mailbox;
pub mod ownership;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nvlog::Scanner;
use parking_lot::{Condvar, Mutex};
use serde_json::json;

use crate::error::{Error, Result};
use crate::nbd::{NbdServer, ServerConfig};
use crate::node::{index_records, spawn, Execution, InjectedBug, NodeInner};
use crate::storage::extents::{Origin, Source};
use crate::storage::volume::Volume;
use index::{IndexEntry, TakeoverIndex};
use mailbox::MailboxState;
use ownership::{Fence, Ownership};

/// What this node does with its own volumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Starting,
    /// Serving its own volumes.
    Serving,
    /// Its volumes were taken over; it waits for them to be given back.
    WaitingForGiveback,
    /// It was serving, and found that the partner took its volumes.
    Fenced,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Starting => "starting",
            Role::Serving => "serving",
            Role::WaitingForGiveback => "waiting for giveback",
            Role::Fenced => "fenced",
        }
    }
}

/// The partner's volumes, held after a takeover.
#[derive(Debug, Clone)]
struct Holding {
    ownership: Ownership,
    volumes: Vec<Arc<Volume>>,
}

/// Timings of the last takeover, for the report and the status.
#[derive(Debug, Clone, Copy)]
struct TakeoverTimes {
    at_unix_ms: u64,
    started: Instant,
    /// Until the partner's volumes were served.
    resume_ms: u64,
    /// Until the first read of any volume was served after it.
    first_read_ms: Option<u64>,
    replay_ms: Option<u64>,
    forced: bool,
}

#[derive(Debug)]
struct HaState {
    role: Role,
    own_fence: Option<Arc<Fence>>,
    holding: Option<Holding>,
    /// A takeover that fenced the partner and then stopped (its mirror was
    /// out of sync, corrupt, or unreadable): the ownership is ours, the
    /// volumes are not served; a giveback returns them with their log.
    aborted_takeover: Option<Ownership>,
    partner_seq: Option<u64>,
    partner_seen_at: Instant,
    partner_mailbox: Option<MailboxState>,
    interconnect_alive_at: Instant,
    refusal: Option<String>,
    last_takeover: Option<TakeoverTimes>,
    cut_until: Option<Instant>,
    /// When the partner was first seen waiting for giveback (auto giveback).
    partner_waiting_since: Option<Instant>,
}

#[derive(Debug)]
pub struct Ha {
    state: Mutex<HaState>,
    wake: (Mutex<bool>, Condvar),
    replay_total_bytes: AtomicU64,
    replay_done_bytes: AtomicU64,
    replay_active: AtomicBool,
    replay_thread: Mutex<Option<JoinHandle<()>>>,
    partner_listener: Mutex<Option<NbdServer>>,
    /// Serializes takeover, giveback and returns.
    transition: Mutex<()>,
}

impl Default for Ha {
    fn default() -> Self {
        Ha::new(Instant::now())
    }
}

impl Ha {
    /// The HA state of a node starting at `now` (its clock's reading).
    pub fn new(now: Instant) -> Ha {
        Ha {
            state: Mutex::new(HaState {
                role: Role::Starting,
                own_fence: None,
                holding: None,
                aborted_takeover: None,
                partner_seq: None,
                partner_seen_at: now,
                partner_mailbox: None,
                interconnect_alive_at: now,
                refusal: None,
                last_takeover: None,
                cut_until: None,
                partner_waiting_since: None,
            }),
            wake: (Mutex::new(false), Condvar::new()),
            replay_total_bytes: AtomicU64::new(0),
            replay_done_bytes: AtomicU64::new(0),
            replay_active: AtomicBool::new(false),
            replay_thread: Mutex::new(None),
            partner_listener: Mutex::new(None),
            transition: Mutex::new(()),
        }
    }

    pub fn role(&self) -> Role {
        self.state.lock().role
    }

    pub fn holding_partner(&self) -> bool {
        self.state.lock().holding.is_some()
    }

    pub fn replay_pending(&self) -> bool {
        self.replay_active.load(Ordering::Acquire)
    }

    pub fn wake(&self) {
        let (flag, condvar) = &self.wake;
        *flag.lock() = true;
        condvar.notify_all();
    }

    /// A read was served: the first one after a takeover ends the outage.
    pub fn note_read_served(&self) {
        let mut state = self.state.lock();
        if let Some(times) = state.last_takeover.as_mut() {
            if times.first_read_ms.is_none() {
                times.first_read_ms = Some(times.started.elapsed().as_millis() as u64);
            }
        }
    }
}

fn me_and_partner(inner: &NodeInner) -> (u32, u32) {
    (inner.config.node_id, inner.config.partner_id())
}

/// Decide at start-up what this node serves.
pub(crate) fn boot(inner: &Arc<NodeInner>) -> Result<()> {
    let (me, partner) = me_and_partner(inner);
    let aggregate = &inner.config.aggregate_dir;
    let own = ownership::read(aggregate, me)?;
    let theirs = ownership::read(aggregate, partner)?;
    if own.owner != me && theirs.owner == me {
        return Err(Error::Failed {
            reason: format!(
                "the owner files say node {partner} serves this node's volumes and this node serves node \
                 {partner}'s; resolve {} and {} by hand",
                ownership::owner_path(aggregate, me).display(),
                ownership::owner_path(aggregate, partner).display()
            ),
        });
    }
    if theirs.owner == me {
        resume_holding(inner, theirs)?;
    }
    if own.owner == me {
        // A giveback said our log is in the volumes already, and we crashed
        // before discarding it: discard it now (replaying it would write
        // old data over what the partner wrote while it held them).
        serve_own_volumes(inner, &own, own.log_replayed)?;
    } else {
        tracing::warn!(
            owner = own.owner,
            epoch = own.epoch,
            "this node's volumes were taken over: waiting for giveback"
        );
        inner.ha.state.lock().role = Role::WaitingForGiveback;
        set_mailbox_state(inner, Role::WaitingForGiveback);
    }
    if !inner.ha.holding_partner() {
        inner.bind_receiver()?;
    }
    Ok(())
}

/// Open and serve this node's own volumes under `own`; with `discard_log`,
/// first forget the local log (the partner replayed it).
fn serve_own_volumes(inner: &Arc<NodeInner>, own: &Ownership, discard_log: bool) -> Result<()> {
    let (me, _) = me_and_partner(inner);
    let fence = Arc::new(fence_for(inner, own));
    fence.check()?;
    if discard_log {
        wait_for_writers(inner);
        inner.log.discard_all()?;
        ownership::log_discarded(&inner.config.aggregate_dir, own)?;
    }
    let volumes = inner
        .config
        .volumes
        .iter()
        .enumerate()
        .map(|(index, volume)| {
            Volume::open(
                &inner.runtime.disks,
                &inner.config.aggregate_dir,
                me,
                index,
                &volume.name,
                volume.size.0,
                fence.clone(),
            )
            .map(Arc::new)
        })
        .collect::<Result<Vec<_>>>()?;
    inner.detach_set(me);
    inner.attach_volumes(volumes);
    if !discard_log {
        inner.recover_onto_volumes()?;
    }
    {
        let mut state = inner.ha.state.lock();
        state.role = Role::Serving;
        state.own_fence = Some(fence);
    }
    inner.mirror.set_enabled(true);
    set_mailbox_state(inner, Role::Serving);
    Ok(())
}

/// This node's fence on the volumes `ownership` gives it.
fn fence_for(inner: &NodeInner, ownership: &Ownership) -> Fence {
    let fence = Fence::new(&inner.config.aggregate_dir, inner.config.node_id, ownership);
    if inner.runtime.injected_bug == Some(InjectedBug::SkipEpochCheck) {
        fence.ignoring_owner_changes()
    } else {
        fence
    }
}

fn wait_for_writers(inner: &NodeInner) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while inner.log.status().reserved_bytes > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn set_mailbox_state(inner: &NodeInner, role: Role) {
    if let Err(error) = inner
        .mailbox
        .update(|state| state.state = role.as_str().to_owned())
    {
        tracing::error!(%error, "cannot update the mailbox");
    }
}

/// The partner's volumes, opened under `ownership` (ours), from its mailbox.
fn open_partner_volumes(
    inner: &NodeInner,
    ownership: &Ownership,
) -> Result<(Vec<Arc<Volume>>, MailboxState)> {
    let (_, partner) = me_and_partner(inner);
    let mailbox =
        mailbox::read(&inner.config.aggregate_dir, partner)?.ok_or_else(|| Error::Failed {
            reason: format!("node {partner} never wrote its mailbox: its volumes are unknown"),
        })?;
    let fence = Arc::new(fence_for(inner, ownership));
    let volumes = mailbox
        .volumes
        .iter()
        .enumerate()
        .map(|(index, info)| {
            Volume::open(
                &inner.runtime.disks,
                &inner.config.aggregate_dir,
                partner,
                index,
                &info.name,
                info.size_bytes,
                fence.clone(),
            )
            .map(Arc::new)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((volumes, mailbox))
}

/// After a restart: we hold the partner's volumes. Load the persisted index
/// instead of scanning the mirror again, and resume the replay.
fn resume_holding(inner: &Arc<NodeInner>, theirs: Ownership) -> Result<()> {
    let (_, partner) = me_and_partner(inner);
    let span = tracing::info_span!("takeover_resume", partner, epoch = theirs.epoch);
    let _entered = span.enter();
    // The index is saved before the takeover serves anything, and kept
    // (empty) once the replay is done: without one for this epoch, the
    // takeover stopped before serving, and the partner's log is its own.
    let index = TakeoverIndex::load(&inner.config.data_dir, partner)?
        .filter(|index| index.epoch == theirs.epoch);
    let Some(index) = index else {
        tracing::warn!(
            epoch = theirs.epoch,
            "the partner's volumes are fenced to this node, but its takeover stopped before \
             serving them: they wait for a giveback"
        );
        inner.ha.state.lock().aborted_takeover = Some(theirs);
        return Ok(());
    };
    let (volumes, mailbox) = open_partner_volumes(inner, &theirs)?;
    let mut entries = 0;
    {
        for entry in &index.entries {
            if let Some(volume) = volumes.iter().find(|v| v.id == entry.volume_id) {
                volume.extents.lock().insert_from(
                    Origin::Mirror,
                    entry.start,
                    entry.len,
                    entry.lsn,
                    entry.source,
                );
                entries += 1;
            }
        }
    }
    inner.attach_volumes(volumes.clone());
    start_replay_accounting(inner, &volumes);
    inner.ha.state.lock().holding = Some(Holding {
        ownership: theirs,
        volumes,
    });
    bind_partner_listener(inner, &mailbox);
    tracing::info!(
        entries,
        "resumed serving the partner's volumes from the persisted index"
    );
    Ok(())
}

fn start_replay_accounting(inner: &NodeInner, volumes: &[Arc<Volume>]) {
    let total: u64 = volumes
        .iter()
        .map(|v| v.extents.lock().mirror_bytes())
        .sum();
    inner.ha.replay_total_bytes.store(total, Ordering::Release);
    inner.ha.replay_done_bytes.store(0, Ordering::Release);
    inner.ha.replay_active.store(total > 0, Ordering::Release);
}

/// Take over the partner's volumes now (see the module docs).
pub fn takeover(inner: &Arc<NodeInner>, force: bool, reason: &str) -> Result<String> {
    let _transition = inner.ha.transition.lock();
    inner.check_not_failed()?;
    let (me, partner) = me_and_partner(inner);
    let span = tracing::info_span!("takeover", partner, force);
    let _entered = span.enter();
    let started = Instant::now();
    {
        let state = inner.ha.state.lock();
        if state.holding.is_some() {
            return Err(refused("this node already serves the partner's volumes"));
        }
        if state.role != Role::Serving {
            return Err(refused(format!(
                "this node is {}, it cannot take over",
                state.role.as_str()
            )));
        }
    }
    // A node that was stopped while its partner took its volumes over must
    // not take the partner's in turn (each would then own the other's).
    let own_fence = inner.ha.state.lock().own_fence.clone();
    if let Some(fence) = own_fence {
        if fence.check().is_err() {
            on_fenced(inner);
            return Err(refused(
                "this node's own volumes were taken over: it waits for giveback and cannot take over",
            ));
        }
    }
    let aggregate = &inner.config.aggregate_dir;
    let theirs = ownership::read(aggregate, partner)?;
    let partner_mailbox = mailbox::read(aggregate, partner)?.ok_or_else(|| {
        refused(format!(
            "node {partner} never wrote its mailbox: its volumes are unknown"
        ))
    })?;
    if partner_mailbox.half_bytes != inner.config.nvram.half_size.0 {
        return Err(refused(format!(
            "node {partner}'s log halves are {} bytes, ours {}: the mirror cannot be read",
            partner_mailbox.half_bytes, inner.config.nvram.half_size.0
        )));
    }
    let my_boot = inner.mailbox.current().boot;
    let out_of_sync = |mailbox: &MailboxState| {
        if !mailbox.mirror_in_sync {
            return Some(format!(
                "node {partner}'s mirror is out of sync ({}): a takeover would lose writes it acknowledged; \
                 `nvmirror takeover --force` does it anyway",
                mailbox.out_of_sync_reason.as_deref().unwrap_or("no reason given")
            ));
        }
        // In sync with an earlier start of this node: a power loss since
        // may have taken mirrored bytes that were not yet persisted here.
        (mailbox.in_sync_with_boot != Some(my_boot)).then(|| {
            format!(
                "node {partner}'s mirror was last in sync with an earlier start of this node (boot {:?}, \
                 now {my_boot}): it may lack writes node {partner} acknowledged; \
                 `nvmirror takeover --force` does it anyway",
                mailbox.in_sync_with_boot
            )
        })
    };
    if !force {
        if let Some(why) = out_of_sync(&partner_mailbox) {
            return Err(refused(why));
        }
    }
    // 1. Fence.
    let ours = if theirs.owner == me {
        theirs
    } else if theirs.owner == partner {
        ownership::change_hands(
            aggregate,
            &theirs,
            me,
            force && !partner_mailbox.mirror_in_sync,
            false,
            reason,
        )?
    } else {
        return Err(refused(format!(
            "node {partner}'s volumes belong to node {}",
            theirs.owner
        )));
    };
    // 2. The mirror state after the fence is what counts.
    let after = mailbox::read(aggregate, partner)?.unwrap_or(partner_mailbox);
    if let Some(why) = out_of_sync(&after) {
        if !force {
            inner.ha.state.lock().aborted_takeover = Some(ours);
            return Err(refused(format!(
                "takeover stopped after fencing: {why}; or `nvmirror giveback`"
            )));
        }
        tracing::warn!(%why, "forced takeover of an out-of-sync mirror: writes the mirror lacks are lost");
    }
    // 3 and 4. Any failure from here on leaves the volumes fenced but not
    // served: recorded as a stopped takeover (durably: no index was saved),
    // which a giveback hands back with the partner's log intact.
    let indexed = (|| -> Result<(Vec<Arc<Volume>>, MailboxState, u64)> {
        // 3. Nothing more lands in the mirror; make it durable; scan it.
        inner.shutdown_receiver();
        inner
            .region
            .persist(inner.region.mirror().offset, inner.region.mirror().len)?;
        let image = inner.region.snapshot(inner.region.mirror());
        let scanner = Scanner::new(&image)?;
        if let Some(header) = scanner.header() {
            if header.node_id != partner {
                return Err(Error::Failed {
                    reason: format!(
                        "the mirror holds node {}'s log, not node {partner}'s",
                        header.node_id
                    ),
                });
            }
        }
        // 4. The index: every record's extent, in LSN order, newest winning.
        let (volumes, partner_mailbox) = open_partner_volumes(inner, &ours)?;
        let records = index_records(
            scanner,
            &volumes,
            inner.region.mirror().offset,
            Origin::Mirror,
        );
        save_index(inner, partner, ours.epoch, &volumes)?;
        Ok((volumes, partner_mailbox, records))
    })();
    let (volumes, partner_mailbox, records) = match indexed {
        Ok(indexed) => indexed,
        Err(error) => {
            tracing::error!(%error, "takeover stopped after fencing");
            inner.ha.state.lock().aborted_takeover = Some(ours);
            inner.bind_receiver()?;
            return Err(refused(format!(
                "takeover stopped after fencing: {error}; `nvmirror giveback` hands the volumes back"
            )));
        }
    };
    // 5. Serve.
    inner.attach_volumes(volumes.clone());
    start_replay_accounting(inner, &volumes);
    let resume_ms = started.elapsed().as_millis() as u64;
    let forced = ours.forced;
    {
        let mut state = inner.ha.state.lock();
        state.holding = Some(Holding {
            ownership: ours.clone(),
            volumes,
        });
        state.aborted_takeover = None;
        state.refusal = None;
        state.last_takeover = Some(TakeoverTimes {
            at_unix_ms: mailbox::now_unix_ms(),
            started,
            resume_ms,
            first_read_ms: None,
            replay_ms: None,
            forced,
        });
    }
    bind_partner_listener(inner, &partner_mailbox);
    run_hook(inner, "takeover", &partner_mailbox.nbd_listen);
    // 6. Replay in the background (a stepped node replays when stepped).
    if inner.runtime.execution == Execution::Threads {
        let thread = spawn_replay(inner);
        *inner.ha.replay_thread.lock() = Some(thread);
    }
    let message = format!(
        "took over node {partner}'s volumes at epoch {} ({records} mirrored records indexed, serving after {resume_ms} ms; replaying in the background)",
        ours.epoch
    );
    tracing::warn!(records, resume_ms, epoch = ours.epoch, "takeover done");
    Ok(message)
}

fn refused(reason: impl Into<String>) -> Error {
    Error::Refused {
        reason: reason.into(),
    }
}

/// Persist the index of the partner's volumes still to replay.
fn save_index(inner: &NodeInner, partner: u32, epoch: u64, volumes: &[Arc<Volume>]) -> Result<()> {
    // The index leaves out mirror extents that local writes replaced; those
    // writes must be durable first, or a crash would lose both.
    let newest = inner.log.last_lsn();
    if newest > 0 {
        inner.log.persist(newest)?;
    }
    let entries = volumes
        .iter()
        .flat_map(|volume| {
            volume
                .extents
                .lock()
                .all_pieces()
                .into_iter()
                .filter(|piece| piece.origin == Origin::Mirror)
                .map(|piece| IndexEntry {
                    volume_id: volume.id,
                    start: piece.start,
                    len: piece.len,
                    lsn: piece.lsn,
                    source: piece.source,
                })
                .collect::<Vec<_>>()
        })
        .collect();
    TakeoverIndex {
        partner,
        epoch,
        entries,
    }
    .save(&inner.config.data_dir)
}

fn save_holding_index(inner: &NodeInner, holding: &Holding) -> Result<()> {
    save_index(
        inner,
        holding.ownership.volumes_of,
        holding.ownership.epoch,
        &holding.volumes,
    )
}

/// Before a consistency point frees a half: if a replay is pending, the
/// persisted index must not name mirror extents that writes in that half
/// replaced.
pub(crate) fn save_index_if_holding(inner: &NodeInner) -> Result<()> {
    if !inner.ha.replay_pending() {
        return Ok(());
    }
    let holding = inner.ha.state.lock().holding.clone();
    match holding {
        Some(holding) => save_holding_index(inner, &holding),
        None => Ok(()),
    }
}

/// Start the background replay of the partner's mirror onto its files.
pub(crate) fn spawn_replay(inner: &Arc<NodeInner>) -> JoinHandle<()> {
    let inner = inner.clone();
    spawn("replay", move || {
        if let Err(error) = replay(&inner) {
            tracing::error!(%error, "replay of the partner's mirror stopped");
        }
    })
}

/// Bytes the replay writes between index saves.
const REPLAY_BATCH_BYTES: u64 = 8 << 20;

fn replay(inner: &NodeInner) -> Result<()> {
    let Some(holding) = inner.ha.state.lock().holding.clone() else {
        return Ok(());
    };
    let span = tracing::info_span!(
        "replay",
        partner = holding.ownership.volumes_of,
        log = "mirror"
    );
    let _entered = span.enter();
    let mut buffer = Vec::new();
    let rate = inner.config.ha.replay_max_bytes_per_s.map(|rate| rate.0);
    let batch_bytes = rate.map_or(REPLAY_BATCH_BYTES, |rate| {
        (rate / 8).clamp(4096, REPLAY_BATCH_BYTES)
    });
    let started = Instant::now();
    loop {
        if inner.is_stopping() {
            return Ok(());
        }
        if let Some(rate) = rate {
            // Sleep until the bytes done so far fit the rate.
            let done = inner.ha.replay_done_bytes.load(Ordering::Acquire);
            let due = Duration::from_secs_f64(done as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait.min(Duration::from_millis(200)));
                continue;
            }
        }
        if !replay_batch(inner, &holding, &mut buffer, batch_bytes)? {
            break;
        }
    }
    finish_replay(inner, &holding)
}

/// One step of the replay, for a stepped node: a batch of at most
/// `batch_bytes`, or the end of the replay. False once nothing is left.
pub(crate) fn replay_step(inner: &NodeInner, batch_bytes: u64) -> Result<bool> {
    if !inner.ha.replay_pending() {
        return Ok(false);
    }
    let Some(holding) = inner.ha.state.lock().holding.clone() else {
        return Ok(false);
    };
    if replay_batch(inner, &holding, &mut Vec::new(), batch_bytes)? {
        return Ok(true);
    }
    finish_replay(inner, &holding)?;
    Ok(false)
}

/// Write up to `batch_bytes` of mirrored extents of one volume to its file,
/// sync it, forget those extents and save the index. False if none is left.
fn replay_batch(
    inner: &NodeInner,
    holding: &Holding,
    buffer: &mut Vec<u8>,
    batch_bytes: u64,
) -> Result<bool> {
    for volume in &holding.volumes {
        let written = {
            let _file = volume.file_lock.lock();
            let pieces = volume.extents.lock().mirror_pieces(batch_bytes);
            if pieces.is_empty() {
                continue;
            }
            let mut written = 0;
            for piece in &pieces {
                match piece.source {
                    Source::Region { offset } => {
                        buffer.resize(piece.len as usize, 0);
                        inner.region.read(offset, buffer);
                        volume.write_file(piece.start, buffer)?;
                    }
                    Source::Zero => volume.zero_file(piece.start, piece.len, false)?,
                    Source::Hole => volume.zero_file(piece.start, piece.len, true)?,
                }
                written += piece.len;
            }
            volume.sync()?;
            let mut extents = volume.extents.lock();
            for piece in &pieces {
                extents.remove_mirror_piece(piece);
            }
            written
        };
        inner
            .ha
            .replay_done_bytes
            .fetch_add(written, Ordering::AcqRel);
        save_holding_index(inner, holding)?;
        return Ok(true);
    }
    Ok(false)
}

/// Everything mirrored is in the partner's files: the index goes empty
/// (kept until the giveback: it says the takeover completed).
fn finish_replay(inner: &NodeInner, holding: &Holding) -> Result<()> {
    save_holding_index(inner, holding)?;
    inner.ha.replay_active.store(false, Ordering::Release);
    let mut state = inner.ha.state.lock();
    if let Some(times) = state.last_takeover.as_mut() {
        times.replay_ms = Some(times.started.elapsed().as_millis() as u64);
    }
    tracing::info!(
        bytes = inner.ha.replay_done_bytes.load(Ordering::Acquire),
        "replay of the partner's mirror done"
    );
    Ok(())
}

/// Serve the partner's volumes on its own NBD address too, when this host
/// can bind it (same host, or a floating address the hook moved here).
fn bind_partner_listener(inner: &Arc<NodeInner>, partner_mailbox: &MailboxState) {
    if inner.runtime.execution == Execution::Stepped {
        return;
    }
    let Ok(addr) = partner_mailbox.nbd_listen.parse::<SocketAddr>() else {
        return;
    };
    let exports = Arc::new(crate::daemon::NodeExports::new(inner.clone()));
    match NbdServer::bind(addr, exports, ServerConfig::default()) {
        Ok(server) => {
            tracing::info!(%addr, "serving the partner's NBD address");
            *inner.ha.partner_listener.lock() = Some(server);
        }
        Err(error) => tracing::info!(
            %addr,
            %error,
            ours = %inner.config.nbd.listen,
            "cannot bind the partner's NBD address; its volumes are served on ours"
        ),
    }
}

pub(crate) fn stop_partner_listener(inner: &NodeInner) {
    if let Some(server) = inner.ha.partner_listener.lock().take() {
        server.shutdown();
    }
    if let Some(thread) = inner.ha.replay_thread.lock().take() {
        let _ = thread.join();
    }
}

fn run_hook(inner: &NodeInner, event: &str, partner_nbd: &str) {
    let Some(hook) = inner.config.ha.hook.as_deref() else {
        return;
    };
    let started = Instant::now();
    let child = std::process::Command::new("sh")
        .arg("-c")
        .arg(hook)
        .env("NVMIRROR_EVENT", event)
        .env("NVMIRROR_PARTNER", inner.config.partner_id().to_string())
        .env("NVMIRROR_PARTNER_NBD", partner_nbd)
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(error) => {
            tracing::error!(hook, event, %error, "cannot run the hook");
            return;
        }
    };
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                tracing::info!(hook, event, %status, elapsed_ms = started.elapsed().as_millis() as u64, "hook ran");
                return;
            }
            Ok(None) if started.elapsed() < Duration::from_secs(30) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                tracing::error!(hook, event, "hook did not finish within 30 s; killed");
                return;
            }
        }
    }
}

/// Hand the partner's volumes back (see the module docs).
pub fn giveback(inner: &Arc<NodeInner>) -> Result<String> {
    let _transition = inner.ha.transition.lock();
    // A failed node's log may hold records a failed consistency point never
    // wrote: restart it (recovery writes them), then give back.
    inner.check_not_failed()?;
    let (me, partner) = me_and_partner(inner);
    let span = tracing::info_span!("giveback", partner);
    let _entered = span.enter();
    let aggregate = &inner.config.aggregate_dir;
    let theirs = ownership::read(aggregate, partner)?;
    if theirs.owner != me {
        return Err(refused(format!(
            "node {partner}'s volumes are not held here (owner: node {})",
            theirs.owner
        )));
    }
    let holding = inner.ha.state.lock().holding.clone();
    let Some(holding) = holding else {
        // A takeover that stopped after fencing: the partner's log is its own.
        let back = ownership::change_hands(
            aggregate,
            &theirs,
            partner,
            false,
            false,
            "giveback of a stopped takeover",
        )?;
        inner.ha.state.lock().aborted_takeover = None;
        inner.bind_receiver()?;
        return Ok(format!(
            "node {partner}'s volumes handed back at epoch {} (they were never served here)",
            back.epoch
        ));
    };
    // The replay must end first: the partner will discard its log.
    let replay_thread = inner.ha.replay_thread.lock().take();
    if let Some(thread) = replay_thread {
        let _ = thread.join();
    }
    if inner.ha.replay_pending() {
        replay(inner)?;
    }
    for volume in &holding.volumes {
        *volume.write_gate.write() = false;
    }
    inner.checkpoint_everything()?;
    for volume in &holding.volumes {
        volume.sync()?;
    }
    let back = ownership::change_hands(
        aggregate,
        &holding.ownership,
        partner,
        false,
        true,
        "giveback",
    )?;
    for volume in inner.detach_set(partner) {
        volume.fence.trip();
    }
    if let Some(server) = inner.ha.partner_listener.lock().take() {
        server.shutdown();
    }
    let partner_nbd = mailbox::read(aggregate, partner)?
        .map(|m| m.nbd_listen)
        .unwrap_or_default();
    run_hook(inner, "giveback", &partner_nbd);
    TakeoverIndex::remove(&inner.config.data_dir, partner)?;
    inner.ha.state.lock().holding = None;
    inner.bind_receiver()?;
    tracing::warn!(epoch = back.epoch, "giveback done");
    Ok(format!(
        "node {partner}'s volumes handed back at epoch {}",
        back.epoch
    ))
}

/// The fence tripped under us: stop serving our own volumes.
pub(crate) fn on_fenced(inner: &NodeInner) {
    let mut state = inner.ha.state.lock();
    if state.role != Role::Serving {
        return;
    }
    state.role = Role::Fenced;
    drop(state);
    tracing::error!("this node's volumes were taken over: it stops serving and writing them, and waits for giveback");
    inner.mirror.set_enabled(false);
    set_mailbox_state(inner, Role::Fenced);
}

/// Whether consistency points must leave the log alone (it belongs to
/// volumes this node no longer owns).
pub(crate) fn log_is_stale(inner: &NodeInner) -> bool {
    let state = inner.ha.state.lock();
    matches!(
        state.role,
        Role::WaitingForGiveback | Role::Fenced | Role::Starting
    ) && state.holding.is_none()
}

/// Cut the interconnect for `duration` (drills): close both sessions and
/// keep them closed.
pub fn cut_interconnect(inner: &NodeInner, duration: Duration) {
    tracing::warn!(
        duration_ms = duration.as_millis() as u64,
        "interconnect cut on request"
    );
    inner.ha.state.lock().cut_until = Some(inner.runtime.clock.now() + duration);
    inner.mirror.cut(duration);
    inner.shutdown_receiver();
}

/// The HA monitor: heartbeat, failure detection, automatic takeover and
/// giveback, noticing fencing and the return of our volumes.
pub(crate) fn run_monitor(inner: &Arc<NodeInner>) {
    let interval = Duration::from_millis(inner.config.ha.mailbox_interval_ms);
    while !inner.is_stopping() {
        if let Err(error) = monitor_tick(inner) {
            tracing::warn!(%error, "HA monitor");
        }
        let (flag, condvar) = &inner.ha.wake;
        let mut woken = flag.lock();
        if !*woken {
            condvar.wait_for(&mut woken, interval);
        }
        *woken = false;
    }
}

/// One round of the HA monitor.
pub(crate) fn monitor_tick(inner: &Arc<NodeInner>) -> Result<()> {
    let (me, partner) = me_and_partner(inner);
    let aggregate = &inner.config.aggregate_dir;
    let role = inner.ha.role();
    inner.mailbox.update(|state| {
        state.heartbeat_seq += 1;
        state.state = role.as_str().to_owned();
    })?;
    // Our own volumes: fenced, or given back?
    match role {
        Role::Serving => {
            let fence = inner.ha.state.lock().own_fence.clone();
            if let Some(fence) = fence {
                if fence.check().is_err() {
                    on_fenced(inner);
                }
            }
        }
        Role::WaitingForGiveback | Role::Fenced => {
            let own = ownership::read(aggregate, me)?;
            let old_epoch = inner.ha.state.lock().own_fence.as_ref().map(|f| f.epoch());
            if own.owner == me && old_epoch.map_or(true, |epoch| own.epoch > epoch) {
                let _transition = inner.ha.transition.lock();
                let span = tracing::info_span!("giveback_return", epoch = own.epoch);
                let _entered = span.enter();
                tracing::warn!(
                    epoch = own.epoch,
                    log_replayed = own.log_replayed,
                    "volumes given back"
                );
                serve_own_volumes(inner, &own, own.log_replayed)?;
            }
        }
        Role::Starting => {}
    }
    // The partner: its mailbox heartbeat and the interconnect.
    let now = inner.runtime.clock.now();
    let partner_mailbox = mailbox::read(aggregate, partner).ok().flatten();
    let interconnect_up = inner.link() != crate::mirror::Link::Down || inner.receiver_connected();
    let (interconnect_silent, mailbox_stale, cut_active) = {
        let mut state = inner.ha.state.lock();
        if let Some(mailbox) = &partner_mailbox {
            if state.partner_seq != Some(mailbox.heartbeat_seq) {
                state.partner_seq = Some(mailbox.heartbeat_seq);
                state.partner_seen_at = now;
            }
        }
        state.partner_mailbox = partner_mailbox.clone();
        if interconnect_up {
            state.interconnect_alive_at = now;
        }
        let cut_active = state.cut_until.is_some_and(|until| now < until);
        if state.cut_until.is_some() && !cut_active {
            state.cut_until = None;
            if state.holding.is_none() {
                drop(state);
                inner.bind_receiver()?;
                state = inner.ha.state.lock();
            }
        }
        (
            now.duration_since(state.interconnect_alive_at),
            now.duration_since(state.partner_seen_at),
            cut_active,
        )
    };
    let partner_down = interconnect_silent
        > Duration::from_millis(inner.config.interconnect.heartbeat_timeout_ms)
        && mailbox_stale > Duration::from_millis(inner.config.ha.mailbox_timeout_ms);
    let holding = inner.ha.holding_partner();
    if partner_down
        && !holding
        && !cut_active
        && inner.config.ha.auto_takeover
        && inner.ha.role() == Role::Serving
    {
        let theirs = ownership::read(aggregate, partner)?;
        if theirs.owner == partner && partner_mailbox.is_some() {
            match takeover(
                inner,
                false,
                "partner down: interconnect silent and mailbox stale",
            ) {
                Ok(message) => tracing::warn!(%message, "automatic takeover"),
                Err(error) => {
                    let reason = error.to_string();
                    let mut state = inner.ha.state.lock();
                    if state.refusal.as_deref() != Some(reason.as_str()) {
                        tracing::error!(%reason, "automatic takeover refused");
                    }
                    state.refusal = Some(reason);
                }
            }
        }
    } else if !partner_down {
        inner.ha.state.lock().refusal = None;
    }
    // Automatic giveback, when configured: of volumes served here, or
    // fenced by a takeover that stopped before serving them.
    let aborted = inner.ha.state.lock().aborted_takeover.is_some();
    if let (true, Some(delay_ms)) = (holding || aborted, inner.config.ha.auto_giveback_delay_ms) {
        let waiting = partner_mailbox.as_ref().is_some_and(|m| {
            m.state == Role::WaitingForGiveback.as_str() || m.state == Role::Fenced.as_str()
        }) && mailbox_stale
            < Duration::from_millis(inner.config.ha.mailbox_timeout_ms);
        let since = {
            let mut state = inner.ha.state.lock();
            if waiting {
                *state.partner_waiting_since.get_or_insert(now)
            } else {
                state.partner_waiting_since = None;
                now
            }
        };
        if waiting
            && now.duration_since(since) >= Duration::from_millis(delay_ms)
            && !inner.ha.replay_pending()
        {
            match giveback(inner) {
                Ok(message) => tracing::warn!(%message, "automatic giveback"),
                Err(error) => tracing::error!(%error, "automatic giveback failed"),
            }
            inner.ha.state.lock().partner_waiting_since = None;
        }
    }
    Ok(())
}

/// The status document (see `admin::render_status`).
pub fn status(inner: &NodeInner) -> serde_json::Value {
    let (me, partner) = me_and_partner(inner);
    let now = Instant::now();
    let state = inner.ha.state.lock();
    let interconnect_silent_ms = now.duration_since(state.interconnect_alive_at).as_millis() as u64;
    let mailbox_stale_ms = now.duration_since(state.partner_seen_at).as_millis() as u64;
    let heartbeat_timeout_ms = inner.config.interconnect.heartbeat_timeout_ms;
    let mailbox_timeout_ms = inner.config.ha.mailbox_timeout_ms;
    let interconnect = if interconnect_silent_ms > heartbeat_timeout_ms {
        "silent"
    } else {
        "up"
    };
    let mailbox = match &state.partner_mailbox {
        None => "missing",
        Some(_) if mailbox_stale_ms > mailbox_timeout_ms => "stale",
        Some(_) => "alive",
    };
    let partner_state = state.partner_mailbox.as_ref().map(|m| m.state.clone());
    let mirror = inner.mailbox.current();
    let takeover_why_not = if state.holding.is_some() {
        Some("this node already serves the partner's volumes".to_owned())
    } else if let Some(refusal) = &state.refusal {
        Some(refusal.clone())
    } else if state.aborted_takeover.is_some() {
        Some(
            "a takeover stopped after fencing (see the log for why): `nvmirror giveback` hands the volumes back"
                .to_owned(),
        )
    } else if state.role != Role::Serving {
        Some(format!("this node is {}", state.role.as_str()))
    } else if interconnect == "up" {
        Some("partner is alive (interconnect up)".to_owned())
    } else if mailbox == "alive" {
        Some("the interconnect failed but the partner's mailbox is alive: no takeover".to_owned())
    } else if mailbox == "missing" {
        Some("the partner never wrote its mailbox".to_owned())
    } else if state
        .partner_mailbox
        .as_ref()
        .is_some_and(|m| !m.mirror_in_sync)
    {
        Some("the partner's mirror is out of sync".to_owned())
    } else if state
        .partner_mailbox
        .as_ref()
        .is_some_and(|m| m.in_sync_with_boot != Some(inner.mailbox.current().boot))
    {
        Some("the partner's mirror was in sync with an earlier start of this node".to_owned())
    } else {
        None
    };
    let volumes: Vec<serde_json::Value> = inner
        .volumes()
        .iter()
        .map(|volume| {
            let owner = ownership::read(&inner.config.aggregate_dir, volume.set).ok();
            json!({
                "name": volume.name,
                "volumes_of": volume.set,
                "owner": owner.as_ref().map(|o| o.owner),
                "epoch": owner.as_ref().map(|o| o.epoch),
                "served_here": !volume.fence.is_tripped(),
                "dirty_bytes": volume.extents.lock().covered_bytes(),
                "size_bytes": volume.size_bytes,
            })
        })
        .collect();
    let log = inner.log.status();
    let used_percent = log.halves[log.filling].used_bytes as f64 * 100.0 / log.half_len as f64;
    let total = inner.ha.replay_total_bytes.load(Ordering::Acquire);
    let done = inner.ha.replay_done_bytes.load(Ordering::Acquire);
    json!({
        "node_id": me,
        "state": state.role.as_str(),
        "failure": inner.failure(),
        "partner": {
            "node_id": partner,
            "interconnect": interconnect,
            "interconnect_silent_ms": interconnect_silent_ms,
            "mailbox": mailbox,
            "mailbox_stale_ms": mailbox_stale_ms,
            "state": partner_state,
        },
        "mirror": {
            "link": inner.link().as_str(),
            "in_sync": mirror.mirror_in_sync,
            "why_not": mirror.out_of_sync_reason,
            "resync": inner.mirror.resync_progress().map(|progress| json!({
                "total_bytes": progress.total_bytes,
                "placed_bytes": progress.placed_bytes,
                "elapsed_ms": progress.elapsed.as_millis() as u64,
                "remaining_ms": progress.remaining.map(|left| left.as_millis() as u64),
                "finished": progress.finished,
            })),
        },
        "takeover": {
            "possible": takeover_why_not.is_none(),
            "why_not": takeover_why_not,
            "holding_partner_volumes": state.holding.is_some(),
            "forced": state.holding.as_ref().is_some_and(|h| h.ownership.forced),
        },
        "volumes": volumes,
        "log": {
            "half_bytes": log.half_len,
            "filling": log.filling,
            "used_percent": used_percent,
            "next_lsn": log.next_lsn,
            "flushed_lsn": log.flushed_lsn,
            "persisted_lsn": log.persisted_lsn,
            "halves": log.halves.iter().map(|h| json!({"state": h.state.as_str(), "used_bytes": h.used_bytes})).collect::<Vec<_>>(),
        },
        "replay": {
            "active": inner.ha.replay_pending(),
            "total_bytes": total,
            "done_bytes": done,
            "percent": if total == 0 { 100.0 } else { done as f64 * 100.0 / total as f64 },
        },
        "last_takeover": state.last_takeover.map(|t| json!({
            "at_unix_ms": t.at_unix_ms,
            "resume_ms": t.resume_ms,
            "first_read_ms": t.first_read_ms,
            "replay_ms": t.replay_ms,
            "forced": t.forced,
        })),
    })
}
