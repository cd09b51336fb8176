//! Sizes and durations as people write them (`1536MiB`, `1.5GiB`, `6G`; `500ms`, `10s`, `5m`, `0`).
//!
//! Both parse the same way from the config file, the command line and the HTTP API, so an error
//! message reads the same wherever the value came from. One rule for a bare number everywhere: a
//! size in MiB, a duration in seconds (`5`, `1.5`). [`Rounded`] is how every message shows a
//! duration.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

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

/// The largest size anything takes (config, flags, API): 16 TiB. More memory than any machine's
/// GPUs hold, and small enough that sums over thousands of models and byte counts (`* 2^20`)
/// cannot overflow a `u64`.
pub const MAX_SIZE: Mib = Mib(16 * 1024 * 1024);

/// The longest duration anything takes (config, flags, API): one year (365.25 days, humantime's
/// `1y`). Longer than any timeout or idle time is meant to be, and far enough from the monotonic
/// clock's limits that a deadline `now + duration` can never overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(31_557_600);

/// `now + after`, saturating: a deadline past what the clock can represent becomes `now +`
/// [`MAX_DURATION`] (and, should even that not fit, `now`), never a panic. For deadlines built from
/// values a user or a peer chose.
pub fn later(now: Instant, after: Duration) -> Instant {
    now.checked_add(after).or_else(|| now.checked_add(MAX_DURATION)).unwrap_or(now)
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
    // Compared as a float first, so that `1e30G` is refused before any cast; within the bound the
    // cast is exact (MAX_SIZE is far below 2^53).
    if mib > MAX_SIZE.0 as f64 {
        return Err(too_large_size(text));
    }
    Ok(Mib(mib as u64))
}

/// The error for a size above [`MAX_SIZE`]; `shown` is the size as written.
fn too_large_size(shown: impl fmt::Debug) -> UnitError {
    UnitError(format!("invalid size {shown:?}: too large, at most 16TiB ({MAX_SIZE})"))
}

/// `mib` if it is at most [`MAX_SIZE`].
fn bounded_size(mib: u64) -> Result<Mib, UnitError> {
    if mib > MAX_SIZE.0 { Err(too_large_size(mib)) } else { Ok(Mib(mib)) }
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
                let mib =
                    u64::try_from(v).map_err(|_| E::custom(format!("invalid size {v}: a size cannot be negative")))?;
                bounded_size(mib).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Mib, E> {
                bounded_size(v).map_err(E::custom)
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
        return seconds.ok_or_else(|| too_long(text)).and_then(|d| bounded_duration(d, text));
    }
    let parsed = humantime::parse_duration(trimmed).map_err(|e| {
        UnitError(format!(
            "invalid duration {text:?}: {e} (write e.g. \"500ms\", \"10s\", \"5m\", or a number of seconds)"
        ))
    })?;
    bounded_duration(parsed, text)
}

/// The error for a duration above [`MAX_DURATION`]; `shown` is the duration as written.
fn too_long(shown: impl fmt::Debug) -> UnitError {
    UnitError(format!("invalid duration {shown:?}: too large, at most {} (365.25 days)", Span(MAX_DURATION)))
}

