//! Where chunks live: in memory, or one file per chunk behind the [`SessionStore`] seam (a directory here,
//! another backend later), both bounded by bytes with least-recently-used eviction.
//!
//! A store holds bytes only; whether they are a sound chunk for a given prefix is decided by the reader
//! ([`super::codec::parse_chunk`]), which removes what fails ([`ChunkStore::remove`]) and recomputes it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::codec::check_integrity;
use super::key::ChunkKey;
use crate::error::Result;
use crate::store::{DirectoryStore, SessionStore};

/// Largest chunk `gc` reads to check it (a 256-token chunk of a 70B model in f16 is 80 MiB); a larger value
/// is no chunk this crate wrote, and is removed as corrupt.
pub const MAX_CHUNK_BYTES: usize = 1 << 30;

/// Suffix of chunk files in a directory store.
pub const CHUNK_SUFFIX: &str = ".kvchunk";

/// Counts of a chunk store. `entries`, `bytes` and `max_bytes` describe the store; the others count this
/// process's calls since the store was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheStats {
    /// Chunks held.
    pub entries: u64,
    /// Bytes held.
    pub bytes: u64,
    /// The bound on `bytes`.
    pub max_bytes: u64,
    /// Lookups that found a sound chunk.
    pub hits: u64,
    /// Lookups that found nothing.
    pub misses: u64,
    /// Chunks found unsound (truncated, checksum, another key or layout) and removed.
    pub corrupt: u64,
    /// Chunks written.
    pub puts: u64,
    /// Chunks evicted to stay within `max_bytes`.
    pub evictions: u64,
}

/// What [`ChunkStore::gc`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GcReport {
    /// Chunks removed because their bytes failed the integrity check.
    pub removed_corrupt: u64,
    /// Chunks evicted to get within the byte bound.
    pub evicted: u64,
    /// Chunks kept.
    pub kept: u64,
    /// Bytes kept.
    pub bytes: u64,
}

/// Chunks by key. Implementations are shared between contexts and threads.
pub trait ChunkStore: Send + Sync + std::fmt::Debug {
    /// The bytes of `key` (unverified), or None; a hit makes the chunk the most recently used. At most
    /// `max_len + 1` bytes are read (the reader knows the length a sound chunk has): a longer value comes back
    /// cut, `max_len + 1` bytes, and fails the reader's length check, so that a hostile file of any size
    /// costs no more memory than a sound chunk.
    fn get(&self, key: &ChunkKey, max_len: usize) -> Result<Option<Vec<u8>>>;
    /// Whether `key` is held (as far as this process knows), without counting a lookup.
    fn contains(&self, key: &ChunkKey) -> bool;
    /// Stores `bytes` under `key`, then evicts least recently used chunks until within the bound.
    fn put(&self, key: &ChunkKey, bytes: &[u8]) -> Result<()>;
    /// Removes a chunk a reader found unsound; counted as corrupt.
    fn remove_corrupt(&self, key: &ChunkKey) -> Result<()>;
    /// Counts a lookup that found a sound chunk (the reader decides soundness).
    fn record_hit(&self);
    /// Counts.
    fn stats(&self) -> CacheStats;
    /// Re-reads what the backing store holds, removes chunks whose bytes fail the integrity check
    /// (length, checksum, the key they record), and evicts down to the bound.
    fn gc(&self) -> Result<GcReport>;
    /// Removes every chunk; returns how many.
    fn clear(&self) -> Result<u64>;
    /// Marks chunks a stored session needs (counted: each pin needs its unpin): eviction and `gc` never
    /// remove them, even beyond the byte bound. Keys need not be held yet.
    fn pin(&self, keys: &[ChunkKey]);
    /// Takes back one [`ChunkStore::pin`] of each key.
    fn unpin(&self, keys: &[ChunkKey]);
    /// Whether chunks outlive this process (a store that sessions' manifests may name).
    fn is_persistent(&self) -> bool;
}

/// Least-recently-used order and sizes.
#[derive(Debug, Default)]
struct Lru {
    entries: HashMap<ChunkKey, (u64, u64)>,
    order: BTreeMap<u64, ChunkKey>,
    bytes: u64,
    tick: u64,
    /// How many times each key is pinned (see [`ChunkStore::pin`]); pinned keys are never over budget.
    pins: HashMap<ChunkKey, u64>,
}

