//! `llama_sessions.Context` and its token stream.
//!
//! The core Context is `Send` but not `Sync`; here it sits behind a `Mutex` inside a frozen pyclass, so a
//! call from a second thread waits for the first instead of corrupting anything. Every call goes through
//! `crate::native`: the lock is only ever taken with the GIL released, so a thread waiting for it never
//! blocks the thread holding it, which needs the GIL briefly to check for Ctrl-C.

use std::sync::{Arc, Mutex};

use std::path::PathBuf;

use llama_sessions::{
    default_threads, Context, Error, GenerateOptions, GenerationStats, Generator, SamplingParams,
    SeqId, SessionFormat, StopReason,
};
use llama_sessions::{DEFAULT_MAX_TOKENS, DEFAULT_SAMPLING};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyBytes;

use crate::errors::to_py;
use crate::interrupt::SignalCheck;
use crate::model::{messages_from_py, tokens_to_py, type_name, PyModel};
use crate::native::{lock_shared, native, DetachedMutex};
use crate::params::PyContextParams;
use crate::prefix_cache::PyPrefixCache;
use crate::progress::StreamProgress;
use crate::session::{
    metadata_from_py, seq_arg, seq_id, session_bytes_arg, session_key, warn_all, PySessionInfo,
};

/// Counts and times of the last generation on a Context, or of the last chat turn on a SessionManager's
/// session (``manager.load(session_id).last_stats``).
#[pyclass(name = "GenerationStats", module = "llama_sessions._native", frozen)]
#[derive(Clone)]
pub struct PyGenerationStats {
    stats: GenerationStats,
    reason: StopReason,
}

impl PyGenerationStats {
    pub(crate) fn new(stats: GenerationStats, reason: StopReason) -> Self {
        PyGenerationStats { stats, reason }
    }
}

#[pymethods]
impl PyGenerationStats {
    /// Prompt tokens decoded.
    #[getter]
    fn prompt_tokens(&self) -> usize {
        self.stats.prompt_tokens
    }

    /// Tokens the sequence held when generation started: what the answer follows (for a chat, the whole
    /// formatted conversation). Those beyond ``prompt_tokens`` were not decoded by this call: the sequence
    /// already held them, or they were restored from a prefix cache.
    #[getter]
    fn context_tokens(&self) -> usize {
        self.stats.context_tokens
    }

    /// Seconds spent decoding the prompt.
    #[getter]
    fn prompt_seconds(&self) -> f64 {
        self.stats.prompt_seconds
    }

    /// Tokens generated; all of them stay in the context.
    #[getter]
    fn generated_tokens(&self) -> usize {
        self.stats.generated_tokens
    }

    /// Seconds spent generating.
    #[getter]
    fn generation_seconds(&self) -> f64 {
        self.stats.generation_seconds
    }

    /// Whole turns (a user message and its answer) a SessionManager chat turn dropped from the start of
    /// the history to make room for itself (``overflow="drop_oldest"``); 0 for everything else.
    #[getter]
    fn dropped_turns(&self) -> usize {
        self.stats.dropped_turns
    }

    /// Why the generation ended: "eog", "stop", "length" or "context_full".
    #[getter]
    fn stop_reason(&self) -> &'static str {
        self.reason.as_str()
    }

    /// Prompt tokens per second.
    #[getter]
    fn prompt_tokens_per_second(&self) -> f64 {
        self.stats.prompt_tokens_per_second()
    }

    /// Generated tokens per second.
    #[getter]
    fn generation_tokens_per_second(&self) -> f64 {
        self.stats.generation_tokens_per_second()
    }

    fn __repr__(&self) -> String {
        let s = &self.stats;
        format!(
            "GenerationStats(prompt_tokens={}, context_tokens={}, prompt_seconds={:.4}, \
             generated_tokens={}, generation_seconds={:.4}, stop_reason={:?}, dropped_turns={})",
            s.prompt_tokens,
            s.context_tokens,
            s.prompt_seconds,
            s.generated_tokens,
            s.generation_seconds,
            self.reason.as_str(),
            s.dropped_turns
        )
    }
}

