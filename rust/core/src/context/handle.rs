//! Where a [`Context`](super::Context)'s llama.cpp context is: its own, or one it shares with other Contexts
//! ([`crate::engine::ContextPool`]), each of which owns one sequence of it, so that the pool decodes all of
//! them in one batch.
//!
//! Every llama.cpp call of a Context goes through [`LlamaHandle`]: it maps the Context's sequence ids to the
//! shared context's ([`LlamaHandle::seq`]) and holds the shared context's lock for the whole call, so that a
//! size read and the write it sizes see the same cache even while other threads decode their sequences.

use llama_cpp_2::context::LlamaContext;

use super::{ContextCell, SeqId};
use crate::engine::PooledSequence;

/// The llama.cpp context of a [`Context`](super::Context).
pub(crate) enum LlamaHandle {
    /// A context of its own: its sequences are llama.cpp's.
    Own(ContextCell),
    /// One sequence of a pool's shared context: the Context's sequence 0 is the pool's `seq`.
    Pooled(PooledSequence),
}

impl LlamaHandle {
    /// Runs `f` on the llama.cpp context (a pooled one under the pool's lock).
    pub(crate) fn with<R>(&self, f: impl FnOnce(&LlamaContext<'_>) -> R) -> R {
        match self {
            LlamaHandle::Own(cell) => f(cell.borrow_dependent()),
            LlamaHandle::Pooled(pooled) => pooled.with_llama(|cell| f(cell.borrow_dependent())),
        }
    }

    /// Runs `f` on the llama.cpp context, mutably (a pooled one under the pool's lock).
    pub(crate) fn with_mut<R>(&mut self, f: impl FnOnce(&mut LlamaContext<'_>) -> R) -> R {
        match self {
            LlamaHandle::Own(cell) => cell.with_dependent_mut(|_, ctx| f(ctx)),
            LlamaHandle::Pooled(pooled) => {
                pooled.with_llama(|cell| cell.with_dependent_mut(|_, ctx| f(ctx)))
            }
        }
    }

    /// llama.cpp's id of the Context's sequence `seq` (checked by the caller: below the Context's
    /// `n_seq_max`, which is 1 for a pooled Context).
    pub(crate) fn seq(&self, seq: SeqId) -> i32 {
        match self {
            LlamaHandle::Own(_) => seq as i32,
            LlamaHandle::Pooled(pooled) => {
                debug_assert_eq!(seq, 0, "a pooled context has one sequence");
                pooled.seq()
            }
        }
    }

    /// The pool's sequence, for a pooled Context, mutably (for its decodes).
    pub(crate) fn pooled_mut(&mut self) -> Option<&mut PooledSequence> {
        match self {
            LlamaHandle::Own(_) => None,
            LlamaHandle::Pooled(pooled) => Some(pooled),
        }
    }

    /// The pool's sequence, for a pooled Context.
    pub(crate) fn pooled(&self) -> Option<&PooledSequence> {
        match self {
            LlamaHandle::Own(_) => None,
            LlamaHandle::Pooled(pooled) => Some(pooled),
        }
    }
}
