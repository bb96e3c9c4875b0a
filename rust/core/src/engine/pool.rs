//! A pool of Contexts that share one llama.cpp context, one sequence each, and a decoder thread that decodes
//! what they ask for together: continuous batching under the unchanged [`Context`] API.
//!
//! A pooled Context keeps its own bookkeeping (tokens, positions, checkpoints, chunk digests) and sends each
//! decode to the pool ([`PooledSequence::decode`]), which waits for the answer. The decoder thread gathers
//! the requests of every thread that is decoding (it waits a moment, [`GATHER`], for the sequences that got
//! logits in the last step and are sampling their next token), builds one batch: every single-token request
//! whole, then the longer ones (prompts) split between them within `prompt_tokens_per_step` while anyone is
//! generating (the whole batch otherwise), decodes it, and hands each finished request the logits of its
//! last token, copied, so that the Context samples from them in its own thread with its own sampler. A
//! request that did not fit stays queued and goes on in the next step; its Context waits until all its
//! tokens are in.
//!
//! Memory ([`PoolMemory`]): either each sequence is its own KV stream of the session's `n_ctx` cells
//! (llama.cpp's split cache), or all sequences share one cache of a cell budget (llama.cpp's unified cache),
//! which a ledger here divides: a sequence holds or reserves cells before it decodes into them, so one
//! sequence's growth never fails another's decode midway. Either way a pooled Context's states are byte for
//! byte those of a plain Context with the same parameters (a unified cache's are put back in position order,
//! [`crate::llama_state::into_position_order`]). llama.cpp puts sequences with consecutive ids in one
//! micro-batch, so the pool hands out the lowest free id first.

use std::collections::BTreeSet;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;

use crate::context::{decode_failure_parts, Context, ContextCell};
use crate::error::{Error, Result};
use crate::model::{MemoryKind, Model};
use crate::params::ContextParams;
use crate::sync::lock;

/// Most prompt tokens a [`crate::SessionManager`] with batching reads in one step while a session is
/// generating: a step of 128 tokens takes about 0.4 s with the 135M test model on two cores, so a long
/// prompt delays the others' next token by about that much, not by a whole `n_batch`.
pub const DEFAULT_PROMPT_TOKENS_PER_STEP: usize = 128;

/// How long a step waits for the sequences that got logits in the last step to ask for their next token
/// (they are sampling it); a sequence that takes longer joins the step after.
pub(crate) const GATHER: Duration = Duration::from_millis(3);

/// Where llama.cpp's state of one sequence gives the sequence's id (after the io magic), and then the KV
/// cache's stream count; a cell count per stream follows.
const SEQ_AT: usize = 4;
const STREAMS_AT: usize = 8;

/// How a pool's sequences hold their KV cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PoolMemory {
    /// Each sequence has a stream of its own of `n_ctx` cells, allocated whether used or not (llama.cpp's
    /// split cache): the fastest, as each token attends its own sequence's cells only.
    #[default]
    PerSequence,
    /// All sequences share `cells` cells (llama.cpp's unified cache): memory follows what the sequences
    /// hold, up to this budget, and no sequence holds more than `n_ctx`. Each token's attention walks every
    /// cell in use, masked to its own sequence's, so a step costs more as the cache fills.
    Shared {
        /// Cells all sequences share.
        cells: u32,
    },
}

/// The cells each sequence of a shared cache holds or reserved (its tokens, and what a turn reserved for
/// those to come): every decode and restore reserves first, so the sum never exceeds the budget and
/// llama.cpp always finds the cells a reserved decode needs.
struct Ledger {
    budget: usize,
    reserved: Vec<usize>,
}

impl Ledger {
    /// Makes `seq` hold or reserve at least `cells`, or says why it cannot.
    fn reserve(&mut self, seq: i32, cells: usize) -> Result<()> {
        let mine = self.reserved[seq as usize];
        if cells <= mine {
            return Ok(());
        }
        let used: usize = self.reserved.iter().sum();
        let available = self.budget - used;
        if cells - mine > available {
            return Err(Error::KvBudgetFull {
                requested: cells - mine,
                available,
                held: mine,
                budget: self.budget,
                sequences: self.reserved.iter().filter(|&&r| r > 0).count() - usize::from(mine > 0),
            });
        }
        self.reserved[seq as usize] = cells;
        Ok(())
    }
}

