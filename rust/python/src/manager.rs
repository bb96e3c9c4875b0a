//! `llama_sessions._native.SessionManager` and its chat stream: conversions around the core's manager.
//! The Python class `llama_sessions.SessionManager` subclasses it and adds the asyncio variants. Every call
//! into the core goes through [`native`]: the GIL is released, Ctrl-C is polled, errors are converted.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use llama_sessions::{
    ChatTurn, DirectoryStore, Error, ListedSession, OverflowPolicy, PoolMemory, SessionManager,
    SessionStore, TurnWait,
};
use llama_sessions::{DEFAULT_MAX_TOKENS, DEFAULT_SAMPLING};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyDict;

use crate::context::{options, PyContext, PyGenerationStats};
use crate::errors::to_py;
use crate::model::{messages_from_py, PyModel};
use crate::native::{native, DetachedMutex};
use crate::params::PyContextParams;
use crate::prefix_cache::PyPrefixCache;
use crate::progress::StreamProgress;
use crate::session::{metadata_from_py, PySessionInfo};

/// Many named, persistent sessions for many users on one model. Use ``llama_sessions.SessionManager``
/// (this class plus asyncio variants).
///
/// Manage the sessions in ``session_dir`` (created if missing); every session's context uses
/// ``params`` changed by the overrides. At most ``max_live`` sessions stay loaded (a session leaving
/// memory is saved first if it changed, with or without autosave).
///
/// ``session_dir`` may also be a store URL shared by every worker that opens it:
/// ``"redis://[:PASSWORD@]HOST[:PORT][/DB]"`` (Redis or Valkey; ``rediss://`` over TLS, the server's
/// certificate checked against the system's authorities or those in ``$SSL_CERT_FILE``), or
/// ``"s3://BUCKET[/PREFIX][?OPTION=VALUE&...]"`` (S3-compatible object storage that supports conditional
/// writes; endpoint, region and credentials from the ``AWS_*`` environment variables or the URL's
/// options, such as ``endpoint``, ``region``, ``allow_http``). A session's lock there is a lease that runs
/// out after 30 seconds if its worker dies, and every save is version-checked under it (a lost race
/// raises SessionConflictError and writes nothing). With ``storage="chunks"`` (the default) their KV
/// chunks are in the same store, shared by every worker and never evicted by one; a ``prefix_cache``
/// given then is this worker's local tier in front of them (chunks read from the store are kept there,
/// within its ``max_bytes``). ``"file://DIR"`` is the directory DIR. RemoteStoreError when the store
/// cannot be reached; InvalidParameterError for a URL that is not one.
///
/// ``autosave`` (default True): every turn that changes a session (chat, stream_chat once the stream
/// ends, revert, trim_history) saves it before returning. With ``autosave=False`` sessions are saved by
/// save() and when they are evicted; what is still unsaved when the manager is garbage-collected or the
/// interpreter exits is lost, with an UnsavedSessionsWarning naming the sessions.
///
/// ``overflow``: what a chat turn does when its conversation plus the ``max_tokens`` reserved for the
/// answer do not fit in ``n_ctx``. "drop_oldest" (default) drops the oldest whole turns from the history,
/// keeping the system prompt, until it fits (the turn's ``last_stats.dropped_turns`` counts them);
/// "error" raises ContextFullError before the turn starts, changing nothing (then call trim_history()).
/// Either way ContextFullError, nothing changed, when the system prompt, the message and ``max_tokens``
/// alone do not fit. InvalidParameterError for any other value.
///
/// With ``secret_key`` (bytes, at least 16) every session and checkpoint is signed as it is written, and
/// one that is unsigned, modified or signed with another key raises SessionSignatureError when it is
/// loaded (see docs/reliability.md).
///
/// ``storage``: how sessions are stored. "chunks" (default): each session is a manifest naming its KV
/// chunks in a PrefixCache on disk, so that what sessions share (a system prompt, a document) is stored
/// once and computed once: every session context shares that cache, and a chat turn restores the longest
/// chain of full chunks any session computed for the same tokens and decodes only the rest. The cache is
/// ``prefix_cache`` if given (it must be on disk: PrefixCache(path)), else ``PrefixCache(session_dir /
/// "chunks")``; the chunks stored sessions name are never evicted. Sessions stored as one file are read
/// and written as manifests at their next save; export() writes a session as one file. "files": one
/// session file per session, as Context.save_session() writes them; ``prefix_cache`` (in memory or on
/// disk) is then only shared for prompts. Models whose memory is not one plain KV cache always use files.
/// See docs/prefix-cache.md.
///
/// ``batching=True`` runs the live sessions as the ``max_live`` sequences of one llama.cpp context,
/// allocated at once (``max_live`` x ``n_ctx`` cells): the turns of sessions chatting at the same time, from
/// several threads or asyncio tasks, are decoded together, one batch per step, and a long prompt is read
/// at most 128 tokens per step while others generate. Each session's Context and its files stay exactly
/// what they are without batching. Models whose memory is not one plain KV cache keep a context per
/// session. See docs/manager.md.
///
/// ``kv_cells`` (with ``batching=True``): the live sessions share one KV cache of this many cells (rounded up
/// to a multiple of 256) instead of ``n_ctx`` cells each, so memory follows what they hold. A turn reserves
/// the cells of its conversation and ``max_tokens`` before it starts, and when the cache is full the least
/// recently used idle session is saved and evicted to make room; ContextFullError when the sessions in
/// turns hold the rest. Each token's attention then walks every cell in use, so steps are slower than with
/// a stream per session (docs/benchmarks.md measures both).
#[pyclass(
    name = "SessionManager",
    module = "llama_sessions._native",
    subclass,
    frozen
)]
pub struct PySessionManager {
    inner: Arc<SessionManager>,
    model: Py<PyModel>,
    location: Location,
    prefix_cache: Option<Py<PyPrefixCache>>,
}

