//! The `wsgate` binary: parses flags and `WSGATE_*` env vars, then either checks a config file
//! (`wsgate check-config FILE`) or runs a gateway node until SIGTERM/SIGINT.
//!
//! Exit codes: 0 clean exit / config ok; 1 the node failed, or its settings are invalid;
//! 2 `check-config` found problems (clap's own usage errors also exit 2).

use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use wsgate::config::cli::{check_config, resolve, summary, LogFormat};
use wsgate::config::{Cli, Command, RunArgs};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::CheckConfig { file }) => check(file),
        None => run(&cli.run),
    }
}

/// `wsgate check-config FILE`: "FILE: ok" plus a summary on stdout, or every problem on stderr.
fn check(file: &Path) -> ExitCode {
    let name = file.display();
    match check_config(file) {
        Ok(settings) => {
            println!("{name}: ok");
            for line in summary(&settings).lines() {
                println!("  {line}");
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            for problem in err.problems() {
                eprintln!("{name}: {problem}");
            }
            ExitCode::from(2)
        }
    }
}

fn run(args: &RunArgs) -> ExitCode {
    let filter = match EnvFilter::try_new(&args.log) {
        Ok(filter) => filter,
        Err(err) => {
            eprintln!(
                "wsgate: invalid --log / WSGATE_LOG filter {:?}: {err}",
                args.log
            );
            return ExitCode::FAILURE;
        }
    };
    // Both formats carry the same fields; credentials never reach them (tokens, API keys and
    // Redis passwords are `Secret`s or redacted URLs wherever they could be logged).
    match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_env_filter(filter)
            .init(),
    }

    let settings = match resolve(args) {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("wsgate: {err}");
            return ExitCode::FAILURE;
        }
    };
    for line in summary(&settings).lines() {
        tracing::info!("{line}");
    }

    let options = args.runtime_options();
    let runtime = match wsgate::runtime::build(options) {
        Ok(runtime) => {
            tracing::info!(
                worker_threads = runtime.metrics().num_workers(),
                pinned = options.pin_workers,
                "tokio runtime"
            );
            runtime
        }
        Err(err) => {
            eprintln!("wsgate: cannot start the tokio runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(wsgate::node::run_until_signal(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "wsgate stopped");
            eprintln!("wsgate: {err}");
            ExitCode::FAILURE
        }
    }
}
