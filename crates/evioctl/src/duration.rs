//! Durations on the command line (`--cert-ttl 24h`, `--ttl 1h`).

/// Parses a duration: a number of seconds or a number with a unit `s`, `m`, `h` or `d` (`90s`, `1h`, `30d`).
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86_400),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 90s, 30m, 1h, 7d)"))?;
    match n.checked_mul(mult) {
        Some(0) | None => Err(format!("{s:?}: must be positive and reasonable")),
        Some(v) => Ok(v),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations() {
        use super::parse_duration as p;
        assert_eq!(p("90"), Ok(90));
        assert_eq!(p("90s"), Ok(90));
        assert_eq!(p("30m"), Ok(1800));
        assert_eq!(p("1h"), Ok(3600));
        assert_eq!(p("7d"), Ok(7 * 86_400));
        assert!(p("0h").is_err());
        assert!(p("h").is_err());
        assert!(p("1w").is_err());
        assert!(p("-1h").is_err());
    }
}