impl PySessionManager {
    fn context(&self, py: Python<'_>, session: &llama_sessions::ManagedSession) -> PyContext {
        PyContext::shared(Arc::clone(session.context()), self.model.clone_ref(py))
    }
}

/// `timeout=` of the calls that take a session's turn: None waits until the turn in progress ends, a number
/// of seconds waits at most that long (0: not at all).
fn turn_wait(timeout: Option<f64>) -> PyResult<TurnWait> {
    let Some(seconds) = timeout else {
        return Ok(TurnWait::UntilFree);
    };
    Duration::try_from_secs_f64(seconds)
        .map(TurnWait::AtMost)
        .map_err(|_| {
            to_py(Error::invalid(
                "timeout",
                "a number of seconds >= 0, or None to wait until the session is free",
                seconds,
            ))
        })
}

/// One stored session, as SessionManager.list() reports it. A file that cannot be read is listed with
/// ``error`` set and the other fields None.
#[pyclass(name = "StoredSession", module = "llama_sessions._native", frozen)]
pub struct PyStoredSession {
    listed: ListedSession,
}

fn datetime<'py>(py: Python<'py>, text: &str) -> PyResult<Option<Bound<'py, PyAny>>> {
    if text.is_empty() {
        return Ok(None);
    }
    py.import("datetime")?
        .getattr("datetime")?
        .call_method1("fromisoformat", (text,))
        .map(Some)
}

#[pymethods]
impl PyStoredSession {
    /// The session id.
    #[getter]
    fn id(&self) -> &str {
        &self.listed.id
    }

    /// Bytes of its file.
    #[getter]
    fn file_size(&self) -> u64 {
        self.listed.size
    }

    /// Tokens held.
    #[getter]
    fn token_count(&self) -> Option<usize> {
        self.listed
            .header
            .as_ref()
            .ok()
            .map(|h| h.sequences.iter().map(|s| s.tokens.len()).sum())
    }

    /// When the session was created (aware UTC datetime).
    #[getter]
    fn created_at<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        match self.listed.record() {
            Some(record) if !record.created_at.is_empty() => datetime(py, &record.created_at),
            _ => match &self.listed.header {
                Ok(header) => datetime(py, &header.created_at),
                Err(_) => Ok(None),
            },
        }
    }

    /// When it was last saved (aware UTC datetime).
    #[getter]
    fn updated_at<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        match &self.listed.header {
            Ok(header) => datetime(py, &header.created_at),
            Err(_) => Ok(None),
        }
    }

    /// The stored version: 1 after the first save, +1 per save.
    #[getter]
    fn version(&self) -> Option<u64> {
        self.listed.record().map(|r| r.version)
    }

    /// Chat messages in its history.
    #[getter]
    fn message_count(&self) -> Option<usize> {
        self.listed.record().map(|r| r.history.len())
    }

    /// The metadata given to create_session().
    #[getter]
    fn metadata<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let Ok(header) = &self.listed.header else {
            return Ok(None);
        };
        let mut metadata = header.metadata.clone();
        metadata.remove(llama_sessions::manager::MANAGER_METADATA_KEY);
        let text =
            serde_json::to_string(&metadata).map_err(|e| to_py(Error::Internal(e.to_string())))?;
        py.import("json")?.call_method1("loads", (text,)).map(Some)
    }

    /// Why the file could not be read (a corrupt file is reported here, not raised).
    #[getter]
    fn error(&self) -> Option<&str> {
        self.listed.header.as_ref().err().map(String::as_str)
    }

    fn __repr__(&self) -> String {
        match &self.listed.header {
            Ok(_) => format!(
                "StoredSession(id={:?}, tokens={}, file_size={})",
                self.listed.id,
                self.token_count().unwrap_or(0),
                self.listed.size
            ),
            Err(e) => format!("StoredSession(id={:?}, error={e:?})", self.listed.id),
        }
    }
}

/// Where a manager's sessions are: a directory, or a remote store's URL.
enum Location {
    Directory(PathBuf),
    Url(String),
}

impl Location {
    /// ``session_dir`` as given: a str with a scheme (``redis://...``, ``file://...``) is a URL, anything else
    /// (a str, a path-like object) a directory.
    fn from_py(given: &Bound<'_, PyAny>) -> PyResult<Location> {
        if let Ok(text) = given.extract::<String>() {
            if let Some(dir) = text.strip_prefix("file://") {
                return Ok(Location::Directory(PathBuf::from(dir)));
            }
            if text.contains("://") {
                return Ok(Location::Url(text));
            }
        }
        Ok(Location::Directory(given.extract::<PathBuf>()?))
    }

    /// The store there, or `None` for a directory that does not exist (nothing is created): where sessions
    /// are only read or deleted.
    fn open_existing(&self) -> llama_sessions::Result<Option<Arc<dyn SessionStore>>> {
        match self {
            Location::Directory(dir) => Ok(DirectoryStore::open_existing(dir)?
                .map(|store| Arc::new(store) as Arc<dyn SessionStore>)),
            Location::Url(url) => llama_sessions::open_store(url).map(Some),
        }
    }

