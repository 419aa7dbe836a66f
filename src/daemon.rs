//! The daemon: one node of the pair as a process. It wires the node's
//! threads (consistency points, the mirror's connector, interconnect
//! events, the HA monitor; HA starts the replay's), puts the NBD front end
//! and the admin endpoint in front of it, and runs until SIGTERM or SIGINT
//! (`nvmirror node`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};
use nvlog::{Geometry, Region};
use parking_lot::Mutex;

use crate::admin::metrics::node_metrics;
use crate::admin::{AdminHandler, AdminRefusal, AdminServer};
use crate::clock::SystemClock;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::ha::status::Status;
use crate::ha::{HaNode, HaOptions, PartnerService, ReplayDriver, Role};
use crate::mirror::transport::NetworkInterconnect;
use crate::node::{random_boot_id, read_host_boot, spawn, Environment, Node};
use crate::storage::disk::FileDisks;
use crate::storage::volume::Volume;
use nbd::{Errno, Export, ExportError, Exports, NbdServer, ServerConfig};

/// A node running on this machine: its threads, HA over it, and the NBD
/// listener of the partner's address while it holds the partner's volumes.
/// Dropping it without [`RunningNode::shutdown`] stops the threads without
/// a final consistency point (as a crash would, minus the crash).
#[derive(Debug)]
pub struct RunningNode {
    ha: Arc<HaNode>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl RunningNode {
    /// Open the NVRAM, find out which volumes this node serves, recover the
    /// log onto them, start mirroring, consistency points and the HA
    /// monitor. Serving NBD on its own address is up to the caller.
    pub fn start(config: Config) -> Result<RunningNode> {
        let span = tracing::info_span!("node_start", node_id = config.node_id);
        let _entered = span.enter();
        std::fs::create_dir_all(&config.data_dir).map_err(|source| Error::Io {
            what: "creating the data directory",
            path: config.data_dir.clone(),
            source,
        })?;
        let geometry = Geometry::new(config.nvram.half_size.0)?;
        refuse_a_lost_nvram(&config, geometry)?;
        let region = Arc::new(Region::open(
            &config.nvram_path(),
            config.node_id,
            geometry,
        )?);
        // The key was checked by Config::validate; a key file changed since
        // is refused here.
        let environment = Environment {
            clock: Arc::new(SystemClock),
            disks: Arc::new(FileDisks),
            interconnect: Arc::new(NetworkInterconnect::from_config(&config)?),
            boot: random_boot_id(),
            host_boot: read_host_boot(),
        };
        let (node, events) = Node::open(config, region, environment)?;
        let ha = HaNode::start(
            node.clone(),
            HaOptions {
                replay: ReplayDriver::Thread,
                partner_service: Some(Arc::new(NbdPartnerService::default())),
                verify_warm_index: false,
            },
        )?;
        let mut threads = vec![
            spawn("cp", {
                let node = node.clone();
                move || node.run_consistency_points()
            }),
            spawn("mirror-connect", {
                let node = node.clone();
                move || node.run_connector()
            }),
            spawn("ic-events", {
                let node = node.clone();
                move || node.run_interconnect_events(events)
            }),
            spawn("ha", {
                let ha = ha.clone();
                move || ha.run_monitor()
            }),
        ];
        let warm_interval_ms = node.config.ha.warm_index_interval_ms;
        if warm_interval_ms > 0 {
            threads.push(spawn("warm-index", {
                let ha = ha.clone();
                move || ha.run_warm_index(std::time::Duration::from_millis(warm_interval_ms))
            }));
        }
        tracing::info!(
            node_id = node.config.node_id,
            volumes = node.volumes().len(),
            role = ha.role().as_str(),
            mode = node.region.mode().as_str(),
            "node started"
        );
        Ok(RunningNode {
            ha,
            threads: Mutex::new(threads),
        })
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.ha.node
    }

    pub fn ha(&self) -> &Arc<HaNode> {
        &self.ha
    }

    /// Clean shutdown: a final consistency point, then stop every thread.
    pub fn shutdown(&self) -> Result<()> {
        let result = self.ha.final_consistency_point();
        self.join_threads();
        // Nothing writes any more: what is left in the log (writes after the
        // final consistency point) is persisted, and the next start may
        // trust the log.
        result.and_then(|()| self.ha.record_clean_stop())
    }

    /// The node's loops and the monitor end first, so that no takeover
    /// starts after the partner's address and the replay are let go.
    fn join_threads(&self) {
        self.ha.signal_stop();
        for thread in self.threads.lock().drain(..) {
            let _ = thread.join();
        }
        self.ha.release();
        self.ha.node.shutdown_receiver();
    }
}

impl Drop for RunningNode {
    fn drop(&mut self) {
        self.join_threads();
    }
}

/// A node that has started before (its mailbox is there), still owns its
/// volumes, and finds no region in its NVRAM would format a blank log: it
/// would serve without the writes its log held, and its first resync would
/// copy that empty log over the partner's mirror, the one place they may
/// still be. (When the partner holds its volumes, the log is discarded at
/// the giveback anyway: a blank one is fine.)
fn refuse_a_lost_nvram(config: &Config, geometry: Geometry) -> Result<()> {
    use crate::storage::{mailbox, ownership};
    let me = config.node_id;
    let Ok(Some(previous)) = mailbox::read(&config.aggregate_dir, me) else {
        return Ok(());
    };
    if ownership::read(&config.aggregate_dir, me)?.owner != me {
        return Ok(());
    }
    let nvram = config.nvram_path();
    let mailbox = mailbox::mailbox_path(&config.aggregate_dir, me);
    match nvlog::region::holds_no_region(&nvram, geometry)? {
        None => Ok(()),
        Some(why) => Err(Error::NvramLost {
            nvram,
            why,
            boot: previous.boot,
            mailbox,
        }),
    }
}

/// Serves the partner's volumes on the partner's NBD address after a
/// takeover, when this host can bind it.
#[derive(Debug, Default)]
struct NbdPartnerService {
    server: Mutex<Option<NbdServer>>,
}

impl PartnerService for NbdPartnerService {
    fn serve_partner(&self, node: &Arc<Node>, nbd_addr: SocketAddr) {
        let exports = Arc::new(NodeExports::new(node.clone()));
        match NbdServer::bind(nbd_addr, exports, ServerConfig::default()) {
            Ok(server) => {
                tracing::info!(%nbd_addr, "serving the partner's NBD address");
                if let Some(old) = self.server.lock().replace(server) {
                    old.shutdown();
                }
            }
            Err(error) => tracing::info!(
                %nbd_addr,
                %error,
                ours = %node.config.nbd.listen,
                "cannot bind the partner's NBD address; its volumes are served on ours"
            ),
        }
    }

