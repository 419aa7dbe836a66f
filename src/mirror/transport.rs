//! Which interconnect transport the node uses: TCP, or RDMA when built
//! with the `rdma` feature. The mirror dials with it and the node listens
//! with it; the rest of the node sees only `interconnect::Transport`. The
//! simulation ([`crate::testing::sim`]) links its nodes with in-process links.

use std::net::SocketAddr;
use std::sync::Arc;

use crossbeam_channel::Sender;
use interconnect::{
    ControlEvent, MirrorReceiver, PresharedKey, SharedMemory, TcpConfig, TcpSender, Transport,
};

use crate::config::{Config, TransportKind};
use crate::error::Result;
use crate::testing::sim::SimNet;

/// How to reach the partner and how to be reached.
#[derive(Debug, Clone)]
pub enum LinkConfig {
    Tcp(TcpConfig),
    #[cfg(feature = "rdma")]
    Rdma(interconnect::RdmaConfig),
    Simulated(Arc<SimNet>),
}

impl LinkConfig {
    pub fn from_config(config: &Config) -> Result<LinkConfig> {
        let key = PresharedKey::new(config.key_bytes()?)?;
        let ic = &config.interconnect;
        match ic.transport {
            TransportKind::Tcp => {
                let mut tcp = TcpConfig::new(key);
                tcp.send_depth = ic.slots;
                tcp.heartbeat_interval_ms = ic.heartbeat_interval_ms;
                tcp.silence_timeout_ms = ic.heartbeat_timeout_ms;
                Ok(LinkConfig::Tcp(tcp))
            }
            #[cfg(feature = "rdma")]
            TransportKind::Rdma => {
                let mut rdma = interconnect::RdmaConfig::new(key);
                rdma.send_depth = ic.slots;
                rdma.heartbeat_interval_ms = ic.heartbeat_interval_ms;
                rdma.silence_timeout_ms = ic.heartbeat_timeout_ms;
                rdma.device = ic.device.clone();
                // Dial from our own interconnect address: with both devices
                // of a test pair on one host, that picks the right one.
                rdma.source_addr = Some(ic.listen.ip());
                Ok(LinkConfig::Rdma(rdma))
            }
            #[cfg(not(feature = "rdma"))]
            TransportKind::Rdma => {
                unreachable!("Config::validate refuses rdma in a build without it")
            }
        }
    }

    /// Dial the partner's receiver: a new session.
    pub fn connect(
        &self,
        partner: SocketAddr,
        local_log: SharedMemory,
        events: Sender<ControlEvent>,
    ) -> Result<Arc<dyn Transport>> {
        Ok(match self {
            LinkConfig::Tcp(tcp) => TcpSender::connect(partner, tcp, local_log, Some(events))?,
            LinkConfig::Simulated(net) => net.connect(partner, local_log, events)?,
            #[cfg(feature = "rdma")]
            LinkConfig::Rdma(rdma) => {
                interconnect::RdmaSender::connect(partner, rdma, local_log, Some(events))?
            }
        })
    }

    /// Listen for the partner, writing its log into `mirror`.
    pub fn listen(
        &self,
        addr: SocketAddr,
        mirror: SharedMemory,
        events: Sender<ControlEvent>,
    ) -> Result<Receiver> {
        Ok(match self {
            LinkConfig::Tcp(tcp) => {
                Receiver::Tcp(MirrorReceiver::bind(addr, tcp, mirror, Some(events))?)
            }
            #[cfg(feature = "rdma")]
            LinkConfig::Rdma(rdma) => Receiver::Rdma(interconnect::RdmaReceiver::bind(
                addr,
                rdma,
                mirror,
                Some(events),
            )?),
            LinkConfig::Simulated(net) => {
                net.listen(addr, mirror);
                Receiver::Simulated {
                    net: net.clone(),
                    addr,
                }
            }
        })
    }
}

/// The partner's way into our mirror.
#[derive(Debug)]
pub enum Receiver {
    Tcp(MirrorReceiver),
    #[cfg(feature = "rdma")]
    Rdma(interconnect::RdmaReceiver),
    Simulated {
        net: Arc<SimNet>,
        addr: SocketAddr,
    },
}

impl Receiver {
    /// The partner's current session, if it is connected.
    pub fn session(&self) -> Option<u64> {
        match self {
            Receiver::Tcp(receiver) => receiver.session(),
            #[cfg(feature = "rdma")]
            Receiver::Rdma(receiver) => receiver.session(),
            Receiver::Simulated { net, addr } => net.session_into(*addr),
        }
    }

    /// Stop listening and close the partner's session.
    pub fn shutdown(&mut self) {
        match self {
            Receiver::Tcp(receiver) => receiver.shutdown(),
            #[cfg(feature = "rdma")]
            Receiver::Rdma(receiver) => receiver.shutdown(),
            Receiver::Simulated { net, addr } => net.unlisten(*addr),
        }
    }
}