/// What a decode request gets back: its logits buffer holding the logits of its last token (when asked for),
/// or why it failed.
type Reply = Result<Option<Vec<f32>>>;

/// One Context's decode: `tokens` after the `first_position` tokens its sequence holds.
struct Request {
    seq: i32,
    tokens: Vec<LlamaToken>,
    first_position: usize,
    want_logits: bool,
    /// The Context's buffer for the logits (sent back filled).
    logits: Vec<f32>,
    /// Tokens already decoded by earlier steps.
    done: usize,
    reply: SyncSender<Reply>,
}

#[derive(Default)]
struct Queue {
    pending: Vec<Request>,
    /// The pool and every pooled Context are gone: the decoder thread stops.
    closed: bool,
    /// Why the decoder thread stopped (a panic), for the requests that come after.
    stopped: Option<String>,
    /// Test hook: the decoder panics at its next step.
    panic_requested: bool,
    /// The decoder took requests and has not answered them all yet.
    stepping: bool,
    /// A Context is decoding in its own thread (it was alone: see [`PooledSequence::decode`]).
    direct: bool,
    /// The sequences that got logits in the latest step: they are expected back with their next token.
    active: Vec<i32>,
}

/// What the pool's threads share.
pub(crate) struct PoolShared {
    llama: Mutex<ContextCell>,
    free: Mutex<BTreeSet<i32>>,
    queue: Mutex<Queue>,
    wake: Condvar,
    n_batch: usize,
    prompt_tokens_per_step: usize,
    steps: Mutex<PoolStats>,
    sequences: u32,
    /// The shared context's threads (which compute lane its decodes take, see `crate::compute`).
    n_threads: u32,
    /// For a shared cache ([`PoolMemory::Shared`]): who holds its cells.
    ledger: Option<Mutex<Ledger>>,
    /// Bytes of the per-cell extension of the model's cache records (for reordering a shared cache's states).
    cell_ext_bytes: usize,
}

/// Counters of a pool's decoder (for tests and benchmarks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// llama.cpp decode calls.
    pub steps: u64,
    /// Tokens decoded.
    pub tokens: u64,
    /// Most sequences in one step.
    pub max_sequences_in_step: usize,
}

/// Keeps the decoder thread running while the pool or any of its Contexts exists.
struct PoolOwner {
    shared: Arc<PoolShared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for PoolOwner {
    fn drop(&mut self) {
        lock(&self.shared.queue).closed = true;
        self.shared.wake.notify_all();
        if let Some(thread) = lock(&self.thread).take() {
            // A panic there was already reported to every request; nothing is left to tell.
            let _ = thread.join();
        }
    }
}

/// Contexts that share one llama.cpp context and are decoded together. `Send + Sync`; cloning shares it.
#[derive(Clone)]
pub struct ContextPool {
    owner: Arc<PoolOwner>,
    model: Model,
    /// What each pooled Context reports: the session's `n_ctx` and `n_batch` as allocated, one sequence.
    params: ContextParams,
    sequences: u32,
}

impl std::fmt::Debug for ContextPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContextPool")
            .field("params", &self.params)
            .field("sequences", &self.sequences)
            .finish_non_exhaustive()
    }
}

impl ContextPool {
    /// A pool of `sequences` Contexts, each as [`Context::new`] with `params` would make it (`params.n_seq_max`
    /// must be 1): one llama.cpp context of `sequences` streams of `params.n_ctx` cells each, and at most
    /// `prompt_tokens_per_step` prompt tokens per step while a sequence is generating (0: `n_batch`).
    pub fn new(
        model: &Model,
        params: ContextParams,
        sequences: u32,
        prompt_tokens_per_step: usize,
    ) -> Result<ContextPool> {
        ContextPool::with_memory(
            model,
            params,
            sequences,
            prompt_tokens_per_step,
            PoolMemory::PerSequence,
        )
    }

