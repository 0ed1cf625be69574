//! The spans of a layer's tar stream that are present on disk, as a set of uncompressed
//! byte ranges, and the records of the log that persists it.
//!
//! Ranges, not checkpoint numbers: a layer's index may be rebuilt with denser (or
//! sparser) checkpoints, and the stream's bytes stay the same, so what was inflated under
//! one index is still found under another.

use std::ops::Range;

/// Bytes of one log record: start and end (u64 little-endian) and a check word.
pub const RECORD_LEN: usize = 24;

/// Tag mixed into each record's check word, so a stray run of zeros is no record.
const MAGIC: u64 = 0x696d_6764_5350_414e; // "imgdSPAN"

fn check(start: u64, end: u64) -> u64 {
    // A cheap mix (splitmix64 of both words): it only has to catch a torn or zeroed record.
    let mut x = start ^ end.rotate_left(29) ^ MAGIC;
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The log record saying `range` is present.
pub fn encode(range: &Range<u64>) -> [u8; RECORD_LEN] {
    let mut out = [0u8; RECORD_LEN];
    out[..8].copy_from_slice(&range.start.to_le_bytes());
    out[8..16].copy_from_slice(&range.end.to_le_bytes());
    out[16..].copy_from_slice(&check(range.start, range.end).to_le_bytes());
    out
}

/// The range a record names, or `None` if it is torn, zeroed or empty.
pub fn decode(record: &[u8]) -> Option<Range<u64>> {
    let word = |i: usize| {
        let b: [u8; 8] = record.get(i..i + 8)?.try_into().ok()?;
        Some(u64::from_le_bytes(b))
    };
    let (start, end, sum) = (word(0)?, word(8)?, word(16)?);
    (start < end && sum == check(start, end)).then_some(start..end)
}

/// Disjoint, non-adjacent ranges in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extents(Vec<Range<u64>>);

impl Extents {
    /// Adds `r`, merging it with the ranges it overlaps or touches.
    pub fn insert(&mut self, r: Range<u64>) {
        if r.is_empty() {
            return;
        }
        let v = &mut self.0;
        // First range whose end reaches r.start, last whose start is within r.end.
        let i = v.partition_point(|x| x.end < r.start);
        let j = v.partition_point(|x| x.start <= r.end);
        if i >= j {
            v.insert(i, r);
            return;
        }
        let merged = v[i].start.min(r.start)..v[j - 1].end.max(r.end);
        v.splice(i..j, std::iter::once(merged));
    }

    /// True if all of `r` is covered.
    pub fn contains(&self, r: &Range<u64>) -> bool {
        if r.is_empty() {
            return true;
        }
        let i = self.0.partition_point(|x| x.end <= r.start);
        self.0
            .get(i)
            .is_some_and(|x| x.start <= r.start && r.end <= x.end)
    }

    /// Bytes covered.
    pub fn bytes(&self) -> u64 {
        self.0.iter().map(|r| r.end - r.start).sum()
    }

    /// The ranges, in order.
    pub fn ranges(&self) -> &[Range<u64>] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::single_range_in_vec_init)]
    fn ranges_merge_and_cover() {
        let mut e = Extents::default();
        e.insert(10..20);
        e.insert(30..40);
        assert!(e.contains(&(12..18)) && !e.contains(&(15..35)) && !e.contains(&(0..1)));
        e.insert(20..30); // touches both: one range
        assert_eq!(e.ranges(), &[10..40]);
        e.insert(5..8);
        e.insert(50..60);
        e.insert(7..55);
        assert_eq!(e.ranges(), &[5..60]);
        e.insert(70..70);
        assert_eq!(e.bytes(), 55);
        assert!(e.contains(&(5..60)) && !e.contains(&(4..6)) && e.contains(&(9..9)));
    }

    #[test]
    fn records_round_trip_and_torn_ones_are_refused() {
        let rec = encode(&(4096..1 << 33));
        assert_eq!(decode(&rec), Some(4096..1 << 33));
        assert_eq!(decode(&[0u8; RECORD_LEN]), None, "zeros are no record");
        assert_eq!(decode(&rec[..20]), None, "a torn record");
        let mut bad = rec;
        bad[3] ^= 1;
        assert_eq!(decode(&bad), None);
        assert_eq!(decode(&encode(&(5..5))), None, "empty");
    }
}
