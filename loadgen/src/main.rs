//! `loadgen`: the nullpunch load generator.

mod audio;
mod calls;
mod cli;
mod error;
mod fleet;
mod hostile;
mod register;
mod scenario;
mod summary;
mod sys;
mod target;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command};
use error::Error;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let command = match Cli::parse().command() {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let (result, json) = match command {
        Command::Run(run) => (scenario::run(&run), run.output.json),
        Command::Report { dir, json } => (summary::runs::report(&dir), json),
        Command::Merge { out, runs, json } => (summary::runs::merge(&runs, &out), json),
    };
    match result {
        Ok(summary) => {
            // The summary first: files that cannot be written must not cost it.
            if let Err(e) = summary.print_then_write(json) {
                return fail(&e);
            }
            if summary.all_ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => fail(&e),
    }
}

/// Report `e` on stderr; exit status 2.
fn fail(e: &Error) -> ExitCode {
    match e {
        Error::IncompleteExternalManager => eprintln!("loadgen hostile: {e}"),
        _ => eprintln!("loadgen: {e}"),
    }
    ExitCode::from(2)
}
