//! `RedisStore` against a real `redis-server` started on loopback for each test: the store's contract (as
//! `DirectoryStore` keeps it), leases that exclude, expire and fence, and a SessionManager on it.

mod common;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use llama_sessions::{
    open_store, ContextParams, Error, NeverInterrupt, RedisStore, SessionManager, SessionStore,
};

/// A `redis-server` of one test, stopped when dropped. Missing, the test fails in CI (`CI` set: the setup
/// scripts install it) and is skipped elsewhere.
struct RedisServer {
    child: Child,
    port: u16,
    _dir: PathBuf,
}

impl RedisServer {
    fn start(name: &str) -> Option<RedisServer> {
        let ci = std::env::var("CI").is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false"));
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = common::temp_dir(name);
        let spawned = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "no", "--dir"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) if !ci => {
                eprintln!(
                    "skipped: redis-server cannot be started ({e}); scripts/common.sh installs it"
                );
                return None;
            }
            Err(e) => panic!("redis-server cannot be started in CI: {e}"),
        };
        let server = RedisServer {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while RedisStore::open(&server.url()).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(server)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn values_are_stored_read_listed_and_deleted_as_in_a_directory() {
    let Some(server) = RedisServer::start("redis-values") else {
        return;
    };
    let store = open_store(&server.url()).unwrap();
    assert_eq!(store.get("ada").unwrap(), None);
    assert_eq!(store.get_prefix("ada", 4).unwrap(), None);
    let value: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    store.put("ada", &value).unwrap();
    store.put("bob", b"").unwrap();
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
    let mut listed: Vec<(String, u64)> = store
        .list()
        .unwrap()
        .into_iter()
        .map(|e| (e.key, e.size))
        .collect();
    listed.sort();
    assert_eq!(listed, [("ada".to_owned(), 100_000), ("bob".to_owned(), 0)]);
    assert!(store.delete("ada").unwrap());
    assert!(!store.delete("ada").unwrap());
    assert_eq!(store.get("ada").unwrap(), None);
    assert_eq!(store.location("bob"), None);
    assert_eq!(store.name(), server.url());
}

#[test]
fn a_lease_excludes_other_workers_until_it_is_released() {
    let Some(server) = RedisServer::start("redis-exclusion") else {
        return;
    };
    // Two workers (stores of their own), four threads each, incrementing one value under the key's lease:
    // no increment is lost.
    let workers = [
        Arc::new(RedisStore::open(&server.url()).unwrap()),
        Arc::new(RedisStore::open(&server.url()).unwrap()),
    ];
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

#[test]
fn a_dead_workers_lease_runs_out_and_its_late_write_is_refused() {
    let Some(server) = RedisServer::start("redis-lease") else {
        return;
    };
    let lease = Duration::from_millis(300);
    let dead = RedisStore::open(&server.url()).unwrap().with_lease(lease);
    let alive = RedisStore::open(&server.url()).unwrap().with_lease(lease);
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
}

#[test]
fn an_unreachable_or_unsupported_store_is_a_typed_error() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    match open_store(&format!("redis://:secret@127.0.0.1:{port}/0")) {
        Err(e @ Error::RemoteStore { op: "connect", .. }) => {
            assert!(!e.to_string().contains("secret"), "{e}")
        }
        other => panic!("expected RemoteStore, got {other:?}"),
    }
    for url in ["s3://bucket/prefix", "rediss://host:6380/0", "ftp://x"] {
        assert!(
            matches!(
                open_store(url),
                Err(Error::InvalidParameter {
                    name: "session_dir",
                    ..
                })
            ),
            "{url}"
        );
    }
}

#[test]
fn two_managers_on_one_redis_continue_each_others_sessions_exactly() {
    let Some(server) = RedisServer::start("redis-managers") else {
        return;
    };
    let model = common::model();
    let params = ContextParams {
        n_ctx: 512,
        n_batch: 64,
        ..ContextParams::default()
    };
    let worker = || {
        SessionManager::new(model, params.clone(), open_store(&server.url()).unwrap(), 4).unwrap()
    };
    let (a, b, alone) = (worker(), worker(), worker());
    a.create_session("ada", Some("You are terse."), Default::default())
        .unwrap();
    let first = a
        .chat(
            "ada",
            "Name a colour.",
            common::greedy(12),
            &mut NeverInterrupt,
        )
        .unwrap();
    // Worker B continues what worker A started; the reference stays on one worker.
    let second = b
        .chat(
            "ada",
            "Name another.",
            common::greedy(12),
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
            common::greedy(12),
            &mut NeverInterrupt,
        )
        .unwrap();
    let ref_second = alone
        .chat(
            "ref",
            "Name another.",
            common::greedy(12),
            &mut NeverInterrupt,
        )
        .unwrap();
    assert!(!ref_second.tokens.is_empty());
    assert_eq!(first.tokens, ref_first.tokens);
    assert_eq!(second.tokens, ref_second.tokens);
    // A's copy is outdated now and holds nothing of its own: its next turn runs on B's version.
    let third = a
        .chat(
            "ada",
            "And a third?",
            common::greedy(8),
            &mut NeverInterrupt,
        )
        .unwrap();
    let ref_third = alone
        .chat(
            "ref",
            "And a third?",
            common::greedy(8),
            &mut NeverInterrupt,
        )
        .unwrap();
    assert_eq!(third.tokens, ref_third.tokens);
    let reloaded = worker();
    assert_eq!(reloaded.load("ada").unwrap().history().len(), 6);

    // Without Redis, a turn fails with RemoteStore: it neither passes for a conflict nor overwrites.
    drop(server);
    match reloaded.chat(
        "ada",
        "Still there?",
        common::greedy(4),
        &mut NeverInterrupt,
    ) {
        Err(Error::RemoteStore { .. }) => {}
        other => panic!("expected RemoteStore, got {:?}", other.map(|g| g.text)),
    }
    assert!(matches!(reloaded.list(), Err(Error::RemoteStore { .. })));
}