/// `duration` if it is at most [`MAX_DURATION`]; `shown` is how it was written.
fn bounded_duration(duration: Duration, shown: impl fmt::Debug) -> Result<Span, UnitError> {
    if duration > MAX_DURATION { Err(too_long(shown)) } else { Ok(Span(duration)) }
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
                let seconds = u64::try_from(v)
                    .map_err(|_| E::custom(format!("invalid duration {v}: a duration cannot be negative")))?;
                self.visit_u64(seconds)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Span, E> {
                bounded_duration(Duration::from_secs(v), v).map_err(E::custom)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Span, E> {
                if v < 0.0 {
                    return Err(E::custom(format!("invalid duration {v}: a duration cannot be negative")));
                }
                if v.is_nan() {
                    return Err(E::custom("invalid duration nan: not a number"));
                }
                // Beyond what a `Duration` holds (or not a number at all) is too large as well.
                let duration = Duration::try_from_secs_f64(v).map_err(|_| E::custom(too_long(v)))?;
                bounded_duration(duration, v).map_err(E::custom)
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
    fn sizes_above_the_ceiling_are_refused_not_wrapped() {
        assert_eq!(parse_size("16TiB"), Ok(MAX_SIZE));
        assert_eq!(parse_size("16777216"), Ok(MAX_SIZE));
        for text in [
            "16777217",
            "17T",
            "16.0001TiB",
            "99999999999999999999G",
            "1000000000000000000000000000000",
            "18446744073709551615",
        ] {
            let error = parse_size(text).expect_err(text).to_string();
            assert!(error.contains("too large") && error.contains("16TiB"), "{text}: {error}");
        }
        #[derive(Deserialize, Debug)]
        struct Doc {
            #[allow(dead_code)] // read only through Debug
            size: Mib,
        }
        for toml in ["size = 16777217", "size = 9223372036854775807", "size = 1e300"] {
            let error = toml::from_str::<Doc>(toml).expect_err(toml).to_string();
            assert!(error.contains("too large") || error.contains("not a finite"), "{toml}: {error}");
        }
        let error = serde_json::from_str::<Doc>(r#"{"size": 18446744073709551615}"#).unwrap_err().to_string();
        assert!(error.contains("too large"), "{error}");
    }

    #[test]
    fn durations_above_a_year_are_refused_not_overflowed() {
        assert_eq!(parse_duration("1y"), Ok(Span(MAX_DURATION)));
        assert_eq!(parse_duration("365d"), Ok(Span(Duration::from_secs(365 * 86_400))));
        assert_eq!(parse_duration("31557600"), Ok(Span(MAX_DURATION)));
        for text in ["366d", "300000000000y", "18446744073709551615", "18446744073709551615s", "31557600.000000001"] {
            let error = parse_duration(text).expect_err(text).to_string();
            assert!(error.contains("too large") && error.contains("1year"), "{text}: {error}");
        }
        // Larger than humantime itself can count: refused by humantime, still no panic.
        assert!(parse_duration("99999999999999999999999y").is_err());
        #[derive(Deserialize, Debug)]
        struct Doc {
            #[allow(dead_code)] // read only through Debug
            wait: Span,
        }
        for toml in ["wait = 31557601", "wait = 9223372036854775807", "wait = 1e300", "wait = 31557600.5", "wait = inf"]
        {
            let error = toml::from_str::<Doc>(toml).expect_err(toml).to_string();
            assert!(error.contains("too large"), "{toml}: {error}");
        }
        let error = toml::from_str::<Doc>("wait = nan").expect_err("nan").to_string();
        assert!(error.contains("not a number"), "{error}");
        let error = serde_json::from_str::<Doc>(r#"{"wait": 18446744073709551615}"#).unwrap_err().to_string();
        assert!(error.contains("too large"), "{error}");
    }

    #[test]
    fn later_saturates_instead_of_panicking() {
        let now = Instant::now();
        assert_eq!(later(now, Duration::from_secs(5)), now + Duration::from_secs(5));
        assert_eq!(later(now, Duration::MAX), now + MAX_DURATION);
    }

    proptest::proptest! {
        /// Whatever the text, parsing answers (never panics), and what it accepts is within bounds.
        #[test]
        fn any_text_parses_within_bounds_or_is_refused(text in "\\PC{0,40}") {
            if let Ok(size) = parse_size(&text) {
                proptest::prop_assert!(size <= MAX_SIZE);
            }
            if let Ok(span) = parse_duration(&text) {
                proptest::prop_assert!(span.get() <= MAX_DURATION);
            }
        }

        /// Numbers of every magnitude with every unit: accepted exactly when within the bound.
        #[test]
        fn numbers_with_units_are_accepted_exactly_within_bounds(
            number in proptest::prop_oneof![0u64..100_000, proptest::num::u64::ANY],
            size_unit in proptest::sample::select(vec!["", "B", "KiB", "M", "MiB", "G", "GB", "T", "TiB"]),
            duration_unit in proptest::sample::select(vec!["", "ns", "ms", "s", "m", "h", "d", "w", "y"]),
        ) {
            let mib_per_unit: f64 = match size_unit {
                "B" => 1.0 / 1048576.0,
                "KiB" => 1.0 / 1024.0,
                "G" | "GB" => 1024.0,
                "T" | "TiB" => 1048576.0,
                _ => 1.0,
            };
            let size = parse_size(&format!("{number}{size_unit}"));
            proptest::prop_assert_eq!(size.is_ok(), (number as f64 * mib_per_unit).ceil() <= MAX_SIZE.0 as f64);
            let seconds_per_unit: f64 = match duration_unit {
                "ns" => 1e-9,
                "ms" => 1e-3,
                "m" => 60.0,
                "h" => 3600.0,
                "d" => 86400.0,
                "w" => 604800.0,
                "y" => 31557600.0,
                _ => 1.0,
            };
            let duration = parse_duration(&format!("{number}{duration_unit}"));
            let seconds = number as f64 * seconds_per_unit;
            // Away from the boundary itself, where float rounding could go either way.
            if (seconds - MAX_DURATION.as_secs_f64()).abs() > 1.0 {
                proptest::prop_assert_eq!(duration.is_ok(), seconds < MAX_DURATION.as_secs_f64(), "{:?}", duration);
            }
        }
    }

    #[test]
    fn display_round_trips() {
        for text in ["500ms", "10s", "5m", "0", "1.5", "0.001"] {
            let span = parse_duration(text).unwrap();
            assert_eq!(parse_duration(&span.to_string()), Ok(span));
        }
    }
}
