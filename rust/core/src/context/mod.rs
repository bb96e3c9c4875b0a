//! The Context: llama.cpp's KV cache *and* the bookkeeping of what is in it.
//!
//! Every token that enters the KV cache goes through [`Context::append`], which takes positions from the
//! sequence's own token list and extends that list only by what llama.cpp accepted; every removal goes
//! through [`Context::truncate`] or [`Context::reset`]. No public call takes a position, so the classic
//! mistakes (re-decoding restored tokens, starting a continuation at 0, counting only the last batch) cannot
//! be written. After each change the cache is checked against the bookkeeping.
//!
//! The fields are private to this module tree, so the compiler enforces that: only [`Context::append`],
//! [`Context::truncate`], [`Context::reset`] and [`Context::replace_sequence`] (state bytes, parsed and
//! checked against this context's layout first; its loader also takes back the partial states of recurrent
//! memory's checkpoints, checked the same way) change the cache. `state` (sessions and snapshots),
//! `checkpoints` and `generation` are child modules that go through those doors.

mod batch;
mod checkpoints;
pub(crate) mod generation;
mod handle;
mod layout;
mod manifest;
mod prefix;
mod state;

use std::sync::Arc;

use llama_cpp_2::context::session::LlamaStateSeqFlags;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;

use crate::backend::{backend, clear_recent_log, take_recent_log};
use crate::error::{Error, Result};
use crate::llama_state::{self, Expected, MemoryLayout, StateLayout};
use crate::model::{ChatMessage, MemoryKind, Model, ModelInner};
use crate::params::ContextParams;
use crate::sampling::SamplingParams;
pub use batch::SequenceTokens;
use checkpoints::Checkpoint;
pub use checkpoints::MAX_CHECKPOINTS;
use generation::Generator;
use handle::LlamaHandle;
pub(crate) use layout::cell_ext_bytes;
pub use manifest::ManifestSnapshot;
pub use prefix::SequenceCopy;

type BorrowedContext<'model> = LlamaContext<'model>;

/// Serialises context creation: `llama_new_context_with_model` may write to the shared model (llama-cpp-2
/// marks creating contexts of one model in parallel as unsound), while everything else a Context does
/// only reads the model.
static CONTEXT_CREATION: std::sync::Mutex<()> = std::sync::Mutex::new(());

self_cell::self_cell!(
    /// A llama.cpp context together with the model it borrows, so that the model provably outlives it.
    pub(crate) struct ContextCell {
        owner: Arc<ModelInner>,
        #[covariant]
        dependent: BorrowedContext,
    }
);

/// Which part of a sequence's state bytes hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StateScope {
    /// Everything llama.cpp keeps of the sequence.
    Whole,
    /// The recurrent section alone (`LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY`): a checkpoint.
    Partial,
}

/// A sequence id: which of the context's `n_seq_max` independent sequences a call works on.
pub type SeqId = u32;

/// Where the logits of the last decode are, if they belong to the end of a sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LastLogits {
    seq: SeqId,
    /// Index of the token in the last batch that was decoded with logits.
    batch_index: i32,
}

/// Something that may ask a long operation to stop between two decode calls.
pub trait Interrupt {
    /// Returns true to stop.
    fn should_stop(&mut self) -> bool;
}

/// Never interrupts.
#[derive(Debug, Default, Clone, Copy)]
pub struct NeverInterrupt;

impl Interrupt for NeverInterrupt {
    fn should_stop(&mut self) -> bool {
        false
    }
}

impl<F: FnMut() -> bool> Interrupt for F {
    fn should_stop(&mut self) -> bool {
        self()
    }
}

