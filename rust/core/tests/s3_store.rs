//! `S3Store` against a real S3 API server started on loopback for each test (moto's, through
//! `tests/s3_server.py`: see there why): the checks every remote store passes (`common::remote`), and what
//! is S3's own.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::remote;
use llama_sessions::{open_store, Error, S3Store, SessionStore};

const BUCKET: &str = "sessions";

/// An S3 server of one test, stopped when dropped. Missing (moto not installed), the test fails in CI
/// (`CI` set: `pip install '.[test]'` installs it) and is skipped elsewhere.
struct S3Server {
    child: Child,
    port: u16,
}

impl S3Server {
    fn start() -> Option<S3Server> {
        S3Server::start_with(&[])
    }

    /// A server started with the extra `options` of tests/s3_server.py.
    fn start_with(options: &[&str]) -> Option<S3Server> {
        let ci = std::env::var("CI").is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false"));
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());
        let importable = Command::new(&python)
            .args(["-c", "import moto.server, werkzeug"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !importable {
            assert!(
                !ci,
                "moto cannot be imported by {python} in CI (pip install '.[test]' installs it)"
            );
            eprintln!(
                "skipped: moto cannot be imported by {python}; pip install '.[test]' installs it"
            );
            return None;
        }
        // The checkout the tests run in, found when they run (cargo sets it), not where they were compiled.
        let root = std::env::var_os("CARGO_MANIFEST_DIR")
            .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
        let script = root.join("../../tests/s3_server.py");
        // Port 0: the server binds a free port and names it, so no other process can take it in between.
        let mut child = Command::new(&python)
            .arg(&script)
            .args(["--port", "0", "--bucket", BUCKET])
            .args(options)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the S3 server starts");
        // It prints "ready on http://127.0.0.1:PORT" once it listens, with its bucket made.
        let mut ready = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut ready)
            .expect("the S3 server's output");
        let port = ready
            .trim_end()
            .strip_prefix("ready on http://127.0.0.1:")
            .and_then(|port| port.parse::<u16>().ok());
        let Some(port) = port else {
            // It exited before listening: say why, from its stderr.
            let mut why = String::new();
            let _ = child.stderr.take().expect("piped").read_to_string(&mut why);
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the S3 server ({python} {}) did not start: {ready:?}\n{why}",
                script.display()
            );
        };
        // Drained rather than left in a pipe that would fill and block the server.
        let mut stderr = child.stderr.take().expect("piped");
        std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
        Some(S3Server { child, port })
    }

    /// The store under `prefix` in the test bucket; credentials come from the URL's options, so that the
    /// test needs no environment.
    fn url(&self, prefix: &str) -> String {
        format!(
            "s3://{BUCKET}/{prefix}?endpoint=http://127.0.0.1:{}&allow_http=true&region=us-east-1\
             &access_key_id=test&secret_access_key=test",
            self.port
        )
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn values_are_stored_read_listed_and_deleted_as_in_a_directory() {
    let Some(server) = S3Server::start() else {
        return;
    };
    remote::values_are_stored_read_listed_and_deleted(
        &server.url("deployments/one"),
        "s3://sessions/deployments/one",
    );
    // Another prefix in the same bucket is another store.
    let other = open_store(&server.url("deployments/two")).unwrap();
    assert_eq!(other.list().unwrap(), []);
    // Keys never leave their prefix, whatever they contain.
    other.put("..", b"dots").unwrap();
    assert_eq!(other.get("..").unwrap().as_deref(), Some(&b"dots"[..]));
    assert_eq!(
        open_store(&server.url("deployments"))
            .unwrap()
            .list()
            .unwrap(),
        []
    );
}

#[test]
fn a_lease_excludes_other_workers_until_it_is_released() {
    let Some(server) = S3Server::start() else {
        return;
    };
    remote::a_lease_excludes_other_workers([
        Arc::new(S3Store::open(&server.url("excl")).unwrap()),
        Arc::new(S3Store::open(&server.url("excl")).unwrap()),
    ]);
}

#[test]
fn a_dead_workers_lease_runs_out_and_its_late_write_is_refused() {
    let Some(server) = S3Server::start() else {
        return;
    };
    let lease = Duration::from_millis(500);
    remote::a_dead_workers_lease_runs_out_and_its_late_write_is_refused(
        &S3Store::open(&server.url("lease"))
            .unwrap()
            .with_lease(lease),
        &S3Store::open(&server.url("lease"))
            .unwrap()
            .with_lease(lease),
        lease,
    );
}

#[test]
fn a_value_written_by_someone_without_the_lease_is_not_overwritten() {
    let Some(server) = S3Server::start() else {
        return;
    };
    // The holder read version 1 under its lease; an operator (or a buggy client) replaces it without the
    // lease: the holder's write is refused rather than silently undoing the other write.
    let holder = S3Store::open(&server.url("fence")).unwrap();
    let intruder = S3Store::open(&server.url("fence")).unwrap();
    holder.put("ada", b"version 1").unwrap();
    let _lease = holder.lock("ada").unwrap();
    assert_eq!(
        holder.get("ada").unwrap().as_deref(),
        Some(&b"version 1"[..])
    );
    intruder.put("ada", b"version 2, not leased").unwrap();
    assert!(matches!(
        holder.put("ada", b"version 2 from the holder"),
        Err(Error::RemoteStore { op: "write", .. })
    ));
    assert_eq!(
        intruder.get("ada").unwrap().as_deref(),
        Some(&b"version 2, not leased"[..])
    );
    // Another thread of the holder's process reading the key meanwhile does not move the holder's fence: its
    // write still finds the version it read replaced.
    let _lease = holder.lock("cy").unwrap();
    assert_eq!(holder.get("cy").unwrap(), None);
    intruder.put("cy", b"written without the lease").unwrap();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            assert_eq!(
                holder.get("cy").unwrap().as_deref(),
                Some(&b"written without the lease"[..])
            )
        });
    });
    assert!(matches!(
        holder.put("cy", b"from the holder"),
        Err(Error::RemoteStore { op: "write", .. })
    ));
    // A key created by someone else while the holder saw none is not overwritten either.
    let _other = holder.lock("bob").unwrap();
    assert_eq!(holder.get("bob").unwrap(), None);
    intruder.put("bob", b"created meanwhile").unwrap();
    assert!(matches!(
        holder.put("bob", b"from the holder"),
        Err(Error::RemoteStore { op: "write", .. })
    ));
}

