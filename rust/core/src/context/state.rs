//! The Context's state as bytes: sessions, snapshots, single sequences, llama.cpp's own session files.
//!
//! Saving copies llama.cpp's per-sequence state straight into the final buffer behind our header, then seals
//! it. Loading verifies the envelope (`session_format`), compares the header with this context, then parses
//! llama.cpp's bytes of every sequence against this context's [`StateLayout`](crate::llama_state::StateLayout), all before a
//! byte reaches llama.cpp. [`Context::replace_sequence`] is the only way state bytes enter the cache, and it
//! runs that last check itself, so no caller can hand llama.cpp unchecked bytes.

use std::path::Path;

use llama_cpp_2::context::session::LlamaStateSeqFlags;
use llama_cpp_2::token::LlamaToken;

use super::{Context, LlamaHandle, SeqId};
use crate::durable;
use crate::error::{Error, Result, CONTEXT_MISMATCH_ADVICE};
use crate::llama_state::{self, MemoryLayout};
use crate::model::{MemoryKind, Model};
use crate::session::{
    memory_mismatches, model_record, open_session_bytes, open_session_file, param_mismatches,
    params_from_record, params_record, to_tokens, Loaded, Metadata, SessionInfo, SessionPlan,
};
use crate::session_format::{
    self as format, MemoryRecord, OpenedSession, SequenceRecord, SessionHeader, SessionKind,
};
use crate::signing::SessionKey;

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

    pub(super) fn sequence_state_len(&self, seq: SeqId) -> usize {
        let llama_seq = self.llama.seq(seq);
        let len = self
            .llama
            .with(|ctx| ctx.state_seq_get_size_ext(llama_seq, LlamaStateSeqFlags::empty()));
        match self.llama.pooled() {
            Some(pooled) => len - pooled.extra_stream_bytes(),
            None => len,
        }
    }

    /// The header of a session of this context holding `records`, with `metadata` (bounded here).
    pub(super) fn session_header(
        &self,
        records: Vec<SequenceRecord>,
        metadata: &Metadata,
        signed: bool,
    ) -> Result<SessionHeader> {
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
        Ok(SessionHeader {
            library_version: crate::VERSION.to_owned(),
            llama_cpp_build: format::LLAMA_CPP_BUILD.to_owned(),
            created_at: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            model: model_record(&self.model),
            params: params_record(&self.params),
            memory: self.memory_record(),
            sequences: records,
            metadata: metadata.clone(),
            signature: signed.then(|| crate::signing::SCHEME.to_owned()),
            chunks: None,
        })
    }

    /// Builds the header of a session of sequence `seq` (`None`: all sequences) and sizes it; `signed`: room
    /// for a signature (the key is given to [`Context::write_session`]).
    pub fn plan_session(
        &self,
        seq: Option<SeqId>,
        metadata: &Metadata,
        signed: bool,
    ) -> Result<SessionPlan> {
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
        let header = self.session_header(records, metadata, signed)?;
        let header_json = format::encode_header(&header)?;
        let state_len = sequences.iter().map(|&(_, len)| len).sum();
        Ok(SessionPlan {
            total_len: format::encoded_len(header_json.len(), state_len, signed),
            header,
            header_json,
            sequences,
            epoch: self.epoch,
        })
    }

    /// Writes the session planned by [`Context::plan_session`] into `out`, which must be exactly
    /// [`SessionPlan::len`] bytes, with no change to the context in between; signed with `key` when the plan
    /// was made for a signed session.
    pub fn write_session(
        &self,
        plan: &SessionPlan,
        out: &mut [u8],
        key: Option<&SessionKey>,
    ) -> Result<()> {
        if plan.header.signature.is_some() != key.is_some() {
            return Err(Error::Internal(
                "a session planned with(out) a signature was written without (with) a key"
                    .to_owned(),
            ));
        }
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
        format::seal(out, key);
        Ok(())
    }

    /// Copies llama.cpp's state of `seq` into `out`, which is exactly the size llama.cpp reports for it.
    pub(super) fn write_sequence_state(&self, seq: SeqId, out: &mut [u8]) -> Result<()> {
        if let Some(pooled) = self.llama.pooled() {
            // The pool's state of its sequence lists every stream; a context of its own has one.
            let mut state = vec![0; out.len() + pooled.extra_stream_bytes()];
            self.read_llama_state(seq, &mut state)?;
            return pooled.to_own_streams(&state, out);
        }
        self.read_llama_state(seq, out)
    }

    /// The positions of the cells llama.cpp holds for `seq`, in the order of its cells (for the tests of a
    /// pool's shared cache, whose cells need not be in position order; a plain context's always are).
    #[doc(hidden)]
    pub fn llama_cell_positions(&self, seq: SeqId) -> Result<Vec<i32>> {
        self.check_seq(seq)?;
        let llama_seq = self.llama.seq(seq);
        let len = self
            .llama
            .with(|ctx| ctx.state_seq_get_size_ext(llama_seq, LlamaStateSeqFlags::empty()));
        let mut state = vec![0; len];
        self.read_llama_state(seq, &mut state)?;
        crate::llama_state::cell_positions(&state, crate::context::cell_ext_bytes(&self.model))
            .map_err(|reason| {
                Error::Internal(format!("llama.cpp's state of sequence {seq}: {reason}"))
            })
    }

    /// Copies llama.cpp's own state of `seq` into `out`, which is exactly the size llama.cpp reports for it.
    fn read_llama_state(&self, seq: SeqId, out: &mut [u8]) -> Result<()> {
        let llama_seq = self.llama.seq(seq);
        let written = self.llama.with(|ctx| {
            let expected = ctx.state_seq_get_size_ext(llama_seq, LlamaStateSeqFlags::empty());
            if expected != out.len() {
                return Err(Error::Internal(format!(
                    "llama.cpp's state of sequence {seq} is {expected} bytes, the buffer {}",
                    out.len()
                )));
            }
            // SAFETY: llama-cpp-2 passes no bound to `llama_state_seq_get_data_ext`, so llama.cpp may write as
            // many bytes as the state has. `out` is exactly the size `llama_state_seq_get_size_ext` just
            // reported for this sequence, and that size is computed by running the same serializer with a
            // counting writer; both calls run in one `with`, which holds the context (a pooled one's lock),
            // so nothing changed the cache in between. (Tested by the snapshot round trips of every size and
            // KV type, by `write_session` refusing a buffer of another size, and by the pooled contexts'
            // tests, which save while other sequences decode.)
            Ok(unsafe {
                ctx.state_seq_get_data_ext(out.as_mut_ptr(), llama_seq, LlamaStateSeqFlags::empty())
            })
        })?;
        if written != out.len() {
            return Err(Error::Internal(format!(
                "llama.cpp wrote {written} bytes of the state of sequence {seq}, {} were expected",
                out.len()
            )));
        }
        Ok(())
    }

    /// The session of sequence `seq` (`None`: every sequence that holds tokens) as bytes in the session format:
    /// store them anywhere, and give them to [`Context::restore`]. With `key`, signed.
    pub fn snapshot(
        &self,
        seq: Option<SeqId>,
        metadata: &Metadata,
        key: Option<&SessionKey>,
    ) -> Result<Vec<u8>> {
        let plan = self.plan_session(seq, metadata, key.is_some())?;
        let mut out = vec![0; plan.len()];
        self.write_session(&plan, &mut out, key)?;
        Ok(out)
    }

    /// Saves sequence `seq` (`None`: every sequence that holds tokens) to `path`, atomically and durably: the
    /// file is either the previous one or the new one, whatever happens.
    pub fn save_session(
        &self,
        path: &Path,
        seq: Option<SeqId>,
        metadata: &Metadata,
        key: Option<&SessionKey>,
    ) -> Result<SessionInfo> {
        let plan = self.plan_session(seq, metadata, key.is_some())?;
        let mut bytes = durable::zeroed(plan.len()).map_err(|source| Error::Io {
            op: "allocate memory to save",
            path: path.to_path_buf(),
            source,
        })?;
        self.write_session(&plan, &mut bytes, key)?;
        durable::write_atomically(path, &[&bytes])?;
        Ok(plan.info())
    }

    /// Restores a session produced by [`Context::snapshot`] or read from a file. With `seq`, the session must
    /// hold one sequence, which replaces sequence `seq`; without, each saved sequence replaces its own and the
    /// other sequences are emptied. A signed session needs the `key` it was signed with, and with a key only a
    /// session signed by it is accepted.
    ///
    /// Everything is verified before llama.cpp sees a byte; any failed check leaves the context unchanged.
    pub fn restore(
        &mut self,
        bytes: &[u8],
        seq: Option<SeqId>,
        key: Option<&SessionKey>,
    ) -> Result<SessionInfo> {
        self.restore_named(bytes, seq, "session bytes", key)
    }

    /// [`Context::restore`] with `origin` naming the bytes in error messages (a file name, a store key).
    pub fn restore_named(
        &mut self,
        bytes: &[u8],
        seq: Option<SeqId>,
        origin: &str,
        key: Option<&SessionKey>,
    ) -> Result<SessionInfo> {
        if let Some(seq) = seq {
            self.check_seq(seq)?;
        }
        let opened = open_session_bytes(bytes, origin, key)?;
        self.restore_opened(bytes, opened, seq, origin, key.is_some())
    }

    /// Restores `bytes`, already verified into `opened` (with its signature when `keyed`). Every check, down
    /// to each sequence's cell records, runs before the cache changes, so a refused session leaves it as it
    /// was.
    fn restore_opened(
        &mut self,
        bytes: &[u8],
        opened: OpenedSession,
        seq: Option<SeqId>,
        origin: &str,
        keyed: bool,
    ) -> Result<SessionInfo> {
        if opened.signed && !keyed {
            return Err(Error::SessionSignature {
                origin: origin.to_owned(),
                reason: "it is signed: pass the secret_key it was signed with".to_owned(),
            });
        }
        self.check_compatible(&opened.header, origin)?;
        if opened.header.chunks.is_some() {
            return self.restore_manifest(bytes, opened, seq, origin);
        }
        let header = &opened.header;
        if let Some(dest) = seq {
            if header.sequences.len() != 1 {
                return Err(Error::invalid(
                    "seq",
                    "None to restore a session of several sequences (a session restored into one \
                     sequence must hold exactly one)",
                    format!(
                        "{dest} for a session of {} sequences",
                        header.sequences.len()
                    ),
                ));
            }
        }
        let parts: Vec<(&SequenceRecord, &[u8])> = header
            .sequences
            .iter()
            .zip(&opened.state_ranges)
            .map(|(record, range)| (record, &bytes[range.clone()]))
            .collect();
        for &(record, state) in &parts {
            self.check_state(state, record.seq, record.tokens.len(), origin)?;
        }
        match seq {
            Some(dest) => {
                let (record, state) = parts[0];
                self.replace_sequence(dest, state, to_tokens(&record.tokens), record.seq, origin)?;
            }
            None => {
                self.reset();
                for (record, state) in parts {
                    let tokens = to_tokens(&record.tokens);
                    if let Err(e) =
                        self.replace_sequence(record.seq, state, tokens, record.seq, origin)
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
    pub(crate) fn check_compatible(&self, header: &SessionHeader, origin: &str) -> Result<()> {
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
        let mut mismatches = param_mismatches(&header.params, &params_record(&self.params));
        mismatches.extend(memory_mismatches(
            header.memory.as_ref(),
            self.memory_record().as_ref(),
        ));
        if !mismatches.is_empty() {
            return Err(Error::SessionParamsMismatch {
                origin: origin.to_owned(),
                mismatches,
                advice: CONTEXT_MISMATCH_ADVICE.to_owned(),
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

    /// Loads a session file: ours (verified completely first) or llama.cpp's own (see
    /// [`SessionFormat::LlamaCpp`]). `seq` as for [`Context::restore`]. A failed load leaves the context as it
    /// was.
    pub fn load_session(
        &mut self,
        path: &Path,
        seq: Option<SeqId>,
        key: Option<&SessionKey>,
    ) -> Result<Loaded> {
        let origin = path.display().to_string();
        if let Some(seq) = seq {
            self.check_seq(seq)?;
        }
        let prefix = durable::read_prefix(path, format::MAGIC.len())?;
        if format::detect(&prefix) == SessionKind::LlamaCpp {
            if key.is_some() {
                return Err(Error::SessionSignature {
                    origin,
                    reason: "it is a llama.cpp session file, which cannot be signed, and a secret_key was \
                             given"
                        .to_owned(),
                });
            }
            return self.load_llama_cpp_session(path, seq, &origin);
        }
        let (bytes, opened) = open_session_file(path, &origin, key)?;
        let info = self.restore_opened(&bytes, opened, seq, &origin, key.is_some())?;
        Ok(Loaded {
            info,
            warnings: Vec::new(),
        })
    }

    /// Creates a context with the parameters recorded in the session at `path` (and `n_threads`), and loads
    /// it (with `key` as for [`Context::load_session`]).
    pub fn from_session(
        model: &Model,
        path: &Path,
        n_threads: u32,
        key: Option<&SessionKey>,
    ) -> Result<(Context, Loaded)> {
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
        let (bytes, opened) = open_session_file(path, &origin, key)?;
        if opened.signed && key.is_none() {
            return Err(Error::SessionSignature {
                origin,
                reason: "it is signed: pass the secret_key it was signed with".to_owned(),
            });
        }
        let params = params_from_record(&opened.header.params, n_threads, &origin)?;
        let mut ctx = Context::new(model, params)?;
        let info = ctx.restore_opened(&bytes, opened, None, &origin, key.is_some())?;
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
        // next decode (a save in between would read stale rows), so copy through the state, by the one door.
        let mut state = vec![0; self.sequence_state_len(src)];
        self.write_sequence_state(src, &mut state)?;
        let tokens = self.sequences[src as usize].clone();
        self.replace_sequence(dst, &state, tokens, src, &format!("sequence {src}"))
    }

    /// What a session header records of this context's memory: nothing for one KV cache, the kind and
    /// geometry otherwise (see [`MemoryRecord`]).
    pub(crate) fn memory_record(&self) -> Option<MemoryRecord> {
        let kind = self.model.memory_kind();
        if kind == MemoryKind::Attention {
            return None;
        }
        let mut record = MemoryRecord {
            kind: kind.as_str().to_owned(),
            n_swa: self.model.n_swa(),
            swa_cache_cells: 0,
            recurrent_r_bytes: Vec::new(),
            recurrent_s_bytes: Vec::new(),
        };
        match self.memory_layout() {
            Ok(MemoryLayout::SlidingWindow { swa, .. }) => {
                record.swa_cache_cells = swa.max_cells as u64;
            }
            Ok(MemoryLayout::Hybrid { recurrent, .. } | MemoryLayout::Recurrent(recurrent)) => {
                record.recurrent_r_bytes = recurrent.r.iter().map(|r| r.row_bytes).collect();
                record.recurrent_s_bytes = recurrent.s.iter().map(|s| s.row_bytes).collect();
            }
            Ok(MemoryLayout::Attention(_)) | Err(_) => {}
        }
        Some(record)
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
        if self.llama.pooled().is_some() {
            return Err(Error::invalid(
                "context",
                "a context of its own for a llama.cpp session file (llama.cpp writes the whole context)",
                "a SessionManager's pooled context: export the session (SessionManager.export), or restore \
                 its snapshot() into a Context of its own first",
            ));
        }
        let tokens = &self.sequences[0];
        let LlamaHandle::Own(cell) = &self.llama else {
            unreachable!("a pooled context was refused above")
        };
        let ctx = cell.borrow_dependent();
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
        let corrupt = |reason: String| Error::SessionCorrupt {
            origin: origin.to_owned(),
            reason,
        };
        // Read once, check, and hand llama.cpp these very bytes: it never reads the file itself, so the file
        // cannot change between the check and the load.
        let (bytes, _) = durable::read_all(path, &mut |_, _| {})?;
        let header = format::open_llama_cpp(&bytes, origin)?;
        let tokens = to_tokens(&header.tokens);
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
        let layout = self
            .state_layout()
            .map_err(|reason| Error::SessionVersion {
                origin: origin.to_owned(),
                reason: format!(
                    "llama.cpp's own session files are read for models whose memory is one KV cache; \
                     this context's cannot be read that way: {reason}"
                ),
            })?;
        let whole = &bytes[header.state_offset..];
        let cells =
            llama_state::check_whole_state(whole, layout, self.model.architecture(), tokens.len())
                .map_err(|reason| corrupt(format!("llama.cpp's state: {reason}")))?;
        // With one sequence whose every cell is in sequence 0 alone (just checked), the memory part of a
        // whole-context state is exactly a per-sequence state without its magic and sequence id: restore it
        // through the one door for state bytes. Cells beyond the listed tokens get placeholder tokens and are
        // dropped right after.
        let arch_len = 4 + self.model.architecture().len();
        let mut state = Vec::with_capacity(8 + whole.len() - arch_len);
        state.extend_from_slice(&llama_state::IO_MAGIC.to_le_bytes());
        state.extend_from_slice(&0i32.to_le_bytes());
        state.extend_from_slice(&whole[arch_len..]);
        let mut held = tokens.clone();
        held.resize(cells, LlamaToken::new(0));
        self.replace_sequence(0, &state, held, 0, origin)?;
        self.truncate(0, tokens.len())?;
        Ok(Loaded {
            info: SessionInfo::from_llama_cpp(&header, bytes.len()),
            warnings: vec![format!(
                "{origin} is a llama.cpp session file: it records neither the model nor the context \
                 parameters and has no checksum, so only llama.cpp's own checks applied (architecture, layer \
                 count, KV types); a file saved with other weights loads without error and generates garbage"
            )],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::test_support::{greedy, test_model};
    use crate::{ContextParams, NeverInterrupt};

    #[test]
    fn our_llama_cpp_file_is_byte_identical_to_llama_cpp_s_own() {
        let model = test_model();
        let params = ContextParams {
            n_ctx: 256,
            n_batch: 32,
            ..ContextParams::default()
        };
        let mut ctx = Context::new(&model, params).unwrap();
        ctx.generate(0, "The lighthouse keeper", greedy(3), &mut NeverInterrupt)
            .unwrap();
        let dir = std::env::temp_dir().join(format!("llama-sessions-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ours = dir.join("ours.bin");
        let theirs = dir.join("theirs.bin");
        ctx.save_llama_cpp_session(&ours).unwrap();
        ctx.llama
            .with(|c| c.state_save_file(&theirs, &ctx.sequences[0]))
            .unwrap();
        assert_eq!(
            std::fs::read(&ours).unwrap(),
            std::fs::read(&theirs).unwrap()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
