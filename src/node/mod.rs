//! The storage node: its NVRAM, log, volumes and mirror, the write and read
//! paths, consistency points and local recovery. HA (who serves which
//! volumes, takeover, giveback) is in [`crate::ha`].
//!
//! # The write path
//!
//! 1. Suspendable phase: reserve log space, then send-queue slots. Holds no
//!    lock; may wait for a consistency point or for completions.
//! 2. Modify phase, under the log's order lock (never blocks): LSN and
//!    position, record into the local log, the volume's dirty map, the
//!    mirror post. Doing all of it under one lock keeps the partner's
//!    mirror a prefix of the log and the dirty map in LSN order.
//! 3. Wait: placed in the partner's mirror while the link is in sync
//!    (group completion), else "out of sync" in the mailbox and local
//!    persistence (group commit). `durability = "persist"`, FUA and FLUSH
//!    also wait for local persistence. Last, the volume's fence: a node
//!    that lost its volumes to a takeover acknowledges nothing more.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver as EventReceiver, Sender};
use interconnect::ControlEvent;
use nvlog::{Geometry, HalfState, Log, RecordData, RecordKind, Region, Scanner};
use parking_lot::{Condvar, Mutex, RwLock};

use crate::clock::Clock;
use crate::config::{Config, Durability};
use crate::error::{Error, Result};
use crate::ha::mailbox::{Mailbox, MailboxState, VolumeInfo, MAILBOX_FORMAT_VERSION};
use crate::ha::Ha;
use crate::mirror::transport::{LinkConfig, Receiver};
use crate::mirror::{Link, Mirror, Partner};
use crate::storage::extents::{Origin, Source};
use crate::storage::volume::{Disks, Volume};
use crate::sys::area_memory;

/// How a node runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Execution {
    /// Its own threads: consistency points, connector, HA monitor, replay.
    #[default]
    Threads,
    /// No threads: the simulation calls each step. The suspendable phase
    /// then fails with `WouldBlock`/`NoFreeSlots` instead of waiting (the
    /// simulation retries the write later), and nothing binds a socket.
    Stepped,
}

/// A deliberately broken variant of the node, for the simulation to prove
/// it finds bugs (`nvmirror sim --inject-bug`). Never set outside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectedBug {
    /// Acknowledge a write as soon as it is in the local log, without
    /// waiting for the mirror or for local persistence.
    AckBeforePlaced,
    /// Skip the fence: a stale owner keeps writing its volume files.
    SkipEpochCheck,
}

/// What the node runs on: the machine (threads, clock, files), or the
/// simulation's stand-ins.
#[derive(Debug, Clone, Default)]
pub struct Runtime {
    pub execution: Execution,
    pub clock: Clock,
    pub disks: Disks,
    pub injected_bug: Option<InjectedBug>,
}

/// Counters for status and metrics.
#[derive(Debug, Default)]
pub struct Stats {
    pub writes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    pub flushes: AtomicU64,
    pub checkpoints: AtomicU64,
    pub checkpoint_us_total: AtomicU64,
    pub acks_mirrored: AtomicU64,
    pub acks_persisted: AtomicU64,
    pub write_errors: AtomicU64,
}

/// What wakes the consistency-point thread.
#[derive(Debug, Default)]
struct CpSignal {
    kicked: bool,
    stopping: bool,
}

#[derive(Debug)]
pub struct NodeInner {
    pub config: Config,
    pub region: Arc<Region>,
    pub log: Log,
    /// The volumes this node serves: its own, and its partner's after a
    /// takeover.
    volumes: RwLock<Vec<Arc<Volume>>>,
    pub mirror: Mirror,
    pub mailbox: Arc<Mailbox>,
    pub stats: Stats,
    /// Write latency in microseconds, for metrics.
    pub write_latency_us: crate::admin::Histogram,
    pub ha: Ha,
    cp_signal: Mutex<CpSignal>,
    /// One consistency point at a time: the thread's, or one a giveback, a
    /// recovery or a shutdown asks for (racing for the same half would
    /// fail, and a failed consistency point fails the node).
    cp_lock: Mutex<()>,
    cp_wake: Condvar,
    /// Set when durability can no longer be promised (a failed fsync or
    /// msync); every later write fails.
    failed: Mutex<Option<String>>,
    stopping: AtomicBool,
    /// Where the partner mirrors its log into ours; down while this node
    /// replays that mirror after a takeover.
    receiver: Mutex<Option<Receiver>>,
    link: LinkConfig,
    events: Sender<ControlEvent>,
    pub runtime: Runtime,
}

