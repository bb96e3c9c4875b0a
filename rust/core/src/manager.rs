//! Many named, persistent sessions for many users on one model.
//!
//! A [`SessionManager`] keeps each session as one session file in a [`SessionStore`] (the context's state, the
//! chat history and a version number in its metadata), up to `max_live` sessions loaded in memory (least
//! recently used first out, saved before they go), and one encoded copy of each system prompt, so that the
//! second to Nth session starting from it decodes nothing.
//!
//! Concurrency rule: every live copy of a session remembers the stored version it derives from. A save takes
//! the key's lock (threads and processes), compares that version with the stored one, writes version + 1 and
//! releases the lock; if the store holds another version, someone else saved in between and the save fails
//! with [`Error::SessionConflict`] instead of silently dropping their turn.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::context::generation::Generator;
use crate::context::{Context, GenerateOptions, Generation, Interrupt};
use crate::error::{Error, Result};
use crate::model::{ChatMessage, Model};
use crate::params::ContextParams;
use crate::session::Metadata;
use crate::session_format::{self as format, SessionHeader};
use crate::store::SessionStore;

/// Longest session id, in bytes.
pub const MAX_SESSION_ID_LEN: usize = 128;
/// Metadata key under which the manager keeps its record in a session file.
pub const MANAGER_METADATA_KEY: &str = "llama_sessions.manager";
/// Separates a session id from a checkpoint label in store keys (ids cannot contain it).
const CHECKPOINT_SEPARATOR: char = '@';

/// Checks that `id` can name a session (and a file): 1 to 128 bytes, no `/`, `\`, `:` or `@`, no control
/// characters, not starting with a dot (so no `.`, `..`, hidden or temporary files) or a space.
pub fn validate_session_id(id: &str) -> Result<()> {
    validate_name("session_id", id)
}

fn validate_name(name: &'static str, id: &str) -> Result<()> {
    let reason = if id.is_empty() {
        Some("it is empty".to_owned())
    } else if id.len() > MAX_SESSION_ID_LEN {
        Some(format!("it is {} bytes long", id.len()))
    } else if let Some(c) = id
        .chars()
        .find(|&c| matches!(c, '/' | '\\' | ':' | CHECKPOINT_SEPARATOR) || c.is_control())
    {
        Some(format!("it contains {c:?}"))
    } else if id.starts_with(['.', ' ']) || id.ends_with(' ') {
        Some("it starts with a dot or starts or ends with a space".to_owned())
    } else {
        None
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(Error::invalid(
            name,
            format!(
                "1 to {MAX_SESSION_ID_LEN} bytes without '/', '\\\\', ':', '@' or control characters, not \
                 starting with '.' ({reason})"
            ),
            format!("{:?}", truncate_for_message(id)),
        )),
    }
}

fn truncate_for_message(id: &str) -> String {
    if id.len() <= 80 {
        return id.to_owned();
    }
    let mut end = 80;
    while !id.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &id[..end])
}

/// What the manager records in a session's metadata.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ManagerRecord {
    /// The stored version this state is (1 for the first save).
    pub version: u64,
    /// The system prompt the session started from.
    pub system_prompt: Option<String>,
    /// The conversation after the system prompt.
    pub history: Vec<StoredMessage>,
    /// When the session was created (RFC 3339).
    pub created_at: String,
    /// When it was last saved (RFC 3339).
    pub updated_at: String,
}

/// A chat message as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// "user", "assistant", ...
    pub role: String,
    /// The text.
    pub content: String,
}

impl From<&StoredMessage> for ChatMessage {
    fn from(m: &StoredMessage) -> ChatMessage {
        ChatMessage {
            role: m.role.clone(),
            content: m.content.clone(),
        }
    }
}

fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// Splits a session file's metadata into the manager's record and the user's metadata.
fn split_metadata(mut metadata: Metadata) -> (ManagerRecord, Metadata) {
    let record = metadata
        .remove(MANAGER_METADATA_KEY)
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default();
    (record, metadata)
}

struct Record {
    manager: ManagerRecord,
    user_metadata: Metadata,
    /// The stored version this copy derives from (0: never stored).
    stored_version: u64,
    /// Changed since it was stored.
    dirty: bool,
}

impl Record {
    fn metadata(&self, version: u64, updated_at: String) -> Metadata {
        let mut manager = self.manager.clone();
        manager.version = version;
        manager.updated_at = updated_at;
        let mut metadata = self.user_metadata.clone();
        metadata.insert(
            MANAGER_METADATA_KEY.to_owned(),
            serde_json::to_value(manager).expect("the record serializes"),
        );
        metadata
    }
}

