//! `nvmirror node`: run one node in the foreground until SIGTERM or SIGINT.

use std::sync::Arc;

use nix::sys::signal::{SigSet, Signal};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::nbd::{Errno, Export, ExportError, Exports, NbdServer, ServerConfig};
use crate::node::{Node, NodeInner};

/// One of the node's volumes as an NBD export.
#[derive(Debug)]
pub struct VolumeExport {
    node: Arc<NodeInner>,
    index: usize,
}

fn export_error(error: Error) -> ExportError {
    let errno = match &error {
        Error::OutOfRange { .. } => Errno::Inval,
        Error::Failed { .. } => Errno::Io,
        _ => Errno::Io,
    };
    ExportError::new(errno, error.to_string())
}

impl Export for VolumeExport {
    fn size_bytes(&self) -> u64 {
        self.node.volume(self.index).size_bytes
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        self.node
            .read(self.index, offset, buf)
            .map_err(export_error)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ExportError> {
        self.node
            .write(self.index, offset, data, fua)
            .map_err(export_error)
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        self.node
            .write_zeroes(self.index, offset, len, false, fua)
            .map_err(export_error)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        self.node
            .write_zeroes(self.index, offset, len, true, fua)
            .map_err(export_error)
    }

    fn flush(&self) -> Result<(), ExportError> {
        self.node.flush().map_err(export_error)
    }
}

/// The volumes a node serves, by name.
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
        let index = self.node.volume_index(name)?;
        Some(Arc::new(VolumeExport {
            node: self.node.clone(),
            index,
        }))
    }

    fn names(&self) -> Vec<String> {
        self.node
            .volumes
            .iter()
            .map(|volume| volume.name.clone())
            .collect()
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
    signals.thread_block().map_err(|errno| Error::Failed {
        reason: format!("cannot block SIGTERM/SIGINT: {errno}"),
    })?;
    let listen = config.nbd.listen;
    let node = Node::start(config)?;
    let exports = Arc::new(NodeExports::new(node.inner().clone()));
    let server = NbdServer::bind(listen, exports, ServerConfig::default()).map_err(|source| {
        Error::Listen {
            addr: listen,
            source,
        }
    })?;
    let names: Vec<String> = node
        .inner()
        .volumes
        .iter()
        .map(|v| v.name.clone())
        .collect();
    tracing::info!(
        node_id = node.inner().config.node_id,
        nbd = %server.local_addr(),
        volumes = ?names,
        "serving"
    );
    let signal = signals.wait().map_err(|errno| Error::Failed {
        reason: format!("waiting for a signal failed: {errno}"),
    })?;
    tracing::info!(?signal, "shutting down");
    server.shutdown();
    node.shutdown()?;
    tracing::info!("clean shutdown done");
    Ok(())
}
