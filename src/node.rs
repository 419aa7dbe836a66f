//! The storage node: its NVRAM, log, volumes and mirror, the write and read
//! paths, consistency points and local recovery.
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
//!    also wait for local persistence.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use interconnect::{MirrorReceiver, PresharedKey, TcpConfig};
use nvlog::{Geometry, HalfState, Log, RecordData, RecordKind, Region, Scanner};
use parking_lot::{Condvar, Mutex};

use crate::config::{Config, Durability};
use crate::error::{Error, Result};
use crate::extents::Source;
use crate::mailbox::Mailbox;
use crate::mirror::{Link, Mirror};
use crate::sys::area_memory;
use crate::volume::Volume;

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
    pub volumes: Vec<Arc<Volume>>,
    pub mirror: Mirror,
    pub stats: Stats,
    cp_signal: Mutex<CpSignal>,
    cp_wake: Condvar,
    /// Set when durability can no longer be promised (a failed fsync or
    /// msync); every later write fails.
    failed: Mutex<Option<String>>,
    stopping: AtomicBool,
    receiver: Mutex<Option<MirrorReceiver>>,
}

/// A running node. Dropping it without [`Node::shutdown`] stops the threads
/// without a final consistency point (as a crash would, minus the crash).
#[derive(Debug)]
pub struct Node {
    inner: Arc<NodeInner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Node {
    /// Open the NVRAM and volumes, recover the log onto the volumes, start
    /// mirroring and consistency points. Serving is up to the caller.
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
        let (log, _recovery) = Log::open(region.clone())?;
        let volume_dir = config
            .aggregate_dir
            .join(format!("node-{}", config.node_id));
        let volumes = config
            .volumes
            .iter()
            .enumerate()
            .map(|(index, volume)| {
                Volume::open(&volume_dir, index as u32, &volume.name, volume.size.0).map(Arc::new)
            })
            .collect::<Result<Vec<_>>>()?;

        // Checked by Config::validate; a key file changed since is refused here.
        let key = PresharedKey::new(config.key_bytes()?)?;
        let mut tcp = TcpConfig::new(key);
        tcp.send_depth = config.interconnect.slots;
        tcp.heartbeat_interval_ms = config.interconnect.heartbeat_interval_ms;
        tcp.silence_timeout_ms = config.interconnect.heartbeat_timeout_ms;
        let (events_tx, events_rx) = crossbeam_channel::unbounded();
        let mailbox = Mailbox::new(&config.aggregate_dir, config.node_id);
        let mirror = Mirror::new(
            config.node_id,
            config.interconnect.partner,
            tcp.clone(),
            config.interconnect.slots,
            area_memory(&region, region.local_log()),
            mailbox,
            events_tx.clone(),
        );
        let inner = Arc::new(NodeInner {
            config,
            region: region.clone(),
            log,
            volumes,
            mirror,
            stats: Stats::default(),
            cp_signal: Mutex::new(CpSignal::default()),
            cp_wake: Condvar::new(),
            failed: Mutex::new(None),
            stopping: AtomicBool::new(false),
            receiver: Mutex::new(None),
        });

        // Until the partner's mirror is resynced, it cannot be trusted.
        inner
            .mirror
            .mark_out_of_sync("node starting: the mirror is resynced after connecting")?;
        inner.recover_onto_volumes()?;

        let receiver = MirrorReceiver::bind(
            inner.config.interconnect.listen,
            &tcp,
            area_memory(&region, region.mirror()),
            Some(events_tx),
        )?;
        *inner.receiver.lock() = Some(receiver);

        let mut threads = Vec::new();
        threads.push(spawn("cp", {
            let inner = inner.clone();
            move || inner.run_checkpoints()
        }));
        threads.push(spawn("mirror-connect", {
            let inner = inner.clone();
            move || inner.mirror.run_connector(&inner.log, &inner.stopping)
        }));
        threads.push(spawn("ic-events", {
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
        }));
        tracing::info!(
            node_id = inner.config.node_id,
            volumes = inner.volumes.len(),
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
        let result = self.inner.checkpoint_everything();
        self.stop_threads();
        result
    }

    fn stop_threads(&self) {
        self.inner.stopping.store(true, Ordering::Release);
        self.inner.mirror.stop();
        {
            let mut signal = self.inner.cp_signal.lock();
            signal.stopping = true;
        }
        self.inner.cp_wake.notify_all();
        for thread in self.threads.lock().drain(..) {
            let _ = thread.join();
        }
        if let Some(mut receiver) = self.inner.receiver.lock().take() {
            receiver.shutdown();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

/// Where the bytes of a record of `kind` whose payload starts at region
/// offset `payload_at` are.
fn source_of(kind: RecordKind, payload_at: u64) -> Source {
    match kind {
        RecordKind::Write => Source::Region { offset: payload_at },
        RecordKind::WriteZeroes => Source::Zero,
        RecordKind::Trim => Source::Hole,
    }
}

fn spawn(name: &str, body: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(body)
        .expect("spawning a node thread")
}

impl NodeInner {
    pub fn volume(&self, index: usize) -> &Arc<Volume> {
        &self.volumes[index]
    }

    pub fn volume_index(&self, name: &str) -> Option<usize> {
        self.volumes.iter().position(|volume| volume.name == name)
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

    fn check_not_failed(&self) -> Result<()> {
        match &*self.failed.lock() {
            Some(reason) => Err(Error::Failed {
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    fn fail(&self, reason: String) {
        tracing::error!(%reason, "node failed: no further writes are accepted");
        self.failed.lock().get_or_insert(reason);
    }

    /// Write `data` at `offset` of volume `index`.
    pub fn write(&self, index: usize, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let volume = self.volume(index).clone();
        self.check_range(&volume, offset, data.len() as u64)?;
        let max = self.log.max_payload_len();
        let mut last = None;
        for (chunk_index, chunk) in data.chunks(max.max(1)).enumerate() {
            let chunk_offset = offset + (chunk_index * max) as u64;
            last = Some(self.log_one(&volume, RecordData::write(volume.id, chunk_offset, chunk))?);
        }
        if let Some((lsn, posted)) = last {
            self.settle(lsn, posted, fua)?;
        }
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        self.stats
            .write_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Zero `len` bytes at `offset`; `trim` also lets the space go.
    pub fn write_zeroes(
        &self,
        index: usize,
        offset: u64,
        len: u64,
        trim: bool,
        fua: bool,
    ) -> Result<()> {
        let volume = self.volume(index).clone();
        self.check_range(&volume, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let data = if trim {
            RecordData::trim(volume.id, offset, len)
        } else {
            RecordData::write_zeroes(volume.id, offset, len)
        };
        let (lsn, posted) = self.log_one(&volume, data)?;
        self.settle(lsn, posted, fua)
    }

    /// Suspendable phase and modify phase of one record; returns its LSN
    /// and mirror post.
    fn log_one(
        &self,
        volume: &Volume,
        data: RecordData<'_>,
    ) -> Result<(u64, Option<interconnect::WriteId>)> {
        self.check_not_failed()?;
        let log_reservation = self.log.reserve(data.payload.len())?;
        let mut mirror_reservation = self.mirror.reserve(log_reservation.len_bytes());
        let local_log = self.region.local_log().offset;
        let (lsn, posted, closed) = self.log.append_then(log_reservation, &data, |appended| {
            let payload_at =
                local_log + appended.range.start + nvlog::record::RECORD_HEADER_BYTES as u64;
            let source = source_of(data.kind, payload_at);
            volume
                .extents
                .lock()
                .insert(data.offset, data.extent_len, appended.lsn, source);
            let posted = self.mirror.post(
                mirror_reservation.as_mut(),
                appended.header_range.clone(),
                appended.range.clone(),
            );
            (appended.lsn, posted, appended.closed_half)
        })?;
        if closed.is_some() || self.over_threshold() {
            self.kick_checkpoint();
        }
        Ok((lsn, posted))
    }

    /// The wait phase: acknowledge only once the record is safe in two
    /// failure domains.
    fn settle(&self, lsn: u64, posted: Option<interconnect::WriteId>, fua: bool) -> Result<()> {
        if self.mirror.placed_in_sync(posted) {
            if fua || self.config.durability == Durability::Persist {
                self.log.persist(lsn)?;
            }
            self.stats.acks_mirrored.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        self.mirror.mark_out_of_sync(&format!(
            "partner {} unreachable or resyncing; writes are acknowledged after local persistence",
            self.config.interconnect.partner
        ))?;
        self.log
            .persist(lsn)
            .inspect_err(|error| self.fail(error.to_string()))?;
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
    pub fn read(&self, index: usize, offset: u64, buf: &mut [u8]) -> Result<()> {
        let volume = self.volume(index);
        self.check_range(volume, offset, buf.len() as u64)?;
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
        // Gaps have no newer data in any log; a consistency point only
        // removes an extent after its bytes are in the file.
        for gap in gaps {
            let at = (gap.start - offset) as usize;
            volume.read_file(gap.start, &mut buf[at..at + (gap.end - gap.start) as usize])?;
        }
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        self.stats
            .read_bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
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
            if let Err(error) = self.checkpoint_step(timer_due) {
                self.fail(format!("consistency point failed: {error}"));
                return;
            }
            if timer_due {
                last_cp = Instant::now();
            }
        }
    }

    /// Flush closed halves; close the filling one when the timer or the
    /// threshold says so.
    fn checkpoint_step(&self, timer_due: bool) -> Result<()> {
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

    /// Flush everything logged: both halves (shutdown, after recovery).
    pub fn checkpoint_everything(&self) -> Result<()> {
        self.flush_closed_halves()?;
        if let Some(half) = self.log.switch_half() {
            self.checkpoint_half(half)?;
        }
        Ok(())
    }

    /// One consistency point: write the half's extents to the volume files,
    /// fdatasync, then free the half here and in the partner's mirror.
    fn checkpoint_half(&self, half: usize) -> Result<()> {
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
            for volume in &self.volumes {
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
            for volume in &self.volumes {
                volume.extents.lock().remove_through(status.last_lsn);
            }
        }
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
    fn recover_onto_volumes(&self) -> Result<()> {
        let span = tracing::info_span!("replay", node_id = self.config.node_id);
        let _entered = span.enter();
        let image = self.log.live_image();
        let local_log = self.region.local_log().offset;
        let mut records = 0u64;
        for record in Scanner::new(&image)? {
            let header = record.header;
            let Some(volume) = self.volumes.get(header.volume as usize) else {
                tracing::error!(
                    volume = header.volume,
                    lsn = header.lsn,
                    "log record for a volume no longer configured; skipped"
                );
                continue;
            };
            if header
                .offset
                .checked_add(header.extent_len)
                .map_or(true, |end| end > volume.size_bytes)
            {
                tracing::error!(volume = %volume.name, lsn = header.lsn, "log record beyond the end of its volume; skipped");
                continue;
            }
            let payload_at =
                local_log + record.log_offset + nvlog::record::RECORD_HEADER_BYTES as u64;
            let source = source_of(header.kind, payload_at);
            volume
                .extents
                .lock()
                .insert(header.offset, header.extent_len, header.lsn, source);
            records += 1;
        }
        self.checkpoint_everything()?;
        tracing::info!(records, "log replayed onto the volumes");
        Ok(())
    }

    fn on_interconnect_event(&self, event: interconnect::ControlEvent) {
        use interconnect::{ControlEvent, Direction};
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
}
