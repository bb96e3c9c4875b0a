//! How a manager writes a session or checkpoint: as one file, or (with chunked storage,
//! [`super::SessionManager::with_chunked_storage`]) as a chunk manifest whose chunks stay pinned in the chunk
//! store for as long as a stored manifest names them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::ids::CHECKPOINT_SEPARATOR;
use super::live::lock;
use super::records::read_stored_header;
use crate::chunks::{ChunkKey, ChunkStore, PrefixCache};
use crate::context::Context;
use crate::error::Result;
use crate::session::Metadata;
use crate::signing::SessionKey;
use crate::store::SessionStore;

/// The chunks each stored manifest names (by store key), each pinned once in the chunk store.
#[derive(Debug)]
pub(super) struct ChunkPins {
    chunks: Arc<dyn ChunkStore>,
    by_key: Mutex<HashMap<String, Vec<ChunkKey>>>,
}

impl ChunkPins {
    /// Pins of what the manifests in `store` name now.
    pub(super) fn scan(chunks: Arc<dyn ChunkStore>, store: &dyn SessionStore) -> Result<ChunkPins> {
        let named = stored_manifest_chunks(store)?;
        let mut by_key = HashMap::new();
        for (key, keys) in named {
            chunks.pin(&keys);
            by_key.insert(key, keys);
        }
        Ok(ChunkPins {
            chunks,
            by_key: Mutex::new(by_key),
        })
    }

    /// The value of `store_key` now names `keys` (already pinned once for it): the chunks it named before
    /// are unpinned.
    fn replace(&self, store_key: &str, keys: Vec<ChunkKey>) {
        let old = lock(&self.by_key).insert(store_key.to_owned(), keys);
        if let Some(old) = old {
            self.chunks.unpin(&old);
        }
    }

    /// The value of `store_key` is gone or names no chunk.
    fn release(&self, store_key: &str) {
        let old = lock(&self.by_key).remove(store_key);
        if let Some(old) = old {
            self.chunks.unpin(&old);
        }
    }

    /// Session `id` and its checkpoints are deleted.
    pub(super) fn release_session(&self, id: &str) {
        let checkpoint_prefix = format!("{id}{CHECKPOINT_SEPARATOR}");
        let gone: Vec<String> = lock(&self.by_key)
            .keys()
            .filter(|k| *k == id || k.starts_with(&checkpoint_prefix))
            .cloned()
            .collect();
        for key in gone {
            self.release(&key);
        }
    }
}

/// The chunks each manifest in `store` names, by store key, read from the headers (sessions and
/// checkpoints; a value that cannot be read names nothing: loading it fails anyway, or decodes again what
/// is missing).
pub fn stored_manifest_chunks(store: &dyn SessionStore) -> Result<Vec<(String, Vec<ChunkKey>)>> {
    let mut out = Vec::new();
    for entry in store.list()? {
        let Ok(header) = read_stored_header(store, &entry.key) else {
            continue;
        };
        let Some(manifest) = header.chunks else {
            continue;
        };
        let keys = manifest
            .chunks
            .iter()
            .filter_map(|c| ChunkKey::from_hex(&c.key))
            .collect();
        out.push((entry.key, keys));
    }
    Ok(out)
}

/// Pins in `cache` every chunk the manifests in `store` name (for as long as the cache's store lives), so
/// that its eviction and `gc` spare them: what a tool that collects a manager's chunk directory does
/// (`llama-sessions cache gc`). Returns how many chunks are named.
pub fn pin_stored_chunks(cache: &PrefixCache, store: &dyn SessionStore) -> Result<usize> {
    let mut named = 0;
    for (_, keys) in stored_manifest_chunks(store)? {
        cache.store().pin(&keys);
        named += keys.len();
    }
    Ok(named)
}

/// Writes session and checkpoint values: signed with `key` if given; as manifests when `pins` is given and
/// the context can write them (its memory is one plain KV cache), as one file otherwise.
#[derive(Clone, Copy)]
pub(super) struct SessionWriter<'a> {
    pub(super) key: Option<&'a SessionKey>,
    pub(super) pins: Option<&'a ChunkPins>,
}

impl SessionWriter<'_> {
    /// Writes `context` with `metadata` as the value of `store_key`; the caller holds the key's lock.
    pub(super) fn put(
        &self,
        store: &dyn SessionStore,
        store_key: &str,
        context: &Context,
        metadata: &Metadata,
    ) -> Result<()> {
        match self.pins.filter(|_| context.writes_manifests()) {
            Some(pins) => {
                let manifest = context.manifest_snapshot(metadata, self.key)?;
                match store.put(store_key, &manifest.bytes) {
                    Ok(()) => {
                        pins.replace(store_key, manifest.pinned);
                        Ok(())
                    }
                    Err(e) => {
                        pins.chunks.unpin(&manifest.pinned);
                        Err(e)
                    }
                }
            }
            None => {
                let bytes = context.snapshot(None, metadata, self.key)?;
                store.put(store_key, &bytes)?;
                if let Some(pins) = self.pins {
                    pins.release(store_key);
                }
                Ok(())
            }
        }
    }
}
