//! The caller's end of one turn: the pieces of text the scheduler hands over, step by step.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;

use llama_cpp_2::token::LlamaToken;

use super::{Command, StopCause};
use crate::context::{Generation, GenerationStats, SeqId, StopReason};
use crate::error::{Error, Result};

/// What the scheduler tells a turn's stream.
pub(super) enum TurnEvent {
    /// A chunk of the prompt of `tokens` tokens was decoded in `step`.
    PromptChunk { step: u64, tokens: usize },
    /// `token` was decoded in `step` and is held by the sequence; `piece` is the text it completed.
    Token {
        token: LlamaToken,
        piece: Option<String>,
        step: u64,
    },
    /// The turn ended; `piece` is the text held back until then.
    End {
        piece: Option<String>,
        stop_reason: StopReason,
        stats: GenerationStats,
    },
    /// The turn failed; what the sequence holds is what the stream returned before.
    Failed(Error),
}

/// One turn submitted to an [`Engine`](super::Engine): an iterator of the pieces of text it generates, in
/// order. Every token whose piece the stream has handed out (and every token before it) is held by the
/// sequence. Dropping the stream before its end cancels the turn: the tokens decoded so far stay in the
/// sequence and the other turns go on.
pub struct TurnStream {
    seq: SeqId,
    events: Receiver<TurnEvent>,
    cancelled: Arc<AtomicBool>,
    commands: Sender<Command>,
    stop_cause: StopCause,
    tokens: Vec<LlamaToken>,
    token_steps: Vec<u64>,
    prompt_chunks: Vec<(u64, usize)>,
    text: String,
    ended: Option<(StopReason, GenerationStats)>,
    /// Set once the stream has returned an error: it returns nothing after it.
    failed: bool,
}

impl std::fmt::Debug for TurnStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnStream")
            .field("seq", &self.seq)
            .field("tokens", &self.tokens.len())
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl TurnStream {
    pub(super) fn new(
        seq: SeqId,
        events: Receiver<TurnEvent>,
        cancelled: Arc<AtomicBool>,
        commands: Sender<Command>,
        stop_cause: StopCause,
    ) -> Self {
        TurnStream {
            seq,
            events,
            cancelled,
            commands,
            stop_cause,
            tokens: Vec::new(),
            token_steps: Vec::new(),
            prompt_chunks: Vec::new(),
            text: String::new(),
            ended: None,
            failed: false,
        }
    }

    /// The sequence this turn runs on.
    pub fn seq(&self) -> SeqId {
        self.seq
    }

    /// Waits for the next piece of text; `None` once the turn has ended. An error ends the stream.
    pub fn next_piece(&mut self) -> Result<Option<String>> {
        loop {
            if self.ended.is_some() || self.failed {
                return Ok(None);
            }
            let event = match self.events.recv() {
                Ok(event) => event,
                Err(_) => {
                    self.failed = true;
                    return Err(self.stop_cause.error());
                }
            };
            match event {
                TurnEvent::PromptChunk { step, tokens } => self.prompt_chunks.push((step, tokens)),
                TurnEvent::Token { token, piece, step } => {
                    self.tokens.push(token);
                    self.token_steps.push(step);
                    if let Some(piece) = piece {
                        return Ok(Some(self.keep(piece)));
                    }
                }
                TurnEvent::End {
                    piece,
                    stop_reason,
                    stats,
                } => {
                    self.ended = Some((stop_reason, stats));
                    if let Some(piece) = piece {
                        return Ok(Some(self.keep(piece)));
                    }
                }
                TurnEvent::Failed(error) => {
                    self.failed = true;
                    return Err(error);
                }
            }
        }
    }

    fn keep(&mut self, piece: String) -> String {
        self.text.push_str(&piece);
        piece
    }

    /// Runs the turn to its end and returns it whole (the text not yet handed out included).
    pub fn finish(mut self) -> Result<Generation> {
        while self.next_piece()?.is_some() {}
        let (stop_reason, stats) = self.ended.ok_or_else(|| {
            Error::Internal("a finished turn stream has no end recorded".to_owned())
        })?;
        Ok(Generation {
            text: std::mem::take(&mut self.text),
            tokens: std::mem::take(&mut self.tokens),
            stop_reason,
            stats,
        })
    }

    /// The tokens generated so far (all held by the sequence), in order.
    pub fn tokens(&self) -> &[LlamaToken] {
        &self.tokens
    }

    /// For each of [`TurnStream::tokens`], the engine step that decoded it (steps count the engine's decode
    /// calls from 1).
    pub fn token_steps(&self) -> &[u64] {
        &self.token_steps
    }

    /// The steps that decoded the prompt, with how many of its tokens each took.
    pub fn prompt_chunks(&self) -> &[(u64, usize)] {
        &self.prompt_chunks
    }

    /// Why the turn ended, once the stream has reached its end.
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.ended.map(|(reason, _)| reason)
    }

    /// The turn's counts and times, once the stream has reached its end.
    pub fn stats(&self) -> Option<GenerationStats> {
        self.ended.map(|(_, stats)| stats)
    }
}

impl Iterator for TurnStream {
    type Item = Result<String>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_piece().transpose()
    }
}

impl Drop for TurnStream {
    fn drop(&mut self) {
        if self.ended.is_none() && !self.failed {
            self.cancelled.store(true, Ordering::Release);
            // Wakes a scheduler that waits for work; an engine already gone has nothing left to cancel.
            let _ = self.commands.send(Command::Wake);
        }
    }
}