    /// As [`ContextPool::new`], with the sequences' cells laid out as `memory` says. With
    /// [`PoolMemory::Shared`], a decode or restore that would take the cache past its budget fails with
    /// [`Error::KvBudgetFull`] before llama.cpp sees it (the Context is unchanged).
    pub fn with_memory(
        model: &Model,
        params: ContextParams,
        sequences: u32,
        prompt_tokens_per_step: usize,
        memory: PoolMemory,
    ) -> Result<ContextPool> {
        params.validate(model)?;
        if model.memory_kind() != MemoryKind::Attention {
            return Err(Error::invalid(
                "model",
                "a model whose memory is one plain KV cache (a pool converts its states to a single \
                 context's)",
                format!("{:?} memory", model.memory_kind().as_str()),
            ));
        }
        if params.n_seq_max != 1 {
            return Err(Error::invalid(
                "n_seq_max",
                "1 (each pooled context is one sequence of the pool)",
                params.n_seq_max,
            ));
        }
        let one = params.allocated();
        let cells = match memory {
            PoolMemory::PerSequence => one.n_ctx.checked_mul(sequences).ok_or_else(|| {
                Error::invalid(
                    "max_live",
                    format!("max_live * n_ctx below 2^32 (n_ctx={})", one.n_ctx),
                    sequences,
                )
            })?,
            // llama.cpp rounds a context's cells up to a multiple of 256; so does the budget.
            PoolMemory::Shared { cells } => {
                let most = one.n_ctx.saturating_mul(sequences);
                if cells == 0 || cells > most {
                    return Err(Error::invalid(
                        "kv_cells",
                        format!(
                            "1 <= kv_cells <= max_live * n_ctx = {most} (more cells than every sequence can \
                             hold would never be used)"
                        ),
                        cells,
                    ));
                }
                cells.next_multiple_of(256).min(most)
            }
        };
        let total = ContextParams {
            n_ctx: cells,
            n_seq_max: sequences,
            ..params.clone()
        };
        let unified = matches!(memory, PoolMemory::Shared { .. });
        // Each sequence's n_ctx was checked against the model above; the total is their sum.
        if !(1..=crate::params::MAX_SEQUENCES).contains(&sequences) {
            return Err(Error::invalid(
                "max_live",
                format!("1 <= max_live <= {}", crate::params::MAX_SEQUENCES),
                sequences,
            ));
        }
        if (params.n_batch as usize) < sequences as usize {
            return Err(Error::invalid(
                "n_batch",
                format!("n_batch >= max_live={sequences} (every sequence's next token fits in one step)"),
                params.n_batch,
            ));
        }
        let cell = crate::context::create_cell_with(model, &total, unified)?;
        let (n_ctx, n_batch) = {
            let llama = cell.borrow_dependent();
            (
                llama.n_ctx(),
                llama.n_batch().min(llama.n_ubatch()) as usize,
            )
        };
        let (params, ledger) = if unified {
            let ledger = Ledger {
                budget: n_ctx as usize,
                reserved: vec![0; sequences as usize],
            };
            let params = ContextParams {
                n_ctx: one.n_ctx,
                n_batch: n_batch as u32,
                ..params
            };
            (params, Some(Mutex::new(ledger)))
        } else {
            let params = ContextParams {
                n_ctx: n_ctx / sequences,
                n_batch: n_batch as u32,
                ..params
            };
            (params, None)
        };
        let prompt_tokens_per_step = match prompt_tokens_per_step {
            0 => n_batch,
            n => n.min(n_batch),
        };
        let shared = Arc::new(PoolShared {
            llama: Mutex::new(cell),
            free: Mutex::new((0..sequences as i32).collect()),
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            n_batch,
            prompt_tokens_per_step,
            steps: Mutex::new(PoolStats::default()),
            sequences,
            n_threads: params.n_threads,
            ledger,
            cell_ext_bytes: crate::context::cell_ext_bytes(model),
        });
        let decoder = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("llama-sessions-pool".to_owned())
            .spawn(move || {
                let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run_decoder(&decoder)
                }));
                if let Err(panic) = caught {
                    let reason = super::panic_message(panic.as_ref());
                    let mut queue = lock(&decoder.queue);
                    let message = format!("the context pool's decoder thread stopped: {reason}");
                    for request in queue.pending.drain(..) {
                        let _ = request.reply.send(Err(Error::Internal(message.clone())));
                    }
                    queue.stopped = Some(message);
                }
            })
            .map_err(|e| Error::Internal(format!("could not start the pool's thread: {e}")))?;
        Ok(ContextPool {
            owner: Arc::new(PoolOwner {
                shared,
                thread: Mutex::new(Some(thread)),
            }),
            model: model.clone(),
            params,
            sequences,
        })
    }

    /// The parameters each pooled Context has (`n_ctx` its own cells).
    pub fn params(&self) -> &ContextParams {
        &self.params
    }

    /// How many sequences the pool has.
    pub fn sequences(&self) -> u32 {
        self.sequences
    }

    /// How many are free.
    pub fn free_sequences(&self) -> usize {
        lock(&self.owner.shared.free).len()
    }

    /// How the pool's sequences hold their cells, a shared budget as allocated (rounded up to a multiple of
    /// 256).
    pub fn memory(&self) -> PoolMemory {
        match &self.owner.shared.ledger {
            Some(ledger) => PoolMemory::Shared {
                cells: u32::try_from(lock(ledger).budget).expect("llama.cpp's n_ctx is a u32"),
            },
            None => PoolMemory::PerSequence,
        }
    }

    /// KV cells the pool allocated: `n_ctx` per sequence, or the shared budget (rounded up to a multiple of
    /// 256 as llama.cpp allocates it).
    pub fn cells(&self) -> usize {
        match &self.owner.shared.ledger {
            Some(ledger) => lock(ledger).budget,
            None => self.params.n_ctx as usize * self.sequences as usize,
        }
    }

    /// Bytes of the KV cache the pool allocated (all its cells, used or not).
    pub fn kv_cache_bytes(&self) -> usize {
        self.cells() * crate::context::kv_bytes_per_cell(&self.model, &self.params)
    }

    /// For a shared cache: cells that no sequence holds or reserved (None with a stream per sequence).
    pub fn free_cells(&self) -> Option<usize> {
        self.owner.shared.ledger.as_ref().map(|ledger| {
            let ledger = lock(ledger);
            ledger.budget - ledger.reserved.iter().sum::<usize>()
        })
    }

    /// Counters of the decoder so far.
    pub fn stats(&self) -> PoolStats {
        *lock(&self.owner.shared.steps)
    }

    /// Makes the decoder thread panic at its next step (a test hook for the promise that a panic there
    /// becomes [`Error::Internal`] for every Context of the pool, never an abort or a hang).
    #[doc(hidden)]
    pub fn panic_decoder(&self) {
        lock(&self.owner.shared.queue).panic_requested = true;
    }

    /// An empty Context on the lowest free sequence, or None when every sequence is taken (a Context gives
    /// its sequence back when it is dropped, emptied).
    pub fn try_context(&self) -> Result<Option<Context>> {
        let Some(seq) = lock(&self.owner.shared.free).pop_first() else {
            return Ok(None);
        };
        let pooled = PooledSequence {
            owner: Arc::clone(&self.owner),
            seq,
            batch: LlamaBatch::new(self.owner.shared.n_batch, 1),
        };
        Context::pooled(&self.model, self.params.clone(), pooled).map(Some)
    }
}