/// The KV cache of a model and the bookkeeping of what is in it.
///
/// No call takes a position: each call continues where the context stands. One Context serves one call at
/// a time (a second thread waits); many Contexts over one Model run in parallel. The GIL is released during
/// native work, and Ctrl-C interrupts a long call with KeyboardInterrupt, keeping the tokens decoded so far.
///
/// Create a context over ``model`` with ``params`` (default ``ContextParams()``) changed by the
/// keyword overrides (None keeps a field as it is).
///
/// With ``prefix_cache``, every generate/encode first restores the longest chain of cached chunks that
/// prefixes what the sequence will hold (beyond what it holds), decodes only the rest, and offers every
/// full chunk it holds to the cache (``last_stats.prompt_tokens`` counts only the decoded tokens). Only
/// models whose memory is one plain KV cache use it; others ignore it.
///
/// Raises InvalidParameterError naming the parameter for an invalid value or combination (n_ctx <= 0
/// or above the model's n_ctx_train, a quantized V cache without flash attention, ...).
#[pyclass(name = "Context", module = "llama_sessions._native", frozen)]
pub struct PyContext {
    /// Shared with a SessionManager when the context is one of its live sessions.
    pub(crate) inner: Arc<Mutex<Context>>,
    model: Py<PyModel>,
}

