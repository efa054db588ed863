//! `docs/running.md` matches the binaries' `--help`: every flag a binary offers is in its
//! section of the guide, every flag the guide's tables list exists, and where `--help`
//! states a default, the guide's table row states the same one. (The binaries are built by
//! the workspace's test run, beside this test's executable.)

use std::collections::BTreeSet;
use std::process::Command;

/// `BIN ARGS --help`.
fn help(bin: &str, args: &[&str]) -> String {
    let path = lab::bin_dir().join(bin);
    let out = Command::new(&path).args(args).arg("--help").output().unwrap_or_else(|e| {
        panic!("{}: {e} (the workspace's binaries are built by `cargo test --workspace`)", path.display())
    });
    assert!(out.status.success(), "{bin} {args:?} --help failed");
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The long flags a help text offers, with the default it states, if any.
fn flags(help: &str) -> Vec<(String, Option<String>)> {
    let mut out: Vec<(String, Option<String>)> = Vec::new();
    for line in help.lines() {
        let t = line.trim_start();
        // An option's first line: `-h, --help`, `--rate <RATE>  Text [default: 100]`.
        let t = t.strip_prefix("-h, ").or_else(|| t.strip_prefix("-V, ")).unwrap_or(t);
        if let Some(rest) = t.strip_prefix("--") {
            let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
            out.push((format!("--{name}"), None));
        }
        if let (Some(last), Some(i)) = (out.last_mut(), line.find("[default: ")) {
            let d = &line[i + "[default: ".len()..];
            last.1 = d.find(']').map(|j| d[..j].to_string());
        }
    }
    out.retain(|(f, _)| f != "--help" && f != "--version");
    out
}

/// The part of running.md from the heading that starts with `from` to the next `## `.
fn section(from: &str) -> String {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/running.md")).unwrap();
    let start = doc.find(from).unwrap_or_else(|| panic!("no section {from:?} in running.md"));
    let rest = &doc[start + from.len()..];
    let end = rest.find("\n## ").unwrap_or(rest.len());
    rest[..end].to_string()
}

/// A table row that documents flags.
struct Row {
    /// The first cell's flags.
    names: Vec<String>,
    /// The Default cell, if the row's table has that column.
    default: Option<String>,
    /// The heading (`### ...`) the row is under.
    heading: String,
}

/// The rows of a section that document flags.
fn rows(section: &str) -> Vec<Row> {
    let (mut heading, mut has_default) = (String::new(), false);
    let mut out = Vec::new();
    for l in section.lines() {
        if l.starts_with("### ") {
            heading = l.to_string();
        }
        if l.starts_with("| Option |") {
            has_default = l.contains("| Default |");
        }
        if !l.starts_with("| `--") {
            continue;
        }
        // (`\|` is a `|` inside a cell.)
        let l = l.replace("\\|", "/");
        let cells: Vec<&str> = l.split('|').collect();
        let names = cells[1]
            .split('`')
            .filter_map(|c| c.trim().strip_prefix("--"))
            .map(|c| format!("--{}", c.split(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '-')).next().unwrap()))
            .collect();
        let default = has_default.then(|| cells.get(2).map_or(String::new(), |c| c.trim().to_string()));
        out.push(Row { names, default, heading: heading.clone() });
    }
    out
}

/// Check one binary's flags (over all of `commands`) against its section. A command's own
/// subsection (a `### ` heading naming it) is searched first for a flag's row.
fn check(bin: &str, commands: &[&[&str]], section_title: &str) {
    let doc = section(section_title);
    let mut offered: BTreeSet<String> = BTreeSet::new();
    let mut problems = Vec::new();
    let table = rows(&doc);
    for args in commands {
        let own = |r: &&Row| args.first().is_some_and(|c| r.heading.contains(&format!("{bin} {c}`")));
        for (flag, default) in flags(&help(bin, args)) {
            let mentioned = doc.match_indices(&flag).any(|(i, _)| {
                let after = doc[i + flag.len()..].chars().next();
                !after.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-')
            });
            if !mentioned {
                problems.push(format!("{bin} {args:?}: {flag} is not in running.md's {section_title} section"));
            }
            // Where the guide's table gives this flag a default, it is the one --help states.
            // (A subcommand's defaults are compared with its own table; a binary without
            // subcommand tables, with any table of its section.)
            let has = |r: &&Row| r.names.contains(&flag);
            let row = match args.first() {
                Some(_) if bin == "loadgen" => table.iter().filter(own).find(has),
                _ => table.iter().filter(own).find(has).or_else(|| table.iter().find(has)),
            };
            if let (Some(d), Some(Row { default: Some(cell), .. })) = (&default, row) {
                let documented = cell.replace(['`', '*'], "");
                let plain = |s: &str| s.trim_end_matches(".0").to_string();
                if !cell.is_empty() && !documented.split([' ', ',', ';']).any(|w| plain(w) == plain(d)) {
                    problems.push(format!("{bin} {args:?}: {flag} defaults to {d} in --help, the guide says `{cell}`"));
                }
            }
            offered.insert(flag);
        }
    }
    for Row { names, .. } in &table {
        for n in names {
            if !offered.contains(n) {
                problems
                    .push(format!("running.md's {section_title} section documents {n}, which {bin} does not offer"));
            }
        }
    }
    assert!(problems.is_empty(), "running.md and --help disagree:\n  {}", problems.join("\n  "));
}

#[test]
fn the_guide_documents_every_peer_flag_as_help_states_it() {
    check("peer", &[&[], &["listen"], &["call"]], "## 2. `peer`");
}

#[test]
fn the_guide_documents_every_manager_flag_as_help_states_it() {
    check("manager", &[&[], &["token"]], "## 3. `manager`");
}

#[test]
fn the_guide_documents_every_loadgen_flag_as_help_states_it() {
    let scenarios: &[&[&str]] = &[
        &["setup"],
        &["sessions"],
        &["soak"],
        &["register"],
        &["audio-latency"],
        &["hostile"],
        &["report"],
        &["merge"],
    ];
    check("loadgen", scenarios, "## 4. `loadgen`");
}

#[test]
fn the_help_parser_reads_flags_and_defaults() {
    let h = "Options:\n      --rate <RATE>  Call arrivals per second [default: 100]\n  -h, --help  Print help\n      --json\n          Print JSON\n          \n          [default: false]\n";
    assert_eq!(
        flags(h),
        [("--rate".to_string(), Some("100".to_string())), ("--json".to_string(), Some("false".to_string()))]
    );
}