    /// `action` on the store there, for stored session `id` (a valid id): SessionNotFound, with nothing
    /// created, for a directory that does not exist.
    fn with_session_store<T>(
        &self,
        id: &str,
        action: impl FnOnce(&dyn SessionStore) -> llama_sessions::Result<T>,
    ) -> llama_sessions::Result<T> {
        llama_sessions::manager::validate_session_id(id)?;
        match self.open_existing()? {
            Some(store) => action(store.as_ref()),
            None => Err(Error::SessionNotFound { id: id.to_owned() }),
        }
    }

    /// The store there, and the store of KV chunks beside it at a remote location.
    #[allow(clippy::type_complexity)]
    fn open_with_chunks(
        &self,
    ) -> llama_sessions::Result<(Arc<dyn SessionStore>, Option<Arc<dyn SessionStore>>)> {
        match self {
            Location::Directory(dir) => Ok((Arc::new(DirectoryStore::open(dir)?), None)),
            Location::Url(url) => llama_sessions::open_store_with_chunks(url),
        }
    }
}

#[pymethods]
impl PySessionManager {
    /// Creates a manager of the sessions in `session_dir` (created if missing).
    #[new]
    #[pyo3(
        signature = (model, session_dir = None, params = None, *, max_live = 8, autosave = true, overflow = "drop_oldest", n_ctx = None, n_batch = None, n_threads = None, type_k = None, type_v = None, flash_attn = None, secret_key = None, prefix_cache = None, storage = "chunks", batching = false, kv_cells = None),
        text_signature = "(model, session_dir='./sessions', params=None, *, max_live=8, autosave=True, overflow='drop_oldest', n_ctx=None, n_batch=None, n_threads=None, type_k=None, type_v=None, flash_attn=None, secret_key=None, prefix_cache=None, storage='chunks', batching=False, kv_cells=None)"
    )]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        model: Py<PyModel>,
        session_dir: Option<Bound<'_, PyAny>>,
        params: Option<&PyContextParams>,
        max_live: i64,
        autosave: bool,
        overflow: &str,
        n_ctx: Option<i64>,
        n_batch: Option<i64>,
        n_threads: Option<Bound<'_, PyAny>>,
        type_k: Option<String>,
        type_v: Option<String>,
        flash_attn: Option<Bound<'_, PyAny>>,
        secret_key: Option<PyBackedBytes>,
        prefix_cache: Option<Py<PyPrefixCache>>,
        storage: &str,
        batching: bool,
        kv_cells: Option<i64>,
    ) -> PyResult<Self> {
        let memory = match kv_cells {
            None => PoolMemory::PerSequence,
            Some(_) if !batching => return Err(to_py(Error::invalid(
                "kv_cells",
                "None without batching=True (the cells shared by a batching manager's sessions)",
                kv_cells.unwrap_or_default(),
            ))),
            Some(cells) => PoolMemory::Shared {
                cells: u32::try_from(cells)
                    .map_err(|_| to_py(Error::invalid("kv_cells", "0 < kv_cells < 2^32", cells)))?,
            },
        };
        let location = match session_dir {
            None => Location::Directory(PathBuf::from("./sessions")),
            Some(given) => Location::from_py(&given)?,
        };
        let chunked = match storage {
            "chunks" => true,
            "files" => false,
            other => {
                return Err(to_py(Error::invalid(
                    "storage",
                    "\"chunks\" or \"files\"",
                    format!("{other:?}"),
                )))
            }
        };
        // The stores first: a remote location holds the sessions' KV chunks too, beside them.
        let (store, remote_chunks) = native(py, |_| location.open_with_chunks())?;
        let prefix_cache = match (prefix_cache, &location, remote_chunks) {
            // A cache given for remote sessions is their local tier, in front of the shared chunks.
            (Some(local), Location::Url(_), Some(chunks)) if chunked => Some(Py::new(
                py,
                PyPrefixCache::tiered(py, local.get(), chunks)?,
            )?),
            (Some(cache), _, _) => Some(cache),
            (None, Location::Directory(dir), _) if chunked => {
                Some(Py::new(py, PyPrefixCache::in_dir(py, dir.join("chunks"))?)?)
            }
            (None, Location::Url(_), Some(chunks)) if chunked => {
                Some(Py::new(py, PyPrefixCache::in_store(py, chunks)?)?)
            }
            (None, _, _) => None,
        };
        let cache = prefix_cache.as_ref().map(|c| c.get().inner.clone());
        let key = crate::session::session_key(secret_key)?;
        let base = PyContextParams {
            inner: params.map(|p| p.inner.clone()).unwrap_or_default(),
        };
        let params = base
            .replace(n_ctx, n_batch, n_threads, type_k, type_v, flash_attn, None)?
            .inner;
        let max_live = usize::try_from(max_live)
            .map_err(|_| to_py(Error::invalid("max_live", "max_live >= 1", max_live)))?;
        let overflow: OverflowPolicy = overflow.parse().map_err(to_py)?;
        let core_model = model.get().inner.clone();
        let manager = native(py, |_| {
            let manager = SessionManager::new(&core_model, params, store, max_live)?
                .with_autosave(autosave)
                .with_overflow(overflow);
            let manager = match cache {
                Some(cache) if chunked => manager.with_chunked_storage(cache)?,
                Some(cache) => manager.with_prefix_cache(cache),
                None => manager,
            };
            let manager = match key {
                Some(key) => manager.with_secret_key(key),
                None => manager,
            };
            if batching {
                manager.with_batching_memory(llama_sessions::DEFAULT_PROMPT_TOKENS_PER_STEP, memory)
            } else {
                Ok(manager)
            }
        })?;
        Ok(PySessionManager {
            inner: Arc::new(manager),
            model,
            location,
            prefix_cache,
        })
    }

    /// The model.
    #[getter]
    fn model(&self, py: Python<'_>) -> Py<PyModel> {
        self.model.clone_ref(py)
    }

    /// The directory of the session files; None for a remote store (see ``location``).
    #[getter]
    fn session_dir(&self) -> Option<PathBuf> {
        match &self.location {
            Location::Directory(dir) => Some(dir.clone()),
            Location::Url(_) => None,
        }
    }

    /// Where the sessions are: the directory, or the remote store's URL (no password, no options).
    #[getter]
    fn location(&self) -> String {
        match &self.location {
            Location::Directory(dir) => dir.display().to_string(),
            Location::Url(_) => self.inner.store().name(),
        }
    }

    /// The parameters of every session's context.
    #[getter]
    fn params(&self) -> PyContextParams {
        PyContextParams {
            inner: self.inner.params().clone(),
        }
    }

    /// Whether the live sessions run as sequences of one context, decoded together (``batching=True``, for
    /// a model whose memory is one plain KV cache).
    #[getter]
    fn batching(&self) -> bool {
        self.inner.pool().is_some()
    }

    /// The KV cells the live sessions share (``kv_cells``, rounded up as allocated); None when each has
    /// ``n_ctx`` cells of its own.
    #[getter]
    fn kv_cells(&self) -> Option<usize> {
        match self.inner.pool()?.memory() {
            PoolMemory::Shared { cells } => Some(cells as usize),
            PoolMemory::PerSequence => None,
        }
    }

    /// How sessions are stored: "chunks" (manifests naming chunks in prefix_cache) or "files".
    #[getter]
    fn storage(&self) -> &'static str {
        if self.inner.chunked_storage() {
            "chunks"
        } else {
            "files"
        }
    }

    /// Write session ``session_id`` (its live copy, unsaved changes included, or what is stored) as one
    /// session file at ``path``, atomically: the single-file format of Context.save_session(), which any
    /// Context of the manager's parameters loads without the chunk store (signed with the manager's
    /// secret_key, if it has one). Returns the file's SessionInfo. What the shell's ``llama-sessions export
    /// ID FILE`` does.
    fn export(&self, py: Python<'_>, session_id: &str, path: PathBuf) -> PyResult<PySessionInfo> {
        let info = native(py, |_| self.inner.export(session_id, &path))?;
        Ok(PySessionInfo { info })
    }

    /// The PrefixCache every session's context shares (None: none).
    #[getter]
    fn prefix_cache(&self, py: Python<'_>) -> Option<Py<PyPrefixCache>> {
        self.prefix_cache.as_ref().map(|c| c.clone_ref(py))
    }

    /// Most sessions kept loaded in memory.
    #[getter]
    fn max_live(&self) -> usize {
        self.inner.max_live()
    }

    /// Whether every turn that changes a session saves it as it ends.
    #[getter]
    fn autosave(&self) -> bool {
        self.inner.autosave()
    }

    /// What a chat turn that does not fit does: "drop_oldest" or "error".
    #[getter]
    fn overflow(&self) -> &'static str {
        self.inner.overflow().as_str()
    }

    /// Ids of the live sessions whose changes are not stored yet (least recently used first): what would
    /// be lost if the manager went now. Always empty with autosave, unless a Context from load() was changed
    /// directly.
    fn unsaved_sessions(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        native(py, |_| Ok(self.inner.unsaved_ids()))
    }

    /// Keep the last ``keep_last`` turns of the session's history (a turn: a user message and its answer)
    /// and drop the older ones; the system prompt stays. Returns how many turns were dropped (0: nothing
    /// changed). The next chat turn decodes again from the first token that differs (the system prompt's
    /// tokens are reused). Saved when the manager autosaves. InvalidParameterError for a negative
    /// ``keep_last``. A turn, like chat() (``timeout`` likewise).
    #[pyo3(signature = (session_id, keep_last, *, timeout = None))]
    fn trim_history(
        &self,
        py: Python<'_>,
        session_id: &str,
        keep_last: i64,
        timeout: Option<f64>,
    ) -> PyResult<usize> {
        let keep_last = usize::try_from(keep_last).map_err(|_| {
            to_py(Error::invalid(
                "keep_last",
                "an integer >= 0 (the turns to keep)",
                keep_last,
            ))
        })?;
        let wait = turn_wait(timeout)?;
        native(py, |detached| {
            self.inner
                .begin_turn(session_id, wait, detached)?
                .trim_history(keep_last)
        })
    }

    /// Create a session starting from ``system_prompt`` (formatted with the model's chat template), store
    /// it and return its live Context. A system prompt this manager encoded before is restored, not decoded;
    /// the Context's ``last_stats`` are then that encoding (``prompt_tokens``: what was decoded, 0 when it
    /// was restored).
    ///
    /// Raises SessionExistsError for an existing id, InvalidParameterError (a ValueError) for an invalid id:
    /// 1 to 128 bytes, no "/", "\", ":", "@" or control characters, not starting with a dot.
    #[pyo3(signature = (session_id, system_prompt = None, *, metadata = None))]
    fn create_session(
        &self,
        py: Python<'_>,
        session_id: &str,
        system_prompt: Option<&str>,
        metadata: Option<Bound<'_, PyAny>>,
    ) -> PyResult<PyContext> {
        let metadata = metadata_from_py(py, metadata)?;
        let session = native(py, |_| {
            self.inner
                .create_session(session_id, system_prompt, metadata)
        })?;
        Ok(self.context(py, &session))
    }

    /// The live Context of a session: from memory, or read, verified and restored from the store. A live
    /// copy costs one small read (the stored version): when another process or worker has saved a newer
    /// version (or deleted the session) since, and the copy has no change of its own, the stored version is
    /// read instead, so that no manager sharing a store returns an outdated session. A copy that a turn
    /// holds is returned as it is.
    ///
    /// What is done through it (generate, truncate, restore, ...) is part of the session: saved by save() and
    /// before the session is evicted. It bypasses the turn order, like any shared Context.
    ///
    /// Raises SessionNotFoundError for an unknown id and the SessionError subclasses of Context.load_session;
    /// a SessionParamsMismatchError advises opening the manager with the saved parameters.
    fn load(&self, py: Python<'_>, session_id: &str) -> PyResult<PyContext> {
        let session = native(py, |_| self.inner.load(session_id))?;
        Ok(self.context(py, &session))
    }

    /// load(), or create_session() when the session does not exist.
    #[pyo3(signature = (session_id, system_prompt = None))]
    fn load_or_create(
        &self,
        py: Python<'_>,
        session_id: &str,
        system_prompt: Option<&str>,
    ) -> PyResult<PyContext> {
        let session = native(py, |_| self.inner.load_or_create(session_id, system_prompt))?;
        Ok(self.context(py, &session))
    }

    /// Save a session's live copy; raises SessionConflictError (writing nothing) if the stored version
    /// changed since that copy was loaded: the stale copy then leaves memory, so the next load() reads the
    /// stored version. A stored session that is not live has nothing unsaved: saving it does nothing.
    /// SessionNotFoundError if there is no such session.
    ///
    /// With ``context`` (not the live one), store that context under the id instead, replacing what is stored
    /// (an existing session's history, system prompt and metadata are kept); SessionBusyError, writing
    /// nothing, if a turn holds the live copy.
    #[pyo3(signature = (session_id, context = None))]
    fn save(&self, py: Python<'_>, session_id: &str, context: Option<&PyContext>) -> PyResult<()> {
        let shared = context.map(|c| Arc::clone(&c.inner));
        native(py, |_| match &shared {
            None => self.inner.save(session_id),
            Some(context) => self.inner.save_context(session_id, context),
        })
    }

    /// Delete a session, its checkpoints and their lock files (SessionNotFoundError if there is none).
    fn delete(&self, py: Python<'_>, session_id: &str) -> PyResult<()> {
        native(py, |_| self.inner.delete(session_id))
    }

    /// Whether the session exists (live or stored).
    fn exists(&self, py: Python<'_>, session_id: &str) -> PyResult<bool> {
        native(py, |_| self.inner.exists(session_id))
    }

    /// Every stored session, sorted by id. Files that are not sessions are ignored; a corrupt session file
    /// is listed with its error.
    fn list(&self, py: Python<'_>) -> PyResult<Vec<PyStoredSession>> {
        let listed = native(py, |_| self.inner.list())?;
        Ok(listed
            .into_iter()
            .map(|listed| PyStoredSession { listed })
            .collect())
    }

    /// The file of a session.
    fn session_path(&self, session_id: &str) -> PyResult<PathBuf> {
        self.inner
            .session_path(session_id)
            .map_err(to_py)?
            .ok_or_else(|| {
                to_py(Error::invalid(
                    "session_dir",
                    "a directory (only sessions in a directory have files)",
                    self.inner.store().name(),
                ))
            })
    }

    /// The conversation after the system prompt: ``[{"role": ..., "content": ...}, ...]``, as load() gives
    /// it (the stored version when another process or worker saved a newer one).
    fn history<'py>(&self, py: Python<'py>, session_id: &str) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let history = native(py, |_| Ok(self.inner.load(session_id)?.history()))?;
        history
            .into_iter()
            .map(|m| {
                let dict = PyDict::new(py);
                dict.set_item("role", m.role)?;
                dict.set_item("content", m.content)?;
                Ok(dict)
            })
            .collect()
    }

    /// The system prompt the session started from.
    fn system_prompt(&self, py: Python<'_>, session_id: &str) -> PyResult<Option<String>> {
        native(py, |_| Ok(self.inner.load(session_id)?.system_prompt()))
    }

    /// One chat turn: the conversation is formatted with the model's chat template, only what the context
    /// does not hold yet is decoded, the answer is generated and both messages join the history (saved when
    /// the manager autosaves). Returns the answer; its stats (stop reason, token counts, times, turns
    /// dropped) are then ``load(session_id).last_stats``.
    ///
    /// Room for ``max_tokens`` is reserved before anything is decoded: when the conversation and
    /// ``max_tokens`` do not fit in ``n_ctx``, the manager's ``overflow`` policy drops the oldest turns or
    /// raises ContextFullError, changing nothing (see the constructor).
    ///
    /// A turn holds its session until it ends. If another turn holds it (a chat in another thread, or a
    /// stream_chat stream not exhausted, closed or dropped yet), this call waits for it: without limit when
    /// ``timeout`` is None (Ctrl-C ends the wait), else at most ``timeout`` seconds (0: not at all), then
    /// raises SessionBusyError. Turns on one session from several threads thus take turns.
    #[pyo3(signature = (session_id, user_message, max_tokens = DEFAULT_MAX_TOKENS as i64, *, temperature = DEFAULT_SAMPLING.temperature, top_k = DEFAULT_SAMPLING.top_k as i64, top_p = DEFAULT_SAMPLING.top_p, min_p = DEFAULT_SAMPLING.min_p, repeat_penalty = DEFAULT_SAMPLING.repeat_penalty, seed = None, stop = None, timeout = None))]
    #[allow(clippy::too_many_arguments)]
    fn chat(
        &self,
        py: Python<'_>,
        session_id: &str,
        user_message: &str,
        max_tokens: i64,
        temperature: f32,
        top_k: i64,
        top_p: f32,
        min_p: f32,
        repeat_penalty: f32,
        seed: Option<i64>,
        stop: Option<Bound<'_, PyAny>>,
        timeout: Option<f64>,
    ) -> PyResult<String> {
        let options = options(
            max_tokens,
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty,
            seed,
            stop,
        )?;
        let wait = turn_wait(timeout)?;
        native(py, |detached| {
            let turn = self.inner.begin_turn(session_id, wait, detached)?;
            Ok(turn.chat(user_message, options, detached)?.text)
        })
    }

    /// Like chat(), the answer arriving piece by piece; the overflow policy applies before the stream is
    /// returned. The stream holds the session's turn until it is exhausted, closed or dropped; ``timeout``
    /// bounds the wait for a turn in progress, as in chat(). Once exhausted, the turn's stats are
    /// ``load(session_id).last_stats``.
    #[pyo3(signature = (session_id, user_message, max_tokens = DEFAULT_MAX_TOKENS as i64, *, temperature = DEFAULT_SAMPLING.temperature, top_k = DEFAULT_SAMPLING.top_k as i64, top_p = DEFAULT_SAMPLING.top_p, min_p = DEFAULT_SAMPLING.min_p, repeat_penalty = DEFAULT_SAMPLING.repeat_penalty, seed = None, stop = None, timeout = None))]
    #[allow(clippy::too_many_arguments)]
    fn stream_chat(
        &self,
        py: Python<'_>,
        session_id: &str,
        user_message: &str,
        max_tokens: i64,
        temperature: f32,
        top_k: i64,
        top_p: f32,
        min_p: f32,
        repeat_penalty: f32,
        seed: Option<i64>,
        stop: Option<Bound<'_, PyAny>>,
        timeout: Option<f64>,
    ) -> PyResult<ChatStream> {
        let options = options(
            max_tokens,
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty,
            seed,
            stop,
        )?;
        let wait = turn_wait(timeout)?;
        let max_tokens = options.max_tokens;
        let turn = native(py, |detached| {
            self.inner
                .begin_turn(session_id, wait, detached)?
                .start_chat(user_message, options, detached)
        })?;
        Ok(ChatStream {
            manager: Arc::clone(&self.inner),
            turn: DetachedMutex::new(Some(turn)),
            session_id: session_id.to_owned(),
            max_tokens,
            progress: StreamProgress::default(),
            stats: OnceLock::new(),
        })
    }

    /// One chat turn on a whole conversation, as an OpenAI-style client sends it every time:
    /// ``messages`` (an optional first "system" message, the history, and last the new "user" message, each
    /// a mapping with str "role" and "content") replaces the session's system prompt and history. Only what
    /// follows the longest common prefix of its tokens with what the context holds is decoded (a
    /// conversation that continues the stored one decodes only its new messages; an edited one, from the
    /// first token that differs); the answer is generated and joins the history. Returns the answer; its
    /// stats are then ``load(session_id).last_stats`` (``context_tokens``: the whole conversation's tokens,
    /// ``prompt_tokens``: those decoded).
    ///
    /// InvalidParameterError, before anything changes, for an empty conversation, one whose last message is
    /// not the user's, or a role that is not a plain name (1 to 32 ASCII letters, digits, "_" or "-": a role
    /// is markup and cannot carry control tokens). The overflow policy, the wait for a turn in progress
    /// (``timeout``) and autosave are as in chat().
    #[pyo3(signature = (session_id, messages, max_tokens = DEFAULT_MAX_TOKENS as i64, *, temperature = DEFAULT_SAMPLING.temperature, top_k = DEFAULT_SAMPLING.top_k as i64, top_p = DEFAULT_SAMPLING.top_p, min_p = DEFAULT_SAMPLING.min_p, repeat_penalty = DEFAULT_SAMPLING.repeat_penalty, seed = None, stop = None, timeout = None))]
    #[allow(clippy::too_many_arguments)]
    fn chat_messages(
        &self,
        py: Python<'_>,
        session_id: &str,
        messages: &Bound<'_, PyAny>,
        max_tokens: i64,
        temperature: f32,
        top_k: i64,
        top_p: f32,
        min_p: f32,
        repeat_penalty: f32,
        seed: Option<i64>,
        stop: Option<Bound<'_, PyAny>>,
        timeout: Option<f64>,
    ) -> PyResult<String> {
        let messages = messages_from_py(messages)?;
        let options = options(
            max_tokens,
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty,
            seed,
            stop,
        )?;
        let wait = turn_wait(timeout)?;
        native(py, |detached| {
            let turn = self.inner.begin_turn(session_id, wait, detached)?;
            Ok(turn.chat_messages(&messages, options, detached)?.text)
        })
    }

    /// Like chat_messages(), the answer arriving piece by piece; the conversation is checked and the
    /// overflow policy applied before the stream is returned. The conversation replaces the session's when
    /// the stream ends; a stream closed or dropped before changes no history (the answer so far stays in the
    /// context, and the next turn reuses what it shares). ``timeout`` as in chat().
    #[pyo3(signature = (session_id, messages, max_tokens = DEFAULT_MAX_TOKENS as i64, *, temperature = DEFAULT_SAMPLING.temperature, top_k = DEFAULT_SAMPLING.top_k as i64, top_p = DEFAULT_SAMPLING.top_p, min_p = DEFAULT_SAMPLING.min_p, repeat_penalty = DEFAULT_SAMPLING.repeat_penalty, seed = None, stop = None, timeout = None))]
    #[allow(clippy::too_many_arguments)]
    fn stream_chat_messages(
        &self,
        py: Python<'_>,
        session_id: &str,
        messages: &Bound<'_, PyAny>,
        max_tokens: i64,
        temperature: f32,
        top_k: i64,
        top_p: f32,
        min_p: f32,
        repeat_penalty: f32,
        seed: Option<i64>,
        stop: Option<Bound<'_, PyAny>>,
        timeout: Option<f64>,
    ) -> PyResult<ChatStream> {
        let messages = messages_from_py(messages)?;
        let options = options(
            max_tokens,
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty,
            seed,
            stop,
        )?;
        let wait = turn_wait(timeout)?;
        let max_tokens = options.max_tokens;
        let turn = native(py, |detached| {
            self.inner
                .begin_turn(session_id, wait, detached)?
                .start_chat_messages(&messages, options, detached)
        })?;
        Ok(ChatStream {
            manager: Arc::clone(&self.inner),
            turn: DetachedMutex::new(Some(turn)),
            session_id: session_id.to_owned(),
            max_tokens,
            progress: StreamProgress::default(),
            stats: OnceLock::new(),
        })
    }

    /// Generate after ``prompt``, the *whole* text the session's context should hold (a conversation
    /// formatted from its start): only the part after the longest common prefix with what the context holds
    /// is decoded, the rest of the context is dropped, as llama.cpp's server does. Returns the text and the
    /// number of tokens reused; the stats are then ``load(session_id).last_stats``. The chat history is not
    /// changed. A turn, like chat() (``timeout`` likewise).
    #[pyo3(signature = (session_id, prompt, max_tokens = DEFAULT_MAX_TOKENS as i64, *, temperature = DEFAULT_SAMPLING.temperature, top_k = DEFAULT_SAMPLING.top_k as i64, top_p = DEFAULT_SAMPLING.top_p, min_p = DEFAULT_SAMPLING.min_p, repeat_penalty = DEFAULT_SAMPLING.repeat_penalty, seed = None, stop = None, timeout = None))]
    #[allow(clippy::too_many_arguments)]
    fn generate_reusing_prefix(
        &self,
        py: Python<'_>,
        session_id: &str,
        prompt: &str,
        max_tokens: i64,
        temperature: f32,
        top_k: i64,
        top_p: f32,
        min_p: f32,
        repeat_penalty: f32,
        seed: Option<i64>,
        stop: Option<Bound<'_, PyAny>>,
        timeout: Option<f64>,
    ) -> PyResult<(String, usize)> {
        let options = options(
            max_tokens,
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty,
            seed,
            stop,
        )?;
        let wait = turn_wait(timeout)?;
        let (generation, reused) = native(py, |detached| {
            self.inner
                .begin_turn(session_id, wait, detached)?
                .generate_reusing_prefix(prompt, options, detached)
        })?;
        Ok((generation.text, reused))
    }

    /// Store the session's state and history as checkpoint ``label`` (during a streamed turn: the state so
    /// far, without the turn in the history).
    fn checkpoint(&self, py: Python<'_>, session_id: &str, label: &str) -> PyResult<()> {
        native(py, |_| self.inner.checkpoint(session_id, label))
    }

    /// Put the session back to checkpoint ``label``: state and history (SessionNotFoundError if none). A
    /// turn, like chat() (``timeout`` likewise).
    #[pyo3(signature = (session_id, label, *, timeout = None))]
    fn revert(
        &self,
        py: Python<'_>,
        session_id: &str,
        label: &str,
        timeout: Option<f64>,
    ) -> PyResult<()> {
        let wait = turn_wait(timeout)?;
        native(py, |detached| {
            self.inner
                .begin_turn(session_id, wait, detached)?
                .revert(label)
        })
    }

    /// Labels of the session's checkpoints, sorted.
    fn checkpoints(&self, py: Python<'_>, session_id: &str) -> PyResult<Vec<String>> {
        native(py, |_| self.inner.checkpoints(session_id))
    }

    /// Ids of the sessions loaded in memory, least recently used first.
    fn live_sessions(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        native(py, |_| Ok(self.inner.live_ids()))
    }

    /// Bytes of KV cache allocated by the live sessions' contexts (n_ctx cells each, used or not).
    fn live_kv_bytes(&self, py: Python<'_>) -> PyResult<usize> {
        native(py, |_| Ok(self.inner.live_kv_bytes()))
    }

    /// Counters: prefill_tokens (system-prompt tokens decoded), prefix_reuses (sessions that restored an
    /// encoded system prompt instead), store_loads, store_saves, evictions, recomputed_tokens (tokens
    /// decoded again while loading, because a chunk a manifest names was missing or damaged); with
    /// batching, batch_steps (decode steps of the shared context) and max_sessions_in_step (0 without).
    #[getter]
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let stats = native(py, |_| Ok(self.inner.stats()))?;
        let dict = PyDict::new(py);
        dict.set_item("prefill_tokens", stats.prefill_tokens)?;
        dict.set_item("prefix_reuses", stats.prefix_reuses)?;
        dict.set_item("store_loads", stats.store_loads)?;
        dict.set_item("store_saves", stats.store_saves)?;
        dict.set_item("evictions", stats.evictions)?;
        dict.set_item("recomputed_tokens", stats.recomputed_tokens)?;
        dict.set_item("batch_steps", stats.batch_steps)?;
        dict.set_item("max_sessions_in_step", stats.max_sessions_in_step)?;
        Ok(dict)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let live = native(py, |_| Ok(self.inner.live_ids().len()))?;
        Ok(format!(
            "SessionManager(session_dir={:?}, max_live={}, live={live})",
            self.location(),
            self.inner.max_live(),
        ))
    }
}

