//! Several sequences in one `llama_decode`: the door continuous batching goes through.
//!
//! [`Context::decode_batch`] is [`Context::append`] for many sequences at once, limited to one decode call:
//! each sequence's tokens go after what it holds, at the positions its own token list gives, and its list
//! grows only by what llama.cpp accepted. The logits of the last token of every sequence that asked for them
//! stay available to [`Context::sample`](super::Context) until the next change of the cache.

use llama_cpp_2::token::LlamaToken;

use super::{decode_failure, Context, LastLogits, SeqId};
use crate::error::{Error, Result};

/// What one sequence adds in a [`Context::decode_batch`]: a chunk of its prompt, or the token it just
/// sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SequenceTokens<'a> {
    /// The sequence.
    pub seq: SeqId,
    /// The tokens to decode after what it holds (at least one).
    pub tokens: &'a [LlamaToken],
    /// Keep the logits of the last of them, to sample the sequence's next token.
    pub want_logits: bool,
    /// Where the context keeps state checkpoints (recurrent memory): take one before these tokens, where the
    /// sequence ends now (the start of a prompt, as [`Context::append`]'s callers do).
    pub checkpoint_before: bool,
    /// Likewise, where the sequence ends after them (the end of a prompt).
    pub checkpoint_after: bool,
}

impl<'a> SequenceTokens<'a> {
    /// A token just sampled for `seq`, decoded for the logits of the one after it.
    pub fn sampled(seq: SeqId, token: &'a [LlamaToken]) -> Self {
        SequenceTokens {
            seq,
            tokens: token,
            want_logits: true,
            checkpoint_before: false,
            checkpoint_after: false,
        }
    }
}

impl Context {
    /// Most tokens one [`Context::decode_batch`] takes, all sequences together: `n_batch` as llama.cpp
    /// allocated it.
    pub fn batch_capacity(&self) -> usize {
        self.chunk_len
    }

