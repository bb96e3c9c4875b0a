//! Continuous batching: one [`Context`] whose sequences are the users, and a scheduler thread that decodes
//! every active turn together, one step at a time.
//!
//! Each step is one `llama_decode` ([`Context::decode_batch`]) over the next token of every generating turn
//! plus chunks of the prompts being read, at most `prompt_tokens_per_step` of them in all (split between
//! the readers, the generating turns' tokens first), so that a long prompt never holds back the others'
//! next token for more than one step. Each turn samples with its own sampler and hands each piece to its
//! [`TurnStream`]. The context's bookkeeping stays the one of [`Context`]: positions come from each
//! sequence's own token list, and what a turn's stream returned is what its sequence holds.
//!
//! All access to the sequences goes through the scheduler thread: callers send it commands and wait for the
//! reply, so no caller ever holds a lock across a decode. A panic on the scheduler thread stops the engine:
//! every waiting stream and every later call gets [`Error::Internal`] saying so.
//!
//! Memory: each sequence is its own KV stream of `n_ctx / max_live` cells (llama.cpp's default split cache),
//! not one unified cache: a unified cache reuses freed cells in any order, so a sequence's cells would no
//! longer be in position order, and its saved state would not be the state [`Context::restore`] checks and
//! accepts. With one stream per sequence the states are exactly those of a plain [`Context`] with the same
//! parameters.

mod pool;
mod scheduler;
mod stream;

use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use llama_cpp_2::token::LlamaToken;

use crate::context::{Context, GenerateOptions, SeqId};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::params::ContextParams;
use crate::session::{Metadata, SessionInfo};
use crate::signing::SessionKey;
pub(crate) use pool::PooledSequence;
pub use pool::{ContextPool, PoolMemory, PoolStats, DEFAULT_PROMPT_TOKENS_PER_STEP};
use scheduler::Scheduler;
pub use stream::TurnStream;

/// What a caught panic said (its message, when it has one).
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// A request to the scheduler thread.
pub(crate) enum Command {
    /// Runs on the scheduler thread between two steps (the reply travels inside).
    Run(Box<dyn FnOnce(&mut Scheduler) + Send>),
    /// A stream was dropped: look at the cancellations.
    Wake,
    /// The engine is dropped: end every turn and stop.
    Shutdown,
}

/// Why the scheduler thread stopped, shared with every handle that may find it gone.
#[derive(Clone, Default)]
pub(crate) struct StopCause(Arc<Mutex<Option<String>>>);

impl StopCause {
    fn set(&self, reason: String) {
        let mut cause = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        cause.get_or_insert(reason);
    }

    /// The error of a call that found the scheduler gone.
    pub(crate) fn error(&self) -> Error {
        let cause = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Error::Internal(match &*cause {
            Some(reason) => format!("the engine's scheduler stopped: {reason}"),
            None => "the engine's scheduler stopped".to_owned(),
        })
    }
}

/// One llama.cpp context with up to `max_live` sequences, decoded together by a scheduler thread.
pub struct Engine {
    commands: Sender<Command>,
    thread: Option<JoinHandle<()>>,
    params: ContextParams,
    capacity: usize,
    prompt_tokens_per_step: usize,
    stop_cause: StopCause,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("params", &self.params)
            .field("prompt_tokens_per_step", &self.prompt_tokens_per_step)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// An engine over `model` with `max_live` sequences (`params.n_seq_max` is replaced by it; `params.n_ctx`
    /// cells are shared by them, `n_ctx / max_live` each) and at most `n_batch` prompt tokens per step.
    pub fn new(model: &Model, params: ContextParams, max_live: u32) -> Result<Engine> {
        Engine::with_prompt_tokens_per_step(model, params, max_live, usize::MAX)
    }

    /// [`Engine::new`] reading at most `prompt_tokens_per_step` prompt tokens per step, all turns together
    /// (at most `n_batch` less the generating turns' tokens): smaller means steps that stay short while
    /// prompts are read, so the generating turns' tokens come at a steadier pace.
    pub fn with_prompt_tokens_per_step(
        model: &Model,
        params: ContextParams,
        max_live: u32,
        prompt_tokens_per_step: usize,
    ) -> Result<Engine> {
        if prompt_tokens_per_step == 0 {
            return Err(Error::invalid(
                "prompt_tokens_per_step",
                "at least 1",
                prompt_tokens_per_step,
            ));
        }
        if max_live == 0 || max_live > crate::params::MAX_SEQUENCES {
            return Err(Error::invalid(
                "max_live",
                format!(
                    "1 <= max_live <= {} (llama.cpp's LLAMA_MAX_SEQ)",
                    crate::params::MAX_SEQUENCES
                ),
                max_live,
            ));
        }
        let ctx = Context::new(
            model,
            ContextParams {
                n_seq_max: max_live,
                ..params
            },
        )?;
        if ctx.batch_capacity() < max_live as usize {
            return Err(Error::invalid(
                "n_batch",
                format!(
                    "n_batch >= max_live={max_live} (every live sequence's token fits in one step)"
                ),
                ctx.batch_capacity(),
            ));
        }
        let params = ctx.params().clone();
        let capacity = ctx.capacity();
        let prompt_tokens_per_step = prompt_tokens_per_step.min(ctx.batch_capacity());
        let (commands, receiver) = mpsc::channel();
        let stop_cause = StopCause::default();
        let scheduler = Scheduler::new(ctx, receiver, prompt_tokens_per_step);
        let cause = stop_cause.clone();
        let thread = std::thread::Builder::new()
            .name("llama-sessions-engine".to_owned())
            .spawn(move || scheduler.run(&cause))
            .map_err(|e| Error::Internal(format!("cannot start the scheduler thread: {e}")))?;
        Ok(Engine {
            commands,
            thread: Some(thread),
            params,
            capacity,
            prompt_tokens_per_step,
            stop_cause,
        })
    }

