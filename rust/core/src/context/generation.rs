//! One generation in progress: sampling, decoding each sampled token through the context's one door, and
//! turning tokens into text pieces. Used both for a whole generation and for streaming, one piece at a time.

use std::time::Instant;

use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;

use crate::context::{
    Context, GenerateOptions, Generation, GenerationStats, Interrupt, NeverInterrupt, SeqId,
    StopReason,
};
use crate::error::{Error, Result};
use crate::text::{StopMatcher, StopScan, Utf8Assembler};

/// A generation in progress on one sequence of a [`Context`]. It holds no borrow of the context: each step
/// takes the context again, and fails with [`Error::StreamInvalidated`] if anything else changed the KV
/// cache in between.
pub struct Generator {
    seq: SeqId,
    max_tokens: usize,
    sampler: LlamaSampler,
    utf8: Utf8Assembler,
    stops: StopMatcher,
    generated: Vec<LlamaToken>,
    stats: GenerationStats,
    /// The context's epoch after this generator's last change.
    epoch: u64,
    finished: Option<StopReason>,
    /// Text released when the generation finished, handed out by the next call.
    tail: Option<String>,
}

impl std::fmt::Debug for Generator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generator")
            .field("seq", &self.seq)
            .field("generated", &self.generated.len())
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl Generator {
    pub(crate) fn start(
        ctx: &mut Context,
        seq: SeqId,
        prompt: &str,
        options: GenerateOptions,
        interrupt: &mut dyn Interrupt,
    ) -> Result<Generator> {
        options.sampling.validate()?;
        let tokens = ctx.tokenize_prompt(seq, prompt)?;
        ctx.check_room(seq, tokens.len())?;
        Generator::start_tokens(ctx, seq, &tokens, options, interrupt)
    }

    /// Starts after `tokens`, which fit (checked by the caller).
    pub(crate) fn start_tokens(
        ctx: &mut Context,
        seq: SeqId,
        tokens: &[LlamaToken],
        options: GenerateOptions,
        interrupt: &mut dyn Interrupt,
    ) -> Result<Generator> {
        Generator::start_tokens_at(ctx, seq, tokens, &[], options, interrupt)
    }

    /// [`Generator::start_tokens`] taking state checkpoints (where the context keeps them) at the start, at
    /// each of `boundaries` (token counts of the sequence) and at the end of the prompt.
    pub(crate) fn start_tokens_at(
        ctx: &mut Context,
        seq: SeqId,
        tokens: &[LlamaToken],
        boundaries: &[usize],
        options: GenerateOptions,
        interrupt: &mut dyn Interrupt,
    ) -> Result<Generator> {
        Generator::check_options(ctx, &options)?;
        let started = Instant::now();
        let want_logits = options.max_tokens > 0;
        // A prefix cache may already hold the first chunks of what the sequence will hold.
        let restored = ctx.restore_from_prefix_cache(seq, tokens, want_logits)?;
        let tokens = &tokens[restored..];
        let prompt_tokens = if !want_logits {
            ctx.append_with_checkpoints(seq, tokens, boundaries, false, interrupt)?;
            tokens.len()
        } else if tokens.is_empty() {
            ctx.ensure_logits(seq, interrupt)?;
            0
        } else {
            ctx.append_with_checkpoints(seq, tokens, boundaries, true, interrupt)?;
            tokens.len()
        };
        ctx.offer_to_prefix_cache(seq);
        let stats = GenerationStats {
            prompt_tokens,
            context_tokens: ctx.token_count(seq)?,
            prompt_seconds: started.elapsed().as_secs_f64(),
            ..GenerationStats::default()
        };
        Generator::after_prompt(ctx, seq, options, stats)
    }

    /// Checks `options` for a generation on `ctx`, naming the first offending parameter.
    pub(crate) fn check_options(ctx: &Context, options: &GenerateOptions) -> Result<()> {
        options.sampling.validate()?;
        // llama.cpp sizes the penalty's ring buffer by repeat_last_n: bound it by what a sequence can hold.
        if options.sampling.repeat_last_n as usize > ctx.capacity() {
            return Err(Error::invalid(
                "repeat_last_n",
                format!(
                    "0 <= repeat_last_n <= {} (the tokens a sequence holds)",
                    ctx.capacity()
                ),
                options.sampling.repeat_last_n,
            ));
        }
        Ok(())
    }

    /// The generator of sequence `seq`, whose prompt is decoded already (with the logits of its last token
    /// kept where `options.max_tokens > 0`); its sampler sees what the sequence holds.
    pub(crate) fn after_prompt(
        ctx: &Context,
        seq: SeqId,
        options: GenerateOptions,
        stats: GenerationStats,
    ) -> Result<Generator> {
        let n_vocab = i32::try_from(ctx.model().n_vocab()).unwrap_or(i32::MAX);
        let sampler = options.sampling.build(n_vocab, ctx.tokens(seq)?);
        Ok(Generator {
            seq,
            max_tokens: options.max_tokens,
            sampler,
            utf8: Utf8Assembler::default(),
            stops: StopMatcher::new(options.stop),
            generated: Vec::new(),
            stats,
            epoch: ctx.epoch(),
            finished: (options.max_tokens == 0).then_some(StopReason::MaxTokens),
            tail: None,
        })
    }

    /// Generates until the next piece of text is ready. Returns `None` once the generation has ended.
    /// On an interrupt the tokens generated so far stay in the context and the generation ends.
    pub fn next_piece(
        &mut self,
        ctx: &mut Context,
        interrupt: &mut dyn Interrupt,
    ) -> Result<Option<String>> {
        loop {
            if self.finished.is_some() {
                return Ok(self.take_tail());
            }
            if self.reached_end(ctx)? {
                continue;
            }
            if ctx.epoch() != self.epoch {
                return Err(Error::StreamInvalidated);
            }
            if interrupt.should_stop() {
                self.finished = Some(StopReason::MaxTokens);
                return Err(Error::Interrupted);
            }
            let started = Instant::now();
            let token = ctx.sample(&mut self.sampler, self.seq)?;
            let appended = ctx.append(self.seq, &[token], true, &mut NeverInterrupt);
            self.stats.generation_seconds += started.elapsed().as_secs_f64();
            if let Err(e) = appended {
                self.finished = Some(StopReason::MaxTokens);
                return Err(e);
            }
            self.epoch = ctx.epoch();
            if let Some(piece) = self.accept(ctx, token)? {
                return Ok(Some(piece));
            }
        }
    }

    /// Ends the generation where it has generated `max_tokens` or its sequence is full; true if it has ended.
    fn reached_end(&mut self, ctx: &Context) -> Result<bool> {
        if self.finished.is_some() {
            return Ok(true);
        }
        if self.generated.len() >= self.max_tokens {
            self.finish(StopReason::MaxTokens);
        } else if ctx.token_count(self.seq)? >= ctx.capacity() {
            self.finish(StopReason::ContextFull);
        }
        Ok(self.finished.is_some())
    }

    /// The next token, sampled from the logits of the sequence's last token, for a caller that decodes it
    /// itself (a batch of several sequences) and then hands it to [`Generator::accept`]; `None` once the
    /// generation has ended (its last text is then in [`Generator::take_tail`]).
    pub(crate) fn sample_next(&mut self, ctx: &mut Context) -> Result<Option<LlamaToken>> {
        if self.reached_end(ctx)? {
            return Ok(None);
        }
        ctx.sample(&mut self.sampler, self.seq).map(Some)
    }

    /// Takes `token`, which the context has just decoded at the end of the sequence: returns the text it
    /// completes, if any (an end-of-generation token or a stop string ends the generation instead).
    pub(crate) fn accept(&mut self, ctx: &Context, token: LlamaToken) -> Result<Option<String>> {
        self.generated.push(token);
        self.stats.generated_tokens += 1;
        if ctx.model().is_end_of_generation(token) {
            self.finish(StopReason::EndOfGeneration);
            return Ok(None);
        }
        let text = self.utf8.push(&ctx.model().token_bytes(token, false)?);
        match self.stops.push(&text) {
            StopScan::Continue(piece) if piece.is_empty() => Ok(None),
            StopScan::Continue(piece) => Ok(Some(piece)),
            StopScan::Stopped(before) => {
                self.finished = Some(StopReason::StopString);
                self.tail = Some(before);
                Ok(None)
            }
        }
    }

    /// The text released when the generation ended, once (None if empty or not ended).
    pub(crate) fn take_tail(&mut self) -> Option<String> {
        self.tail.take().filter(|t| !t.is_empty())
    }

    /// Adds `seconds` to the time spent generating (a batch's decode, counted by its caller).
    pub(crate) fn add_generation_seconds(&mut self, seconds: f64) {
        self.stats.generation_seconds += seconds;
    }

    fn finish(&mut self, reason: StopReason) {
        let rest = self.utf8.finish();
        let (reason, tail) = match self.stops.push(&rest) {
            StopScan::Stopped(before) => (StopReason::StopString, before),
            StopScan::Continue(released) => (reason, released + &self.stops.finish()),
        };
        self.finished = Some(reason);
        self.tail = Some(tail);
    }

    /// Why the generation ended, once it has.
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.finished
    }

    /// Counts and times so far.
    pub fn stats(&self) -> GenerationStats {
        self.stats
    }

    /// The tokens generated so far.
    pub fn tokens(&self) -> &[LlamaToken] {
        &self.generated
    }

    /// The sequence this generation runs on.
    pub fn seq(&self) -> SeqId {
        self.seq
    }

    pub(crate) fn into_generation(self, text: String) -> Generation {
        Generation {
            text,
            stop_reason: self.finished.unwrap_or(StopReason::MaxTokens),
            tokens: self.generated,
            stats: self.stats,
        }
    }
}
