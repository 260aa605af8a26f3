//! Durations in the form the Job's schema takes (`1h30m`, `500ms`): a jobspec writes
//! them as Go durations in any unit (`1500us`, `0.5h`), the JSON API as nanoseconds.

use serde_json::Value;

const MS: u128 = 1_000_000;
const S: u128 = 1_000 * MS;
const M: u128 = 60 * S;
const H: u128 = 60 * M;

/// A duration value as the Job takes it, or why not.
pub fn read(value: &Value) -> Result<String, String> {
    let nanos = match value {
        Value::String(text) => parse(text).ok_or_else(|| format!("{text:?} is not a Go duration"))?,
        Value::Number(n) => match n.as_u64() {
            Some(n) => u128::from(n),
            None => return Err(format!("{n} is not a duration in nanoseconds")),
        },
        other => return Err(format!("{other} is not a duration")),
    };
    Ok(format(nanos))
}

/// A Go duration (`300ms`, `-1.5h` refused: a negative duration means nothing here) in
/// nanoseconds.
pub fn parse(text: &str) -> Option<u128> {
    let text = text.trim();
    if text == "0" {
        return Some(0);
    }
    let mut rest = text;
    if rest.is_empty() {
        return None;
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (whole, fraction) = rest[..end].split_once('.').unwrap_or((&rest[..end], ""));
        if whole.is_empty() && fraction.is_empty()
            || whole.len() > 20
            || fraction.len() > 20
            || !fraction.bytes().all(|b| b.is_ascii_digit())
        {
            return None;
        }
        rest = &rest[end..];
        let (unit, scale) = [
            ("ns", 1),
            ("us", 1_000),
            ("µs", 1_000),
            ("ms", MS),
            ("h", H),
            ("m", M),
            ("s", S),
        ]
        .into_iter()
        .find(|(unit, _)| rest.starts_with(unit))?;
        rest = &rest[unit.len()..];
        let whole: u128 = if whole.is_empty() { 0 } else { whole.parse().ok()? };
        let mut part = whole.checked_mul(scale)?;
        let mut divisor = 1u128;
        for digit in fraction.bytes() {
            divisor *= 10;
            part = part.checked_add(u128::from(digit - b'0') * scale / divisor)?;
        }
        total = total.checked_add(part)?;
    }
    Some(total)
}

/// The shortest form in hours, minutes, seconds and milliseconds (below a millisecond
/// rounds up to one: the schema has no smaller unit, and a positive wait stays positive).
pub fn format(nanos: u128) -> String {
    if nanos == 0 {
        return "0s".to_owned();
    }
    let mut rest = nanos.div_ceil(MS) * MS;
    let mut out = String::new();
    for (unit, scale) in [("h", H), ("m", M), ("s", S), ("ms", MS)] {
        if rest >= scale {
            out.push_str(&format!("{}{unit}", rest / scale));
            rest %= scale;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn go_durations_in_the_schemas_units() {
        for (text, want) in [
            ("30s", "30s"),
            ("90s", "1m30s"),
            ("1h30m", "1h30m"),
            ("0.5h", "30m"),
            ("1.5s", "1s500ms"),
            ("1500us", "2ms"),
            ("250ns", "1ms"),
            ("0", "0s"),
            ("10m0s", "10m"),
        ] {
            assert_eq!(read(&json!(text)).as_deref(), Ok(want), "{text}");
        }
        assert_eq!(read(&json!(30_000_000_000u64)).as_deref(), Ok("30s"));
        for bad in ["", "5", "s", "1d", "-1s", "1.2.3s", ".s"] {
            assert!(read(&json!(bad)).is_err(), "{bad:?}");
        }
        assert!(read(&json!(-5)).is_err());
        assert!(read(&json!("99999999999999999999999h")).is_err());
    }
}