/// One sequence of a pool, owned by one Context: emptied and given back when dropped.
pub struct PooledSequence {
    owner: Arc<PoolOwner>,
    seq: i32,
    /// For the decodes this sequence runs in its own thread.
    batch: LlamaBatch<'static>,
}

impl PooledSequence {
    /// llama.cpp's id of this sequence in the shared context.
    pub(crate) fn seq(&self) -> i32 {
        self.seq
    }

    /// How many bytes longer llama.cpp's state of this sequence is than a context of its own would write: the
    /// cell counts of the pool's other (empty) streams; none in a shared cache (one stream).
    pub(crate) fn extra_stream_bytes(&self) -> usize {
        if self.owner.shared.ledger.is_some() {
            return 0;
        }
        4 * (self.owner.shared.sequences as usize - 1)
    }

    /// Makes this sequence hold or reserve at least `cells` of a shared cache ([`Error::KvBudgetFull`] if the
    /// others hold the rest); nothing to do with a stream of its own (the Context checks its `n_ctx`).
    pub(crate) fn reserve_cells(&self, cells: usize) -> Result<()> {
        match &self.owner.shared.ledger {
            Some(ledger) => lock(ledger).reserve(self.seq, cells),
            None => Ok(()),
        }
    }

    /// Cells of a shared cache this sequence holds or reserved (0 with a stream of its own).
    pub(crate) fn reserved_cells(&self) -> usize {
        self.owner
            .shared
            .ledger
            .as_ref()
            .map_or(0, |ledger| lock(ledger).reserved[self.seq as usize])
    }