/// A llama.cpp context with its bookkeeping. `Send`, not `Sync`: share it between threads behind a lock.
pub struct Context {
    llama: LlamaHandle,
    /// For a pooled context: the logits of the last decode that asked for them, copied out of the shared
    /// context by the pool (valid while `last_logits` says so).
    pooled_logits: Vec<f32>,
    /// For a pooled context: every token with its logit, sampled from (kept to reuse its allocation).
    candidates: Vec<llama_cpp_2::token::data::LlamaTokenData>,
    model: Model,
    params: ContextParams,
    /// The tokens in the KV cache, per sequence, in position order: token `i` sits at position `i`.
    sequences: Vec<Vec<LlamaToken>>,
    /// Cells available to each sequence: `n_ctx / n_seq_max` (llama.cpp gives each sequence its own stream
    /// of that many cells).
    capacity_per_sequence: usize,
    /// Most tokens per decode call: `n_batch` as llama.cpp applied it (it clamps it to the requested `n_ctx`,
    /// and aborts on a larger batch).
    chunk_len: usize,
    batch: LlamaBatch<'static>,
    last_logits: Option<LastLogits>,
    /// Where the logits of each sequence that asked for them in the last [`Context::decode_batch`] are, valid
    /// while the epoch is the one recorded with them (every decode and every change of the cache bumps it).
    batch_logits: (u64, Vec<LastLogits>),
    /// Bumped by every change of the KV cache, so that a paused token stream can tell it was overtaken.
    epoch: u64,
    /// What llama.cpp's state of one sequence of this context looks like, or why it cannot be checked.
    layout: std::result::Result<MemoryLayout, String>,
    /// Per sequence, the shortest length it can be cut back to in place and stay exact: 0 for a KV cache
    /// that holds every token; for a sliding-window model restored from a state (which keeps the window's
    /// last positions only), its length at the restore less one; recurrent memory cannot be cut back at all
    /// ([`Context::truncate`] decodes again below it).
    exact_floor: Vec<usize>,
    /// Per sequence, recurrent state checkpoints in increasing token order (see the `checkpoints` module);
    /// empty where the memory can be cut back in place.
    checkpoints: Vec<Vec<Checkpoint>>,
    /// Counts and stop reason of the last finished generation or chat turn on this context, kept here (not in
    /// a caller's wrapper) so that every handle on a shared context (a manager's live session) sees them.
    last_stats: Option<(GenerationStats, StopReason)>,
    /// The chunk cache prompts are restored from and offered to, with the scope of this context's keys (None
    /// when its memory is not one plain KV cache: then the cache is never consulted).
    prefix_cache: Option<(
        crate::chunks::PrefixCache,
        Option<crate::chunks::ChunkScope>,
    )>,
    /// Per sequence, the digests of its first full chunks as the prefix cache holds them byte for byte
    /// (restored from it, or written to it from this sequence): what a session manifest may name instead of
    /// carrying the rows. Cut back whenever the sequence is (`remove_from`), emptied when it is replaced.
    chunk_digests: Vec<Vec<[u8; 32]>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("params", &self.params)
            .field(
                "token_counts",
                &self.sequences.iter().map(Vec::len).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Context {
    /// Creates a context over `model`. The parameters are validated first (see [`ContextParams::validate`]);
    /// the context's own [`Context::params`] then hold the sizes llama.cpp allocated, read back from it
    /// (`n_ctx=300` holds 512 cells), so that sessions record and compare what they really are.
    pub fn new(model: &Model, params: ContextParams) -> Result<Context> {
        params.validate(model)?;
        let cell = create_cell(model, &params)?;
        let allocated = cell.borrow_dependent();
        // llama.cpp decodes at most n_ubatch tokens per step; it is n_batch here (both are set alike and
        // clamped alike), and the smaller is what a chunk may hold.
        let params = ContextParams {
            n_ctx: allocated.n_ctx(),
            n_batch: allocated.n_batch().min(allocated.n_ubatch()),
            ..params
        };
        Context::assemble(LlamaHandle::Own(cell), model, params)
    }

    /// A context on one sequence of a [`crate::engine::ContextPool`], with the parameters the pool allocated
    /// for each of its sequences (`n_seq_max` 1).
    pub(crate) fn pooled(
        model: &Model,
        params: ContextParams,
        pooled: crate::engine::PooledSequence,
    ) -> Result<Context> {
        Context::assemble(LlamaHandle::Pooled(pooled), model, params)
    }

    /// The bookkeeping around a llama.cpp context whose allocated sizes `params` holds.
    fn assemble(llama: LlamaHandle, model: &Model, params: ContextParams) -> Result<Context> {
        let n_ctx = params.n_ctx as usize;
        let chunk_len = params.n_batch as usize;
        let n_seq = params.n_seq_max as usize;
        let plan = layout::plan(model, &params, n_ctx / n_seq);
        let mut ctx = Context {
            llama,
            pooled_logits: Vec::new(),
            candidates: Vec::new(),
            model: model.clone(),
            chunk_len,
            batch: LlamaBatch::new(chunk_len, 1),
            capacity_per_sequence: n_ctx / n_seq,
            sequences: vec![Vec::new(); n_seq],
            params,
            last_logits: None,
            batch_logits: (0, Vec::new()),
            epoch: 0,
            layout: Err("the layout is being learnt".to_owned()),
            exact_floor: vec![0; n_seq],
            checkpoints: vec![Vec::new(); n_seq],
            last_stats: None,
            prefix_cache: None,
            chunk_digests: vec![Vec::new(); n_seq],
        };
        ctx.layout = match plan {
            layout::LayoutPlan::Ready(layout) => layout,
            layout::LayoutPlan::Probe {
                kind,
                n_swa,
                cell_ext_bytes,
            } => ctx.probe_layout(kind, n_swa, cell_ext_bytes),
        };
        Ok(ctx)
    }

    /// Decodes one token in sequence 0 of this fresh context, reads llama.cpp's state of it to learn the
    /// layout of the memory's sections (see [`llama_state::learn_memory_layout`]), and empties the memory
    /// again.
    fn probe_layout(
        &mut self,
        kind: MemoryKind,
        n_swa: usize,
        cell_ext_bytes: usize,
    ) -> std::result::Result<MemoryLayout, String> {
        let token = self.model.bos_to_add().unwrap_or(LlamaToken(0));
        let learnt = self
            .append(0, &[token], false, &mut NeverInterrupt)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                let mut state = vec![0; self.sequence_state_len(0)];
                self.write_sequence_state(0, &mut state)
                    .map_err(|e| e.to_string())?;
                llama_state::learn_memory_layout(
                    &state,
                    kind.as_str(),
                    self.capacity_per_sequence,
                    n_swa,
                    cell_ext_bytes,
                )
            });
        self.reset();
        learnt.map_err(|reason| {
            format!(
                "this build could not learn the layout of {:?} models' {} memory ({reason}), so it refuses \
                 to load their states",
                self.model.architecture(),
                kind.as_str()
            )
        })
    }

    /// The model this context reads with.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The parameters the context was created with, with `n_ctx` and `n_batch` as llama.cpp allocated them
    /// (see [`ContextParams::allocated`]).
    pub fn params(&self) -> &ContextParams {
        &self.params
    }

    /// Most tokens one sequence can hold: `n_ctx / n_seq_max` (the `n_ctx` cells are shared by the sequences,
    /// each its own equal share).
    pub fn capacity(&self) -> usize {
        self.capacity_per_sequence
    }

    fn full(&self, requested: usize, held: usize) -> Error {
        Error::ContextFull {
            requested,
            available: self.capacity_per_sequence - held,
            held,
            capacity: self.capacity_per_sequence,
            n_seq_max: self.params.n_seq_max,
        }
    }

    /// Bytes of the KV cache this context allocated (all `n_ctx` cells of every layer, used or not; and the
    /// recurrent states, one per sequence): what a live context costs in memory besides llama.cpp's compute
    /// buffers.
    pub fn kv_cache_bytes(&self) -> usize {
        let kv = |layout: &StateLayout| -> usize {
            let per_cell: u64 = layout
                .layers
                .iter()
                .map(|l| {
                    l.k_row_bytes
                        + if layout.v_trans {
                            u64::from(l.v_element_bytes) * u64::from(l.v_width)
                        } else {
                            l.v_row_bytes
                        }
                })
                .sum();
            layout.max_cells * layout.n_stream as usize * per_cell as usize
        };
        let recurrent = |layout: &llama_state::RecurrentLayout| -> usize {
            let per_sequence: u64 = layout.r.iter().chain(&layout.s).map(|r| r.row_bytes).sum();
            self.sequences.len() * per_sequence as usize
        };
        // The other memories from their learnt layout: every cell of every cache, one recurrent state per
        // sequence.
        match &self.layout {
            Ok(MemoryLayout::SlidingWindow { base, swa, .. }) => return kv(base) + kv(swa),
            Ok(MemoryLayout::Hybrid {
                attention,
                recurrent: r,
            }) => return kv(attention) + recurrent(r),
            Ok(MemoryLayout::Recurrent(r)) => return recurrent(r),
            Ok(MemoryLayout::Attention(_)) | Err(_) => {}
        }
        let n_ctx = self.capacity_per_sequence * self.sequences.len();
        n_ctx * kv_bytes_per_cell(&self.model, &self.params)
    }

    /// For a Context of a [`crate::ContextPool`] whose sequences share their cells: makes this one hold or
    /// reserve `cells` cells (a turn reserves what it may decode before it starts); [`Error::KvBudgetFull`]
    /// if the other sequences hold the rest. Nothing to do for any other Context.
    pub(crate) fn reserve_pool_cells(&self, cells: usize) -> Result<()> {
        match self.llama.pooled() {
            Some(pooled) => pooled.reserve_cells(cells),
            None => Ok(()),
        }
    }

    /// Whether this Context is a sequence of a [`crate::ContextPool`].
    pub fn is_pooled(&self) -> bool {
        self.llama.pooled().is_some()
    }

