//! Rendezvous (highest random weight) hashing: every party ranks the same candidates for
//! a key in the same order, without talking. The agent uses it to choose a chunk's owner
//! among the hosts fetching its blob, and a request's proxy replica.

use crate::digest::Sha256;

/// The weight of candidate `node` for `key`: the first 8 bytes of sha256(key ‖ node), read
/// big-endian. The candidate with the highest weight wins.
pub fn weight(key: &[u8], node: &[u8]) -> u64 {
    let mut h = Sha256::new();
    h.update(key);
    h.update(node);
    let d = h.finish();
    let mut w = [0u8; 8];
    w.copy_from_slice(&d.as_bytes()[..8]);
    u64::from_be_bytes(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_stable_and_differ_by_candidate() {
        assert_eq!(weight(b"chunk", b"a"), weight(b"chunk", b"a"));
        assert_ne!(weight(b"chunk", b"a"), weight(b"chunk", b"b"));
        assert_ne!(weight(b"chunk", b"a"), weight(b"other", b"a"));
    }
}
