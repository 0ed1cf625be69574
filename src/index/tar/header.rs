//! Tar header, PAX record and sparse map parsing for the scanner.

use super::{malformed, sparse_err, TarError, BLOCK};
use crate::index::format::{Entry, SparseExtent};
use std::collections::BTreeMap;

/// The fields of one parsed header block.
#[derive(Debug)]
pub(super) struct Header {
    /// Name, with the ustar prefix joined in.
    pub name: Vec<u8>,
    pub linkname: Vec<u8>,
    pub mode: u64,
    pub uid: u64,
    pub gid: u64,
    pub size: u64,
    pub mtime: i64,
    pub typeflag: u8,
    pub dev_major: u32,
    pub dev_minor: u32,
    /// Old GNU sparse (`S`): extents in the header, whether extension blocks follow and
    /// the logical size.
    pub sparse: Vec<SparseExtent>,
    pub is_extended: bool,
    pub real_size: u64,
}

/// Metadata from PAX headers and GNU long names that applies to the next entry.
#[derive(Debug, Default)]
pub(super) struct Meta {
    pub path: Option<Vec<u8>>,
    pub linkpath: Option<Vec<u8>>,
    pub long_name: Option<Vec<u8>>,
    pub long_link: Option<Vec<u8>>,
    pub size: Option<u64>,
    pub uid: Option<u64>,
    pub gid: Option<u64>,
    pub mtime: Option<(i64, u32)>,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    pub sparse_major: Option<u64>,
    pub sparse_name: Option<Vec<u8>>,
    pub sparse_real_size: Option<u64>,
    /// Flat offset, length, offset, length... from `GNU.sparse.map` or the 0.0 keys.
    pub sparse_map: Vec<u64>,
}

impl Meta {
    pub fn is_empty(&self) -> bool {
        self.path.is_none()
            && self.linkpath.is_none()
            && self.long_name.is_none()
            && self.long_link.is_none()
            && self.size.is_none()
            && self.uid.is_none()
            && self.gid.is_none()
            && self.mtime.is_none()
            && self.xattrs.is_empty()
            && self.sparse_major.is_none()
            && self.sparse_name.is_none()
            && self.sparse_real_size.is_none()
            && self.sparse_map.is_empty()
    }

    /// Whether the PAX 0.0/0.1 sparse keys describe the entry as sparse.
    pub fn is_sparse_v0(&self) -> bool {
        self.sparse_major.unwrap_or(0) == 0
            && (self.sparse_real_size.is_some() || !self.sparse_map.is_empty())
    }
}

/// The bytes of `field` before its first NUL.
pub(super) fn until_nul(field: &[u8]) -> &[u8] {
    match field.iter().position(|&b| b == 0) {
        Some(i) => &field[..i],
        None => field,
    }
}

/// Parses a numeric header field: octal text, or base-256 when the top bit is set.
fn number(field: &[u8], offset: u64, name: &'static str) -> Result<i128, TarError> {
    let bad = || TarError::BadNumber {
        offset,
        field: name,
    };
    let Some(&first) = field.first() else {
        return Ok(0);
    };
    if first & 0x80 != 0 {
        // Base-256: big-endian two's complement; 0x80 marks positive, 0xff negative.
        let mut v: i128 = if first == 0xff {
            -1
        } else {
            i128::from(first & 0x7f)
        };
        let rest = if first == 0xff { field } else { &field[1..] };
        for &b in rest {
            v = v.checked_mul(256).ok_or_else(bad)? | i128::from(b);
            if v.unsigned_abs() > u64::MAX as u128 {
                return Err(bad());
            }
        }
        return Ok(v);
    }
    let text = field.iter().skip_while(|&&b| b == b' ');
    let mut v: i128 = 0;
    for &b in text {
        match b {
            b'0'..=b'7' => {
                v = v * 8 + i128::from(b - b'0');
                if v > u64::MAX as i128 {
                    return Err(bad());
                }
            }
            b' ' | 0 => break,
            _ => return Err(bad()),
        }
    }
    Ok(v)
}

fn unsigned(field: &[u8], offset: u64, name: &'static str) -> Result<u64, TarError> {
    u64::try_from(number(field, offset, name)?).map_err(|_| TarError::BadNumber {
        offset,
        field: name,
    })
}

