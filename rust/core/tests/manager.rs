//! SessionManager from Rust alone, on the real model and a real directory.

mod common;

use std::sync::Arc;

use common::{greedy, model, temp_dir};
use llama_sessions::manager::validate_session_id;
use llama_sessions::{
    ContextParams, DirectoryStore, Error, LlamaToken, Metadata, NeverInterrupt, SessionManager,
};

const SYSTEM: &str = "You are a helpful assistant who answers in one sentence.";

fn params() -> ContextParams {
    ContextParams {
        n_ctx: 1024,
        n_batch: 128,
        ..ContextParams::default()
    }
}

fn manager(dir: &std::path::Path, max_live: usize, autosave: bool) -> SessionManager {
    let store = Arc::new(DirectoryStore::open(dir).unwrap());
    SessionManager::new(model(), params(), store, max_live)
        .unwrap()
        .with_autosave(autosave)
}

fn chat(m: &SessionManager, id: &str, message: &str) -> Vec<i32> {
    m.chat(id, message, greedy(12), &mut NeverInterrupt)
        .unwrap()
        .tokens
        .iter()
        .map(|t| t.0)
        .collect()
}

fn live_tokens(m: &SessionManager, id: &str) -> Vec<LlamaToken> {
    m.load(id)
        .unwrap()
        .context()
        .lock()
        .unwrap()
        .tokens(0)
        .unwrap()
        .to_vec()
}

/// Two answers are the same, and not empty: empty answers agree whatever the KV cache holds.
#[track_caller]
fn assert_same_answer(actual: &[i32], expected: &[i32]) {
    assert!(!expected.is_empty(), "the expected answer is empty");
    assert_eq!(actual, expected);
}

#[test]
fn a_resumed_conversation_answers_like_the_uninterrupted_one() {
    let dir = temp_dir("resume");
    let uninterrupted = manager(&dir.join("a"), 4, true);
    uninterrupted
        .create_session("u", Some(SYSTEM), Metadata::new())
        .unwrap();
    chat(&uninterrupted, "u", "Name a color.");
    chat(&uninterrupted, "u", "Name an animal.");
    let expected = chat(&uninterrupted, "u", "Name a city.");

    let first = manager(&dir.join("b"), 4, true);
    first
        .create_session("u", Some(SYSTEM), Metadata::new())
        .unwrap();
    chat(&first, "u", "Name a color.");
    chat(&first, "u", "Name an animal.");
    drop(first);
    let restarted = manager(&dir.join("b"), 4, true);
    let session = restarted.load("u").unwrap();
    assert_eq!(session.history().len(), 4);
    assert_same_answer(&chat(&restarted, "u", "Name a city."), &expected);
    assert_eq!(restarted.stats().prefill_tokens, 0);
}

#[test]
fn sessions_from_one_system_prompt_prefill_it_once() {
    let dir = temp_dir("shared");
    let m = manager(&dir, 8, false);
    for i in 0..5 {
        m.create_session(&format!("s{i}"), Some(SYSTEM), Metadata::new())
            .unwrap();
    }
    let stats = m.stats();
    let one_prefill = stats.prefill_tokens;
    assert!(one_prefill > 10);
    assert_eq!(stats.prefix_reuses, 4);
    m.create_session("other", Some("Another system prompt."), Metadata::new())
        .unwrap();
    assert!(m.stats().prefill_tokens > one_prefill);
    // Every session holds exactly the encoded system prompt...
    assert_eq!(live_tokens(&m, "s0"), live_tokens(&m, "s4"));
    // ...and the KV cache restored from it continues like the one that decoded it.
    assert_same_answer(
        &chat(&m, "s4", "Name a color."),
        &chat(&m, "s0", "Name a color."),
    );
    assert_eq!(live_tokens(&m, "s4"), live_tokens(&m, "s0"));
}

#[test]
fn checkpoints_revert_state_and_history() {
    let dir = temp_dir("checkpoint");
    let m = manager(&dir, 4, false);
    m.create_session("c", Some(SYSTEM), Metadata::new())
        .unwrap();
    chat(&m, "c", "Name a color.");
    m.checkpoint("c", "one").unwrap();
    let session = m.load("c").unwrap();
    let tokens_at_one = session
        .context()
        .lock()
        .unwrap()
        .tokens(0)
        .unwrap()
        .to_vec();
    let history_at_one = session.history();
    let after_one = chat(&m, "c", "Name an animal.");
    chat(&m, "c", "Name a fruit.");
    assert!(session.context().lock().unwrap().last_stats().is_some());
    m.revert("c", "one").unwrap();
    // The stats described a turn the revert undid.
    assert_eq!(session.context().lock().unwrap().last_stats(), None);
    assert_eq!(session.history(), history_at_one);
    assert_eq!(
        session.context().lock().unwrap().tokens(0).unwrap(),
        tokens_at_one.as_slice()
    );
    assert_same_answer(&chat(&m, "c", "Name an animal."), &after_one);
    assert_eq!(m.checkpoints("c").unwrap(), ["one"]);
    assert!(matches!(
        m.revert("c", "two"),
        Err(Error::SessionNotFound { .. })
    ));
}

