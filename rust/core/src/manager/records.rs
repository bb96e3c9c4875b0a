//! Stored records: what the manager keeps in a session file's metadata, how a live copy is written back with
//! the version check, and the operations on stored sessions that need no model (list, delete, read a
//! header).

use serde::{Deserialize, Serialize};

use super::ids::{checkpoint_key, checkpoint_prefix, validate_session_id, CHECKPOINT_SEPARATOR};
use super::writer::SessionWriter;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::model::ChatMessage;
use crate::session::Metadata;
use crate::session_format::{self as format, SessionHeader};
use crate::store::SessionStore;

/// Metadata key under which the manager keeps its record in a session file.
pub const MANAGER_METADATA_KEY: &str = "llama_sessions.manager";

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

pub(super) fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// Splits a session file's metadata into the manager's record and the user's metadata.
pub(super) fn split_metadata(mut metadata: Metadata) -> (ManagerRecord, Metadata) {
    let record = metadata
        .remove(MANAGER_METADATA_KEY)
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default();
    (record, metadata)
}

/// The record of a live session, and what it takes to know whether the session changed since it was stored.
#[derive(Debug)]
pub(super) struct Record {
    pub(super) manager: ManagerRecord,
    pub(super) user_metadata: Metadata,
    /// The stored version this copy derives from (0: never stored).
    stored_version: u64,
    /// The context's change epoch when this copy was last stored or read (None: not stored). The context
    /// counts every change of its KV cache, however it was made (a turn, or a call on the `Context` that
    /// `load` returned), so comparing epochs misses none.
    stored_epoch: Option<u64>,
    /// The history or metadata changed since the copy was stored.
    record_changed: bool,
}

impl Record {
    /// A record not stored yet.
    pub(super) fn unsaved(manager: ManagerRecord, user_metadata: Metadata) -> Record {
        Record {
            manager,
            user_metadata,
            stored_version: 0,
            stored_epoch: None,
            record_changed: true,
        }
    }

    /// The record of a session just read from the store into `context`.
    pub(super) fn read(
        manager: ManagerRecord,
        user_metadata: Metadata,
        context: &Context,
    ) -> Record {
        Record {
            stored_version: manager.version,
            manager,
            user_metadata,
            stored_epoch: Some(context.epoch()),
            record_changed: false,
        }
    }

    /// The stored version this copy derives from (0: not stored yet).
    pub(super) fn stored_version(&self) -> u64 {
        self.stored_version
    }

    /// Notes a change of the history or metadata (changes of the context need no note).
    pub(super) fn mark_changed(&mut self) {
        self.record_changed = true;
    }

    /// Whether this copy, whose context is `context`, differs from what it was stored as.
    pub(super) fn changed(&self, context: &Context) -> bool {
        self.record_changed || self.stored_epoch != Some(context.epoch())
    }

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

    /// Writes `context` with this record, at the current version, as checkpoint value `checkpoint_key`
    /// (whose lock the caller holds).
    pub(super) fn write_checkpoint(
        &self,
        store: &dyn SessionStore,
        checkpoint_key: &str,
        context: &Context,
        writer: SessionWriter<'_>,
    ) -> Result<()> {
        let metadata = self.metadata(self.manager.version, now());
        writer.put(store, checkpoint_key, context, &metadata)
    }

    /// The metadata stored with this copy: the user's and the manager's record.
    pub(super) fn stored_metadata(&self) -> Metadata {
        self.metadata(self.manager.version, self.manager.updated_at.clone())
    }

    /// Stores this record and `context` as session `id` if the store still holds the version this copy
    /// derives from ([`Error::SessionConflict`] otherwise, writing nothing). The caller holds this record and
    /// `context`; the key's lock is taken here, after them, which is the order of every path.
    pub(super) fn store(
        &mut self,
        store: &dyn SessionStore,
        id: &str,
        context: &Context,
        writer: SessionWriter<'_>,
    ) -> Result<()> {
        let _key = store.lock(id)?;
        let found = stored_version(store, id)?.unwrap_or(0);
        if found != self.stored_version {
            return Err(Error::SessionConflict {
                id: id.to_owned(),
                expected: self.stored_version,
                found,
            });
        }
        self.write_locked(store, id, context, writer)
    }

