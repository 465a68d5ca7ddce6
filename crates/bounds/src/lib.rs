//! Ranges for numeric settings: every number a user can set (config file, admin API) is checked
//! against one of these before anything computes with it, so a value that validates can never
//! overflow, panic a `Duration`, or poison a lock later. Errors are `(key, message)`, the shape
//! every `validate` in the crate returns.

/// `(key, message)`: which setting is wrong and why.
pub type Invalid = (String, String);

/// The longest duration any setting may name: a year. Beyond it a `Duration` from seconds is
/// still fine, but no timer or TTL means anything there.
pub const MAX_SECONDS: f64 = 365.0 * 86_400.0;

/// The largest count (workers, slots, queue places, tokens…) a setting may name. Far above any
/// machine, and small enough that multiplying two of them never overflows a `u64` or `usize`.
pub const MAX_COUNT: u64 = 1 << 24;

/// `v` must be a finite number in `lo..=hi`.
pub fn float(key: &str, v: f64, lo: f64, hi: f64) -> Result<(), Invalid> {
    if v.is_finite() && v >= lo && v <= hi {
        Ok(())
    } else {
        Err((
            key.to_string(),
            format!("must be between {lo} and {hi}, got {v}"),
        ))
    }
}

/// `v` must be a finite number above `lo` and at most `hi`.
pub fn float_above(key: &str, v: f64, lo: f64, hi: f64) -> Result<(), Invalid> {
    if v.is_finite() && v > lo && v <= hi {
        Ok(())
    } else {
        Err((
            key.to_string(),
            format!("must be above {lo} and at most {hi}, got {v}"),
        ))
    }
}

/// A number of seconds in `0..=MAX_SECONDS` (`positive`: above 0).
pub fn seconds(key: &str, v: f64, positive: bool) -> Result<(), Invalid> {
    if positive {
        float_above(key, v, 0.0, MAX_SECONDS)
    } else {
        float(key, v, 0.0, MAX_SECONDS)
    }
}

/// An integer in `lo..=hi`.
pub fn int(key: &str, v: u64, lo: u64, hi: u64) -> Result<(), Invalid> {
    if (lo..=hi).contains(&v) {
        Ok(())
    } else {
        Err((
            key.to_string(),
            format!("must be between {lo} and {hi}, got {v}"),
        ))
    }
}

/// A count in `lo..=MAX_COUNT`.
pub fn count(key: &str, v: usize, lo: u64) -> Result<(), Invalid> {
    int(key, v as u64, lo, MAX_COUNT)
}

/// `text` cut to 64 characters for an error message (a client's value is echoed, not all of it).
pub fn clip(text: &str) -> String {
    match text.char_indices().nth(64) {
        None => text.to_string(),
        Some((end, _)) => format!("{}…", &text[..end]),
    }
}

/// `Duration::from_secs_f64` that saturates instead of panicking (negative or NaN: zero).
pub fn duration(secs: f64) -> std::time::Duration {
    std::time::Duration::try_from_secs_f64(secs.max(0.0))
        .unwrap_or(std::time::Duration::from_secs_f64(MAX_SECONDS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_and_out_of_range_values_are_refused() {
        for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -1.0, 1e20] {
            assert!(seconds("k", v, false).is_err(), "{v}");
        }
        assert!(seconds("k", 0.0, true).is_err());
        assert!(seconds("k", 0.0, false).is_ok());
        assert!(count("k", usize::MAX, 0).is_err());
        assert!(count("k", 1 << 63, 0).is_err());
        let (k, m) = int("pool.queue_capacity", 0, 1, 10).unwrap_err();
        assert_eq!(k, "pool.queue_capacity");
        assert!(m.contains("between 1 and 10"), "{m}");
        assert_eq!(duration(f64::INFINITY).as_secs_f64(), MAX_SECONDS);
        assert_eq!(duration(f64::NAN), std::time::Duration::ZERO);
        assert_eq!(duration(-3.0), std::time::Duration::ZERO);
    }
}
