//! STONITH ("shoot the other node in the head"), as Pacemaker and DRBD have
//! it: before a takeover of a partner that may still be alive, run the
//! operator's `ha.fence_command`, which powers it off, and go on only once
//! it says so.
//!
//! The owner file's fence alone stops a stale owner at its next check; a
//! node stalled *between* its check and its write (SIGSTOP, a long page
//! cache stall) would write after the survivor's replay when it wakes. A
//! powered-off node cannot.

use std::time::{Duration, Instant};

use crate::error::{Refusal, Result};
use crate::ha::hook::run_bounded;
use crate::ha::HaNode;

/// After a failed fence command, automatic takeovers wait this long before
/// running it again (the monitor retries every round).
const RETRY_AFTER: Duration = Duration::from_secs(5);

impl HaNode {
    /// Power the partner off with `ha.fence_command`, if one is configured.
    /// `force` (an operator's takeover) goes on past a failed command: the
    /// operator vouches that the partner is off.
    pub(super) fn power_fence_partner(&self, force: bool, reason: &str) -> Result<()> {
        let Some(command) = self.node.config.ha.fence_command.as_deref() else {
            return Ok(());
        };
        let partner = self.node.config.partner_id();
        let span = tracing::info_span!("stonith", partner);
        let _entered = span.enter();
        let now = self.node.environment.clock.now();
        if !force {
            let last_failure = self.state.lock().fence_command_failed.clone();
            if let Some((at, why)) = last_failure {
                if now.duration_since(at) < RETRY_AFTER {
                    return Err(Refusal::FenceCommandFailed { partner, why }.into());
                }
            }
        }
        let timeout = Duration::from_millis(self.node.config.ha.fence_timeout_ms);
        let env = [
            ("NVMIRROR_EVENT", "fence".to_owned()),
            ("NVMIRROR_PARTNER", partner.to_string()),
            (
                "NVMIRROR_PARTNER_INTERCONNECT",
                self.node.config.interconnect.partner.to_string(),
            ),
            ("NVMIRROR_REASON", reason.to_owned()),
        ];
        tracing::warn!(
            command,
            reason,
            "powering the partner off before the takeover"
        );
        let started = Instant::now();
        let end = run_bounded(command, &env, timeout);
        let elapsed_ms = started.elapsed().as_millis() as u64;
        if end.succeeded() {
            tracing::warn!(elapsed_ms, "the fence command says the partner is off");
            self.state.lock().fence_command_failed = None;
            return Ok(());
        }
        let why = format!("`{command}` {end}");
        if force {
            tracing::error!(elapsed_ms, %why, "the fence command failed; forced takeover goes on: the operator vouches the partner is off");
            return Ok(());
        }
        tracing::error!(elapsed_ms, %why, "the fence command failed: no takeover");
        self.state.lock().fence_command_failed = Some((now, why.clone()));
        Err(Refusal::FenceCommandFailed { partner, why }.into())
    }
}
