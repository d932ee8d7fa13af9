//! Values of settings shared by both binaries: human durations (`500ms`,
//! `10s`, `1h`), sizes (`16MiB`, `1.5GiB`, `64MB`, `1048576`), and the
//! `[default: …]` note of a setting whose default a flag cannot carry
//! itself (because a config file may supply the value after parsing).
//!
//! Every error names the flag it concerns.

use std::time::Duration;

/// A setting's value is invalid; the message starts with `--flag:`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--{flag}: {problem}")]
pub struct SettingError {
    /// The flag, without its dashes (e.g. `segment-max-bytes`).
    pub flag: String,
    /// What is wrong with the value.
    pub problem: String,
}

impl SettingError {
    fn new(flag: &str, problem: impl Into<String>) -> Self {
        Self {
            flag: flag.to_owned(),
            problem: problem.into(),
        }
    }
}

/// Parses a human duration greater than zero, such as `500ms`, `10s`, `1h30m`.
///
/// # Errors
/// The text is not a duration, or it is zero; the error names `flag`.
pub fn parse_duration(flag: &str, text: &str) -> Result<Duration, SettingError> {
    let d = humantime::parse_duration(text.trim()).map_err(|_| {
        SettingError::new(
            flag,
            format!("{text:?} is not a duration like 500ms, 10s or 1h"),
        )
    })?;
    if d.is_zero() {
        return Err(SettingError::new(flag, "must be greater than zero"));
    }
    Ok(d)
}

/// Size units, lower case, with their multipliers.
const UNITS: [(&str, u64); 13] = [
    ("", 1),
    ("b", 1),
    ("k", 1_000),
    ("kb", 1_000),
    ("kib", 1 << 10),
    ("m", 1_000_000),
    ("mb", 1_000_000),
    ("mib", 1 << 20),
    ("g", 1_000_000_000),
    ("gb", 1_000_000_000),
    ("gib", 1 << 30),
    ("tb", 1_000_000_000_000),
    ("tib", 1 << 40),
];

/// Most digits after the decimal point (a nanobyte is precise enough).
const MAX_FRACTION_DIGITS: usize = 9;

/// Parses a size greater than zero: a whole or decimal number and a unit
/// (`KiB`, `MiB`, `GiB`, `TiB`, `KB`/`K`, `MB`/`M`, `GB`/`G`, `TB`, `B`, any
/// case, optionally after a space), e.g. `16MiB`, `1.5GiB`, `0.5 MiB`,
/// `64MB`, or plain bytes (`1048576`). A fraction of a unit is rounded down
/// to whole bytes; a fraction of a byte (`1.5`, `1.5B`) is refused.
///
/// # Errors
/// Not a size, negative, a fraction of a byte, zero, or more than
/// `u64::MAX` bytes; the error names `flag`.
pub fn parse_size(flag: &str, text: &str) -> Result<u64, SettingError> {
    let bad = || {
        SettingError::new(
            flag,
            format!("{text:?} is not a size like 16MiB, 1.5GiB, 64MB or 1048576"),
        )
    };
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let unit = unit.trim().to_ascii_lowercase();
    let multiplier = UNITS
        .iter()
        .find(|(name, _)| *name == unit)
        .map(|&(_, m)| m)
        .ok_or_else(bad)?;
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() || number.ends_with('.') || fraction.contains('.') {
        return Err(bad());
    }
    if fraction.len() > MAX_FRACTION_DIGITS {
        return Err(SettingError::new(
            flag,
            format!("{text:?} has more than {MAX_FRACTION_DIGITS} digits after the point"),
        ));
    }
    let too_large = || SettingError::new(flag, format!("{text:?} is more than {} bytes", u64::MAX));
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| too_large())?
    };
    let bytes = whole
        .checked_mul(u128::from(multiplier))
        .ok_or_else(too_large)?;
    let bytes = if fraction.is_empty() {
        bytes
    } else {
        if multiplier == 1 && fraction.bytes().any(|b| b != b'0') {
            return Err(SettingError::new(
                flag,
                format!("{text:?} is a fraction of a byte (give a unit, e.g. 1.5MiB)"),
            ));
        }
        let digits = u32::try_from(fraction.len()).expect("at most MAX_FRACTION_DIGITS");
        let numerator: u128 = fraction.parse().map_err(|_| bad())?;
        bytes + numerator * u128::from(multiplier) / 10u128.pow(digits)
    };
    let bytes = u64::try_from(bytes).map_err(|_| too_large())?;
    if bytes == 0 {
        return Err(SettingError::new(flag, "must be greater than zero"));
    }
    Ok(bytes)
}

