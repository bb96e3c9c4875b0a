//! SessionManager hardening (issue 9), from Rust alone, on the real model and a real directory: a turn owns
//! its session until it ends, eviction never takes a session mid-turn and saves changes however they were
//! made, no global lock is held across I/O, and every path takes a context before a key's lock.

mod common;

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, TryLockError};
use std::time::Duration;

use common::{greedy, model, temp_dir};
use llama_sessions::manager::list_stored_sessions;
use llama_sessions::store::{StoreEntry, StoreLock};
use llama_sessions::{
    Context, ContextParams, DirectoryStore, Error, Interrupt, Metadata, NeverInterrupt,
    SessionManager, SessionStore, TurnWait,
};

const SYSTEM: &str = "You are a helpful assistant who answers in one sentence.";
/// How long a test waits for something that takes milliseconds before it calls it a hang.
const HANG_BOUND: Duration = Duration::from_secs(60);

fn params() -> ContextParams {
    ContextParams {
        n_ctx: 1024,
        n_batch: 128,
        ..ContextParams::default()
    }
}

fn manager(store: Arc<dyn SessionStore>, max_live: usize, autosave: bool) -> SessionManager {
    SessionManager::new(model(), params(), store, max_live)
        .unwrap()
        .with_autosave(autosave)
}

fn directory(name: &str) -> Arc<DirectoryStore> {
    Arc::new(DirectoryStore::open(temp_dir(name)).unwrap())
}

fn tokens_of(context: &Mutex<Context>) -> Vec<i32> {
    let context = context.lock().unwrap();
    context.tokens(0).unwrap().iter().map(|t| t.0).collect()
}

fn stored_history_len(store: &dyn SessionStore, id: &str) -> usize {
    list_stored_sessions(store)
        .unwrap()
        .into_iter()
        .find(|s| s.id == id)
        .and_then(|s| s.record())
        .map(|r| r.history.len())
        .expect("stored with a record")
}

/// A directory store that can hold one key's write until the test lets it go, and that records, for every
/// key lock taken, whether a watched context was held at that moment, and every read asked of it.
#[derive(Debug)]
struct InstrumentedStore {
    inner: DirectoryStore,
    held_write: Mutex<Option<HeldWrite>>,
    watched: Mutex<Option<Arc<Mutex<Context>>>>,
    key_locks: Mutex<Vec<(String, bool)>>,
    /// (key, bytes asked; `usize::MAX` for a whole value), in order.
    reads: Mutex<Vec<(String, usize)>>,
}

#[derive(Debug)]
struct HeldWrite {
    key: String,
    entered: Sender<()>,
    release: Receiver<()>,
}

impl InstrumentedStore {
    fn open(name: &str) -> Arc<InstrumentedStore> {
        Arc::new(InstrumentedStore {
            inner: DirectoryStore::open(temp_dir(name)).unwrap(),
            held_write: Mutex::new(None),
            watched: Mutex::new(None),
            key_locks: Mutex::new(Vec::new()),
            reads: Mutex::new(Vec::new()),
        })
    }

    /// The next write of `key` signals on the first channel, then waits for a message on the second.
    fn hold_next_write(&self, key: &str) -> (Receiver<()>, Sender<()>) {
        let (entered, entered_rx) = mpsc::channel();
        let (release_tx, release) = mpsc::channel();
        *self.held_write.lock().unwrap() = Some(HeldWrite {
            key: key.to_owned(),
            entered,
            release,
        });
        (entered_rx, release_tx)
    }

    fn watch(&self, context: &Arc<Mutex<Context>>) {
        *self.watched.lock().unwrap() = Some(Arc::clone(context));
        self.key_locks.lock().unwrap().clear();
    }

    fn key_locks(&self) -> Vec<(String, bool)> {
        self.key_locks.lock().unwrap().clone()
    }
}

impl SessionStore for InstrumentedStore {
    fn get(&self, key: &str) -> llama_sessions::Result<Option<Vec<u8>>> {
        self.reads
            .lock()
            .unwrap()
            .push((key.to_owned(), usize::MAX));
        self.inner.get(key)
    }

    fn get_prefix(&self, key: &str, len: usize) -> llama_sessions::Result<Option<Vec<u8>>> {
        self.reads.lock().unwrap().push((key.to_owned(), len));
        self.inner.get_prefix(key, len)
    }