    /// Gives back what this sequence reserved beyond `held`, the cells it holds.
    pub(crate) fn release_cells(&self, held: usize) {
        if let Some(ledger) = &self.owner.shared.ledger {
            let mut ledger = lock(ledger);
            let mine = &mut ledger.reserved[self.seq as usize];
            *mine = (*mine).min(held);
        }
    }

    /// `state`, llama.cpp's state of this sequence in the pool, as a context of its own writes it, into
    /// `out`: sequence id 0, the stream count 1 and this stream's section, without the other streams' zero
    /// cell counts (a shared cache's one stream, with its cells put in position order).
    pub(crate) fn to_own_streams(&self, state: &[u8], out: &mut [u8]) -> Result<()> {
        if self.owner.shared.ledger.is_some() {
            return self.reorder(state, self.seq, 0, out);
        }
        let n = self.owner.shared.sequences as usize;
        let k = self.seq as usize;
        let before = STREAMS_AT + 4 + 4 * k;
        let after = 4 * (n - k - 1);
        let word = |at: usize| u32::from_le_bytes(state[at..at + 4].try_into().expect("4 bytes"));
        let well_formed = state.len() >= before + 4 + after
            && out.len() + self.extra_stream_bytes() == state.len()
            && word(SEQ_AT) as usize == k
            && word(STREAMS_AT) as usize == n
            && (0..k).all(|s| word(STREAMS_AT + 4 + 4 * s) == 0)
            && state[state.len() - after..].iter().all(|&b| b == 0);
        if !well_formed {
            return Err(Error::Internal(format!(
                "llama.cpp's state of sequence {k} of the pool does not list {n} streams with only this one \
                 holding cells"
            )));
        }
        out[..SEQ_AT].copy_from_slice(&state[..SEQ_AT]);
        out[SEQ_AT..STREAMS_AT].copy_from_slice(&0u32.to_le_bytes());
        out[STREAMS_AT..STREAMS_AT + 4].copy_from_slice(&1u32.to_le_bytes());
        out[STREAMS_AT + 4..].copy_from_slice(&state[before..state.len() - after]);
        relabel_cells(&mut out[STREAMS_AT + 4..], self.seq, 0)
    }

    /// `state`, a context of its own's state of its sequence 0 (checked: one stream), as the pool's state of
    /// this sequence: its id, and the other streams listed with no cells.
    pub(crate) fn to_pool_streams(&self, state: &[u8]) -> Result<Vec<u8>> {
        if self.owner.shared.ledger.is_some() {
            let mut pooled = vec![0; state.len()];
            self.reorder(state, 0, self.seq, &mut pooled)?;
            return Ok(pooled);
        }
        let n = self.owner.shared.sequences as usize;
        let k = self.seq as usize;
        if state.len() < STREAMS_AT + 4 || state[STREAMS_AT..STREAMS_AT + 4] != 1u32.to_le_bytes() {
            return Err(Error::Internal(
                "a checked state of one sequence does not have one stream".to_owned(),
            ));
        }
        let mut pooled = Vec::with_capacity(state.len() + self.extra_stream_bytes());
        pooled.extend_from_slice(&state[..SEQ_AT]);
        pooled.extend_from_slice(&(k as u32).to_le_bytes());
        pooled.extend_from_slice(&(n as u32).to_le_bytes());
        pooled.extend(std::iter::repeat_n(0u8, 4 * k));
        pooled.extend_from_slice(&state[STREAMS_AT + 4..]);
        pooled.extend(std::iter::repeat_n(0u8, 4 * (n - k - 1)));
        let section = STREAMS_AT + 4 + 4 * k;
        relabel_cells(&mut pooled[section..], 0, self.seq)?;
        Ok(pooled)
    }

