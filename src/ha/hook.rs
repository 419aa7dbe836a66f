//! The operator's hook (`ha.hook`), run after a takeover and a giveback,
//! bounded in time.

use std::time::{Duration, Instant};

use crate::ha::HaNode;

impl HaNode {
    pub(super) fn run_hook(&self, event: &str, partner_nbd: &str) {
        let Some(hook) = self.node.config.ha.hook.as_deref() else {
            return;
        };
        let started = Instant::now();
        let child = std::process::Command::new("sh")
            .arg("-c")
            .arg(hook)
            .env("NVMIRROR_EVENT", event)
            .env(
                "NVMIRROR_PARTNER",
                self.node.config.partner_id().to_string(),
            )
            .env("NVMIRROR_PARTNER_NBD", partner_nbd)
            .spawn();
        let mut child = match child {
            Ok(child) => child,
            Err(error) => {
                tracing::error!(hook, event, %error, "cannot run the hook");
                return;
            }
        };
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    tracing::info!(hook, event, %status, elapsed_ms = started.elapsed().as_millis() as u64, "hook ran");
                    return;
                }
                Ok(None) if started.elapsed() < Duration::from_secs(30) => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    tracing::error!(hook, event, "hook did not finish within 30 s; killed");
                    return;
                }
            }
        }
    }
}
