//! The one error type of the crate. Every variant carries what was expected and what was found, so that a
//! binding can turn it into a message a user can act on. Bindings map each variant to one exception class;
//! keep the enum exhaustive (no `#[non_exhaustive]`) so that a new variant without a mapping fails to compile.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `llama-sessions`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model file could not be loaded: missing, not GGUF, truncated, or refused by llama.cpp.
    #[error("cannot load model {path}: {reason}")]
    ModelLoad {
        /// The path that was given.
        path: PathBuf,
        /// What was expected and what was found.
        reason: String,
    },

    /// A parameter is out of range or an invalid combination of parameters was given.
    #[error("invalid {name}: expected {expected}, found {found}")]
    InvalidParameter {
        /// The parameter's name as the user spells it.
        name: &'static str,
        /// What would have been accepted.
        expected: String,
        /// What was given.
        found: String,
    },

    /// llama.cpp refused to create a context (usually: not enough memory for the KV cache).
    #[error("cannot create context: {reason}")]
    ContextCreate {
        /// llama.cpp's own explanation when it gave one.
        reason: String,
    },

    /// The tokens do not fit in the space left in the sequence. Nothing was decoded.
    #[error(
        "context full: {requested} more tokens requested but only {available} of {} are free ({held} held)",
        describe_capacity(*.capacity, *.n_seq_max)
    )]
    ContextFull {
        /// Tokens that were to be added.
        requested: usize,
        /// Free positions in the sequence.
        available: usize,
        /// Tokens already held by the sequence.
        held: usize,
        /// Most tokens one sequence holds: `n_ctx / n_seq_max` (`n_ctx` cells are shared by all sequences).
        capacity: usize,
        /// Sequences sharing the context's cells.
        n_seq_max: u32,
    },

    /// The KV cells a pool's sequences share ([`crate::PoolMemory::Shared`], a batching manager's `kv_cells`)
    /// are all held or reserved by other sequences, or the call alone needs more than all of them: nothing was
    /// decoded. A manager first evicts idle sessions to make room; it raises this only when the rest are in
    /// turns (or a caller holds their contexts).
    #[error(
        "{}",
        describe_budget_full(*.requested, *.available, *.held, *.budget, *.sequences)
    )]
    KvBudgetFull {
        /// Cells the call needed beyond what its sequence holds or reserved.
        requested: usize,
        /// Cells no sequence holds or reserved.
        available: usize,
        /// Cells this sequence holds or reserved.
        held: usize,
        /// Cells all sequences share.
        budget: usize,
        /// Other sequences holding cells.
        sequences: usize,
    },

    /// A manager's chat turn does not fit: its conversation (system prompt, the history kept, the new message)
    /// plus the `max_tokens` reserved for the answer exceed what a sequence holds. Raised before the turn
    /// starts: nothing changed.
    #[error(
        "context full: this chat turn needs {needed} tokens ({conversation_tokens} for the conversation{kept} \
         + max_tokens={max_tokens} reserved for the answer) but a sequence holds n_ctx={n_ctx}; the session \
         holds {held} tokens and nothing was changed. {advice}",
        needed = conversation_tokens + max_tokens,
        kept = if *history_dropped { " with every earlier turn dropped" } else { "" }
    )]
    ChatOverflow {
        /// Tokens of the conversation the turn would decode from (after any turns were dropped).
        conversation_tokens: usize,
        /// Tokens reserved for the answer.
        max_tokens: usize,
        /// What one sequence holds.
        n_ctx: usize,
        /// Tokens the session's context holds now.
        held: usize,
        /// Whether the figure is what is left with every earlier turn dropped (the policy drops them).
        history_dropped: bool,
        /// What to do about it.
        advice: &'static str,
    },

    /// Text could not be turned into tokens or tokens into text.
    #[error("tokenize error: {0}")]
    Tokenize(String),

    /// llama.cpp failed to decode a batch. The tokens before the failing batch stay in the context.
    #[error("decode failed (llama.cpp code {code}): {reason}")]
    Decode {
        /// llama.cpp's return code.
        code: i32,
        /// What it means.
        reason: String,
    },

    /// The model has no usable chat template, or llama.cpp could not apply it.
    #[error("chat template error: {0}")]
    ChatTemplate(String),

    /// A generation in progress was interrupted by the caller. The tokens decoded so far stay in the context.
    #[error("interrupted")]
    Interrupted,

    /// A token stream was advanced after the context it reads from was changed by another call.
    #[error(
        "stream invalidated: the context was modified by another call after this stream started"
    )]
    StreamInvalidated,

    /// An operating-system error on a file.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done ("open", "read", ...).
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// A remote store (Redis) could not be reached, refused an operation, or a write lost its lease.
    #[error("cannot {op} on {store}: {reason}")]
    RemoteStore {
        /// The store, as its URL without a password.
        store: String,
        /// What was being done ("connect", "read", "write", ...).
        op: &'static str,
        /// What went wrong.
        reason: String,
    },

    /// The bytes are not an intact session: not a session at all, truncated, or changed after they were
    /// written (the checksum does not match). Nothing was loaded.
    #[error("{origin} is not an intact session: {reason}")]
    SessionCorrupt {
        /// The file, or "session bytes" for an in-memory snapshot.
        origin: String,
        /// What was expected and what was found.
        reason: String,
    },

    /// The session was saved with another model (other weights, even with the same architecture and shapes).
    /// Nothing was loaded.
    #[error(
        "{origin} was saved with another model: saved {saved}, this context's model is {current}"
    )]
    SessionModelMismatch {
        /// The file, or "session bytes".
        origin: String,
        /// The saving model's name and fingerprint.
        saved: String,
        /// This context's model's name and fingerprint.
        current: String,
    },

    /// The session was saved by a context whose state-relevant parameters differ from this one's. Nothing was
    /// loaded.
    #[error(
        "{origin} was saved with other context parameters: {} ({advice})",
        describe_mismatches(.mismatches)
    )]
    SessionParamsMismatch {
        /// The file, or "session bytes".
        origin: String,
        /// Every parameter that differs.
        mismatches: Vec<ParamMismatch>,
        /// What the caller of the API that refused the session can do about it (see
        /// [`Error::with_mismatch_advice`]).
        advice: String,
    },

    /// The session was written by a newer format version or by a llama.cpp build whose state layout this
    /// build cannot vouch for. Nothing was loaded.
    #[error("{origin} cannot be read by this build: {reason}")]
    SessionVersion {
        /// The file, or "session bytes".
        origin: String,
        /// Which version was found and which are supported.
        reason: String,
    },

    /// The session's signature does not hold: a key was given and the session is unsigned, modified, or
    /// signed with another key; or the session is signed and no key was given. Nothing was loaded.
    #[error("{origin} failed signature verification: {reason}")]
    SessionSignature {
        /// The file, or "session bytes".
        origin: String,
        /// What was expected and what was found.
        reason: String,
    },

    /// A session manager has no session of this id.
    #[error("no session {id:?}")]
    SessionNotFound {
        /// The id asked for.
        id: String,
    },

    /// A session of this id already exists (create_session does not overwrite).
    #[error("session {id:?} already exists")]
    SessionExists {
        /// The id.
        id: String,
    },

    /// The stored session changed since this copy was loaded (another process or another live copy saved a
    /// newer version); nothing was written.
    #[error(
        "session {id:?} changed since it was loaded: this copy derives from version {expected}, the store \
         holds version {found}; load it again to continue from the stored version"
    )]
    SessionConflict {
        /// The id.
        id: String,
        /// The stored version this copy derives from.
        expected: u64,
        /// The version the store holds now.
        found: u64,
    },

    /// A turn in progress on this session (a chat, or a streamed chat not yet finished or dropped) holds it,
    /// and the call was not to wait for it, or not that long. Nothing was changed.
    #[error(
        "session {id:?} is busy: a turn in progress holds it (a chat call, or a streamed chat not yet \
         exhausted or closed); end that turn first, or wait for it longer"
    )]
    SessionBusy {
        /// The id.
        id: String,
    },

    /// The KV cache and the token bookkeeping disagree. This is a bug in llama-sessions; the context has been
    /// cleared to a consistent (empty) state.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Advice of a [`Error::SessionParamsMismatch`] raised by a Context's own load or restore.
