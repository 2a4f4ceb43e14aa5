//! ruyi-bench: load and correctness in the same run.
//!
//! The `chat` scenario runs N one-to-one conversations: sender i writes to
//! receiver i, keeping `window` sends in flight, for the run's duration.
//! The `group` scenario fans out: S senders per group, every online member
//! receiving. Every acknowledged message must reach each of its receiving
//! devices exactly once and in seq order; the report counts `lost`,
//! `duplicated`, `reordered` and `unexpected` in Jepsen's sense and the run
//! exits non-zero when any is not 0.
//!
//! Load is generated the way the gateway serves it: one glommio executor
//! per core, each driving its share of connections with the SDK's
//! runtime-free `ClientCore`. `run FILE.toml` reads a scenario and its
//! parameters (named as the flags) from a file.

mod budget;
mod chat;
mod classify;
mod common;
mod connect;
mod group;
mod live;
mod mixed;
mod pacer;
mod peer;
mod plot;
mod process;
mod report;
mod sink;
mod wk;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
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
    /// Fan-out: groups created over the admin API, some members sending,
    /// every online member receiving.
    Group(group::GroupArgs),
    /// A connection storm, then N idle connections held.
    Connect(connect::ConnectArgs),
    /// Everything at once: one-to-one conversations, group fan-out and
    /// idle connections against the same server.
    Mixed(mixed::MixedArgs),
    /// A null server speaking ruyi's protocol (acks, pushes, stores
    /// nothing): run `chat` against it for the load generator's ceiling.
    Sink(sink::SinkArgs),
    /// A scenario described in a TOML file: `scenario = "chat" | "group" |
    /// "mixed" | "connect"` and its parameters, named as the flags (`duration_s` or
    /// `duration-s`).
    Run {
        /// The scenario file.
        file: PathBuf,
    },
}

fn write_json(path: Option<&Path>, json: &serde_json::Value) -> bool {
    let Some(path) = path else {
        return true;
    };
    match std::fs::write(path, format!("{json:#}\n")) {
        Ok(()) => true,
        Err(error) => {
            eprintln!("ruyi-bench: cannot write {}: {error}", path.display());
            false
        }
    }
}

fn finish(report: &report::Report, json: Option<&Path>, plot: Option<&Path>) -> bool {
    report.print_summary();
    let mut ok = write_json(json, &report.to_json());
    if let Some(path) = plot {
        if let Err(error) = plot::draw(report, path) {
            eprintln!("ruyi-bench: cannot draw {}: {error:#}", path.display());
            ok = false;
        }
    }
    ok && report.correct()
}

fn execute(scenario: Scenario) -> ExitCode {
    let outcome: anyhow::Result<bool> = match scenario {
        Scenario::Chat(args) => chat::run(&args).map(|report| {
            finish(
                &report,
                args.common.json.as_deref(),
                args.common.plot.as_deref(),
            )
        }),
        Scenario::Group(args) => group::run(&args).map(|report| {
            finish(
                &report,
                args.common.json.as_deref(),
                args.common.plot.as_deref(),
            )
        }),
        Scenario::Mixed(args) => mixed::run(&args),
        Scenario::Sink(args) => sink::run(&args).map(|()| true),
        Scenario::Connect(args) => {
            connect::run(&args).map(|report| write_json(args.json.as_deref(), &report))
        }
        Scenario::Run { file } => match scenario_from_file(&file) {
            Ok(Scenario::Run { .. }) => Err(anyhow::anyhow!(
                "{}: a scenario file cannot name `run`",
                file.display()
            )),
            Ok(scenario) => return execute(scenario),
            Err(error) => Err(error),
        },
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("ruyi-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Turns a scenario file into the command line it stands for, so a file
/// takes exactly the flags' names, defaults and checks.
fn scenario_from_file(file: &Path) -> anyhow::Result<Scenario> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    let Some(toml::Value::String(name)) = table.get("scenario") else {
        bail!(
            "{}: `scenario = \"chat\"` (or \"group\", \"mixed\", \"connect\") is required",
            file.display()
        );
    };
    let mut argv = vec!["ruyi-bench".to_owned(), name.clone()];
    for (key, value) in &table {
        if key == "scenario" {
            continue;
        }
        let flag = format!("--{}", key.replace('_', "-"));
        match value {
            toml::Value::String(s) => argv.extend([flag, s.clone()]),
            toml::Value::Integer(i) => argv.extend([flag, i.to_string()]),
            toml::Value::Float(f) => argv.extend([flag, f.to_string()]),
            toml::Value::Boolean(true) => argv.push(flag),
            toml::Value::Boolean(false) => {}
            other => bail!(
                "{}: `{key}` is a {}; parameters are strings, numbers or booleans",
                file.display(),
                other.type_str()
            ),
        }
    }
    let cli = Cli::try_parse_from(&argv).map_err(|error| {
        anyhow::anyhow!(
            "{}: {}",
            file.display(),
            error.render().to_string().trim_end()
        )
    })?;
    Ok(cli.scenario)
}

fn main() -> ExitCode {
    execute(Cli::parse().scenario)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(name: &str, text: &str) -> anyhow::Result<Scenario> {
        let path =
            std::env::temp_dir().join(format!("ruyi-bench-{}-{name}.toml", std::process::id()));
        std::fs::write(&path, text)?;
        let scenario = scenario_from_file(&path);
        let _ = std::fs::remove_file(&path);
        scenario
    }

    #[test]
    fn a_file_takes_the_flags_names() {
        let scenario = parse(
            "group",
            "scenario = \"group\"\ngroups = 3\nsenders-per-group = 2\nonline_percent = 25.5\n\
             api_token = \"t\"\nduration_s = 2\n",
        )
        .expect("a valid file");
        let Scenario::Group(args) = scenario else {
            panic!("not a group scenario: {scenario:?}");
        };
        assert_eq!(args.groups, 3);
        assert_eq!(args.senders_per_group, 2);
        assert_eq!(args.online_percent, 25.5);
        assert_eq!(args.api.api_token, "t");
        assert_eq!(args.common.duration_s, 2.0);
        assert_eq!(args.members, 100, "defaults as the flags'");
    }

    #[test]
    fn a_bad_file_is_refused_with_its_name() {
        let error = parse("typo", "scenario = \"chat\"\npairz = 3\n").unwrap_err();
        assert!(format!("{error:#}").contains("pairz"), "{error:#}");
        assert!(parse("none", "pairs = 3\n").is_err());
        // `run` takes its file as an argument, not a parameter.
        assert!(parse("nested", "scenario = \"run\"\nfile = \"x\"\n").is_err());
    }

    #[test]
    fn the_committed_examples_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        for name in [
            "chat-durable.toml",
            "chat-chaos.toml",
            "group-100.toml",
            "connect-10k.toml",
            "mixed.toml",
        ] {
            scenario_from_file(&dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        }
    }
}
