//! What sessions are, apart from a Context: their description ([`SessionInfo`]), the plan of one about to be
//! written, reading and verifying session files and bytes without a model (`llama-sessions inspect`), and
//! the comparisons a load makes. The Context's own save and restore live in `context::state`.

use std::path::Path;

use llama_cpp_2::token::LlamaToken;

use crate::context::SeqId;
use crate::durable;
use crate::error::{Error, ParamMismatch, ParamValue, Result};
use crate::model::Model;
use crate::params::{allocated_sizes, ContextParams, KvType};
use crate::session_format::{
    self as format, MemoryRecord, ModelRecord, OpenedSession, ParamsRecord, Precomputed,
    SequenceRecord, SessionHeader, SessionKind,
};
use crate::signing::{SessionKey, MAC_LEN};
use ParamValue::{Int, Text};

/// User metadata stored with a session: a JSON object.
pub type Metadata = serde_json::Map<String, serde_json::Value>;

/// Which file format a session is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionFormat {
    /// llama-sessions' own verified format (see `docs/session-format.md`).
    LlamaSessions,
    /// llama.cpp's "ggsn" file (`llama_state_save_file`, `llama-cli --prompt-cache`): no model identity,
    /// no parameters, no checksum.
    LlamaCpp,
}

impl SessionFormat {
    /// "llama-sessions" or "llama.cpp".
    pub fn as_str(self) -> &'static str {
        match self {
            SessionFormat::LlamaSessions => "llama-sessions",
            SessionFormat::LlamaCpp => "llama.cpp",
        }
    }

    /// Parses "llama-sessions" or "llama.cpp".
    pub fn parse(value: &str) -> Result<SessionFormat> {
        match value {
            "llama-sessions" => Ok(SessionFormat::LlamaSessions),
            "llama.cpp" => Ok(SessionFormat::LlamaCpp),
            other => Err(Error::invalid(
                "format",
                "\"llama-sessions\" or \"llama.cpp\"",
                format!("{other:?}"),
            )),
        }
    }
}

/// What a session holds, read from its header. For a llama.cpp file only the tokens and sizes are known.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionInfo {
    /// The file format.
    pub format: SessionFormat,
    /// Version of that format.
    pub format_version: u32,
    /// The header; for a llama.cpp file one with empty identity fields and a single sequence 0.
    pub header: SessionHeader,
    /// Bytes of header (the JSON header, or llama.cpp's magic, version and token list).
    pub header_bytes: usize,
    /// Bytes of llama.cpp state.
    pub state_bytes: usize,
    /// Bytes of the whole session.
    pub total_bytes: usize,
    /// Whether it is signed (loading it needs the key it was signed with).
    pub signed: bool,
    /// Tokens a restore decoded again instead of restoring their KV rows: a chunk manifest's chunks that
    /// were missing or not the ones it names (0 for everything else).
    pub recomputed_tokens: usize,
}

impl SessionInfo {
    pub(crate) fn from_opened(opened: OpenedSession) -> SessionInfo {
        SessionInfo {
            format: SessionFormat::LlamaSessions,
            format_version: opened.format_version,
            state_bytes: opened.state_len(),
            header_bytes: opened.header_len,
            total_bytes: opened.total_len,
            signed: opened.signed,
            header: opened.header,
            recomputed_tokens: 0,
        }
    }

    /// A stored session described from its prelude's lengths and its header alone (the state unread).
    pub(crate) fn from_stored_header(
        header: SessionHeader,
        announced: format::AnnouncedLengths,
    ) -> SessionInfo {
        let signed = header.signature.is_some();
        SessionInfo {
            format: SessionFormat::LlamaSessions,
            format_version: announced.format_version,
            header_bytes: announced.header_end - format::PRELUDE_LEN,
            state_bytes: announced.state_len as usize,
            total_bytes: announced.max_len - if signed { 0 } else { crate::signing::MAC_LEN },
            signed,
            header,
            recomputed_tokens: 0,
        }
    }

