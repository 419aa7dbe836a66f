//! How the node reaches its partner: an [`Interconnect`] dials the
//! partner's receiver (the mirror writes through it) and listens for the
//! partner (a [`MirrorListener`] that writes the partner's log into our
//! mirror). A running node uses the network ([`NetworkInterconnect`]: TCP,
//! or RDMA when built with the `rdma` feature); the rest of the node sees
//! only these traits and `interconnect::Transport`.

use std::fmt::Debug;
use std::net::SocketAddr;
use std::sync::Arc;

use crossbeam_channel::Sender;
use interconnect::{
    ControlEvent, MirrorReceiver, PresharedKey, SharedMemory, TcpConfig, TcpSender, Transport,
};

use crate::config::{Config, TransportKind};
use crate::error::Result;

/// Dials the partner and listens for it.
pub trait Interconnect: Send + Sync + Debug {
    /// Dial the partner's receiver: a new session reading `local_log`.
    fn connect(
        &self,
        partner: SocketAddr,
        local_log: SharedMemory,
        events: Sender<ControlEvent>,
    ) -> Result<Arc<dyn Transport>>;

    /// Listen for the partner at `addr`, writing its log into `mirror`.
    fn listen(
        &self,
        addr: SocketAddr,
        mirror: SharedMemory,
        events: Sender<ControlEvent>,
    ) -> Result<Box<dyn MirrorListener>>;
}

/// The partner's way into our mirror.
pub trait MirrorListener: Send + Debug {
    /// The partner's current session, if it is connected.
    fn session(&self) -> Option<u64>;
    /// Stop listening and close the partner's session.
    fn shutdown(&mut self);
}

/// The interconnect over the network, as the config says.
#[derive(Debug, Clone)]
pub enum NetworkInterconnect {
    Tcp(TcpConfig),
    #[cfg(feature = "rdma")]
    Rdma(interconnect::RdmaConfig),
}

impl NetworkInterconnect {
    pub fn from_config(config: &Config) -> Result<NetworkInterconnect> {
        let key = PresharedKey::new(config.key_bytes()?)?;
        let ic = &config.interconnect;
        match ic.transport {
            TransportKind::Tcp => {
                let mut tcp = TcpConfig::new(key);
                tcp.send_depth = ic.slots;
                tcp.timers.heartbeat_interval_ms = ic.heartbeat_interval_ms;
                tcp.timers.silence_timeout_ms = ic.heartbeat_timeout_ms;
                Ok(NetworkInterconnect::Tcp(tcp))
            }
            #[cfg(feature = "rdma")]
            TransportKind::Rdma => {
                let mut rdma = interconnect::RdmaConfig::new(key);
                rdma.send_depth = ic.slots;
                rdma.timers.heartbeat_interval_ms = ic.heartbeat_interval_ms;
                rdma.timers.silence_timeout_ms = ic.heartbeat_timeout_ms;
                rdma.device = ic.device.clone();
                // Dial from our own interconnect address: with both devices
                // of a test pair on one host, that picks the right one.
                rdma.source_addr = Some(ic.listen.ip());
                Ok(NetworkInterconnect::Rdma(rdma))
            }
            #[cfg(not(feature = "rdma"))]
            TransportKind::Rdma => {
                unreachable!("Config::validate refuses rdma in a build without it")
            }
        }
    }
}

impl Interconnect for NetworkInterconnect {
    fn connect(
        &self,
        partner: SocketAddr,
        local_log: SharedMemory,
        events: Sender<ControlEvent>,
    ) -> Result<Arc<dyn Transport>> {
        Ok(match self {
            NetworkInterconnect::Tcp(tcp) => {
                TcpSender::connect(partner, tcp, local_log, Some(events))?
            }
            #[cfg(feature = "rdma")]
            NetworkInterconnect::Rdma(rdma) => {
                interconnect::RdmaSender::connect(partner, rdma, local_log, Some(events))?
            }
        })
    }

    fn listen(
        &self,
        addr: SocketAddr,
        mirror: SharedMemory,
        events: Sender<ControlEvent>,
    ) -> Result<Box<dyn MirrorListener>> {
        Ok(match self {
            NetworkInterconnect::Tcp(tcp) => {
                Box::new(MirrorReceiver::bind(addr, tcp, mirror, Some(events))?)
            }
            #[cfg(feature = "rdma")]
            NetworkInterconnect::Rdma(rdma) => Box::new(interconnect::RdmaReceiver::bind(
                addr,
                rdma,
                mirror,
                Some(events),
            )?),
        })
    }
}

impl MirrorListener for MirrorReceiver {
    fn session(&self) -> Option<u64> {
        MirrorReceiver::session(self)
    }

    fn shutdown(&mut self) {
        MirrorReceiver::shutdown(self)
    }
}

#[cfg(feature = "rdma")]
impl MirrorListener for interconnect::RdmaReceiver {
    fn session(&self) -> Option<u64> {
        interconnect::RdmaReceiver::session(self)
    }

    fn shutdown(&mut self) {
        interconnect::RdmaReceiver::shutdown(self)
    }
}
