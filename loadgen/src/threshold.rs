//! Pass/fail criteria on a run's summary, k6 style: `--threshold 'setup_p99_ms<10'`
//! (any numeric summary field, `a.b` for a nested one; `<`, `<=`, `>`, `>=`, `==`, `!=`).
//! A run with thresholds passes only if every one holds and the generator kept up with its
//! own plan (a run the generator could not drive as asked proves nothing about the system).

use std::fmt;

/// A comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `==`
    Eq,
    /// `!=`
    Ne,
}

impl Op {
    fn holds(self, a: f64, b: f64) -> bool {
        match self {
            Op::Lt => a < b,
            Op::Le => a <= b,
            Op::Gt => a > b,
            Op::Ge => a >= b,
            Op::Eq => a == b,
            Op::Ne => a != b,
        }
    }
}

/// One criterion: `field op value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Threshold {
    /// The summary field, dotted for nested ones.
    pub field: String,
    /// The comparison.
    pub op: Op,
    /// The bound.
    pub value: f64,
}

impl fmt::Display for Threshold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = match self.op {
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Eq => "==",
            Op::Ne => "!=",
        };
        write!(f, "{}{op}{}", self.field, self.value)
    }
}

/// Parse `FIELD OP NUMBER` (spaces allowed): the value parser of `--threshold`.
pub fn parse(s: &str) -> Result<Threshold, String> {
    // Two-character operators first, so `<=` is not read as `<` and `=...`.
    const OPS: [(&str, Op); 6] =
        [("<=", Op::Le), (">=", Op::Ge), ("==", Op::Eq), ("!=", Op::Ne), ("<", Op::Lt), (">", Op::Gt)];
    let usage = || format!("`{s}`: expected FIELD<NUMBER (or <=, >, >=, ==, !=), e.g. 'setup_p99_ms<10'");
    let (at, len, op) = OPS
        .iter()
        .filter_map(|(t, op)| s.find(t).map(|i| (i, t.len(), *op)))
        .min_by_key(|(i, len, _)| (*i, usize::MAX - len))
        .ok_or_else(usage)?;
    let field = s[..at].trim();
    let value = s[at + len..].trim();
    let valid = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.';
    if field.is_empty() || !field.chars().all(valid) {
        return Err(usage());
    }
    let value: f64 = value.parse().map_err(|_| format!("`{s}`: `{value}` is not a number"))?;
    if !value.is_finite() {
        return Err(format!("`{s}`: the bound must be a finite number"));
    }
    Ok(Threshold { field: field.to_string(), op, value })
}

/// A threshold checked against a summary.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// The criterion.
    pub threshold: Threshold,
    /// The field's value (None: the summary has no such numeric field).
    pub actual: Option<f64>,
    /// Whether it holds (false when the field is missing).
    pub ok: bool,
}

/// The numeric field at a dotted `path` of `summary`.
fn field(summary: &serde_json::Value, path: &str) -> Option<f64> {
    let v = path.split('.').try_fold(summary, |v, k| v.get(k))?;
    v.as_f64().or_else(|| v.as_bool().map(|b| if b { 1.0 } else { 0.0 }))
}

/// Check every threshold against `summary`.
pub fn check(thresholds: &[Threshold], summary: &serde_json::Value) -> Vec<Verdict> {
    thresholds
        .iter()
        .map(|t| {
            let actual = field(summary, &t.field);
            let ok = actual.is_some_and(|a| t.op.holds(a, t.value));
            Verdict { threshold: t.clone(), actual, ok }
        })
        .collect()
}

/// The numeric fields of `summary` a threshold may name (top level), for a message.
pub fn numeric_fields(summary: &serde_json::Value) -> Vec<String> {
    let mut names: Vec<String> = summary
        .as_object()
        .map(|o| o.iter().filter(|(_, v)| v.is_number()).map(|(k, _)| k.clone()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// One line per verdict, for the report.
pub fn describe(v: &Verdict, summary: &serde_json::Value) -> String {
    match v.actual {
        Some(a) => format!("threshold {}: {a}: {}", v.threshold, if v.ok { "ok" } else { "FAILED" }),
        None => format!(
            "threshold {}: FAILED: the {} summary has no numeric field `{}` (its fields: {})",
            v.threshold,
            summary["scenario"].as_str().unwrap_or("run's"),
            v.threshold.field,
            numeric_fields(summary).join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expressions_parse_and_bad_ones_say_what_is_wrong() {
        assert_eq!(
            parse("setup_p99_ms<10").unwrap(),
            Threshold { field: "setup_p99_ms".into(), op: Op::Lt, value: 10.0 }
        );
        assert_eq!(parse(" loss_ratio <= 0.0001 ").unwrap().op, Op::Le);
        assert_eq!(parse("manager.frames_malformed==0").unwrap().field, "manager.frames_malformed");
        assert_eq!(parse("calls_ok>=100").unwrap().op, Op::Ge);
        assert_eq!(parse("calls_failed!=1").unwrap().op, Op::Ne);
        for bad in ["setup_p99_ms", "<10", "setup p99<10", "x<ten", "x<inf", "x=1"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn verdicts_compare_the_summarys_fields() {
        let s = serde_json::json!({"scenario": "setup", "setup_p99_ms": 2.5, "manager": {"frames_malformed": 0}, "ok": true});
        let v = check(&[parse("setup_p99_ms<10").unwrap(), parse("setup_p99_ms<1").unwrap()], &s);
        assert!(v[0].ok && !v[1].ok);
        assert_eq!(v[1].actual, Some(2.5));
        assert!(check(&[parse("manager.frames_malformed==0").unwrap()], &s)[0].ok);
        let missing = &check(&[parse("nope<1").unwrap()], &s)[0];
        assert!(!missing.ok && missing.actual.is_none());
        assert!(describe(missing, &s).contains("no numeric field `nope`"));
        assert!(describe(missing, &s).contains("setup_p99_ms"));
    }
}