impl Header {
    /// Parses and checksum-verifies a non-zero header block at stream offset `offset`.
    pub fn parse(b: &[u8; BLOCK], offset: u64) -> Result<Header, TarError> {
        let stored = unsigned(&b[148..156], offset, "checksum")?;
        let (mut unsigned_sum, mut signed_sum) = (0u64, 0i64);
        for (i, &byte) in b.iter().enumerate() {
            let byte = if (148..156).contains(&i) { b' ' } else { byte };
            unsigned_sum += u64::from(byte);
            signed_sum += i64::from(byte as i8);
        }
        if stored != unsigned_sum && i64::try_from(stored).ok() != Some(signed_sum) {
            return Err(TarError::BadChecksum { offset });
        }
        let typeflag = b[156];
        let ustar = &b[257..263] == b"ustar\0";
        let gnu = &b[257..265] == b"ustar  \0";
        let mut name = until_nul(&b[0..100]).to_vec();
        let prefix = until_nul(&b[345..500]);
        if ustar && !prefix.is_empty() {
            let mut full = prefix.to_vec();
            full.push(b'/');
            full.extend_from_slice(&name);
            name = full;
        }
        let device = matches!(typeflag, b'3' | b'4') && (ustar || gnu);
        let dev = |range: std::ops::Range<usize>, what| -> Result<u32, TarError> {
            if !device {
                return Ok(0);
            }
            u32::try_from(unsigned(&b[range], offset, what)?).map_err(|_| TarError::BadNumber {
                offset,
                field: what,
            })
        };
        let mtime = i64::try_from(number(&b[136..148], offset, "mtime")?).map_err(|_| {
            TarError::BadNumber {
                offset,
                field: "mtime",
            }
        })?;
        let mut h = Header {
            name,
            linkname: until_nul(&b[157..257]).to_vec(),
            mode: unsigned(&b[100..108], offset, "mode")?,
            uid: unsigned(&b[108..116], offset, "uid")?,
            gid: unsigned(&b[116..124], offset, "gid")?,
            size: unsigned(&b[124..136], offset, "size")?,
            mtime,
            typeflag,
            dev_major: dev(329..337, "devmajor")?,
            dev_minor: dev(337..345, "devminor")?,
            sparse: Vec::new(),
            is_extended: false,
            real_size: 0,
        };
        if typeflag == b'S' {
            if !gnu {
                return Err(malformed(offset, "sparse (S) entry without a GNU header"));
            }
            h.is_extended = sparse_entries(&b[386..482], b[482], offset, &mut h.sparse)?;
            h.real_size = unsigned(&b[483..495], offset, "realsize")?;
        }
        Ok(h)
    }
}

/// Parses 24-byte (offset, numbytes) sparse entries until an empty one; returns whether
/// an extension block follows (`isextended` != 0).
fn sparse_entries(
    area: &[u8],
    isextended: u8,
    offset: u64,
    out: &mut Vec<SparseExtent>,
) -> Result<bool, TarError> {
    for e in area.chunks_exact(24) {
        if e[0] == 0 {
            break;
        }
        out.push(SparseExtent {
            offset: unsigned(&e[..12], offset, "sparse offset")?,
            length: unsigned(&e[12..], offset, "sparse numbytes")?,
        });
    }
    Ok(isextended != 0)
}

/// Parses an old GNU sparse extension block (21 entries, then `isextended` at 504).
pub(super) fn parse_sparse_ext(
    b: &[u8; BLOCK],
    offset: u64,
    out: &mut Vec<SparseExtent>,
) -> Result<bool, TarError> {
    sparse_entries(&b[..504], b[504], offset, out)
}

/// Turns a flat offset, length, ... list into extents.
pub(super) fn pairs_to_extents(flat: &[u64], offset: u64) -> Result<Vec<SparseExtent>, TarError> {
    if flat.len() % 2 != 0 {
        return Err(sparse_err(offset, "odd number of values in the sparse map"));
    }
    Ok(flat
        .chunks_exact(2)
        .map(|p| SparseExtent {
            offset: p[0],
            length: p[1],
        })
        .collect())
}

/// Validates a sparse entry's extents against its size and `stored` data bytes, drops
/// zero-length extents and keeps the list non-empty (an all-hole file gets one empty
/// extent at its end), so `Entry::sparse` being non-empty always means "sparse".
pub(super) fn check_sparse(entry: &mut Entry, stored: u64, offset: u64) -> Result<(), TarError> {
    let (mut end, mut sum) = (0u64, 0u64);
    for e in &entry.sparse {
        if e.offset < end {
            return Err(sparse_err(offset, "extents overlap or are out of order"));
        }
        end = e
            .offset
            .checked_add(e.length)
            .ok_or_else(|| sparse_err(offset, "extent overflows"))?;
        if end > entry.size {
            return Err(sparse_err(offset, "extent ends past the file's real size"));
        }
        sum += e.length;
    }
    if sum > stored {
        return Err(sparse_err(
            offset,
            "extents hold more bytes than the entry stores",
        ));
    }
    entry.sparse.retain(|e| e.length > 0);
    if entry.sparse.is_empty() {
        entry.sparse.push(SparseExtent {
            offset: entry.size,
            length: 0,
        });
    }
    Ok(())
}