/// The answer of a chat turn, piece by piece, from SessionManager.stream_chat(). When it ends, the user
/// message and the answer join the session's history (and the session is saved if the manager autosaves).
///
/// Until it ends, is closed or is dropped, the stream holds its session's turn: other turns on the session
/// wait for it, and the session is not evicted.
#[pyclass(module = "llama_sessions._native", frozen)]
pub struct ChatStream {
    manager: Arc<SessionManager>,
    turn: DetachedMutex<Option<ChatTurn>>,
    session_id: String,
    max_tokens: usize,
    progress: StreamProgress,
    /// The turn's stats, once it has ended and joined the history.
    stats: OnceLock<PyGenerationStats>,
}

#[pymethods]
impl ChatStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<String>> {
        native(py, |detached| {
            let mut slot = self.turn.lock(detached);
            let Some(turn) = slot.as_mut() else {
                return Ok(None);
            };
            match turn.next_piece(detached) {
                Ok(Some(piece)) => {
                    self.progress.add_produced();
                    Ok(Some(piece))
                }
                Ok(None) => {
                    let turn = slot.take().expect("checked above");
                    let finished = turn.finish(&self.manager);
                    self.progress.end(match &finished {
                        Ok(_) => "state='ended'",
                        Err(_) => "state='failed'",
                    });
                    let generation = finished?;
                    let _ = self.stats.set(PyGenerationStats::new(
                        generation.stats,
                        generation.stop_reason,
                    ));
                    Ok(None)
                }
                Err(e) => {
                    *slot = None;
                    self.progress.end("state='failed'");
                    Err(e)
                }
            }
        })
    }

    /// ``ChatStream(session='ada', pieces=3, max_tokens=48, state='running')``: the pieces read so far,
    /// and the state: ``'running'``, ``'ended'`` (the turn joined the history), ``'closed'`` or
    /// ``'failed'``.
    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let (pieces, state) = self.progress.describe();
        let session = pyo3::types::PyString::new(py, &self.session_id).repr()?;
        Ok(format!(
            "ChatStream(session={session}, pieces={pieces}, max_tokens={}, {state})",
            self.max_tokens
        ))
    }

    /// The turn's GenerationStats once the stream has ended and the turn joined the history (None before,
    /// and for a stream closed or failed): the same as ``load(session_id).last_stats`` then, but never
    /// another turn's.
    #[getter]
    fn stats(&self) -> Option<PyGenerationStats> {
        self.stats.get().cloned()
    }

    /// End the turn now and free the session: the answer so far stays in the context but does not join
    /// the history. Closing an ended stream does nothing.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        native(py, |detached| {
            let turn = self.turn.lock(detached).take();
            if turn.is_some() {
                self.progress.end("state='closed'");
            }
            drop(turn);
            Ok(())
        })
    }
}

