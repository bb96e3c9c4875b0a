//! `llama_sessions.PrefixCache`: content-addressed KV chunks shared by contexts (the core's
//! `chunks::PrefixCache`).

use std::path::PathBuf;
use std::sync::Arc;

use llama_sessions::chunks::{CacheStats, GcReport, DEFAULT_CHUNK_TOKENS};
use llama_sessions::manager::pin_stored_chunks;
use llama_sessions::{DirectoryStore, Error, PrefixCache, SessionStore};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::to_py;
use crate::native::native;

/// Bytes of chunks a cache keeps unless told otherwise: 1 GiB.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;

/// A cache of content-addressed KV chunks shared by Contexts (see docs/prefix-cache.md).
///
/// A sequence's KV cache is cut into chunks of ``chunk_tokens`` tokens; a chunk's key is a BLAKE3 hash of
/// its parent chunk's key, its token ids and everything that shapes its bytes (model fingerprint, KV types,
/// flash attention, llama.cpp build, layout, ``namespace``). A chunk whose bytes fail their checks (length,
/// checksum, key, layout) is removed and its prefix decoded again, never trusted.
///
/// A cache in directory ``path`` (one ``.kvchunk`` file per chunk, created if missing), or in this
/// process's memory without a path; at most ``max_bytes`` of chunks, the least recently used evicted
/// first. Chunks of one ``namespace`` never match in another.
///
/// Raises InvalidParameterError for ``max_bytes < 1``, ``chunk_tokens`` outside 1..65536 or a namespace
/// over 1024 bytes; StorageError when the directory cannot be created or read.
#[pyclass(name = "PrefixCache", module = "llama_sessions._native", frozen)]
pub struct PyPrefixCache {
    pub(crate) inner: PrefixCache,
}

fn stats_dict<'py>(py: Python<'py>, s: CacheStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("entries", s.entries)?;
    d.set_item("bytes", s.bytes)?;
    d.set_item("max_bytes", s.max_bytes)?;
    d.set_item("hits", s.hits)?;
    d.set_item("misses", s.misses)?;
    d.set_item("corrupt", s.corrupt)?;
    d.set_item("puts", s.puts)?;
    d.set_item("evictions", s.evictions)?;
    Ok(d)
}

fn gc_dict<'py>(py: Python<'py>, r: GcReport) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("removed_corrupt", r.removed_corrupt)?;
    d.set_item("evicted", r.evicted)?;
    d.set_item("kept", r.kept)?;
    d.set_item("bytes", r.bytes)?;
    Ok(d)
}

impl PyPrefixCache {
    /// The default cache of a SessionManager's chunked storage: `dir`, default bound and chunk length.
    pub(crate) fn in_dir(py: Python<'_>, dir: PathBuf) -> PyResult<Self> {
        let inner = native(py, |_| {
            PrefixCache::on_disk(dir, DEFAULT_MAX_BYTES, DEFAULT_CHUNK_TOKENS, "")
        })?;
        Ok(PyPrefixCache { inner })
    }

    /// `local` as the local tier in front of the chunks of a remote store (see `PrefixCache::tiered`).
    pub(crate) fn tiered(
        py: Python<'_>,
        local: &PyPrefixCache,
        chunks: Arc<dyn SessionStore>,
    ) -> PyResult<Self> {
        let inner = native(py, |_| PrefixCache::tiered(&local.inner, chunks))?;
        Ok(PyPrefixCache { inner })
    }

    /// The cache of a SessionManager's chunked storage in a remote store (its KV chunks, shared by the
    /// workers): never evicted by a worker, since a chunk may be named by a session another worker saved.
    pub(crate) fn in_store(py: Python<'_>, chunks: Arc<dyn SessionStore>) -> PyResult<Self> {
        let inner = native(py, |_| {
            PrefixCache::in_store(chunks, u64::MAX, DEFAULT_CHUNK_TOKENS, "")
        })?;
        Ok(PyPrefixCache { inner })
    }
}

