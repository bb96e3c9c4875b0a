//! `RedisStore` against a real `redis-server` started on loopback for each test: the checks every remote
//! store passes (`common::remote`), and what is Redis' own.

mod common;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::remote;
use llama_sessions::{open_store, Error, RedisStore};

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
    remote::values_are_stored_read_listed_and_deleted(&server.url(), &server.url());
}

#[test]
fn a_lease_excludes_other_workers_until_it_is_released() {
    let Some(server) = RedisServer::start("redis-exclusion") else {
        return;
    };
    remote::a_lease_excludes_other_workers([
        Arc::new(RedisStore::open(&server.url()).unwrap()),
        Arc::new(RedisStore::open(&server.url()).unwrap()),
    ]);
}

#[test]
fn a_dead_workers_lease_runs_out_and_its_late_write_is_refused() {
    let Some(server) = RedisServer::start("redis-lease") else {
        return;
    };
    let lease = Duration::from_millis(300);
    remote::a_dead_workers_lease_runs_out_and_its_late_write_is_refused(
        &RedisStore::open(&server.url()).unwrap().with_lease(lease),
        &RedisStore::open(&server.url()).unwrap().with_lease(lease),
        lease,
    );
}

#[test]
fn an_unreachable_or_unsupported_store_is_a_typed_error() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for scheme in ["redis", "rediss"] {
        match open_store(&format!("{scheme}://:secret@127.0.0.1:{port}/0")) {
            Err(e @ Error::RemoteStore { op: "connect", .. }) => {
                assert!(!e.to_string().contains("secret"), "{e}")
            }
            other => panic!("expected RemoteStore, got {other:?}"),
        }
    }
    for url in ["ftp://x", "redis+unix:///tmp/x"] {
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
    let reloaded = remote::two_managers_continue_each_others_sessions_exactly(&server.url());
    drop(server);
    remote::without_the_server_calls_fail_with_remote_store(&reloaded);
}
