//! Operator commands the node runs: the hook (`ha.hook`), after a takeover
//! and a giveback, and the STONITH fence command (`ha.fence_command`),
//! before a takeover. Each runs under `sh -c` in a process group of its
//! own, bounded in time: past its limit the whole group is killed.

use std::time::{Duration, Instant};

use crate::ha::HaNode;

/// How the hook's time is bounded.
const HOOK_TIMEOUT: Duration = Duration::from_secs(30);

/// How a command run by [`run_bounded`] ended.
#[derive(Debug)]
pub(super) enum CommandEnd {
    Exited(std::process::ExitStatus),
    /// Still running at its time limit: killed (with its process group).
    TimedOut(Duration),
    CannotRun(std::io::Error),
}

impl CommandEnd {
    pub(super) fn succeeded(&self) -> bool {
        matches!(self, CommandEnd::Exited(status) if status.success())
    }
}

impl std::fmt::Display for CommandEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommandEnd::Exited(status) => write!(f, "{status}"),
            CommandEnd::TimedOut(limit) => write!(f, "still running after {limit:?}; killed"),
            CommandEnd::CannotRun(error) => write!(f, "could not be started: {error}"),
        }
    }
}

/// Run `command` with `sh -c` and `env`, for at most `timeout`.
pub(super) fn run_bounded(command: &str, env: &[(&str, String)], timeout: Duration) -> CommandEnd {
    use std::os::unix::process::CommandExt;
    let started = Instant::now();
    let child = std::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .envs(env.iter().map(|(name, value)| (name, value)))
        .process_group(0)
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(error) => return CommandEnd::CannotRun(error),
    };
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return CommandEnd::Exited(status),
            Ok(None) if started.elapsed() < timeout => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Ok(None) | Err(_) => {
                // The group too: a shell's children would outlive it.
                let group = nix::unistd::Pid::from_raw(child.id() as i32);
                let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
                let _ = child.kill();
                let _ = child.wait();
                return CommandEnd::TimedOut(timeout);
            }
        }
    }
}

impl HaNode {
    pub(super) fn run_hook(&self, event: &str, partner_nbd: &str) {
        let Some(hook) = self.node.config.ha.hook.as_deref() else {
            return;
        };
        let started = Instant::now();
        let env = [
            ("NVMIRROR_EVENT", event.to_owned()),
            (
                "NVMIRROR_PARTNER",
                self.node.config.partner_id().to_string(),
            ),
            ("NVMIRROR_PARTNER_NBD", partner_nbd.to_owned()),
        ];
        let end = run_bounded(hook, &env, HOOK_TIMEOUT);
        let elapsed_ms = started.elapsed().as_millis() as u64;
        if end.succeeded() {
            tracing::info!(hook, event, elapsed_ms, "hook ran");
        } else {
            tracing::error!(hook, event, elapsed_ms, end = %end, "hook failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_past_its_time_limit_is_killed_with_its_children() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("survived");
        let command = format!("(sleep 1; touch {}) & sleep 30", marker.display());
        let started = Instant::now();
        let end = run_bounded(&command, &[], Duration::from_millis(200));
        assert!(matches!(end, CommandEnd::TimedOut(_)), "{end}");
        assert!(started.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(1500));
        assert!(!marker.exists(), "a child of the killed command lived on");
    }

    #[test]
    fn the_exit_status_and_environment_reach_the_caller() {
        let end = run_bounded(
            "test \"$NVMIRROR_PARTNER\" = 2 && exit 3",
            &[("NVMIRROR_PARTNER", "2".to_owned())],
            Duration::from_secs(10),
        );
        assert!(!end.succeeded());
        assert_eq!(end.to_string(), "exit status: 3");
        assert!(run_bounded("true", &[], Duration::from_secs(10)).succeeded());
    }
}