    fn stop_serving_partner(&self) {
        if let Some(server) = self.server.lock().take() {
            server.shutdown();
        }
    }
}

/// One volume served by the node, as an NBD export.
#[derive(Debug)]
pub struct VolumeExport {
    node: Arc<Node>,
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
    node: Arc<Node>,
}

impl NodeExports {
    pub fn new(node: Arc<Node>) -> NodeExports {
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
    ha: Arc<HaNode>,
}

fn refusal(error: Error) -> AdminRefusal {
    let status = match error {
        Error::Refused(_) => 409,
        _ => 500,
    };
    AdminRefusal {
        status,
        message: error.to_string(),
    }
}

impl AdminHandler for NodeAdmin {
    fn status(&self) -> Status {
        self.ha.status()
    }

    fn metrics(&self) -> String {
        node_metrics(&self.ha)
    }

    fn takeover(&self, force: bool) -> Result<String, AdminRefusal> {
        let reason = if force {
            "operator: takeover --force"
        } else {
            "operator: takeover"
        };
        self.ha.takeover(force, reason).map_err(refusal)
    }

    fn giveback(&self) -> Result<String, AdminRefusal> {
        self.ha.giveback().map_err(refusal)
    }

    fn recover_forced(&self) -> Result<String, AdminRefusal> {
        self.ha.recover_forced().map_err(refusal)
    }

    fn fault(&self, name: &str, duration_ms: u64) -> Result<String, AdminRefusal> {
        match name {
            "cut-interconnect" => {
                self.ha.cut_interconnect(Duration::from_millis(duration_ms));
                Ok(format!("interconnect cut for {duration_ms} ms"))
            }
            other => Err(AdminRefusal {
                status: 400,
                message: format!("unknown fault `{other}` (known: cut-interconnect)"),
            }),
        }
    }
}

/// Run a node until SIGTERM or SIGINT, then shut it down cleanly: stop
/// serving, a final consistency point, exit.
pub fn run_node(config: Config) -> Result<()> {
    // Block the signals before any thread starts, so that every thread
    // inherits the mask and only the sigwait below sees them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block().map_err(|errno| Error::Signals {
        during: "blocking SIGTERM and SIGINT",
        errno,
    })?;
    let listen = config.nbd.listen;
    let admin_listen = config.ha.admin_listen;
    let running = RunningNode::start(config)?;
    let exports: Arc<dyn nbd::Exports> = Arc::new(NodeExports::new(running.node().clone()));
    let server = Arc::new(Mutex::new(None::<NbdServer>));
    match NbdServer::bind(listen, exports.clone(), ServerConfig::default()) {
        Ok(bound) => *server.lock() = Some(bound),
        // While this node waits for a giveback, its partner may serve this
        // very address (same host, or a floating address): bind it once the
        // partner lets it go.
        Err(error)
            if error.kind() == std::io::ErrorKind::AddrInUse
                && running.ha().role() == Role::WaitingForGiveback =>
        {
            tracing::info!(%listen, "the NBD address is in use (the partner serves it); binding it after the giveback");
            let server = server.clone();
            let node = running.node().clone();
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
                    ha: running.ha().clone(),
                }),
            )
            .map_err(|source| Error::Listen { addr, source })?,
        ),
        None => None,
    };
    let names: Vec<String> = running
        .node()
        .volumes()
        .iter()
        .map(|v| v.name.clone())
        .collect();
    tracing::info!(
        node_id = running.node().config.node_id,
        nbd = %listen,
        admin = ?admin.as_ref().map(|a| a.local_addr()),
        volumes = ?names,
        "serving"
    );
    let signal = signals.wait().map_err(|errno| Error::Signals {
        during: "waiting for SIGTERM or SIGINT",
        errno,
    })?;
    tracing::info!(?signal, "shutting down");
    if let Some(admin) = &admin {
        admin.shutdown();
    }
    if let Some(server) = server.lock().take() {
        server.shutdown();
    }
    running.shutdown()?;
    tracing::info!("clean shutdown done");
    Ok(())
}