    /// Whether this Context holds or reserved cells of a pool's shared cache (evicting its session frees them).
    pub(crate) fn holds_pool_cells(&self) -> bool {
        self.llama
            .pooled()
            .is_some_and(|pooled| pooled.reserved_cells() > 0)
    }

    /// Gives back what [`Context::reserve_pool_cells`] reserved beyond the tokens this Context holds.
    pub(crate) fn release_pool_cells(&self) {
        if let Some(pooled) = self.llama.pooled() {
            pooled.release_cells(self.sequences[0].len());
        }
    }

    /// The most bytes of llama.cpp state a session restored into this context can hold: twice its KV cache
    /// (the cells' own records, a few bytes each, and per-layer headers come on top of their K and V rows),
    /// and a mebibyte. What a reader allows before it reads a stored state.
    pub(crate) fn state_bytes_bound(&self) -> usize {
        self.kv_cache_bytes()
            .saturating_mul(2)
            .saturating_add(1 << 20)
    }

    /// The tokens held by sequence `seq`, in position order.
    pub fn tokens(&self, seq: SeqId) -> Result<&[LlamaToken]> {
        self.check_seq(seq)?;
        Ok(&self.sequences[seq as usize])
    }

    /// How many tokens sequence `seq` holds; the next token goes to this position.
    pub fn token_count(&self, seq: SeqId) -> Result<usize> {
        self.tokens(seq).map(<[LlamaToken]>::len)
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Counts and stop reason of the last finished generation or chat turn recorded on this context (None
    /// after a reset, a restore of state bytes, or before any).
    pub fn last_stats(&self) -> Option<(GenerationStats, StopReason)> {
        self.last_stats
    }

    /// Records (or, with None, forgets) the counts and stop reason of the generation that just finished.
    pub fn set_last_stats(&mut self, stats: Option<(GenerationStats, StopReason)>) {
        self.last_stats = stats;
    }

    pub(crate) fn check_seq(&self, seq: SeqId) -> Result<()> {
        if (seq as usize) < self.sequences.len() {
            Ok(())
        } else {
            Err(Error::invalid(
                "seq",
                format!("0 <= seq < {} (n_seq_max)", self.sequences.len()),
                seq,
            ))
        }
    }

    /// Checks that `extra` more tokens fit in sequence `seq`.
    pub fn check_room(&self, seq: SeqId, extra: usize) -> Result<()> {
        let held = self.token_count(seq)?;
        if extra > self.capacity_per_sequence - held {
            return Err(self.full(extra, held));
        }
        Ok(())
    }

    /// The one door for tokens: decodes `tokens` after what sequence `seq` holds, in chunks of `n_batch`.
    /// With `want_logits`, the last token's logits are kept for sampling.
    ///
    /// Nothing is decoded if the tokens do not fit ([`Error::ContextFull`]) or contain an id outside the
    /// vocabulary. If llama.cpp fails, or `interrupt` asks to stop between two chunks, the chunks decoded
    /// before stay in the sequence and its bookkeeping.
    pub fn append(
        &mut self,
        seq: SeqId,
        tokens: &[LlamaToken],
        want_logits: bool,
        interrupt: &mut dyn Interrupt,
    ) -> Result<()> {
        self.check_room(seq, tokens.len())?;
        self.model.check_tokens(tokens)?;
        let chunk_len = self.chunk_len;
        let n_chunks = tokens.len().div_ceil(chunk_len);
        for (i, chunk) in tokens.chunks(chunk_len).enumerate() {
            if interrupt.should_stop() {
                return Err(Error::Interrupted);
            }
            let logits_for_last = want_logits && i + 1 == n_chunks;
            self.decode_chunk(seq, chunk, logits_for_last)?;
        }
        Ok(())
    }

    fn decode_chunk(
        &mut self,
        seq: SeqId,
        chunk: &[LlamaToken],
        logits_for_last: bool,
    ) -> Result<()> {
        let held = self.sequences[seq as usize].len();
        self.batch.clear();
        for (i, &token) in chunk.iter().enumerate() {
            let position =
                i32::try_from(held + i).expect("positions are below n_ctx, which fits in i32");
            let logits = logits_for_last && i + 1 == chunk.len();
            self.batch
                .add(token, position, &[seq as i32], logits)
                .map_err(|e| {
                    Error::Internal(format!("batch sized n_batch refused a token: {e}"))
                })?;
        }
        self.epoch += 1;
        self.last_logits = None;
        let decoded = match self.llama.pooled_mut() {
            Some(pooled) => pooled.decode(
                chunk,
                held,
                logits_for_last.then_some(&mut self.pooled_logits),
            ),
            None => {
                let (batch, n_threads) = (&mut self.batch, self.params.n_threads);
                self.llama
                    .with_mut(|ctx| crate::compute::decode(ctx, batch, n_threads))
                    .map_err(decode_failure)
            }
        };
        match decoded {
            Ok(()) => {
                self.sequences[seq as usize].extend_from_slice(chunk);
                if logits_for_last {
                    self.last_logits = Some(LastLogits {
                        seq,
                        batch_index: i32::try_from(chunk.len() - 1).expect("chunk fits in i32"),
                    });
                }
                self.verify(seq)
            }
            Err(e) => {
                // llama.cpp may have kept part of a failed batch; drop it so that cache and bookkeeping agree.
                self.remove_from(seq, held)?;
                Err(e)
            }
        }
    }

    /// Where the logits of the last token of `seq` are, if the last decode kept them.
    fn logits_index(&self, seq: SeqId) -> Option<i32> {
        if let Some(last) = self.last_logits.filter(|l| l.seq == seq) {
            return Some(last.batch_index);
        }
        let (epoch, kept) = &self.batch_logits;
        kept.iter()
            .find(|l| l.seq == seq && *epoch == self.epoch)
            .map(|l| l.batch_index)
    }

    /// Checks the KV cache of `seq` against its bookkeeping; on disagreement empties that sequence (cells and
    /// bookkeeping; the other sequences are untouched) and reports a bug.
    fn verify(&mut self, seq: SeqId) -> Result<()> {
        let llama_seq = self.llama.seq(seq);
        let pos_max = self.llama.with(|ctx| ctx.kv_cache_seq_pos_max(llama_seq));
        let expected = self.sequences[seq as usize].len() as i64 - 1;
        if i64::from(pos_max) == expected {
            return Ok(());
        }
        self.epoch += 1;
        self.last_logits = None;
        self.sequences[seq as usize].clear();
        self.checkpoints[seq as usize].clear();
        self.chunk_digests[seq as usize].clear();
        let removed = self
            .llama
            .with_mut(|ctx| ctx.kv_cache_seq_rm(llama_seq, None, None));
        if removed.is_err() || self.llama_cell_count(seq).unwrap_or(1) != 0 {
            self.reset();
        }
        Err(Error::Internal(format!(
            "KV cache of sequence {seq} ends at position {pos_max} but the bookkeeping holds {} tokens; \
             sequence {seq} was emptied",
            expected + 1
        )))
    }

    fn remove_from(&mut self, seq: SeqId, keep: usize) -> Result<()> {
        self.epoch += 1;
        self.last_logits = None;
        let keep_u32 = u32::try_from(keep).expect("positions fit in u32");
        let llama_seq = self.llama.seq(seq);
        let removed = self
            .llama
            .with_mut(|ctx| ctx.kv_cache_seq_rm(llama_seq, Some(keep_u32), None));
        if let Err(e) = removed {
            return Err(Error::Internal(format!(
                "llama.cpp could not remove cells: {e}"
            )));
        }
        self.sequences[seq as usize].truncate(keep);
        self.drop_checkpoints_above(seq, keep);
        let whole_chunks = keep / self.prefix_chunk_tokens().unwrap_or(1);
        self.chunk_digests[seq as usize].truncate(whole_chunks);
        if keep == 0 {
            self.exact_floor[seq as usize] = 0;
        }
        self.verify(seq)
    }

    /// Keeps the first `n` tokens of sequence `seq` and drops the rest from the cache and the bookkeeping;
    /// the next token goes to position `n`.
    ///
    /// Where the memory cannot be cut back to `n` in place and stay exact (a recurrent state; a
    /// sliding-window model restored from a state that kept only its window), the sequence goes back to its
    /// nearest state checkpoint at or below `n` (recurrent and hybrid memory: see
    /// [`Context::checkpoint_positions`]), or is emptied where there is none, and the tokens from there to `n`
    /// are decoded again, in chunks of `n_batch`: exact, at the cost of decoding those tokens. Nothing
    /// changes if `n` is out of range.
    pub fn truncate(&mut self, seq: SeqId, n: usize) -> Result<()> {
        let held = self.token_count(seq)?;
        if n > held {
            return Err(Error::invalid(
                "n",
                format!("0 <= n <= {held} (the tokens held)"),
                n,
            ));
        }
        if n == held {
            return Ok(());
        }
        if n == 0 || n >= self.exact_floor(seq) {
            return self.remove_from(seq, n);
        }
        let kept = self.sequences[seq as usize][..n].to_vec();
        let from = self.nearest_checkpoint(seq, n);
        if from > 0 {
            self.restore_checkpoint(seq, from)?;
        } else {
            self.remove_from(seq, 0)?;
        }
        self.append(seq, &kept[from..], false, &mut NeverInterrupt)
    }

    /// The shortest length sequence `seq` can be cut back to in place, exactly (see
    /// [`Context::truncate`]).
    pub fn exact_floor(&self, seq: SeqId) -> usize {
        let held = self.sequences[seq as usize].len();
        match self.model.memory_kind() {
            MemoryKind::Attention => 0,
            MemoryKind::SlidingWindow => self.exact_floor[seq as usize].min(held),
            MemoryKind::Hybrid | MemoryKind::Recurrent => held,
        }
    }

    /// Empties every sequence and frees every cell of the memory, including any the bookkeeping does not
    /// know of.
    pub fn reset(&mut self) {
        self.epoch += 1;
        self.last_logits = None;
        self.last_stats = None; // they described what is gone
                                // Removing every sequence's cells by position range is cheap (llama_memory_clear(data=true) memsets
                                // the whole KV buffer: 8 ms at n_ctx 4096 with a 135M model), but a range starts at position 0 at the
                                // earliest, so a cell at a negative position would survive it. Clear the memory entirely whenever
                                // anything is left.
        match self.llama.pooled().map(|pooled| pooled.seq()) {
            // Only this context's sequence of the shared memory: a range removal, which leaves a cell at a
            // negative position, but no such cell ever enters (states are checked before llama.cpp reads
            // them).
            Some(llama_seq) => {
                let _ = self
                    .llama
                    .with_mut(|ctx| ctx.clear_kv_cache_seq(Some(llama_seq as u32), None, None));
            }
            None => {
                let cleared = self
                    .llama
                    .with_mut(|ctx| ctx.clear_kv_cache_seq(None, None, None));
                if !matches!(cleared, Ok(true)) || !self.memory_is_empty() {
                    self.llama.with_mut(|ctx| ctx.clear_kv_cache());
                }
            }
        }
        for tokens in &mut self.sequences {
            tokens.clear();
        }
        for checkpoints in &mut self.checkpoints {
            checkpoints.clear();
        }
        for digests in &mut self.chunk_digests {
            digests.clear();
        }
        self.exact_floor.fill(0);
    }

    /// True when no sequence has a single cell in llama.cpp's memory, whatever its position: the state of an
    /// empty sequence is its magic, sequence id, stream count and one zero cell count per stream (this crate
    /// never unifies the cache, so there is one stream per sequence).
    fn memory_is_empty(&self) -> bool {
        if self.model.memory_kind() != MemoryKind::Attention {
            return (0..self.sequences.len() as SeqId)
                .all(|seq| self.llama_cell_count(seq).is_ok_and(|n| n == 0));
        }
        let n_stream = self.sequences.len();
        let empty_len = 12 + 4 * n_stream;
        (0..n_stream as SeqId).all(|seq| self.sequence_state_len(seq) == empty_len)
    }

    /// How many cells of sequence `seq` llama.cpp holds, whatever their positions (a test hook for the
    /// promise that nothing foreign ever enters the cache).
    #[doc(hidden)]
    pub fn llama_cell_count(&self, seq: SeqId) -> Result<usize> {
        self.check_seq(seq)?;
        let mut state = vec![0; self.sequence_state_len(seq)];
        self.write_sequence_state(seq, &mut state)?;
        if self.model.memory_kind() == MemoryKind::Recurrent {
            // No KV streams: the recurrent cell count follows the magic and the sequence id.
            return state
                .get(8..12)
                .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")) as usize)
                .ok_or_else(|| {
                    Error::Internal("llama.cpp's state is shorter than its header".into())
                });
        }
        // The first section is a KV cache (the full-attention one of a sliding-window model, the attention
        // layers of a hybrid): its stream counts follow the magic and the sequence id.
        let n_stream = self.sequences.len();
        let counts = state.get(12..12 + 4 * n_stream).unwrap_or_default();
        if n_stream != 1 && counts.len() != 4 * n_stream {
            return Err(Error::Internal(
                "llama.cpp's state is shorter than its stream counts".into(),
            ));
        }
        Ok(counts
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")) as usize)
            .sum())
    }

    /// The one door for state bytes: replaces sequence `seq` by `state`, llama.cpp's state of a sequence
    /// `expected.saved_seq` holding `tokens`. The bytes are parsed and checked against this context's layout
    /// first ([`llama_state::check_sequence_state`]); a state that fails is [`Error::SessionCorrupt`] and
    /// changes nothing. If llama.cpp refuses a state that passed (a bug), sequence `seq` is emptied and the
    /// other sequences are untouched.
    pub(crate) fn replace_sequence(
        &mut self,
        seq: SeqId,
        state: &[u8],
        tokens: Vec<LlamaToken>,
        saved_seq: SeqId,
        origin: &str,
    ) -> Result<()> {
        self.load_state(seq, state, StateScope::Whole, tokens, saved_seq, origin)
    }

    /// What [`Context::replace_sequence`] does, for a whole state or (a checkpoint) a partial one: with
    /// [`StateScope::Partial`], `state` is the recurrent section alone of sequence `seq` when it held
    /// `tokens`, which must be the first tokens it holds now; it replaces the recurrent cell and the attention
    /// cells past `tokens` are dropped.
    pub(super) fn load_state(
        &mut self,
        seq: SeqId,
        state: &[u8],
        scope: StateScope,
        tokens: Vec<LlamaToken>,
        saved_seq: SeqId,
        origin: &str,
    ) -> Result<()> {
        self.check_seq(seq)?;
        let flags = match scope {
            StateScope::Whole => {
                self.check_state(state, saved_seq, tokens.len(), origin)?;
                LlamaStateSeqFlags::empty()
            }
            StateScope::Partial => {
                let layout = self.checkpoint_layout().ok_or_else(|| {
                    Error::Internal("a partial state for memory without a recurrent part".into())
                })?;
                let expected = Expected {
                    saved_seq,
                    token_count: tokens.len(),
                };
                llama_state::check_memory_state(state, &layout, expected).map_err(|reason| {
                    Error::SessionCorrupt {
                        origin: origin.to_owned(),
                        reason: format!(
                            "llama.cpp's partial state of sequence {saved_seq}: {reason}"
                        ),
                    }
                })?;
                if !self.sequences[seq as usize].starts_with(&tokens) {
                    return Err(Error::Internal(format!(
                        "{origin} is not a state of the tokens sequence {seq} starts with"
                    )));
                }
                LlamaStateSeqFlags::PARTIAL_ONLY
            }
        };
        self.model
            .check_tokens(&tokens)
            .map_err(|e| Error::SessionCorrupt {
                origin: origin.to_owned(),
                reason: format!("sequence {saved_seq}: {e}"),
            })?;
        let pooled_state = match self.llama.pooled() {
            Some(pooled) => {
                // A pool's shared cache has the cells for it before anything changes here.
                pooled.reserve_cells(tokens.len())?;
                Some(pooled.to_pool_streams(state)?)
            }
            None => None,
        };
        self.epoch += 1;
        self.last_logits = None;
        if scope == StateScope::Whole {
            self.last_stats = None; // they described what is replaced (a manager's revert, say)
            self.chunk_digests[seq as usize].clear(); // the caller sets them when it knows them
        }
        clear_recent_log();
        let llama_seq = self.llama.seq(seq);
        let state = pooled_state.as_deref().unwrap_or(state);
        // SAFETY: llama.cpp's sequence-state reader is bounded by the slice length, but it trusts the cell
        // records (a negative position stays in the cache for good; several sequence ids or positions out of
        // order trip assertions that abort the process). `check_state` (whole) or `check_memory_state` with
        // the recurrent section's layout (partial, read by llama.cpp with the same PARTIAL_ONLY flag it was
        // written with) just parsed every byte of `state` against this context's layout: exactly one cell
        // per token at positions 0..n in order (one recurrent cell at n - 1), each in one sequence, every type
        // and size this context's, nothing left over; and `seq < n_seq_max` (`check_seq`). A pooled context
        // hands llama.cpp the same bytes with its pool sequence's id, and the pool's other streams listed
        // empty (`PooledSequence::to_pool_streams`, which checks the one stream it rewrites): the cells are
        // unchanged but for that id. (Tested by the forged-state tests in tests/test_hardening.py,
        // rust/core/tests/state_check.rs and rust/core/tests/pool.rs, which hand such states to restore and
        // expect SessionCorrupt with the cache unchanged, and by the checkpoint tests.)
        let accepted = self
            .llama
            .with_mut(|ctx| unsafe { ctx.state_seq_set_data_ext(state, llama_seq, flags) });
        if !accepted {
            self.sequences[seq as usize].clear();
            self.remove_from(seq, 0)?;
            return Err(Error::Internal(take_recent_log(&format!(
                "llama.cpp refused a checked state of sequence {seq}; that sequence is now empty, the others \
                 are unchanged"
            ))));
        }
        if scope == StateScope::Partial {
            // The recurrent cell is at the checkpoint; the attention cells (of a hybrid) past it go, and with
            // them the checkpoints past it.
            return self.remove_from(seq, tokens.len());
        }
        self.checkpoints[seq as usize].clear();
        // A sliding-window state keeps the window's last positions only: below them the sequence can no
        // longer be cut back in place.
        let n_swa = self.model.n_swa() as usize;
        self.exact_floor[seq as usize] = if tokens.len() > n_swa {
            tokens.len() - 1
        } else {
            0
        };
        self.sequences[seq as usize] = tokens;
        self.verify(seq)
    }

    /// Checks llama.cpp state bytes of one sequence against this context's layout, as
    /// [`Context::replace_sequence`] will.
    pub(crate) fn check_state(
        &self,
        state: &[u8],
        saved_seq: SeqId,
        token_count: usize,
        origin: &str,
    ) -> Result<()> {
        let layout = self
            .layout
            .as_ref()
            .map_err(|reason| Error::SessionVersion {
                origin: origin.to_owned(),
                reason: reason.clone(),
            })?;
        let expected = Expected {
            saved_seq,
            token_count,
        };
        llama_state::check_memory_state(state, layout, expected).map_err(|reason| {
            Error::SessionCorrupt {
                origin: origin.to_owned(),
                reason: format!("llama.cpp's state of sequence {saved_seq}: {reason}"),
            }
        })
    }

    /// The layout of the KV cache in every per-sequence state of this context, when its memory is one KV
    /// cache (plain attention) this build can check.
    pub fn state_layout(&self) -> std::result::Result<&StateLayout, &str> {
        match &self.layout {
            Ok(MemoryLayout::Attention(layout)) => Ok(layout),
            Ok(other) => Err(match other {
                MemoryLayout::SlidingWindow { .. } => {
                    "its memory is not one KV cache: it has a sliding-window cache"
                }
                _ => "its memory is not one KV cache: it has recurrent layers",
            }),
            Err(reason) => Err(reason.as_str()),
        }
    }

    /// The layout every per-sequence state of this context has, section by section, when this build can
    /// check it.
    pub fn memory_layout(&self) -> std::result::Result<&MemoryLayout, &str> {
        self.layout.as_ref().map_err(String::as_str)
    }

    /// Makes the logits of the last token of `seq` available, decoding it again if they are not (after a
    /// truncate, a restore, or work on another sequence). An empty sequence starts with the BOS token.
    pub(crate) fn ensure_logits(
        &mut self,
        seq: SeqId,
        interrupt: &mut dyn Interrupt,
    ) -> Result<i32> {
        if let Some(batch_index) = self.logits_index(seq) {
            return Ok(batch_index);
        }
        let held = self.token_count(seq)?;
        if let Some(&token) = self.sequences[seq as usize].last() {
            // Decode the last token again for its logits. It was in the context before this call, so it must
            // be there after it: no interruption between taking it out and putting it back.
            self.truncate(seq, held - 1)?;
            self.append(seq, &[token], true, &mut NeverInterrupt)?;
        } else {
            let bos = self.model.bos_to_add().ok_or_else(|| {
                Error::invalid(
                    "prompt",
                    "a non-empty prompt: the context is empty and the model has no BOS token to start from",
                    "\"\"",
                )
            })?;
            self.append(seq, &[bos], true, interrupt)?;
        }
        Ok(self
            .last_logits
            .expect("append with want_logits sets them")
            .batch_index)
    }

    pub(crate) fn sample(
        &mut self,
        sampler: &mut llama_cpp_2::sampling::LlamaSampler,
        seq: SeqId,
    ) -> Result<LlamaToken> {
        // `llama_sampler_sample` reads the logits of `batch_index` without checking that they exist, so sample
        // only where the last decode produced logits for this very sequence.
        let Some(batch_index) = self.logits_index(seq) else {
            return Err(Error::StreamInvalidated);
        };
        if self.llama.pooled().is_some() {
            return sample_from_logits(sampler, &self.pooled_logits, &mut self.candidates);
        }
        Ok(self.llama.with_mut(|ctx| sampler.sample(ctx, batch_index)))
    }

    /// Starts generating after `prompt` on sequence `seq`: the prompt is tokenized (with BOS only when the
    /// sequence is empty, special tokens parsed) and decoded; text then comes from [`Generator::next_piece`].
    pub fn start_generation(
        &mut self,
        seq: SeqId,
        prompt: &str,
        options: GenerateOptions,
        interrupt: &mut dyn Interrupt,
    ) -> Result<Generator> {
        Generator::start(self, seq, prompt, options, interrupt)
    }

    /// Generates after `prompt` on sequence `seq` until an end-of-generation token, a stop string,
    /// `max_tokens` or a full context. Every generated token stays in the context.
    pub fn generate(
        &mut self,
        seq: SeqId,
        prompt: &str,
        options: GenerateOptions,
        interrupt: &mut dyn Interrupt,
    ) -> Result<Generation> {
        let mut generator = self.start_generation(seq, prompt, options, interrupt)?;
        let mut text = String::new();
        while let Some(piece) = generator.next_piece(self, interrupt)? {
            text.push_str(&piece);
        }
        Ok(generator.into_generation(text))
    }

    /// Starts generating after `full_prompt`, which is the *whole* text the sequence should hold (a
    /// conversation formatted from its start, say): only the tokens after the longest common prefix with what
    /// the sequence holds are decoded; the rest of the sequence is dropped first, as llama.cpp's server does.
    /// Returns the generator and how many tokens were reused.
    ///
    /// Raises [`Error::ContextFull`] before changing anything when the prompt does not fit.
    pub fn start_generation_reusing_prefix(
        &mut self,
        seq: SeqId,
        full_prompt: &str,
        options: GenerateOptions,
        interrupt: &mut dyn Interrupt,
    ) -> Result<(Generator, usize)> {
        self.check_seq(seq)?;
        let tokens = self.model.tokenize(full_prompt, true, true)?;
        self.start_generation_reusing_prefix_tokens(seq, &tokens, options, interrupt)
    }

    /// [`Context::start_generation_reusing_prefix`] with the whole sequence already tokenized (a chat
    /// tokenized by [`Model::tokenize_chat`], say).
    pub fn start_generation_reusing_prefix_tokens(
        &mut self,
        seq: SeqId,
        tokens: &[LlamaToken],
        options: GenerateOptions,
        interrupt: &mut dyn Interrupt,
    ) -> Result<(Generator, usize)> {
        self.start_generation_reusing_prefix_at(seq, tokens, &[], options, interrupt)
    }

    /// [`Context::start_generation_reusing_prefix_tokens`] where `boundaries` are the token counts at which
    /// the prompt's messages end (see [`Model::chat_message_ends`]): where the context keeps checkpoints, it
    /// takes one at each of them it decodes, so that a later edit of the history after one of them (the
    /// system prompt's end, say) decodes again only from there.
    pub(crate) fn start_generation_reusing_prefix_at(
        &mut self,
        seq: SeqId,
        tokens: &[LlamaToken],
        boundaries: &[usize],
        options: GenerateOptions,
        interrupt: &mut dyn Interrupt,
    ) -> Result<(Generator, usize)> {
        self.check_seq(seq)?;
        let held = &self.sequences[seq as usize];
        let mut reused = held.iter().zip(tokens).take_while(|(a, b)| a == b).count();
        if tokens.len() > self.capacity_per_sequence {
            // Reported as things stand (nothing was dropped): what the sequence holds now, and the tokens
            // that would follow the prefix it shares with the prompt.
            return Err(self.full(tokens.len() - reused, held.len()));
        }
        options.sampling.validate()?;
        self.model.check_tokens(tokens)?;
        if reused < held.len() && reused < self.exact_floor(seq) {
            // The memory cannot be cut back to the common prefix (recurrent state): go back to the nearest
            // checkpoint below it (or the start) and decode the rest in one go with the new tokens.
            reused = self.nearest_checkpoint(seq, reused);
        }
        self.truncate(seq, reused)?;
        let generator = Generator::start_tokens_at(
            self,
            seq,
            &tokens[reused..],
            boundaries,
            options,
            interrupt,
        )?;
        Ok((generator, reused))
    }

    /// [`Context::start_generation_reusing_prefix`] run to the end; returns the generation and how many
    /// tokens were reused.
    pub fn generate_reusing_prefix(
        &mut self,
        seq: SeqId,
        full_prompt: &str,
        options: GenerateOptions,
        interrupt: &mut dyn Interrupt,
    ) -> Result<(Generation, usize)> {
        let (mut generator, reused) =
            self.start_generation_reusing_prefix(seq, full_prompt, options, interrupt)?;
        let mut text = String::new();
        while let Some(piece) = generator.next_piece(self, interrupt)? {
            text.push_str(&piece);
        }
        Ok((generator.into_generation(text), reused))
    }

    /// Starts the assistant's answer to `messages` on sequence `seq`: the conversation is formatted with the
    /// model's chat template (each message's content as plain text, so no message can forge a turn of another
    /// role: [`Model::tokenize_chat`]) and only what differs from what the sequence holds is decoded, as in
    /// [`Context::start_generation_reusing_prefix_tokens`]. Give it the whole conversation each time, the
    /// previous answers included: the sequence then holds exactly the formatted conversation and the answer,
    /// never a turn twice. Returns the generator and how many tokens were reused.
    pub fn start_chat(
        &mut self,
        seq: SeqId,
        messages: &[ChatMessage],
        options: GenerateOptions,
        interrupt: &mut dyn Interrupt,
    ) -> Result<(Generator, usize)> {
        self.check_seq(seq)?;
        if messages.is_empty() {
            return Err(Error::invalid(
                "messages",
                "at least one message",
                "an empty list",
            ));
        }
        let tokens = self.model.tokenize_chat(messages, true, true)?;
        let boundaries = if self.checkpoint_layout().is_some() {
            self.model.chat_message_ends(messages, &tokens)?
        } else {
            Vec::new()
        };
        self.start_generation_reusing_prefix_at(seq, &tokens, &boundaries, options, interrupt)
    }

    /// [`Context::start_chat`] run to the end; returns the answer and how many tokens were reused.
    pub fn chat(
        &mut self,
        seq: SeqId,
        messages: &[ChatMessage],
        options: GenerateOptions,
        interrupt: &mut dyn Interrupt,
    ) -> Result<(Generation, usize)> {
        let (mut generator, reused) = self.start_chat(seq, messages, options, interrupt)?;
        let mut text = String::new();
        while let Some(piece) = generator.next_piece(self, interrupt)? {
            text.push_str(&piece);
        }
        Ok((generator.into_generation(text), reused))
    }

    pub(crate) fn tokenize_prompt(&self, seq: SeqId, prompt: &str) -> Result<Vec<LlamaToken>> {
        let empty = self.token_count(seq)? == 0;
        self.model.tokenize(prompt, empty, true)
    }
}

/// The error of a failed `llama_decode`.
/// What `llama_sampler_sample` does with logits in the context, done with a copy of them: every token with its
/// logit, unsorted, through the sampler, which then accepts the token it selected. `candidates` is the
/// buffer of the previous call (reused: a vocabulary's worth of candidates is too large to allocate per token).
fn sample_from_logits(
    sampler: &mut llama_cpp_2::sampling::LlamaSampler,
    logits: &[f32],
    candidates: &mut Vec<llama_cpp_2::token::data::LlamaTokenData>,
) -> Result<LlamaToken> {
    if logits.is_empty() {
        return Err(Error::Internal(
            "a pooled context lost the logits of its last decode".to_owned(),
        ));
    }
    candidates.clear();
    candidates.extend(logits.iter().enumerate().map(|(id, &logit)| {
        llama_cpp_2::token::data::LlamaTokenData::new(
            LlamaToken(i32::try_from(id).expect("vocabulary ids fit in i32")),
            logit,
            0.0,
        )
    }));
    let mut array =
        llama_cpp_2::token::data_array::LlamaTokenDataArray::new(std::mem::take(candidates), false);
    sampler.apply(&mut array);
    let selected = array.selected_token();
    *candidates = array.data;
    let token =
        selected.ok_or_else(|| Error::Internal("the sampler selected no token".to_owned()))?;
    sampler.accept(token);
    Ok(token)
}

/// Bytes of one KV cell (K and V of every layer) of a plain attention cache of `model` with `params`.
pub(crate) fn kv_bytes_per_cell(model: &Model, params: &ContextParams) -> usize {
    let llama = &model.inner.llama;
    let heads = llama.n_head().max(1) as usize;
    let width = (llama.n_embd().max(0) as usize) * llama.n_head_kv() as usize / heads;
    let row = |t: crate::params::KvType| t.row_bytes(width);
    llama.n_layer() as usize * (row(params.type_k) + row(params.type_v))
}

/// A llama.cpp context over `model` with `params` (validated by the caller).
pub(crate) fn create_cell(model: &Model, params: &ContextParams) -> Result<ContextCell> {
    create_cell_with(model, params, false)
}

/// As [`create_cell`]; with `unified`, the sequences share one KV cache of `n_ctx` cells instead of a stream
/// of `n_ctx / n_seq_max` cells each (a pool's shared cache: the Context API never makes one itself, as its
/// states and room checks are per stream).
pub(crate) fn create_cell_with(
    model: &Model,
    params: &ContextParams,
    unified: bool,
) -> Result<ContextCell> {
    let backend = backend()?;
    clear_recent_log();
    let llama_params = params.to_llama().with_kv_unified(unified);
    let _creating = CONTEXT_CREATION
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    ContextCell::try_new(Arc::clone(&model.inner), |inner| {
        inner
            .llama
            .new_context(backend, llama_params)
            .map_err(|e| Error::ContextCreate {
                reason: take_recent_log(&format!(
                    "llama.cpp returned no context ({e}); usually not enough memory for n_ctx={}",
                    params.n_ctx
                )),
            })
    })
}

fn decode_failure(e: llama_cpp_2::DecodeError) -> Error {
    let (code, reason) = decode_failure_parts(e);
    Error::Decode { code, reason }
}

/// llama.cpp's code of a failed decode and what it means.
pub(crate) fn decode_failure_parts(e: llama_cpp_2::DecodeError) -> (i32, String) {
    match e {
        llama_cpp_2::DecodeError::NoKvCacheSlot => {
            (1, "no free KV cache slot for the batch".to_owned())
        }
        llama_cpp_2::DecodeError::NTokensZero => {
            (-1, "llama.cpp rejected the batch as invalid".to_owned())
        }
        llama_cpp_2::DecodeError::Unknown(code) => {
            (code, "llama.cpp failed to compute the batch".to_owned())
        }
    }
}

/// What [`Context::generate`] is asked to do.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Most tokens to generate; 0 only encodes the prompt.
    pub max_tokens: usize,
    /// How to pick tokens.
    pub sampling: SamplingParams,
    /// Strings that end the generation; they are not part of the returned text.
    pub stop: Vec<String>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: crate::sampling::DEFAULT_MAX_TOKENS,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
        }
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced an end-of-generation token.
    EndOfGeneration,
    /// A stop string appeared.
    StopString,
    /// `max_tokens` were generated.
    MaxTokens,
    /// The sequence is full.
    ContextFull,
}

