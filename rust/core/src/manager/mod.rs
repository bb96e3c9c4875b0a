//! Many named, persistent sessions for many users on one model.
//!
//! A [`SessionManager`] keeps each session as one session file in a [`SessionStore`] (the context's state, the
//! chat history and a version number in its metadata), up to `max_live` sessions loaded in memory (least
//! recently used first out, saved before they go if they changed), and one encoded copy of each system
//! prompt, so that the second to Nth session starting from it decodes nothing. With a [`PrefixCache`]
//! ([`SessionManager::with_prefix_cache`]) every session context it creates or loads shares that cache, so
//! sessions whose conversations start alike (a long system prompt and the same first messages) restore each
//! other's full KV chunks instead of decoding them.
//!
//! Concurrency rules:
//! - Every live copy of a session remembers the stored version it derives from. A save takes the key's lock
//!   (threads and processes), compares that version with the stored one, writes version + 1 and releases the
//!   lock; if the store holds another version, someone else saved in between and the save fails with
//!   [`Error::SessionConflict`] instead of silently dropping their turn.
//! - A turn (chat, streamed chat, generation, revert, trim) holds its session exclusively until it ends
//!   ([`SessionManager::begin_turn`]); a session is never evicted while a turn holds it.
//! - Whether a session changed is derived from its context (every change of the KV cache counts, whoever
//!   made it) and from its record.
//! - Locks: see `live.rs`. No manager-wide lock is held across I/O, generation or a wait: eviction victims are
//!   chosen under the live set's lock and saved after it is released.
//!
//! The files: `ids.rs` (what names a session), `records.rs` (what is stored), `live.rs` (the live set and
//! turn permits), `chat.rs` (turns).

mod chat;
mod ids;
mod live;
mod records;
mod writer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::chunks::PrefixCache;
use crate::context::generation::Generator;
use crate::context::{
    Context, GenerateOptions, Generation, GenerationStats, Interrupt, SequenceCopy, StopReason,
};
use crate::engine::{ContextPool, PoolMemory};
use crate::error::{Error, Result};
use crate::model::{ChatMessage, Model};
use crate::params::ContextParams;
use crate::session::{Metadata, SessionInfo};
use crate::signing::SessionKey;
use crate::store::SessionStore;

pub use chat::{ChatTurn, OverflowPolicy, SessionTurn};
pub use ids::{validate_session_id, MAX_SESSION_ID_LEN};
pub use live::{ManagedSession, TurnWait};
pub use records::{
    delete_stored_session, inspect_stored_session, list_stored_sessions, ListedSession,
    ManagerRecord, StoredMessage, MANAGER_METADATA_KEY,
};
pub use writer::{pin_stored_chunks, stored_manifest_chunks};

use ids::{checkpoint_key, validate_label};
use live::{lock, LiveSet, TurnPermit};
use records::{is_stored, now, split_metadata, stored_record_or_new, stored_version, Record};
use writer::{ChunkPins, SessionWriter};

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
    /// Tokens decoded again while loading chunk manifests, because a chunk they name was missing or
    /// damaged (0 while the chunk store keeps what the manifests need).
    pub recomputed_tokens: u64,
    /// With batching: decode steps the pool ran (each one `llama_decode` for every session in it).
    pub batch_steps: u64,
    /// With batching: most sessions decoded in one step so far.
    pub max_sessions_in_step: usize,
}

/// Many named, persistent sessions on one model. `Sync`: share it between threads.
pub struct SessionManager {
    model: Model,
    params: ContextParams,
    store: Arc<dyn SessionStore>,
    autosave: bool,
    overflow: OverflowPolicy,
    live: LiveSet,
    /// Encoded system prompts, by their token ids: a copy of a context holding only them.
    prefixes: Mutex<HashMap<Vec<i32>, Arc<SequenceCopy>>>,
    stats: Mutex<ManagerStats>,
    /// Signs every session and checkpoint written, and is required of every one read.
    key: Option<SessionKey>,
    /// Shared by every session context this manager creates or loads.
    prefix_cache: Option<PrefixCache>,
    /// With chunked storage: what the stored manifests name, pinned in the prefix cache's store.
    pins: Option<ChunkPins>,
    /// With batching: one llama.cpp context whose sequences are the live sessions, decoded together.
    pool: Option<ContextPool>,
}

