//! A manager's chat when the conversation outgrows the context: the overflow policies, trim_history, and the
//! turn's stats. Real model, real directory, n_ctx 256 (what llama.cpp allocates for small contexts).

mod common;

use std::sync::Arc;

use common::{greedy, model, temp_dir};
use llama_sessions::{
    ContextParams, DirectoryStore, Error, Metadata, NeverInterrupt, OverflowPolicy, SessionManager,
    StopReason,
};

const SYSTEM: &str = "You are a storyteller.";
const STORY: &str = "Tell me a long story about a dragon and a knight.";
/// Room reserved for each answer: four long turns do not fit in 256 tokens.
const ANSWER: usize = 40;

fn manager(dir: &std::path::Path, overflow: OverflowPolicy) -> SessionManager {
    let params = ContextParams {
        n_ctx: 256,
        n_batch: 64,
        ..ContextParams::default()
    };
    let store = Arc::new(DirectoryStore::open(dir).unwrap());
    SessionManager::new(model(), params, store, 4)
        .unwrap()
        .with_overflow(overflow)
}

fn tokens(m: &SessionManager, id: &str) -> Vec<i32> {
    let session = m.load(id).unwrap();
    let context = session.context().lock().unwrap();
    context.tokens(0).unwrap().iter().map(|t| t.0).collect()
}

fn system_tokens(m: &SessionManager) -> Vec<i32> {
    let fresh = m.create_session("system-only", Some(SYSTEM), Metadata::new());
    let tokens = tokens(m, "system-only");
    drop(fresh);
    m.delete("system-only").unwrap();
    tokens
}

#[test]
fn a_full_session_keeps_answering_by_dropping_the_oldest_turns() {
    let dir = temp_dir("overflow-drop");
    let m = manager(&dir, OverflowPolicy::default());
    assert_eq!(m.overflow(), OverflowPolicy::DropOldest);
    assert!(m.autosave(), "durable by default");
    let system = system_tokens(&m);
    m.create_session("s", Some(SYSTEM), Metadata::new())
        .unwrap();
    let mut dropped_total = 0;
    for turn in 0..6 {
        let before = m.load("s").unwrap().history();
        let message = format!("{STORY} Part {turn}.");
        let generation = m
            .chat("s", &message, greedy(ANSWER), &mut NeverInterrupt)
            .unwrap();
        assert!(!generation.text.is_empty());
        let dropped = generation.stats.dropped_turns;
        dropped_total += dropped;
        let session = m.load("s").unwrap();
        let history = session.history();
        // The oldest `dropped` turns (two messages each) left; this turn's two messages joined.
        assert_eq!(history.len(), before.len() - 2 * dropped + 2);
        assert_eq!(&history[..history.len() - 2], &before[2 * dropped..]);
        assert_eq!(history[history.len() - 2].content, message);
        assert_eq!(history[history.len() - 1].content, generation.text);
        let context = session.context().lock().unwrap();
        // The system prompt is always kept, and the turn's stats are the context's last stats.
        let held: Vec<i32> = context.tokens(0).unwrap().iter().map(|t| t.0).collect();
        assert_eq!(&held[..system.len()], system.as_slice());
        let (stats, reason) = context.last_stats().unwrap();
        assert_eq!(stats, generation.stats);
        assert_eq!(reason, generation.stop_reason);
        assert_ne!(
            reason,
            StopReason::ContextFull,
            "room for the answer was reserved"
        );
    }
    assert!(dropped_total > 0, "six long turns must overflow 256 tokens");
    // What was stored is what is live (autosave): a new manager reads the trimmed history.
    let history = m.load("s").unwrap().history();
    drop(m);
    let reopened = manager(&dir, OverflowPolicy::default());
    assert_eq!(reopened.load("s").unwrap().history(), history);
}