/// Every stored session in ``session_dir`` (a directory or a store URL, as SessionManager takes it),
/// sorted by id, read without a model (headers only; a load verifies everything). Files that are not
/// sessions are ignored; a corrupt one is listed with its error. A directory that does not exist holds no
/// session (and is not created).
#[pyfunction]
pub fn list_sessions(
    py: Python<'_>,
    session_dir: Bound<'_, PyAny>,
) -> PyResult<Vec<PyStoredSession>> {
    let location = Location::from_py(&session_dir)?;
    let listed = native(py, |_| match location.open_existing()? {
        Some(store) => llama_sessions::manager::list_stored_sessions(store.as_ref()),
        None => Ok(Vec::new()),
    })?;
    Ok(listed
        .into_iter()
        .map(|listed| PyStoredSession { listed })
        .collect())
}

/// What stored session ``session_id`` of ``session_dir`` (a directory or a store URL, as SessionManager
/// takes it) holds, read without a model from its header alone: parameters, tokens, metadata (the
/// manager's record of its system prompt and history under ``"llama_sessions.manager"``) and sizes. Only a
/// few KiB are read, so its state is not verified (nor, for a signed session, its MAC): a load verifies
/// everything. inspect_session() reads and verifies a whole session file instead. SessionNotFoundError if
/// there is no such session; SessionCorruptError for a stored value whose prelude or header is damaged.
#[pyfunction]
pub fn inspect_stored_session(
    py: Python<'_>,
    session_dir: Bound<'_, PyAny>,
    session_id: &str,
) -> PyResult<PySessionInfo> {
    let location = Location::from_py(&session_dir)?;
    let info = native(py, |_| {
        location.with_session_store(session_id, |store| {
            llama_sessions::manager::inspect_stored_session(store, session_id)
        })
    })?;
    Ok(PySessionInfo { info })
}

/// Delete stored session ``session_id`` and its checkpoints from ``session_dir`` (a directory or a store
/// URL; holding its lock), and their lock files, without a model. SessionNotFoundError if there is none.
#[pyfunction]
pub fn delete_session(
    py: Python<'_>,
    session_dir: Bound<'_, PyAny>,
    session_id: &str,
) -> PyResult<()> {
    let location = Location::from_py(&session_dir)?;
    native(py, |_| {
        location.with_session_store(session_id, |store| {
            llama_sessions::manager::delete_stored_session(store, session_id)
        })
    })
}

/// Raise InvalidParameterError (a ValueError) unless ``session_id`` can name a session: 1 to 128 bytes, no
/// "/", "\", ":", "@" or control characters, not starting with a dot, neither starting nor ending with
/// whitespace.
#[pyfunction]
pub fn validate_session_id(session_id: &str) -> PyResult<()> {
    llama_sessions::manager::validate_session_id(session_id).map_err(to_py)
}