impl Lru {
    fn touch(&mut self, key: &ChunkKey) -> bool {
        let Some((tick, _)) = self.entries.get_mut(key) else {
            return false;
        };
        self.order.remove(tick);
        self.tick += 1;
        *tick = self.tick;
        self.order.insert(self.tick, *key);
        true
    }

    fn insert(&mut self, key: ChunkKey, size: u64) {
        self.remove(&key);
        self.tick += 1;
        self.entries.insert(key, (self.tick, size));
        self.order.insert(self.tick, key);
        self.bytes += size;
    }

    fn remove(&mut self, key: &ChunkKey) -> bool {
        match self.entries.remove(key) {
            Some((tick, size)) => {
                self.order.remove(&tick);
                self.bytes -= size;
                true
            }
            None => false,
        }
    }

    /// The least recently used unpinned keys to drop to get within `max_bytes` (or as near as the pinned
    /// chunks allow).
    fn over_budget(&self, max_bytes: u64) -> Vec<ChunkKey> {
        let mut bytes = self.bytes;
        let mut out = Vec::new();
        for key in self.order.values() {
            if bytes <= max_bytes {
                break;
            }
            if self.pins.contains_key(key) {
                continue;
            }
            bytes -= self.entries[key].1;
            out.push(*key);
        }
        out
    }

    fn pin(&mut self, keys: &[ChunkKey]) {
        for key in keys {
            *self.pins.entry(*key).or_insert(0) += 1;
        }
    }

    fn unpin(&mut self, keys: &[ChunkKey]) {
        for key in keys {
            if let Some(count) = self.pins.get_mut(key) {
                *count -= 1;
                if *count == 0 {
                    self.pins.remove(key);
                }
            }
        }
    }

