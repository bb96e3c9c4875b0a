//! Where a [`crate::SessionManager`] keeps its sessions: a small key-value interface of bytes, so that other
//! backends (a database, an object store) can plug in without touching the manager, and the directory store
//! that implements it on a local file system.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::durable;
use crate::error::{Error, Result};

/// One stored value, as [`SessionStore::list`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreEntry {
    /// The key.
    pub key: String,
    /// Bytes stored.
    pub size: u64,
    /// Last write, if the store knows it.
    pub modified: Option<SystemTime>,
}

/// An exclusive lock on one key, held until dropped; it excludes other threads and other processes.
pub trait StoreLock: Send {
    /// Releases the lock and removes what backs it (a lock file), for a key whose value was just deleted:
    /// nothing of the key is left behind. The store must keep mutual exclusion for whoever waited for this
    /// lock (they take a fresh one). The default only releases it.
    fn release_and_remove(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

/// Bytes by key. Keys are validated by the caller ([`crate::manager::validate_session_id`]): no separators,
/// no control characters, no leading dot.
pub trait SessionStore: Send + Sync + std::fmt::Debug {
    /// The value of `key`, or `None`.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// The first `len` bytes of the value of `key` (fewer if it is shorter), or `None`.
    fn get_prefix(&self, key: &str, len: usize) -> Result<Option<Vec<u8>>>;
    /// Replaces the value of `key` atomically: a reader sees the old value or the new one, a crash leaves one
    /// of them.
    fn put(&self, key: &str, value: &[u8]) -> Result<()>;
    /// Removes `key`; false if it was not there.
    fn delete(&self, key: &str) -> Result<bool>;
    /// Every key, in no particular order.
    fn list(&self) -> Result<Vec<StoreEntry>>;
    /// Takes the exclusive lock of `key`, waiting for it.
    fn lock(&self, key: &str) -> Result<Box<dyn StoreLock>>;
    /// Where the value of `key` lives, for messages and for users who want to copy it (None if it has no
    /// path).
    fn location(&self, key: &str) -> Option<PathBuf>;
    /// The store, as messages name it: a directory, or a server's URL without its password.
    fn name(&self) -> String;
}

/// Sessions as files in one directory: `<key>.session`, written atomically and durably; the lock of a key is
/// an advisory `flock` on `.<key>.lock`. Other files in the directory are ignored.
///
/// On Unix a lock file is removed when its key is deleted ([`StoreLock::release_and_remove`]), under the
/// lock. So that removing a file someone waits on cannot let two holders in (one on the removed file, one on
/// a new file of the same name), a locker that got the `flock` checks that the name still leads to the file
/// it locked (same device and inode) and otherwise starts again on the file the name leads to now.
#[derive(Debug, Clone)]
pub struct DirectoryStore {
    dir: PathBuf,
    suffix: &'static str,
}

/// Suffix of the files that hold values.
pub const SESSION_SUFFIX: &str = ".session";

impl DirectoryStore {
    /// A store in `dir`, created if missing.
    pub fn open(dir: impl Into<PathBuf>) -> Result<DirectoryStore> {
        DirectoryStore::open_with_suffix(dir, SESSION_SUFFIX)
    }

    /// A store in `dir` whose values are files `<key><suffix>` (KV chunks are `.kvchunk`, say), so that
    /// different kinds of values can share a directory without listing each other.
    pub fn open_with_suffix(
        dir: impl Into<PathBuf>,
        suffix: &'static str,
    ) -> Result<DirectoryStore> {
        let dir = dir.into();
        // An empty path is a mistake (`""`, `file://`), not the current directory.
        if dir.as_os_str().is_empty() {
            return Err(Error::invalid(
                "directory",
                "the path of a directory (created if missing)",
                "an empty path",
            ));
        }
        std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
            op: "create directory",
            path: dir.clone(),
            source,
        })?;
        Ok(DirectoryStore { dir, suffix })
    }

