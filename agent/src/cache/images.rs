//! Blob layouts, image records and pins.
//!
//! Writes that can widen what eviction must spare (blob layouts, images, pins) take the
//! eviction lock, so once they return no running eviction works from an older view.

use super::locks::lock;
use super::tables::{unix_now, Blobs, ImageRecord, Images, PinRecord, Pins};
use super::{CacheError, ChunkCache};
use imgd_core::{ChunkList, Digest};

fn check_reference(reference: &str) -> Result<String, CacheError> {
    if reference.trim().is_empty() {
        return Err(CacheError::InvalidReference(reference.to_string()));
    }
    Ok(reference.to_string())
}

impl ChunkCache {
    /// Records how a blob is cut into chunks, after checking the layout. It may (and,
    /// for protection to cover them, should) be recorded before the chunks are fetched.
    pub fn put_blob(&self, list: &ChunkList) -> Result<(), CacheError> {
        list.validate()?;
        let _eviction = lock(&self.eviction);
        self.meta
            .put::<Blobs>(&list.blob, list)
            .map_err(|e| CacheError::meta("recording a blob", e))
    }

    /// The chunk list of a blob, if recorded.
    pub fn blob(&self, digest: &Digest) -> Result<Option<ChunkList>, CacheError> {
        Ok(self.meta.get::<Blobs>(digest)?)
    }

    /// Bytes of the blob whose chunks are cached (equal to `list.size` when all are).
    pub fn blob_cached_bytes(&self, list: &ChunkList) -> u64 {
        let index = self.index();
        list.chunks
            .iter()
            .filter(|c| index.contains(&c.digest))
            .map(|c| u64::from(c.size))
            .sum()
    }

    /// Positions in `list.chunks` of the chunks not cached.
    pub fn missing_chunks(&self, list: &ChunkList) -> Vec<usize> {
        let index = self.index();
        (0..list.chunks.len())
            .filter(|&i| !index.contains(&list.chunks[i].digest))
            .collect()
    }

    /// Records (or replaces) the image known by `reference`.
    pub fn put_image(&self, reference: &str, image: &ImageRecord) -> Result<(), CacheError> {
        let key = check_reference(reference)?;
        let _eviction = lock(&self.eviction);
        self.meta
            .put::<Images>(&key, image)
            .map_err(|e| CacheError::meta("recording an image", e))
    }

    /// The image known by `reference`, if recorded.
    pub fn image(&self, reference: &str) -> Result<Option<ImageRecord>, CacheError> {
        Ok(self.meta.get::<Images>(&reference.to_string())?)
    }

    /// Every recorded image, by reference order.
    pub fn images(&self) -> Result<Vec<(String, ImageRecord)>, CacheError> {
        Ok(self.meta.scan::<Images>()?)
    }

    /// Forgets the image record of `reference` (its chunks become evictable unless
    /// another pinned or protected blob shares them). A pin of the reference is kept.
    /// True if it was recorded.
    pub fn remove_image(&self, reference: &str) -> Result<bool, CacheError> {
        let key = reference.to_string();
        if !self.meta.contains::<Images>(&key)? {
            return Ok(false);
        }
        self.meta
            .delete::<Images>(&key)
            .map_err(|e| CacheError::meta("removing an image", e))?;
        Ok(true)
    }

    /// Pins `reference`: the chunks of the blobs of the image recorded under it are never
    /// evicted. A reference may be pinned before its image is recorded (e.g. pinned from
    /// configuration, then pulled). Pinning again replaces the reason and time.
    pub fn pin(&self, reference: &str, reason: &str) -> Result<(), CacheError> {
        let key = check_reference(reference)?;
        let record = PinRecord {
            reason: reason.to_string(),
            pinned_at: unix_now(),
        };
        let _eviction = lock(&self.eviction);
        self.meta
            .put::<Pins>(&key, &record)
            .map_err(|e| CacheError::meta("pinning an image", e))
    }

    /// Removes the pin of `reference`; true if it was pinned.
    pub fn unpin(&self, reference: &str) -> Result<bool, CacheError> {
        let key = reference.to_string();
        if !self.meta.contains::<Pins>(&key)? {
            return Ok(false);
        }
        self.meta
            .delete::<Pins>(&key)
            .map_err(|e| CacheError::meta("unpinning an image", e))?;
        Ok(true)
    }

    /// The pin of `reference`, if pinned.
    pub fn pin_of(&self, reference: &str) -> Result<Option<PinRecord>, CacheError> {
        Ok(self.meta.get::<Pins>(&reference.to_string())?)
    }

    /// Every pin, by reference order.
    pub fn pins(&self) -> Result<Vec<(String, PinRecord)>, CacheError> {
        Ok(self.meta.scan::<Pins>()?)
    }
}