/// A write between its modify phase and its acknowledgement.
#[derive(Debug, Clone, Copy)]
pub struct PendingWrite {
    pub lsn: u64,
    /// The mirror post of its last record, if it was mirrored.
    pub posted: Option<interconnect::WriteId>,
    /// The mirror's resync generation when it was appended.
    pub mirror_generation: u64,
}

/// A running node. Dropping it without [`Node::shutdown`] stops the threads
/// without a final consistency point (as a crash would, minus the crash).
#[derive(Debug)]
pub struct Node {
    inner: Arc<NodeInner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Node {
    /// Open the NVRAM, find out which volumes this node serves, recover the
    /// log onto them, start mirroring, consistency points and the HA
    /// monitor. Serving NBD is up to the caller.
    pub fn start(config: Config) -> Result<Node> {
        let span = tracing::info_span!("node_start", node_id = config.node_id);
        let _entered = span.enter();
        std::fs::create_dir_all(&config.data_dir).map_err(|source| Error::Io {
            what: "creating the data directory",
            path: config.data_dir.clone(),
            source,
        })?;
        let geometry = Geometry::new(config.nvram.half_size.0)?;
        let region = Arc::new(Region::open(
            &config.nvram_path(),
            config.node_id,
            geometry,
        )?);
        // The key was checked by Config::validate; a key file changed since
        // is refused here.
        let link = LinkConfig::from_config(&config)?;
        let (inner, events_rx) = NodeInner::assemble(config, region, link, Runtime::default())?;
        let mut threads = vec![
            spawn("cp", {
                let inner = inner.clone();
                move || inner.run_checkpoints()
            }),
            spawn("mirror-connect", {
                let inner = inner.clone();
                move || inner.mirror.run_connector(&inner.log, &inner.stopping)
            }),
            spawn("ic-events", {
                let inner = inner.clone();
                move || {
                    while !inner.stopping.load(Ordering::Acquire) {
                        match events_rx.recv_timeout(Duration::from_millis(200)) {
                            Ok(event) => inner.on_interconnect_event(event),
                            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
                        }
                    }
                }
            }),
            spawn("ha", {
                let inner = inner.clone();
                move || crate::ha::run_monitor(&inner)
            }),
        ];
        if inner.ha.replay_pending() {
            threads.push(crate::ha::spawn_replay(&inner));
        }
        tracing::info!(
            node_id = inner.config.node_id,
            volumes = inner.volumes().len(),
            role = inner.ha.role().as_str(),
            mode = inner.region.mode().as_str(),
            "node started"
        );
        Ok(Node {
            inner,
            threads: Mutex::new(threads),
        })
    }

    pub fn inner(&self) -> &Arc<NodeInner> {
        &self.inner
    }

    /// Clean shutdown: a final consistency point, then stop every thread.
    pub fn shutdown(&self) -> Result<()> {
        let span = tracing::info_span!("node_shutdown", node_id = self.inner.config.node_id);
        let _entered = span.enter();
        let result = if self.inner.ha.role() == crate::ha::Role::Serving
            || self.inner.ha.holding_partner()
        {
            self.inner.checkpoint_everything()
        } else {
            Ok(())
        };
        self.stop_threads();
        result
    }

    fn stop_threads(&self) {
        self.inner.stopping.store(true, Ordering::Release);
        self.inner.mirror.stop();
        self.inner.ha.wake();
        {
            let mut signal = self.inner.cp_signal.lock();
            signal.stopping = true;
        }
        self.inner.cp_wake.notify_all();
        for thread in self.threads.lock().drain(..) {
            let _ = thread.join();
        }
        crate::ha::stop_partner_listener(&self.inner);
        self.inner.shutdown_receiver();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

/// Where the bytes of a record of `kind` whose payload starts at region
/// offset `payload_at` are.
pub(crate) fn source_of(kind: RecordKind, payload_at: u64) -> Source {
    match kind {
        RecordKind::Write => Source::Region { offset: payload_at },
        RecordKind::WriteZeroes => Source::Zero,
        RecordKind::Trim => Source::Hole,
    }
}

/// Put the records `scanner` yields into the dirty maps of `volumes`,
/// each record's extent in LSN order, newest winning; `area_offset` is where
/// the scanned log lies in the region, `origin` which log it is. A record
/// for a volume not in `volumes`, or beyond its end, is skipped with an
/// error event. Returns how many records went in.
pub(crate) fn index_records(
    scanner: Scanner<'_>,
    volumes: &[Arc<Volume>],
    area_offset: u64,
    origin: Origin,
) -> u64 {
    let mut records = 0u64;
    for record in scanner {
        let header = record.header;
        let Some(volume) = volumes.iter().find(|v| v.id == header.volume) else {
            tracing::error!(
                volume = header.volume,
                lsn = header.lsn,
                ?origin,
                "log record for a volume not served here; skipped"
            );
            continue;
        };
        if header
            .offset
            .checked_add(header.extent_len)
            .map_or(true, |end| end > volume.size_bytes)
        {
            tracing::error!(volume = %volume.name, lsn = header.lsn, ?origin, "log record beyond the end of its volume; skipped");
            continue;
        }
        let payload_at =
            area_offset + record.log_offset + nvlog::record::RECORD_HEADER_BYTES as u64;
        volume.extents.lock().insert_from(
            origin,
            header.offset,
            header.extent_len,
            header.lsn,
            source_of(header.kind, payload_at),
        );
        records += 1;
    }
    records
}

pub(crate) fn spawn(name: &str, body: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(body)
        .expect("spawning a node thread")
}

impl NodeInner {
    /// Open the log in `region`, build the node, publish its mailbox and
    /// decide what it serves (recovering its log onto its volumes). Starts
    /// no thread: [`Node::start`] does, or the simulation steps the node.
    /// Returns the channel of interconnect events for the caller to feed to
    /// [`NodeInner::on_interconnect_event`].
    pub fn assemble(
        config: Config,
        region: Arc<Region>,
        link: LinkConfig,
        runtime: Runtime,
    ) -> Result<(Arc<NodeInner>, EventReceiver<ControlEvent>)> {
        let (log, _recovery) = Log::open(region.clone())?;
        let (events_tx, events_rx) = crossbeam_channel::unbounded();
        let boot = crate::ha::mailbox::read(&config.aggregate_dir, config.node_id)
            .ok()
            .flatten()
            .map_or(1, |previous| previous.boot + 1);
        let mailbox = Arc::new(Mailbox::new(
            &config.aggregate_dir,
            MailboxState {
                format_version: MAILBOX_FORMAT_VERSION,
                node_id: config.node_id,
                heartbeat_seq: 0,
                state: "starting".into(),
                mirror_in_sync: false,
                out_of_sync_reason: Some(
                    "node starting: the mirror is resynced after connecting".into(),
                ),
                nbd_listen: config.nbd.listen.to_string(),
                volumes: config
                    .volumes
                    .iter()
                    .map(|v| VolumeInfo {
                        name: v.name.clone(),
                        size_bytes: v.size.0,
                    })
                    .collect(),
                half_bytes: config.nvram.half_size.0,
                updated_unix_ms: 0,
                boot,
                in_sync_with_boot: None,
            },
        ));
        let mirror = Mirror::new(
            Partner {
                addr: config.interconnect.partner,
                aggregate_dir: config.aggregate_dir.clone(),
                node_id: config.partner_id(),
            },
            link.clone(),
            config.interconnect.slots,
            area_memory(&region, region.local_log()),
            mailbox.clone(),
            events_tx.clone(),
            runtime.clock.clone(),
        );
        let inner = Arc::new(NodeInner {
            config,
            region,
            log,
            volumes: RwLock::new(Vec::new()),
            mirror,
            mailbox,
            stats: Stats::default(),
            write_latency_us: crate::admin::Histogram::latency_us(),
            ha: Ha::new(runtime.clock.now()),
            cp_signal: Mutex::new(CpSignal::default()),
            cp_lock: Mutex::new(()),
            cp_wake: Condvar::new(),
            failed: Mutex::new(None),
            stopping: AtomicBool::new(false),
            receiver: Mutex::new(None),
            link,
            events: events_tx,
            runtime,
        });
        // Publish the mailbox: "out of sync" until the first resync, since
        // nothing says what the partner's mirror holds.
        inner.mailbox.update(|_| {})?;
        crate::ha::boot(&inner)?;
        Ok((inner, events_rx))
    }

    /// Every volume served here.
    pub fn volumes(&self) -> Vec<Arc<Volume>> {
        self.volumes.read().clone()
    }

    pub fn volume_by_name(&self, name: &str) -> Option<Arc<Volume>> {
        self.volumes.read().iter().find(|v| v.name == name).cloned()
    }

    pub fn volume_by_id(&self, id: u32) -> Option<Arc<Volume>> {
        self.volumes.read().iter().find(|v| v.id == id).cloned()
    }

    /// Serve these volumes from now on.
    pub(crate) fn attach_volumes(&self, volumes: Vec<Arc<Volume>>) {
        let mut served = self.volumes.write();
        for volume in volumes {
            assert!(
                served
                    .iter()
                    .all(|v| v.id != volume.id && v.name != volume.name),
                "volume {} attached twice (volume names must be unique across the pair)",
                volume.name
            );
            served.push(volume);
        }
    }

    /// Stop serving node `set`'s volumes; returns them.
    pub(crate) fn detach_set(&self, set: u32) -> Vec<Arc<Volume>> {
        let mut served = self.volumes.write();
        let (gone, kept): (Vec<_>, Vec<_>) = served.drain(..).partition(|v| v.set == set);
        *served = kept;
        gone
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    fn check_range(&self, volume: &Volume, offset: u64, len: u64) -> Result<()> {
        if offset
            .checked_add(len)
            .map_or(true, |end| end > volume.size_bytes)
        {
            return Err(Error::OutOfRange {
                volume: volume.name.clone(),
                offset,
                len,
                size_bytes: volume.size_bytes,
            });
        }
        Ok(())
    }

    pub(crate) fn check_not_failed(&self) -> Result<()> {
        match &*self.failed.lock() {
            Some(reason) => Err(Error::Failed {
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    pub fn failure(&self) -> Option<String> {
        self.failed.lock().clone()
    }

    pub(crate) fn fail(&self, reason: String) {
        tracing::error!(%reason, "node failed: no further writes are accepted");
        self.failed.lock().get_or_insert(reason);
    }

    /// Write `data` at `offset` of `volume`.
    pub fn write(&self, volume: &Arc<Volume>, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let started = Instant::now();
        let result = self
            .start_write(volume, offset, data)
            .and_then(|pending| self.finish_write(volume, pending, fua));
        match &result {
            Ok(()) => {
                self.stats.writes.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .write_bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                self.write_latency_us
                    .observe(started.elapsed().as_micros() as u64);
            }
            Err(_) => {
                self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }

    /// The suspendable and modify phases of a write: it is in the log and
    /// posted to the mirror, not yet acknowledged. `None` for an empty one.
    pub fn start_write(
        &self,
        volume: &Arc<Volume>,
        offset: u64,
        data: &[u8],
    ) -> Result<Option<PendingWrite>> {
        self.check_range(volume, offset, data.len() as u64)?;
        let max = self.log.max_payload_len().max(1);
        let mut last = None;
        for (chunk_index, chunk) in data.chunks(max).enumerate() {
            let chunk_offset = offset + (chunk_index * max) as u64;
            last = Some(self.log_one(volume, RecordData::write(volume.id, chunk_offset, chunk))?);
        }
        Ok(last)
    }

    /// The wait phase of a write started with [`NodeInner::start_write`].
    pub fn finish_write(
        &self,
        volume: &Volume,
        pending: Option<PendingWrite>,
        fua: bool,
    ) -> Result<()> {
        match pending {
            Some(pending) => self.settle(volume, pending, fua),
            None => Ok(()),
        }
    }

    /// Zero `len` bytes at `offset`; `trim` also lets the space go.
    pub fn write_zeroes(
        &self,
        volume: &Arc<Volume>,
        offset: u64,
        len: u64,
        trim: bool,
        fua: bool,
    ) -> Result<()> {
        self.check_range(volume, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let data = if trim {
            RecordData::trim(volume.id, offset, len)
        } else {
            RecordData::write_zeroes(volume.id, offset, len)
        };
        let pending = self.log_one(volume, data)?;
        self.settle(volume, pending, fua)
    }

    /// Suspendable phase and modify phase of one record.
    fn log_one(&self, volume: &Volume, data: RecordData<'_>) -> Result<PendingWrite> {
        self.check_not_failed()?;
        volume.fence.check()?;
        // Held from here to the append: a giveback closes the gate only
        // when no write to the volume is between its check and its append.
        let gate = volume.write_gate.read();
        if !*gate {
            return Err(Error::NoSuchVolume {
                name: volume.name.clone(),
            });
        }
        let stepped = self.runtime.execution == Execution::Stepped;
        let log_reservation = if stepped {
            self.log.try_reserve(data.payload.len())?
        } else {
            self.log.reserve(data.payload.len())?
        };
        let mut mirror_reservation = self.mirror.reserve(log_reservation.len_bytes(), !stepped)?;
        let local_log = self.region.local_log().offset;
        let (lsn, posted, closed, mirror_generation) =
            self.log.append_then(log_reservation, &data, |appended| {
                let payload_at =
                    local_log + appended.range.start + nvlog::record::RECORD_HEADER_BYTES as u64;
                volume.extents.lock().insert(
                    data.offset,
                    data.extent_len,
                    appended.lsn,
                    source_of(data.kind, payload_at),
                );
                let posted = self.mirror.post(
                    mirror_reservation.as_mut(),
                    appended.header_range.clone(),
                    appended.range.clone(),
                );
                let generation = self.mirror.generation();
                (appended.lsn, posted, appended.closed_half, generation)
            })?;
        drop(gate);
        if closed.is_some() || self.over_threshold() {
            self.kick_checkpoint();
        }
        Ok(PendingWrite {
            lsn,
            posted,
            mirror_generation,
        })
    }

    /// The wait phase: acknowledge only once the record is safe in two
    /// failure domains, and only while this node still owns the volume.
    fn settle(&self, volume: &Volume, pending: PendingWrite, fua: bool) -> Result<()> {
        let PendingWrite {
            lsn,
            posted,
            mirror_generation,
        } = pending;
        if self.runtime.injected_bug == Some(InjectedBug::AckBeforePlaced) {
            return Ok(());
        }
        let placed = self.mirror.placed(posted);
        if (placed && self.mirror.in_sync()) || self.mirror.covers(mirror_generation) {
            if fua || self.config.durability == Durability::Persist {
                self.log.persist(lsn)?;
            }
            volume.fence.check()?;
            self.stats.acks_mirrored.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        self.mirror.mark_out_of_sync(
            &format!(
                "partner {} unreachable or resyncing; writes are acknowledged after local persistence",
                self.config.interconnect.partner
            ),
            placed,
            mirror_generation,
        )?;
        self.log
            .persist(lsn)
            .inspect_err(|error| self.fail(error.to_string()))?;
        volume.fence.check()?;
        self.stats.acks_persisted.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Every write acknowledged before this call is durable on return.
    pub fn flush(&self) -> Result<()> {
        self.check_not_failed()?;
        let last = self.log.last_lsn();
        if last > 0 {
            self.log
                .persist(last)
                .inspect_err(|error| self.fail(error.to_string()))?;
        }
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

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
        self.ha.note_read_served();
        Ok(())
    }

    fn over_threshold(&self) -> bool {
        let status = self.log.status();
        let used = status.halves[status.filling].used_bytes;
        used * 100 >= status.half_len * u64::from(self.config.checkpoint.threshold_percent)
    }

    fn kick_checkpoint(&self) {
        self.cp_signal.lock().kicked = true;
        self.cp_wake.notify_all();
    }

    /// The consistency-point thread: on a kick (a half closed, or the
    /// threshold was crossed) or on the timer.
    fn run_checkpoints(&self) {
        let interval = Duration::from_millis(self.config.checkpoint.interval_ms);
        let mut last_cp = Instant::now();
        loop {
            {
                let mut signal = self.cp_signal.lock();
                if !signal.kicked && !signal.stopping {
                    let deadline = last_cp + interval;
                    self.cp_wake.wait_until(&mut signal, deadline);
                }
                if signal.stopping {
                    return;
                }
                signal.kicked = false;
            }
            let timer_due = last_cp.elapsed() >= interval;
            if !self.checkpoint_tick(timer_due) {
                return;
            }
            if timer_due {
                last_cp = Instant::now();
            }
        }
    }

    /// One round of the consistency-point thread; false once the node has
    /// failed (a consistency point that failed is never retried: the
    /// kernel may have dropped what it could not write).
    pub fn checkpoint_tick(&self, timer_due: bool) -> bool {
        match self.checkpoint_step(timer_due) {
            Ok(()) => true,
            Err(Error::Fenced { volumes_of, .. }) => {
                // The records for the fenced volumes stay in the log; the
                // new owner has them from its mirror.
                tracing::warn!(volumes_of, "consistency point stopped: fenced");
                crate::ha::on_fenced(self);
                true
            }
            Err(error) => {
                self.fail(format!("consistency point failed: {error}"));
                false
            }
        }
    }

    /// Flush closed halves; close the filling one when the timer or the
    /// threshold says so.
    fn checkpoint_step(&self, timer_due: bool) -> Result<()> {
        let _one_at_a_time = self.cp_lock.lock();
        if crate::ha::log_is_stale(self) {
            return Ok(());
        }
        self.flush_closed_halves()?;
        let status = self.log.status();
        let filling_used = status.halves[status.filling].used_bytes;
        if filling_used > 0 && (timer_due || self.over_threshold()) {
            if let Some(half) = self.log.switch_half() {
                self.checkpoint_half(half)?;
            }
        }
        Ok(())
    }

    fn flush_closed_halves(&self) -> Result<()> {
        loop {
            let status = self.log.status();
            let oldest_closed = (0..2)
                .filter(|&half| status.halves[half].state == HalfState::Closed)
                .min_by_key(|&half| status.halves[half].generation);
            match oldest_closed {
                Some(half) => self.checkpoint_half(half)?,
                None => return Ok(()),
            }
        }
    }

    /// Flush everything logged: both halves (shutdown, after recovery,
    /// before a giveback).
    pub fn checkpoint_everything(&self) -> Result<()> {
        let _one_at_a_time = self.cp_lock.lock();
        self.flush_closed_halves()?;
        if let Some(half) = self.log.switch_half() {
            self.checkpoint_half(half)?;
        }
        Ok(())
    }

    /// One consistency point: write the half's extents to the volume files,
    /// fdatasync, then free the half here and in the partner's mirror.
    fn checkpoint_half(&self, half: usize) -> Result<()> {
        // Whoever asked (the consistency-point thread, recovery, a giveback,
        // a shutdown), a consistency point that failed for another reason
        // than a fence fails the node: its half stays half-written and is
        // never freed nor retried in this life (a failed fsync may have
        // dropped the data), and nothing may treat the log as flushed.
        self.write_half(half).inspect_err(|error| {
            if !matches!(error, Error::Fenced { .. }) {
                self.fail(format!("consistency point failed: {error}"));
            }
        })
    }

    fn write_half(&self, half: usize) -> Result<()> {
        let started = Instant::now();
        let status = self.log.status().halves[half];
        let span = tracing::info_span!(
            "checkpoint",
            half,
            first_lsn = status.first_lsn,
            last_lsn = status.last_lsn
        );
        let _entered = span.enter();
        let update = self.log.begin_flush(half)?;
        self.mirror.post_header(update.range);
        let mut bytes = 0u64;
        if status.last_lsn != 0 {
            let lsns = status.first_lsn..status.last_lsn + 1;
            let mut buffer = Vec::new();
            for volume in self.volumes() {
                let _file = volume.file_lock.lock();
                let pieces = volume.extents.lock().written_by(lsns.clone());
                if pieces.is_empty() {
                    continue;
                }
                for piece in &pieces {
                    match piece.source {
                        Source::Region { offset } => {
                            buffer.resize(piece.len as usize, 0);
                            self.region.read(offset, &mut buffer);
                            volume.write_file(piece.start, &buffer)?;
                        }
                        Source::Zero => volume.zero_file(piece.start, piece.len, false)?,
                        Source::Hole => volume.zero_file(piece.start, piece.len, true)?,
                    }
                    bytes += piece.len;
                }
                volume.sync()?;
            }
        }
        // The transport may still be reading this half's bytes for posts in
        // flight; the half is reused only once they are placed.
        self.mirror.wait_all_placed();
        if status.last_lsn != 0 {
            for volume in self.volumes() {
                volume.extents.lock().remove_through(status.last_lsn);
            }
        }
        // The extents this consistency point skipped were replaced by newer
        // records, maybe in the next half and not yet persisted: persist
        // them before the half goes, or a crash would lose the newer record
        // and, with the half, the older one (found by the simulation).
        let newest = self.log.last_lsn();
        if newest > 0 {
            self.log.persist(newest)?;
        }
        // After a takeover, the index must forget mirror extents that writes
        // in this half replaced, before the half (and so those writes' only
        // record outside the files) is freed.
        crate::ha::save_index_if_holding(self)?;
        let update = self.log.free_half(half)?;
        self.mirror.post_header(update.range);
        let elapsed_us = started.elapsed().as_micros() as u64;
        self.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
        self.stats
            .checkpoint_us_total
            .fetch_add(elapsed_us, Ordering::Relaxed);
        tracing::debug!(bytes, elapsed_us, "consistency point done");
        Ok(())
    }

    /// Local recovery: the records the log kept since the last flushed LSN
    /// go into the dirty maps, then a consistency point writes them to the
    /// volumes. A crash during this is recovered the same way: the records
    /// stay in the log until their half is freed.
    pub(crate) fn recover_onto_volumes(&self) -> Result<()> {
        let span = tracing::info_span!("replay", node_id = self.config.node_id, log = "local");
        let _entered = span.enter();
        let image = self.log.live_image();
        let records = index_records(
            Scanner::new(&image)?,
            &self.volumes(),
            self.region.local_log().offset,
            Origin::Local,
        );
        self.checkpoint_everything()?;
        tracing::info!(records, "log replayed onto the volumes");
        Ok(())
    }

    pub fn on_interconnect_event(&self, event: ControlEvent) {
        use interconnect::Direction;
        match event {
            ControlEvent::Disconnected {
                direction: Direction::Outbound,
                session,
                error,
            } => {
                tracing::warn!(session, %error, "mirror connection lost");
                self.mirror.link_down("connection lost");
            }
            ControlEvent::PartnerSilent {
                direction,
                session,
                silent_ms,
            } => {
                tracing::warn!(?direction, session, silent_ms, "partner silent");
                if direction == Direction::Outbound {
                    self.mirror.link_down("partner silent");
                }
            }
            other => tracing::debug!(?other, "interconnect event"),
        }
    }

    pub fn link(&self) -> Link {
        self.mirror.link()
    }

    /// Start accepting the partner's mirror writes (idempotent).
    pub(crate) fn bind_receiver(&self) -> Result<()> {
        let mut receiver = self.receiver.lock();
        if receiver.is_none() {
            *receiver = Some(self.link.listen(
                self.config.interconnect.listen,
                area_memory(&self.region, self.region.mirror()),
                self.events.clone(),
            )?);
        }
        Ok(())
    }

    /// Stop accepting the partner's mirror writes and close its session.
    pub(crate) fn shutdown_receiver(&self) {
        if let Some(mut receiver) = self.receiver.lock().take() {
            receiver.shutdown();
        }
    }

    /// Whether the partner has a live session into our mirror.
    pub(crate) fn receiver_connected(&self) -> bool {
        self.receiver
            .lock()
            .as_ref()
            .is_some_and(|r| r.session().is_some())
    }
}
