//! [`HaveMap`]: which chunks of one blob a node holds or is fetching (defined with the
//! frame codec in [`imgd_core::peer_wire`]).

pub use imgd_core::peer_wire::HaveMap;
