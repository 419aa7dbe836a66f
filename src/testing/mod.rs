//! What proves the node, never imported by it: the deterministic
//! simulation ([`sim`]), the pair of processes on this machine
//! ([`harness`]), the verifying workload ([`workload`]) and the failover
//! drills built on them ([`drill`]).

pub mod drill;
pub mod fixtures;
pub mod harness;
pub mod sim;
pub mod workload;
