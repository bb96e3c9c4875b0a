//! The scheduler thread: each step samples every generating turn, runs the callers' commands, then decodes
//! one batch of the sampled tokens and the prompt chunks that fit, and hands each turn what it got.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use llama_cpp_2::token::LlamaToken;

use super::stream::TurnEvent;
use super::{Command, StopCause};
use crate::context::generation::Generator;
use crate::context::{Context, GenerateOptions, GenerationStats, SeqId, SequenceTokens};
use crate::error::{Error, Result};

/// A turn in progress on one sequence.
struct Turn {
    events: Sender<TurnEvent>,
    cancelled: Arc<AtomicBool>,
    phase: Phase,
}

enum Phase {
    /// Its prompt is being decoded, a chunk per step.
    Reading {
        tokens: Vec<LlamaToken>,
        read: usize,
        /// Prompt tokens that are not the turn's own (the last token held, decoded again for its logits).
        redecoded: usize,
        options: GenerateOptions,
        started: Instant,
    },
    /// It samples a token per step.
    Generating(Box<Generator>),
}

/// What a step does for one turn.
enum Work {
    Prompt { from: usize, to: usize },
    Sampled(LlamaToken),
}

pub(crate) struct Scheduler {
    ctx: Context,
    turns: BTreeMap<SeqId, Turn>,
    commands: Receiver<Command>,
    prompt_tokens_per_step: usize,
    steps: u64,
}

enum Flow {
    Continue,
    Stop,
}

impl Scheduler {
    pub(super) fn new(
        ctx: Context,
        commands: Receiver<Command>,
        prompt_tokens_per_step: usize,
    ) -> Self {
        Scheduler {
            ctx,
            turns: BTreeMap::new(),
            commands,
            prompt_tokens_per_step,
            steps: 0,
        }
    }

    /// The thread's body: steps until the engine is dropped. A panic in a step is caught here, recorded in
    /// `stop_cause` and sent to every turn as [`Error::Internal`]; the thread then ends, and with it the
    /// context, so that every later call finds the engine stopped.
    pub(super) fn run(mut self, stop_cause: &StopCause) {
        loop {
            match std::panic::catch_unwind(AssertUnwindSafe(|| self.step())) {
                Ok(Flow::Continue) => {}
                Ok(Flow::Stop) => return,
                Err(payload) => {
                    let message = super::panic_message(payload.as_ref());
                    stop_cause.set(format!("it panicked: {message}"));
                    for (_, turn) in std::mem::take(&mut self.turns) {
                        let _ = turn.events.send(TurnEvent::Failed(stop_cause.error()));
                    }
                    return;
                }
            }
        }
    }

    pub(super) fn context(&self) -> &Context {
        &self.ctx
    }

    pub(super) fn steps(&self) -> u64 {
        self.steps
    }

    /// The context, for a command on sequence `seq`, which must have no turn in progress.
    pub(super) fn idle_context(&mut self, seq: SeqId) -> Result<&mut Context> {
        self.ctx.check_seq(seq)?;
        if let Some(turn) = self.turns.get(&seq) {
            // A turn whose stream was dropped is over, even before the next step notices.
            if !turn.cancelled.load(Ordering::Acquire) {
                return Err(busy(seq));
            }
            self.turns.remove(&seq);
        }
        Ok(&mut self.ctx)
    }

    /// Registers a turn on `seq` after checking everything that would refuse it: the sequence is idle, the
    /// options are valid, the prompt fits.
    pub(super) fn start_turn(
        &mut self,
        seq: SeqId,
        tokens: impl FnOnce(&Context) -> Result<Vec<LlamaToken>>,
        options: GenerateOptions,
        events: Sender<TurnEvent>,
        cancelled: Arc<AtomicBool>,
    ) -> Result<()> {
        self.idle_context(seq)?;
        Generator::check_options(&self.ctx, &options)?;
        let mut tokens = tokens(&self.ctx)?;
        self.ctx.check_room(seq, tokens.len())?;
        self.ctx.model().check_tokens(&tokens)?;
        let mut redecoded = 0;
        if tokens.is_empty() {
            if options.max_tokens == 0 {
                let _ = events.send(TurnEvent::End {
                    piece: None,
                    stop_reason: crate::context::StopReason::MaxTokens,
                    stats: GenerationStats::default(),
                });
                return Ok(());
            }
            // Nothing to read, but the logits of the last token held are needed: decode it again, as
            // `Context::ensure_logits` does.
            let held = self.ctx.tokens(seq)?.to_vec();
            let Some(&last) = held.last() else {
                return Err(Error::invalid(
                    "prompt",
                    "a non-empty prompt: the sequence is empty and the model has no BOS token to start from",
                    "\"\"",
                ));
            };
            self.ctx.truncate(seq, held.len() - 1)?;
            tokens = vec![last];
            redecoded = 1;
        }
        self.turns.insert(
            seq,
            Turn {
                events,
                cancelled,
                phase: Phase::Reading {
                    tokens,
                    read: 0,
                    redecoded,
                    options,
                    started: Instant::now(),
                },
            },
        );
        Ok(())
    }

