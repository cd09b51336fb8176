//! Sizes and durations as people write them (`1536MiB`, `1.5GiB`, `6G`; `500ms`, `10s`, `5m`, `0`).
//!
//! Both parse the same way from the config file, the command line and the HTTP API, so an error
//! message reads the same wherever the value came from. One rule for a bare number everywhere: a
//! size in MiB, a duration in seconds (`5`, `1.5`). [`Rounded`] is how every message shows a
//! duration.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An amount of memory in MiB (2^20 bytes), the unit every VRAM figure in vramgate uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Mib(pub u64);

impl Mib {
    /// The amount in bytes, for metrics that follow Prometheus' base-unit convention.
    pub fn bytes(self) -> u64 {
        self.0.saturating_mul(1 << 20)
    }
}

impl fmt::Display for Mib {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}MiB", self.0)
    }
}

/// Why a size or duration did not parse; the message quotes the offending text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UnitError(String);

/// Parses a size. Units are binary: `MB`/`M`/`MiB` all mean MiB and `GB`/`G`/`GiB` all mean GiB,
/// because that is what people mean when they talk about VRAM. A bare number is MiB. Fractions
/// round up to the next MiB so a reservation never under-counts.
pub fn parse_size(text: &str) -> Result<Mib, UnitError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(UnitError("empty size: write a number with a unit, e.g. \"1536MiB\", \"1.5GiB\" or \"6G\"".into()));
    }
    let split =
        trimmed.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+')).unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let unit = unit.trim();
    let value: f64 = number.parse().map_err(|_| {
        UnitError(format!(
            "invalid size {text:?}: expected a number followed by a unit, e.g. \"1536MiB\", \"1.5GiB\" or \"6G\""
        ))
    })?;
    if !value.is_finite() {
        return Err(UnitError(format!("invalid size {text:?}: not a finite number")));
    }
    if value < 0.0 {
        return Err(UnitError(format!("invalid size {text:?}: a size cannot be negative")));
    }
    let mib_per_unit: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 1.0,
        "b" => 1.0 / (1024.0 * 1024.0),
        "k" | "kb" | "kib" => 1.0 / 1024.0,
        "g" | "gb" | "gib" => 1024.0,
        "t" | "tb" | "tib" => 1024.0 * 1024.0,
        _ => {
            return Err(UnitError(format!(
                "invalid size {text:?}: unknown unit {unit:?} (use B, KiB, MiB, GiB or TiB; K, M, G and T also work)"
            )));
        }
    };
    let mib = (value * mib_per_unit).ceil();
    if mib > u64::MAX as f64 / 2.0 {
        return Err(UnitError(format!("invalid size {text:?}: too large")));
    }
    Ok(Mib(mib as u64))
}

impl FromStr for Mib {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_size(s)
    }
}

