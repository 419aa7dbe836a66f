//! `nvmirror node`: run one node in the foreground until SIGTERM or SIGINT,
//! with its NBD front end and its admin endpoint.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};

use crate::admin::{AdminHandler, AdminRefusal, AdminServer, MetricsText};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::nbd::{Errno, Export, ExportError, Exports, NbdServer, ServerConfig};
use crate::node::{Node, NodeInner};
use crate::storage::volume::Volume;

/// One volume served by the node, as an NBD export.
#[derive(Debug)]
pub struct VolumeExport {
    node: Arc<NodeInner>,
    volume: Arc<Volume>,
}

fn export_error(error: Error) -> ExportError {
    let errno = match &error {
        Error::OutOfRange { .. } => Errno::Inval,
        // The client must go elsewhere: the volume moved to the partner.
        Error::Fenced { .. } | Error::NoSuchVolume { .. } => Errno::Shutdown,
        _ => Errno::Io,
    };
    ExportError::new(errno, error.to_string())
}

impl Export for VolumeExport {
    fn size_bytes(&self) -> u64 {
        self.volume.size_bytes
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        self.node
            .read(&self.volume, offset, buf)
            .map_err(export_error)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ExportError> {
        self.node
            .write(&self.volume, offset, data, fua)
            .map_err(export_error)
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        self.node
            .write_zeroes(&self.volume, offset, len, false, fua)
            .map_err(export_error)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        self.node
            .write_zeroes(&self.volume, offset, len, true, fua)
            .map_err(export_error)
    }

    fn flush(&self) -> Result<(), ExportError> {
        self.node.flush().map_err(export_error)
    }
}

/// The volumes a node serves right now, by name: its own, and its
/// partner's after a takeover.
#[derive(Debug)]
pub struct NodeExports {
    node: Arc<NodeInner>,
}

impl NodeExports {
    pub fn new(node: Arc<NodeInner>) -> NodeExports {
        NodeExports { node }
    }
}

impl Exports for NodeExports {
    fn lookup(&self, name: &str) -> Option<Arc<dyn Export>> {
        let volume = self.node.volume_by_name(name)?;
        if volume.fence.is_tripped() {
            return None;
        }
        Some(Arc::new(VolumeExport {
            node: self.node.clone(),
            volume,
        }))
    }

    fn names(&self) -> Vec<String> {
        self.node
            .volumes()
            .iter()
            .filter(|volume| !volume.fence.is_tripped())
            .map(|volume| volume.name.clone())
            .collect()
    }
}

/// The admin endpoint's view of the node.
#[derive(Debug)]
pub struct NodeAdmin {
    node: Arc<NodeInner>,
}

fn refusal(error: Error) -> AdminRefusal {
    let status = match error {
        Error::Refused { .. } => 409,
        _ => 500,
    };
    AdminRefusal {
        status,
        message: error.to_string(),
    }
}

impl AdminHandler for NodeAdmin {
    fn status(&self) -> serde_json::Value {
        crate::ha::status(&self.node)
    }

    fn metrics(&self) -> String {
        metrics(&self.node)
    }

    fn takeover(&self, force: bool) -> Result<String, AdminRefusal> {
        let reason = if force {
            "operator: takeover --force"
        } else {
            "operator: takeover"
        };
        crate::ha::takeover(&self.node, force, reason).map_err(refusal)
    }

    fn giveback(&self) -> Result<String, AdminRefusal> {
        crate::ha::giveback(&self.node).map_err(refusal)
    }

