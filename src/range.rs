//! HTTP `Range: bytes=...` parsing for blob responses (proxy and agent mirror).

use std::ops::Range;

/// Why a `Range` header cannot be served.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RangeError {
    #[error("malformed range {0:?}")]
    Malformed(String),
    #[error("requested range not satisfiable for a blob of {0} bytes")]
    Unsatisfiable(u64),
}

/// Parses a `Range` header against a blob of `size` bytes. `Ok(None)` means "serve it
/// whole": no header, or a multi-range request, which HTTP lets a server answer with 200.
pub fn parse_byte_range(header: Option<&str>, size: u64) -> Result<Option<Range<u64>>, RangeError> {
    let Some(h) = header else { return Ok(None) };
    let bad = || RangeError::Malformed(h.to_string());
    let spec = h.trim().strip_prefix("bytes=").ok_or_else(bad)?;
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or_else(bad)?;
    let num = |s: &str| s.trim().parse::<u64>().map_err(|_| bad());
    let range = match (a.trim().is_empty(), b.trim().is_empty()) {
        (true, false) => size - num(b)?.min(size)..size,
        (false, true) => num(a)?..size,
        (false, false) => num(a)?..num(b)?.saturating_add(1).min(size),
        (true, true) => return Err(bad()),
    };
    if range.start >= range.end || range.start >= size {
        return Err(RangeError::Unsatisfiable(size));
    }
    Ok(Some(range))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_byte_range(None, 10).unwrap(), None);
        assert_eq!(parse_byte_range(Some("bytes=2-4"), 10).unwrap(), Some(2..5));
        assert_eq!(parse_byte_range(Some("bytes=7-"), 10).unwrap(), Some(7..10));
        assert_eq!(parse_byte_range(Some("bytes=-3"), 10).unwrap(), Some(7..10));
        assert_eq!(
            parse_byte_range(Some("bytes=5-100"), 10).unwrap(),
            Some(5..10)
        );
        assert_eq!(parse_byte_range(Some("bytes=0-1,4-5"), 10).unwrap(), None);
        assert_eq!(
            parse_byte_range(Some("bytes=10-"), 10),
            Err(RangeError::Unsatisfiable(10))
        );
        assert!(parse_byte_range(Some("items=1-2"), 10).is_err());
        assert!(parse_byte_range(Some("bytes=x-2"), 10).is_err());
    }
}