#[pymethods]
impl PyPrefixCache {
    #[new]
    #[pyo3(
        signature = (path = None, *, max_bytes = DEFAULT_MAX_BYTES as i64, chunk_tokens = DEFAULT_CHUNK_TOKENS as i64, namespace = String::new()),
        text_signature = "(path=None, *, max_bytes=1073741824, chunk_tokens=256, namespace='')"
    )]
    fn new(
        py: Python<'_>,
        path: Option<PathBuf>,
        max_bytes: i64,
        chunk_tokens: i64,
        namespace: String,
    ) -> PyResult<Self> {
        let max_bytes = u64::try_from(max_bytes)
            .ok()
            .filter(|&b| b > 0)
            .ok_or_else(|| to_py(Error::invalid("max_bytes", "max_bytes >= 1", max_bytes)))?;
        let chunk_tokens = usize::try_from(chunk_tokens).map_err(|_| {
            to_py(Error::invalid(
                "chunk_tokens",
                format!(
                    "1 <= chunk_tokens <= {}",
                    llama_sessions::chunks::MAX_CHUNK_TOKENS
                ),
                chunk_tokens,
            ))
        })?;
        let inner = native(py, |_| match path {
            Some(dir) => PrefixCache::on_disk(dir, max_bytes, chunk_tokens, &namespace),
            None => PrefixCache::in_memory(max_bytes, chunk_tokens, &namespace),
        })?;
        Ok(PyPrefixCache { inner })
    }

    /// The directory of an on-disk cache; None in memory.
    #[getter]
    fn path(&self) -> Option<PathBuf> {
        self.inner.dir().map(PathBuf::from)
    }

    /// Tokens per chunk.
    #[getter]
    fn chunk_tokens(&self) -> usize {
        self.inner.chunk_tokens()
    }

    /// The namespace chunk keys are derived in.
    #[getter]
    fn namespace(&self) -> &str {
        self.inner.namespace()
    }

    /// The bound on the bytes of chunks kept.
    #[getter]
    fn max_bytes(&self) -> u64 {
        self.inner.stats().max_bytes
    }

    /// ``entries``, ``bytes``, ``max_bytes``, and this process's ``hits``, ``misses``, ``corrupt`` (chunks
    /// found unsound and removed), ``puts`` and ``evictions``.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let cache = self.inner.clone();
        let stats = native(py, move |_| Ok(cache.stats()))?;
        stats_dict(py, stats)
    }

    /// Re-reads the directory, removes chunks whose bytes fail their checks and evicts down to
    /// ``max_bytes``: returns ``removed_corrupt``, ``evicted``, ``kept`` and ``bytes``.
    fn gc<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let cache = self.inner.clone();
        let report = native(py, move |_| cache.gc())?;
        gc_dict(py, report)
    }

    /// Never evict (here or in gc()) the chunks that the sessions stored in ``session_dir`` name: what a
    /// SessionManager with ``storage="chunks"`` does for its own cache, for a tool that collects that cache
    /// by itself (``llama-sessions cache gc``). Holds for this PrefixCache object. Returns how many chunks
    /// the sessions name; InvalidParameterError if ``session_dir`` is not a directory.
    fn pin_sessions(&self, py: Python<'_>, session_dir: PathBuf) -> PyResult<usize> {
        let cache = self.inner.clone();
        native(py, move |_| {
            if !session_dir.is_dir() {
                return Err(Error::invalid(
                    "session_dir",
                    "an existing session directory",
                    session_dir.display(),
                ));
            }
            let store = DirectoryStore::open(session_dir)?;
            pin_stored_chunks(&cache, &store)
        })
    }

    /// Removes every chunk; returns how many. Sessions whose manifests named them decode those tokens
    /// again when they are loaded.
    fn clear(&self, py: Python<'_>) -> PyResult<u64> {
        let cache = self.inner.clone();
        native(py, move |_| cache.clear())
    }

    fn __repr__(&self) -> String {
        let place = match self.inner.dir() {
            Some(dir) => format!("{:?}", dir.display().to_string()),
            None => "in memory".to_owned(),
        };
        format!(
            "PrefixCache({place}, chunk_tokens={}, namespace={:?})",
            self.inner.chunk_tokens(),
            self.inner.namespace()
        )
    }
}
