use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
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

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Nvlog {
            command: NvlogCommand::Dump { file, area, limit },
        } => inspect::dump(&file, area, limit).map(|listing| print!("{listing}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("nvmirror: {error}");
            let mut source = std::error::Error::source(&error);
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            ExitCode::FAILURE
        }
    }
}