impl std::fmt::Debug for SessionManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionManager")
            .field("store", &self.store)
            .field("params", &self.params)
            .field("max_live", &self.live.max_live())
            .finish_non_exhaustive()
    }
}

impl SessionManager {
    /// A manager of the sessions in `store`, whose contexts use `params` (validated here). At most
    /// `max_live` (>= 1) sessions stay loaded. Durable by default: every change a turn makes is saved as the
    /// turn ends ([`SessionManager::with_autosave`] to save only on request); a chat that would not fit drops
    /// the oldest turns ([`SessionManager::with_overflow`]).
    pub fn new(
        model: &Model,
        params: ContextParams,
        store: Arc<dyn SessionStore>,
        max_live: usize,
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
            autosave: true,
            overflow: OverflowPolicy::default(),
            live: LiveSet::new(max_live),
            prefixes: Mutex::new(HashMap::new()),
            stats: Mutex::new(ManagerStats::default()),
            key: None,
            prefix_cache: None,
            pins: None,
            pool: None,
        })
    }

    /// With `autosave` (the default), every turn that changes a session (a chat, a revert, a trim) saves it
    /// before it returns. Without it, sessions are saved by [`SessionManager::save`] and when they are
    /// evicted; what is unsaved when the manager goes is lost ([`SessionManager::unsaved_ids`] tells which).
    pub fn with_autosave(mut self, autosave: bool) -> SessionManager {
        self.autosave = autosave;
        self
    }

    /// What a chat turn that does not fit does ([`OverflowPolicy`]; default: drop the oldest turns).
    pub fn with_overflow(mut self, overflow: OverflowPolicy) -> SessionManager {
        self.overflow = overflow;
        self
    }

    /// Signs every session and checkpoint this manager writes with `key`, and loads only sessions signed by
    /// it ([`Error::SessionSignature`] otherwise): for stores that others can write to.
    pub fn with_secret_key(mut self, key: SessionKey) -> SessionManager {
        self.key = Some(key);
        self
    }

    /// Gives every session context this manager creates or loads from now on `cache` (none by default): a
    /// chat turn then restores the longest chain of full chunks any session (or any context sharing the
    /// cache) computed for the same tokens, and decodes only the rest. The whole-system-prompt copy the
    /// manager keeps is still used first; the cache adds what follows it.
    pub fn with_prefix_cache(mut self, cache: PrefixCache) -> SessionManager {
        self.prefix_cache = Some(cache);
        self
    }

    /// Stores sessions and checkpoints as chunk manifests in `cache`, which also becomes the prefix cache
    /// ([`SessionManager::with_prefix_cache`]): what sessions share (a system prompt, a document) is stored
    /// once, and a session stores its own chunks and the partial last one. Sessions stored as one file stay
    /// readable, and are written as manifests at their next save. The cache's store must outlive the process
    /// (on disk: [`PrefixCache::on_disk`]); the chunks the stored manifests name are pinned in it, so that
    /// its eviction never removes them (see docs/prefix-cache.md). Models whose memory is not one plain KV
    /// cache keep one file per session.
    pub fn with_chunked_storage(mut self, cache: PrefixCache) -> Result<SessionManager> {
        if !cache.store().is_persistent() {
            return Err(Error::invalid(
                "prefix_cache",
                "a cache whose chunks outlive the process (on disk) to store sessions in",
                "a cache in memory",
            ));
        }
        self.pins = Some(ChunkPins::scan(cache.store().clone(), self.store.as_ref())?);
        self.prefix_cache = Some(cache);
        Ok(self)
    }

    /// Runs the live sessions as sequences of one llama.cpp context ([`ContextPool`]) of `max_live` sequences
    /// of `n_ctx` cells each, allocated now: the decodes of all sessions that generate at the same time go
    /// into one batch per step, with at most `prompt_tokens_per_step` prompt tokens in a step while a session
    /// is generating (0: `n_batch`). Every session keeps the [`Context`] API and its states are byte for
    /// byte those of a context of its own. A session that finds every sequence held by a turn (or by a
    /// [`ManagedSession::context`] handle kept after its eviction) gets a context of its own, as without
    /// batching. Models whose memory is not one plain KV cache keep a context per session (this returns the
    /// manager unchanged for them).
    pub fn with_batching(self, prompt_tokens_per_step: usize) -> Result<SessionManager> {
        self.with_batching_memory(prompt_tokens_per_step, PoolMemory::PerSequence)
    }

    /// [`SessionManager::with_batching`] with the sequences' cells laid out as `memory` says. With
    /// [`PoolMemory::Shared`] the live sessions share one KV cache of that many cells: a turn reserves the
    /// cells it may need (its conversation and `max_tokens`) before it starts, loading or creating a session
    /// reserves its tokens, and when the cache is full the least recently used idle session is evicted
    /// (saved) to make room, never one in a turn. [`Error::KvBudgetFull`] when the sessions in turns hold the
    /// rest.
    pub fn with_batching_memory(
        mut self,
        prompt_tokens_per_step: usize,
        memory: PoolMemory,
    ) -> Result<SessionManager> {
        if self.model.memory_kind() != crate::model::MemoryKind::Attention {
            return Ok(self);
        }
        let sequences = u32::try_from(self.live.max_live()).map_err(|_| {
            Error::invalid(
                "max_live",
                "at most 2^32 - 1 live sessions",
                self.live.max_live(),
            )
        })?;
        self.pool = Some(ContextPool::with_memory(
            &self.model,
            self.params.clone(),
            sequences,
            prompt_tokens_per_step,
            memory,
        )?);
        Ok(self)
    }

    /// Runs `f`, which takes cells of the pool's shared cache (a restore, a turn's reservation), evicting the
    /// least recently used idle session holding cells (never `except`) each time `f` finds the cache full;
    /// [`Error::KvBudgetFull`] once no such session is left. Each session is tried once: one that could not
    /// be saved stays live, and one whose Context a caller holds keeps its cells. Holds no lock across `f`
    /// or an eviction.
    fn with_cells<T>(
        &self,
        except: Option<&Arc<ManagedSession>>,
        mut f: impl FnMut() -> Result<T>,
    ) -> Result<T> {
        // Weak: a victim's Context must go (and give its cells back) as soon as it is evicted.
        let mut tried: Vec<std::sync::Weak<ManagedSession>> =
            except.into_iter().map(Arc::downgrade).collect();
        loop {
            match f() {
                Err(full @ Error::KvBudgetFull { .. }) => {
                    let victims = self.live.victim_holding_cells(&tried);
                    if victims.is_empty() {
                        return Err(full);
                    }
                    tried.extend(victims.iter().map(Arc::downgrade));
                    self.evict(victims);
                }
                other => return other,
            }
        }
    }

    /// Reserves `cells` of the pool's shared cache for the turn on `session`, whose `context` the caller
    /// holds, and gives it back: a turn that starts has the cells for all it may decode. When the cache is
    /// full, idle sessions are evicted for it, which takes their locks: not while this one's is held, so
    /// the context is released meanwhile (the turn's permit keeps other turns out). Nothing to do without a
    /// shared cache.
    pub(super) fn reserve_turn_cells<'s>(
        &self,
        session: &'s Arc<ManagedSession>,
        context: MutexGuard<'s, Context>,
        cells: usize,
    ) -> Result<MutexGuard<'s, Context>> {
        match context.reserve_pool_cells(cells) {
            Err(Error::KvBudgetFull { .. }) => {
                drop(context);
                self.with_cells(Some(session), || {
                    lock(&session.context).reserve_pool_cells(cells)
                })?;
                Ok(lock(&session.context))
            }
            other => other.map(|()| context),
        }
    }

    /// The pool the live sessions run in, with batching ([`SessionManager::with_batching`]).
    pub fn pool(&self) -> Option<&ContextPool> {
        self.pool.as_ref()
    }

    /// Whether sessions are stored as chunk manifests ([`SessionManager::with_chunked_storage`]).
    pub fn chunked_storage(&self) -> bool {
        self.pins.is_some()
    }

    /// How this manager writes sessions and checkpoints.
    fn writer(&self) -> SessionWriter<'_> {
        SessionWriter {
            key: self.key.as_ref(),
            pins: self.pins.as_ref(),
        }
    }

    /// The prefix cache the sessions' contexts share, if any.
    pub fn prefix_cache(&self) -> Option<&PrefixCache> {
        self.prefix_cache.as_ref()
    }

    /// A fresh context for a session: the manager's parameters and prefix cache.
    fn new_context(&self) -> Result<Context> {
        let mut context = match &self.pool {
            Some(pool) => match pool.try_context()? {
                Some(context) => context,
                None => {
                    // Every sequence is taken: idle sessions make room. Sessions in a turn, or whose context a
                    // caller still holds, keep theirs; this session then gets a context of its own.
                    self.evict(self.live.victims_for_one_more());
                    match pool.try_context()? {
                        Some(context) => context,
                        None => Context::new(&self.model, self.params.clone())?,
                    }
                }
            },
            None => Context::new(&self.model, self.params.clone())?,
        };
        context.set_prefix_cache(self.prefix_cache.clone());
        Ok(context)
    }

    /// The key sessions are signed and checked with, if any.
    pub(crate) fn key(&self) -> Option<&SessionKey> {
        self.key.as_ref()
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
        self.live.max_live()
    }

    /// Whether chat turns are saved as they end.
    pub fn autosave(&self) -> bool {
        self.autosave
    }

    /// What a chat turn that does not fit does.
    pub fn overflow(&self) -> OverflowPolicy {
        self.overflow
    }

    /// Ids of the live sessions whose changes are not stored (least recently used first): what would be lost
    /// if the manager went now. Always empty right after every turn with autosave.
    pub fn unsaved_ids(&self) -> Vec<String> {
        self.live
            .sessions()
            .iter()
            .filter(|s| {
                let record = lock(&s.record);
                let context = lock(&s.context);
                record.changed(&context)
            })
            .map(|s| s.id.clone())
            .collect()
    }

    /// Counters so far.
    pub fn stats(&self) -> ManagerStats {
        let mut stats = *lock(&self.stats);
        if let Some(pool) = &self.pool {
            let steps = pool.stats();
            stats.batch_steps = steps.steps;
            stats.max_sessions_in_step = steps.max_sequences_in_step;
        }
        stats
    }

    /// Where session `id` is stored, if the store has paths.
    pub fn session_path(&self, id: &str) -> Result<Option<PathBuf>> {
        validate_session_id(id)?;
        Ok(self.store.location(id))
    }

    /// Ids of the sessions loaded in memory, least recently used first (a session being evicted counts until
    /// it is saved).
    pub fn live_ids(&self) -> Vec<String> {
        self.live.ids()
    }

    /// Bytes of KV cache held by the live sessions' contexts (what they allocated, used or not).
    pub fn live_kv_bytes(&self) -> usize {
        // A pool allocated its cells once, for all its sequences; the sessions outside it have their own.
        let own: usize = self
            .live
            .sessions()
            .iter()
            .map(|s| lock(&s.context))
            .filter(|context| !context.is_pooled())
            .map(|context| context.kv_cache_bytes())
            .sum();
        own + self.pool.as_ref().map_or(0, ContextPool::kv_cache_bytes)
    }

    /// Whether session `id` exists (live or stored).
    pub fn exists(&self, id: &str) -> Result<bool> {
        validate_session_id(id)?;
        Ok(self.live.contains(id) || is_stored(self.store.as_ref(), id)?)
    }

    /// Creates session `id`, starting from `system_prompt` (formatted with the model's chat template as a
    /// system message), stores it and keeps it live. A system prompt already encoded by this manager is
    /// restored, not decoded again. The session context's [`Context::last_stats`] are then the system
    /// prompt's encoding (`prompt_tokens`: what was decoded, 0 when it was restored).
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
        let record = Record::unsaved(
            ManagerRecord {
                version: 0,
                system_prompt: system_prompt.map(str::to_owned),
                history: Vec::new(),
                created_at: created_at.clone(),
                updated_at: created_at,
            },
            metadata,
        );
        let session = ManagedSession::new(id, context, record);
        {
            let mut record = lock(&session.record);
            let context = lock(&session.context);
            match self.store_record(id, &mut record, &context) {
                // Created by another thread or process since the check above.
                Err(Error::SessionConflict { expected: 0, .. }) => {
                    return Err(Error::SessionExists { id: id.to_owned() })
                }
                other => other?,
            }
        }
        Ok(self.insert_live(session))
    }

    fn context_with_system_prompt(&self, system_prompt: Option<&str>) -> Result<Context> {
        let mut context = self.new_context()?;
        let Some(system_prompt) = system_prompt else {
            return Ok(context);
        };
        // Tokenized as every chat turn is (the prompt as plain text inside the template's markup), so that the
        // conversation's tokens start with exactly these.
        let tokens = self.model.tokenize_chat(
            &[ChatMessage {
                role: "system".to_owned(),
                content: system_prompt.to_owned(),
            }],
            false,
            true,
        )?;
        // The new session's cells of a pool's shared cache, before they are filled.
        self.with_cells(None, || context.reserve_pool_cells(tokens.len()))?;
        let key: Vec<i32> = tokens.iter().map(|t| t.0).collect();
        let cached = lock(&self.prefixes).get(&key).cloned();
        // The new context's last stats are the system prompt's encoding: what creating the session decoded.
        match cached {
            Some(copy) => {
                context.restore_sequence_copy(&copy)?;
                lock(&self.stats).prefix_reuses += 1;
                let restored = GenerationStats {
                    context_tokens: tokens.len(),
                    ..GenerationStats::default()
                };
                context.set_last_stats(Some((restored, StopReason::MaxTokens)));
            }
            None => {
                // Through the prefix cache, if any: its chunks are restored (another process may have
                // computed them) and the ones it lacks are offered to it.
                let encode_only = GenerateOptions {
                    max_tokens: 0,
                    ..GenerateOptions::default()
                };
                let encoded = Generator::start_tokens(
                    &mut context,
                    0,
                    &tokens,
                    encode_only,
                    &mut crate::NeverInterrupt,
                )?;
                lock(&self.stats).prefill_tokens += encoded.stats().prompt_tokens as u64;
                let encoding = encoded.into_generation(String::new());
                context.set_last_stats(Some((encoding.stats, encoding.stop_reason)));
                let copy = context.copy_sequence_0()?;
                lock(&self.prefixes).insert(key, Arc::new(copy));
            }
        }
        Ok(context)
    }

    /// Session `id` as it stands: the live copy, or the stored version when there is none, or when
    /// another process or worker saved a newer version (or deleted the session) since the live copy was
    /// read and the copy holds no change of its own. So no caller reads an outdated conversation from a
    /// manager that shares its store. Checking costs one small read of the store (the stored version) for
    /// a live copy; a copy that a turn holds is returned as it is, without the check (the turn checked
    /// when it began, and its save settles which version wins).
    pub fn load(&self, id: &str) -> Result<Arc<ManagedSession>> {
        loop {
            let (session, just_read) = self.live_or_stored(id)?;
            if just_read {
                return Ok(session);
            }
            let idle = TurnPermit::acquire(
                &session,
                TurnWait::AtMost(Duration::ZERO),
                &mut crate::NeverInterrupt,
            );
            match idle {
                Ok(Some(permit)) => {
                    if !self.outdated_and_unchanged(&session)? {
                        return Ok(session);
                    }
                    drop(permit);
                    self.live.retire(&session);
                }
                // It left the live set meanwhile (evicted, replaced): read it again.
                Ok(None) => {}
                Err(Error::SessionBusy { .. }) => return Ok(session),
                Err(e) => return Err(e),
            }
        }
    }

    /// Session `id` from memory (no I/O), or read from the store: the session, and whether it was read
    /// now (so that it is the stored version).
    fn live_or_stored(&self, id: &str) -> Result<(Arc<ManagedSession>, bool)> {
        validate_session_id(id)?;
        if let Some(session) = self.live.find(id) {
            return Ok((session, false));
        }
        let origin = self
            .store
            .location(id)
            .map_or_else(|| id.to_owned(), |p| p.display().to_string());
        let mut context = self.new_context()?;
        let signed = self.key.is_some();
        let bytes = records::read_session_value(self.store.as_ref(), id, &origin, &context, signed)
            .map_err(|e| e.with_mismatch_advice(manager_mismatch_advice))?
            .ok_or_else(|| Error::SessionNotFound { id: id.to_owned() })?;
        // A restore into a pool's shared cache that finds it full makes room (the fresh context stays empty).
        let info = self
            .with_cells(None, || {
                context.restore_named(&bytes, None, &origin, self.key.as_ref())
            })
            .map_err(|e| e.with_mismatch_advice(manager_mismatch_advice))?;
        {
            let mut stats = lock(&self.stats);
            stats.store_loads += 1;
            stats.recomputed_tokens += info.recomputed_tokens as u64;
        }
        let (manager, user_metadata) = split_metadata(info.header.metadata);
        let record = Record::read(manager, user_metadata, &context);
        // Another thread may have loaded it meanwhile: then its copy is the one kept.
        Ok((
            self.insert_live(ManagedSession::new(id, context, record)),
            true,
        ))
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

    fn insert_live(&self, session: Arc<ManagedSession>) -> Arc<ManagedSession> {
        let (session, victims) = self.live.insert(session);
        self.evict(victims);
        session
    }

    /// Evicts idle sessions over `max_live` (those kept live for their turns, once the turns ended).
    fn evict_over_capacity(&self) {
        let victims = self.live.victims();
        self.evict(victims);
    }

    /// Saves each victim if it changed (with or without autosave: eviction never drops changes) and drops it
    /// from the live set, unless a turn or a `load` claimed it back meanwhile. Runs without the live set's lock: the victims were chosen and marked under it. A
    /// victim that cannot be saved (a conflict, a full disk) stays live rather than lose its changes.
    fn evict(&self, victims: Vec<Arc<ManagedSession>>) {
        for victim in victims {
            let saved = {
                let mut record = lock(&victim.record);
                let context = lock(&victim.context);
                if !victim.is_being_evicted() {
                    continue;
                }
                !record.changed(&context)
                    || self.store_record(&victim.id, &mut record, &context).is_ok()
            };
            if self.live.finish_eviction(&victim, saved) {
                lock(&self.stats).evictions += 1;
            }
        }
    }

    /// Saves session `id`'s live copy. Fails with [`Error::SessionConflict`] if the store holds a version
    /// other than the one this copy derives from. A stored session that is not live has nothing unsaved:
    /// saving it does nothing. [`Error::SessionNotFound`] if there is no such session.
    pub fn save(&self, id: &str) -> Result<()> {
        validate_session_id(id)?;
        let Some(session) = self.live.find(id) else {
            return if is_stored(self.store.as_ref(), id)? {
                Ok(())
            } else {
                Err(Error::SessionNotFound { id: id.to_owned() })
            };
        };
        let stored = {
            let mut record = lock(&session.record);
            let context = lock(&session.context);
            self.store_record(id, &mut record, &context)
        };
        self.forget_if_conflict(&session, stored)
    }

    /// Stores `record` and `context` (both held by the caller) as session `id` with the version check.
    fn store_record(&self, id: &str, record: &mut Record, context: &Context) -> Result<()> {
        record.store(self.store.as_ref(), id, context, self.writer())?;
        lock(&self.stats).store_saves += 1;
        Ok(())
    }

    /// Saves a session whose turn just changed it, when the manager autosaves. The guards are the turn's,
    /// taken record first, then context (the order of every path); both are released before a conflict
    /// retires the live copy.
    fn autosave_changed(
        &self,
        session: &Arc<ManagedSession>,
        mut record: MutexGuard<'_, Record>,
        context: MutexGuard<'_, Context>,
    ) -> Result<()> {
        if !self.autosave {
            return Ok(());
        }
        let stored = self.store_record(&session.id, &mut record, &context);
        drop(context);
        drop(record);
        self.forget_if_conflict(session, stored)
    }

    /// After a conflict the live copy is stale: it leaves the live set, so that the next `load` reads the
    /// stored version (the error tells the caller; nothing is dropped silently).
    fn forget_if_conflict(&self, session: &Arc<ManagedSession>, result: Result<()>) -> Result<()> {
        if let Err(Error::SessionConflict { .. }) = &result {
            self.live.retire(session);
        }
        result
    }

    /// Saves `context` as session `id`, replacing what is stored (whatever its version) and the live copy:
    /// the way to put a context built elsewhere under a name. The history, system prompt and metadata of an
    /// existing session are kept. [`Error::SessionBusy`] (nothing written) if a turn holds the live copy.
    pub fn save_context(&self, id: &str, context: &Arc<Mutex<Context>>) -> Result<()> {
        validate_session_id(id)?;
        let live = self.live.find(id);
        if let Some(session) = &live {
            if Arc::ptr_eq(&session.context, context) {
                return self.save(id);
            }
        }
        // The live copy is replaced: no turn may be running on it, and none may start until it is gone.
        let permit = match &live {
            Some(session) => TurnPermit::acquire(
                session,
                TurnWait::AtMost(Duration::ZERO),
                &mut crate::NeverInterrupt,
            )?,
            None => None,
        };
        let mut record = match &permit {
            Some(permit) => {
                let record = lock(&permit.session().record);
                Record::unsaved(record.manager.clone(), record.user_metadata.clone())
            }
            None => {
                let (manager, user_metadata) = stored_record_or_new(self.store.as_ref(), id)?;
                Record::unsaved(manager, user_metadata)
            }
        };
        {
            let context = lock(context);
            record.replace(self.store.as_ref(), id, &context, self.writer())?;
            lock(&self.stats).store_saves += 1;
        }
        // The live copy is now stale: it goes, so that the next load reads what was just stored.
        if let Some(permit) = &permit {
            self.live.retire(permit.session());
        }
        Ok(())
    }

    /// Deletes session `id` and its checkpoints, live and stored. A turn in progress on it ends on a copy that
    /// no longer exists (an autosave then fails with [`Error::SessionConflict`]).
    pub fn delete(&self, id: &str) -> Result<()> {
        validate_session_id(id)?;
        let was_live = self.live.retire_id(id);
        let deleted = delete_stored_session(self.store.as_ref(), id);
        if let Some(pins) = &self.pins {
            pins.release_session(id);
        }
        match deleted {
            Err(Error::SessionNotFound { .. }) if was_live => Ok(()),
            other => other,
        }
    }

    /// Every stored session (checkpoints excluded), sorted by id; see [`list_stored_sessions`].
    pub fn list(&self) -> Result<Vec<ListedSession>> {
        list_stored_sessions(self.store.as_ref())
    }

    /// The exclusive right to change session `id`'s conversation ([`SessionTurn`]), loading the session if
    /// needed. If a turn holds it, waits as `wait` says ([`Error::SessionBusy`] when the wait runs out;
    /// [`Error::Interrupted`] when `interrupt` asks to stop).
    pub fn begin_turn(
        &self,
        id: &str,
        wait: TurnWait,
        interrupt: &mut dyn Interrupt,
    ) -> Result<SessionTurn<'_>> {
        // One deadline for the whole call, however often the session has to be loaded again.
        let started = Instant::now();
        loop {
            // Not `load`: the version is checked below, once the turn holds the session.
            let (session, _) = self.live_or_stored(id)?;
            let remaining = match wait {
                TurnWait::UntilFree => TurnWait::UntilFree,
                TurnWait::AtMost(limit) => {
                    TurnWait::AtMost(limit.saturating_sub(started.elapsed()))
                }
            };
            // None: the session left the live set while we waited (evicted, replaced): load it again.
            if let Some(permit) = TurnPermit::acquire(&session, remaining, interrupt)? {
                if self.outdated_and_unchanged(&session)? {
                    // Another process or worker saved a newer version, and this copy holds nothing of its
                    // own: it goes, and the turn runs on the stored version instead of answering from an
                    // outdated conversation (whose save would then conflict).
                    drop(permit);
                    self.live.retire(&session);
                    continue;
                }
                return Ok(SessionTurn::new(self, permit));
            }
        }
    }

    /// Whether `session`'s live copy derives from a version the store no longer holds (a newer one, or none:
    /// deleted elsewhere) and has no unsaved change. A copy with unsaved changes stays: its save reports
    /// the conflict ([`Error::SessionConflict`]) rather than dropping those changes.
    fn outdated_and_unchanged(&self, session: &ManagedSession) -> Result<bool> {
        let stored = stored_version(self.store.as_ref(), &session.id)?;
        let record = lock(&session.record);
        // Version 0: the stored bytes are damaged. The live copy stays, and its next save repairs them.
        if stored == Some(record.stored_version()) || stored == Some(0) {
            return Ok(false);
        }
        let context = lock(&session.context);
        Ok(!record.changed(&context))
    }

    /// One chat turn on session `id` ([`SessionTurn::chat`]), waiting for a turn in progress to end.
    pub fn chat(
        &self,
        id: &str,
        user_message: &str,
        options: GenerateOptions,
        interrupt: &mut dyn Interrupt,
    ) -> Result<Generation> {
        self.begin_turn(id, TurnWait::UntilFree, interrupt)?
            .chat(user_message, options, interrupt)
    }

    /// Starts a chat turn on session `id` whose answer is read piece by piece ([`SessionTurn::start_chat`]),
    /// waiting for a turn in progress to end.
    pub fn start_chat(
        &self,
        id: &str,
        user_message: &str,
        options: GenerateOptions,
        interrupt: &mut dyn Interrupt,
    ) -> Result<ChatTurn> {
        self.begin_turn(id, TurnWait::UntilFree, interrupt)?
            .start_chat(user_message, options, interrupt)
    }

    /// One chat turn on session `id` over a whole conversation ([`SessionTurn::chat_messages`]), waiting for a
    /// turn in progress to end.
    pub fn chat_messages(
        &self,
        id: &str,
        messages: &[ChatMessage],
        options: GenerateOptions,
        interrupt: &mut dyn Interrupt,
    ) -> Result<Generation> {
        self.begin_turn(id, TurnWait::UntilFree, interrupt)?
            .chat_messages(messages, options, interrupt)
    }

    /// Generates on session `id` after `full_prompt` ([`SessionTurn::generate_reusing_prefix`]), waiting for
    /// a turn in progress to end.
    pub fn generate_reusing_prefix(
        &self,
        id: &str,
        full_prompt: &str,
        options: GenerateOptions,
        interrupt: &mut dyn Interrupt,
    ) -> Result<(Generation, usize)> {
        self.begin_turn(id, TurnWait::UntilFree, interrupt)?
            .generate_reusing_prefix(full_prompt, options, interrupt)
    }

    /// Keeps the last `keep_last` turns of session `id`'s history ([`SessionTurn::trim_history`]), waiting
    /// for a turn in progress to end. Returns how many turns were dropped.
    pub fn trim_history(&self, id: &str, keep_last: usize) -> Result<usize> {
        self.begin_turn(id, TurnWait::UntilFree, &mut crate::NeverInterrupt)?
            .trim_history(keep_last)
    }

    /// Puts session `id` back to checkpoint `label` ([`SessionTurn::revert`]), waiting for a turn in progress
    /// to end.
    pub fn revert(&self, id: &str, label: &str) -> Result<()> {
        validate_label(label)?;
        self.begin_turn(id, TurnWait::UntilFree, &mut crate::NeverInterrupt)?
            .revert(label)
    }

    /// Stores the current state and history of session `id` as checkpoint `label` (replacing one of that
    /// label). During a streamed turn, that is the state so far (the turn joins the history when it ends).
    pub fn checkpoint(&self, id: &str, label: &str) -> Result<()> {
        validate_label(label)?;
        let session = self.load(id)?;
        let record = lock(&session.record);
        let context = lock(&session.context);
        let key = checkpoint_key(id, label);
        let _key = self.store.lock(&key)?;
        record.write_checkpoint(self.store.as_ref(), &key, &context, self.writer())
    }

    /// Writes session `id` (its live copy, or what is stored) as one session file at `path`, atomically: the
    /// single-file format of [`Context::save_session`], which any context of the manager's parameters loads
    /// without the chunk store (signed with the manager's key, if it has one). Unsaved changes of the live
    /// copy are included (and stay unsaved in the store).
    pub fn export(&self, id: &str, path: &Path) -> Result<SessionInfo> {
        let session = self.load(id)?;
        let record = lock(&session.record);
        let context = lock(&session.context);
        context.save_session(path, None, &record.stored_metadata(), self.key.as_ref())
    }

    /// Labels of the checkpoints of session `id`, sorted.
    pub fn checkpoints(&self, id: &str) -> Result<Vec<String>> {
        validate_session_id(id)?;
        records::checkpoint_labels(self.store.as_ref(), id)
    }
}

/// What the caller of [`SessionManager::load`] can do about a session saved with other parameters: every
/// session of a manager is opened with the manager's parameters.
fn manager_mismatch_advice(mismatches: &[crate::ParamMismatch]) -> String {
    let saved: Vec<String> = mismatches
        .iter()
        .map(|m| format!("{}={}", m.name, m.saved.as_argument()))
        .collect();
    format!(
        "open the SessionManager with the saved parameters ({})",
        saved.join(", ")
    )
}