#[test]
fn the_error_policy_refuses_before_changing_anything_and_trim_history_makes_room() {
    let dir = temp_dir("overflow-error");
    let m = manager(&dir, OverflowPolicy::Error);
    m.create_session("s", Some(SYSTEM), Metadata::new())
        .unwrap();
    let path = m.session_path("s").unwrap().unwrap();
    let mut refused = None;
    for turn in 0..6 {
        let history = m.load("s").unwrap().history();
        let held = tokens(&m, "s");
        let stored = std::fs::read(&path).unwrap();
        match m.chat(
            "s",
            &format!("{STORY} Part {turn}."),
            greedy(ANSWER),
            &mut NeverInterrupt,
        ) {
            Ok(generation) => assert_eq!(generation.stats.dropped_turns, 0),
            Err(e) => {
                assert_eq!(m.load("s").unwrap().history(), history);
                assert_eq!(tokens(&m, "s"), held);
                assert_eq!(std::fs::read(&path).unwrap(), stored);
                refused = Some((e, history.len(), held.len()));
                break;
            }
        }
    }
    let (error, messages, held) = refused.expect("six long turns must overflow 256 tokens");
    let Error::ChatOverflow {
        conversation_tokens,
        max_tokens,
        n_ctx,
        held: reported_held,
        history_dropped,
        ..
    } = &error
    else {
        panic!("expected ChatOverflow, got {error:?}");
    };
    assert_eq!((*max_tokens, *n_ctx, *reported_held), (ANSWER, 256, held));
    assert!(conversation_tokens + max_tokens > 256);
    assert!(!history_dropped);
    let message = error.to_string();
    assert!(message.contains("trim_history"), "{message}");
    assert!(
        message.contains(&format!("holds {held} tokens")),
        "{message}"
    );
    // Keep the last turn: the next chat fits, decoding after the system prompt it reuses.
    assert_eq!(m.trim_history("s", 1).unwrap(), messages / 2 - 1);
    let history = m.load("s").unwrap().history();
    assert_eq!(history.len(), 2);
    let generation = m
        .chat("s", "And then?", greedy(ANSWER), &mut NeverInterrupt)
        .unwrap();
    assert!(!generation.text.is_empty());
    assert_eq!(m.load("s").unwrap().history().len(), 4);
    // Trimming to more turns than there are changes nothing.
    assert_eq!(m.trim_history("s", 5).unwrap(), 0);
    assert_eq!(m.trim_history("s", 0).unwrap(), 2);
    assert!(m.load("s").unwrap().history().is_empty());
}

#[test]
fn a_turn_that_cannot_fit_even_alone_is_refused_with_its_numbers() {
    let dir = temp_dir("overflow-alone");
    let m = manager(&dir, OverflowPolicy::DropOldest);
    m.create_session("s", Some(SYSTEM), Metadata::new())
        .unwrap();
    let held = tokens(&m, "s");
    let error = m
        .chat("s", "Hi.", greedy(250), &mut NeverInterrupt)
        .unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(
            error,
            Error::ChatOverflow {
                max_tokens: 250,
                n_ctx: 256,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(message.contains("max_tokens=250"), "{message}");
    assert!(message.contains("larger n_ctx"), "{message}");
    assert_eq!(tokens(&m, "s"), held);
    assert!(m.load("s").unwrap().history().is_empty());
}

#[test]
fn the_policy_is_parsed_by_name() {
    assert_eq!(
        "drop_oldest".parse::<OverflowPolicy>().unwrap(),
        OverflowPolicy::DropOldest
    );
    assert_eq!(
        "error".parse::<OverflowPolicy>().unwrap(),
        OverflowPolicy::Error
    );
    let error = "truncate".parse::<OverflowPolicy>().unwrap_err();
    assert!(
        matches!(
            error,
            Error::InvalidParameter {
                name: "overflow",
                ..
            }
        ),
        "{error:?}"
    );
    assert!(error.to_string().contains("\"truncate\""));
}

#[test]
fn a_prompt_too_long_for_prefix_reuse_reports_what_the_sequence_holds() {
    let dir = temp_dir("overflow-held");
    let m = manager(&dir, OverflowPolicy::DropOldest);
    m.create_session("s", Some(SYSTEM), Metadata::new())
        .unwrap();
    m.chat("s", STORY, greedy(ANSWER), &mut NeverInterrupt)
        .unwrap();
    let held = tokens(&m, "s");
    let long = "word ".repeat(400);
    let error = m
        .generate_reusing_prefix("s", &long, greedy(4), &mut NeverInterrupt)
        .unwrap_err();
    let Error::ContextFull {
        held: reported,
        available,
        capacity: n_ctx,
        ..
    } = error
    else {
        panic!("expected ContextFull, got {error:?}");
    };
    assert_eq!(reported, held.len());
    assert_eq!(available + reported, n_ctx);
    assert_eq!(tokens(&m, "s"), held);
}
