//! ruyi-bench: load and correctness in the same run.
//!
//! The `chat` scenario runs N one-to-one conversations: sender i writes to
//! receiver i, keeping `window` sends in flight, for the run's duration.
//! Every acknowledged message must reach its receiver exactly once and in
//! seq order; the report counts `lost`, `duplicated` and `reordered` in
//! Jepsen's sense and the run exits non-zero when any is not 0.
//!
//! Load is generated the way the gateway serves it: one glommio executor
//! per core, each driving its share of connections with the SDK's
//! runtime-free `ClientCore`.

mod chat;
mod connect;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(name = "ruyi-bench", about = "Load and correctness for ruyi")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Many one-to-one conversations, senders keeping a window in flight.
    Chat(chat::ChatArgs),
    /// A connection storm, then N idle connections held.
    Connect(connect::ConnectArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.scenario {
        Scenario::Chat(args) => match chat::run(&args) {
            Ok(report) => {
                report.print_summary();
                if let Some(path) = &args.json {
                    if let Err(error) = std::fs::write(path, report.to_json().to_string()) {
                        eprintln!("ruyi-bench: cannot write {}: {error}", path.display());
                        return ExitCode::FAILURE;
                    }
                }
                if report.correct() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(error) => {
                eprintln!("ruyi-bench: {error:#}");
                ExitCode::FAILURE
            }
        },
        Scenario::Connect(args) => match connect::run(&args) {
            Ok(report) => {
                if let Some(path) = &args.json {
                    if let Err(error) = std::fs::write(path, report.to_string()) {
                        eprintln!("ruyi-bench: cannot write {}: {error}", path.display());
                        return ExitCode::FAILURE;
                    }
                }
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("ruyi-bench: {error:#}");
                ExitCode::FAILURE
            }
        },
    }
}