    /// The parameters of the engine's context as llama.cpp allocated them (`n_seq_max` is `max_live`): a
    /// [`Context`] created with them holds states exactly like the engine's sequences.
    pub fn params(&self) -> &ContextParams {
        &self.params
    }

    /// Most tokens one sequence holds: `n_ctx / max_live`.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Most prompt tokens one step reads, all turns together.
    pub fn prompt_tokens_per_step(&self) -> usize {
        self.prompt_tokens_per_step
    }

    /// Runs `f` on the scheduler thread between two steps and returns its result.
    fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Scheduler) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (reply, answer) = mpsc::channel();
        let command = Command::Run(Box::new(move |scheduler: &mut Scheduler| {
            // The caller may have given up waiting; nothing to do then.
            let _ = reply.send(f(scheduler));
        }));
        self.commands
            .send(command)
            .map_err(|_| self.stop_cause.error())?;
        answer.recv().map_err(|_| self.stop_cause.error())?
    }

    /// Starts a turn on sequence `seq`: `prompt` is tokenized (with BOS only when the sequence is empty) and
    /// read after what the sequence holds, then up to `options.max_tokens` tokens are generated, as
    /// [`Context::generate`] does. Raises [`Error::ContextFull`] before anything changes when the prompt
    /// does not fit, and [`Error::InvalidParameter`] when a turn is in progress on `seq`.
    pub fn submit(&self, seq: SeqId, prompt: &str, options: GenerateOptions) -> Result<TurnStream> {
        let prompt = prompt.to_owned();
        self.start(seq, options, move |ctx| ctx.tokenize_prompt(seq, &prompt))
    }

    /// [`Engine::submit`] with the prompt already tokenized.
    pub fn submit_tokens(
        &self,
        seq: SeqId,
        tokens: Vec<LlamaToken>,
        options: GenerateOptions,
    ) -> Result<TurnStream> {
        self.start(seq, options, move |_| Ok(tokens))
    }

    fn start(
        &self,
        seq: SeqId,
        options: GenerateOptions,
        tokens: impl FnOnce(&Context) -> Result<Vec<LlamaToken>> + Send + 'static,
    ) -> Result<TurnStream> {
        let (events, receiver) = mpsc::channel();
        let cancelled = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&cancelled);
        self.call(move |scheduler| scheduler.start_turn(seq, tokens, options, events, flag))?;
        Ok(TurnStream::new(
            seq,
            receiver,
            cancelled,
            self.commands.clone(),
            self.stop_cause.clone(),
        ))
    }

    /// The tokens sequence `seq` holds now.
    pub fn tokens(&self, seq: SeqId) -> Result<Vec<LlamaToken>> {
        self.call(move |scheduler| Ok(scheduler.context().tokens(seq)?.to_vec()))
    }

    /// llama.cpp's state of sequence `seq` (see [`Context::sequence_state`]); not while a turn runs on it.
    pub fn sequence_state(&self, seq: SeqId) -> Result<Vec<u8>> {
        self.call(move |scheduler| scheduler.idle_context(seq)?.sequence_state(seq))
    }

    /// The session of sequence `seq` as bytes ([`Context::snapshot`]); not while a turn runs on it.
    pub fn snapshot(
        &self,
        seq: SeqId,
        metadata: Metadata,
        key: Option<SessionKey>,
    ) -> Result<Vec<u8>> {
        self.call(move |scheduler| {
            scheduler
                .idle_context(seq)?
                .snapshot(Some(seq), &metadata, key.as_ref())
        })
    }

    /// Replaces sequence `seq` by the one-sequence session `bytes` ([`Context::restore`], every check
    /// included); not while a turn runs on it.
    pub fn restore(
        &self,
        seq: SeqId,
        bytes: Vec<u8>,
        key: Option<SessionKey>,
    ) -> Result<SessionInfo> {
        self.call(move |scheduler| {
            scheduler
                .idle_context(seq)?
                .restore(&bytes, Some(seq), key.as_ref())
        })
    }

    /// Empties sequence `seq`; not while a turn runs on it.
    pub fn free(&self, seq: SeqId) -> Result<()> {
        self.call(move |scheduler| scheduler.idle_context(seq)?.truncate(seq, 0))
    }

    /// The decode steps run so far.
    pub fn steps(&self) -> Result<u64> {
        self.call(|scheduler| Ok(scheduler.steps()))
    }

    /// Makes the scheduler thread panic between two steps (a test hook for the promise that a panic there
    /// becomes an error for every caller).
    #[doc(hidden)]
    pub fn panic_scheduler(&self) {
        let _ = self.commands.send(Command::Run(Box::new(|_| {
            panic!("a panic asked for by Engine::panic_scheduler")
        })));
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Shutdown);
        if let Some(thread) = self.thread.take() {
            // The scheduler catches its own panics; a join error has nothing left to report to.
            let _ = thread.join();
        }
    }
}
