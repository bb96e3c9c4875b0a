//! The Context: llama.cpp's KV cache *and* the bookkeeping of what is in it.
//!
//! Every token that enters the KV cache goes through [`Context::append`], which takes positions from the
//! sequence's own token list and extends that list only by what llama.cpp accepted; every removal goes
//! through [`Context::truncate`] or [`Context::reset`]. No public call takes a position, so the classic
//! mistakes (re-decoding restored tokens, starting a continuation at 0, counting only the last batch) cannot
//! be written. After each change the cache is checked against the bookkeeping.

use std::sync::Arc;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;

use crate::backend::{backend, clear_recent_log, take_recent_log};
use crate::error::{Error, Result};
use crate::generation::Generator;
use crate::model::{Model, ModelInner};
use crate::params::ContextParams;
use crate::sampling::SamplingParams;

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
    pub(crate) cell: ContextCell,
    pub(crate) model: Model,
    pub(crate) params: ContextParams,
    /// The tokens in the KV cache, per sequence, in position order: token `i` sits at position `i`.
    pub(crate) sequences: Vec<Vec<LlamaToken>>,
    /// Cells available to each sequence.
    capacity_per_sequence: usize,
    /// Most tokens per decode call: `n_batch` as llama.cpp applied it (it clamps it to `n_ctx`, and aborts on
    /// a larger batch).
    chunk_len: usize,
    batch: LlamaBatch<'static>,
    pub(crate) last_logits: Option<LastLogits>,
    /// Bumped by every change of the KV cache, so that a paused token stream can tell it was overtaken.
    pub(crate) epoch: u64,
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
    /// Creates a context over `model`. The parameters are validated first (see [`ContextParams::validate`]).
    pub fn new(model: &Model, params: ContextParams) -> Result<Context> {
        params.validate(model)?;
        let backend = backend()?;
        clear_recent_log();
        let llama_params = params.to_llama();
        let creating = CONTEXT_CREATION
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let cell = ContextCell::try_new(Arc::clone(&model.inner), |inner| {
            inner
                .llama
                .new_context(backend, llama_params)
                .map_err(|e| Error::ContextCreate {
                    reason: take_recent_log(&format!(
                        "llama.cpp returned no context ({e}); usually not enough memory for n_ctx={}",
                        params.n_ctx
                    )),
                })
        })?;
        drop(creating);
        let n_ctx = cell.borrow_dependent().n_ctx() as usize;
        let chunk_len = (cell.borrow_dependent().n_batch() as usize).min(params.n_batch as usize);
        let n_seq = params.n_seq_max as usize;
        Ok(Context {
            cell,
            model: model.clone(),
            chunk_len,
            batch: LlamaBatch::new(chunk_len, 1),
            capacity_per_sequence: n_ctx / n_seq,
            sequences: vec![Vec::new(); n_seq],
            params,
            last_logits: None,
            epoch: 0,
        })
    }

    /// The model this context reads with.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The parameters the context was created with.
    pub fn params(&self) -> &ContextParams {
        &self.params
    }

    /// Most tokens one sequence can hold.
    pub fn capacity(&self) -> usize {
        self.capacity_per_sequence
    }

    /// Bytes of the KV cache this context allocated (all `n_ctx` cells of every layer, used or not): what a
    /// live context costs in memory besides llama.cpp's compute buffers.
    pub fn kv_cache_bytes(&self) -> usize {
        let llama = &self.model.inner.llama;
        let heads = llama.n_head().max(1) as usize;
        let width = (llama.n_embd().max(0) as usize) * llama.n_head_kv() as usize / heads;
        let row = |t: crate::params::KvType| t.row_bytes(width);
        let n_ctx = self.cell.borrow_dependent().n_ctx() as usize;
        n_ctx * llama.n_layer() as usize * (row(self.params.type_k) + row(self.params.type_v))
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
        let available = self.capacity_per_sequence - held;
        if extra > available {
            return Err(Error::ContextFull {
                requested: extra,
                available,
                held,
                n_ctx: self.capacity_per_sequence,
            });
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
        let decoded = self
            .cell
            .with_dependent_mut(|_, ctx| ctx.decode(&mut self.batch));
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
                let (code, reason) = match e {
                    llama_cpp_2::DecodeError::NoKvCacheSlot => {
                        (1, "no free KV cache slot for the batch".to_owned())
                    }
                    llama_cpp_2::DecodeError::NTokensZero => {
                        (-1, "llama.cpp rejected the batch as invalid".to_owned())
                    }
                    llama_cpp_2::DecodeError::Unknown(code) => {
                        (code, "llama.cpp failed to compute the batch".to_owned())
                    }
                };
                Err(Error::Decode { code, reason })
            }
        }
    }

    /// Checks the KV cache against the bookkeeping; on disagreement clears both and reports a bug.
    pub(crate) fn verify(&mut self, seq: SeqId) -> Result<()> {
        let pos_max = self
            .cell
            .borrow_dependent()
            .kv_cache_seq_pos_max(seq as i32);
        let expected = self.sequences[seq as usize].len() as i64 - 1;
        if i64::from(pos_max) == expected {
            return Ok(());
        }
        self.reset();
        Err(Error::Internal(format!(
            "KV cache of sequence {seq} ends at position {pos_max} but the bookkeeping holds {} tokens; the \
             context was reset",
            expected + 1
        )))
    }

    pub(crate) fn remove_from(&mut self, seq: SeqId, keep: usize) -> Result<()> {
        self.epoch += 1;
        self.last_logits = None;
        let keep_u32 = u32::try_from(keep).expect("positions fit in u32");
        let removed = self
            .cell
            .with_dependent_mut(|_, ctx| ctx.kv_cache_seq_rm(seq as i32, Some(keep_u32), None));
        if let Err(e) = removed {
            return Err(Error::Internal(format!(
                "llama.cpp could not remove cells: {e}"
            )));
        }
        self.sequences[seq as usize].truncate(keep);
        self.verify(seq)
    }

    /// Keeps the first `n` tokens of sequence `seq` and drops the rest from the cache and the bookkeeping;
    /// the next token goes to position `n`.
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
        self.remove_from(seq, n)
    }

    /// Empties every sequence.
    pub fn reset(&mut self) {
        self.epoch += 1;
        self.last_logits = None;
        // Frees every cell without zeroing the KV buffer (llama_memory_clear(data=true) memsets all of it:
        // 8 ms at n_ctx 4096 with a 135M model). Freed cells are masked out of attention, and their rows
        // hold finite values from earlier decodes (the buffer is zeroed when the context is created).
        let cleared = self
            .cell
            .with_dependent_mut(|_, ctx| ctx.clear_kv_cache_seq(None, None, None));
        if !matches!(cleared, Ok(true)) {
            self.cell.with_dependent_mut(|_, ctx| ctx.clear_kv_cache());
        }
        for tokens in &mut self.sequences {
            tokens.clear();
        }
    }

    /// Makes the logits of the last token of `seq` available, decoding it again if they are not (after a
    /// truncate, a restore, or work on another sequence). An empty sequence starts with the BOS token.
    pub(crate) fn ensure_logits(
        &mut self,
        seq: SeqId,
        interrupt: &mut dyn Interrupt,
    ) -> Result<i32> {
        if let Some(last) = self.last_logits.filter(|l| l.seq == seq) {
            return Ok(last.batch_index);
        }
        let held = self.token_count(seq)?;
        let last = match self.sequences[seq as usize].last() {
            Some(&token) => {
                self.truncate(seq, held - 1)?;
                token
            }
            None => self.model.bos_to_add().ok_or_else(|| {
                Error::invalid(
                    "prompt",
                    "a non-empty prompt: the context is empty and the model has no BOS token to start from",
                    "\"\"",
                )
            })?,
        };
        self.append(seq, &[last], true, interrupt)?;
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
        // only where the last decode of this very sequence produced logits.
        let Some(last) = self.last_logits.filter(|l| l.seq == seq) else {
            return Err(Error::StreamInvalidated);
        };
        Ok(self
            .cell
            .with_dependent_mut(|_, ctx| sampler.sample(ctx, last.batch_index)))
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
        if tokens.len() > self.capacity_per_sequence {
            return Err(Error::ContextFull {
                requested: tokens.len(),
                available: self.capacity_per_sequence,
                held: 0,
                n_ctx: self.capacity_per_sequence,
            });
        }
        options.sampling.validate()?;
        self.model.check_tokens(&tokens)?;
        let held = &self.sequences[seq as usize];
        let reused = held.iter().zip(&tokens).take_while(|(a, b)| a == b).count();
        self.truncate(seq, reused)?;
        let generator = Generator::start_tokens(self, seq, &tokens[reused..], options, interrupt)?;
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

    pub(crate) fn tokenize_prompt(&self, seq: SeqId, prompt: &str) -> Result<Vec<LlamaToken>> {
        let empty = self.token_count(seq)? == 0;
        self.model.tokenize(prompt, empty, true)
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
            max_tokens: 256,
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
    /// Seconds spent decoding the prompt.
    pub prompt_seconds: f64,
    /// Tokens generated (all of them stay in the context).
    pub generated_tokens: usize,
    /// Seconds spent generating.
    pub generation_seconds: f64,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_can_move_between_threads() {
        fn assert_send<T: Send>() {}
        assert_send::<Context>();
        assert_send::<Generator>();
    }
}