    /// A shared cache's state of sequence `from` as one of sequence `to` with its cells in position order,
    /// into `out` (as long as `state`).
    fn reorder(&self, state: &[u8], from: i32, to: i32, out: &mut [u8]) -> Result<()> {
        crate::llama_state::into_position_order(state, self.owner.shared.cell_ext_bytes, from, to, out)
            .map_err(|reason| {
                Error::Internal(format!(
                    "a state of sequence {from} of the pool's shared cache could not be put in position \
                     order: {reason}"
                ))
            })
    }

    /// Runs `f` on the shared llama.cpp context, under its lock (no decode runs meanwhile).
    pub(crate) fn with_llama<R>(&self, f: impl FnOnce(&mut ContextCell) -> R) -> R {
        f(&mut lock(&self.owner.shared.llama))
    }

    /// Decodes `tokens` after the `first_position` tokens this sequence holds, in one or more steps of the
    /// pool, and returns the logits of the last token if `want_logits`. On failure llama.cpp may have kept
    /// some of the tokens: the caller cuts the sequence back.
    ///
    /// A sequence that is alone (nothing queued, no step in progress, no other sequence got logits in the
    /// latest step) decodes in its caller's thread, as a context of its own does: handing each token to the
    /// decoder thread and back costs a solo turn about half its speed on two cores (the OpenMP workers of
    /// the decoding thread spin while the other thread samples). As soon as another sequence asks, the
    /// decoder thread batches them.
    pub(crate) fn decode(
        &mut self,
        tokens: &[LlamaToken],
        first_position: usize,
        mut logits: Option<&mut Vec<f32>>,
    ) -> Result<()> {
        let want_logits = logits.is_some();
        // In a shared cache the cells are this sequence's before llama.cpp is asked to fill them.
        self.reserve_cells(first_position + tokens.len())?;
        let shared = Arc::clone(&self.owner.shared);
        let (reply, answer): (SyncSender<Reply>, Receiver<Reply>) = mpsc::sync_channel(1);
        {
            let mut queue = lock(&shared.queue);
            if let Some(reason) = &queue.stopped {
                return Err(Error::Internal(reason.clone()));
            }
            // (A panic asked for by the test hook must reach the decoder.)
            let alone = !queue.stepping
                && !queue.direct
                && !queue.panic_requested
                && queue.pending.is_empty()
                && queue.active.iter().all(|&s| s == self.seq);
            if alone {
                queue.direct = true;
                drop(queue);
                let decoded = self.decode_here(tokens, first_position, logits);
                let mut queue = lock(&shared.queue);
                queue.direct = false;
                queue.active = match decoded {
                    Ok(()) if want_logits => vec![self.seq],
                    _ => Vec::new(),
                };
                drop(queue);
                // The decoder may have requests that arrived meanwhile.
                shared.wake.notify_all();
                return decoded;
            }
            queue.pending.push(Request {
                seq: self.seq,
                tokens: tokens.to_vec(),
                first_position,
                want_logits,
                logits: logits
                    .as_mut()
                    .map(|out| std::mem::take(&mut **out))
                    .unwrap_or_default(),
                done: 0,
                reply,
            });
        }
        shared.wake.notify_all();
        let filled = answer.recv().unwrap_or_else(|_| {
            Err(Error::Internal(
                "the context pool's decoder thread stopped".to_owned(),
            ))
        })?;
        if let (Some(out), Some(filled)) = (logits, filled) {
            *out = filled;
        }
        Ok(())
    }
}