    /// The store in `dir` if that directory exists; `None` (and nothing created) if it does not: for
    /// listing, inspecting or deleting, where a mistyped path must not leave an empty directory behind.
    pub fn open_existing(dir: impl Into<PathBuf>) -> Result<Option<DirectoryStore>> {
        let dir = dir.into();
        if !dir.as_os_str().is_empty() && !dir.is_dir() {
            return Ok(None);
        }
        DirectoryStore::open(dir).map(Some)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}{}", self.suffix))
    }
}

/// A held `flock` on a lock file that the file's name still led to when it was taken.
struct FileLock {
    file: File,
    path: PathBuf,
}

impl StoreLock for FileLock {
    #[cfg(unix)]
    fn release_and_remove(self: Box<Self>) -> Result<()> {
        // Unlinked while held: a waiter on this file gets it after us, finds the name gone (or leading to a
        // newer file) and starts again, so it never holds the old file while someone holds a new one.
        let removed = not_found_is_none(
            std::fs::remove_file(&self.path),
            "remove lock file",
            &self.path,
        );
        drop(self.file);
        removed.map(|_| ())
    }

    /// Elsewhere an open file cannot be unlinked (nor a locker re-check its file): the lock file stays.
    #[cfg(not(unix))]
    fn release_and_remove(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

/// Whether `path` still names `file` (the same device and inode), as a lock holder must check: the name may
/// have been unlinked (its key deleted) or given to a newer lock file while this one waited for its `flock`.
#[cfg(unix)]
fn still_named(file: &File, path: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let held = file.metadata()?;
    match std::fs::metadata(path) {
        Ok(named) => Ok(named.dev() == held.dev() && named.ino() == held.ino()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Elsewhere lock files are never removed ([`FileLock::release_and_remove`]), so a lock file keeps its name.
#[cfg(not(unix))]
fn still_named(_file: &File, _path: &Path) -> std::io::Result<bool> {
    Ok(true)
}

fn not_found_is_none<T>(
    result: std::io::Result<T>,
    op: &'static str,
    path: &Path,
) -> Result<Option<T>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Io {
            op,
            path: path.to_path_buf(),
            source,
        }),
    }
}

impl SessionStore for DirectoryStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path(key);
        not_found_is_none(std::fs::read(&path), "read", &path)
    }

    fn get_prefix(&self, key: &str, len: usize) -> Result<Option<Vec<u8>>> {
        let path = self.path(key);
        match durable::read_prefix(&path, len) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn put(&self, key: &str, value: &[u8]) -> Result<()> {
        durable::write_atomically(&self.path(key), &[value])
    }

    fn delete(&self, key: &str) -> Result<bool> {
        let path = self.path(key);
        Ok(not_found_is_none(std::fs::remove_file(&path), "delete", &path)?.is_some())
    }

    fn list(&self) -> Result<Vec<StoreEntry>> {
        let io = |source| Error::Io {
            op: "list",
            path: self.dir.clone(),
            source,
        };
        let mut entries = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name();
            let Some(key) = name.to_str().and_then(|n| n.strip_suffix(self.suffix)) else {
                continue;
            };
            if key.is_empty() || key.starts_with('.') {
                continue;
            }
            // A file removed between read_dir and stat is simply not listed.
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            entries.push(StoreEntry {
                key: key.to_owned(),
                size: meta.len(),
                modified: meta.modified().ok(),
            });
        }
        Ok(entries)
    }

