//! The pure session readers of llama-sessions, compiled from the very same source files as the crate
//! (`#[path]` below) but without the rest of it: the fuzz build then needs neither llama.cpp (a C++ build
//! of minutes) nor its own copy of the main build's target directory, and builds in seconds. This root
//! provides what those modules reference from their crate (`crate::error`, `crate::signing`,
//! `crate::MAX_SEQUENCES`, `crate::Result`).
//!
//! `checks` holds what the targets assert; `rust/core/tests/fuzz_corpus.rs` includes the same file to
//! replay the corpus against the real crate in `cargo test`.

#![allow(dead_code)]

#[path = "../../rust/core/src/error.rs"]
pub mod error;
#[path = "../../rust/core/src/llama_state.rs"]
pub mod llama_state;
#[path = "../../rust/core/src/session_format.rs"]
pub mod session_format;
#[path = "../../rust/core/src/signing.rs"]
pub mod signing;

pub mod checks;

pub use error::{Error, Result};
pub use signing::SessionKey;

/// `llama_sessions::MAX_SEQUENCES` (rust/core/src/params.rs); session_format uses it only to bound a
/// capacity hint. `fuzz_corpus.rs` checks the two agree.
pub const MAX_SEQUENCES: u32 = 256;
