//! What every remote store must do, checked the same way on each (Redis, S3): the store's contract as
//! `DirectoryStore` keeps it, leases that exclude, expire and fence, and managers on several workers that
//! continue each other's sessions exactly.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use llama_sessions::{
    open_store, ContextParams, Error, NeverInterrupt, SessionManager, SessionStore,
};

/// Values are stored, read whole and in part, listed and deleted as in a directory.
pub fn values_are_stored_read_listed_and_deleted(url: &str, name: &str) {
    let store = open_store(url).unwrap();
    assert_eq!(store.get("ada").unwrap(), None);
    assert_eq!(store.get_prefix("ada", 4).unwrap(), None);
    assert_eq!(store.get_prefix("ada", 0).unwrap(), None);
    let value: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    store.put("ada", &value).unwrap();
    store.put("bob", b"").unwrap();
    // An id as users may write it: spaces, a percent sign, non-ASCII.
    store.put("zoë 100%", b"z").unwrap();
    assert_eq!(store.get("ada").unwrap().as_deref(), Some(&value[..]));
    assert_eq!(
        store.get_prefix("ada", 4).unwrap().as_deref(),
        Some(&value[..4])
    );
    assert_eq!(
        store.get_prefix("ada", 200_000).unwrap().as_deref(),
        Some(&value[..])
    );
    assert_eq!(
        store.get_prefix("bob", 4).unwrap().as_deref(),
        Some(&b""[..])
    );
    assert_eq!(
        store.get_prefix("ada", 0).unwrap().as_deref(),
        Some(&b""[..])
    );
    assert_eq!(store.get("zoë 100%").unwrap().as_deref(), Some(&b"z"[..]));
    let mut listed: Vec<(String, u64)> = store
        .list()
        .unwrap()
        .into_iter()
        .map(|e| (e.key, e.size))
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        [
            ("ada".to_owned(), 100_000),
            ("bob".to_owned(), 0),
            ("zoë 100%".to_owned(), 1)
        ]
    );
    assert!(store.delete("ada").unwrap());
    assert!(!store.delete("ada").unwrap());
    assert_eq!(store.get("ada").unwrap(), None);
    assert_eq!(store.location("bob"), None);
    assert_eq!(store.name(), name);
}

/// Two workers (stores of their own), four threads each, increment one value under the key's lease: no
/// increment is lost.
pub fn a_lease_excludes_other_workers(workers: [Arc<dyn SessionStore>; 2]) {
    workers[0].put("counter", b"0").unwrap();
    let start = Arc::new(Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let store = Arc::clone(&workers[i % 2]);
            let start = Arc::clone(&start);
            std::thread::spawn(move || {
                start.wait();
                for _ in 0..25 {
                    let _lease = store.lock("counter").unwrap();
                    let n: u64 = String::from_utf8(store.get("counter").unwrap().unwrap())
                        .unwrap()
                        .parse()
                        .unwrap();
                    store
                        .put("counter", (n + 1).to_string().as_bytes())
                        .unwrap();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    assert_eq!(
        workers[1].get("counter").unwrap().as_deref(),
        Some(&b"200"[..])
    );
}

/// A worker stalls holding a lease of `lease`: another takes the lease once it ran out, and the stalled
/// worker's late write is refused, writing nothing.
pub fn a_dead_workers_lease_runs_out_and_its_late_write_is_refused(
    dead: &dyn SessionStore,
    alive: &dyn SessionStore,
    lease: Duration,
) {
    dead.put("ada", b"version 1").unwrap();
    // The first worker takes the lease and stalls past it (a crash would never release it at all).
    let stalled = dead.lock("ada").unwrap();
    let started = Instant::now();
    let taken = alive.lock("ada").unwrap();
    assert!(
        started.elapsed() >= lease / 2,
        "the lease was taken while held"
    );
    alive.put("ada", b"version 2").unwrap();
    // The stalled worker's write comes too late: refused, nothing written.
    match dead.put("ada", b"version 2 from the stalled worker") {
        Err(Error::RemoteStore {
            op: "write",
            reason,
            ..
        }) => {
            assert!(reason.contains("lease"), "{reason}")
        }
        other => panic!("expected a refused write, got {other:?}"),
    }
    assert_eq!(
        alive.get("ada").unwrap().as_deref(),
        Some(&b"version 2"[..])
    );
    // Dropping the stale lease does not release the live one.
    drop(stalled);
    alive.put("ada", b"version 3").unwrap();
    assert_eq!(
        alive.get("ada").unwrap().as_deref(),
        Some(&b"version 3"[..])
    );
    drop(taken);
    // Released: another worker takes the lease at once.
    let started = Instant::now();
    drop(dead.lock("ada").unwrap());
    assert!(started.elapsed() < lease * 10);
}

/// Three managers on the store at `url`: B continues what A started token for token as if it had stayed
/// on one worker, and A's outdated copy then continues B's version. Returns a manager on the store, for
/// the caller to check what happens once the server is gone.
pub fn two_managers_continue_each_others_sessions_exactly(url: &str) -> SessionManager {
    let model = super::model();
    let params = ContextParams {
        n_ctx: 512,
        n_batch: 64,
        ..ContextParams::default()
    };
    let worker =
        || SessionManager::new(model, params.clone(), open_store(url).unwrap(), 4).unwrap();
    let (a, b, alone) = (worker(), worker(), worker());
    a.create_session("ada", Some("You are terse."), Default::default())
        .unwrap();
    let first = a
        .chat(
            "ada",
            "Name a colour.",
            super::greedy(12),
            &mut NeverInterrupt,
        )
        .unwrap();
    // Worker B continues what worker A started; the reference stays on one worker.
    let second = b
        .chat(
            "ada",
            "Name another.",
            super::greedy(12),
            &mut NeverInterrupt,
        )
        .unwrap();
    alone
        .create_session("ref", Some("You are terse."), Default::default())
        .unwrap();
    let ref_first = alone
        .chat(
            "ref",
            "Name a colour.",
            super::greedy(12),
            &mut NeverInterrupt,
        )
        .unwrap();
    let ref_second = alone
        .chat(
            "ref",
            "Name another.",
            super::greedy(12),
            &mut NeverInterrupt,
        )
        .unwrap();
    assert!(!ref_second.tokens.is_empty());
    assert_eq!(first.tokens, ref_first.tokens);
    assert_eq!(second.tokens, ref_second.tokens);
    // A's copy is outdated now and holds nothing of its own: its next turn runs on B's version.
    let third = a
        .chat("ada", "And a third?", super::greedy(8), &mut NeverInterrupt)
        .unwrap();
    let ref_third = alone
        .chat("ref", "And a third?", super::greedy(8), &mut NeverInterrupt)
        .unwrap();
    assert_eq!(third.tokens, ref_third.tokens);
    let reloaded = worker();
    assert_eq!(reloaded.load("ada").unwrap().history().len(), 6);
    reloaded
}

/// Without the server, a turn fails with RemoteStore: it neither passes for a conflict nor overwrites.
pub fn without_the_server_calls_fail_with_remote_store(manager: &SessionManager) {
    match manager.chat("ada", "Still there?", super::greedy(4), &mut NeverInterrupt) {
        Err(Error::RemoteStore { .. }) => {}
        other => panic!("expected RemoteStore, got {:?}", other.map(|g| g.text)),
    }
    assert!(matches!(manager.list(), Err(Error::RemoteStore { .. })));
}
