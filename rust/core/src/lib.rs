//! # llama-sessions
//!
//! Resumable local inference over llama.cpp (through `llama-cpp-2`): a [`Context`] that owns its KV cache
//! *and* the bookkeeping of which tokens sit at which positions, so that no caller ever passes a position.
//!
//! ```no_run
//! use llama_sessions::{Context, ContextParams, GenerateOptions, Model, ModelParams, NeverInterrupt};
//! use llama_sessions::SamplingParams;
//!
//! let model = Model::load("SmolLM2-135M-Instruct.Q4_1.gguf", &ModelParams::default())?;
//! let mut ctx = Context::new(&model, ContextParams::default())?;
//! let options = |max_tokens| GenerateOptions { max_tokens, sampling: SamplingParams::greedy(), ..Default::default() };
//! ctx.generate(0, "You are a terse assistant.\n", options(0), &mut NeverInterrupt)?; // encode only
//! let answer = ctx.generate(0, "Q: What is the capital of France?\nA:", options(16), &mut NeverInterrupt)?;
//! println!("{} ({} tokens held)", answer.text, ctx.token_count(0)?);
//! # Ok::<(), llama_sessions::Error>(())
//! ```

#![warn(missing_docs)]

mod backend;
pub mod chunks;
mod compute;
mod context;
mod durable;
mod engine;
mod error;
pub mod gguf;
pub mod llama_state;
pub mod manager;
mod model;
mod params;
pub mod redis_store;
pub mod s3_store;
mod sampling;
mod session;
pub mod session_format;
mod signing;
pub mod store;
mod sync;
mod text;

pub use chunks::PrefixCache;
pub use context::generation::Generator;
pub use context::SequenceTokens;
pub use context::{
    Context, GenerateOptions, Generation, GenerationStats, Interrupt, ManifestSnapshot,
    NeverInterrupt, SeqId, SequenceCopy, StopReason, MAX_CHECKPOINTS,
};
pub use engine::{
    ContextPool, Engine, PoolMemory, PoolStats, TurnStream, DEFAULT_PROMPT_TOKENS_PER_STEP,
};
pub use error::{Error, ParamMismatch, ParamValue, Result, CONTEXT_MISMATCH_ADVICE};
pub use llama_cpp_2::token::LlamaToken;
pub use manager::{
    ChatTurn, ListedSession, ManagedSession, ManagerStats, OverflowPolicy, SessionManager,
    SessionTurn, TurnWait,
};
pub use model::{ChatMessage, MemoryKind, Model, ModelParams};
pub use params::{default_threads, ContextParams, KvType, MAX_SEQUENCES};
pub use redis_store::RedisStore;
pub use s3_store::S3Store;
pub use sampling::{SamplingParams, DEFAULT_MAX_TOKENS, DEFAULT_SAMPLING};
pub use session::{
    inspect_session, inspect_session_bytes, params_from_record, Loaded, Metadata, SessionFormat,
    SessionInfo, SessionPlan,
};
pub use signing::{SessionKey, MIN_SECRET_LEN};
pub use store::{open_store, open_store_with_chunks, DirectoryStore, SessionStore};

/// The Rust examples of `docs/session-format.md`, compiled as doctests so that the document stays as written
/// (its other blocks run in `tests/test_docs_examples.py`).
#[cfg(doctest)]
#[doc = include_str!("../../../docs/session-format.md")]
pub struct SessionFormatDocExamples;

/// This crate's version, as recorded in what it writes.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