    /// Stores this record and `context` as session `id` whatever version the store holds (replacing it).
    /// The caller holds `context`; the key's lock is taken here, after it.
    pub(super) fn replace(
        &mut self,
        store: &dyn SessionStore,
        id: &str,
        context: &Context,
        writer: SessionWriter<'_>,
    ) -> Result<()> {
        let _key = store.lock(id)?;
        self.stored_version = stored_version(store, id)?.unwrap_or(0);
        self.write_locked(store, id, context, writer)
    }

    fn write_locked(
        &mut self,
        store: &dyn SessionStore,
        id: &str,
        context: &Context,
        writer: SessionWriter<'_>,
    ) -> Result<()> {
        let version = self.stored_version + 1;
        let updated_at = now();
        writer.put(
            store,
            id,
            context,
            &self.metadata(version, updated_at.clone()),
        )?;
        self.stored_version = version;
        self.manager.version = version;
        self.manager.updated_at = updated_at;
        self.stored_epoch = Some(context.epoch());
        self.record_changed = false;
        Ok(())
    }
}

/// The stored version of `id` (None: not stored; a file without a manager record is version 0).
pub(super) fn stored_version(store: &dyn SessionStore, id: &str) -> Result<Option<u64>> {
    match read_stored_header(store, id) {
        Ok(header) => Ok(Some(split_metadata(header.metadata).0.version)),
        Err(Error::SessionNotFound { .. }) => Ok(None),
        // The store failed (a file system error, an unreachable server): nothing is known of the version.
        Err(e) if e.is_store_failure() => Err(e),
        // A damaged stored file has no version to protect: it may be overwritten.
        Err(_) => Ok(Some(0)),
    }
}

/// Whether session `id` is stored.
pub(super) fn is_stored(store: &dyn SessionStore, id: &str) -> Result<bool> {
    Ok(store.get_prefix(id, 0)?.is_some())
}

/// The record and user metadata of stored session `id`, or empty ones if it is not stored or unreadable
/// (with the creation time set to now when it had none). A failure of the store itself is an error: an
/// unreachable server must not pass for a session without history.
pub(super) fn stored_record_or_new(
    store: &dyn SessionStore,
    id: &str,
) -> Result<(ManagerRecord, Metadata)> {
    let (manager, user_metadata) = match read_stored_header(store, id) {
        Ok(header) => split_metadata(header.metadata),
        Err(e) if e.is_store_failure() => return Err(e),
        Err(_) => (ManagerRecord::default(), Metadata::new()),
    };
    let created_at = if manager.created_at.is_empty() {
        now()
    } else {
        manager.created_at.clone()
    };
    Ok((
        ManagerRecord {
            created_at,
            ..manager
        },
        user_metadata,
    ))
}

/// A stored session, as [`super::SessionManager::list`] reports it.
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

pub(super) fn checkpoint_labels(store: &dyn SessionStore, id: &str) -> Result<Vec<String>> {
    let prefix = checkpoint_prefix(id);
    let mut labels: Vec<String> = store
        .list()?
        .into_iter()
        .filter_map(|e| e.key.strip_prefix(&prefix).map(str::to_owned))
        .collect();
    labels.sort();
    Ok(labels)
}