#[test]
fn an_unreachable_or_misconfigured_store_is_a_typed_error() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!(
        "s3://bucket/p?endpoint=http://127.0.0.1:{port}&allow_http=true&region=us-east-1\
         &access_key_id=AKIA&secret_access_key=hunter2"
    );
    let started = Instant::now();
    match open_store(&url) {
        Err(e @ Error::RemoteStore { op: "connect", .. }) => {
            let message = e.to_string();
            assert!(
                message.starts_with("cannot connect on s3://bucket/p: "),
                "{message}"
            );
            assert!(!message.contains("hunter2"), "{message}");
        }
        other => panic!("expected RemoteStore, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(60));
    // Without credentials, the message says where they are looked for.
    let anonymous =
        format!("s3://bucket/p?endpoint=http://127.0.0.1:{port}&allow_http=true&region=us-east-1");
    if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
        match open_store(&anonymous) {
            Err(e @ Error::RemoteStore { op: "connect", .. }) => {
                assert!(e.to_string().contains("set AWS_ACCESS_KEY_ID"), "{e}")
            }
            other => panic!("expected RemoteStore, got {other:?}"),
        }
    }
    for (url, expected) in [
        ("s3:///prefix", "a URL that names no bucket"),
        ("s3://bucket/p?colour=blue", "the unknown option \"colour\""),
        (
            "s3://key:secret@bucket/p",
            "credentials or a port before the bucket",
        ),
        (
            "s3://bucket/p?bucket=other",
            "the bucket given as an option",
        ),
        (
            "s3://bucket/p?allow_http=perhaps",
            "options the S3 client refuses",
        ),
    ] {
        match open_store(url) {
            Err(
                e @ Error::InvalidParameter {
                    name: "session_dir",
                    ..
                },
            ) => {
                assert!(e.to_string().contains(expected), "{url}: {e}");
                assert!(!e.to_string().contains("secret"), "{url}: {e}");
            }
            other => panic!("{url}: expected InvalidParameter, got {other:?}"),
        }
    }
}

#[test]
fn two_managers_on_one_bucket_continue_each_others_sessions_exactly() {
    let Some(server) = S3Server::start() else {
        return;
    };
    let reloaded = remote::two_managers_continue_each_others_sessions_exactly(&server.url("chat"));
    drop(server);
    remote::without_the_server_calls_fail_with_remote_store(&reloaded);
}

#[test]
fn a_store_that_ignores_conditional_writes_is_refused_at_open() {
    let Some(server) = S3Server::start_with(&["--ignore-conditions"]) else {
        return;
    };
    match open_store(&server.url("unsafe")) {
        Err(e @ Error::RemoteStore { op: "connect", .. }) => assert!(
            e.to_string().contains(
                "does not honour conditional writes (If-None-Match: * replaced an existing object)"
            ),
            "{e}"
        ),
        other => panic!("expected RemoteStore, got {other:?}"),
    }
}