impl PooledSequence {
    /// One decode of `tokens` (at most `n_batch`: a Context decodes in chunks of that) in this thread.
    fn decode_here(
        &mut self,
        tokens: &[LlamaToken],
        first_position: usize,
        logits_out: Option<&mut Vec<f32>>,
    ) -> Result<()> {
        let shared = &self.owner.shared;
        let want_logits = logits_out.is_some();
        self.batch.clear();
        for (i, &token) in tokens.iter().enumerate() {
            let position = i32::try_from(first_position + i)
                .expect("positions are below n_ctx, which fits in i32");
            let logits = want_logits && i + 1 == tokens.len();
            self.batch
                .add(token, position, &[self.seq], logits)
                .map_err(|e| {
                    Error::Internal(format!("a chunk of n_batch tokens did not fit: {e}"))
                })?;
        }
        let batch = &mut self.batch;
        let mut llama = lock(&shared.llama);
        llama
            .with_dependent_mut(|_, ctx| crate::compute::decode(ctx, batch, shared.n_threads))
            .map_err(|e| {
                let (code, reason) = decode_failure_parts(e);
                Error::Decode { code, reason }
            })?;
        if let Some(out) = logits_out {
            let last = i32::try_from(tokens.len() - 1).expect("a chunk fits in i32");
            out.clear();
            out.extend_from_slice(llama.borrow_dependent().get_logits_ith(last));
        }
        drop(llama);
        let mut stats = lock(&shared.steps);
        stats.steps += 1;
        stats.tokens += tokens.len() as u64;
        stats.max_sequences_in_step = stats.max_sequences_in_step.max(1);
        Ok(())
    }
}

impl Drop for PooledSequence {
    fn drop(&mut self) {
        let shared = &self.owner.shared;
        let emptied = self.with_llama(|cell| {
            cell.with_dependent_mut(|_, ctx| {
                ctx.clear_kv_cache_seq(Some(self.seq as u32), None, None)
            })
        });
        // A sequence llama.cpp could not empty is never handed out again (nor its cells).
        if matches!(emptied, Ok(true)) {
            self.release_cells(0);
            lock(&shared.free).insert(self.seq);
        }
    }
}

/// In a stream section (its cell count, then per cell the position, the sequence-id count and the ids),
/// checks that every cell lists sequence `from` alone and makes it list `to`.
fn relabel_cells(section: &mut [u8], from: i32, to: i32) -> Result<()> {
    let refused = || {
        Error::Internal(format!(
            "a state's cells do not each list sequence {from} alone; its sequence id could not become {to}"
        ))
    };
    let count = section
        .get(..4)
        .map(|w| u32::from_le_bytes(w.try_into().expect("4 bytes")) as usize)
        .ok_or_else(refused)?;
    let cells = section.get_mut(4..4 + 12 * count).ok_or_else(refused)?;
    for cell in cells.chunks_exact_mut(12) {
        if cell[4..8] != 1u32.to_le_bytes() || cell[8..12] != from.to_le_bytes() {
            return Err(refused());
        }
        cell[8..12].copy_from_slice(&to.to_le_bytes());
    }
    Ok(())
}

/// One request's part of a step: tokens `from..to` of `requests[index]`.
struct Part {
    index: usize,
    from: usize,
    to: usize,
}

