//! Typed metadata tables in RocksDB, one column family per table.
//!
//! Each stored kind implements [`Table`]: its column family name, key and value types.
//! Values are postcard-encoded. Writes that must land together go through a
//! [`MetaBatch`] and are written with a synced WAL, so after `kill -9` either all or none
//! of a batch is visible.

use crate::digest::Digest;
use rocksdb::{ColumnFamily, Options, WriteBatch, WriteOptions, DB};
use serde::{de::DeserializeOwned, Serialize};
use std::marker::PhantomData;
use std::path::Path;

/// Errors of the metadata database.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("metadata database: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("metadata table {0} is not open")]
    NoTable(&'static str),
    #[error("corrupt record in table {table}: {source}")]
    Decode {
        table: &'static str,
        #[source]
        source: postcard::Error,
    },
    #[error("bad key in table {0}")]
    Key(&'static str),
}

/// A key type of a table.
pub trait TableKey: Sized {
    /// Bytes of the key as stored.
    fn to_key(&self) -> Vec<u8>;
    /// Parses stored key bytes.
    fn from_key(bytes: &[u8]) -> Option<Self>;
}

impl TableKey for Digest {
    fn to_key(&self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }
    fn from_key(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Digest::from_bytes)
    }
}

impl TableKey for String {
    fn to_key(&self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }
    fn from_key(bytes: &[u8]) -> Option<Self> {
        String::from_utf8(bytes.to_vec()).ok()
    }
}

/// One kind of record, stored in its own column family.
pub trait Table {
    /// Column family name.
    const NAME: &'static str;
    type Key: TableKey;
    type Value: Serialize + DeserializeOwned;
}

/// Every record of a table, as [`MetaDb::scan`] returns them.
pub type Records<T> = Vec<(<T as Table>::Key, <T as Table>::Value)>;

/// The RocksDB metadata database.
pub struct MetaDb {
    db: DB,
}

impl MetaDb {
    /// Opens (creating if needed) the database at `path` with the given tables.
    pub fn open(path: &Path, tables: &[&'static str]) -> Result<MetaDb, MetaError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_keep_log_file_num(4);
        let db = DB::open_cf(&opts, path, tables)?;
        Ok(MetaDb { db })
    }

    fn cf<T: Table>(&self) -> Result<&ColumnFamily, MetaError> {
        self.db
            .cf_handle(T::NAME)
            .ok_or(MetaError::NoTable(T::NAME))
    }

    /// Reads one record.
    pub fn get<T: Table>(&self, key: &T::Key) -> Result<Option<T::Value>, MetaError> {
        let cf = self.cf::<T>()?;
        match self.db.get_pinned_cf(cf, key.to_key())? {
            None => Ok(None),
            Some(v) => decode::<T>(&v).map(Some),
        }
    }

    /// True if the key is present.
    pub fn contains<T: Table>(&self, key: &T::Key) -> Result<bool, MetaError> {
        let cf = self.cf::<T>()?;
        Ok(self.db.get_pinned_cf(cf, key.to_key())?.is_some())
    }

    /// Writes one record (synced).
    pub fn put<T: Table>(&self, key: &T::Key, value: &T::Value) -> Result<(), MetaError> {
        let mut b = self.batch();
        b.put::<T>(key, value)?;
        self.write(b)
    }

    /// Deletes one record (synced).
    pub fn delete<T: Table>(&self, key: &T::Key) -> Result<(), MetaError> {
        let mut b = self.batch();
        b.delete::<T>(key)?;
        self.write(b)
    }

    /// Every record of a table, in key order. A record that does not decode is an error.
    pub fn scan<T: Table>(&self) -> Result<Records<T>, MetaError> {
        let cf = self.cf::<T>()?;
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf, rocksdb::IteratorMode::Start) {
            let (k, v) = item?;
            let key = T::Key::from_key(&k).ok_or(MetaError::Key(T::NAME))?;
            out.push((key, decode::<T>(&v)?));
        }
        Ok(out)
    }

    /// A batch of writes applied together by [`MetaDb::write`].
    pub fn batch(&self) -> MetaBatch<'_> {
        MetaBatch {
            db: self,
            batch: WriteBatch::default(),
            _p: PhantomData,
        }
    }

    /// Applies a batch atomically with a synced WAL.
    pub fn write(&self, batch: MetaBatch<'_>) -> Result<(), MetaError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch.batch, &wo)?;
        Ok(())
    }
}

fn decode<T: Table>(bytes: &[u8]) -> Result<T::Value, MetaError> {
    postcard::from_bytes(bytes).map_err(|source| MetaError::Decode {
        table: T::NAME,
        source,
    })
}

/// Writes collected for one atomic [`MetaDb::write`].
pub struct MetaBatch<'a> {
    db: &'a MetaDb,
    batch: WriteBatch,
    _p: PhantomData<&'a ()>,
}

impl MetaBatch<'_> {
    /// Adds a put.
    pub fn put<T: Table>(&mut self, key: &T::Key, value: &T::Value) -> Result<(), MetaError> {
        let cf = self.db.cf::<T>()?;
        // Encoding plain serde data into a Vec does not fail.
        let bytes = postcard::to_stdvec(value).unwrap_or_default();
        self.batch.put_cf(cf, key.to_key(), bytes);
        Ok(())
    }

    /// Adds a delete.
    pub fn delete<T: Table>(&mut self, key: &T::Key) -> Result<(), MetaError> {
        let cf = self.db.cf::<T>()?;
        self.batch.delete_cf(cf, key.to_key());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Notes;
    impl Table for Notes {
        const NAME: &'static str = "notes";
        type Key = Digest;
        type Value = Vec<String>;
    }

    struct Tags;
    impl Table for Tags {
        const NAME: &'static str = "tags";
        type Key = String;
        type Value = Digest;
    }

    #[test]
    fn typed_tables_round_trip_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let d = Digest::of(b"k");
        {
            let db = MetaDb::open(dir.path(), &["notes", "tags"]).unwrap();
            let mut b = db.batch();
            b.put::<Notes>(&d, &vec!["a".into()]).unwrap();
            b.put::<Tags>(&"repo:latest".to_string(), &d).unwrap();
            db.write(b).unwrap();
            assert_eq!(db.get::<Notes>(&d).unwrap(), Some(vec!["a".to_string()]));
        }
        let db = MetaDb::open(dir.path(), &["notes", "tags"]).unwrap();
        assert_eq!(db.get::<Tags>(&"repo:latest".to_string()).unwrap(), Some(d));
        assert_eq!(db.scan::<Notes>().unwrap().len(), 1);
        db.delete::<Notes>(&d).unwrap();
        assert!(!db.contains::<Notes>(&d).unwrap());
    }
}
