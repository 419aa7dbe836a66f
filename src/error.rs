//! The storage node's error type.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),

    #[error(transparent)]
    Log(#[from] nvlog::Error),

    #[error(transparent)]
    Interconnect(#[from] interconnect::Error),

    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "volume file {path} holds {actual_bytes} bytes but the volume is configured with \
         {configured_bytes}; fix the size in the config (resizing is not automatic)"
    )]
    VolumeSizeMismatch {
        path: PathBuf,
        configured_bytes: u64,
        actual_bytes: u64,
    },

    #[error("{path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },

    #[error(
        "fenced: node {volumes_of}'s volumes belong to another node now (this node held them at \
         epoch {epoch}); it no longer writes or acknowledges writes to them"
    )]
    Fenced { volumes_of: u32, epoch: u64 },

    #[error("refused: {reason}")]
    Refused { reason: String },

    #[error("no volume `{name}` is served here")]
    NoSuchVolume { name: String },

    #[error("request {offset}+{len} is outside volume `{volume}` of {size_bytes} bytes")]
    OutOfRange {
        volume: String,
        offset: u64,
        len: u64,
        size_bytes: u64,
    },

    #[error("the node has stopped accepting writes: {reason}")]
    Failed { reason: String },

    #[error("cannot listen on {addr}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