fn run_decoder(shared: &PoolShared) {
    let mut batch = LlamaBatch::new(shared.n_batch, 1);
    loop {
        let mut requests = {
            let mut queue = lock(&shared.queue);
            while queue.pending.is_empty() && !queue.closed {
                queue = shared
                    .wake
                    .wait(queue)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            if queue.pending.is_empty() {
                return;
            }
            let deadline = Instant::now() + GATHER;
            loop {
                let missing = queue
                    .active
                    .iter()
                    .any(|seq| !queue.pending.iter().any(|r| r.seq == *seq));
                let now = Instant::now();
                if !missing || now >= deadline || queue.closed {
                    break;
                }
                queue = shared
                    .wake
                    .wait_timeout(queue, deadline - now)
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .0;
            }
            if std::mem::take(&mut queue.panic_requested) {
                drop(queue);
                panic!("a panic asked for by ContextPool::panic_decoder");
            }
            queue.stepping = true;
            std::mem::take(&mut queue.pending)
        };
        requests.sort_by_key(|r| r.seq);
        let parts = plan(shared, &requests);
        batch.clear();
        let mut logits_at = Vec::with_capacity(parts.len());
        for part in &parts {
            let request = &requests[part.index];
            for i in part.from..part.to {
                let last = i + 1 == request.tokens.len();
                let position = i32::try_from(request.first_position + i)
                    .expect("positions are below n_ctx, which fits in i32");
                let logits = last && request.want_logits;
                if logits {
                    logits_at.push((part.index, batch.n_tokens()));
                }
                batch
                    .add(request.tokens[i], position, &[request.seq], logits)
                    .expect("a step holds at most n_batch tokens");
            }
        }
        let mut llama = lock(&shared.llama);
        let decoded = llama
            .with_dependent_mut(|_, ctx| crate::compute::decode(ctx, &mut batch, shared.n_threads));
        let mut replies: Vec<(usize, Reply)> = Vec::new();
        match decoded {
            Ok(()) => {
                for (index, at) in logits_at {
                    // Into the Context's own buffer: no allocation per token.
                    let mut logits = std::mem::take(&mut requests[index].logits);
                    logits.clear();
                    logits.extend_from_slice(llama.borrow_dependent().get_logits_ith(at));
                    replies.push((index, Ok(Some(logits))));
                }
                for part in &parts {
                    let request = &requests[part.index];
                    if part.to == request.tokens.len() && !request.want_logits {
                        replies.push((part.index, Ok(None)));
                    }
                }
            }
            Err(e) => {
                let (code, reason) = decode_failure_parts(e);
                for part in &parts {
                    let reason = reason.clone();
                    replies.push((part.index, Err(Error::Decode { code, reason })));
                }
            }
        }
        drop(llama);
        {
            let mut stats = lock(&shared.steps);
            stats.steps += 1;
            stats.tokens += parts.iter().map(|p| (p.to - p.from) as u64).sum::<u64>();
            stats.max_sequences_in_step = stats.max_sequences_in_step.max(parts.len());
        }
        let answered: BTreeSet<usize> = replies.iter().map(|(i, _)| *i).collect();
        let active: Vec<i32> = replies
            .iter()
            .filter(|(_, reply)| matches!(reply, Ok(Some(_))))
            .map(|(index, _)| requests[*index].seq)
            .collect();
        // Recorded before the answers go, so that a Context answered now finds itself expected.
        lock(&shared.queue).active = active;
        for (index, reply) in replies {
            let request = &requests[index];
            // A Context that stopped waiting (it cannot: `decode` blocks) would only drop the reply.
            let _ = request.reply.send(reply);
        }
        // What is left of the others goes back to the queue, ahead of anything new.
        for part in &parts {
            if !answered.contains(&part.index) {
                requests[part.index].done = part.to;
            }
        }
        let unfinished: Vec<Request> = requests
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !answered.contains(i))
            .map(|(_, r)| r)
            .collect();
        let mut queue = lock(&shared.queue);
        if !unfinished.is_empty() {
            let newer = std::mem::take(&mut queue.pending);
            queue.pending = unfinished;
            queue.pending.extend(newer);
        }
        queue.stepping = false;
    }
}

/// This step's parts: every request with one token left, whole; then the others share what is left of the
/// batch, at most `prompt_tokens_per_step` of it while a sequence is generating, split evenly (a request that
/// needs less leaves the rest to the others). Requests are sorted by sequence, and so are the parts.
fn plan(shared: &PoolShared, requests: &[Request]) -> Vec<Part> {
    let left = |r: &Request| r.tokens.len() - r.done;
    let singles = requests.iter().filter(|r| left(r) == 1).count();
    let mut budget = if singles > 0 {
        shared.prompt_tokens_per_step.min(shared.n_batch - singles)
    } else {
        shared.n_batch
    };
    let mut readers: Vec<(usize, usize)> = requests
        .iter()
        .enumerate()
        .filter(|(_, r)| left(r) > 1)
        .map(|(i, r)| (left(r), i))
        .collect();
    readers.sort_unstable();
    let mut takes = vec![0; requests.len()];
    let mut remaining_readers = readers.len();
    for (need, index) in readers {
        let share = (budget / remaining_readers).max(usize::from(budget > 0));
        let take = need.min(share);
        takes[index] = take;
        budget -= take;
        remaining_readers -= 1;
    }
    requests
        .iter()
        .enumerate()
        .filter_map(|(index, r)| {
            let take = if left(r) == 1 { 1 } else { takes[index] };
            (take > 0).then_some(Part {
                index,
                from: r.done,
                to: r.done + take,
            })
        })
        .collect()
}
