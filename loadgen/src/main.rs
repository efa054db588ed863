//! `loadgen`: the nullpunch load generator.

mod audio;
mod calls;
mod cli;
mod cluster;
mod error;
mod fleet;
mod hostile;
mod interrupt;
mod plan;
mod register;
mod scenario;
mod summary;
mod sys;
mod target;
mod threshold;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command};
use error::Error;

fn main() -> ExitCode {
    engine::sys::init_logging("warn");
    let command = match Cli::parse().command() {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    interrupt::watch();
    let (result, json, thresholds) = match command {
        Command::Run(run) => (scenario::run(&run), run.output.json, run.output.thresholds.clone()),
        Command::Report { dir, json } => (summary::runs::report(&dir), json, Vec::new()),
        Command::Merge { out, runs, json } => (summary::runs::merge(&runs, &out), json, Vec::new()),
    };
    match result {
        Ok(mut summary) => {
            let passed = judge(&mut summary, &thresholds, json);
            // The summary first: files that cannot be written must not cost it.
            if let Err(e) = summary.print_then_write(json) {
                return fail(&e);
            }
            if interrupt::interrupted() {
                ExitCode::from(interrupt::EXIT_INTERRUPTED)
            } else if summary.all_ok && passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e @ Error::Interrupted(_)) => {
            eprintln!("loadgen: {e}");
            ExitCode::from(interrupt::EXIT_INTERRUPTED)
        }
        Err(e) => fail(&e),
    }
}

/// Check `thresholds` against the summary: the verdicts go into its JSON (`thresholds`) and
/// its text (and, with `json`, where stdout holds only the JSON, on stderr). False if one
/// failed, or if there are thresholds and the generator could not keep to its plan.
fn judge(summary: &mut summary::Summary, thresholds: &[threshold::Threshold], json: bool) -> bool {
    if thresholds.is_empty() {
        return true;
    }
    let verdicts = threshold::check(thresholds, &summary.json);
    let overloaded = summary.json["generator_overloaded"].as_bool().unwrap_or(false);
    let mut lines: Vec<String> = verdicts.iter().map(|v| threshold::describe(v, &summary.json)).collect();
    if overloaded {
        lines.push("thresholds FAILED: the generator could not keep to its plan (generator_overloaded)".into());
    }
    let passed = verdicts.iter().all(|v| v.ok) && !overloaded;
    let verdicts_json = serde_json::json!({
        "passed": passed,
        "checks": verdicts.iter().map(|v| serde_json::json!({
            "threshold": v.threshold.to_string(),
            "value": v.actual,
            "ok": v.ok,
        })).collect::<Vec<_>>(),
    });
    // In what is printed and in what --out writes.
    if let Some(record) = summary.record.as_mut() {
        record.summary["thresholds"] = verdicts_json.clone();
    }
    summary.json["thresholds"] = verdicts_json;
    for l in &lines {
        if json {
            eprintln!("loadgen: {l}");
        }
        summary.text.push_str(l);
        summary.text.push('\n');
    }
    passed
}

/// Report `e` on stderr; exit status 2.
fn fail(e: &Error) -> ExitCode {
    match e {
        Error::IncompleteExternalManager => eprintln!("loadgen hostile: {e}"),
        _ => eprintln!("loadgen: {e}"),
    }
    ExitCode::from(2)
}