/// Incremental parser of a PAX sparse 1.0 map: decimal lines (count, then offset/length
/// pairs) at the start of the data area, padded to a block.
#[derive(Debug, Default)]
pub(super) struct SparseMapParser {
    count: Option<u64>,
    nums: Vec<u64>,
    line: Option<u64>,
}

impl SparseMapParser {
    /// Feeds one data block; returns the extents once the map is complete.
    pub fn block(&mut self, b: &[u8], offset: u64) -> Result<Option<Vec<SparseExtent>>, TarError> {
        let bad = |r| sparse_err(offset, r);
        for &c in b {
            match c {
                b'0'..=b'9' => {
                    let v = self.line.unwrap_or(0);
                    let v = v
                        .checked_mul(10)
                        .and_then(|v| v.checked_add(u64::from(c - b'0')))
                        .ok_or_else(|| bad("number too large in sparse map"))?;
                    self.line = Some(v);
                }
                b'\n' => {
                    let v = self
                        .line
                        .take()
                        .ok_or_else(|| bad("empty line in sparse map"))?;
                    match self.count {
                        None => self.count = Some(v),
                        Some(_) => self.nums.push(v),
                    }
                }
                _ => return Err(bad("unexpected byte in sparse map")),
            }
            if let Some(n) = self.count {
                if self.nums.len() as u64 == n.saturating_mul(2) {
                    return pairs_to_extents(&self.nums, offset).map(Some);
                }
            }
        }
        Ok(None)
    }
}

/// PAX key/value pairs.
type Records<'a> = Vec<(&'a [u8], &'a [u8])>;

/// Splits PAX records (`"<len> <key>=<value>\n"`) into key/value pairs.
fn pax_records(buf: &[u8], offset: u64) -> Result<Records<'_>, TarError> {
    let bad = |reason: &str| TarError::BadPax {
        offset,
        reason: reason.to_string(),
    };
    let mut out = Vec::new();
    let mut rest = buf;
    while !rest.is_empty() {
        if rest.iter().all(|&b| b == 0) {
            break;
        }
        let sp = rest
            .iter()
            .position(|&b| b == b' ')
            .ok_or_else(|| bad("record without a length"))?;
        let len = decimal(&rest[..sp]).ok_or_else(|| bad("bad record length"))?;
        let len = usize::try_from(len).map_err(|_| bad("bad record length"))?;
        if len <= sp + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(bad("record length does not match its contents"));
        }
        let rec = &rest[sp + 1..len - 1];
        let eq = rec
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| bad("record without '='"))?;
        out.push((&rec[..eq], &rec[eq + 1..]));
        rest = &rest[len..];
    }
    Ok(out)
}

/// Parses an unsigned decimal (digits only).
fn decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |v, &c| {
        if c.is_ascii_digit() {
            v.checked_mul(10)?.checked_add(u64::from(c - b'0'))
        } else {
            None
        }
    })
}

/// Parses a PAX time `[-]seconds[.fraction]` into seconds and nanoseconds (the
/// nanoseconds are always positive: -1.5 is (-2, 500_000_000)).
fn pax_time(v: &[u8]) -> Option<(i64, u32)> {
    let (neg, v) = match v.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, v),
    };
    let (int, frac) = match v.iter().position(|&b| b == b'.') {
        Some(i) => (&v[..i], &v[i + 1..]),
        None => (v, &[][..]),
    };
    let secs = i64::try_from(decimal(int)?).ok()?;
    let mut nsec: u32 = 0;
    for i in 0..9 {
        let d = match frac.get(i) {
            Some(c) if c.is_ascii_digit() => u32::from(c - b'0'),
            Some(_) => return None,
            None => 0,
        };
        nsec = nsec * 10 + d;
    }
    if !frac.iter().all(u8::is_ascii_digit) {
        return None;
    }
    if !neg {
        Some((secs, nsec))
    } else if nsec == 0 {
        Some((-secs, 0))
    } else {
        Some((-secs - 1, 1_000_000_000 - nsec))
    }
}