#[test]
fn eviction_saves_and_a_reload_restores_exactly() {
    let dir = temp_dir("lru");
    let m = manager(&dir.join("lru"), 2, false);
    // The twin keeps "a" live from start to end: what an evicted and reloaded "a" must answer like.
    let twin = manager(&dir.join("twin"), 8, false);
    for id in ["a", "b"] {
        m.create_session(id, Some(SYSTEM), Metadata::new()).unwrap();
    }
    twin.create_session("a", Some(SYSTEM), Metadata::new())
        .unwrap();
    assert_same_answer(
        &chat(&m, "a", "Name a color."),
        &chat(&twin, "a", "Name a color."),
    );
    let tokens_a = live_tokens(&m, "a");
    assert_eq!(m.stats().store_saves, 2); // the creations; the turn is not saved (no autosave)
    m.create_session("b2", None, Metadata::new()).unwrap(); // saved; evicts "b", unchanged
    m.load("b").unwrap(); // evicts "a", changed: saved first
    m.create_session("c", None, Metadata::new()).unwrap(); // saved; evicts "b2"
    assert_eq!(m.live_ids(), ["b", "c"]);
    assert_eq!(m.stats().evictions, 3);
    assert_eq!(m.stats().store_saves, 5);
    let loads = m.stats().store_loads;
    let reloaded = m.load("a").unwrap(); // evicts "b", unchanged: not saved
    assert_eq!(m.stats().store_loads, loads + 1);
    assert_eq!(m.stats().store_saves, 5);
    assert_eq!(m.stats().evictions, 4);
    assert_eq!(
        reloaded.context().lock().unwrap().tokens(0).unwrap(),
        tokens_a.as_slice()
    );
    assert_eq!(reloaded.history().len(), 2);
    // A live session costs no I/O.
    m.load("a").unwrap();
    assert_eq!(m.stats().store_loads, loads + 1);
    // The reloaded KV cache continues the conversation exactly like the one that never left memory.
    assert_same_answer(
        &chat(&m, "a", "Name an animal."),
        &chat(&twin, "a", "Name an animal."),
    );
    assert_eq!(live_tokens(&m, "a"), live_tokens(&twin, "a"));
    assert_eq!(twin.stats().evictions, 0);
    assert_eq!(twin.stats().store_loads, 0);
}

