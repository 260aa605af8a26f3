//! One duration grammar for every flag, CRD field and API body: Vault's
//! (`parseutil.ParseDurationSecond`), which is Go's `time.ParseDuration` (`1h30m`, `1.5h`,
//! `500ms`, `2us`) plus a bare number of seconds (`90`) and a whole number of days (`7d`).
//! Negative durations are refused: nothing in Capstan waits a negative time.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a duration like 90, 90s, 1h30m, 1.5h, 500ms or 7d")]
pub struct DurationError {
    text: String,
}

/// The longest duration accepted: about 31 years, beyond any TTL or interval we use and
/// far inside `Duration`'s range, so sums and multiplications of parsed values are safe.
pub const MAX: Duration = Duration::from_secs(1_000_000_000);

/// Parses `text` (surrounding whitespace ignored). An empty text is an error; callers
/// for which Vault reads "" as zero (TTL fields in API bodies) say so themselves.
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let bad = || DurationError {
        text: text.to_owned(),
    };
    let s = text.trim();
    if s.is_empty() {
        return Err(bad());
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return checked(s.parse::<f64>().map_err(|_| bad())?).ok_or_else(bad);
    }
    if let Some(days) = s.strip_suffix('d') {
        if !days.is_empty() && days.bytes().all(|b| b.is_ascii_digit()) {
            let days: f64 = days.parse().map_err(|_| bad())?;
            return checked(days * 86_400.0).ok_or_else(bad);
        }
        return Err(bad());
    }
    let mut seconds = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let number = &rest[..number_len];
        // Go's grammar: digits, optionally a point and more digits; a lone "." is not a number.
        if number.is_empty() || number == "." || number.matches('.').count() > 1 {
            return Err(bad());
        }
        let value: f64 = number.parse().map_err(|_| bad())?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        seconds += value * scale;
    }
    checked(seconds).ok_or_else(bad)
}

/// Parses into whole seconds, as Vault's API reports TTLs (fractions are dropped).
pub fn parse_seconds(text: &str) -> Result<u64, DurationError> {
    parse(text).map(|d| d.as_secs())
}

fn checked(seconds: f64) -> Option<Duration> {
    (seconds.is_finite() && seconds >= 0.0 && seconds <= MAX.as_secs_f64())
        .then(|| Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> Duration {
        parse(text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn go_durations_parse() {
        assert_eq!(ok("90s"), Duration::from_secs(90));
        assert_eq!(ok("1h30m"), Duration::from_secs(5400));
        assert_eq!(ok("1.5h"), Duration::from_secs(5400));
        assert_eq!(ok("500ms"), Duration::from_millis(500));
        assert_eq!(ok("1.5s"), Duration::from_millis(1500));
        assert_eq!(ok("2us"), Duration::from_micros(2));
        assert_eq!(ok("2µs"), Duration::from_micros(2));
        assert_eq!(ok("10ns"), Duration::from_nanos(10));
        assert_eq!(ok("1h1m1s"), Duration::from_secs(3661));
        assert_eq!(ok(" 5m "), Duration::from_secs(300));
    }

    #[test]
    fn vault_extensions_parse() {
        assert_eq!(ok("90"), Duration::from_secs(90));
        assert_eq!(ok("0"), Duration::ZERO);
        assert_eq!(ok("7d"), Duration::from_secs(7 * 86_400));
        assert_eq!(ok("3650d"), Duration::from_secs(3650 * 86_400));
        assert_eq!(parse_seconds("1.5s"), Ok(1));
    }

    #[test]
    fn everything_else_is_refused() {
        for text in [
            "",
            " ",
            "s",
            "-5s",
            "+5s",
            "1.5d",
            "d",
            "5 s",
            "5S",
            "1x",
            ".s",
            "1..5s",
            "1.2.3s",
            "5m3",
            "1w",
            "3650days",
            "1e3s",
            "99999999999999h",
        ] {
            assert!(parse(text).is_err(), "{text:?} was accepted");
        }
    }

    #[test]
    fn the_error_names_the_text() {
        let error = parse("soon").unwrap_err().to_string();
        assert!(error.contains("\"soon\""), "{error}");
    }
}
