//! Wall-clock times in summaries, RFC 3339 in UTC (`2026-12-08T14:03:07.123Z`): every run
//! writes when it started and ended (`started_at`, `ended_at`), and `merge` reads them back
//! to tell runs made at the same time from runs made one after another.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The wall-clock time of `at`, an instant of this process's monotonic clock.
pub fn wall_clock(at: Instant) -> SystemTime {
    let (now, wall) = (Instant::now(), SystemTime::now());
    match now.checked_duration_since(at) {
        Some(ago) => wall.checked_sub(ago).unwrap_or(UNIX_EPOCH),
        None => wall + at.duration_since(now),
    }
}

/// `t` in RFC 3339, UTC, with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (y, m, day) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!("{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z", s / 3600, s / 60 % 60, s % 60, d.subsec_millis())
}

/// Read an RFC 3339 time (`YYYY-MM-DDTHH:MM:SS[.fraction]` and `Z` or an offset `+HH:MM`);
/// None if `s` is not one.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<u64> {
        let part = s.get(r)?;
        part.bytes().all(|c| c.is_ascii_digit()).then(|| part.parse().ok())?
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut nanos = 0u64;
    if b[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let digits = s.get(start..i.min(start + 9))?;
        if digits.is_empty() {
            return None;
        }
        nanos = digits.parse::<u64>().ok()? * 10u64.pow(9 - digits.len() as u32);
    }
    let offset_s: i64 = match s.get(i..)? {
        "Z" | "z" => 0,
        o if o.len() == 6 && matches!(o.as_bytes()[0], b'+' | b'-') && o.as_bytes()[3] == b':' => {
            let (oh, om) = (num(i + 1..i + 3)? as i64, num(i + 4..i + 6)? as i64);
            let sign = if o.starts_with('-') { -1 } else { 1 };
            sign * (oh * 3600 + om * 60)
        }
        _ => return None,
    };
    let days = days_from_civil(y as i64, mo as u32, d as u32);
    let unix = days * 86_400 + (h * 3600 + mi * 60 + sec) as i64 - offset_s;
    let unix = u64::try_from(unix).ok()?;
    Some(UNIX_EPOCH + Duration::new(unix, nanos as u32))
}

/// Year, month, day of a count of days since 1970-01-01 (the proleptic Gregorian calendar;
/// H. Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Days since 1970-01-01 of a year, month and day (the inverse of [`civil_from_days`]).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_times_format_and_parse_back() {
        let t = UNIX_EPOCH + Duration::from_millis(1_796_739_787_123);
        assert_eq!(rfc3339(t), "2026-12-08T14:23:07.123Z");
        assert_eq!(parse_rfc3339("2026-12-08T14:23:07.123Z"), Some(t));
        assert_eq!(parse_rfc3339("2026-12-08T15:23:07.123+01:00"), Some(t));
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00.000Z");
        assert_eq!(parse_rfc3339("2000-03-01T00:00:00Z"), Some(UNIX_EPOCH + Duration::from_secs(951_868_800)));
    }

    #[test]
    fn every_day_of_four_centuries_round_trips() {
        for day in (-1000..146_097 + 1000).step_by(7) {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day, "{y}-{m}-{d}");
        }
    }

    #[test]
    fn what_is_not_a_time_is_refused() {
        for s in ["", "2026-12-08", "2026-12-08T14:23:07", "2026-13-08T14:23:07Z", "2026-12-08T14:23:07.Z", "x"] {
            assert_eq!(parse_rfc3339(s), None, "{s}");
        }
    }

    #[test]
    fn an_instant_maps_to_the_wall_clock_of_its_moment() {
        let (i, w) = (Instant::now(), SystemTime::now());
        let back = wall_clock(i - Duration::from_secs(5));
        let err = (w - Duration::from_secs(5)).duration_since(back).unwrap_or_else(|e| e.duration());
        assert!(err < Duration::from_millis(50), "{err:?}");
    }
}
