//! What the tests that run the `loadgen` binary share.

use std::process::Command;

use serde_json::Value;

/// Run `loadgen ARGS`: its exit code, the JSON object on the last line of its stdout, and its
/// stderr.
pub fn run(args: &[&str]) -> (i32, Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen")).args(args).output().expect("run loadgen");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let last = stdout.lines().last().unwrap_or_default().to_string();
    let v: Value =
        serde_json::from_str(&last).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {stdout}\n{stderr}"));
    (out.status.code().unwrap_or(-1), v, stderr)
}