/// Applies the records of a PAX header to `meta`. Empty values unset a key, except for
/// xattrs, whose values may legitimately be empty.
pub(super) fn apply_pax(meta: &mut Meta, buf: &[u8], offset: u64) -> Result<(), TarError> {
    let bad = |key: &[u8]| TarError::BadPax {
        offset,
        reason: format!("invalid value for {}", String::from_utf8_lossy(key)),
    };
    for (key, value) in pax_records(buf, offset)? {
        let text = || (!value.is_empty()).then(|| value.to_vec());
        let num = || -> Result<Option<u64>, TarError> {
            if value.is_empty() {
                Ok(None)
            } else {
                decimal(value).map(Some).ok_or_else(|| bad(key))
            }
        };
        match key {
            b"path" => meta.path = text(),
            b"linkpath" => meta.linkpath = text(),
            b"size" => meta.size = num()?,
            b"uid" => meta.uid = num()?,
            b"gid" => meta.gid = num()?,
            b"mtime" if value.is_empty() => meta.mtime = None,
            b"mtime" => meta.mtime = Some(pax_time(value).ok_or_else(|| bad(key))?),
            b"GNU.sparse.major" => meta.sparse_major = num()?,
            b"GNU.sparse.minor" => {}
            b"GNU.sparse.name" => meta.sparse_name = text(),
            b"GNU.sparse.realsize" | b"GNU.sparse.size" => meta.sparse_real_size = num()?,
            b"GNU.sparse.map" => {
                meta.sparse_map.clear();
                if !value.is_empty() {
                    for v in value.split(|&b| b == b',') {
                        meta.sparse_map.push(decimal(v).ok_or_else(|| bad(key))?);
                    }
                }
            }
            b"GNU.sparse.offset" | b"GNU.sparse.numbytes" => meta
                .sparse_map
                .push(decimal(value).ok_or_else(|| bad(key))?),
            _ => {
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    let name = String::from_utf8(name.to_vec()).map_err(|_| bad(key))?;
                    meta.xattrs.insert(name, value.to_vec());
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_octal_and_base256() {
        assert_eq!(number(b"0000644\0", 0, "m").unwrap(), 0o644);
        assert_eq!(number(b"  644 \0", 0, "m").unwrap(), 0o644);
        assert_eq!(number(b"\0\0\0\0", 0, "m").unwrap(), 0);
        assert!(number(b"0009\0", 0, "m").is_err());
        let mut f = [0u8; 12];
        f[0] = 0x80;
        f[4..].copy_from_slice(&(10u64 << 33).to_be_bytes());
        assert_eq!(number(&f, 0, "size").unwrap(), 10 << 33);
        let neg = [0xffu8; 12];
        assert_eq!(number(&neg, 0, "mtime").unwrap(), -1);
        let mut neg2 = [0xffu8; 12];
        neg2[11] = 0xfe;
        assert_eq!(number(&neg2, 0, "mtime").unwrap(), -2);
    }

    #[test]
    fn pax_times() {
        assert_eq!(pax_time(b"1700000000"), Some((1_700_000_000, 0)));
        assert_eq!(pax_time(b"1.5"), Some((1, 500_000_000)));
        assert_eq!(pax_time(b"1.1234567891"), Some((1, 123_456_789)));
        assert_eq!(pax_time(b"-1.5"), Some((-2, 500_000_000)));
        assert_eq!(pax_time(b"-3"), Some((-3, 0)));
        assert_eq!(pax_time(b"1.x"), None);
        assert_eq!(pax_time(b""), None);
    }

    #[test]
    fn pax_record_lengths_are_checked() {
        assert_eq!(
            pax_records(b"8 a=bcd\n", 0).unwrap(),
            vec![(&b"a"[..], &b"bcd"[..])]
        );
        assert!(pax_records(b"9 a=bcd\n", 0).is_err());
        assert!(pax_records(b"7 a=bcd\n", 0).is_err());
        assert!(pax_records(b"x a=b\n", 0).is_err());
        // Values may contain newlines and '='.
        assert_eq!(
            pax_records(b"10 k=a\n=b\n", 0).unwrap(),
            vec![(&b"k"[..], &b"a\n=b"[..])]
        );
    }

    #[test]
    fn sparse_map_v1_incremental() {
        let mut p = SparseMapParser::default();
        assert_eq!(p.block(b"2\n0\n", 0).unwrap(), None);
        let got = p.block(b"5\n100\n7\n\0\0", 0).unwrap().unwrap();
        assert_eq!(
            got,
            vec![
                SparseExtent {
                    offset: 0,
                    length: 5
                },
                SparseExtent {
                    offset: 100,
                    length: 7
                }
            ]
        );
        assert!(SparseMapParser::default().block(b"1\nx", 0).is_err());
    }
}