/// A session loaded in memory: its context and its record. Lock order: record, then context.
pub struct ManagedSession {
    id: String,
    context: Arc<Mutex<Context>>,
    record: Mutex<Record>,
    /// True while a chat turn runs: turns of one session take turns, even when a turn is streamed over many
    /// calls from different threads.
    turn_in_progress: Mutex<bool>,
    turn_ended: Condvar,
}

/// The right to run a chat turn on a session; released when dropped.
struct TurnPermit {
    session: Arc<ManagedSession>,
}

impl TurnPermit {
    fn acquire(session: &Arc<ManagedSession>) -> TurnPermit {
        let mut busy = lock(&session.turn_in_progress);
        while *busy {
            busy = session
                .turn_ended
                .wait(busy)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        *busy = true;
        TurnPermit {
            session: Arc::clone(session),
        }
    }
}

impl Drop for TurnPermit {
    fn drop(&mut self) {
        *lock(&self.session.turn_in_progress) = false;
        self.session.turn_ended.notify_one();
    }
}

impl std::fmt::Debug for ManagedSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagedSession")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ManagedSession {
    fn new(id: &str, context: Context, record: Record) -> Arc<ManagedSession> {
        Arc::new(ManagedSession {
            id: id.to_owned(),
            context: Arc::new(Mutex::new(context)),
            record: Mutex::new(record),
            turn_in_progress: Mutex::new(false),
            turn_ended: Condvar::new(),
        })
    }

    /// The session id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The live context (shared: the manager generates on it too).
    pub fn context(&self) -> &Arc<Mutex<Context>> {
        &self.context
    }

    /// The conversation after the system prompt.
    pub fn history(&self) -> Vec<ChatMessage> {
        lock(&self.record)
            .manager
            .history
            .iter()
            .map(ChatMessage::from)
            .collect()
    }

    /// The system prompt the session started from.
    pub fn system_prompt(&self) -> Option<String> {
        lock(&self.record).manager.system_prompt.clone()
    }

    /// The user's metadata.
    pub fn metadata(&self) -> Metadata {
        lock(&self.record).user_metadata.clone()
    }

    /// The stored version this live copy derives from (0: not stored yet).
    pub fn stored_version(&self) -> u64 {
        lock(&self.record).stored_version
    }
}

/// Counters of the work a manager did (for tests and capacity planning).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ManagerStats {
    /// System-prompt tokens decoded (a prompt shared by N sessions is decoded once).
    pub prefill_tokens: u64,
    /// Sessions created from an already encoded system prompt (no prefill).
    pub prefix_reuses: u64,
    /// Sessions read from the store.
    pub store_loads: u64,
    /// Sessions written to the store.
    pub store_saves: u64,
    /// Live sessions evicted to stay within `max_live`.
    pub evictions: u64,
}

/// A stored session, as [`SessionManager::list`] reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct ListedSession {
    /// The id.
    pub id: String,
    /// Bytes stored.
    pub size: u64,
    /// Its header, or why it could not be read (a corrupt file is reported, not fatal to the listing).
    pub header: std::result::Result<SessionHeader, String>,
}

impl ListedSession {
    /// The manager's record in the header, if the header was read.
    pub fn record(&self) -> Option<ManagerRecord> {
        self.header
            .as_ref()
            .ok()
            .map(|h| split_metadata(h.metadata.clone()).0)
    }
}

/// Many named, persistent sessions on one model. `Sync`: share it between threads.
pub struct SessionManager {
    model: Model,
    params: ContextParams,
    store: Arc<dyn SessionStore>,
    max_live: usize,
    autosave: bool,
    /// Live sessions, least recently used first.
    live: Mutex<Vec<Arc<ManagedSession>>>,
    /// Encoded system prompts: the session bytes of a context holding only the formatted prompt.
    prefixes: Mutex<HashMap<String, Arc<Vec<u8>>>>,
    stats: Mutex<ManagerStats>,
}

impl std::fmt::Debug for SessionManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionManager")
            .field("store", &self.store)
            .field("params", &self.params)
            .field("max_live", &self.max_live)
            .finish_non_exhaustive()
    }
}