    /// Decodes the tokens of several sequences in one llama.cpp call. Each sequence appears at most once;
    /// together they hold at most [`Context::batch_capacity`] tokens.
    ///
    /// Nothing is decoded if a sequence is out of range or repeated, a part is empty, the parts exceed the
    /// batch, a sequence's tokens do not fit in it ([`Error::ContextFull`], for the first such sequence, as
    /// [`Context::check_room`] reports it) or contain an id outside the vocabulary. If llama.cpp fails, every
    /// sequence of the batch is cut back to what it held before the call (cells and bookkeeping: llama.cpp
    /// may have kept the tokens of the micro-batches it finished), its checkpoints taken before the call kept,
    /// and [`Error::Decode`] is returned; the sequences not in the batch are untouched.
    pub fn decode_batch(&mut self, parts: &[SequenceTokens<'_>]) -> Result<()> {
        self.check_batch(parts)?;
        // llama.cpp splits a batch over several KV streams (one per sequence) into micro-batches of
        // consecutive sequence ids taken in batch order, so ascending ids let one micro-batch take them all.
        let mut order: Vec<&SequenceTokens<'_>> = parts.iter().collect();
        order.sort_by_key(|part| part.seq);
        for part in &order {
            if part.checkpoint_before {
                self.take_checkpoint(part.seq)?;
            }
        }
        let held: Vec<usize> = order
            .iter()
            .map(|part| self.sequences[part.seq as usize].len())
            .collect();
        self.batch.clear();
        let mut kept = Vec::new();
        for (part, &held) in order.iter().zip(&held) {
            for (i, &token) in part.tokens.iter().enumerate() {
                let position =
                    i32::try_from(held + i).expect("positions are below n_ctx, which fits in i32");
                let logits = part.want_logits && i + 1 == part.tokens.len();
                if logits {
                    kept.push(LastLogits {
                        seq: part.seq,
                        batch_index: self.batch.n_tokens(),
                    });
                }
                self.batch
                    .add(token, position, &[part.seq as i32], logits)
                    .map_err(|e| {
                        Error::Internal(format!("batch sized n_batch refused a token: {e}"))
                    })?;
            }
        }
        self.epoch += 1;
        self.last_logits = None;
        self.batch_logits = (self.epoch, Vec::new());
        let (batch, n_threads) = (&mut self.batch, self.params.n_threads);
        let decoded = self
            .llama
            .with_mut(|ctx| crate::compute::decode(ctx, batch, n_threads));
        if let Err(e) = decoded {
            let mut first_failure = None;
            for (part, &held) in order.iter().zip(&held) {
                if let Err(failure) = self.remove_from(part.seq, held) {
                    first_failure.get_or_insert(failure);
                }
            }
            return Err(first_failure.unwrap_or_else(|| decode_failure(e)));
        }
        for part in &order {
            self.sequences[part.seq as usize].extend_from_slice(part.tokens);
        }
        self.batch_logits = (self.epoch, kept);
        let mut first_failure = None;
        for part in &order {
            let checked = self.verify(part.seq).and_then(|()| {
                if part.checkpoint_after {
                    self.take_checkpoint(part.seq)
                } else {
                    Ok(())
                }
            });
            if let Err(failure) = checked {
                first_failure.get_or_insert(failure);
            }
        }
        first_failure.map_or(Ok(()), Err)
    }

    /// Every check of [`Context::decode_batch`] that runs before anything changes.
    fn check_batch(&self, parts: &[SequenceTokens<'_>]) -> Result<()> {
        if self.llama.pooled().is_some() {
            return Err(Error::invalid(
                "context",
                "a context of its own (a pooled context is batched by its pool)",
                "a pooled context",
            ));
        }
        if parts.is_empty() {
            return Err(Error::invalid(
                "parts",
                "at least one sequence's tokens",
                "an empty list",
            ));
        }
        let mut seen = vec![false; self.sequences.len()];
        let mut total = 0;
        for part in parts {
            self.check_seq(part.seq)?;
            if std::mem::replace(&mut seen[part.seq as usize], true) {
                return Err(Error::invalid(
                    "parts",
                    "each sequence at most once",
                    format!("sequence {} twice", part.seq),
                ));
            }
            if part.tokens.is_empty() {
                return Err(Error::invalid(
                    "tokens",
                    "at least one token per sequence",
                    format!("none for sequence {}", part.seq),
                ));
            }
            total += part.tokens.len();
        }
        if total > self.chunk_len {
            return Err(Error::invalid(
                "parts",
                format!(
                    "at most {} tokens in all (n_batch as allocated)",
                    self.chunk_len
                ),
                total,
            ));
        }
        for part in parts {
            self.check_room(part.seq, part.tokens.len())?;
            self.model.check_tokens(part.tokens)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::test_support::test_model;
    use crate::context::NeverInterrupt;
    use crate::{ContextParams, SamplingParams};

    fn params() -> ContextParams {
        ContextParams {
            n_ctx: 1024,
            n_batch: 64,
            n_seq_max: 4,
            ..ContextParams::default()
        }
    }

    /// `sample` hands llama.cpp a batch index whose logits it does not check: each sequence must get the
    /// index of its own last token, and none once anything else was decoded.
    #[test]
    fn each_sequence_samples_from_its_own_logits_until_the_next_decode() {
        let model = test_model();
        let prompts = ["The capital of France is", "One, two, three, four,"];
        let tokens: Vec<Vec<LlamaToken>> = prompts
            .iter()
            .map(|p| model.tokenize(p, true, true).unwrap())
            .collect();
        let greedy = |ctx: &mut Context, seq| {
            let mut sampler = SamplingParams::greedy().build(model.n_vocab() as i32, &[]);
            ctx.sample(&mut sampler, seq)
        };
        // Each prompt alone: its next token.
        let mut alone = Context::new(&model, params()).unwrap();
        let mut expected = Vec::new();
        for (seq, t) in tokens.iter().enumerate() {
            alone
                .append(seq as SeqId, t, true, &mut NeverInterrupt)
                .unwrap();
            expected.push(greedy(&mut alone, seq as SeqId).unwrap());
        }
        assert_ne!(expected[0], expected[1]);

        // Together, listed in the other order (the batch sorts them), and a third sequence without logits.
        let mut ctx = Context::new(&model, params()).unwrap();
        let part = |seq, tokens, want_logits| SequenceTokens {
            want_logits,
            ..SequenceTokens::sampled(seq, tokens)
        };
        ctx.decode_batch(&[
            part(3, &tokens[0], false),
            part(1, &tokens[1], true),
            part(0, &tokens[0], true),
        ])
        .unwrap();
        assert_eq!(greedy(&mut ctx, 0).unwrap(), expected[0]);
        assert_eq!(greedy(&mut ctx, 1).unwrap(), expected[1]);
        assert!(matches!(greedy(&mut ctx, 3), Err(Error::StreamInvalidated)));
        assert!(matches!(greedy(&mut ctx, 2), Err(Error::StreamInvalidated)));
        // A decode of another sequence overwrites llama.cpp's logits: none are handed out any more.
        ctx.append(2, &tokens[1], false, &mut NeverInterrupt)
            .unwrap();
        assert!(matches!(greedy(&mut ctx, 0), Err(Error::StreamInvalidated)));
        assert!(matches!(greedy(&mut ctx, 1), Err(Error::StreamInvalidated)));
    }
}