    pub(crate) fn from_llama_cpp(
        header: &format::LlamaCppSessionHeader,
        total_bytes: usize,
    ) -> SessionInfo {
        SessionInfo {
            format: SessionFormat::LlamaCpp,
            format_version: format::LLAMA_CPP_VERSION,
            header: SessionHeader {
                library_version: String::new(),
                llama_cpp_build: String::new(),
                created_at: String::new(),
                model: ModelRecord {
                    fingerprint: String::new(),
                    name: None,
                    architecture: String::new(),
                    file_name: None,
                },
                params: ParamsRecord {
                    n_ctx: 0,
                    n_batch: 0,
                    type_k: String::new(),
                    type_v: String::new(),
                    flash_attn: false,
                    n_seq_max: 1,
                },
                memory: None,
                sequences: vec![SequenceRecord {
                    seq: 0,
                    tokens: header.tokens.clone(),
                    state_bytes: (total_bytes - header.state_offset) as u64,
                }],
                metadata: Metadata::new(),
                signature: None,
                chunks: None,
            },
            signed: false,
            header_bytes: header.state_offset,
            state_bytes: total_bytes - header.state_offset,
            total_bytes,
            recomputed_tokens: 0,
        }
    }

    /// Tokens held, over all sequences.
    pub fn token_count(&self) -> usize {
        self.header.sequences.iter().map(|s| s.tokens.len()).sum()
    }
}

/// The result of a load: what was loaded, and warnings for the caller to show (a llama.cpp file is loaded
/// with only llama.cpp's own checks).
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// The session's header.
    pub info: SessionInfo,
    /// Things the user should know.
    pub warnings: Vec<String>,
}

/// A session about to be written by [`Context::write_session`]: the header is built and the sizes are known,
/// so the caller can provide a buffer of exactly [`SessionPlan::len`] bytes (a Python `bytes` object, say).
#[derive(Debug, Clone)]
pub struct SessionPlan {
    pub(crate) header: SessionHeader,
    pub(crate) header_json: Vec<u8>,
    pub(crate) sequences: Vec<(SeqId, usize)>,
    pub(crate) total_len: usize,
    pub(crate) epoch: u64,
}

impl SessionPlan {
    /// Length of the session in bytes.
    pub fn len(&self) -> usize {
        self.total_len
    }

    /// Never true: a session has at least its prelude and checksum.
    pub fn is_empty(&self) -> bool {
        self.total_len == 0
    }

    /// What the written session will hold.
    pub fn info(&self) -> SessionInfo {
        let state_bytes = self.sequences.iter().map(|&(_, len)| len).sum();
        SessionInfo {
            format: SessionFormat::LlamaSessions,
            format_version: format::FORMAT_VERSION,
            header: self.header.clone(),
            header_bytes: self.header_json.len(),
            state_bytes,
            total_bytes: self.total_len,
            signed: self.header.signature.is_some(),
            recomputed_tokens: 0,
        }
    }
}

/// Reads and verifies a session file without a model: what `llama-sessions inspect` shows. A llama-sessions
/// file is checked completely (checksum included; a signed file's signature only with its key); of a
/// llama.cpp file only the header can be checked.
pub fn inspect_session(path: &Path, key: Option<&SessionKey>) -> Result<SessionInfo> {
    let origin = path.display().to_string();
    let prefix = durable::read_prefix(path, format::MAGIC.len())?;
    if format::detect(&prefix) == SessionKind::LlamaCpp {
        let total = file_len(path)?;
        let header = read_llama_cpp_header(path, &origin)?;
        return Ok(SessionInfo::from_llama_cpp(&header, total));
    }
    open_session_file(path, &origin, key).map(|(_, opened)| SessionInfo::from_opened(opened))
}

/// Reads a llama-sessions file and verifies it: with a key its signature (computed on this thread while
/// another reads the file), without one its checksum (computed while reading). A file that does not start with
/// our magic is refused before the rest of it is read.
pub(crate) fn open_session_file(
    path: &Path,
    origin: &str,
    key: Option<&SessionKey>,
) -> Result<(durable::FileBytes, OpenedSession)> {
    let prefix = durable::read_prefix(path, format::PRELUDE_LEN)?;
    if key.is_none() {
        format::header_end(&prefix, origin)?;
        let (bytes, precomputed) = read_session_bytes(path)?;
        let opened = format::open_with_checksum(&bytes, origin, precomputed)?;
        return Ok((bytes, opened));
    }
    // The MAC of all but the last MAC_LEN bytes, computed while each chunk is still in the CPU cache.
    let key = key.expect("checked above");
    let signed_end = file_len(path)?.saturating_sub(MAC_LEN);
    let mut hasher = key.hasher();
    let (bytes, whole) = durable::read_all_overlapped(path, &mut |offset, chunk| {
        let end = (offset + chunk.len()).min(signed_end);
        if offset < end {
            hasher.update(&chunk[..end - offset]);
        }
    })?;
    let precomputed = (whole && bytes.len() == signed_end + MAC_LEN).then(|| hasher.finalize());
    let opened = format::open_signed(&bytes, origin, key, precomputed)?;
    Ok((bytes, opened))
}

