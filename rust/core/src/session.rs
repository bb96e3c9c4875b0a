//! Saving and restoring a Context's state: files, in-memory snapshots, single sequences, and llama.cpp's own
//! session files.
//!
//! Saving copies llama.cpp's per-sequence state (only the KV rows of the cells a sequence holds: no logits, no
//! padding to `n_ctx`) straight into the final buffer behind our header, then seals it with a checksum.
//! Loading verifies the whole envelope (magic, version, length, checksum, header), then compares the header
//! with this context (llama.cpp build, model fingerprint, parameters, token ids) *before* a single byte
//! reaches llama.cpp, whose loaders trust their input. A load that fails any check leaves the context as it
//! was.

use std::path::Path;

use llama_cpp_2::context::session::LlamaStateSeqFlags;
use llama_cpp_2::token::LlamaToken;

use crate::backend::{clear_recent_log, take_recent_log};
use crate::context::{Context, SeqId};
use crate::durable;
use crate::error::{Error, ParamMismatch, Result};
use crate::model::Model;
use crate::params::{ContextParams, KvType};
use crate::session_format::{
    self as format, ModelRecord, OpenedSession, ParamsRecord, SequenceRecord, SessionHeader,
    SessionKind,
};

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
}

impl SessionInfo {
    fn from_opened(opened: OpenedSession) -> SessionInfo {
        SessionInfo {
            format: SessionFormat::LlamaSessions,
            format_version: opened.format_version,
            state_bytes: opened.state_len(),
            header_bytes: opened.header_len,
            total_bytes: opened.total_len,
            header: opened.header,
        }
    }

    fn from_llama_cpp(header: &format::LlamaCppSessionHeader, total_bytes: usize) -> SessionInfo {
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
                sequences: vec![SequenceRecord {
                    seq: 0,
                    tokens: header.tokens.clone(),
                    state_bytes: (total_bytes - header.state_offset) as u64,
                }],
                metadata: Metadata::new(),
            },
            header_bytes: header.state_offset,
            state_bytes: total_bytes - header.state_offset,
            total_bytes,
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
    header: SessionHeader,
    header_json: Vec<u8>,
    sequences: Vec<(SeqId, usize)>,
    total_len: usize,
    epoch: u64,
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
        }
    }
}

/// Reads and verifies a session file without a model: what `llama-sessions inspect` shows. A llama-sessions
/// file is checked completely (checksum included); of a llama.cpp file only the header can be checked.
pub fn inspect_session(path: &Path) -> Result<SessionInfo> {
    let origin = path.display().to_string();
    let prefix = durable::read_prefix(path, format::MAGIC.len())?;
    match format::detect(&prefix) {
        SessionKind::LlamaCpp => {
            let total = file_len(path)?;
            let header = read_llama_cpp_header(path, &origin)?;
            Ok(SessionInfo::from_llama_cpp(&header, total))
        }
        _ => {
            let (bytes, checksum) = read_session_file(path, &prefix, &origin)?;
            format::open_with_checksum(&bytes, &origin, checksum).map(SessionInfo::from_opened)
        }
    }
}

/// Reads a llama-sessions file whose first bytes are `prefix`, with the checksum computed on the way; a file
/// that does not start with our magic is refused before the rest of it is read.
fn read_session_file(
    path: &Path,
    prefix: &[u8],
    origin: &str,
) -> Result<(durable::FileBytes, Option<u128>)> {
    if format::detect(prefix) != SessionKind::LlamaSessions {
        format::open(prefix, origin)?;
    }
    durable::read_all_with_checksum(path, format::CHECKSUM_LEN)
}

/// Verifies session bytes (a snapshot) without a model.
pub fn inspect_session_bytes(bytes: &[u8], origin: &str) -> Result<SessionInfo> {
    format::open(bytes, origin).map(SessionInfo::from_opened)
}

fn file_len(path: &Path) -> Result<usize> {
    std::fs::metadata(path)
        .map(|m| m.len() as usize)
        .map_err(|source| Error::Io {
            op: "stat",
            path: path.to_path_buf(),
            source,
        })
}

