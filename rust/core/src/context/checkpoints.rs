//! State checkpoints of recurrent and hybrid memory: what lets [`Context::truncate`] and prefix reuse cut such
//! a sequence back without decoding it again from the start.
//!
//! A recurrent state holds the whole history in one cell, which llama.cpp cannot take tokens out of. So at
//! the turn boundaries of a decode (where the sequence ended before it, at the message boundaries a chat
//! names, and at the end of the prompt) the context copies llama.cpp's *partial* state of the sequence
//! (`LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY`: the recurrent cell alone, not the attention cells of a hybrid, as
//! llama.cpp's server does for its context checkpoints). Cutting the sequence back to `n` then restores the
//! nearest checkpoint at or below `n` through the one door for state bytes ([`Context::replace_sequence`]'s
//! checked loader), drops the attention cells past it, and decodes only the tokens from it to `n`.
//!
//! Policy: at most [`MAX_CHECKPOINTS`] per sequence, the first one (the end of a chat's system prompt, or of
//! the first prompt: what every edit of the history keeps) and the most recent others. Each costs one
//! recurrent state (fixed size, whatever the sequence's length), so a sequence's checkpoints never take more
//! than `MAX_CHECKPOINTS` of them. They are dropped when the sequence is cut below them, reset, restored or
//! replaced.

use llama_cpp_2::context::session::LlamaStateSeqFlags;
use llama_cpp_2::token::LlamaToken;

use super::{Context, Interrupt, SeqId, StateScope};
use crate::error::{Error, Result};
use crate::llama_state::MemoryLayout;

/// Most checkpoints a sequence keeps: the first and the seven most recent.
pub const MAX_CHECKPOINTS: usize = 8;

/// llama.cpp's partial state of a sequence when it held its first `tokens` tokens.
#[derive(Clone)]
pub(crate) struct Checkpoint {
    pub(crate) tokens: usize,
    pub(crate) state: Vec<u8>,
}

impl Context {
    /// The layout of a partial state (the recurrent section alone), where this context keeps checkpoints.
    pub(super) fn checkpoint_layout(&self) -> Option<MemoryLayout> {
        match &self.layout {
            Ok(MemoryLayout::Hybrid { recurrent, .. } | MemoryLayout::Recurrent(recurrent)) => {
                Some(MemoryLayout::Recurrent(recurrent.clone()))
            }
            _ => None,
        }
    }

    /// True where this context keeps state checkpoints (recurrent and hybrid memory).
    pub(crate) fn keeps_checkpoints(&self) -> bool {
        self.checkpoint_layout().is_some()
    }

    /// The token counts at which sequence `seq` holds checkpoints, in increasing order.
    pub fn checkpoint_positions(&self, seq: SeqId) -> Result<Vec<usize>> {
        self.check_seq(seq)?;
        Ok(self.checkpoints[seq as usize]
            .iter()
            .map(|c| c.tokens)
            .collect())
    }

    /// Bytes the checkpoints of sequence `seq` take.
    pub fn checkpoint_bytes(&self, seq: SeqId) -> Result<usize> {
        self.check_seq(seq)?;
        Ok(self.checkpoints[seq as usize]
            .iter()
            .map(|c| c.state.len())
            .sum())
    }

    /// The checkpoints of sequence `seq`: token count and llama.cpp's partial state bytes (a test hook: the
    /// fuzz corpus seeds the state checker with real checkpoints).
    #[doc(hidden)]
    pub fn checkpoint_states(&self, seq: SeqId) -> Result<Vec<(usize, &[u8])>> {
        self.check_seq(seq)?;
        Ok(self.checkpoints[seq as usize]
            .iter()
            .map(|c| (c.tokens, c.state.as_slice()))
            .collect())
    }

