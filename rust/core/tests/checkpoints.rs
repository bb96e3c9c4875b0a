//! State checkpoints of recurrent and hybrid memory (tiny-mamba2, tiny-lfm2): truncate and prefix reuse go
//! back to the nearest checkpoint and decode only the rest, and stay exactly what a fresh context decoding
//! the same tokens gives; a manager chat whose history lost its oldest turns decodes again only after the
//! system prompt.

#[allow(dead_code)]
mod common;

use std::sync::Arc;

use common::{arch_chat_model, arch_model, greedy, temp_dir};
use llama_sessions::{
    ChatMessage, Context, ContextParams, DirectoryStore, LlamaToken, Metadata, Model,
    NeverInterrupt, OverflowPolicy, SessionManager, MAX_CHECKPOINTS,
};

const RECURRENT_MODELS: [&str; 2] = ["tiny-mamba2", "tiny-lfm2"];

const PROMPT: &str =
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting \
    the steps as his father had, and lit the great lamp that swept across the bay.";
const MORE: &str =
    " Ships passed in the night, their lanterns swaying, and the keeper wrote each one down";
const NEXT: &str = " and then the keeper said";

// Every field is set today; the update keeps this compiling when ContextParams gains one.
#[allow(clippy::needless_update)]
fn params() -> ContextParams {
    ContextParams {
        n_ctx: 256,
        n_batch: 32,
        // One thread: the models are tiny, and on a busy machine llama.cpp's threads wait on each other.
        n_threads: 1,
        ..ContextParams::default()
    }
}

fn ids(tokens: &[LlamaToken]) -> Vec<i32> {
    tokens.iter().map(|t| t.0).collect()
}

/// The greedy continuation of `NEXT` after what `ctx` holds.
fn continuation(ctx: &mut Context) -> Vec<i32> {
    let generation = ctx
        .generate(0, NEXT, greedy(8), &mut NeverInterrupt)
        .unwrap();
    assert!(!generation.tokens.is_empty(), "empty generation");
    ids(&generation.tokens)
}

/// A fresh context holding exactly `tokens`.
fn fresh_with(model: &Model, tokens: &[LlamaToken]) -> Context {
    let mut fresh = Context::new(model, params()).unwrap();
    fresh.append(0, tokens, false, &mut NeverInterrupt).unwrap();
    fresh
}

/// Two generations: checkpoints at the end of the first prompt, of the first answer, and of the second
/// prompt.
fn two_turns(model: &Model) -> (Context, Vec<usize>) {
    let mut ctx = Context::new(model, params()).unwrap();
    let first = ctx
        .generate(0, PROMPT, greedy(6), &mut NeverInterrupt)
        .unwrap();
    assert!(!first.tokens.is_empty());
    let prompt_end = ctx.token_count(0).unwrap() - first.tokens.len();
    let answer_end = ctx.token_count(0).unwrap();
    let more = ctx
        .generate(0, MORE, greedy(6), &mut NeverInterrupt)
        .unwrap();
    let more_end = ctx.token_count(0).unwrap() - more.tokens.len();
    (ctx, vec![prompt_end, answer_end, more_end])
}

#[test]
fn checkpoints_are_taken_at_turn_boundaries_and_cost_one_recurrent_state_each() {
    for name in RECURRENT_MODELS {
        let model = arch_model(name);
        let (ctx, expected) = two_turns(model);
        assert_eq!(ctx.checkpoint_positions(0).unwrap(), expected, "{name}");
        let bytes = ctx.checkpoint_bytes(0).unwrap();
        assert!(bytes > 0, "{name}");
        assert_eq!(
            bytes % expected.len(),
            0,
            "{name}: every checkpoint is one fixed-size state"
        );
        let per_checkpoint = bytes / expected.len();
        // The partial state of a hybrid leaves its attention cells out: far less than the whole state.
        let snapshot = ctx.snapshot(Some(0), &Metadata::new(), None).unwrap();
        if name == "tiny-lfm2" {
            assert!(
                per_checkpoint < snapshot.len() / 4,
                "{name}: {per_checkpoint} of {}",
                snapshot.len()
            );
        }
        println!("{name}: {per_checkpoint} bytes per checkpoint");
    }
}

#[test]
fn truncate_to_and_between_checkpoints_continues_as_a_fresh_context() {
    for name in RECURRENT_MODELS {
        let model = arch_model(name);
        let (_, checkpoints) = two_turns(model);
        let [prompt_end, answer_end, more_end] = checkpoints[..] else {
            unreachable!()
        };
        // On a checkpoint, between two, below the first, and just under the last.
        for n in [answer_end, prompt_end + 3, answer_end + 2, 5, more_end - 1] {
            let (mut ctx, _) = two_turns(model);
            let kept = ctx.tokens(0).unwrap()[..n].to_vec();
            ctx.truncate(0, n).unwrap();
            assert_eq!(ctx.tokens(0).unwrap(), kept.as_slice(), "{name} at {n}");
            // Checkpoints past the cut are gone; those at or below it stay.
            let left: Vec<usize> = checkpoints.iter().copied().filter(|&c| c <= n).collect();
            assert_eq!(ctx.checkpoint_positions(0).unwrap(), left, "{name} at {n}");
            let mut fresh = fresh_with(model, &kept);
            assert_eq!(
                continuation(&mut ctx),
                continuation(&mut fresh),
                "{name} at {n}"
            );
        }
    }
}