pub const CONTEXT_MISMATCH_ADVICE: &str =
    "create the context with the saved parameters, e.g. with Context.from_session";

/// One context parameter whose saved value differs from the current one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamMismatch {
    /// The parameter's name ("n_ctx", "type_k", ...).
    pub name: &'static str,
    /// The value recorded in the session (as llama.cpp allocates it: see
    /// [`crate::ContextParams::allocated`]).
    pub saved: ParamValue,
    /// The value of the context it was to be loaded into.
    pub current: ParamValue,
}

/// The value of a context parameter, with its type, so that a binding can hand it over as an int, a str or a
/// bool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParamValue {
    /// A count (`n_ctx`, `n_batch`, `n_seq_max`).
    Int(u32),
    /// A name (`type_k`, `type_v`).
    Text(String),
    /// A switch (`flash_attn`).
    Bool(bool),
}

impl ParamValue {
    /// The value as a keyword argument's value is written: `512`, `"q8_0"`, `True`.
    pub fn as_argument(&self) -> String {
        match self {
            ParamValue::Text(text) => format!("{text:?}"),
            other => other.to_string(),
        }
    }
}

impl std::fmt::Display for ParamValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParamValue::Int(n) => write!(f, "{n}"),
            ParamValue::Text(text) => f.write_str(text),
            ParamValue::Bool(true) => f.write_str("True"),
            ParamValue::Bool(false) => f.write_str("False"),
        }
    }
}

