//! Compile-time parsing of duration strings such as `"90s"`, `"24h"` or `"1h30m"`.

/// The longest duration any argument accepts: 365 days.
pub(crate) const MAX_SECS: u64 = 365 * SECS_PER_DAY;

const SECS_PER_DAY: u64 = 86_400;

/// The accepted units, largest first, with their length in seconds.
const UNITS: [(char, u64); 4] = [('d', SECS_PER_DAY), ('h', 3_600), ('m', 60), ('s', 1)];

/// Why a duration string was rejected.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum DurationError {
    /// Not a sequence of `<integer><unit>` groups.
    Invalid,
    /// Units not written from largest to smallest, or one unit repeated (`30m1h`, `1h1h`).
    Order,
    /// Parses, but adds up to zero.
    Zero,
    /// Longer than [`MAX_SECS`].
    TooLong,
}

impl DurationError {
    /// The message shown for argument `key` whose string literal holds `text`.
    pub(crate) fn message(&self, key: &str, text: &str) -> String {
        match self {
            Self::Invalid => format!(
                "invalid duration `{text}`: expected a positive integer followed by `s`, `m`, `h` or `d`, \
                 e.g. `30s`, `15m`, `24h`, `7d`, or several such groups like `1h30m`"
            ),
            Self::Order => format!(
                "invalid duration `{text}`: write each unit at most once, from the largest to the smallest, \
                 e.g. `1h30m`"
            ),
            Self::Zero => {
                format!("`{key}` cannot be zero: give a positive duration such as `30s` or `24h`")
            }
            Self::TooLong => {
                format!("`{key}` of `{text}` is too long: the longest accepted duration is `365d`")
            }
        }
    }
}

/// Parses one or more `<integer><unit>` groups (units `d`, `h`, `m`, `s`, largest first, each at most
/// once) into a whole number of seconds between 1 and [`MAX_SECS`].
pub(crate) fn parse(text: &str) -> Result<u64, DurationError> {
    let mut rest = text;
    let mut total: u64 = 0;
    // Index into `UNITS` of the next unit allowed: units must strictly descend.
    let mut next_unit = 0;
    if rest.is_empty() {
        return Err(DurationError::Invalid);
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(DurationError::Invalid);
        }
        let (number, after) = rest.split_at(digits);
        let mut chars = after.chars();
        let unit = chars.next().ok_or(DurationError::Invalid)?;
        let index = UNITS
            .iter()
            .position(|&(name, _)| name == unit)
            .ok_or(DurationError::Invalid)?;
        if index < next_unit {
            return Err(DurationError::Order);
        }
        next_unit = index + 1;
        let seconds = number
            .parse::<u64>()
            .ok()
            .and_then(|count| count.checked_mul(UNITS[index].1))
            .and_then(|seconds| total.checked_add(seconds))
            .ok_or(DurationError::TooLong)?;
        total = seconds;
        rest = chars.as_str();
    }
    match total {
        0 => Err(DurationError::Zero),
        t if t > MAX_SECS => Err(DurationError::TooLong),
        t => Ok(t),
    }
}

#[cfg(test)]
mod tests {
    use super::{DurationError, MAX_SECS, parse};

    #[test]
    fn single_units() {
        assert_eq!(parse("90s"), Ok(90));
        assert_eq!(parse("15m"), Ok(900));
        assert_eq!(parse("24h"), Ok(86_400));
        assert_eq!(parse("7d"), Ok(604_800));
        assert_eq!(parse("007s"), Ok(7));
    }

    #[test]
    fn groups_from_largest_to_smallest() {
        assert_eq!(parse("1h30m"), Ok(5_400));
        assert_eq!(parse("1d2h3m4s"), Ok(93_784));
        assert_eq!(parse("0h30m"), Ok(1_800));
        assert_eq!(parse("30m1h"), Err(DurationError::Order));
        assert_eq!(parse("1h1h"), Err(DurationError::Order));
    }

    #[test]
    fn malformed() {
        for text in [
            "", "24", "h", "24x", "24H", "1.5h", "-1h", "+1h", " 1h", "1h ", "1 h", "1h30", "1hm",
            "24hs",
        ] {
            assert_eq!(parse(text), Err(DurationError::Invalid), "{text:?}");
        }
    }

    #[test]
    fn bounds() {
        assert_eq!(parse("0s"), Err(DurationError::Zero));
        assert_eq!(parse("0d0s"), Err(DurationError::Zero));
        assert_eq!(parse("365d"), Ok(MAX_SECS));
        assert_eq!(parse("364d24h"), Ok(MAX_SECS));
        assert_eq!(parse("365d1s"), Err(DurationError::TooLong));
        assert_eq!(parse("99999999999999999999s"), Err(DurationError::TooLong));
        assert_eq!(parse("999999999999999999d"), Err(DurationError::TooLong));
    }

    #[test]
    fn messages_name_the_literal_and_the_fix() {
        assert_eq!(
            DurationError::Invalid.message("ttl", "24x"),
            "invalid duration `24x`: expected a positive integer followed by `s`, `m`, `h` or `d`, \
             e.g. `30s`, `15m`, `24h`, `7d`, or several such groups like `1h30m`"
        );
        assert_eq!(
            DurationError::Zero.message("lease", "0s"),
            "`lease` cannot be zero: give a positive duration such as `30s` or `24h`"
        );
    }
}