fn read_llama_cpp_header(path: &Path, origin: &str) -> Result<format::LlamaCppSessionHeader> {
    let fixed = durable::read_prefix(path, 12)?;
    let n_tokens = if fixed.len() == 12 {
        u32::from_le_bytes(fixed[8..12].try_into().expect("4 bytes")) as usize
    } else {
        0
    };
    let prefix = durable::read_prefix(path, 12 + n_tokens.saturating_mul(4))?;
    format::open_llama_cpp(&prefix, origin)
}

fn model_record(model: &Model) -> ModelRecord {
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

fn params_record(params: &ContextParams) -> ParamsRecord {
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

fn param_mismatches(saved: &ParamsRecord, current: &ParamsRecord) -> Vec<ParamMismatch> {
    let mut out = Vec::new();
    let mut check = |name: &'static str, saved: String, current: String| {
        if saved != current {
            out.push(ParamMismatch {
                name,
                saved,
                current,
            });
        }
    };
    check("n_ctx", saved.n_ctx.to_string(), current.n_ctx.to_string());
    check(
        "n_batch",
        saved.n_batch.to_string(),
        current.n_batch.to_string(),
    );
    check("type_k", saved.type_k.clone(), current.type_k.clone());
    check("type_v", saved.type_v.clone(), current.type_v.clone());
    check(
        "flash_attn",
        py_bool(saved.flash_attn),
        py_bool(current.flash_attn),
    );
    check(
        "n_seq_max",
        saved.n_seq_max.to_string(),
        current.n_seq_max.to_string(),
    );
    out
}

fn py_bool(value: bool) -> String {
    if value { "True" } else { "False" }.to_owned()
}

fn to_tokens(ids: &[i32]) -> Vec<LlamaToken> {
    ids.iter().copied().map(LlamaToken::new).collect()
}

impl Context {
    /// The sequences a save covers: `Some(seq)` is that sequence (even when empty), `None` every sequence that
    /// holds tokens.
    fn sequences_in_scope(&self, seq: Option<SeqId>) -> Result<Vec<SeqId>> {
        match seq {
            Some(seq) => {
                self.check_seq(seq)?;
                Ok(vec![seq])
            }
            None => Ok((0..self.sequences.len() as SeqId)
                .filter(|&s| !self.sequences[s as usize].is_empty())
                .collect()),
        }
    }

    fn sequence_state_len(&self, seq: SeqId) -> usize {
        self.cell
            .borrow_dependent()
            .state_seq_get_size_ext(seq as i32, LlamaStateSeqFlags::empty())
    }

    /// Builds the header of a session of sequence `seq` (`None`: all sequences) and sizes it.
    pub fn plan_session(&self, seq: Option<SeqId>, metadata: &Metadata) -> Result<SessionPlan> {
        let metadata_len = serde_json::to_vec(metadata).map_or(usize::MAX, |m| m.len());
        if metadata_len > format::MAX_METADATA_LEN {
            return Err(Error::invalid(
                "metadata",
                format!(
                    "a JSON object of at most {} bytes",
                    format::MAX_METADATA_LEN
                ),
                format!("{metadata_len} bytes"),
            ));
        }
        let mut sequences = Vec::new();
        let mut records = Vec::new();
        for s in self.sequences_in_scope(seq)? {
            let len = self.sequence_state_len(s);
            sequences.push((s, len));
            records.push(SequenceRecord {
                seq: s,
                tokens: self.sequences[s as usize].iter().map(|t| t.0).collect(),
                state_bytes: len as u64,
            });
        }
        let header = SessionHeader {
            library_version: crate::VERSION.to_owned(),
            llama_cpp_build: format::LLAMA_CPP_BUILD.to_owned(),
            created_at: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            model: model_record(&self.model),
            params: params_record(&self.params),
            sequences: records,
            metadata: metadata.clone(),
        };
        let header_json = format::encode_header(&header)?;
        let state_len = sequences.iter().map(|&(_, len)| len).sum();
        Ok(SessionPlan {
            total_len: format::encoded_len(header_json.len(), state_len),
            header,
            header_json,
            sequences,
            epoch: self.epoch,
        })
    }

    /// Writes the session planned by [`Context::plan_session`] into `out`, which must be exactly
    /// [`SessionPlan::len`] bytes, with no change to the context in between.
    pub fn write_session(&self, plan: &SessionPlan, out: &mut [u8]) -> Result<()> {
        if plan.epoch != self.epoch || out.len() != plan.total_len {
            return Err(Error::Internal(format!(
                "a session planned for {} bytes at epoch {} was written into {} bytes at epoch {}",
                plan.total_len,
                plan.epoch,
                out.len(),
                self.epoch
            )));
        }
        let state_len = plan.sequences.iter().map(|&(_, len)| len).sum();
        let state_range = format::write_prelude(out, &plan.header_json, state_len);
        let mut offset = state_range.start;
        for &(seq, len) in &plan.sequences {
            self.write_sequence_state(seq, &mut out[offset..offset + len])?;
            offset += len;
        }
        format::seal(out);
        Ok(())
    }

    /// Copies llama.cpp's state of `seq` into `out`, which is exactly the size llama.cpp reports for it.
    fn write_sequence_state(&self, seq: SeqId, out: &mut [u8]) -> Result<()> {
        let expected = self.sequence_state_len(seq);
        if expected != out.len() {
            return Err(Error::Internal(format!(
                "llama.cpp's state of sequence {seq} is {expected} bytes, the buffer {}",
                out.len()
            )));
        }
        let ctx = self.cell.borrow_dependent();
        // SAFETY: llama-cpp-2 passes no bound to `llama_state_seq_get_data_ext`, so llama.cpp may write as many
        // bytes as the state has. `out` is exactly the size `llama_state_seq_get_size_ext` just reported for
        // this sequence, and that size is computed by running the same serializer with a counting writer;
        // `&self` guarantees that nothing changed the cache in between. (Tested by the snapshot round trips of
        // every size and KV type, and by `write_session` refusing a buffer of another size.)
        let written = unsafe {
            ctx.state_seq_get_data_ext(out.as_mut_ptr(), seq as i32, LlamaStateSeqFlags::empty())
        };
        if written != out.len() {
            return Err(Error::Internal(format!(
                "llama.cpp wrote {written} bytes of the state of sequence {seq}, {} were expected",
                out.len()
            )));
        }
        Ok(())
    }

    /// The session of sequence `seq` (`None`: every sequence that holds tokens) as bytes in the session format:
    /// store them anywhere, and give them to [`Context::restore`].
    pub fn snapshot(&self, seq: Option<SeqId>, metadata: &Metadata) -> Result<Vec<u8>> {
        let plan = self.plan_session(seq, metadata)?;
        let mut out = vec![0; plan.len()];
        self.write_session(&plan, &mut out)?;
        Ok(out)
    }

    /// Saves sequence `seq` (`None`: every sequence that holds tokens) to `path`, atomically and durably: the
    /// file is either the previous one or the new one, whatever happens.
    pub fn save_session(
        &self,
        path: &Path,
        seq: Option<SeqId>,
        metadata: &Metadata,
    ) -> Result<SessionInfo> {
        let plan = self.plan_session(seq, metadata)?;
        let mut bytes = durable::zeroed(plan.len()).map_err(|source| Error::Io {
            op: "allocate memory to save",
            path: path.to_path_buf(),
            source,
        })?;
        self.write_session(&plan, &mut bytes)?;
        durable::write_atomically(path, &[&bytes])?;
        Ok(plan.info())
    }

    /// Restores a session produced by [`Context::snapshot`] or read from a file. With `seq`, the session must
    /// hold one sequence, which replaces sequence `seq`; without, each saved sequence replaces its own and the
    /// other sequences are emptied.
    ///
    /// Everything is verified before llama.cpp sees a byte; any failed check leaves the context unchanged.
    pub fn restore(&mut self, bytes: &[u8], seq: Option<SeqId>) -> Result<SessionInfo> {
        self.restore_from(bytes, seq, "session bytes", None)
    }

    /// [`Context::restore`] with `origin` naming the bytes in error messages (a file name, a store key).
    pub fn restore_named(
        &mut self,
        bytes: &[u8],
        seq: Option<SeqId>,
        origin: &str,
    ) -> Result<SessionInfo> {
        self.restore_from(bytes, seq, origin, None)
    }

    /// `body_checksum`: the XXH3-128 of all but the last 16 bytes when the caller computed it while reading.
    fn restore_from(
        &mut self,
        bytes: &[u8],
        seq: Option<SeqId>,
        origin: &str,
        body_checksum: Option<u128>,
    ) -> Result<SessionInfo> {
        if let Some(seq) = seq {
            self.check_seq(seq)?;
        }
        let opened = format::open_with_checksum(bytes, origin, body_checksum)?;
        self.restore_opened(bytes, opened, seq, origin)
    }

    /// Restores `bytes`, already verified by `format::open` into `opened`.
    fn restore_opened(
        &mut self,
        bytes: &[u8],
        opened: OpenedSession,
        seq: Option<SeqId>,
        origin: &str,
    ) -> Result<SessionInfo> {
        self.check_compatible(&opened.header, origin)?;
        let header = &opened.header;
        match seq {
            Some(dest) => {
                if header.sequences.len() != 1 {
                    return Err(Error::invalid(
                        "seq",
                        "None to restore a session of several sequences (a session restored into one \
                         sequence must hold exactly one)",
                        format!("{dest} for a session of {} sequences", header.sequences.len()),
                    ));
                }
                let tokens = to_tokens(&header.sequences[0].tokens);
                self.set_sequence_state(dest, &bytes[opened.state_ranges[0].clone()], tokens)?;
            }
            None => {
                self.reset();
                for (record, range) in header.sequences.iter().zip(&opened.state_ranges) {
                    let tokens = to_tokens(&record.tokens);
                    if let Err(e) =
                        self.set_sequence_state(record.seq, &bytes[range.clone()], tokens)
                    {
                        self.reset();
                        return Err(e);
                    }
                }
            }
        }
        Ok(SessionInfo::from_opened(opened))
    }

    /// Compares a verified header with this context; the first difference found decides the error.
    fn check_compatible(&self, header: &SessionHeader, origin: &str) -> Result<()> {
        if header.llama_cpp_build != format::LLAMA_CPP_BUILD {
            return Err(Error::SessionVersion {
                origin: origin.to_owned(),
                reason: format!(
                    "its state was written by llama.cpp build {:?}, this build uses {:?}; llama.cpp's state \
                     layout may differ between builds",
                    header.llama_cpp_build,
                    format::LLAMA_CPP_BUILD
                ),
            });
        }
        if header.model.fingerprint != self.model.fingerprint() {
            return Err(Error::SessionModelMismatch {
                origin: origin.to_owned(),
                saved: header.model.describe(),
                current: model_record(&self.model).describe(),
            });
        }
        let mismatches = param_mismatches(&header.params, &params_record(&self.params));
        if !mismatches.is_empty() {
            return Err(Error::SessionParamsMismatch {
                origin: origin.to_owned(),
                mismatches,
            });
        }
        for record in &header.sequences {
            let corrupt = |reason: String| Error::SessionCorrupt {
                origin: origin.to_owned(),
                reason,
            };
            if record.tokens.len() > self.capacity() {
                return Err(corrupt(format!(
                    "sequence {} holds {} tokens, more than the {} a sequence of these parameters holds",
                    record.seq,
                    record.tokens.len(),
                    self.capacity()
                )));
            }
            self.model
                .check_tokens(&to_tokens(&record.tokens))
                .map_err(|e| corrupt(format!("sequence {}: {e}", record.seq)))?;
        }
        Ok(())
    }

    /// Hands verified state bytes of one sequence to llama.cpp and records `tokens` as its content.
    fn set_sequence_state(
        &mut self,
        seq: SeqId,
        state: &[u8],
        tokens: Vec<LlamaToken>,
    ) -> Result<()> {
        self.epoch += 1;
        self.last_logits = None;
        clear_recent_log();
        // SAFETY: llama.cpp's sequence-state reader is bounded by the slice length, but it trusts the layout
        // and aborts the process on some malformed states. `state` is, byte for byte, what
        // `llama_state_seq_get_data_ext` produced (checksum verified by `format::open`) in a context of the
        // same llama.cpp build, model fingerprint and state-relevant parameters (`check_compatible`), and
        // `seq` is below `n_seq_max` (checked by the callers). (Tested by the corruption, mismatch and
        // round-trip tests, which never let an unverified byte reach this call.)
        let accepted = self.cell.with_dependent_mut(|_, ctx| unsafe {
            ctx.state_seq_set_data_ext(state, seq as i32, LlamaStateSeqFlags::empty())
        });
        if !accepted {
            self.sequences[seq as usize].clear();
            self.remove_from(seq, 0)?;
            return Err(Error::Internal(take_recent_log(&format!(
                "llama.cpp refused a verified state of sequence {seq}; the sequence is now empty"
            ))));
        }
        self.sequences[seq as usize] = tokens;
        self.verify(seq)
    }

    /// Loads a session file: ours (verified completely first) or llama.cpp's own (see
    /// [`SessionFormat::LlamaCpp`]). `seq` as for [`Context::restore`]. A failed load leaves the context as it
    /// was.
    pub fn load_session(&mut self, path: &Path, seq: Option<SeqId>) -> Result<Loaded> {
        let origin = path.display().to_string();
        if let Some(seq) = seq {
            self.check_seq(seq)?;
        }
        let prefix = durable::read_prefix(path, format::MAGIC.len())?;
        if format::detect(&prefix) == SessionKind::LlamaCpp {
            return self.load_llama_cpp_session(path, seq, &origin);
        }
        let (bytes, checksum) = read_session_file(path, &prefix, &origin)?;
        let info = self.restore_from(&bytes, seq, &origin, checksum)?;
        Ok(Loaded {
            info,
            warnings: Vec::new(),
        })
    }

    /// Creates a context with the parameters recorded in the session at `path` (and `n_threads`), and loads
    /// it.
    pub fn from_session(model: &Model, path: &Path, n_threads: u32) -> Result<(Context, Loaded)> {
        let origin = path.display().to_string();
        let prefix = durable::read_prefix(path, format::MAGIC.len())?;
        if format::detect(&prefix) == SessionKind::LlamaCpp {
            return Err(Error::invalid(
                "path",
                "a llama-sessions session (a llama.cpp session records no context parameters: create the \
                 Context yourself and call load_session)",
                origin,
            ));
        }
        let (bytes, checksum) = read_session_file(path, &prefix, &origin)?;
        let opened = format::open_with_checksum(&bytes, &origin, checksum)?;
        let params = params_from_record(&opened.header.params, n_threads, &origin)?;
        let mut ctx = Context::new(model, params)?;
        let info = ctx.restore_opened(&bytes, opened, None, &origin)?;
        Ok((
            ctx,
            Loaded {
                info,
                warnings: Vec::new(),
            },
        ))
    }

    /// Replaces sequence `dst` by a copy of sequence `src` (tokens and KV cache), without decoding anything:
    /// a prefix computed once (a system prompt) serves many sequences.
    pub fn copy_sequence(&mut self, src: SeqId, dst: SeqId) -> Result<()> {
        self.check_seq(src)?;
        self.check_seq(dst)?;
        if src == dst {
            return Ok(());
        }
        // llama.cpp keeps each sequence in its own KV stream here; its own cross-stream copy is deferred to the
        // next decode (a save in between would read stale rows), so copy through the safe state API instead.
        let state = self
            .cell
            .borrow_dependent()
            .state_seq_get(src as i32, LlamaStateSeqFlags::empty())
            .map_err(|e| {
                Error::Internal(format!("cannot read the state of sequence {src}: {e}"))
            })?;
        self.epoch += 1;
        self.last_logits = None;
        let copied = self
            .cell
            .with_dependent_mut(|_, ctx| ctx.state_seq_set(&state, dst as i32));
        if let Err(e) = copied {
            self.sequences[dst as usize].clear();
            self.remove_from(dst, 0)?;
            return Err(Error::Internal(format!(
                "llama.cpp refused to copy sequence {src} into {dst} ({e}); sequence {dst} is now empty"
            )));
        }
        self.sequences[dst as usize] = self.sequences[src as usize].clone();
        self.verify(dst)
    }

    fn require_single_sequence(&self, what: &str) -> Result<()> {
        if self.params.n_seq_max != 1 {
            return Err(Error::invalid(
                "format",
                format!("\"llama-sessions\" for a context with n_seq_max > 1 ({what} records one sequence)"),
                "\"llama.cpp\"",
            ));
        }
        Ok(())
    }

    /// Saves in llama.cpp's own session format (what `llama_state_save_file` writes, byte for byte), atomically
    /// and durably. Only for a context with `n_seq_max == 1`.
    pub fn save_llama_cpp_session(&self, path: &Path) -> Result<SessionInfo> {
        self.require_single_sequence("a llama.cpp session file")?;
        let tokens = &self.sequences[0];
        let ctx = self.cell.borrow_dependent();
        let state_len = ctx.get_state_size();
        let mut state = vec![0u8; state_len];
        // SAFETY: `llama_copy_state_data` writes the whole-context state without a bound; `state` is exactly the
        // size `llama_get_state_size` just computed with the same serializer and a counting writer, and
        // `&self` keeps the context unchanged in between. (Tested by the interop test, which compares the file
        // byte for byte with llama.cpp's own `llama_state_save_file`.)
        let written = unsafe { ctx.copy_state_data(state.as_mut_ptr()) };
        if written != state_len {
            return Err(Error::Internal(format!(
                "llama.cpp wrote {written} bytes of state, {state_len} were expected"
            )));
        }
        let n_tokens = u32::try_from(tokens.len()).expect("token count fits in u32");
        let mut header = Vec::with_capacity(12 + 4 * tokens.len());
        header.extend_from_slice(&format::LLAMA_CPP_MAGIC);
        header.extend_from_slice(&format::LLAMA_CPP_VERSION.to_le_bytes());
        header.extend_from_slice(&n_tokens.to_le_bytes());
        for token in tokens {
            header.extend_from_slice(&token.0.to_le_bytes());
        }
        durable::write_atomically(path, &[&header, &state])?;
        let parsed = format::open_llama_cpp(&header, &path.display().to_string())?;
        Ok(SessionInfo::from_llama_cpp(
            &parsed,
            header.len() + state.len(),
        ))
    }

    fn load_llama_cpp_session(
        &mut self,
        path: &Path,
        seq: Option<SeqId>,
        origin: &str,
    ) -> Result<Loaded> {
        self.require_single_sequence("a llama.cpp session file")?;
        if let Some(seq) = seq.filter(|&s| s != 0) {
            return Err(Error::invalid(
                "seq",
                "None or 0 for a llama.cpp session file",
                seq,
            ));
        }
        let header = read_llama_cpp_header(path, origin)?;
        let total = file_len(path)?;
        let tokens = to_tokens(&header.tokens);
        let corrupt = |reason: String| Error::SessionCorrupt {
            origin: origin.to_owned(),
            reason,
        };
        if tokens.len() > self.capacity() {
            return Err(corrupt(format!(
                "it holds {} tokens, more than this context's {}",
                tokens.len(),
                self.capacity()
            )));
        }
        self.model
            .check_tokens(&tokens)
            .map_err(|e| corrupt(e.to_string()))?;
        // llama.cpp clears the cache before it reads the state and gives up half-way on a bad file, so keep
        // what the context holds to put it back.
        let backup = if self.sequences[0].is_empty() {
            None
        } else {
            Some(self.snapshot(Some(0), &Metadata::new())?)
        };
        self.epoch += 1;
        self.last_logits = None;
        clear_recent_log();
        let capacity = self.capacity();
        let loaded = self
            .cell
            .with_dependent_mut(|_, ctx| ctx.state_load_file(path, capacity));
        let outcome = match loaded {
            Ok(loaded_tokens) if loaded_tokens == tokens => {
                self.adopt_llama_cpp_tokens(tokens, origin)
            }
            Ok(_) => Err(corrupt("the file changed while it was read".to_owned())),
            Err(e) => Err(corrupt(take_recent_log(&format!(
                "llama.cpp refused it ({e})"
            )))),
        };
        if let Err(e) = outcome {
            self.sequences[0].clear();
            self.cell.with_dependent_mut(|_, ctx| ctx.clear_kv_cache());
            if let Some(backup) = backup {
                self.restore(&backup, Some(0))?;
            }
            return Err(e);
        }
        Ok(Loaded {
            info: SessionInfo::from_llama_cpp(&header, total),
            warnings: vec![format!(
                "{origin} is a llama.cpp session file: it records neither the model nor the context \
                 parameters and has no checksum, so only llama.cpp's own checks applied (architecture, layer \
                 count, KV types); a file saved with other weights loads without error and generates garbage"
            )],
        })
    }

    /// After llama.cpp loaded a whole state: the KV cache must hold at least the listed tokens (a file may
    /// hold more cells than tokens; those are dropped).
    fn adopt_llama_cpp_tokens(&mut self, tokens: Vec<LlamaToken>, origin: &str) -> Result<()> {
        let pos_max = self.cell.borrow_dependent().kv_cache_seq_pos_max(0);
        let cells = usize::try_from(i64::from(pos_max) + 1).unwrap_or(0);
        if cells < tokens.len() {
            return Err(Error::SessionCorrupt {
                origin: origin.to_owned(),
                reason: format!(
                    "it lists {} tokens but its state holds {cells} positions",
                    tokens.len()
                ),
            });
        }
        self.sequences[0] = vec![LlamaToken::new(0); cells];
        self.remove_from(0, tokens.len())?;
        self.sequences[0] = tokens;
        self.verify(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{GenerateOptions, ModelParams, NeverInterrupt, SamplingParams};

    fn test_model() -> Model {
        let path = std::env::var_os("LLAMA_SESSIONS_MODEL")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                let home = std::env::var_os("HOME").expect("HOME");
                std::path::PathBuf::from(home)
                    .join(".cache/llama-sessions/models/SmolLM2-135M-Instruct.Q4_1.gguf")
            });
        Model::load(path, &ModelParams::default()).expect("the test model")
    }

    #[test]
    fn our_llama_cpp_file_is_byte_identical_to_llama_cpp_s_own() {
        let model = test_model();
        let params = ContextParams {
            n_ctx: 256,
            n_batch: 32,
            ..ContextParams::default()
        };
        let mut ctx = Context::new(&model, params).unwrap();
        let options = GenerateOptions {
            max_tokens: 3,
            sampling: SamplingParams::greedy(),
            stop: Vec::new(),
        };
        ctx.generate(0, "The lighthouse keeper", options, &mut NeverInterrupt)
            .unwrap();
        let dir = std::env::temp_dir().join(format!("llama-sessions-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ours = dir.join("ours.bin");
        let theirs = dir.join("theirs.bin");
        ctx.save_llama_cpp_session(&ours).unwrap();
        ctx.cell
            .borrow_dependent()
            .state_save_file(&theirs, &ctx.sequences[0])
            .unwrap();
        assert_eq!(
            std::fs::read(&ours).unwrap(),
            std::fs::read(&theirs).unwrap()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
