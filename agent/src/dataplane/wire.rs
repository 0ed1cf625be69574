//! Frames of the data plane. The pure codec (frame layout, limits checked from the
//! header, [`decode_frame`]) lives in [`imgd_core::peer_wire`], where it is fuzzed; this
//! module adds the conversion from the data plane's [`Limits`].

use super::Limits;
pub use imgd_core::peer_wire::*;

impl From<&Limits> for FrameLimits {
    fn from(l: &Limits) -> Self {
        FrameLimits {
            max_chunk: l.max_chunk,
            max_control: l.max_control,
        }
    }
}
