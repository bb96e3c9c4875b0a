//! What the repr of a stream shows (`TokenStream`, `ChatStream`): kept outside the stream's own lock, so that
//! a repr never waits for a generation step of another thread.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// How far a stream got: what it produced so far, and how it ended once it has.
#[derive(Debug, Default)]
pub struct StreamProgress {
    produced: AtomicUsize,
    ended: OnceLock<String>,
}

impl StreamProgress {
    /// Notes that the stream has produced `count` tokens (or pieces) so far.
    pub fn set_produced(&self, count: usize) {
        self.produced.store(count, Ordering::Relaxed);
    }

    /// Notes one more piece.
    pub fn add_produced(&self) {
        self.produced.fetch_add(1, Ordering::Relaxed);
    }

    /// Notes how the stream ended, as its repr shows it (`state='ended', stop_reason='eog'`, ...); the first
    /// note stands.
    pub fn end(&self, how: impl Into<String>) {
        let _ = self.ended.set(how.into());
    }

    /// What was produced so far, and `state='running'` or how the stream ended.
    pub fn describe(&self) -> (usize, &str) {
        let state = self.ended.get().map_or("state='running'", String::as_str);
        (self.produced.load(Ordering::Relaxed), state)
    }
}