#[test]
fn a_stale_copy_conflicts_instead_of_losing_a_turn() {
    let dir = temp_dir("conflict");
    let one = manager(&dir, 4, false);
    let two = manager(&dir, 4, false);
    one.create_session("x", Some(SYSTEM), Metadata::new())
        .unwrap();
    two.load("x").unwrap();
    // Two's copy changes (unsaved) before one saves a turn of its own.
    chat(&two, "x", "Name an animal.");
    chat(&one, "x", "Name a color.");
    one.save("x").unwrap();
    match two.save("x") {
        Err(Error::SessionConflict {
            expected: 1,
            found: 2,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        one.create_session("x", None, Metadata::new()),
        Err(Error::SessionExists { .. })
    ));
}

#[test]
fn an_outdated_copy_without_changes_is_refreshed_before_a_turn() {
    let dir = temp_dir("refresh");
    let one = manager(&dir, 4, false);
    let two = manager(&dir, 4, false);
    one.create_session("x", Some(SYSTEM), Metadata::new())
        .unwrap();
    two.load("x").unwrap();
    chat(&one, "x", "Name a color.");
    one.save("x").unwrap();
    // Two's copy is outdated but holds nothing of its own: its turn runs on the stored version.
    let answer = chat(&two, "x", "Name an animal.");
    let reference = manager(&temp_dir("refresh-reference"), 4, false);
    reference
        .create_session("x", Some(SYSTEM), Metadata::new())
        .unwrap();
    chat(&reference, "x", "Name a color.");
    assert_same_answer(&answer, &chat(&reference, "x", "Name an animal."));
    two.save("x").unwrap();
    let fresh = manager(&dir, 4, false);
    assert_eq!(fresh.load("x").unwrap().history().len(), 4);
    assert_eq!(fresh.load("x").unwrap().stored_version(), 3);
}

#[test]
fn load_gives_the_stored_version_once_another_manager_saved_a_newer_one() {
    let dir = temp_dir("load-fresh");
    let one = manager(&dir, 4, true);
    let two = manager(&dir, 4, true);
    one.create_session("x", Some(SYSTEM), Metadata::new())
        .unwrap();
    let outdated = two.load("x").unwrap();
    chat(&one, "x", "Name a color.");
    // Two's copy holds nothing of its own: load reads the stored version instead of returning it.
    let current = two.load("x").unwrap();
    assert!(!Arc::ptr_eq(&current, &outdated));
    assert_eq!(current.history(), one.load("x").unwrap().history());
    assert_eq!(current.history().len(), 2);
    assert_eq!(current.stored_version(), 2);
    assert_eq!(live_tokens(&two, "x"), live_tokens(&one, "x"));
    assert_eq!(two.stats().store_loads, 2);
    // A current copy is returned as it is: no store load.
    assert!(Arc::ptr_eq(&two.load("x").unwrap(), &current));
    assert_eq!(two.stats().store_loads, 2);

    // A copy with a change of its own stays (its save reports the conflict rather than losing it).
    let three = manager(&dir, 4, false);
    chat(&three, "x", "Name an animal.");
    chat(&one, "x", "Name a city.");
    let own = three.load("x").unwrap().history();
    assert_eq!(own.len(), 4);
    assert_eq!(own[2].content, "Name an animal.");
    assert!(matches!(
        three.save("x"),
        Err(Error::SessionConflict {
            expected: 2,
            found: 3,
            ..
        })
    ));

    // A copy a turn holds is returned as it is, without waiting for the turn or checking the store.
    let mut turn = two
        .start_chat("x", "Name a fruit.", greedy(8), &mut NeverInterrupt)
        .unwrap();
    let in_turn = two.load("x").unwrap();
    chat(&one, "x", "Name a river.");
    assert!(Arc::ptr_eq(&two.load("x").unwrap(), &in_turn));
    assert!(turn.next_piece(&mut NeverInterrupt).unwrap().is_some());
    assert!(matches!(
        turn.finish(&two),
        Err(Error::SessionConflict { .. })
    ));
    assert_eq!(
        two.load("x").unwrap().history(),
        one.load("x").unwrap().history()
    );
}

#[test]
fn hostile_ids_are_rejected_and_junk_files_ignored() {
    let too_long = "x".repeat(10_000);
    for id in [
        "../x",
        "/etc/passwd",
        "a/b",
        "",
        "a\0b",
        "a\\b",
        ".hidden",
        "..",
        "a@b",
        "tab\tid",
        " padded",
        "trailing ",
        "nbsp\u{a0}",
        too_long.as_str(),
    ] {
        assert!(
            matches!(
                validate_session_id(id),
                Err(Error::InvalidParameter {
                    name: "session_id",
                    ..
                })
            ),
            "{:?} ({} bytes)",
            id.chars().take(40).collect::<String>(),
            id.len()
        );
    }
    assert!(validate_session_id("user-42_ü.chat").is_ok());

    let dir = temp_dir("junk");
    let m = manager(&dir, 4, false);
    m.create_session("good", None, Metadata::new()).unwrap();
    std::fs::write(dir.join("notes.txt"), "not a session").unwrap();
    std::fs::write(dir.join("broken.session"), "garbage").unwrap();
    let listed = m.list().unwrap();
    let ids: Vec<_> = listed.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["broken", "good"]);
    assert!(listed[0].header.is_err());
    assert_eq!(listed[1].record().unwrap().version, 1);
    assert!(matches!(
        m.load("missing"),
        Err(Error::SessionNotFound { .. })
    ));
    m.delete("good").unwrap();
    assert!(!m.exists("good").unwrap());
}

#[test]
fn autosave_is_the_default_and_unsaved_ids_name_what_would_be_lost_without_it() {
    let dir = temp_dir("unsaved");
    let store = Arc::new(DirectoryStore::open(dir.join("default")).unwrap());
    let durable = SessionManager::new(model(), params(), store, 4).unwrap();
    assert!(durable.autosave());
    durable
        .create_session("a", Some(SYSTEM), Metadata::new())
        .unwrap();
    chat(&durable, "a", "Name a color.");
    assert!(durable.unsaved_ids().is_empty());

    let m = manager(&dir.join("off"), 4, false);
    for id in ["a", "b"] {
        m.create_session(id, Some(SYSTEM), Metadata::new()).unwrap();
    }
    assert!(m.unsaved_ids().is_empty()); // creating stores
    chat(&m, "b", "Name a color.");
    assert_eq!(m.unsaved_ids(), ["b"]);
    m.save("b").unwrap();
    assert!(m.unsaved_ids().is_empty());
    // A change made through the live Context counts too.
    m.load("a")
        .unwrap()
        .context()
        .lock()
        .unwrap()
        .truncate(0, 1)
        .unwrap();
    assert_eq!(m.unsaved_ids(), ["a"]);
}