    fn step(&mut self) -> Flow {
        let sampled = self.sample_generating();
        if let Flow::Stop = self.run_commands() {
            return Flow::Stop;
        }
        self.drop_cancelled();
        let work = self.plan(sampled);
        if !work.is_empty() {
            self.decode(&work);
        }
        Flow::Continue
    }

    /// Samples the next token of every generating turn from the logits of the last step (nothing has
    /// changed the cache since), ending the turns that are done.
    fn sample_generating(&mut self) -> Vec<(SeqId, LlamaToken)> {
        let mut sampled = Vec::new();
        let mut ended = Vec::new();
        for (&seq, turn) in &mut self.turns {
            let Phase::Generating(generator) = &mut turn.phase else {
                continue;
            };
            if turn.cancelled.load(Ordering::Acquire) {
                continue;
            }
            match generator.sample_next(&mut self.ctx) {
                Ok(Some(token)) => sampled.push((seq, token)),
                Ok(None) => {
                    let _ = turn.events.send(TurnEvent::End {
                        piece: generator.take_tail(),
                        stop_reason: generator
                            .stop_reason()
                            .unwrap_or(crate::context::StopReason::MaxTokens),
                        stats: generator.stats(),
                    });
                    ended.push(seq);
                }
                Err(e) => {
                    let _ = turn.events.send(TurnEvent::Failed(e));
                    ended.push(seq);
                }
            }
        }
        for seq in ended {
            self.turns.remove(&seq);
        }
        sampled
    }

    /// Runs the commands waiting; with no turn in progress, waits for one first.
    fn run_commands(&mut self) -> Flow {
        let mut wait = self.turns.is_empty();
        loop {
            let command = if wait {
                wait = false;
                match self.commands.recv() {
                    Ok(command) => command,
                    Err(_) => return self.shut_down(),
                }
            } else {
                match self.commands.try_recv() {
                    Ok(command) => command,
                    Err(TryRecvError::Empty) => return Flow::Continue,
                    Err(TryRecvError::Disconnected) => return self.shut_down(),
                }
            };
            match command {
                Command::Run(f) => f(self),
                Command::Wake => {}
                Command::Shutdown => return self.shut_down(),
            }
        }
    }

    fn shut_down(&mut self) -> Flow {
        for (_, turn) in std::mem::take(&mut self.turns) {
            let _ = turn.events.send(TurnEvent::Failed(Error::Interrupted));
        }
        Flow::Stop
    }

    /// Ends the turns whose stream was dropped: what they decoded stays in their sequences.
    fn drop_cancelled(&mut self) {
        self.turns
            .retain(|_, turn| !turn.cancelled.load(Ordering::Acquire));
    }

    /// This step's work: every sampled token, then prompt chunks within what is left of the batch, split
    /// evenly between the reading turns (a turn that needs less leaves the rest to the others).
    fn plan(&self, sampled: Vec<(SeqId, LlamaToken)>) -> Vec<(SeqId, Work)> {
        let mut work: Vec<(SeqId, Work)> = sampled
            .into_iter()
            // Only a turn still generating decodes its token (a cancelled one may have been replaced by a
            // new turn on its sequence in between).
            .filter(|(seq, _)| {
                self.turns
                    .get(seq)
                    .is_some_and(|turn| matches!(turn.phase, Phase::Generating(_)))
            })
            .map(|(seq, token)| (seq, Work::Sampled(token)))
            .collect();
        let mut budget = self
            .prompt_tokens_per_step
            .min(self.ctx.batch_capacity() - work.len());
        let mut readers: Vec<(SeqId, usize, usize)> = self
            .turns
            .iter()
            .filter_map(|(&seq, turn)| match &turn.phase {
                Phase::Reading { tokens, read, .. } => Some((seq, *read, tokens.len() - read)),
                Phase::Generating(_) => None,
            })
            .collect();
        readers.sort_by_key(|&(seq, _, need)| (need, seq));
        let mut left = readers.len();
        for (seq, read, need) in readers {
            let share = (budget / left).max(usize::from(budget > 0));
            let take = need.min(share);
            left -= 1;
            if take > 0 {
                budget -= take;
                work.push((
                    seq,
                    Work::Prompt {
                        from: read,
                        to: read + take,
                    },
                ));
            }
        }
        work
    }