#[test]
fn prefix_reuse_goes_back_to_the_nearest_checkpoint_and_decodes_only_the_rest() {
    for name in RECURRENT_MODELS {
        let model = arch_model(name);
        let (mut ctx, checkpoints) = two_turns(model);
        // Keep the first answer, replace what followed it: the checkpoint at the end of the answer serves.
        let mut edited = ctx.tokens(0).unwrap()[..checkpoints[1] + 2].to_vec();
        edited.extend(model.tokenize(" that nobody saw", false, true).unwrap());
        let (mut generator, reused) = ctx
            .start_generation_reusing_prefix_tokens(0, &edited, greedy(8), &mut NeverInterrupt)
            .unwrap();
        assert_eq!(reused, checkpoints[1], "{name}");
        while generator
            .next_piece(&mut ctx, &mut NeverInterrupt)
            .unwrap()
            .is_some()
        {}
        assert_eq!(
            generator.stats().prompt_tokens,
            edited.len() - reused,
            "{name}"
        );
        let mut fresh = Context::new(model, params()).unwrap();
        let (mut expected, fresh_reused) = fresh
            .start_generation_reusing_prefix_tokens(0, &edited, greedy(8), &mut NeverInterrupt)
            .unwrap();
        while expected
            .next_piece(&mut fresh, &mut NeverInterrupt)
            .unwrap()
            .is_some()
        {}
        assert_eq!(fresh_reused, 0);
        assert!(!expected.tokens().is_empty());
        assert_eq!(generator.tokens(), expected.tokens(), "{name}");
        assert_eq!(ctx.tokens(0).unwrap(), fresh.tokens(0).unwrap(), "{name}");
    }
}

#[test]
fn a_sequence_keeps_the_first_and_the_latest_checkpoints() {
    let model = arch_model("tiny-mamba2");
    let mut ctx = Context::new(model, params()).unwrap();
    let mut ends = Vec::new();
    for turn in 0..MAX_CHECKPOINTS + 2 {
        ctx.generate(0, &format!(" Turn {turn}."), greedy(1), &mut NeverInterrupt)
            .unwrap();
        ends.push(ctx.token_count(0).unwrap());
    }
    let positions = ctx.checkpoint_positions(0).unwrap();
    assert_eq!(positions.len(), MAX_CHECKPOINTS);
    // The first prompt's end stays; the others are the latest turn boundaries.
    let first = positions[0];
    assert!(first < ends[0]);
    assert!(positions.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(*positions.last().unwrap(), ends[ends.len() - 1] - 1);
    // Reset, restore and replace drop them all.
    let snapshot = ctx.snapshot(Some(0), &Metadata::new(), None).unwrap();
    ctx.restore(&snapshot, Some(0), None).unwrap();
    assert!(ctx.checkpoint_positions(0).unwrap().is_empty());
    ctx.generate(0, " More.", greedy(1), &mut NeverInterrupt)
        .unwrap();
    assert!(!ctx.checkpoint_positions(0).unwrap().is_empty());
    ctx.reset();
    assert!(ctx.checkpoint_positions(0).unwrap().is_empty());
}

fn manager(model: &'static Model, dir: &std::path::Path) -> SessionManager {
    let store = Arc::new(DirectoryStore::open(dir).unwrap());
    SessionManager::new(model, params(), store, 2)
        .unwrap()
        .with_overflow(OverflowPolicy::DropOldest)
}

const SYSTEM: &str = "You are a storyteller who answers briefly.";

#[test]
fn a_manager_chat_whose_history_lost_turns_decodes_again_only_after_the_system_prompt() {
    for name in RECURRENT_MODELS {
        let model = arch_chat_model(name);
        let dir = temp_dir(&format!("checkpoints-{name}"));
        let m = manager(model, &dir);
        m.create_session("s", Some(SYSTEM), Metadata::new())
            .unwrap();
        let system_len = {
            let session = m.load("s").unwrap();
            let context = session.context().lock().unwrap();
            context.token_count(0).unwrap()
        };
        for turn in 0..3 {
            let answer = m
                .chat(
                    "s",
                    &format!("Tell me part {turn}."),
                    greedy(6),
                    &mut NeverInterrupt,
                )
                .unwrap();
            assert!(!answer.tokens.is_empty());
        }
        {
            let session = m.load("s").unwrap();
            let context = session.context().lock().unwrap();
            assert_eq!(
                context.checkpoint_positions(0).unwrap()[0],
                system_len,
                "{name}"
            );
        }
        assert_eq!(m.trim_history("s", 1).unwrap(), 2);
        let history = m.load("s").unwrap().history();
        let answer = m
            .chat("s", "And then?", greedy(6), &mut NeverInterrupt)
            .unwrap();
        // The conversation after the trim, formatted: all but the system prompt was decoded again.
        let mut messages = vec![ChatMessage {
            role: "system".to_owned(),
            content: SYSTEM.to_owned(),
        }];
        messages.extend(history.iter().map(|h| ChatMessage {
            role: h.role.clone(),
            content: h.content.clone(),
        }));
        messages.push(ChatMessage {
            role: "user".to_owned(),
            content: "And then?".to_owned(),
        });
        let conversation = model.tokenize_chat(&messages, true, true).unwrap();
        assert_eq!(
            answer.stats.prompt_tokens,
            conversation.len() - system_len,
            "{name}"
        );
        // And the answer is a fresh context's.
        let mut fresh = Context::new(model, params()).unwrap();
        let (expected, _) = fresh
            .chat(0, &messages, greedy(6), &mut NeverInterrupt)
            .unwrap();
        assert!(!expected.tokens.is_empty());
        assert_eq!(answer.tokens, expected.tokens, "{name}");
        let session = m.load("s").unwrap();
        let context = session.context().lock().unwrap();
        assert_eq!(
            context.tokens(0).unwrap(),
            fresh.tokens(0).unwrap(),
            "{name}"
        );
    }
}