/// Reads a whole file with both candidate checksums of the session format computed on the way: that of an
/// unsigned session (all but the last 16 bytes) and that of a signed one (all but the last 48).
pub(crate) fn read_session_bytes(path: &Path) -> Result<(durable::FileBytes, Precomputed)> {
    let len = file_len(path)?;
    let unsigned_end = len.saturating_sub(format::CHECKSUM_LEN);
    let signed_end = len.saturating_sub(format::CHECKSUM_LEN + MAC_LEN);
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut signed = None;
    let (bytes, whole) = durable::read_all(path, &mut |offset, chunk| {
        let end = offset + chunk.len();
        if signed.is_none() && end >= signed_end && offset <= signed_end {
            hasher.update(&chunk[..signed_end - offset]);
            signed = Some(hasher.digest128());
            hasher.update(&chunk[signed_end - offset..unsigned_end.min(end) - offset]);
        } else if offset < unsigned_end {
            hasher.update(&chunk[..unsigned_end.min(end) - offset]);
        }
    })?;
    let precomputed = if whole && bytes.len() == len {
        Precomputed {
            unsigned_checksum: Some(hasher.digest128()),
            signed_checksum: signed,
        }
    } else {
        Precomputed::default()
    };
    Ok((bytes, precomputed))
}

/// Verifies session bytes: with a key, their signature first, then everything else.
pub(crate) fn open_session_bytes(
    bytes: &[u8],
    origin: &str,
    key: Option<&SessionKey>,
) -> Result<OpenedSession> {
    match key {
        Some(key) => format::open_signed(bytes, origin, key, None),
        None => format::open(bytes, origin),
    }
}

/// Verifies session bytes (a snapshot) without a model.
pub fn inspect_session_bytes(
    bytes: &[u8],
    origin: &str,
    key: Option<&SessionKey>,
) -> Result<SessionInfo> {
    open_session_bytes(bytes, origin, key).map(SessionInfo::from_opened)
}

pub(crate) fn file_len(path: &Path) -> Result<usize> {
    std::fs::metadata(path)
        .map(|m| m.len() as usize)
        .map_err(|source| Error::Io {
            op: "stat",
            path: path.to_path_buf(),
            source,
        })
}

pub(crate) fn read_llama_cpp_header(
    path: &Path,
    origin: &str,
) -> Result<format::LlamaCppSessionHeader> {
    let fixed = durable::read_prefix(path, 12)?;
    let n_tokens = if fixed.len() == 12 {
        u32::from_le_bytes(fixed[8..12].try_into().expect("4 bytes")) as usize
    } else {
        0
    };
    // The token count is the file's word: read_prefix reads no more than the file holds, and a list longer than
    // the file is then reported as truncated by open_llama_cpp.
    let prefix = durable::read_prefix(path, 12usize.saturating_add(n_tokens.saturating_mul(4)))?;
    format::open_llama_cpp(&prefix, origin)
}

pub(crate) fn model_record(model: &Model) -> ModelRecord {
    ModelRecord {
        fingerprint: model.fingerprint().to_owned(),
        name: model.metadata().get("general.name").cloned(),
        architecture: model.architecture().to_owned(),
        file_name: model
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned()),
    }
}

pub(crate) fn params_record(params: &ContextParams) -> ParamsRecord {
    ParamsRecord {
        n_ctx: params.n_ctx,
        n_batch: params.n_batch,
        type_k: params.type_k.as_str().to_owned(),
        type_v: params.type_v.as_str().to_owned(),
        flash_attn: params.flash_attn,
        n_seq_max: params.n_seq_max,
    }
}

/// The parameters recorded in a session, as [`ContextParams`] (with `n_threads` from the caller).
pub fn params_from_record(
    record: &ParamsRecord,
    n_threads: u32,
    origin: &str,
) -> Result<ContextParams> {
    let kv = |value: &str| {
        value.parse::<KvType>().map_err(|()| Error::SessionCorrupt {
            origin: origin.to_owned(),
            reason: format!("unknown KV cache type {value:?} in the header"),
        })
    };
    Ok(ContextParams {
        n_ctx: record.n_ctx,
        n_batch: record.n_batch,
        n_threads,
        type_k: kv(&record.type_k)?,
        type_v: kv(&record.type_v)?,
        flash_attn: record.flash_attn,
        n_seq_max: record.n_seq_max,
    })
}

