//! What a run reports: the summary printed at its end (one JSON object or a text report),
//! the histograms behind it, and the files `--out` records (`files`), read back by
//! `loadgen report` and `loadgen merge` (`runs`).

pub mod files;
pub mod hist;
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