/// Turns a core result into a Python one; an interruption raises the exception the signal handler raised.
pub(crate) fn finish<T>(result: Result<T, Error>, signals: &mut SignalCheck) -> PyResult<T> {
    result.map_err(|e| match e {
        Error::Interrupted => signals
            .take_raised()
            .unwrap_or_else(|| to_py(Error::Interrupted)),
        other => to_py(other),
    })
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn options(
    max_tokens: i64,
    temperature: f32,
    top_k: i64,
    top_p: f32,
    min_p: f32,
    repeat_penalty: f32,
    seed: Option<i64>,
    stop: Option<Bound<'_, PyAny>>,
) -> PyResult<GenerateOptions> {
    let invalid = |name: &str, expected: &str, found: i64| {
        crate::errors::InvalidParameterError::new_err(format!(
            "invalid {name}: expected {expected}, found {found}"
        ))
    };
    let max_tokens = usize::try_from(max_tokens)
        .map_err(|_| invalid("max_tokens", "an integer >= 0", max_tokens))?;
    let top_k = u32::try_from(top_k).map_err(|_| invalid("top_k", "an integer >= 0", top_k))?;
    let seed = seed
        .map(|s| {
            u32::try_from(s)
                .map_err(|_| invalid("seed", "an integer in 0..=4294967295, or None", s))
        })
        .transpose()?;
    let stop = stop_strings(stop)?;
    let sampling = SamplingParams {
        temperature,
        top_k,
        top_p,
        min_p,
        repeat_penalty,
        seed,
        ..SamplingParams::default()
    };
    sampling.validate().map_err(to_py)?;
    Ok(GenerateOptions {
        max_tokens,
        sampling,
        stop,
    })
}

/// `prompt=` of generate() and stream(): a str. A list of chat messages gets a hint at the calls that take one.
fn prompt_text(prompt: &Bound<'_, PyAny>) -> PyResult<String> {
    if let Ok(text) = prompt.extract::<String>() {
        return Ok(text);
    }
    let looks_like_messages = !prompt.is_instance_of::<pyo3::types::PyString>()
        && prompt.cast::<pyo3::types::PySequence>().is_ok()
        && prompt
            .get_item(0)
            .is_ok_and(|first| first.cast::<pyo3::types::PyMapping>().is_ok());
    let found = type_name(prompt);
    let message = if looks_like_messages {
        format!(
            "invalid prompt: expected a str, found a {found} of chat messages; use ctx.chat(messages) (formats \
             them with the model's chat template and decodes only what the context does not hold yet), or \
             ctx.generate(model.apply_chat_template(messages))"
        )
    } else {
        format!("invalid prompt: expected a str, found {found}")
    };
    Err(crate::errors::InvalidParameterError::new_err(message))
}

/// `stop=`: one string, or a sequence of strings (not a single string's characters).
fn stop_strings(stop: Option<Bound<'_, PyAny>>) -> PyResult<Vec<String>> {
    let Some(stop) = stop.filter(|s| !s.is_none()) else {
        return Ok(Vec::new());
    };
    if let Ok(one) = stop.extract::<String>() {
        return Ok(vec![one]);
    }
    stop.extract::<Vec<String>>().map_err(|_| {
        let found = stop
            .get_type()
            .name()
            .map_or_else(|_| "?".to_owned(), |n| n.to_string());
        crate::errors::InvalidParameterError::new_err(format!(
            "invalid stop: expected a str or a list of str, found {found}"
        ))
    })
}

impl PyContext {
    /// A Python Context over a context shared with the core (a SessionManager's live session).
    pub(crate) fn shared(inner: Arc<Mutex<Context>>, model: Py<PyModel>) -> PyContext {
        PyContext { inner, model }
    }

    /// The stats live on the core's context, so that every handle on a shared context (each `load` of a
    /// manager's session) sees those of the last generation or chat turn, whoever ran it.
    fn record(&self, py: Python<'_>, stats: PyGenerationStats) -> PyResult<()> {
        native(py, |d| {
            lock_shared(&self.inner, d).set_last_stats(Some((stats.stats, stats.reason)));
            Ok(())
        })
    }
}

#[pymethods]
impl PyContext {
    /// Creates a context over `model` with `params` (default: ContextParams()) changed by `overrides`.
    #[new]
    #[pyo3(signature = (model, params = None, *, n_ctx = None, n_batch = None, n_threads = None, type_k = None, type_v = None, flash_attn = None, n_seq_max = None, prefix_cache = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        model: Py<PyModel>,
        params: Option<&PyContextParams>,
        n_ctx: Option<i64>,
        n_batch: Option<i64>,
        n_threads: Option<Bound<'_, PyAny>>,
        type_k: Option<String>,
        type_v: Option<String>,
        flash_attn: Option<Bound<'_, PyAny>>,
        n_seq_max: Option<i64>,
        prefix_cache: Option<Py<PyPrefixCache>>,
    ) -> PyResult<Self> {
        let cache = prefix_cache.map(|c| c.get().inner.clone());
        let base = PyContextParams {
            inner: params.map(|p| p.inner.clone()).unwrap_or_default(),
        };
        let params = base
            .replace(
                n_ctx, n_batch, n_threads, type_k, type_v, flash_attn, n_seq_max,
            )?
            .inner;
        let core_model = model.get().inner.clone();
        let context = native(py, |_| {
            let mut context = Context::new(&core_model, params)?;
            context.set_prefix_cache(cache);
            Ok(context)
        })?;
        Ok(PyContext::shared(Arc::new(Mutex::new(context)), model))
    }

    /// The model this context reads with.
    #[getter]
    fn model(&self, py: Python<'_>) -> Py<PyModel> {
        self.model.clone_ref(py)
    }

    /// The parameters the context was created with, ``n_ctx`` and ``n_batch`` as llama.cpp allocated them
    /// (``Context(model, n_ctx=300).params.n_ctx == 512``, and ``n_batch`` 300): what sessions record and
    /// compare.
    #[getter]
    fn params(&self, py: Python<'_>) -> PyResult<PyContextParams> {
        let params = native(py, |d| Ok(lock_shared(&self.inner, d).params().clone()))?;
        Ok(PyContextParams { inner: params })
    }

    /// KV cells of the context as llama.cpp allocated them (``params.n_ctx``), shared by all sequences.
    ///
    /// llama.cpp gives each sequence an equal share that is a multiple of 256: ``n_ctx=300`` holds 512,
    /// ``n_ctx=512, n_seq_max=4`` holds 1024 (256 per sequence). See n_ctx_per_seq.
    #[getter]
    fn n_ctx(&self, py: Python<'_>) -> PyResult<u32> {
        native(py, |d| Ok(lock_shared(&self.inner, d).params().n_ctx))
    }

    /// Most tokens one sequence holds: ``n_ctx // n_seq_max`` (``n_ctx`` itself with one sequence).
    /// ContextFullError is raised against this.
    #[getter]
    fn n_ctx_per_seq(&self, py: Python<'_>) -> PyResult<usize> {
        native(py, |d| Ok(lock_shared(&self.inner, d).capacity()))
    }

    /// The token ids in sequence 0, in position order.
    #[getter]
    fn tokens(&self, py: Python<'_>) -> PyResult<Vec<i32>> {
        native(py, |d| {
            lock_shared(&self.inner, d).tokens(0).map(tokens_to_py)
        })
    }

    /// The token ids in sequence ``seq``, in position order.
    fn sequence_tokens(&self, py: Python<'_>, seq: i64) -> PyResult<Vec<i32>> {
        let seq = seq_id(seq)?;
        native(py, |d| {
            lock_shared(&self.inner, d).tokens(seq).map(tokens_to_py)
        })
    }

    /// Independent sequences in the context (``seq`` arguments run from 0 to n_seq_max - 1).
    #[getter]
    fn n_seq_max(&self, py: Python<'_>) -> PyResult<u32> {
        native(py, |d| Ok(lock_shared(&self.inner, d).params().n_seq_max))
    }

    /// How many tokens sequence ``seq`` holds; the next token goes to this position.
    #[pyo3(signature = (seq = 0))]
    fn token_count(&self, py: Python<'_>, seq: i64) -> PyResult<usize> {
        let seq = seq_id(seq)?;
        native(py, |d| lock_shared(&self.inner, d).token_count(seq))
    }

    /// Counts and times of the last generate() or finished stream() on this context, or None (also after
    /// reset(), restore() and load_session(), which replace what they described). For a SessionManager's
    /// session (a Context from load()), the last chat turn's too, whoever ran it; a session read from its
    /// file has None until its next turn.
    #[getter]
    fn last_stats(&self, py: Python<'_>) -> PyResult<Option<PyGenerationStats>> {
        native(py, |d| {
            let stats = lock_shared(&self.inner, d).last_stats();
            Ok(stats.map(|(stats, reason)| PyGenerationStats::new(stats, reason)))
        })
    }

    /// Empty every sequence of the context.
    fn reset(&self, py: Python<'_>) -> PyResult<()> {
        native(py, |d| {
            lock_shared(&self.inner, d).reset(); // forgets the last stats: they described what is gone
            Ok(())
        })
    }

    /// Keep the first ``n`` tokens of sequence ``seq`` and drop the rest; the next call continues at
    /// position ``n``.
    ///
    /// Where the memory cannot be cut back in place (recurrent and hybrid models, see
    /// ``Model.partial_truncation``; a sliding-window model restored from a state, below its last token),
    /// the sequence is emptied and its first ``n`` tokens are decoded again: the result is exactly what a
    /// fresh context that decoded them holds, at the cost of decoding ``n`` tokens.
    ///
    /// Raises InvalidParameterError when ``n`` is negative or above token_count(seq).
    #[pyo3(signature = (n, *, seq = 0))]
    fn truncate(&self, py: Python<'_>, n: i64, seq: i64) -> PyResult<()> {
        let seq = seq_id(seq)?;
        let n = usize::try_from(n).map_err(|_| {
            crate::errors::InvalidParameterError::new_err(format!(
                "invalid n: expected an integer >= 0, found {n}"
            ))
        })?;
        native(py, |d| lock_shared(&self.inner, d).truncate(seq, n))
    }

    /// Append ``prompt`` after what the context holds and generate up to ``max_tokens`` tokens.
    ///
    /// ``max_tokens=0`` only encodes the prompt. The BOS token is added only when the context is empty;
    /// special-token text in the prompt (as produced by apply_chat_template) becomes control tokens.
    /// Generation ends at an end-of-generation token, at any ``stop`` string (not part of the result), at
    /// ``max_tokens``, or when the context is full. Generated tokens stay in the context, so the next call
    /// continues after them. ``temperature=0`` is greedy and deterministic.
    ///
    /// Raises ContextFullError, before decoding anything, when the prompt does not fit in what sequence
    /// ``seq`` has left of its n_ctx_per_seq; the context is then unchanged. ``seq`` picks the sequence of a
    /// context with n_seq_max > 1. A list of chat messages instead of a str raises InvalidParameterError
    /// pointing at chat() and Model.apply_chat_template().
    ///
    /// To hold a conversation, either format each new turn yourself and pass only it (the context keeps
    /// what came before), or pass the whole conversation to chat(), which decodes only what is new.
    #[pyo3(signature = (prompt, max_tokens = DEFAULT_MAX_TOKENS as i64, *, temperature = DEFAULT_SAMPLING.temperature, top_k = DEFAULT_SAMPLING.top_k as i64, top_p = DEFAULT_SAMPLING.top_p, min_p = DEFAULT_SAMPLING.min_p, repeat_penalty = DEFAULT_SAMPLING.repeat_penalty, seed = None, stop = None, seq = 0))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        prompt: &Bound<'_, PyAny>,
        max_tokens: i64,
        temperature: f32,
        top_k: i64,
        top_p: f32,
        min_p: f32,
        repeat_penalty: f32,
        seed: Option<i64>,
        stop: Option<Bound<'_, PyAny>>,
        seq: i64,
    ) -> PyResult<String> {
        let seq = seq_id(seq)?;
        let options = options(
            max_tokens,
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty,
            seed,
            stop,
        )?;
        let prompt = prompt_text(prompt)?;
        let generation = native(py, |d| {
            let mut ctx = lock_shared(&self.inner, d);
            ctx.generate(seq, &prompt, options, d)
        })?;
        self.record(
            py,
            PyGenerationStats::new(generation.stats, generation.stop_reason),
        )?;
        Ok(generation.text)
    }

    /// Like generate(), but yield text pieces as they are produced.
    ///
    /// The prompt is encoded by this call (ContextFullError is raised here, not on the first step). Pieces
    /// never split a multi-byte character and never contain (part of) a stop string.
    #[pyo3(signature = (prompt, max_tokens = DEFAULT_MAX_TOKENS as i64, *, temperature = DEFAULT_SAMPLING.temperature, top_k = DEFAULT_SAMPLING.top_k as i64, top_p = DEFAULT_SAMPLING.top_p, min_p = DEFAULT_SAMPLING.min_p, repeat_penalty = DEFAULT_SAMPLING.repeat_penalty, seed = None, stop = None, seq = 0))]
    #[allow(clippy::too_many_arguments)]
    fn stream(
        slf: &Bound<'_, Self>,
        prompt: &Bound<'_, PyAny>,
        max_tokens: i64,
        temperature: f32,
        top_k: i64,
        top_p: f32,
        min_p: f32,
        repeat_penalty: f32,
        seed: Option<i64>,
        stop: Option<Bound<'_, PyAny>>,
        seq: i64,
    ) -> PyResult<TokenStream> {
        let py = slf.py();
        let seq = seq_id(seq)?;
        let options = options(
            max_tokens,
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty,
            seed,
            stop,
        )?;
        let prompt = prompt_text(prompt)?;
        let this = slf.get();
        let max_tokens = options.max_tokens;
        let generator = native(py, |d| {
            let mut ctx = lock_shared(&this.inner, d);
            ctx.start_generation(seq, &prompt, options, d)
        })?;
        Ok(TokenStream {
            context: slf.clone().unbind(),
            generator: DetachedMutex::new(Some(generator)),
            seq,
            max_tokens,
            progress: StreamProgress::default(),
        })
    }

    /// The assistant's answer to ``messages``: the *whole* conversation so far, a sequence of
    /// ``{"role": str, "content": str}`` (system, user and assistant turns, previous answers included).
    ///
    /// The conversation is formatted with the model's chat template (llama.cpp's built-in engine, as
    /// Model.apply_chat_template), each message's content as plain text: text such as
    /// ``"<|im_start|>system"`` inside a message stays text and cannot open a turn of another role. Only
    /// what differs from what sequence ``seq`` holds is decoded: the tokens after the longest common prefix
    /// are dropped and the rest of the conversation decoded, as llama.cpp's server does. Call it again with
    /// the answer and the next user message appended: the sequence then holds exactly the formatted
    /// conversation and the answer (never a turn twice), and the answer is the one a fresh context given
    /// the whole conversation would generate. Generation options, stop reasons and ``last_stats`` (whose
    /// ``prompt_tokens`` counts only the tokens decoded) are as for generate().
    ///
    /// Raises InvalidParameterError for an empty or malformed ``messages`` (naming the message),
    /// ChatTemplateError when the model has no usable template, ContextFullError (before anything changes)
    /// when the conversation does not fit in n_ctx_per_seq.
    #[pyo3(signature = (messages, max_tokens = DEFAULT_MAX_TOKENS as i64, *, temperature = DEFAULT_SAMPLING.temperature, top_k = DEFAULT_SAMPLING.top_k as i64, top_p = DEFAULT_SAMPLING.top_p, min_p = DEFAULT_SAMPLING.min_p, repeat_penalty = DEFAULT_SAMPLING.repeat_penalty, seed = None, stop = None, seq = 0))]
    #[allow(clippy::too_many_arguments)]
    fn chat(
        &self,
        py: Python<'_>,
        messages: &Bound<'_, PyAny>,
        max_tokens: i64,
        temperature: f32,
        top_k: i64,
        top_p: f32,
        min_p: f32,
        repeat_penalty: f32,
        seed: Option<i64>,
        stop: Option<Bound<'_, PyAny>>,
        seq: i64,
    ) -> PyResult<String> {
        let messages = messages_from_py(messages)?;
        let seq = seq_id(seq)?;
        let options = options(
            max_tokens,
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty,
            seed,
            stop,
        )?;
        let (generation, _) = native(py, |d| {
            let mut ctx = lock_shared(&self.inner, d);
            ctx.chat(seq, &messages, options, d)
        })?;
        self.record(
            py,
            PyGenerationStats::new(generation.stats, generation.stop_reason),
        )?;
        Ok(generation.text)
    }

    /// Like chat(), but yield the answer's text pieces as they are produced.
    ///
    /// The conversation is encoded by this call (its errors, ContextFullError included, are raised here);
    /// the answer is generated as the stream is advanced, as for stream().
    #[pyo3(signature = (messages, max_tokens = DEFAULT_MAX_TOKENS as i64, *, temperature = DEFAULT_SAMPLING.temperature, top_k = DEFAULT_SAMPLING.top_k as i64, top_p = DEFAULT_SAMPLING.top_p, min_p = DEFAULT_SAMPLING.min_p, repeat_penalty = DEFAULT_SAMPLING.repeat_penalty, seed = None, stop = None, seq = 0))]
    #[allow(clippy::too_many_arguments)]
    fn stream_chat(
        slf: &Bound<'_, Self>,
        messages: &Bound<'_, PyAny>,
        max_tokens: i64,
        temperature: f32,
        top_k: i64,
        top_p: f32,
        min_p: f32,
        repeat_penalty: f32,
        seed: Option<i64>,
        stop: Option<Bound<'_, PyAny>>,
        seq: i64,
    ) -> PyResult<TokenStream> {
        let py = slf.py();
        let messages = messages_from_py(messages)?;
        let seq = seq_id(seq)?;
        let options = options(
            max_tokens,
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty,
            seed,
            stop,
        )?;
        let this = slf.get();
        let max_tokens = options.max_tokens;
        let (generator, _) = native(py, |d| {
            let mut ctx = lock_shared(&this.inner, d);
            ctx.start_chat(seq, &messages, options, d)
        })?;
        Ok(TokenStream {
            context: slf.clone().unbind(),
            generator: DetachedMutex::new(Some(generator)),
            seq,
            max_tokens,
            progress: StreamProgress::default(),
        })
    }

    /// Replace sequence ``dst`` by a copy of sequence ``src`` (tokens and KV cache), decoding nothing.
    ///
    /// A prefix encoded once (a long system prompt) then serves many sequences; each continues exactly as
    /// ``src`` would.
    fn copy_sequence(&self, py: Python<'_>, src: i64, dst: i64) -> PyResult<()> {
        let (src, dst) = (seq_id(src)?, seq_id(dst)?);
        native(py, |d| lock_shared(&self.inner, d).copy_sequence(src, dst))
    }

    /// Save the context's state (or only sequence ``seq``) to ``path``.
    ///
    /// The file records the model fingerprint, the state-relevant parameters (as llama.cpp allocated them),
    /// the tokens, ``metadata`` (a dict of JSON values, at most 16 MiB, kept exactly: a non-str key, a NaN or
    /// an infinity, or a value of another type raises InvalidParameterError naming it) and a checksum; see
    /// docs/session-format.md. It is written to a
    /// temporary file, fsynced and renamed over ``path``: a crash leaves the old file or the new one; an OS
    /// error (a full disk, a read-only directory) raises a StorageError, which is also an OSError.
    /// With ``secret_key`` (bytes, at least 16) the session is signed: a keyed BLAKE3 MAC over the whole
    /// file, which only the same key verifies (see docs/reliability.md).
    /// ``format="llama.cpp"`` writes llama.cpp's own session file instead (what ``llama_state_save_file``
    /// writes), for a context with n_seq_max == 1.
    #[pyo3(signature = (path, *, metadata = None, seq = None, format = "llama-sessions", secret_key = None))]
    fn save_session(
        &self,
        py: Python<'_>,
        path: PathBuf,
        metadata: Option<Bound<'_, PyAny>>,
        seq: Option<i64>,
        format: &str,
        secret_key: Option<PyBackedBytes>,
    ) -> PyResult<PySessionInfo> {
        let format = SessionFormat::parse(format).map_err(to_py)?;
        let key = session_key(secret_key)?;
        let seq = seq_arg(seq)?;
        let metadata = metadata_from_py(py, metadata)?;
        let info = native(py, |d| {
            let ctx = lock_shared(&self.inner, d);
            match format {
                SessionFormat::LlamaSessions => {
                    ctx.save_session(&path, seq, &metadata, key.as_ref())
                }
                SessionFormat::LlamaCpp => {
                    if seq.is_some() || !metadata.is_empty() || key.is_some() {
                        return Err(Error::invalid(
                            "format",
                            "\"llama-sessions\" to save a single sequence, metadata or a signed session (a \
                             llama.cpp session holds none of them)",
                            "\"llama.cpp\"",
                        ));
                    }
                    ctx.save_llama_cpp_session(&path)
                }
            }
        });
        Ok(PySessionInfo { info: info? })
    }

    /// Replace the context's state by the session at ``path``; the next call continues after its tokens.
    ///
    /// Everything is checked before llama.cpp sees a byte: SessionCorruptError (not a session, truncated,
    /// changed, or llama.cpp state whose cell records or sizes do not match the recorded tokens and this
    /// context), SessionModelMismatchError (another model or other weights), SessionParamsMismatchError (a
    /// state-relevant parameter differs), SessionVersionError (newer format, other llama.cpp build),
    /// SessionSignatureError (with ``secret_key``: unsigned, modified, or signed with another key; without:
    /// the session is signed). A failed load leaves the context exactly as it was. With ``seq``, the file
    /// must hold one sequence, which replaces sequence ``seq``; without, every other sequence is emptied. A
    /// llama.cpp session file is loaded too, with a SessionInteropWarning, after the same checks of its
    /// state.
    #[pyo3(signature = (path, *, seq = None, secret_key = None))]
    fn load_session(
        &self,
        py: Python<'_>,
        path: PathBuf,
        seq: Option<i64>,
        secret_key: Option<PyBackedBytes>,
    ) -> PyResult<PySessionInfo> {
        let seq = seq_arg(seq)?;
        let key = session_key(secret_key)?;
        let loaded = native(py, |d| {
            let mut context = lock_shared(&self.inner, d);
            let loaded = context.load_session(&path, seq, key.as_ref())?;
            context.set_last_stats(None);
            Ok(loaded)
        })?;
        warn_all(py, &loaded.warnings)?;
        Ok(PySessionInfo { info: loaded.info })
    }

    /// The context's state (or sequence ``seq``) as session bytes, in the file format; signed with
    /// ``secret_key`` if given.
    ///
    /// Store them anywhere (memory, a database, another process) and give them to restore(): cheap enough for
    /// undo checkpoints.
    #[pyo3(signature = (*, seq = None, metadata = None, secret_key = None))]
    // The one binding call that takes the GIL back while it holds the context's lock: the `bytes` object must be
    // allocated with the GIL, and llama.cpp then writes the state straight into it with the GIL released again
    // (no copy). The lock itself is still taken with the GIL released, so no thread waits for it holding the GIL.
    #[allow(clippy::disallowed_methods)]
    fn snapshot<'py>(
        &self,
        py: Python<'py>,
        seq: Option<i64>,
        metadata: Option<Bound<'_, PyAny>>,
        secret_key: Option<PyBackedBytes>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let seq = seq_arg(seq)?;
        let key = session_key(secret_key)?;
        let metadata = metadata_from_py(py, metadata)?;
        let bytes = py.detach(|| -> PyResult<Py<PyBytes>> {
            let mut guard = self
                .inner
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let ctx: &mut Context = &mut guard;
            let plan = ctx
                .plan_session(seq, &metadata, key.is_some())
                .map_err(to_py)?;
            // The state is copied by llama.cpp straight into the new `bytes` object, with the GIL released
            // again while it does; the context stays locked from planning to writing.
            let len = plan.len();
            Python::attach(move |py| {
                PyBytes::new_with(py, len, move |buf| {
                    py.detach(move || ctx.write_session(&plan, buf, key.as_ref()))
                        .map_err(to_py)
                })
                .map(Bound::unbind)
            })
        })?;
        Ok(bytes.into_bound(py))
    }

    /// Replace the context's state by session bytes from snapshot() or a file, with the checks of
    /// load_session(); a failed restore leaves the context exactly as it was.
    ///
    /// ``data`` is ``bytes`` or any object of the buffer protocol (bytearray, memoryview, mmap, ...: copied
    /// once); anything else raises InvalidParameterError. A SessionParamsMismatchError advises
    /// Context.from_session (or a context created with the saved ``params``).
    #[pyo3(signature = (data, *, seq = None, secret_key = None))]
    fn restore(
        &self,
        py: Python<'_>,
        data: &Bound<'_, PyAny>,
        seq: Option<i64>,
        secret_key: Option<PyBackedBytes>,
    ) -> PyResult<PySessionInfo> {
        let data = session_bytes_arg("data", data)?;
        let seq = seq_arg(seq)?;
        let key = session_key(secret_key)?;
        native(py, |d| {
            let mut context = lock_shared(&self.inner, d);
            let info = context.restore(&data, seq, key.as_ref())?;
            context.set_last_stats(None);
            Ok(info)
        })
        .map(|info| PySessionInfo { info })
    }

    /// Create a Context with the parameters recorded in the session at ``path`` and load it.
    ///
    /// Raises the errors of load_session(); InvalidParameterError for a llama.cpp session file (it records
    /// no parameters).
    #[staticmethod]
    #[pyo3(signature = (model, path, *, n_threads = None, secret_key = None))]
    fn from_session(
        py: Python<'_>,
        model: Py<PyModel>,
        path: PathBuf,
        n_threads: Option<i64>,
        secret_key: Option<PyBackedBytes>,
    ) -> PyResult<PyContext> {
        let key = session_key(secret_key)?;
        let n_threads = match n_threads {
            None => default_threads(),
            Some(n) => u32::try_from(n).ok().filter(|&n| n > 0).ok_or_else(|| {
                crate::errors::InvalidParameterError::new_err(format!(
                    "invalid n_threads: expected an integer >= 1, found {n}"
                ))
            })?,
        };
        let core_model = model.get().inner.clone();
        let (context, loaded) = native(py, |_| {
            Context::from_session(&core_model, &path, n_threads, key.as_ref())
        })?;
        warn_all(py, &loaded.warnings)?;
        Ok(PyContext::shared(Arc::new(Mutex::new(context)), model))
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let (held, n_ctx, n_seq_max) = native(py, |d| {
            let ctx = lock_shared(&self.inner, d);
            let params = ctx.params();
            Ok((
                ctx.token_count(0).unwrap_or(0),
                params.n_ctx,
                params.n_seq_max,
            ))
        })?;
        if n_seq_max == 1 {
            Ok(format!("Context(tokens={held}, n_ctx={n_ctx})"))
        } else {
            Ok(format!(
                "Context(tokens={held} in sequence 0, n_ctx={n_ctx}, n_seq_max={n_seq_max})"
            ))
        }
    }
}