/// The differences between the memory geometry a session records and this context's (`None`: one KV cache).
pub(crate) fn memory_mismatches(
    saved: Option<&MemoryRecord>,
    current: Option<&MemoryRecord>,
) -> Vec<ParamMismatch> {
    let kind = |r: Option<&MemoryRecord>| r.map_or("attention".to_owned(), |r| r.kind.clone());
    let mut out = Vec::new();
    let mut check = |name: &'static str, saved: ParamValue, current: ParamValue| {
        if saved != current {
            out.push(ParamMismatch {
                name,
                saved,
                current,
            });
        }
    };
    check("memory", Text(kind(saved)), Text(kind(current)));
    if let (Some(saved), Some(current)) = (saved, current) {
        check("n_swa", Int(saved.n_swa), Int(current.n_swa));
        check(
            "swa_cache_cells",
            Int(u32::try_from(saved.swa_cache_cells).unwrap_or(u32::MAX)),
            Int(u32::try_from(current.swa_cache_cells).unwrap_or(u32::MAX)),
        );
        check(
            "recurrent_r_bytes",
            Text(format!("{:?}", saved.recurrent_r_bytes)),
            Text(format!("{:?}", current.recurrent_r_bytes)),
        );
        check(
            "recurrent_s_bytes",
            Text(format!("{:?}", saved.recurrent_s_bytes)),
            Text(format!("{:?}", current.recurrent_s_bytes)),
        );
    }
    out
}

/// The parameters of `saved` that differ from `current`. Both are compared as llama.cpp allocates them
/// ([`ContextParams::allocated`]): a session written by a version that recorded the requested `n_ctx=300`
/// loads into a context of 512 cells, which is what it had.
pub(crate) fn param_mismatches(saved: &ParamsRecord, current: &ParamsRecord) -> Vec<ParamMismatch> {
    let (saved, current) = (allocated_record(saved), allocated_record(current));
    let mut out = Vec::new();
    let mut check = |name: &'static str, saved: ParamValue, current: ParamValue| {
        if saved != current {
            out.push(ParamMismatch {
                name,
                saved,
                current,
            });
        }
    };
    check("n_ctx", Int(saved.n_ctx), Int(current.n_ctx));
    check("n_batch", Int(saved.n_batch), Int(current.n_batch));
    check("type_k", Text(saved.type_k), Text(current.type_k));
    check("type_v", Text(saved.type_v), Text(current.type_v));
    check(
        "flash_attn",
        ParamValue::Bool(saved.flash_attn),
        ParamValue::Bool(current.flash_attn),
    );
    check("n_seq_max", Int(saved.n_seq_max), Int(current.n_seq_max));
    out
}

/// `record` with its sizes as llama.cpp allocates them.
fn allocated_record(record: &ParamsRecord) -> ParamsRecord {
    let (n_ctx, n_batch) = allocated_sizes(record.n_ctx, record.n_batch, record.n_seq_max);
    ParamsRecord {
        n_ctx,
        n_batch,
        ..record.clone()
    }
}

pub(crate) fn to_tokens(ids: &[i32]) -> Vec<LlamaToken> {
    ids.iter().copied().map(LlamaToken::new).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n_ctx: u32, n_batch: u32, n_seq_max: u32) -> ParamsRecord {
        ParamsRecord {
            n_ctx,
            n_batch,
            type_k: "f16".to_owned(),
            type_v: "f16".to_owned(),
            flash_attn: false,
            n_seq_max,
        }
    }

    #[test]
    fn requested_sizes_compare_as_allocated() {
        // n_ctx=300 allocates 512 cells and clamps n_batch=512 to 300.
        assert!(param_mismatches(&record(300, 512, 1), &record(512, 300, 1)).is_empty());
        assert!(param_mismatches(&record(512, 64, 4), &record(1024, 64, 4)).is_empty());
        assert_eq!(
            param_mismatches(&record(300, 512, 1), &record(512, 512, 1)),
            vec![ParamMismatch {
                name: "n_batch",
                saved: Int(300),
                current: Int(512),
            }]
        );
        assert_eq!(
            param_mismatches(&record(300, 64, 1), &record(512, 64, 2)),
            vec![ParamMismatch {
                name: "n_seq_max",
                saved: Int(1),
                current: Int(2),
            }]
        );
    }
}
