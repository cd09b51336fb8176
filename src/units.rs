//! Sizes and durations as people write them (`1536MiB`, `1.5GiB`, `6G`; `500ms`, `10s`, `5m`, `0`).
//!
//! Both parse the same way from the config file and from the command line, so an error message
//! reads the same wherever the value came from.

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

/// Parses a duration: `500ms`, `10s`, `5m`, `1h 30m`, or `0`.
pub fn parse_duration(text: &str) -> Result<Span, UnitError> {
    let trimmed = text.trim();
    if trimmed == "0" {
        return Ok(Span(Duration::ZERO));
    }
    if trimmed.starts_with('-') {
        return Err(UnitError(format!("invalid duration {text:?}: a duration cannot be negative")));
    }
    humantime::parse_duration(trimmed).map(Span).map_err(|e| {
        UnitError(format!("invalid duration {text:?}: {e} (write e.g. \"500ms\", \"10s\", \"5m\", or \"0\")"))
    })
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
    /// Accepts a string with a unit, or an integer number of seconds.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SpanVisitor;
        impl Visitor<'_> for SpanVisitor {
            type Value = Span;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as \"500ms\", \"10s\", \"5m\" or \"0\"")
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
        let bare = parse_duration("10").unwrap_err().to_string();
        assert!(bare.contains("\"10\""), "{bare}");
        let neg = parse_duration("-1s").unwrap_err().to_string();
        assert!(neg.contains("negative"), "{neg}");
    }

    #[test]
    fn display_round_trips() {
        for text in ["500ms", "10s", "5m", "0"] {
            let span = parse_duration(text).unwrap();
            assert_eq!(parse_duration(&span.to_string()), Ok(span));
        }
    }
}