    fn lock(&self, key: &str) -> Result<Box<dyn StoreLock>> {
        let path = self.dir.join(format!(".{key}.lock"));
        let io = |op, source| Error::Io {
            op,
            path: path.clone(),
            source,
        };
        loop {
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|e| io("open lock file", e))?;
            file.lock().map_err(|e| io("lock", e))?;
            // The key was deleted (and its lock file removed) while this waited: lock the current file.
            if still_named(&file, &path).map_err(|e| io("check lock file", e))? {
                return Ok(Box::new(FileLock { file, path }));
            }
        }
    }

    fn name(&self) -> String {
        self.dir.display().to_string()
    }

    fn location(&self, key: &str) -> Option<PathBuf> {
        Some(self.path(key))
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::fs::TryLockError;

    /// A fresh directory store under the system's temporary directory.
    fn scratch_store(name: &str) -> DirectoryStore {
        let dir = std::env::temp_dir().join(format!(
            "llama-sessions-store-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        DirectoryStore::open(dir).unwrap()
    }

    /// How many of this process's open files are `path` (read from /proc/self/fd, no timing involved).
    fn open_handles(path: &Path) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
            .filter(|target| target == path)
            .count()
    }

    /// Whether someone holds the lock on the file `path` names now (false if there is no such file).
    fn named_file_is_locked(path: &Path) -> bool {
        let Ok(file) = File::options().write(true).open(path) else {
            return false;
        };
        match file.try_lock() {
            Ok(()) => false,
            Err(TryLockError::WouldBlock) => true,
            Err(TryLockError::Error(e)) => panic!("try_lock: {e}"),
        }
    }

    #[test]
    fn a_locker_that_waited_on_a_removed_lock_file_locks_the_current_one() {
        let store = scratch_store("removed-while-waited");
        let path = store.dir().join(".a.lock");
        let held = store.lock("a").unwrap();
        let (locked_tx, locked_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let waiter = {
            let store = store.clone();
            std::thread::spawn(move || {
                let lock = store.lock("a").unwrap();
                locked_tx.send(()).unwrap();
                release_rx.recv().unwrap();
                drop(lock);
            })
        };
        // The waiter has opened the lock file the holder holds and waits for its flock.
        while open_handles(&path) < 2 {
            std::thread::yield_now();
        }
        held.release_and_remove().unwrap();
        locked_rx.recv().unwrap();
        // The waiter holds the file the name leads to, not the removed one: a newcomer is kept out.
        assert!(path.exists());
        assert!(named_file_is_locked(&path));
        release_tx.send(()).unwrap();
        waiter.join().unwrap();
        assert!(!named_file_is_locked(&path));
        std::fs::remove_dir_all(store.dir()).unwrap();
    }

    #[test]
    fn release_and_remove_leaves_no_lock_file() {
        let store = scratch_store("release-and-remove");
        store.lock("a").unwrap().release_and_remove().unwrap();
        assert_eq!(std::fs::read_dir(store.dir()).unwrap().count(), 0);
        std::fs::remove_dir_all(store.dir()).unwrap();
    }
}

/// The store at `location`: `redis://[:PASSWORD@]HOST[:PORT][/DB]` or `rediss://...` (Redis or Valkey,
/// `rediss` over TLS), `s3://BUCKET[/PREFIX][?OPTION=VALUE&...]` (S3-compatible object storage),
/// `file://DIR`, or a plain path of a directory. [`Error::InvalidParameter`] for another scheme.
pub fn open_store(location: &str) -> Result<std::sync::Arc<dyn SessionStore>> {
    Ok(open_store_with_chunks(location)?.0)
}

/// [`open_store`], with the store of KV chunks that lives beside the sessions at a remote location (none for
/// a directory, whose chunks a [`crate::PrefixCache`] keeps in a directory of files).
#[allow(clippy::type_complexity)]
pub fn open_store_with_chunks(
    location: &str,
) -> Result<(
    std::sync::Arc<dyn SessionStore>,
    Option<std::sync::Arc<dyn SessionStore>>,
)> {
    match location.split_once("://") {
        Some(("redis" | "rediss", _)) => {
            let store = crate::RedisStore::open(location)?;
            let chunks = store.chunks();
            Ok((std::sync::Arc::new(store), Some(std::sync::Arc::new(chunks))))
        }
        Some(("s3", _)) => {
            let store = crate::S3Store::open(location)?;
            let chunks = store.chunks();
            Ok((std::sync::Arc::new(store), Some(std::sync::Arc::new(chunks))))
        }
        Some(("file", dir)) => Ok((std::sync::Arc::new(DirectoryStore::open(dir)?), None)),
        Some((scheme, _)) => Err(Error::invalid(
            "session_dir",
            "a directory, file://DIR, redis://HOST:PORT/DB, rediss://HOST:PORT/DB or s3://BUCKET/PREFIX",
            format!("a {scheme}:// URL"),
        )),
        None => Ok((std::sync::Arc::new(DirectoryStore::open(location)?), None)),
    }
}
