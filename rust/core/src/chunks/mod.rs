//! Content-addressed KV chunks: a sequence's KV cache cut into chunks of `C` tokens, each stored under a
//! key that names its whole prefix and everything that shapes its bytes, so that any prompt restores the
//! longest prefix ever computed and a shared prefix is stored once. See docs/prefix-cache.md.
//!
//! - [`key`]: the chained BLAKE3 key of a chunk ([`ChunkScope`], [`ChunkKey`]);
//! - [`codec`]: a chunk's bytes, sliced from llama.cpp's per-sequence state and assembled back, byte for
//!   byte;
//! - [`store`]: where chunks live (memory, or a [`crate::SessionStore`] such as a directory), bounded by
//!   bytes with LRU eviction;
//! - [`PrefixCache`]: what a [`crate::Context`] is given to use all of it.
//!
//! Only models whose memory is one plain KV cache use the cache; for sliding-window, hybrid and recurrent
//! memories a context simply does not consult it (their state is not a per-token slice).

pub mod codec;
pub mod key;
pub mod store;

use std::path::PathBuf;
use std::sync::Arc;

pub use key::{ChunkKey, ChunkScope};
pub use store::{
    CacheStats, ChunkStore, GcReport, MemoryChunkStore, StoreChunkStore, TieredChunkStore,
};

use crate::error::{Error, Result};

/// Tokens per chunk unless the cache is made with another length.
pub const DEFAULT_CHUNK_TOKENS: usize = 256;
/// Most tokens per chunk (a chunk records its cell count as u32; larger chunks only lose reuse).
pub const MAX_CHUNK_TOKENS: usize = 1 << 16;
/// Longest namespace, in bytes.
pub const MAX_NAMESPACE_LEN: usize = 1024;

/// A chunk store with the chunk length and namespace contexts use it with. Cheap to clone: clones share the
/// store. Give the same cache to several contexts (of one model or of several: the keys keep them apart).
#[derive(Debug, Clone)]
pub struct PrefixCache {
    store: Arc<dyn ChunkStore>,
    chunk_tokens: usize,
    namespace: String,
    dir: Option<PathBuf>,
}

impl PrefixCache {
    /// A cache over `store`, cutting sequences into chunks of `chunk_tokens` tokens, keyed in `namespace`
    /// (chunks of one namespace never match in another).
    pub fn new(
        store: Arc<dyn ChunkStore>,
        chunk_tokens: usize,
        namespace: &str,
    ) -> Result<PrefixCache> {
        if !(1..=MAX_CHUNK_TOKENS).contains(&chunk_tokens) {
            return Err(Error::invalid(
                "chunk_tokens",
                format!("1 <= chunk_tokens <= {MAX_CHUNK_TOKENS}"),
                chunk_tokens,
            ));
        }
        if namespace.len() > MAX_NAMESPACE_LEN {
            return Err(Error::invalid(
                "namespace",
                format!("at most {MAX_NAMESPACE_LEN} bytes"),
                format!("{} bytes", namespace.len()),
            ));
        }
        Ok(PrefixCache {
            store,
            chunk_tokens,
            namespace: namespace.to_owned(),
            dir: None,
        })
    }

    /// A cache in this process's memory, at most `max_bytes` of chunks.
    pub fn in_memory(max_bytes: u64, chunk_tokens: usize, namespace: &str) -> Result<PrefixCache> {
        PrefixCache::new(
            Arc::new(MemoryChunkStore::new(max_bytes)),
            chunk_tokens,
            namespace,
        )
    }

    /// A cache of files `<key>.kvchunk` in `dir` (created if missing), at most `max_bytes` of them.
    pub fn on_disk(
        dir: impl Into<PathBuf>,
        max_bytes: u64,
        chunk_tokens: usize,
        namespace: &str,
    ) -> Result<PrefixCache> {
        let dir = dir.into();
        let store = StoreChunkStore::open_dir(&dir, max_bytes)?;
        let mut cache = PrefixCache::new(Arc::new(store), chunk_tokens, namespace)?;
        cache.dir = Some(dir);
        Ok(cache)
    }

    /// A cache of chunks in `store` (one value per chunk, keyed by its 64 hex digits), at most `max_bytes`
    /// of them: a store several workers share, such as [`crate::RedisStore::chunks`].
    pub fn in_store(
        store: Arc<dyn crate::store::SessionStore>,
        max_bytes: u64,
        chunk_tokens: usize,
        namespace: &str,
    ) -> Result<PrefixCache> {
        let store = StoreChunkStore::open(store, max_bytes)?;
        PrefixCache::new(Arc::new(store), chunk_tokens, namespace)
    }

    /// A cache of the chunks in the shared `store`, with `local` (its chunk length and namespace, and its
    /// chunks) as a local tier in front of it ([`TieredChunkStore`]): chunks read from `store` are kept in
    /// `local`, within its bound; `store` keeps every chunk.
    pub fn tiered(
        local: &PrefixCache,
        store: Arc<dyn crate::store::SessionStore>,
    ) -> Result<PrefixCache> {
        let remote = StoreChunkStore::open(store, u64::MAX)?;
        let tiers = TieredChunkStore::new(Arc::clone(&local.store), Arc::new(remote));
        let mut cache = PrefixCache::new(Arc::new(tiers), local.chunk_tokens, &local.namespace)?;
        cache.dir = local.dir.clone();
        Ok(cache)
    }

    /// The chunk store.
    pub fn store(&self) -> &Arc<dyn ChunkStore> {
        &self.store
    }

    /// Tokens per chunk.
    pub fn chunk_tokens(&self) -> usize {
        self.chunk_tokens
    }

    /// The namespace keys are derived in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The directory of an on-disk cache.
    pub fn dir(&self) -> Option<&std::path::Path> {
        self.dir.as_deref()
    }

    /// Counts of the store.
    pub fn stats(&self) -> CacheStats {
        self.store.stats()
    }

    /// See [`ChunkStore::gc`].
    pub fn gc(&self) -> Result<GcReport> {
        self.store.gc()
    }

    /// Removes every chunk; returns how many.
    pub fn clear(&self) -> Result<u64> {
        self.store.clear()
    }
}