impl StopReason {
    /// "eog", "stop", "length" or "context_full".
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::EndOfGeneration => "eog",
            StopReason::StopString => "stop",
            StopReason::MaxTokens => "length",
            StopReason::ContextFull => "context_full",
        }
    }
}

/// Counts and times of one generation.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct GenerationStats {
    /// Prompt tokens decoded.
    pub prompt_tokens: usize,
    /// Tokens the sequence held when generation started: what the answer follows (for a chat, the whole
    /// formatted conversation). Those beyond `prompt_tokens` were not decoded by this call: the sequence
    /// already held them, or they were restored from a prefix cache.
    pub context_tokens: usize,
    /// Seconds spent decoding the prompt.
    pub prompt_seconds: f64,
    /// Tokens generated (all of them stay in the context).
    pub generated_tokens: usize,
    /// Seconds spent generating.
    pub generation_seconds: f64,
    /// Whole turns (a user message and its answer) a manager's chat turn dropped from the start of the
    /// history to make room (its overflow policy); 0 for everything else.
    pub dropped_turns: usize,
}

impl GenerationStats {
    /// Prompt tokens per second.
    pub fn prompt_tokens_per_second(&self) -> f64 {
        rate(self.prompt_tokens, self.prompt_seconds)
    }

    /// Generated tokens per second.
    pub fn generation_tokens_per_second(&self) -> f64 {
        rate(self.generated_tokens, self.generation_seconds)
    }
}