    fn put(&self, key: &str, value: &[u8]) -> llama_sessions::Result<()> {
        let held = {
            let mut slot = self.held_write.lock().unwrap();
            match slot.as_ref() {
                Some(held) if held.key == key => slot.take(),
                _ => None,
            }
        };
        if let Some(held) = held {
            held.entered.send(()).unwrap();
            held.release.recv().unwrap();
        }
        self.inner.put(key, value)
    }

    fn delete(&self, key: &str) -> llama_sessions::Result<bool> {
        self.inner.delete(key)
    }

    fn list(&self) -> llama_sessions::Result<Vec<StoreEntry>> {
        self.inner.list()
    }

    fn lock(&self, key: &str) -> llama_sessions::Result<Box<dyn StoreLock>> {
        if let Some(context) = self.watched.lock().unwrap().as_ref() {
            let held = matches!(context.try_lock(), Err(TryLockError::WouldBlock));
            self.key_locks.lock().unwrap().push((key.to_owned(), held));
        }
        self.inner.lock(key)
    }

    fn location(&self, key: &str) -> Option<std::path::PathBuf> {
        self.inner.location(key)
    }

    fn name(&self) -> String {
        self.inner.name()
    }
}

// Defect 9: a session is never evicted while a turn holds it.

#[test]
fn a_session_in_a_streamed_turn_is_not_evicted() {
    let store = directory("hardening-turn-eviction");
    let m = manager(store.clone(), 1, false);
    m.create_session("b", Some(SYSTEM), Metadata::new())
        .unwrap();
    m.create_session("a", Some(SYSTEM), Metadata::new())
        .unwrap();
    let mut turn = m
        .start_chat("a", "Name a color.", greedy(8), &mut NeverInterrupt)
        .unwrap();
    let first = turn.next_piece(&mut NeverInterrupt).unwrap().unwrap();
    m.load("b").unwrap();
    assert_eq!(m.live_ids(), ["a", "b"]);
    let generation = turn.finish(&m).unwrap();
    assert!(generation.text.starts_with(&first));
    m.save("a").unwrap();
    let live = m.load("a").unwrap();
    assert_eq!(live.history().len(), 2);
    assert_eq!(live.history()[1].content, generation.text);
    assert_eq!(stored_history_len(store.as_ref(), "a"), 2);
}

// Defect 10: "changed" is derived from the context itself.

#[test]
fn changes_made_through_the_live_context_are_saved_on_eviction() {
    let store = directory("hardening-context-changes");
    let m = manager(store.clone(), 1, false);
    m.create_session("a", Some(SYSTEM), Metadata::new())
        .unwrap();
    let context = Arc::clone(m.load("a").unwrap().context());
    context
        .lock()
        .unwrap()
        .generate(0, " Once upon a time", greedy(4), &mut NeverInterrupt)
        .unwrap();
    let changed = tokens_of(&context);
    m.create_session("b", None, Metadata::new()).unwrap(); // evicts "a"
    assert_eq!(m.live_ids(), ["b"]);
    assert_eq!(tokens_of(m.load("a").unwrap().context()), changed);
}

/// A manager of one live session whose changed session "a" is being evicted (by a load of "b" in another
/// thread) and is held inside its write until `release` is sent; join the evictor after that.
fn evicting_a_held_in_its_write(
    store: &Arc<InstrumentedStore>,
) -> (
    Arc<SessionManager>,
    Sender<()>,
    std::thread::JoinHandle<llama_sessions::Result<()>>,
) {
    let m = Arc::new(manager(store.clone(), 1, false));
    m.create_session("b", Some(SYSTEM), Metadata::new())
        .unwrap();
    m.create_session("a", Some(SYSTEM), Metadata::new())
        .unwrap();
    m.chat("a", "Name a color.", greedy(4), &mut NeverInterrupt)
        .unwrap();
    let (entered, release) = store.hold_next_write("a");
    let evictor = {
        let m = Arc::clone(&m);
        std::thread::spawn(move || m.load("b").map(|_| ()))
    };
    entered
        .recv_timeout(HANG_BOUND)
        .expect("the eviction of the changed session writes it");
    (m, release, evictor)
}

// Defect 11: victims are chosen under the live-set lock and saved after it is released.

