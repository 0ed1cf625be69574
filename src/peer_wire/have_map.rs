//! [`HaveMap`]: which chunks of one blob a node holds or is fetching.
//!
//! Bitmaps are `ceil(chunk_count / 8)` bytes; chunk `i` is bit `i % 8` (LSB first) of
//! byte `i / 8`; padding bits past the last chunk must be zero.

use super::WireError;

/// Which chunks of one blob a node holds (`present`) or is fetching (`in_flight`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HaveMap {
    chunk_count: u32,
    present: Vec<u8>,
    in_flight: Vec<u8>,
}

impl HaveMap {
    /// An empty map of a blob with `chunk_count` chunks.
    pub fn new(chunk_count: u32) -> Self {
        let n = bitmap_len(chunk_count);
        HaveMap {
            chunk_count,
            present: vec![0; n],
            in_flight: vec![0; n],
        }
    }

    /// A map from raw bitmaps (see the module docs for the bit order).
    pub fn from_bitmaps(
        chunk_count: u32,
        present: Vec<u8>,
        in_flight: Vec<u8>,
    ) -> Result<Self, WireError> {
        let n = bitmap_len(chunk_count);
        if present.len() != n || in_flight.len() != n {
            return Err(malformed("bitmap length does not match the chunk count"));
        }
        let pad_mask = match chunk_count % 8 {
            0 => 0,
            r => 0xffu8 << r,
        };
        for map in [&present, &in_flight] {
            if map.last().is_some_and(|b| b & pad_mask != 0) {
                return Err(malformed("padding bits set past the last chunk"));
            }
        }
        Ok(HaveMap {
            chunk_count,
            present,
            in_flight,
        })
    }

    /// Number of chunks of the blob.
    pub fn chunk_count(&self) -> u32 {
        self.chunk_count
    }

    /// Whether chunk `i` is held (false when out of range).
    pub fn is_present(&self, i: u32) -> bool {
        get_bit(&self.present, self.chunk_count, i)
    }

    /// Whether chunk `i` is being fetched (false when out of range).
    pub fn is_in_flight(&self, i: u32) -> bool {
        get_bit(&self.in_flight, self.chunk_count, i)
    }

    /// Marks chunk `i` held or not; out-of-range indexes are ignored.
    pub fn set_present(&mut self, i: u32, value: bool) {
        set_bit(&mut self.present, self.chunk_count, i, value);
    }

    /// Marks chunk `i` in flight or not; out-of-range indexes are ignored.
    pub fn set_in_flight(&mut self, i: u32, value: bool) {
        set_bit(&mut self.in_flight, self.chunk_count, i, value);
    }

    /// The raw `present` bitmap.
    pub fn present_bitmap(&self) -> &[u8] {
        &self.present
    }

    /// The raw `in_flight` bitmap.
    pub fn in_flight_bitmap(&self) -> &[u8] {
        &self.in_flight
    }

    /// Size of the encoded body.
    pub fn encoded_len(&self) -> usize {
        4 + self.present.len() + self.in_flight.len()
    }
}

pub(super) fn bitmap_len(chunk_count: u32) -> usize {
    (chunk_count as usize).div_ceil(8)
}

fn get_bit(map: &[u8], count: u32, i: u32) -> bool {
    i < count
        && map
            .get(i as usize / 8)
            .is_some_and(|b| b >> (i % 8) & 1 == 1)
}

fn set_bit(map: &mut [u8], count: u32, i: u32, value: bool) {
    if i >= count {
        return;
    }
    if let Some(b) = map.get_mut(i as usize / 8) {
        let bit = 1u8 << (i % 8);
        if value {
            *b |= bit;
        } else {
            *b &= !bit;
        }
    }
}

pub(super) fn malformed(reason: &'static str) -> WireError {
    WireError::Malformed {
        kind: "HaveMap",
        reason,
    }
}
