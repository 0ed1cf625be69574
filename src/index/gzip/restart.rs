//! Restarting inflation at a [`Checkpoint`] (reads through the index).

use super::*;

/// Offset in the blob where the input for restarting at `cp` begins: one byte before
/// `cp.compressed_offset` when `cp.bits > 0` (that byte's top bits start the block).
pub fn input_start(cp: &Checkpoint) -> u64 {
    if cp.bits > 0 {
        cp.compressed_offset.saturating_sub(1)
    } else {
        cp.compressed_offset
    }
}

/// Whether `cp` is the start-of-blob checkpoint (restart by parsing the gzip header).
pub fn is_blob_start(cp: &Checkpoint) -> bool {
    cp.compressed_offset == 0
}

/// Inflates from checkpoint `cp`, whose packed window (checked by the caller against its
/// sha256; empty if it has none) is `window`, discards `skip` output bytes and returns the
/// next `len`.
///
/// `compressed` must hold the blob bytes starting at [`input_start`]`(cp)`; it may end
/// early or late. Reaching the end of the blob (after the last member) before `len` bytes
/// returns what was produced; running out of `compressed` inside a member returns
/// [`GzipError::NeedMoreInput`].
pub fn inflate_from_checkpoint(
    cp: &Checkpoint,
    window: &[u8],
    compressed: &[u8],
    skip: u64,
    len: usize,
) -> Result<Vec<u8>, GzipError> {
    if cp.bits > 7
        || window.len() > MAX_PACKED_WINDOW
        || (cp.bits > 0 && cp.compressed_offset == 0)
        || cp.window.map_or(0, |w| w.len as usize) != window.len()
    {
        return Err(GzipError::BadCheckpoint(format!(
            "bits {} with window of {} bytes at offset {}",
            cp.bits,
            window.len(),
            cp.compressed_offset
        )));
    }
    let mut input = compressed;
    let mut z;
    if is_blob_start(cp) {
        z = Inflate::new(GZIP_BITS)?;
    } else {
        z = Inflate::new(RAW_BITS)?;
        if cp.bits > 0 {
            let Some((&byte, rest)) = input.split_first() else {
                return Err(GzipError::NeedMoreInput {
                    produced: 0,
                    wanted: len,
                });
            };
            let bits = c_int::from(cp.bits);
            z.prime(bits, c_int::from(byte) >> (8 - bits))?;
            input = rest;
        }
        z.set_dictionary(&unpack_window(window)?)?;
    }
    let mut raw = !is_blob_start(cp);
    let mut result = Vec::with_capacity(len.min(64 << 20));
    let mut skip = skip;
    let want = usize::try_from(skip)
        .unwrap_or(usize::MAX)
        .saturating_add(len);
    let mut scratch = vec![0u8; OUT_BUF.min(want).max(1024)];
    let mut offset = input_start(cp) + u64::from(cp.bits > 0);
    while result.len() < len {
        let step = z.run(input, &mut scratch, z::Z_NO_FLUSH);
        input = &input[step.consumed..];
        offset += step.consumed as u64;
        let mut produced = &scratch[..step.produced];
        let drop = (skip.min(produced.len() as u64)) as usize;
        skip -= drop as u64;
        produced = &produced[drop..];
        let take = produced.len().min(len - result.len());
        result.extend_from_slice(&produced[..take]);
        match step.ret {
            z::Z_OK => {}
            z::Z_STREAM_END => {
                if raw {
                    // Skip the member's 8-byte trailer (CRC32, ISIZE).
                    let t = input.len().min(8);
                    input = &input[t..];
                    offset += t as u64;
                    raw = false;
                }
                if input.is_empty() {
                    // End of the supplied bytes at a member end: the blob end, or the
                    // caller's range ended here. Return what was produced.
                    break;
                }
                if input.len() >= 2 && input[..2] != GZIP_MAGIC {
                    return Err(GzipError::TrailingGarbage { offset });
                }
                z.reset(GZIP_BITS)?;
            }
            z::Z_BUF_ERROR if step.consumed == 0 && step.produced == 0 => {
                if input.is_empty() {
                    return Err(GzipError::NeedMoreInput {
                        produced: result.len(),
                        wanted: len,
                    });
                }
                return Err(GzipError::Corrupt {
                    offset,
                    message: z.message(),
                });
            }
            _ => {
                return Err(GzipError::Corrupt {
                    offset,
                    message: z.message(),
                })
            }
        }
    }
    Ok(result)
}
