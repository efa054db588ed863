//! Every `unsafe` block and `unsafe impl` in the engine's sources says why it is sound: a
//! `SAFETY:` comment on its line or within the 3 lines before it (a comment that starts
//! higher and runs into those lines counts: it is read from its first line). Every
//! `unsafe fn` states its contract: a `# Safety` section in its doc comment.

use std::path::{Path, PathBuf};

/// Lines a `SAFETY:` comment may sit above the `unsafe` it explains.
const REACH: usize = 3;

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The code of a line: without its `//` comment (a rough cut: no source line of the engine
/// has `//` inside a string before an `unsafe`).
fn code(line: &str) -> &str {
    line.split("//").next().unwrap_or("")
}

/// True if `word` occurs in `s` as a whole word followed (after spaces) by `next`.
fn keyword_then(s: &str, word: &str, next: &str) -> bool {
    let bytes = s.as_bytes();
    let mut from = 0;
    while let Some(i) = s[from..].find(word) {
        let at = from + i;
        let before_ok = at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_');
        let rest = s[at + word.len()..].trim_start();
        if before_ok && rest.starts_with(next) {
            return true;
        }
        from = at + word.len();
    }
    false
}

/// The problems in one file's text, as `line: what`.
fn problems(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut found = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let c = code(line);
        let block = keyword_then(c, "unsafe", "{");
        let imp = keyword_then(c, "unsafe", "impl");
        if block || imp {
            // The 3 lines above, extended up through a comment that runs into them.
            let mut top = i.saturating_sub(REACH);
            while top > 0 && top < i && lines[top].trim_start().starts_with("//") {
                if !lines[top - 1].trim_start().starts_with("//") {
                    break;
                }
                top -= 1;
            }
            let explained = lines[top..=i].iter().any(|l| l.contains("SAFETY:"));
            if !explained {
                let what = if imp { "unsafe impl" } else { "unsafe block" };
                found.push(format!("{}: {what} without a SAFETY: comment within {REACH} lines above", i + 1));
            }
        }
        if keyword_then(c, "unsafe", "fn") {
            // The doc comment and attributes right above the declaration.
            let documented = lines[..i]
                .iter()
                .rev()
                .take_while(|l| {
                    let t = l.trim_start();
                    t.starts_with("///") || t.starts_with("#[")
                })
                .any(|l| l.contains("# Safety"));
            if !documented {
                found.push(format!("{}: unsafe fn without a # Safety section in its doc comment", i + 1));
            }
        }
    }
    found
}

#[test]
fn every_unsafe_in_the_engine_says_why_it_is_sound() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&root, &mut files);
    assert!(files.len() >= 5, "the engine's sources were not found under {}", root.display());
    let mut all = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        for p in problems(&text) {
            all.push(format!("{}:{p}", f.strip_prefix(&root).unwrap().display()));
        }
    }
    assert!(all.is_empty(), "unexplained unsafe:\n{}", all.join("\n"));
}

/// The check itself finds what it must, and only that.
#[test]
fn the_check_finds_unexplained_unsafe() {
    let bad = "fn f() {\n    let x = 1;\n    let y = 2;\n    let z = 3;\n    let w = 4;\n    unsafe { g() }\n}\n";
    assert_eq!(problems(bad).len(), 1);
    let far = "// SAFETY: too far above.\nlet a = 1;\nlet b = 2;\nlet c = 3;\nunsafe impl Send for X {}\n";
    assert_eq!(problems(far).len(), 1);
    let good = "// SAFETY: g has no preconditions.\nlet v =\n    unsafe { g() };\n";
    assert!(problems(good).is_empty());
    let long = "// SAFETY: a long reason,\n// line two,\n// line three,\n// line four.\nunsafe { g() }\n";
    assert!(problems(long).is_empty());
    let other = "// SAFETY: about something else.\nlet a = 1;\n// A comment, no reason.\nlet b = 2;\nunsafe { g() }\n";
    assert_eq!(problems(other).len(), 1);
    let same_line = "let v = unsafe { g() }; // SAFETY: none needed.\n";
    assert!(problems(same_line).is_empty());
    let undocumented = "/// Does things.\npub unsafe fn f() {}\n";
    assert_eq!(problems(undocumented).len(), 1);
    let documented = "/// Does things.\n///\n/// # Safety\n/// Never.\n#[inline]\npub unsafe fn f() {}\n";
    assert!(problems(documented).is_empty());
    let words = "let not_unsafe = 1; // unsafe { in a comment }\nfn is_unsafe_impl() {}\n";
    assert!(problems(words).is_empty());
}
