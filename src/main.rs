use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nvmirror::config::Config;
use nvmirror::inspect::{self, LogArea};

/// Synchronous storage mirroring for an HA pair.
#[derive(Debug, Parser)]
#[command(name = "nvmirror", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one node in the foreground; SIGTERM or SIGINT stops it cleanly.
    Node {
        /// The node's TOML configuration.
        #[arg(long)]
        config: PathBuf,
    },
    /// Check a configuration file and say what is wrong with it, if anything.
    CheckConfig {
        /// The node's TOML configuration.
        config: PathBuf,
    },
    /// Failover drill: a pair on this machine, a verifying workload, and
    /// faults on the owner (kill -9, SIGSTOP, interconnect cut), takeover,
    /// verification, giveback, again; a report. Exits non-zero if an
    /// acknowledged write is lost.
    Drill {
        /// Directory for the pair's files (default: a fresh one under /tmp).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Fault cycles.
        #[arg(long, default_value_t = 6)]
        cycles: u32,
        /// Start no new cycle after this many seconds.
        #[arg(long)]
        duration: Option<u64>,
        /// Faults to choose from: kill9, sigstop, cut (comma-separated).
        #[arg(long, default_value = "kill9,sigstop,cut", value_delimiter = ',')]
        faults: Vec<String>,
        /// Concurrent writers (NBD connections).
        #[arg(long, default_value_t = 3)]
        writers: u64,
        /// Seed of the drill's choices (which fault, when); printed in the report.
        #[arg(long)]
        seed: Option<u64>,
        /// Interconnect transport.
        #[arg(long, default_value = "tcp")]
        transport: String,
        /// Also measure takeover timings with the log 1 %, 50 % and 100 % full.
        #[arg(long)]
        profile_takeover: bool,
        /// Log half sizes of the takeover profile, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "8MiB", value_parser = parse_byte_size)]
        profile_halves: Vec<u64>,
    },
    /// Deterministic simulation of the pair with fault injection: two real
    /// nodes on simulated time, NVRAM, disks and interconnect, every read
    /// checked. A failing seed is printed with the command that replays it.
    Sim {
        /// The first seed (default: a random one, printed).
        #[arg(long)]
        seed: Option<u64>,
        /// Seeds to run, from --seed on.
        #[arg(long, default_value_t = 1)]
        seeds: u64,
        /// Run seeds until stopped (a soak), from --seed on.
        #[arg(long, conflicts_with = "seeds")]
        soak: bool,
        /// Scheduler steps per seed.
        #[arg(long, default_value_t = 3000)]
        steps: u64,
        /// A deliberately broken node, to see the simulation catch it.
        #[arg(long, value_enum)]
        inject_bug: Option<BugArg>,
    },
    /// Show what a node says about the pair: states, mirror, ownership, log.
    Status {
        #[command(flatten)]
        target: AdminTarget,
        /// Print the raw JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Ask a node to take over its partner's volumes now.
    Takeover {
        #[command(flatten)]
        target: AdminTarget,
        /// Even from an out-of-sync mirror (writes the mirror lacks are
        /// lost), and past a failed `ha.fence_command` (you vouch that the
        /// partner is off).
        #[arg(long)]
        force: bool,
    },
    /// Ask the node holding its partner's volumes to hand them back.
    Giveback {
        #[command(flatten)]
        target: AdminTarget,
    },
    /// A node handing over after an unclean stop whose partner cannot take
    /// over (it is down, or restarted too): recover from its own log.
    Recover {
        #[command(flatten)]
        target: AdminTarget,
        /// Required: writes the node acknowledged that its log lacks (only
        /// the partner's mirror had them) are lost.
        #[arg(long)]
        force: bool,
    },
    /// Inspect a node's NVLog.
    Nvlog {
        #[command(subcommand)]
        command: NvlogCommand,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum BugArg {
    /// Acknowledge writes before the mirror has them.
    AckBeforePlaced,
    /// Never notice a takeover: keep writing the volume files.
    SkipEpochCheck,
}

/// Which node's admin endpoint to talk to.
#[derive(Debug, clap::Args)]
struct AdminTarget {
    /// The node's config (its `ha.admin_listen`).
    #[arg(long, conflicts_with = "admin")]
    config: Option<PathBuf>,
    /// The admin endpoint's address.
    #[arg(long)]
    admin: Option<std::net::SocketAddr>,
}

impl AdminTarget {
    fn address(&self) -> Result<std::net::SocketAddr, Box<dyn std::error::Error>> {
        if let Some(addr) = self.admin {
            return Ok(addr);
        }
        let Some(path) = &self.config else {
            return Err("say which node: --config FILE or --admin ADDRESS".into());
        };
        let config = Config::load(path)?;
        config.ha.admin_listen.ok_or_else(|| {
            format!(
                "{} has no ha.admin_listen: the node has no admin endpoint",
                path.display()
            )
            .into()
        })
    }
}

const ADMIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

fn admin_action(
    target: &AdminTarget,
    action: &str,
    path: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let (status, body) = nvmirror::admin::request(target.address()?, "POST", path, ADMIN_TIMEOUT)?;
    print!("{}", nvmirror::admin::render_action(action, status, &body));
    if status != 200 {
        return Err(format!("{action} refused").into());
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
enum NvlogCommand {
    /// List the header and records of the local log or the partner mirror
    /// in an NVRAM file.
    Dump {
        /// The node's NVRAM file.
        file: PathBuf,
        /// Which log to read.
        #[arg(long, value_enum, default_value = "local")]
        area: LogArea,
        /// Records to list at most.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
}

fn init_logging(level: Option<&str>) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level.unwrap_or("info")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    match cli.command {
        Command::Node { config } => {
            let config = Config::load(&config)?;
            init_logging(config.log_level.as_deref());
            nvmirror::daemon::run_node(config)?;
        }
        Command::CheckConfig { config } => {
            let config = Config::load(&config)?;
            println!(
                "config OK: node {}, {} volume(s), NBD on {}, partner at {}",
                config.node_id,
                config.volumes.len(),
                config.nbd.listen,
                config.interconnect.partner
            );
        }
        Command::Drill {
            dir,
            cycles,
            duration,
            faults,
            writers,
            seed,
            transport,
            profile_takeover,
            profile_halves,
        } => {
            init_logging(Some("warn"));
            let faults = faults
                .iter()
                .map(|name| {
                    nvmirror::testing::drill::Fault::parse(name).ok_or_else(|| {
                        format!("unknown fault `{name}` (known: kill9, sigstop, cut)")
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            if faults.is_empty() {
                return Err("name at least one fault".into());
            }
            let dir = dir.unwrap_or_else(|| {
                std::env::temp_dir().join(format!("nvmirror-drill-{}", std::process::id()))
            });
            let seed = seed.unwrap_or_else(rand::random);
            let options = nvmirror::testing::drill::DrillOptions {
                dir,
                cycles,
                duration: duration.map(std::time::Duration::from_secs),
                seed,
                faults,
                writers,
                transport,
                profile_takeover,
                profile_halves,
            };
            let (passed, report) = nvmirror::testing::drill::run(&options)?;
            print!("{report}");
            if !passed {
                return Err(format!(
                    "the drill found lost or wrong data; replay with --seed {seed}"
                )
                .into());
            }
        }
        Command::Sim {
            seed,
            seeds,
            soak,
            steps,
            inject_bug,
        } => {
            init_logging(Some("off"));
            let first = seed.unwrap_or_else(rand::random);
            let bug = inject_bug.map(|bug| match bug {
                BugArg::AckBeforePlaced => nvmirror::testing::sim::InjectedBug::AckBeforePlaced,
                BugArg::SkipEpochCheck => nvmirror::testing::sim::InjectedBug::SkipEpochCheck,
            });
            let count = if soak { u64::MAX } else { seeds };
            let started = std::time::Instant::now();
            for seed in (0..count).map(|i| first.wrapping_add(i)) {
                let options = nvmirror::testing::sim::SimOptions { seed, steps, bug };
                match nvmirror::testing::sim::run(&options) {
                    Ok(report) => println!("ok   {report}"),
                    Err(failure) => {
                        println!("FAIL {failure}");
                        return Err(format!(
                            "seed {seed} failed; replay: {}",
                            options.replay_command()
                        )
                        .into());
                    }
                }
            }
            println!(
                "{} seed(s) from {first} passed in {:.1} s",
                seeds,
                started.elapsed().as_secs_f64()
            );
        }
        Command::Status { target, json } => {
            let (status, body) =
                nvmirror::admin::request(target.address()?, "GET", "/status", ADMIN_TIMEOUT)?;
            if status != 200 {
                return Err(format!("status: HTTP {status}: {body}").into());
            }
            if json {
                print!("{body}");
            } else {
                let document = nvmirror::admin::render::parse_status(&body)?;
                print!("{}", nvmirror::admin::render_status(&document));
            }
        }
        Command::Takeover { target, force } => {
            if force {
                eprintln!(
                    "warning: a forced takeover uses the partner's mirror even if it is out of sync \
                     (writes the partner acknowledged after the mirror fell behind are lost), and \
                     goes on if the fence command cannot power the partner off (make sure it is off)"
                );
            }
            admin_action(
                &target,
                "takeover",
                if force {
                    "/takeover?force=true"
                } else {
                    "/takeover"
                },
            )?;
        }
        Command::Giveback { target } => admin_action(&target, "giveback", "/giveback")?,
        Command::Recover { target, force } => {
            if !force {
                return Err(
                    "recover needs --force: the node's own log may lack writes it \
                            acknowledged, and those are lost"
                        .into(),
                );
            }
            admin_action(&target, "recover", "/recover?force=true")?;
        }
        Command::Nvlog {
            command: NvlogCommand::Dump { file, area, limit },
        } => {
            init_logging(Some("warn"));
            print!("{}", inspect::dump(&file, area, limit)?);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("nvmirror: {error}");
            let mut source = error.source();
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            ExitCode::FAILURE
        }
    }
}

/// A size such as `512MiB` (the config's syntax), for the CLI.
fn parse_byte_size(text: &str) -> Result<u64, String> {
    nvmirror::config::parse_size(text)
}
