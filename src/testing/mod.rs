//! What proves the node, never imported by it: the deterministic
//! simulation ([`sim`]), the pair of processes on this machine
//! ([`harness`]), the verifying workload ([`workload`]) and the failover
//! drills built on them ([`drill`]).

pub mod drill;
pub mod fixtures;
pub mod harness;
pub mod sim;
pub mod workload;

/// What the testing tools fail with: an error of the node itself, or the
/// pair misbehaving as a tool saw it. The node never returns the latter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Node(#[from] crate::Error),

    /// A drill, the simulation or the pair harness found the pair
    /// misbehaving.
    #[error("{reason}")]
    Misbehaving { reason: String },
}

pub type Result<T> = std::result::Result<T, Error>;