    fn fault(&self, name: &str, duration_ms: u64) -> Result<String, AdminRefusal> {
        match name {
            "cut-interconnect" => {
                crate::ha::cut_interconnect(&self.node, Duration::from_millis(duration_ms));
                Ok(format!("interconnect cut for {duration_ms} ms"))
            }
            other => Err(AdminRefusal {
                status: 400,
                message: format!("unknown fault `{other}` (known: cut-interconnect)"),
            }),
        }
    }
}

/// The node's metrics in the Prometheus text format.
pub fn metrics(node: &NodeInner) -> String {
    let mut text = MetricsText::new();
    let stats = &node.stats;
    let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
    text.counter(
        "nvmirror_writes_total",
        "Writes acknowledged.",
        &[],
        load(&stats.writes),
    );
    text.counter(
        "nvmirror_write_bytes_total",
        "Bytes of writes acknowledged.",
        &[],
        load(&stats.write_bytes),
    );
    text.counter(
        "nvmirror_write_errors_total",
        "Writes that failed.",
        &[],
        load(&stats.write_errors),
    );
    text.counter(
        "nvmirror_acks_total",
        "Acknowledgements by what made the write safe.",
        &[("by", "mirror")],
        load(&stats.acks_mirrored),
    );
    text.counter(
        "nvmirror_acks_total",
        "Acknowledgements by what made the write safe.",
        &[("by", "local_persist")],
        load(&stats.acks_persisted),
    );
    text.counter(
        "nvmirror_reads_total",
        "Reads served.",
        &[],
        load(&stats.reads),
    );
    text.counter(
        "nvmirror_read_bytes_total",
        "Bytes read.",
        &[],
        load(&stats.read_bytes),
    );
    text.counter(
        "nvmirror_flushes_total",
        "Flushes served.",
        &[],
        load(&stats.flushes),
    );
    text.histogram(
        "nvmirror_write_latency_us",
        "Write latency, request to acknowledgement, in microseconds.",
        &[],
        &node.write_latency_us,
    );
    text.counter(
        "nvmirror_checkpoints_total",
        "Consistency points done.",
        &[],
        load(&stats.checkpoints),
    );
    text.counter(
        "nvmirror_checkpoint_us_total",
        "Time spent in consistency points, in microseconds.",
        &[],
        load(&stats.checkpoint_us_total),
    );
    text.gauge(
        "nvmirror_send_slots_in_use",
        "Send-queue slots in flight.",
        &[],
        node.mirror.slots_in_use() as u64,
    );
    text.gauge(
        "nvmirror_mirror_in_sync",
        "1 when the partner's mirror holds every acknowledged write.",
        &[],
        node.mailbox.current().mirror_in_sync,
    );
    let log = node.log.status();
    text.gauge(
        "nvmirror_log_used_bytes",
        "Bytes used in the filling half of the log.",
        &[],
        log.halves[log.filling].used_bytes,
    );
    text.gauge(
        "nvmirror_log_half_bytes",
        "Bytes of one log half.",
        &[],
        log.half_len,
    );
    let status = crate::ha::status(node);
    text.gauge(
        "nvmirror_holding_partner_volumes",
        "1 while this node serves its partner's volumes after a takeover.",
        &[],
        status["takeover"]["holding_partner_volumes"]
            .as_bool()
            .unwrap_or(false),
    );
    text.gauge(
        "nvmirror_replay_total_bytes",
        "Bytes of the partner's mirror to replay after the last takeover.",
        &[],
        status["replay"]["total_bytes"].as_u64().unwrap_or(0),
    );
    text.gauge(
        "nvmirror_replay_done_bytes",
        "Bytes of the partner's mirror replayed so far.",
        &[],
        status["replay"]["done_bytes"].as_u64().unwrap_or(0),
    );
    text.counter(
        "nvmirror_takeovers_total",
        "Takeovers done by this node since it started.",
        &[],
        u64::from(status["last_takeover"].is_object()),
    );
    text.finish()
}

/// Run a node until SIGTERM or SIGINT, then shut it down cleanly: stop
/// serving, a final consistency point, exit.
pub fn run_node(config: Config) -> Result<()> {
    // Block the signals before any thread starts, so that every thread
    // inherits the mask and only the sigwait below sees them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block().map_err(|errno| Error::Failed {
        reason: format!("cannot block SIGTERM/SIGINT: {errno}"),
    })?;
    let listen = config.nbd.listen;
    let admin_listen = config.ha.admin_listen;
    let node = Node::start(config)?;
    let exports: Arc<dyn crate::nbd::Exports> = Arc::new(NodeExports::new(node.inner().clone()));
    let server = Arc::new(parking_lot::Mutex::new(None::<NbdServer>));
    match NbdServer::bind(listen, exports.clone(), ServerConfig::default()) {
        Ok(bound) => *server.lock() = Some(bound),
        // While this node waits for a giveback, its partner may serve this
        // very address (same host, or a floating address): bind it once the
        // partner lets it go.
        Err(error)
            if error.kind() == std::io::ErrorKind::AddrInUse
                && node.inner().ha.role() == crate::ha::Role::WaitingForGiveback =>
        {
            tracing::info!(%listen, "the NBD address is in use (the partner serves it); binding it after the giveback");
            let server = server.clone();
            let node = node.inner().clone();
            std::thread::spawn(move || {
                while !node.is_stopping() && server.lock().is_none() {
                    match NbdServer::bind(listen, exports.clone(), ServerConfig::default()) {
                        Ok(bound) => {
                            tracing::info!(%listen, "NBD address bound");
                            *server.lock() = Some(bound);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(100)),
                    }
                }
            });
        }
        Err(source) => {
            return Err(Error::Listen {
                addr: listen,
                source,
            })
        }
    }
    let admin = match admin_listen {
        Some(addr) => Some(
            AdminServer::bind(
                addr,
                Arc::new(NodeAdmin {
                    node: node.inner().clone(),
                }),
            )
            .map_err(|source| Error::Listen { addr, source })?,
        ),
        None => None,
    };
    let names: Vec<String> = node
        .inner()
        .volumes()
        .iter()
        .map(|v| v.name.clone())
        .collect();
    tracing::info!(
        node_id = node.inner().config.node_id,
        nbd = %listen,
        admin = ?admin.as_ref().map(|a| a.local_addr()),
        volumes = ?names,
        "serving"
    );
    let signal = signals.wait().map_err(|errno| Error::Failed {
        reason: format!("waiting for a signal failed: {errno}"),
    })?;
    tracing::info!(?signal, "shutting down");
    if let Some(admin) = &admin {
        admin.shutdown();
    }
    if let Some(server) = server.lock().take() {
        server.shutdown();
    }
    node.shutdown()?;
    tracing::info!("clean shutdown done");
    Ok(())
}