impl SessionManager {
    /// A manager of the sessions in `store`, whose contexts use `params` (validated here). At most
    /// `max_live` (>= 1) sessions stay loaded; with `autosave`, every chat turn is saved.
    pub fn new(
        model: &Model,
        params: ContextParams,
        store: Arc<dyn SessionStore>,
        max_live: usize,
        autosave: bool,
    ) -> Result<SessionManager> {
        params.validate(model)?;
        if params.n_seq_max != 1 {
            return Err(Error::invalid(
                "n_seq_max",
                "1 (a manager gives each live session its own context)",
                params.n_seq_max,
            ));
        }
        if max_live == 0 {
            return Err(Error::invalid("max_live", "max_live >= 1", max_live));
        }
        Ok(SessionManager {
            model: model.clone(),
            params,
            store,
            max_live,
            autosave,
            live: Mutex::new(Vec::new()),
            prefixes: Mutex::new(HashMap::new()),
            stats: Mutex::new(ManagerStats::default()),
        })
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The parameters of every session's context.
    pub fn params(&self) -> &ContextParams {
        &self.params
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn SessionStore> {
        &self.store
    }

    /// Most sessions kept loaded.
    pub fn max_live(&self) -> usize {
        self.max_live
    }

    /// Whether chat turns are saved as they end.
    pub fn autosave(&self) -> bool {
        self.autosave
    }

    /// Counters so far.
    pub fn stats(&self) -> ManagerStats {
        *lock(&self.stats)
    }

    /// Where session `id` is stored, if the store has paths.
    pub fn session_path(&self, id: &str) -> Result<Option<PathBuf>> {
        validate_session_id(id)?;
        Ok(self.store.location(id))
    }

    fn find_live(&self, id: &str) -> Option<Arc<ManagedSession>> {
        let mut live = lock(&self.live);
        let index = live.iter().position(|s| s.id == id)?;
        let session = live.remove(index);
        live.push(Arc::clone(&session));
        Some(session)
    }

    /// Ids of the sessions loaded in memory, least recently used first.
    pub fn live_ids(&self) -> Vec<String> {
        lock(&self.live).iter().map(|s| s.id.clone()).collect()
    }

    /// Bytes of KV cache held by the live sessions' contexts (what they allocated, used or not).
    pub fn live_kv_bytes(&self) -> usize {
        let live: Vec<_> = lock(&self.live).clone();
        live.iter().map(|s| lock(&s.context).kv_cache_bytes()).sum()
    }

    /// Whether session `id` exists (live or stored).
    pub fn exists(&self, id: &str) -> Result<bool> {
        validate_session_id(id)?;
        if lock(&self.live).iter().any(|s| s.id == id) {
            return Ok(true);
        }
        Ok(self.store.get_prefix(id, 0)?.is_some())
    }

    /// Creates session `id`, starting from `system_prompt` (formatted with the model's chat template as a
    /// system message), stores it and keeps it live. A system prompt already encoded by this manager is
    /// restored, not decoded again.
    pub fn create_session(
        &self,
        id: &str,
        system_prompt: Option<&str>,
        metadata: Metadata,
    ) -> Result<Arc<ManagedSession>> {
        validate_session_id(id)?;
        if self.exists(id)? {
            return Err(Error::SessionExists { id: id.to_owned() });
        }
        let context = self.context_with_system_prompt(system_prompt)?;
        let created_at = now();
        let session = ManagedSession::new(
            id,
            context,
            Record {
                manager: ManagerRecord {
                    version: 0,
                    system_prompt: system_prompt.map(str::to_owned),
                    history: Vec::new(),
                    created_at: created_at.clone(),
                    updated_at: created_at,
                },
                user_metadata: metadata,
                stored_version: 0,
                dirty: true,
            },
        );
        {
            let mut record = lock(&session.record);
            let context = lock(&session.context);
            match self.store_locked(id, &mut record, &context) {
                // Created by another thread or process since the check above.
                Err(Error::SessionConflict { expected: 0, .. }) => {
                    return Err(Error::SessionExists { id: id.to_owned() })
                }
                other => other?,
            }
        }
        self.insert_live(Arc::clone(&session));
        Ok(session)
    }

    fn context_with_system_prompt(&self, system_prompt: Option<&str>) -> Result<Context> {
        let mut context = Context::new(&self.model, self.params.clone())?;
        let Some(system_prompt) = system_prompt else {
            return Ok(context);
        };
        let formatted = self.model.apply_chat_template(
            &[ChatMessage {
                role: "system".to_owned(),
                content: system_prompt.to_owned(),
            }],
            false,
        )?;
        let cached = lock(&self.prefixes).get(&formatted).cloned();
        match cached {
            Some(bytes) => {
                context.restore(&bytes, None, None)?;
                lock(&self.stats).prefix_reuses += 1;
            }
            None => {
                let options = GenerateOptions {
                    max_tokens: 0,
                    ..GenerateOptions::default()
                };
                let generation =
                    context.generate(0, &formatted, options, &mut crate::NeverInterrupt)?;
                lock(&self.stats).prefill_tokens += generation.stats.prompt_tokens as u64;
                let bytes = context.snapshot(None, &Metadata::new(), None)?;
                lock(&self.prefixes).insert(formatted, Arc::new(bytes));
            }
        }
        Ok(context)
    }

    /// Session `id`, from memory (no I/O) or from the store.
    pub fn load(&self, id: &str) -> Result<Arc<ManagedSession>> {
        validate_session_id(id)?;
        if let Some(session) = self.find_live(id) {
            return Ok(session);
        }
        let origin = self
            .store
            .location(id)
            .map_or_else(|| id.to_owned(), |p| p.display().to_string());
        let bytes = self
            .store
            .get(id)?
            .ok_or_else(|| Error::SessionNotFound { id: id.to_owned() })?;
        let mut context = Context::new(&self.model, self.params.clone())?;
        let info = context.restore_named(&bytes, None, &origin, None)?;
        lock(&self.stats).store_loads += 1;
        let (manager, user_metadata) = split_metadata(info.header.metadata);
        let session = ManagedSession::new(
            id,
            context,
            Record {
                stored_version: manager.version,
                manager,
                user_metadata,
                dirty: false,
            },
        );
        // Another thread may have loaded it meanwhile: keep the first copy.
        if let Some(existing) = self.find_live(id) {
            return Ok(existing);
        }
        self.insert_live(Arc::clone(&session));
        Ok(session)
    }

    /// [`SessionManager::load`], or [`SessionManager::create_session`] if it does not exist.
    pub fn load_or_create(
        &self,
        id: &str,
        system_prompt: Option<&str>,
    ) -> Result<Arc<ManagedSession>> {
        match self.load(id) {
            Err(Error::SessionNotFound { .. }) => {
                match self.create_session(id, system_prompt, Metadata::new()) {
                    // Created by someone else in between: load theirs.
                    Err(Error::SessionExists { .. }) => self.load(id),
                    other => other,
                }
            }
            other => other,
        }
    }

    fn insert_live(&self, session: Arc<ManagedSession>) {
        let mut live = lock(&self.live);
        live.push(session);
        // Evict the least recently used sessions that are idle (a session in use is skipped, so the set may
        // exceed max_live until it is idle again). An evicted session is saved first if it changed.
        let mut index = 0;
        while live.len() > self.max_live && index < live.len() - 1 {
            let victim = Arc::clone(&live[index]);
            let Ok(mut record) = victim.record.try_lock() else {
                index += 1;
                continue;
            };
            let Ok(context) = victim.context.try_lock() else {
                index += 1;
                continue;
            };
            if record.dirty
                && self
                    .store_locked(&victim.id, &mut record, &context)
                    .is_err()
            {
                // Keep a session that could not be saved (conflict, disk full) rather than lose its changes.
                index += 1;
                continue;
            }
            drop(context);
            drop(record);
            live.remove(index);
            lock(&self.stats).evictions += 1;
        }
    }

    /// Saves session `id` (its live copy). Fails with [`Error::SessionConflict`] if the store holds a version
    /// other than the one this copy derives from.
    pub fn save(&self, id: &str) -> Result<()> {
        validate_session_id(id)?;
        let session = self
            .find_live(id)
            .ok_or_else(|| Error::SessionNotFound { id: id.to_owned() })?;
        let mut record = lock(&session.record);
        let context = lock(&session.context);
        let stored = self.store_locked(id, &mut record, &context);
        drop(context);
        drop(record);
        self.forget_if_conflict(&session, stored)
    }

    /// After a conflict the live copy is stale: it leaves the live set, so that the next `load` reads the
    /// stored version (the error tells the caller; nothing is dropped silently).
    fn forget_if_conflict(&self, session: &Arc<ManagedSession>, result: Result<()>) -> Result<()> {
        if let Err(Error::SessionConflict { .. }) = &result {
            lock(&self.live).retain(|s| !Arc::ptr_eq(s, session));
        }
        result
    }

    /// Saves `context` as session `id`, replacing what is stored (whatever its version) and the live copy:
    /// the way to put a context built elsewhere under a name. The history of an existing session is kept.
    pub fn save_context(&self, id: &str, context: &Arc<Mutex<Context>>) -> Result<()> {
        validate_session_id(id)?;
        if let Some(session) = self.find_live(id) {
            if Arc::ptr_eq(&session.context, context) {
                let mut record = lock(&session.record);
                let guard = lock(&session.context);
                return self.store_locked(id, &mut record, &guard);
            }
        }
        let mut record = match self.find_live(id) {
            Some(session) => {
                let record = lock(&session.record);
                Record {
                    manager: record.manager.clone(),
                    user_metadata: record.user_metadata.clone(),
                    stored_version: 0,
                    dirty: true,
                }
            }
            None => {
                // Keep what the stored session recorded (history, system prompt, metadata, creation time).
                let (manager, user_metadata) = match read_stored_header(self.store.as_ref(), id) {
                    Ok(header) => split_metadata(header.metadata),
                    Err(_) => (ManagerRecord::default(), Metadata::new()),
                };
                let created_at = if manager.created_at.is_empty() {
                    now()
                } else {
                    manager.created_at.clone()
                };
                Record {
                    manager: ManagerRecord {
                        created_at,
                        ..manager
                    },
                    user_metadata,
                    stored_version: 0,
                    dirty: true,
                }
            }
        };
        {
            let _key = self.store.lock(id)?;
            record.stored_version = self.stored_version(id)?.unwrap_or(0);
            let guard = lock(context);
            self.write_locked(id, &mut record, &guard)?;
        }
        // The live copy (if any) is now stale: drop it so the next load reads what was just stored.
        lock(&self.live).retain(|s| s.id != id);
        Ok(())
    }

    /// The stored version of `id` (None: not stored; a file without a manager record is version 0).
    fn stored_version(&self, id: &str) -> Result<Option<u64>> {
        match read_stored_header(self.store.as_ref(), id) {
            Ok(header) => Ok(Some(split_metadata(header.metadata).0.version)),
            Err(Error::SessionNotFound { .. }) => Ok(None),
            Err(e @ Error::Io { .. }) => Err(e),
            // A damaged stored file has no version to protect: it may be overwritten.
            Err(_) => Ok(Some(0)),
        }
    }

    /// Stores `record` and `context` under `id` with the version check, holding the key's lock.
    fn store_locked(&self, id: &str, record: &mut Record, context: &Context) -> Result<()> {
        let _key = self.store.lock(id)?;
        let found = self.stored_version(id)?.unwrap_or(0);
        if found != record.stored_version {
            return Err(Error::SessionConflict {
                id: id.to_owned(),
                expected: record.stored_version,
                found,
            });
        }
        self.write_locked(id, record, context)
    }

    fn write_locked(&self, id: &str, record: &mut Record, context: &Context) -> Result<()> {
        let version = record.stored_version + 1;
        let updated_at = now();
        let bytes = context.snapshot(None, &record.metadata(version, updated_at.clone()), None)?;
        self.store.put(id, &bytes)?;
        record.stored_version = version;
        record.manager.version = version;
        record.manager.updated_at = updated_at;
        record.dirty = false;
        lock(&self.stats).store_saves += 1;
        Ok(())
    }

    /// Deletes session `id` and its checkpoints, live and stored.
    pub fn delete(&self, id: &str) -> Result<()> {
        validate_session_id(id)?;
        let was_live = {
            let mut live = lock(&self.live);
            let before = live.len();
            live.retain(|s| s.id != id);
            before != live.len()
        };
        match delete_stored_session(self.store.as_ref(), id) {
            Err(Error::SessionNotFound { .. }) if was_live => Ok(()),
            other => other,
        }
    }

    /// Every stored session (checkpoints excluded), sorted by id; see [`list_stored_sessions`].
    pub fn list(&self) -> Result<Vec<ListedSession>> {
        list_stored_sessions(self.store.as_ref())
    }

    /// One chat turn on session `id`: `user_message` is formatted with the model's chat template after the
    /// history, only what the context does not hold yet is decoded, and the answer is generated; both
    /// messages join the history. Saved when the manager autosaves.
    pub fn chat(
        &self,
        id: &str,
        user_message: &str,
        options: GenerateOptions,
        interrupt: &mut dyn Interrupt,
    ) -> Result<Generation> {
        let mut turn = self.start_chat(id, user_message, options, interrupt)?;
        let mut text = String::new();
        while let Some(piece) = turn.next_piece(interrupt)? {
            text.push_str(&piece);
        }
        turn.finish(self)
    }

    /// Starts a chat turn whose answer is read piece by piece ([`ChatTurn::next_piece`]); the turn joins the
    /// history when [`ChatTurn::finish`] is called.
    pub fn start_chat(
        &self,
        id: &str,
        user_message: &str,
        options: GenerateOptions,
        interrupt: &mut dyn Interrupt,
    ) -> Result<ChatTurn> {
        let session = self.load(id)?;
        let permit = TurnPermit::acquire(&session);
        let generator = {
            let record = lock(&session.record);
            let mut context = lock(&session.context);
            let prompt = self.conversation_prompt(&record.manager, user_message)?;
            context
                .start_generation_reusing_prefix(0, &prompt, options, interrupt)?
                .0
        };
        Ok(ChatTurn {
            session,
            user_message: user_message.to_owned(),
            generator,
            text: String::new(),
            _permit: permit,
        })
    }

    /// The whole conversation formatted with the chat template, ready for the assistant's answer.
    fn conversation_prompt(&self, record: &ManagerRecord, user_message: &str) -> Result<String> {
        let mut messages = Vec::with_capacity(record.history.len() + 2);
        if let Some(system) = &record.system_prompt {
            messages.push(ChatMessage {
                role: "system".to_owned(),
                content: system.clone(),
            });
        }
        messages.extend(record.history.iter().map(ChatMessage::from));
        messages.push(ChatMessage {
            role: "user".to_owned(),
            content: user_message.to_owned(),
        });
        self.model.apply_chat_template(&messages, true)
    }

    /// Generates on session `id` after `full_prompt`, the *whole* text the context should hold: only what
    /// follows the longest common prefix with what it holds is decoded. Returns the generation and the
    /// number of tokens reused. The chat history is not changed.
    pub fn generate_reusing_prefix(
        &self,
        id: &str,
        full_prompt: &str,
        options: GenerateOptions,
        interrupt: &mut dyn Interrupt,
    ) -> Result<(Generation, usize)> {
        let session = self.load(id)?;
        let mut record = lock(&session.record);
        let mut context = lock(&session.context);
        let result = context.generate_reusing_prefix(0, full_prompt, options, interrupt);
        record.dirty = true;
        result
    }

    /// Stores the current state and history of session `id` as checkpoint `label` (replacing one of that
    /// label).
    pub fn checkpoint(&self, id: &str, label: &str) -> Result<()> {
        validate_name("label", label)?;
        let session = self.load(id)?;
        let record = lock(&session.record);
        let context = lock(&session.context);
        let key = checkpoint_key(id, label);
        let _key = self.store.lock(&key)?;
        let bytes =
            context.snapshot(None, &record.metadata(record.manager.version, now()), None)?;
        self.store.put(&key, &bytes)
    }

    /// Puts session `id` back to checkpoint `label`: state and history. The session is then changed
    /// relative to what is stored (save it, or let autosave do it on the next turn).
    pub fn revert(&self, id: &str, label: &str) -> Result<()> {
        validate_name("label", label)?;
        let session = self.load(id)?;
        let key = checkpoint_key(id, label);
        let bytes = self
            .store
            .get(&key)?
            .ok_or_else(|| Error::SessionNotFound { id: key.clone() })?;
        let mut record = lock(&session.record);
        let mut context = lock(&session.context);
        let info = context.restore_named(&bytes, None, &key, None)?;
        let (manager, user_metadata) = split_metadata(info.header.metadata);
        record.manager.history = manager.history;
        record.manager.system_prompt = manager.system_prompt;
        record.user_metadata = user_metadata;
        record.dirty = true;
        if self.autosave {
            let stored = self.store_locked(id, &mut record, &context);
            drop(context);
            drop(record);
            self.forget_if_conflict(&session, stored)?;
        }
        Ok(())
    }

    /// Labels of the checkpoints of session `id`, sorted.
    pub fn checkpoints(&self, id: &str) -> Result<Vec<String>> {
        validate_session_id(id)?;
        self.checkpoint_labels(id)
    }

    fn checkpoint_labels(&self, id: &str) -> Result<Vec<String>> {
        checkpoint_labels(self.store.as_ref(), id)
    }
}

fn checkpoint_labels(store: &dyn SessionStore, id: &str) -> Result<Vec<String>> {
    let prefix = format!("{id}{CHECKPOINT_SEPARATOR}");
    let mut labels: Vec<String> = store
        .list()?
        .into_iter()
        .filter_map(|e| e.key.strip_prefix(&prefix).map(str::to_owned))
        .collect();
    labels.sort();
    Ok(labels)
}

/// Deletes stored session `id` and its checkpoints, holding its lock; no model needed (the CLI's
/// `sessions delete`). A live copy in some manager is not affected.
pub fn delete_stored_session(store: &dyn SessionStore, id: &str) -> Result<()> {
    validate_session_id(id)?;
    let _key = store.lock(id)?;
    let stored = store.delete(id)?;
    for label in checkpoint_labels(store, id)? {
        store.delete(&checkpoint_key(id, &label))?;
    }
    if !stored {
        return Err(Error::SessionNotFound { id: id.to_owned() });
    }
    Ok(())
}

/// Every stored session (checkpoints excluded), sorted by id, read from the headers only (a load still
/// verifies everything). A file that cannot be read is listed with the reason; files that are not sessions
/// are not listed. No model needed.
pub fn list_stored_sessions(store: &dyn SessionStore) -> Result<Vec<ListedSession>> {
    let mut out = Vec::new();
    for entry in store.list()? {
        if entry.key.contains(CHECKPOINT_SEPARATOR) || validate_session_id(&entry.key).is_err() {
            continue;
        }
        let header = read_stored_header(store, &entry.key);
        out.push(ListedSession {
            id: entry.key,
            size: entry.size,
            header: header.map_err(|e| e.to_string()),
        });
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

fn read_stored_header(store: &dyn SessionStore, key: &str) -> Result<SessionHeader> {
    let origin = store
        .location(key)
        .map_or_else(|| key.to_owned(), |p| p.display().to_string());
    let prelude = store
        .get_prefix(key, format::PRELUDE_LEN)?
        .ok_or_else(|| Error::SessionNotFound { id: key.to_owned() })?;
    let end = format::header_end(&prelude, &origin)?;
    let prefix = store.get_prefix(key, end)?.unwrap_or_default();
    format::read_header(&prefix, &origin)
}

fn checkpoint_key(id: &str, label: &str) -> String {
    format!("{id}{CHECKPOINT_SEPARATOR}{label}")
}

/// A chat turn in progress (see [`SessionManager::start_chat`]).
pub struct ChatTurn {
    session: Arc<ManagedSession>,
    user_message: String,
    generator: Generator,
    text: String,
    /// Held until the turn is finished or dropped, so that turns of one session never interleave.
    _permit: TurnPermit,
}

impl std::fmt::Debug for ChatTurn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTurn")
            .field("session", &self.session.id)
            .finish_non_exhaustive()
    }
}

impl ChatTurn {
    /// The next piece of the answer, or `None` when it is complete.
    pub fn next_piece(&mut self, interrupt: &mut dyn Interrupt) -> Result<Option<String>> {
        let mut context = lock(&self.session.context);
        let piece = self.generator.next_piece(&mut context, interrupt)?;
        if let Some(piece) = &piece {
            self.text.push_str(piece);
        }
        Ok(piece)
    }

    /// Ends the turn: the rest of the answer is generated if it was not read, the user message and the answer
    /// join the history, and the session is saved if the manager autosaves.
    pub fn finish(mut self, manager: &SessionManager) -> Result<Generation> {
        while self.next_piece(&mut crate::NeverInterrupt)?.is_some() {}
        let mut record = lock(&self.session.record);
        record.manager.history.push(StoredMessage {
            role: "user".to_owned(),
            content: self.user_message,
        });
        record.manager.history.push(StoredMessage {
            role: "assistant".to_owned(),
            content: self.text.clone(),
        });
        record.dirty = true;
        if manager.autosave {
            let context = lock(&self.session.context);
            let stored = manager.store_locked(&self.session.id, &mut record, &context);
            drop(context);
            drop(record);
            manager.forget_if_conflict(&self.session, stored)?;
        }
        Ok(self.generator.into_generation(self.text))
    }

    /// The session this turn runs on.
    pub fn session_id(&self) -> &str {
        &self.session.id
    }
}
