//! What the node implements to answer through the admin endpoint.

use crate::ha::status::Status;

/// What the node answers through the admin endpoint.
pub trait AdminHandler: Send + Sync + std::fmt::Debug {
    /// The status document.
    fn status(&self) -> Status;
    /// Metrics in the OpenMetrics text format
    /// ([`crate::admin::metrics::node_metrics`] builds the node's).
    fn metrics(&self) -> String;
    /// Take over the partner's volumes now (`force`: even from an
    /// out-of-sync mirror, or a partner that looks alive).
    fn takeover(&self, force: bool) -> Result<String, AdminRefusal>;
    /// Hand the partner's volumes back.
    fn giveback(&self) -> Result<String, AdminRefusal>;
    /// A node handing over after an unclean stop, whose partner cannot
    /// take over: recover from its own log anyway (writes only the
    /// partner's mirror had are lost).
    fn recover_forced(&self) -> Result<String, AdminRefusal>;
    /// Fault injection for drills: e.g. name "cut-interconnect", for
    /// `duration_ms`.
    fn fault(&self, name: &str, duration_ms: u64) -> Result<String, AdminRefusal>;
}

/// A handler's "no": the HTTP status (409 when the state forbids it, 500
/// when it failed; anything outside 400..=599 is sent as 500) and a message
/// for the operator.
#[derive(Debug, Clone)]
pub struct AdminRefusal {
    pub status: u16,
    pub message: String,
}