/// Deletes stored session `id` and its checkpoints, each under its lock, and removes their locks (a
/// directory store's `.ID.lock` and `.ID@LABEL.lock` files; [`crate::store::StoreLock::release_and_remove`]); no model
/// needed (the CLI's `sessions delete`). A live copy in some manager is not affected.
pub fn delete_stored_session(store: &dyn SessionStore, id: &str) -> Result<()> {
    validate_session_id(id)?;
    let session_lock = store.lock(id)?;
    let stored = store.delete(id)?;
    // The session's lock, then each checkpoint's: the order of every path that holds both.
    for label in checkpoint_labels(store, id)? {
        let key = checkpoint_key(id, &label);
        let checkpoint_lock = store.lock(&key)?;
        store.delete(&key)?;
        checkpoint_lock.release_and_remove()?;
    }
    session_lock.release_and_remove()?;
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
        let header = match read_stored_header(store, &entry.key) {
            // An unreachable server fails the listing: it must not pass for a listing of corrupt sessions.
            Err(e @ Error::RemoteStore { .. }) => return Err(e),
            header => header,
        };
        out.push(ListedSession {
            id: entry.key,
            size: entry.size,
            header: header.map_err(|e| e.to_string()),
        });
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// How much of a session the first read of its header takes: the prelude and, for all but sessions with a
/// long history, the whole header, so that reading a header (before every turn, on a remote store a
/// request) is one read, not two.
const HEADER_FIRST_READ: usize = 16 * 1024;

/// The stored value of session or checkpoint `key` (None if there is none), read so that its size is bounded
/// before it is allocated: the prelude comes first, then (for an unsigned session: `signed` false) the
/// header, checked against `context` (the check a restore makes, so a session saved with other parameters
/// gets the same error); a state larger than `context` can hold is refused as corrupt. Only then is the
/// rest read, no more than the prelude announces (and a byte, for the restore to see trailing bytes). A
/// signed session's header is not parsed before its MAC is verified, by the restore. A value replaced by
/// one of another length between the reads is read again.
pub(super) fn read_session_value(
    store: &dyn SessionStore,
    key: &str,
    origin: &str,
    context: &Context,
    signed: bool,
) -> Result<Option<Vec<u8>>> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let Some(first) = store.get_prefix(key, HEADER_FIRST_READ)? else {
            return Ok(None);
        };
        if first.len() < HEADER_FIRST_READ {
            return Ok(Some(first)); // The whole value.
        }
        let announced = format::announced_lengths(&first, origin)?;
        if !signed {
            let header = if announced.header_end <= first.len() {
                format::read_header(&first, origin)?
            } else {
                let prefix = store
                    .get_prefix(key, announced.header_end)?
                    .unwrap_or_default();
                format::read_header(&prefix, origin)?
            };
            context.check_compatible(&header, origin)?;
        }
        let most = context.state_bytes_bound() as u64;
        if announced.state_len > most {
            return Err(Error::SessionCorrupt {
                origin: origin.to_owned(),
                reason: format!(
                    "its prelude announces {} bytes of state, and a context with this manager's \
                     parameters holds at most {most}: it was not read",
                    announced.state_len
                ),
            });
        }
        let Some(value) = store.get_prefix(key, announced.max_len.saturating_add(1))? else {
            return Ok(None);
        };
        let unchanged = format::announced_lengths(&value, origin).is_ok_and(|now| now == announced);
        if unchanged || attempts == 3 {
            // A value that still differs after three reads goes to the restore, which says what is wrong.
            return Ok(Some(value));
        }
    }
}

pub(super) fn read_stored_header(store: &dyn SessionStore, key: &str) -> Result<SessionHeader> {
    read_stored_header_and_lengths(store, key).map(|(header, _)| header)
}

/// The header of stored value `key` and the lengths its prelude announces: the prelude and header only
/// (one read of [`HEADER_FIRST_READ`] bytes, a second only for a longer header, bounded by the format's
/// largest header).
fn read_stored_header_and_lengths(
    store: &dyn SessionStore,
    key: &str,
) -> Result<(SessionHeader, format::AnnouncedLengths)> {
    let origin = store
        .location(key)
        .map_or_else(|| key.to_owned(), |p| p.display().to_string());
    let first = store
        .get_prefix(key, HEADER_FIRST_READ.max(format::PRELUDE_LEN))?
        .ok_or_else(|| Error::SessionNotFound { id: key.to_owned() })?;
    let announced = format::announced_lengths(&first, &origin)?;
    if announced.header_end <= first.len() {
        return Ok((format::read_header(&first, &origin)?, announced));
    }
    let prefix = store
        .get_prefix(key, announced.header_end)?
        .unwrap_or_default();
    Ok((format::read_header(&prefix, &origin)?, announced))
}

/// Stored session `id` described from its prelude and header alone, as [`crate::inspect_session`]
/// describes a file: parameters, tokens, metadata (the manager's record of its history included) and
/// sizes. The state is neither read nor verified, so a few KiB are read from any store; a load verifies
/// everything (a signed session's MAC included, before it trusts the header). [`Error::SessionNotFound`]
/// if there is no such session. No model needed.
pub fn inspect_stored_session(store: &dyn SessionStore, id: &str) -> Result<crate::SessionInfo> {
    validate_session_id(id)?;
    let (header, announced) = read_stored_header_and_lengths(store, id)?;
    Ok(crate::SessionInfo::from_stored_header(header, announced))
}