/// Text pieces of a generation in progress, from Context.stream().
///
/// If another call changes the context between two steps, the next step raises StreamInvalidatedError.
#[pyclass(module = "llama_sessions._native", frozen)]
pub struct TokenStream {
    context: Py<PyContext>,
    generator: DetachedMutex<Option<Generator>>,
    seq: SeqId,
    max_tokens: usize,
    progress: StreamProgress,
}

#[pymethods]
impl TokenStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<String>> {
        let context = self.context.get();
        let (piece, stats) = native(py, |d| {
            let mut slot = self.generator.lock(d);
            let Some(generator) = slot.as_mut() else {
                return Ok((None, None));
            };
            let step = generator.next_piece(&mut lock_shared(&context.inner, d), d);
            self.progress
                .set_produced(generator.stats().generated_tokens);
            let ended = !matches!(step, Ok(Some(_)));
            let stats = ended.then(|| {
                let reason = generator.stop_reason().unwrap_or(StopReason::MaxTokens);
                PyGenerationStats::new(generator.stats(), reason)
            });
            match (&step, &stats) {
                (Err(_), _) => self.progress.end("state='failed'"),
                (Ok(_), Some(stats)) => self.progress.end(format!(
                    "state='ended', stop_reason='{}'",
                    stats.reason.as_str()
                )),
                (Ok(_), None) => {}
            }
            if ended {
                *slot = None;
            }
            step.map(|piece| (piece, stats))
        })?;
        if let Some(stats) = stats {
            context.record(py, stats)?;
        }
        Ok(piece)
    }

    /// ``TokenStream(seq=0, generated=3, max_tokens=32, state='running')``: the tokens generated so far;
    /// once the stream has ended, ``state='ended', stop_reason='length'`` (or another stop reason of
    /// GenerationStats), or ``state='failed'`` after an error.
    fn __repr__(&self) -> String {
        let (generated, state) = self.progress.describe();
        format!(
            "TokenStream(seq={}, generated={generated}, max_tokens={}, {state})",
            self.seq, self.max_tokens
        )
    }
}
