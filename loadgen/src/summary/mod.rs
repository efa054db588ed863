//! What a run reports: the summary printed at its end (one JSON object or a text report),
//! built per scenario from what it measured (`calls`, `register`, `audio`, `hostile`); the
//! histograms behind it (`hist`, named in `metric`); the files `--out` records (`files`),
//! which `loadgen report` and `loadgen merge` read back (`runs`).
//!
//! The JSON field names are an interface: `results/`, the tests and the scripts read them.

pub mod audio;
pub mod calls;
pub mod files;
pub mod hist;
pub mod hostile;
pub mod metric;
pub mod register;
pub mod runs;

/// A run's summary, ready to print.
pub struct Summary {
    /// One JSON object with the summary.
    pub json: serde_json::Value,
    /// The human-readable report.
    pub text: String,
    /// True if the run met its goal (every call succeeded, every client held, ...).
    pub all_ok: bool,
}

impl Summary {
    /// Print the summary on stdout: the JSON object on one line, or the text report.
    pub fn print(&self, json: bool) {
        if json {
            println!("{}", self.json);
        } else {
            print!("{}", self.text);
        }
    }
}
