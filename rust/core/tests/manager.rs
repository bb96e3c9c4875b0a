//! SessionManager from Rust alone, on the real model and a real directory.

mod common;

use std::sync::Arc;

use common::{greedy, model, temp_dir};
use llama_sessions::manager::validate_session_id;
use llama_sessions::{
    ContextParams, DirectoryStore, Error, Metadata, NeverInterrupt, SessionManager,
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
    SessionManager::new(model(), params(), store, max_live, autosave).unwrap()
}

fn chat(m: &SessionManager, id: &str, message: &str) -> Vec<i32> {
    m.chat(id, message, greedy(12), &mut NeverInterrupt)
        .unwrap()
        .tokens
        .iter()
        .map(|t| t.0)
        .collect()
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
    assert_eq!(chat(&restarted, "u", "Name a city."), expected);
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
    // Every session holds exactly the encoded system prompt.
    let tokens = |id: &str| {
        m.load(id)
            .unwrap()
            .context()
            .lock()
            .unwrap()
            .tokens(0)
            .unwrap()
            .to_vec()
    };
    assert_eq!(tokens("s0"), tokens("s4"));
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
    m.revert("c", "one").unwrap();
    assert_eq!(session.history(), history_at_one);
    assert_eq!(
        session.context().lock().unwrap().tokens(0).unwrap(),
        tokens_at_one.as_slice()
    );
    assert_eq!(chat(&m, "c", "Name an animal."), after_one);
    assert_eq!(m.checkpoints("c").unwrap(), ["one"]);
    assert!(matches!(
        m.revert("c", "two"),
        Err(Error::SessionNotFound { .. })
    ));
}

#[test]
fn eviction_saves_and_a_reload_restores_exactly() {
    let dir = temp_dir("lru");
    let m = manager(&dir, 2, false);
    for id in ["a", "b"] {
        m.create_session(id, Some(SYSTEM), Metadata::new()).unwrap();
    }
    chat(&m, "a", "Name a color.");
    let tokens_a = m
        .load("a")
        .unwrap()
        .context()
        .lock()
        .unwrap()
        .tokens(0)
        .unwrap()
        .to_vec();
    m.create_session("b2", None, Metadata::new()).unwrap();
    m.load("b").unwrap();
    m.create_session("c", None, Metadata::new()).unwrap();
    assert!(
        !m.live_ids().contains(&"a".to_owned()),
        "{:?}",
        m.live_ids()
    );
    assert!(m.stats().evictions >= 2);
    let saves = m.stats().store_saves;
    let reloaded = m.load("a").unwrap();
    assert_eq!(
        reloaded.context().lock().unwrap().tokens(0).unwrap(),
        tokens_a.as_slice()
    );
    assert_eq!(reloaded.history().len(), 2);
    // A live session costs no I/O.
    let loads = m.stats().store_loads;
    m.load("a").unwrap();
    assert_eq!(m.stats().store_loads, loads);
    assert!(m.stats().store_saves >= saves);
}

#[test]
fn a_stale_copy_conflicts_instead_of_losing_a_turn() {
    let dir = temp_dir("conflict");
    let one = manager(&dir, 4, false);
    let two = manager(&dir, 4, false);
    one.create_session("x", Some(SYSTEM), Metadata::new())
        .unwrap();
    two.load("x").unwrap();
    chat(&one, "x", "Name a color.");
    one.save("x").unwrap();
    chat(&two, "x", "Name an animal.");
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
fn hostile_ids_are_rejected_and_junk_files_ignored() {
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
    ] {
        assert!(
            matches!(
                validate_session_id(id),
                Err(Error::InvalidParameter {
                    name: "session_id",
                    ..
                })
            ),
            "{id:?}"
        );
    }
    assert!(validate_session_id(&"x".repeat(10_000)).is_err());
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