fn describe_mismatches(mismatches: &[ParamMismatch]) -> String {
    mismatches
        .iter()
        .map(|m| format!("{} saved {}, current {}", m.name, m.saved, m.current))
        .collect::<Vec<_>>()
        .join("; ")
}

/// "n_ctx=512" for one sequence; with several, the share of each and the whole it is part of.
fn describe_budget_full(
    requested: usize,
    available: usize,
    held: usize,
    budget: usize,
    sequences: usize,
) -> String {
    if held + requested > budget {
        return format!(
            "the shared KV cache is too small: this call needs {} cells ({held} held by this sequence + \
             {requested} more) but the sessions share kv_cells={budget} in all; raise kv_cells, or lower \
             max_tokens",
            held + requested
        );
    }
    format!(
        "the shared KV cache is full: {requested} more cells needed but only {available} of kv_cells={budget} \
         are free ({held} held by this sequence, the rest by {sequences} others: live sessions in turns, or \
         whose context a caller holds); raise kv_cells, or lower max_live or max_tokens"
    )
}

fn describe_capacity(capacity: usize, n_seq_max: u32) -> String {
    if n_seq_max <= 1 {
        format!("n_ctx={capacity}")
    } else {
        format!(
            "n_ctx_per_seq={capacity} (n_ctx={} cells shared by n_seq_max={n_seq_max} sequences)",
            capacity * n_seq_max as usize
        )
    }
}

impl Error {
    /// An [`Error::InvalidParameter`] for parameter `name`.
    pub fn invalid(name: &'static str, expected: impl Into<String>, found: impl ToString) -> Self {
        Error::InvalidParameter {
            name,
            expected: expected.into(),
            found: found.to_string(),
        }
    }

    /// Whether the store itself failed (a file system error, an unreachable or refusing server), as opposed
    /// to what it holds being wrong: such a failure says nothing about the stored value.
    pub fn is_store_failure(&self) -> bool {
        matches!(self, Error::Io { .. } | Error::RemoteStore { .. })
    }

    /// A [`Error::SessionParamsMismatch`] with its advice replaced by `advice(mismatches)`: what the caller of
    /// the API that refused the session can do (a session manager's caller cannot use `Context.from_session`);
    /// any other error unchanged.
    pub fn with_mismatch_advice(self, advice: impl FnOnce(&[ParamMismatch]) -> String) -> Error {
        match self {
            Error::SessionParamsMismatch {
                origin, mismatches, ..
            } => Error::SessionParamsMismatch {
                advice: advice(&mismatches),
                origin,
                mismatches,
            },
            other => other,
        }
    }
}

/// At most the first 80 bytes of `text` (cut at a character boundary, "..." added), for an error message that
/// quotes what a caller gave.
pub(crate) fn shorten_for_message(text: &str) -> String {
    if text.len() <= 80 {
        return text.to_owned();
    }
    let mut end = 80;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}