    /// Decodes one batch and hands each turn its part. A sequence whose tokens llama.cpp did not keep (a
    /// failed decode cuts every sequence of the batch back) ends its turn with the error; its stream has
    /// returned exactly what it holds.
    fn decode(&mut self, work: &[(SeqId, Work)]) {
        self.steps += 1;
        let step = self.steps;
        let sampled_tokens: Vec<[LlamaToken; 1]> = work
            .iter()
            .map(|(_, w)| match w {
                Work::Sampled(token) => [*token],
                Work::Prompt { .. } => [LlamaToken(0)],
            })
            .collect();
        let mut parts = Vec::with_capacity(work.len());
        let mut expected = Vec::with_capacity(work.len());
        for ((seq, w), token) in work.iter().zip(&sampled_tokens) {
            let held = self.ctx.tokens(*seq).map_or(0, <[LlamaToken]>::len);
            let part = match (w, &self.turns[seq].phase) {
                (Work::Sampled(_), _) => SequenceTokens::sampled(*seq, token),
                (
                    Work::Prompt { from, to },
                    Phase::Reading {
                        tokens, options, ..
                    },
                ) => SequenceTokens {
                    seq: *seq,
                    tokens: &tokens[*from..*to],
                    want_logits: *to == tokens.len() && options.max_tokens > 0,
                    checkpoint_before: *from == 0,
                    checkpoint_after: *to == tokens.len(),
                },
                (Work::Prompt { .. }, Phase::Generating(_)) => {
                    unreachable!("prompt work is planned for reading turns only")
                }
            };
            expected.push(held + part.tokens.len());
            parts.push(part);
        }
        let started = Instant::now();
        let decoded = self.ctx.decode_batch(&parts);
        let seconds = started.elapsed().as_secs_f64();
        drop(parts);
        for (((seq, w), expected), token) in work.iter().zip(expected).zip(&sampled_tokens) {
            let kept = self.ctx.tokens(*seq).map_or(0, <[LlamaToken]>::len) == expected;
            let outcome = match &decoded {
                Err(e) if !kept => Err(shared_error(e)),
                _ => self.deliver(*seq, w, token[0], step, seconds),
            };
            if let Err(e) = outcome {
                if let Some(turn) = self.turns.remove(seq) {
                    let _ = turn.events.send(TurnEvent::Failed(e));
                }
            }
        }
    }

    /// Hands turn `seq` what this step decoded for it; an error ends the turn.
    fn deliver(
        &mut self,
        seq: SeqId,
        work: &Work,
        token: LlamaToken,
        step: u64,
        seconds: f64,
    ) -> Result<()> {
        let Some(turn) = self.turns.get_mut(&seq) else {
            return Ok(());
        };
        let event = match (work, &mut turn.phase) {
            (Work::Sampled(_), Phase::Generating(generator)) => {
                generator.add_generation_seconds(seconds);
                let piece = generator.accept(&self.ctx, token)?;
                TurnEvent::Token { token, piece, step }
            }
            (
                Work::Prompt { from, to },
                Phase::Reading {
                    tokens,
                    read,
                    redecoded,
                    options,
                    started,
                },
            ) => {
                *read = *to;
                let event = TurnEvent::PromptChunk {
                    step,
                    tokens: to - from,
                };
                if *read == tokens.len() {
                    let stats = GenerationStats {
                        prompt_tokens: tokens.len() - *redecoded,
                        context_tokens: self.ctx.token_count(seq)?,
                        prompt_seconds: started.elapsed().as_secs_f64(),
                        ..GenerationStats::default()
                    };
                    let generator =
                        Generator::after_prompt(&self.ctx, seq, options.clone(), stats)?;
                    turn.phase = Phase::Generating(Box::new(generator));
                }
                event
            }
            _ => {
                return Err(Error::Internal(
                    "a turn's work does not match its phase".to_owned(),
                ))
            }
        };
        if turn.events.send(event).is_err() {
            // The stream is gone: the turn is cancelled.
            turn.cancelled.store(true, Ordering::Release);
        }
        Ok(())
    }
}

fn busy(seq: SeqId) -> Error {
    Error::invalid(
        "seq",
        "a sequence with no turn in progress",
        format!("sequence {seq}, which has one"),
    )
}

/// `e` for one of the several turns a failed decode ends.
fn shared_error(e: &Error) -> Error {
    match e {
        Error::Decode { code, reason } => Error::Decode {
            code: *code,
            reason: reason.clone(),
        },
        other => Error::Internal(other.to_string()),
    }
}