/// Writes a size the way [`parse_size`] reads it: in the largest binary
/// unit that divides it exactly (`16MiB`, `1GiB`), else in bytes.
pub fn format_size(bytes: u64) -> String {
    for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if bytes != 0 && bytes.trailing_zeros() >= shift {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// Writes a duration the way [`parse_duration`] reads it (`1h`, `500ms`).
pub fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// `help` followed by clap's own `[default: …]` note, for a flag whose
/// default is applied after parsing (so that a config file can fill the
/// value between the environment and the default).
pub fn with_default(help: &str, default: impl std::fmt::Display) -> String {
    format!("{help} [default: {default}]")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_units_and_decimals() {
        for (text, bytes) in [
            ("16MiB", 16 << 20),
            ("64MB", 64_000_000),
            ("1048576", 1 << 20),
            ("1.5GiB", 3 << 29),
            ("0.5MiB", 1 << 19),
            (".5 mib", 1 << 19),
            ("2.5MB", 2_500_000),
            ("1.0", 1),
            ("7b", 7),
            ("1.1KiB", 1126), // 1126.4 rounded down
            ("2tib", 2 << 40),
            ("  3 K ", 3000),
        ] {
            assert_eq!(parse_size("x", text), Ok(bytes), "{text}");
        }
    }

    #[test]
    fn sizes_refused_with_the_flag_named() {
        for text in [
            "",
            "MiB",
            "-1MiB",
            "-0",
            "NaN",
            "inf",
            "1e3",
            "1.",
            "1..5MiB",
            "1.2.3MiB",
            "1.5",
            "1.5B",
            "12 parsecs",
            "0",
            "0.0GiB",
            "0.0000000001GiB",
            "16777216TiB",
            "18446744073709551616",
            "99999999999999999999999999999999999999999999GiB",
        ] {
            let err = parse_size("segment-max-bytes", text).unwrap_err();
            assert_eq!(err.flag, "segment-max-bytes", "{text}");
            assert!(
                err.to_string().starts_with("--segment-max-bytes: "),
                "{err}"
            );
        }
        assert_eq!(parse_size("x", "18446744073709551615"), Ok(u64::MAX));
        assert!(parse_size("x", "1.5")
            .unwrap_err()
            .problem
            .contains("fraction of a byte"));
        assert!(parse_size("x", "0")
            .unwrap_err()
            .problem
            .contains("greater than zero"));
    }

    #[test]
    fn sizes_format_as_they_parse() {
        for bytes in [
            1,
            1000,
            1 << 10,
            3 << 29,
            16 << 20,
            1 << 30,
            5 << 40,
            u64::MAX,
        ] {
            assert_eq!(parse_size("x", &format_size(bytes)), Ok(bytes));
        }
        assert_eq!(format_size(16 << 20), "16MiB");
        assert_eq!(format_size(1 << 30), "1GiB");
        assert_eq!(format_size(1536), "1536");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("x", "500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("x", " 1h30m "), Ok(Duration::from_mins(90)));
        assert_eq!(
            parse_duration("segment-max-age", "soon")
                .unwrap_err()
                .to_string(),
            "--segment-max-age: \"soon\" is not a duration like 500ms, 10s or 1h"
        );
        assert_eq!(
            parse_duration("x", "0s").unwrap_err().problem,
            "must be greater than zero"
        );
        assert_eq!(format_duration(Duration::from_hours(1)), "1h");
        assert_eq!(with_default("Interval.", "1h"), "Interval. [default: 1h]");
    }
}