fn rate(n: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        n as f64 / seconds
    } else {
        0.0
    }
}

/// The result of [`Context::generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The generated text, without the stop string.
    pub text: String,
    /// Every generated token, in order (including an end-of-generation token and the tokens of a stop
    /// string: they are in the context too).
    pub tokens: Vec<LlamaToken>,
    /// Why it ended.
    pub stop_reason: StopReason,
    /// Counts and times.
    pub stats: GenerationStats,
}

/// What the unit tests of this module tree share: the real test model and greedy options.
#[cfg(test)]
pub(crate) mod test_support {
    use super::GenerateOptions;
    use crate::{Model, ModelParams, SamplingParams};

    /// `$LLAMA_SESSIONS_MODEL`, or the default model in the user cache.
    pub(crate) fn test_model() -> Model {
        let path = std::env::var_os("LLAMA_SESSIONS_MODEL")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                let home = std::env::var_os("HOME").expect("HOME");
                std::path::PathBuf::from(home)
                    .join(".cache/llama-sessions/models/SmolLM2-135M-Instruct.Q4_1.gguf")
            });
        Model::load(path, &ModelParams::default()).expect("the test model")
    }

    pub(crate) fn greedy(max_tokens: usize) -> GenerateOptions {
        GenerateOptions {
            max_tokens,
            sampling: SamplingParams::greedy(),
            stop: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::test_support::{greedy as options, test_model};

    /// Plants a cell at position -5 in sequence `seq` the way a forged state did before states were checked:
    /// straight through llama.cpp, bypassing `replace_sequence`.
    fn plant_negative_cell(ctx: &mut Context, seq: SeqId) {
        let mut state = vec![0; ctx.sequence_state_len(seq)];
        ctx.write_sequence_state(seq, &mut state).unwrap();
        // Magic, sequence id, stream count, the zero counts of the streams before this one, its count.
        let first_cell = 12 + 4 * (seq as usize + 1);
        state[first_cell..first_cell + 4].copy_from_slice(&(-5i32).to_le_bytes());
        // SAFETY: the bytes are llama.cpp's own state of this very sequence with one position changed; the
        // layout is intact, so the reader stays within the slice (this is the planting the checks prevent).
        let accepted = ctx.llama.with_mut(|c| unsafe {
            c.state_seq_set_data_ext(&state, seq as i32, LlamaStateSeqFlags::empty())
        });
        assert!(accepted);
    }

    #[test]
    fn reset_frees_cells_the_bookkeeping_does_not_know() {
        let model = test_model();
        let params = ContextParams {
            n_ctx: 256,
            n_batch: 32,
            ..ContextParams::default()
        };
        let mut ctx = Context::new(&model, params).unwrap();
        ctx.generate(0, "Hello there", options(0), &mut NeverInterrupt)
            .unwrap();
        let held = ctx.token_count(0).unwrap();
        plant_negative_cell(&mut ctx, 0);
        assert_eq!(ctx.llama_cell_count(0).unwrap(), held);
        // Removing by range keeps the cell at -5: that is what a reset by ranges alone left behind.
        ctx.llama
            .with_mut(|c| c.clear_kv_cache_seq(None, None, None))
            .unwrap();
        assert_eq!(ctx.llama_cell_count(0).unwrap(), 1);
        ctx.reset();
        assert_eq!(ctx.llama_cell_count(0).unwrap(), 0);
        assert_eq!(ctx.token_count(0).unwrap(), 0);
    }

    #[test]
    fn a_sequence_that_disagrees_with_its_bookkeeping_is_emptied_alone() {
        let model = test_model();
        let params = ContextParams {
            n_ctx: 512,
            n_batch: 32,
            n_seq_max: 2,
            ..ContextParams::default()
        };
        let mut ctx = Context::new(&model, params).unwrap();
        ctx.generate(0, "First sequence", options(0), &mut NeverInterrupt)
            .unwrap();
        ctx.generate(1, "Second sequence here", options(0), &mut NeverInterrupt)
            .unwrap();
        let first = ctx.tokens(0).unwrap().to_vec();
        ctx.sequences[1].pop();
        assert!(matches!(ctx.verify(1), Err(Error::Internal(_))));
        assert_eq!(ctx.tokens(0).unwrap(), first.as_slice());
        assert_eq!(ctx.llama_cell_count(0).unwrap(), first.len());
        assert_eq!(ctx.token_count(1).unwrap(), 0);
        assert_eq!(ctx.llama_cell_count(1).unwrap(), 0);
    }

    /// `ContextParams::allocated` predicts llama.cpp's rounding and clamping, which old session headers (that
    /// recorded the requested sizes) are normalized with; a llama.cpp with other rules fails here.
    #[test]
    fn allocated_params_are_what_llama_cpp_allocates() {
        let model = test_model();
        let cases = [
            (32, 512, 1, 256, 32),
            (300, 512, 1, 512, 300),
            (300, 64, 1, 512, 64),
            (512, 512, 1, 512, 512),
            (513, 1024, 1, 768, 513),
            (1024, 512, 2, 1024, 512),
            (1000, 2000, 2, 1024, 1000),
            (512, 64, 4, 1024, 64),
            (300, 300, 3, 768, 300),
        ];
        for (n_ctx, n_batch, n_seq_max, cells, batch) in cases {
            let requested = ContextParams {
                n_ctx,
                n_batch,
                n_seq_max,
                ..ContextParams::default()
            };
            let ctx = Context::new(&model, requested.clone()).unwrap();
            assert_eq!((ctx.params().n_ctx, ctx.params().n_batch), (cells, batch));
            assert_eq!(ctx.params(), &requested.allocated(), "{requested:?}");
            assert_eq!(ctx.capacity(), (cells / n_seq_max) as usize);
            // What was allocated, asked for again, allocates the same.
            let again = Context::new(&model, ctx.params().clone()).unwrap();
            assert_eq!(again.params(), ctx.params());
        }
    }

    #[test]
    fn context_can_move_between_threads() {
        fn assert_send<T: Send>() {}
        assert_send::<Context>();
        assert_send::<Generator>();
    }
}