#[test]
fn the_live_set_is_readable_while_an_eviction_writes_its_victim() {
    let store = InstrumentedStore::open("hardening-eviction-io");
    let (m, release, evictor) = evicting_a_held_in_its_write(&store);
    let (ids_tx, ids_rx) = mpsc::channel();
    {
        let m = Arc::clone(&m);
        std::thread::spawn(move || {
            let _ = ids_tx.send(m.live_ids());
        });
    }
    let during = ids_rx.recv_timeout(HANG_BOUND);
    release.send(()).unwrap();
    evictor.join().unwrap().unwrap();
    assert_eq!(
        during.expect("live_ids() waited for the eviction's write"),
        ["a", "b"]
    );
    assert_eq!(m.live_ids(), ["b"]);
    assert_eq!(stored_history_len(store.as_ref(), "a"), 2);
}

// Defect 12: every path takes the context before the key's lock.

#[test]
fn every_save_holds_the_context_when_it_takes_the_key_lock() {
    let store = InstrumentedStore::open("hardening-lock-order");
    let m = manager(store.clone(), 4, false);
    m.create_session("a", Some(SYSTEM), Metadata::new())
        .unwrap();
    let foreign = Arc::new(Mutex::new(Context::new(model(), params()).unwrap()));
    foreign
        .lock()
        .unwrap()
        .generate(0, "Once upon a time", greedy(0), &mut NeverInterrupt)
        .unwrap();
    store.watch(&foreign);
    m.save_context("a", &foreign).unwrap(); // over a live session with another context
    m.save_context("new", &foreign).unwrap(); // neither live nor stored
    assert_eq!(
        store.key_locks(),
        [("a".to_owned(), true), ("new".to_owned(), true)]
    );
    let live = m.load("a").unwrap();
    store.watch(live.context());
    m.save("a").unwrap();
    assert_eq!(store.key_locks(), [("a".to_owned(), true)]);
}

// Defect 13: a second turn on a busy session fails at once, after the caller's timeout, or when interrupted.

/// Asks to stop at its first poll, counting the polls.
struct StopAtOnce(usize);

impl Interrupt for StopAtOnce {
    fn should_stop(&mut self) -> bool {
        self.0 += 1;
        true
    }
}

#[test]
fn a_turn_on_a_busy_session_is_refused_or_waits_as_the_caller_says() {
    let store = directory("hardening-busy");
    let m = Arc::new(manager(store, 4, false));
    m.create_session("x", Some(SYSTEM), Metadata::new())
        .unwrap();
    let mut open = m
        .start_chat("x", "Name a color.", greedy(8), &mut NeverInterrupt)
        .unwrap();
    let first = open.next_piece(&mut NeverInterrupt).unwrap().unwrap();
    for wait in [
        TurnWait::AtMost(Duration::ZERO),
        TurnWait::AtMost(Duration::from_millis(100)),
    ] {
        match m.begin_turn("x", wait, &mut NeverInterrupt) {
            Err(Error::SessionBusy { id }) => assert_eq!(id, "x"),
            other => panic!("{wait:?}: {other:?}"),
        }
    }
    let mut interrupt = StopAtOnce(0);
    match m.begin_turn("x", TurnWait::UntilFree, &mut interrupt) {
        Err(Error::Interrupted) => assert_eq!(interrupt.0, 1),
        other => panic!("{other:?}"),
    }
    // Another session is not held up.
    m.create_session("y", None, Metadata::new()).unwrap();
    drop(
        m.begin_turn("y", TurnWait::AtMost(Duration::ZERO), &mut NeverInterrupt)
            .unwrap(),
    );

    // A turn that waits without limit runs once the open one ends, after it.
    let (done_tx, done_rx) = mpsc::channel();
    let waiter = {
        let m = Arc::clone(&m);
        std::thread::spawn(move || {
            let answer = m.chat("x", "Name an animal.", greedy(4), &mut NeverInterrupt);
            done_tx.send(()).unwrap();
            answer
        })
    };
    assert!(
        done_rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "the second turn ran while the first held the session"
    );
    let generation = open.finish(&m).unwrap();
    assert!(generation.text.starts_with(&first));
    done_rx
        .recv_timeout(HANG_BOUND)
        .expect("the waiting turn runs once the session is free");
    assert!(!waiter.join().unwrap().unwrap().text.is_empty());
    let contents: Vec<_> = m
        .load("x")
        .unwrap()
        .history()
        .into_iter()
        .map(|h| h.content)
        .collect();
    assert_eq!(contents.len(), 4);
    assert_eq!(
        contents[..3],
        ["Name a color.", &generation.text, "Name an animal."]
    );
}

