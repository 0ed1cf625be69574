//! Path rules: normalisation, and the error naming a bad hard link.

use super::TarError;
use crate::index::format::Entry;

/// Normalises a tar path: strips leading `/` and `./`, collapses `//` and `.` components,
/// strips a trailing `/`. A `..` component is an [`TarError::UnsafePath`].
pub fn normalize(raw: &[u8], offset: u64) -> Result<Vec<u8>, TarError> {
    let mut out = Vec::with_capacity(raw.len());
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                return Err(TarError::UnsafePath {
                    offset,
                    path: String::from_utf8_lossy(raw).into_owned(),
                })
            }
            c => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    Ok(out)
}

pub(super) fn bad_link(offset: u64, link: &Entry, reason: &'static str) -> TarError {
    TarError::BadHardlink {
        offset,
        path: link.path_lossy().into_owned(),
        target: String::from_utf8_lossy(link.link_target.as_deref().unwrap_or_default())
            .into_owned(),
        reason,
    }
}