impl Serialize for Mib {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for Mib {
    /// Accepts a string with a unit, or an integer meaning MiB (so `reserve_mib = 512` reads
    /// naturally).
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = Mib;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as \"1536MiB\", \"1.5GiB\", \"6G\", or an integer number of MiB")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Mib, E> {
                parse_size(v).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Mib, E> {
                u64::try_from(v).map(Mib).map_err(|_| E::custom(format!("invalid size {v}: a size cannot be negative")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Mib, E> {
                Ok(Mib(v))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Mib, E> {
                parse_size(&v.to_string()).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

/// A duration as written in config and flags. Zero is allowed here; whether it means "never" or is
/// an error depends on the setting, and the setting's validation says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Span(pub Duration);

impl Span {
    /// The wrapped duration.
    pub fn get(self) -> Duration {
        self.0
    }
    /// True for the value `0`, which several settings read as "never".
    pub fn is_zero(self) -> bool {
        self.0.is_zero()
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_zero() { f.write_str("0") } else { write!(f, "{}", humantime::format_duration(self.0)) }
    }
}

/// Parses a duration: `500ms`, `10s`, `5m`, `1h 30m`, `0`, or a bare number of seconds (`5`,
/// `1.5`), the same rule as an integer in the config file.
pub fn parse_duration(text: &str) -> Result<Span, UnitError> {
    let trimmed = text.trim();
    if trimmed.starts_with('-') {
        return Err(UnitError(format!("invalid duration {text:?}: a duration cannot be negative")));
    }
    if let Some(seconds) = bare_seconds(trimmed) {
        return seconds.map(Span).ok_or_else(|| UnitError(format!("invalid duration {text:?}: too large")));
    }
    humantime::parse_duration(trimmed).map(Span).map_err(|e| {
        UnitError(format!(
            "invalid duration {text:?}: {e} (write e.g. \"500ms\", \"10s\", \"5m\", or a number of seconds)"
        ))
    })
}

/// A bare decimal number (`5`, `1.5`, `.5`, `0`) read as seconds: `None` if `text` is not one,
/// `Some(None)` if it is one but too large for a `Duration`. Parsed digit by digit rather than
/// through `f64`, so that `0.1` is exactly 100 ms; digits past nanoseconds are dropped.
fn bare_seconds(text: &str) -> Option<Option<Duration>> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    if whole.len() + fraction.len() == 0 || !digits(whole) || !digits(fraction) {
        return None;
    }
    let Ok(seconds) = (if whole.is_empty() { Ok(0) } else { whole.parse::<u64>() }) else {
        return Some(None); // Only digits, so the one way to fail is overflow.
    };
    let nanos = fraction
        .bytes()
        .chain(std::iter::repeat(b'0'))
        .take(9)
        .fold(0u32, |nanos, digit| nanos * 10 + u32::from(digit - b'0'));
    Some(Some(Duration::new(seconds, nanos)))
}

/// A duration as messages show it: rounded to what a person reads (`150ms`, `2.5s`, `60s`), never
/// `60.001663614s`. Whole seconds from 10 s up, one decimal from 1 s, milliseconds below.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rounded(pub Duration);

impl fmt::Display for Rounded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Each step rounds to its own precision first, so 999.6 ms is "1.0s", not "1000ms", and
        // 9.96 s is "10s", not "10.0s".
        let millis = (self.0.as_nanos() + 500_000) / 1_000_000;
        if millis < 1000 {
            return write!(f, "{millis}ms");
        }
        let tenths = (self.0.as_nanos() + 50_000_000) / 100_000_000;
        if tenths < 100 {
            return write!(f, "{}.{}s", tenths / 10, tenths % 10);
        }
        write!(f, "{}s", (self.0.as_nanos() + 500_000_000) / 1_000_000_000)
    }
}

impl FromStr for Span {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_duration(s)
    }
}

impl Serialize for Span {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Span {
    /// Accepts a string with a unit, or a number of seconds (as a number or a string: `5`,
    /// `"5"`, `1.5`).
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SpanVisitor;
        impl Visitor<'_> for SpanVisitor {
            type Value = Span;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as \"500ms\", \"10s\", \"5m\", or a number of seconds")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Span, E> {
                parse_duration(v).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Span, E> {
                u64::try_from(v)
                    .map(|s| Span(Duration::from_secs(s)))
                    .map_err(|_| E::custom(format!("invalid duration {v}: a duration cannot be negative")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Span, E> {
                Ok(Span(Duration::from_secs(v)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Span, E> {
                if v < 0.0 {
                    return Err(E::custom(format!("invalid duration {v}: a duration cannot be negative")));
                }
                Duration::try_from_secs_f64(v)
                    .map(Span)
                    .map_err(|_| E::custom(format!("invalid duration {v}: not a number of seconds that fits")))
            }
        }
        deserializer.deserialize_any(SpanVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_every_documented_form() {
        assert_eq!(parse_size("1536MiB"), Ok(Mib(1536)));
        assert_eq!(parse_size("1.5GiB"), Ok(Mib(1536)));
        assert_eq!(parse_size("6G"), Ok(Mib(6144)));
        assert_eq!(parse_size("6GB"), Ok(Mib(6144)));
        assert_eq!(parse_size("512M"), Ok(Mib(512)));
        assert_eq!(parse_size("512"), Ok(Mib(512)));
        assert_eq!(parse_size(" 2 GiB "), Ok(Mib(2048)));
        assert_eq!(parse_size("1gib"), Ok(Mib(1024)));
        assert_eq!(parse_size("1T"), Ok(Mib(1024 * 1024)));
        assert_eq!(parse_size("0"), Ok(Mib(0)));
    }

    #[test]
    fn fractional_sizes_round_up_to_a_whole_mib() {
        assert_eq!(parse_size("1000KiB"), Ok(Mib(1)));
        assert_eq!(parse_size("1B"), Ok(Mib(1)));
        assert_eq!(parse_size("1.0001G"), Ok(Mib(1025)));
    }

    #[test]
    fn bad_sizes_say_what_is_wrong() {
        let neg = parse_size("-5MiB").unwrap_err().to_string();
        assert!(neg.contains("negative") && neg.contains("-5MiB"), "{neg}");
        let unit = parse_size("6X").unwrap_err().to_string();
        assert!(unit.contains("unknown unit \"X\""), "{unit}");
        let word = parse_size("lots").unwrap_err().to_string();
        assert!(word.contains("\"lots\"") && word.contains("expected a number"), "{word}");
        assert!(parse_size("").is_err());
        assert!(parse_size("1.2.3G").is_err());
    }

    #[test]
    fn durations_in_every_documented_form() {
        assert_eq!(parse_duration("500ms"), Ok(Span(Duration::from_millis(500))));
        assert_eq!(parse_duration("10s"), Ok(Span(Duration::from_secs(10))));
        assert_eq!(parse_duration("5m"), Ok(Span(Duration::from_secs(300))));
        assert_eq!(parse_duration("0"), Ok(Span(Duration::ZERO)));
        assert_eq!(parse_duration("1h 30m"), Ok(Span(Duration::from_secs(5400))));
    }

    #[test]
    fn bad_durations_say_what_is_wrong() {
        let unit = parse_duration("10 parsecs").unwrap_err().to_string();
        assert!(unit.contains("\"10 parsecs\""), "{unit}");
        let dots = parse_duration("1.2.3").unwrap_err().to_string();
        assert!(dots.contains("\"1.2.3\""), "{dots}");
        let huge = parse_duration("99999999999999999999").unwrap_err().to_string();
        assert!(huge.contains("too large"), "{huge}");
        assert!(parse_duration("-5").unwrap_err().to_string().contains("negative"));
        assert!(parse_duration(".").is_err());
        assert!(parse_duration("").is_err());
        let neg = parse_duration("-1s").unwrap_err().to_string();
        assert!(neg.contains("negative"), "{neg}");
    }

    #[test]
    fn a_bare_number_is_seconds() {
        assert_eq!(parse_duration("5"), Ok(Span(Duration::from_secs(5))));
        assert_eq!(parse_duration(" 60 "), Ok(Span(Duration::from_secs(60))));
        assert_eq!(parse_duration("1.5"), Ok(Span(Duration::from_millis(1500))));
        assert_eq!(parse_duration("0.1"), Ok(Span(Duration::from_millis(100))));
        assert_eq!(parse_duration(".25"), Ok(Span(Duration::from_millis(250))));
        assert_eq!(parse_duration("2."), Ok(Span(Duration::from_secs(2))));
        assert_eq!(parse_duration("0.0000000019"), Ok(Span(Duration::from_nanos(1))));
    }

    #[test]
    fn the_config_and_the_api_read_numbers_as_seconds() {
        #[derive(Deserialize)]
        struct Doc {
            wait: Span,
        }
        let read = |json: &str| serde_json::from_str::<Doc>(json).map(|d| d.wait).map_err(|e| e.to_string());
        assert_eq!(read(r#"{"wait": 5}"#), Ok(Span(Duration::from_secs(5))));
        assert_eq!(read(r#"{"wait": "5"}"#), Ok(Span(Duration::from_secs(5))));
        assert_eq!(read(r#"{"wait": 1.5}"#), Ok(Span(Duration::from_millis(1500))));
        assert_eq!(read(r#"{"wait": "1.5"}"#), Ok(Span(Duration::from_millis(1500))));
        assert_eq!(read(r#"{"wait": "250ms"}"#), Ok(Span(Duration::from_millis(250))));
        assert!(read(r#"{"wait": -1.5}"#).is_err_and(|e| e.contains("negative")));
        assert!(read(r#"{"wait": -1}"#).is_err_and(|e| e.contains("negative")));
        assert!(read(r#"{"wait": 1e300}"#).is_err());
        let toml: Doc = toml::from_str("wait = 2.5").expect("a float in TOML");
        assert_eq!(toml.wait, Span(Duration::from_millis(2500)));
    }

    #[test]
    fn messages_round_durations() {
        let shown = |d: Duration| Rounded(d).to_string();
        assert_eq!(shown(Duration::from_nanos(60_001_663_614)), "60s");
        assert_eq!(shown(Duration::from_millis(59_600)), "60s");
        assert_eq!(shown(Duration::from_secs(3600)), "3600s");
        assert_eq!(shown(Duration::from_millis(10_000)), "10s");
        assert_eq!(shown(Duration::from_millis(9_960)), "10s");
        assert_eq!(shown(Duration::from_millis(9_940)), "9.9s");
        assert_eq!(shown(Duration::from_millis(2_000)), "2.0s");
        assert_eq!(shown(Duration::from_millis(1_049)), "1.0s");
        assert_eq!(shown(Duration::from_micros(999_600)), "1.0s");
        assert_eq!(shown(Duration::from_micros(150_400)), "150ms");
        assert_eq!(shown(Duration::from_micros(400)), "0ms");
        assert_eq!(shown(Duration::ZERO), "0ms");
        // The largest duration still rounds without overflowing.
        assert!(shown(Duration::MAX).starts_with("18446744073709551616"));
    }

    #[test]
    fn display_round_trips() {
        for text in ["500ms", "10s", "5m", "0", "1.5", "0.001"] {
            let span = parse_duration(text).unwrap();
            assert_eq!(parse_duration(&span.to_string()), Ok(span));
        }
    }
}