#[test]
fn a_turn_claims_back_a_session_chosen_for_eviction() {
    let store = InstrumentedStore::open("hardening-claim-back");
    let (m, release, evictor) = evicting_a_held_in_its_write(&store);
    // While "a" is being saved on its way out, a turn on it claims it back: it stays live.
    let turn = {
        let m = Arc::clone(&m);
        std::thread::spawn(move || m.chat("a", "Name an animal.", greedy(4), &mut NeverInterrupt))
    };
    let claimed = (0..)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(5));
            m.live_ids()
        })
        .take_while(|_| !turn.is_finished())
        .take(12_000)
        .any(|ids| ids == ["b", "a"]);
    release.send(()).unwrap();
    evictor.join().unwrap().unwrap();
    assert!(!turn.join().unwrap().unwrap().text.is_empty());
    assert!(claimed, "the turn did not claim the session back");
    assert_eq!(m.live_ids(), ["a"]);
    assert_eq!(m.load("a").unwrap().history().len(), 4);
    assert_eq!(m.stats().evictions, 2); // "b" twice; "a" never
}

// Defect 14: save() of a stored session that is not live.

#[test]
fn saving_a_stored_session_that_is_not_live_changes_nothing() {
    let store = directory("hardening-save-not-live");
    let m = manager(store.clone(), 1, false);
    m.create_session("a", Some(SYSTEM), Metadata::new())
        .unwrap();
    m.create_session("b", None, Metadata::new()).unwrap(); // evicts "a"
    let path = store.location("a").unwrap();
    let before = std::fs::read(&path).unwrap();
    let saves = m.stats().store_saves;
    m.save("a").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_eq!(m.stats().store_saves, saves);
    assert_eq!(m.live_ids(), ["b"]);
    assert!(matches!(
        m.save("never-created"),
        Err(Error::SessionNotFound { .. })
    ));
}

#[test]
fn a_stored_value_announcing_more_state_than_a_context_holds_is_refused_unread() {
    let store = InstrumentedStore::open("bounded-reads");
    // A real session of this manager's parameters, then the same bytes whose prelude (its check made
    // anew, as a hostile writer would) announces a terabyte of state.
    let mut context = Context::new(model(), params()).unwrap();
    context
        .generate(0, SYSTEM, greedy(0), &mut NeverInterrupt)
        .unwrap();
    let honest = context.snapshot(None, &Metadata::new(), None).unwrap();
    assert!(
        honest.len() > 16 * 1024,
        "a value larger than the first read"
    );
    let mut hostile = honest.clone();
    hostile[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let check = xxhash_rust::xxh3::xxh3_64(&hostile[..24]);
    hostile[24..32].copy_from_slice(&check.to_le_bytes());
    store.put("honest", &honest).unwrap();
    store.put("hostile", &hostile).unwrap();
    let manager = manager(store.clone(), 2, false);
    // A manager of signed sessions (whose headers are parsed only after their MAC) bounds it the same way.
    let signed = SessionManager::new(model(), params(), store.clone(), 2)
        .unwrap()
        .with_secret_key(llama_sessions::SessionKey::new(b"sixteen or more bytes").unwrap());
    for reader in [&manager, &signed] {
        match reader.load("hostile") {
            Err(Error::SessionCorrupt { reason, .. }) => {
                assert!(
                    reason.contains("announces 1099511627776 bytes of state"),
                    "{reason}"
                )
            }
            other => panic!("expected SessionCorrupt, got {:?}", other.map(|_| ())),
        }
        // Only the first 16 KiB were asked for: the announced terabyte was never read.
        let asked: Vec<(String, usize)> = store.reads.lock().unwrap().drain(..).collect();
        assert_eq!(asked, [("hostile".to_owned(), 16 * 1024)]);
    }

    // An honest value is read whole, asked for no more than its prelude announces (and a byte).
    let loaded = manager.load("honest").unwrap();
    assert_eq!(tokens_of(loaded.context()), tokens_of(&Mutex::new(context)));
    let asked: Vec<(String, usize)> = store.reads.lock().unwrap().drain(..).collect();
    assert_eq!(
        asked,
        [
            ("honest".to_owned(), 16 * 1024),
            ("honest".to_owned(), honest.len() + 32 + 1)
        ]
    );
}
