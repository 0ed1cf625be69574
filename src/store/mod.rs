//! Storage shared by the proxy and the agent: content-addressed files on disk
//! ([`ContentStore`]) and typed metadata tables in RocksDB ([`MetaDb`]).

mod content;
mod meta;

pub use content::{ContentStore, Staging, StoreError};
pub use meta::{MetaDb, MetaError, Table};