    /// Forgets what is held but keeps the pins (they describe sessions, not the index).
    fn emptied(&mut self) -> Lru {
        Lru {
            pins: std::mem::take(&mut self.pins),
            ..Lru::default()
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    corrupt: AtomicU64,
    puts: AtomicU64,
    evictions: AtomicU64,
}

impl Counters {
    fn stats(&self, lru: &Lru, max_bytes: u64) -> CacheStats {
        CacheStats {
            entries: lru.entries.len() as u64,
            bytes: lru.bytes,
            max_bytes,
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            corrupt: self.corrupt.load(Ordering::Relaxed),
            puts: self.puts.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
        }
    }
}

/// The recency order and the bytes of a [`MemoryChunkStore`].
type Held = (Lru, HashMap<ChunkKey, Arc<Vec<u8>>>);

/// Chunks in this process's memory, at most `max_bytes` of them.
#[derive(Debug)]
pub struct MemoryChunkStore {
    max_bytes: u64,
    inner: Mutex<Held>,
    counters: Counters,
}

impl MemoryChunkStore {
    /// An empty store bounded by `max_bytes`.
    pub fn new(max_bytes: u64) -> MemoryChunkStore {
        MemoryChunkStore {
            max_bytes,
            inner: Mutex::new((Lru::default(), HashMap::new())),
            counters: Counters::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl ChunkStore for MemoryChunkStore {
    fn get(&self, key: &ChunkKey, max_len: usize) -> Result<Option<Vec<u8>>> {
        let mut inner = self.lock();
        let (lru, map) = &mut *inner;
        if lru.touch(key) {
            Ok(map
                .get(key)
                .map(|b| b[..b.len().min(max_len.saturating_add(1))].to_vec()))
        } else {
            self.counters.misses.fetch_add(1, Ordering::Relaxed);
            Ok(None)
        }
    }

    fn contains(&self, key: &ChunkKey) -> bool {
        self.lock().1.contains_key(key)
    }

    fn put(&self, key: &ChunkKey, bytes: &[u8]) -> Result<()> {
        let mut inner = self.lock();
        let (lru, map) = &mut *inner;
        lru.insert(*key, bytes.len() as u64);
        map.insert(*key, Arc::new(bytes.to_vec()));
        self.counters.puts.fetch_add(1, Ordering::Relaxed);
        for old in lru.over_budget(self.max_bytes) {
            lru.remove(&old);
            map.remove(&old);
            self.counters.evictions.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn remove_corrupt(&self, key: &ChunkKey) -> Result<()> {
        let mut inner = self.lock();
        inner.0.remove(key);
        inner.1.remove(key);
        self.counters.corrupt.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn record_hit(&self) {
        self.counters.hits.fetch_add(1, Ordering::Relaxed);
    }

    fn stats(&self) -> CacheStats {
        self.counters.stats(&self.lock().0, self.max_bytes)
    }

    fn gc(&self) -> Result<GcReport> {
        let mut inner = self.lock();
        let (lru, map) = &mut *inner;
        let mut report = GcReport::default();
        let bad: Vec<ChunkKey> = map
            .iter()
            .filter(|(k, b)| check_integrity(b, k).is_err())
            .map(|(k, _)| *k)
            .collect();
        for key in bad {
            lru.remove(&key);
            map.remove(&key);
            report.removed_corrupt += 1;
        }
        for old in lru.over_budget(self.max_bytes) {
            lru.remove(&old);
            map.remove(&old);
            report.evicted += 1;
        }
        report.kept = lru.entries.len() as u64;
        report.bytes = lru.bytes;
        Ok(report)
    }

    fn clear(&self) -> Result<u64> {
        let mut inner = self.lock();
        let n = inner.1.len() as u64;
        let lru = inner.0.emptied();
        *inner = (lru, HashMap::new());
        Ok(n)
    }

    fn pin(&self, keys: &[ChunkKey]) {
        self.lock().0.pin(keys);
    }

    fn unpin(&self, keys: &[ChunkKey]) {
        self.lock().0.unpin(keys);
    }

    fn is_persistent(&self) -> bool {
        false
    }
}

/// One chunk per value of a [`SessionStore`] (keys are the chunks' 64 hex digits), at most `max_bytes` of
/// them. The recency order lives in this process; when opened it starts from the values' modification times
/// (oldest first), so a restart keeps an approximate order rather than forgetting what is on disk.
#[derive(Debug)]
pub struct StoreChunkStore {
    store: Arc<dyn SessionStore>,
    max_bytes: u64,
    lru: Mutex<Lru>,
    counters: Counters,
}

impl StoreChunkStore {
    /// Chunks as files `<key>.kvchunk` in `dir` (created if missing), written atomically and durably.
    pub fn open_dir(dir: impl Into<PathBuf>, max_bytes: u64) -> Result<StoreChunkStore> {
        let store = DirectoryStore::open_with_suffix(dir, CHUNK_SUFFIX)?;
        StoreChunkStore::open(Arc::new(store), max_bytes)
    }

    /// Chunks in `store`, indexed from what it lists now. Opening removes nothing: a store over its bound is
    /// brought within it by the next [`ChunkStore::put`] or [`ChunkStore::gc`].
    pub fn open(store: Arc<dyn SessionStore>, max_bytes: u64) -> Result<StoreChunkStore> {
        let chunks = StoreChunkStore {
            store,
            max_bytes,
            lru: Mutex::new(Lru::default()),
            counters: Counters::default(),
        };
        chunks.rescan()?;
        Ok(chunks)
    }

    /// Where the chunk of `key` lives, if the store has paths.
    pub fn location(&self, key: &ChunkKey) -> Option<PathBuf> {
        self.store.location(&key.to_hex())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.lru
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Rebuilds the index from the store's listing, oldest modification first.
    fn rescan(&self) -> Result<()> {
        let mut listed: Vec<_> = self
            .store
            .list()?
            .into_iter()
            .filter_map(|e| ChunkKey::from_hex(&e.key).map(|k| (e.modified, k, e.size)))
            .collect();
        listed.sort();
        let mut index = self.lock();
        let mut lru = index.emptied();
        for (_, key, size) in listed {
            lru.insert(key, size);
        }
        *index = lru;
        Ok(())
    }

    fn evict(&self) -> Result<u64> {
        let victims = self.lock().over_budget(self.max_bytes);
        for key in &victims {
            self.store.delete(&key.to_hex())?;
            self.lock().remove(key);
            self.counters.evictions.fetch_add(1, Ordering::Relaxed);
        }
        Ok(victims.len() as u64)
    }
}

impl ChunkStore for StoreChunkStore {
    fn get(&self, key: &ChunkKey, max_len: usize) -> Result<Option<Vec<u8>>> {
        match self
            .store
            .get_prefix(&key.to_hex(), max_len.saturating_add(1))?
        {
            Some(bytes) => {
                let mut lru = self.lock();
                if !lru.touch(key) {
                    // Written by another process since the index was built.
                    lru.insert(*key, bytes.len() as u64);
                }
                Ok(Some(bytes))
            }
            None => {
                self.lock().remove(key);
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
        }
    }

    fn contains(&self, key: &ChunkKey) -> bool {
        self.lock().entries.contains_key(key)
    }

    fn put(&self, key: &ChunkKey, bytes: &[u8]) -> Result<()> {
        self.store.put(&key.to_hex(), bytes)?;
        self.lock().insert(*key, bytes.len() as u64);
        self.counters.puts.fetch_add(1, Ordering::Relaxed);
        self.evict().map(|_| ())
    }

    fn remove_corrupt(&self, key: &ChunkKey) -> Result<()> {
        self.store.delete(&key.to_hex())?;
        self.lock().remove(key);
        self.counters.corrupt.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn record_hit(&self) {
        self.counters.hits.fetch_add(1, Ordering::Relaxed);
    }

    fn stats(&self) -> CacheStats {
        self.counters.stats(&self.lock(), self.max_bytes)
    }

    fn gc(&self) -> Result<GcReport> {
        self.rescan()?;
        let mut report = GcReport::default();
        let keys: Vec<ChunkKey> = self.lock().entries.keys().copied().collect();
        for key in keys {
            let sound = match self.store.get_prefix(&key.to_hex(), MAX_CHUNK_BYTES + 1)? {
                Some(bytes) => check_integrity(&bytes, &key).is_ok(),
                None => {
                    self.lock().remove(&key);
                    continue;
                }
            };
            if !sound {
                self.store.delete(&key.to_hex())?;
                self.lock().remove(&key);
                report.removed_corrupt += 1;
            }
        }
        report.evicted = self.evict()?;
        let lru = self.lock();
        report.kept = lru.entries.len() as u64;
        report.bytes = lru.bytes;
        Ok(report)
    }

    fn clear(&self) -> Result<u64> {
        self.rescan()?;
        let keys: Vec<ChunkKey> = self.lock().entries.keys().copied().collect();
        for key in &keys {
            self.store.delete(&key.to_hex())?;
        }
        let mut index = self.lock();
        let lru = index.emptied();
        *index = lru;
        Ok(keys.len() as u64)
    }

    fn pin(&self, keys: &[ChunkKey]) {
        self.lock().pin(keys);
    }

    fn unpin(&self, keys: &[ChunkKey]) {
        self.lock().unpin(keys);
    }

    fn is_persistent(&self) -> bool {
        true
    }
}

/// A local tier in front of a shared store: chunks read from `remote` are kept in `local` (bounded, evicted
/// least recently used first) once their bytes pass the integrity check, and chunks written go to both. The
/// remote store is the truth: a chunk is content-addressed and never changes, so a local copy cannot be
/// outdated, and a local copy that fails its check is removed and the chunk read from the remote store.
/// Pins (chunks stored sessions name) apply to the remote store; the local tier evicts freely.
#[derive(Debug)]
pub struct TieredChunkStore {
    local: Arc<dyn ChunkStore>,
    remote: Arc<dyn ChunkStore>,
}

impl TieredChunkStore {
    /// `local` in front of `remote`.
    pub fn new(local: Arc<dyn ChunkStore>, remote: Arc<dyn ChunkStore>) -> TieredChunkStore {
        TieredChunkStore { local, remote }
    }
}

impl ChunkStore for TieredChunkStore {
    fn get(&self, key: &ChunkKey, max_len: usize) -> Result<Option<Vec<u8>>> {
        if let Some(bytes) = self.local.get(key, max_len)? {
            if check_integrity(&bytes, key).is_ok() {
                self.local.record_hit();
                return Ok(Some(bytes));
            }
            // A local copy damaged since it was kept: dropped, and the chunk read again from the truth
            // (the reader would otherwise end the restored chain here and decode the rest again).
            self.local.remove_corrupt(key)?;
        }
        let fetched = self.remote.get(key, max_len)?;
        if let Some(bytes) = &fetched {
            // Only sound bytes are kept: a damaged remote value is left for the reader to reject and remove.
            if check_integrity(bytes, key).is_ok() {
                self.local.put(key, bytes)?;
            }
        }
        Ok(fetched)
    }

    fn contains(&self, key: &ChunkKey) -> bool {
        self.local.contains(key) || self.remote.contains(key)
    }

    fn put(&self, key: &ChunkKey, bytes: &[u8]) -> Result<()> {
        self.remote.put(key, bytes)?;
        self.local.put(key, bytes)
    }

    fn remove_corrupt(&self, key: &ChunkKey) -> Result<()> {
        if self.local.contains(key) {
            self.local.remove_corrupt(key)
        } else {
            self.remote.remove_corrupt(key)
        }
    }

    fn record_hit(&self) {
        self.remote.record_hit();
    }

    /// The shared store's counts (this process's lookups through the tiers).
    fn stats(&self) -> CacheStats {
        self.remote.stats()
    }

    /// The local tier's: the shared store is not this worker's to collect.
    fn gc(&self) -> Result<GcReport> {
        self.local.gc()
    }

    /// The local tier's: the shared store is not this worker's to clear.
    fn clear(&self) -> Result<u64> {
        self.local.clear()
    }

    fn pin(&self, keys: &[ChunkKey]) {
        self.remote.pin(keys);
    }

    fn unpin(&self, keys: &[ChunkKey]) {
        self.remote.unpin(keys);
    }

    fn is_persistent(&self) -> bool {
        self.remote.is_persistent()
    }
}

/// The directory of a chunk store's files, for messages.
pub fn chunk_path(dir: &Path, key: &ChunkKey) -> PathBuf {
    dir.join(format!("{}{CHUNK_SUFFIX}", key.to_hex()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u8) -> ChunkKey {
        ChunkKey([i; 32])
    }

    #[test]
    fn memory_store_evicts_least_recently_used_by_bytes() {
        let store = MemoryChunkStore::new(30);
        store.put(&key(1), &[1; 10]).unwrap();
        store.put(&key(2), &[2; 10]).unwrap();
        store.put(&key(3), &[3; 10]).unwrap();
        assert!(store.get(&key(1), 10).unwrap().is_some()); // 1 is now the most recent
                                                            // A read takes at most one byte more than the length asked for.
        assert_eq!(store.get(&key(1), 4).unwrap().unwrap().len(), 5);
        store.put(&key(4), &[4; 10]).unwrap(); // evicts 2
        assert!(store.contains(&key(1)) && store.contains(&key(3)) && store.contains(&key(4)));
        assert!(!store.contains(&key(2)));
        let stats = store.stats();
        assert_eq!(
            (stats.entries, stats.bytes, stats.evictions, stats.puts),
            (3, 30, 1, 4)
        );
        assert_eq!(store.clear().unwrap(), 3);
        assert_eq!(store.stats().bytes, 0);
    }

    #[test]
    fn directory_store_evicts_by_bytes_and_reindexes_after_a_restart() {
        let dir =
            std::env::temp_dir().join(format!("llama-sessions-chunks-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = StoreChunkStore::open_dir(&dir, 25).unwrap();
        store.put(&key(1), &[1; 10]).unwrap();
        store.put(&key(2), &[2; 10]).unwrap();
        store.put(&key(3), &[3; 10]).unwrap();
        assert!(!chunk_path(&dir, &key(1)).exists());
        assert!(chunk_path(&dir, &key(3)).exists());
        let reopened = StoreChunkStore::open_dir(&dir, 15).unwrap();
        assert_eq!((reopened.stats().entries, reopened.stats().bytes), (2, 20));
        // Over its bound after reopening with a smaller one: the next put evicts the oldest files.
        reopened.put(&key(4), &[4; 10]).unwrap();
        assert!(!chunk_path(&dir, &key(2)).exists() && !chunk_path(&dir, &key(3)).exists());
        assert_eq!(reopened.stats().evictions, 2);
        // Files that are not chunks are ignored; unsound chunks are removed by gc.
        std::fs::write(dir.join("notes.txt"), b"x").unwrap();
        let report = reopened.gc().unwrap();
        assert_eq!((report.removed_corrupt, report.kept), (1, 0)); // these test bytes are no chunk
        assert!(dir.join("notes.txt").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
