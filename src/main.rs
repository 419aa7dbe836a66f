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
    /// Start a pair on this machine, run a verifying workload through NBD,
    /// take the partner down and back, restart, verify, report.
    Demo {
        /// Directory for the pair's files (default: a fresh one under /tmp).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Seconds of mirrored workload.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Concurrent writers (NBD connections).
        #[arg(long, default_value_t = 4)]
        writers: u64,
        /// Seed of the workload's choices.
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Inspect a node's NVLog.
    Nvlog {
        #[command(subcommand)]
        command: NvlogCommand,
    },
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
            nvmirror::serve::run_node(config)?;
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
        Command::Demo {
            dir,
            seconds,
            writers,
            seed,
        } => {
            init_logging(Some("warn"));
            let dir = dir.unwrap_or_else(|| {
                std::env::temp_dir().join(format!("nvmirror-demo-{}", std::process::id()))
            });
            let seed = seed.unwrap_or_else(rand::random);
            let options = nvmirror::demo::DemoOptions {
                dir,
                seconds,
                writers,
                seed,
            };
            let (passed, report) = nvmirror::demo::run(&options)?;
            print!("{report}");
            if !passed {
                return Err(format!("the demo found a problem; replay with --seed {seed}").into());
            }
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