    /// Copies llama.cpp's partial state of sequence `seq` as a checkpoint at its current length, where this
    /// context keeps checkpoints and none is there yet.
    pub(super) fn take_checkpoint(&mut self, seq: SeqId) -> Result<()> {
        let held = self.sequences[seq as usize].len();
        let list = &self.checkpoints[seq as usize];
        if held == 0 || self.checkpoint_layout().is_none() || list.iter().any(|c| c.tokens == held)
        {
            return Ok(());
        }
        let flags = LlamaStateSeqFlags::PARTIAL_ONLY;
        let llama_seq = self.llama.seq(seq);
        let (len, state, written) = self.llama.with(|ctx| {
            let len = ctx.state_seq_get_size_ext(llama_seq, flags);
            let mut state = vec![0; len];
            // SAFETY: llama-cpp-2 passes no bound to `llama_state_seq_get_data_ext`; `state` is exactly the
            // size `llama_state_seq_get_size_ext` just computed with the same flags and serializer (a counting
            // writer), and nothing changed the memory in between: both calls run in one `with`, which holds
            // the context (a pooled one's lock; its other sequences' decodes do not touch this sequence's
            // stream either). (Tested by rust/core/tests/checkpoints.rs, which restores checkpoints through
            // the layout check, and fuzz_corpus.rs, which checks a real checkpoint's bytes against it.)
            let written =
                unsafe { ctx.state_seq_get_data_ext(state.as_mut_ptr(), llama_seq, flags) };
            (len, state, written)
        });
        if written != len {
            return Err(Error::Internal(format!(
                "llama.cpp wrote {written} bytes of the partial state of sequence {seq}, {len} were expected"
            )));
        }
        let list = &mut self.checkpoints[seq as usize];
        let at = list.partition_point(|c| c.tokens < held);
        list.insert(
            at,
            Checkpoint {
                tokens: held,
                state,
            },
        );
        if list.len() > MAX_CHECKPOINTS {
            // Keep the first (what every edit of a chat's history keeps) and the most recent.
            list.remove(1);
        }
        Ok(())
    }

    /// The largest token count at most `n` at which sequence `seq` holds a checkpoint (0: none).
    pub(super) fn nearest_checkpoint(&self, seq: SeqId, n: usize) -> usize {
        self.checkpoints[seq as usize]
            .iter()
            .rev()
            .find(|c| c.tokens <= n)
            .map_or(0, |c| c.tokens)
    }

    /// Puts sequence `seq` back to its checkpoint at `at` tokens (which exists, at or below what it holds):
    /// the partial state goes through the checked loader, then the attention cells past it are dropped.
    pub(super) fn restore_checkpoint(&mut self, seq: SeqId, at: usize) -> Result<()> {
        let list = &mut self.checkpoints[seq as usize];
        let Some(index) = list.iter().position(|c| c.tokens == at) else {
            return Err(Error::Internal(format!(
                "sequence {seq} has no checkpoint at {at} tokens"
            )));
        };
        // Lent out rather than copied (a real model's recurrent state is up to hundreds of MB), and put back
        // where it still is: the load keeps the checkpoints at or below `at`, or clears them all on failure.
        let state = std::mem::take(&mut list[index].state);
        let tokens: Vec<LlamaToken> = self.sequences[seq as usize][..at].to_vec();
        let loaded = self.load_state(
            seq,
            &state,
            StateScope::Partial,
            tokens,
            seq,
            &format!("the checkpoint of sequence {seq} at {at} tokens"),
        );
        if let Some(checkpoint) = self.checkpoints[seq as usize]
            .iter_mut()
            .find(|c| c.tokens == at)
        {
            checkpoint.state = state;
        }
        loaded
    }

    /// Forgets the checkpoints of sequence `seq` past `keep` tokens (the sequence was cut back to `keep`).
    pub(super) fn drop_checkpoints_above(&mut self, seq: SeqId, keep: usize) {
        self.checkpoints[seq as usize].retain(|c| c.tokens <= keep);
    }

    /// [`Context::append`] that, where this context keeps checkpoints, takes one where the sequence ends now,
    /// at each of `boundaries` (token counts) the tokens cross, and at their end.
    pub(crate) fn append_with_checkpoints(
        &mut self,
        seq: SeqId,
        tokens: &[LlamaToken],
        boundaries: &[usize],
        want_logits: bool,
        interrupt: &mut dyn Interrupt,
    ) -> Result<()> {
        if self.checkpoint_layout().is_none() || tokens.is_empty() {
            return self.append(seq, tokens, want_logits, interrupt);
        }
        self.check_room(seq, tokens.len())?;
        self.take_checkpoint(seq)?;
        let start = self.sequences[seq as usize].len();
        let mut from = 0;
        let mut cuts: Vec<usize> = boundaries
            .iter()
            .filter(|&&b| b > start && b < start + tokens.len())
            .map(|&b| b - start)
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        for cut in cuts {
            self.append(seq, &tokens[from..cut], false, interrupt)?;
            self.take_checkpoint(seq)?;
            from = cut;
        }
        self.append(seq, &tokens[from..], want_logits, interrupt)?;
        self.take_checkpoint(seq)
    }
}
