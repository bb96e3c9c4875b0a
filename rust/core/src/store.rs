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
pub trait StoreLock: Send {}

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
}

/// Sessions as files in one directory: `<key>.session`, written atomically and durably; the lock of a key is
/// an advisory `flock` on `.<key>.lock`. Other files in the directory are ignored.
#[derive(Debug, Clone)]
pub struct DirectoryStore {
    dir: PathBuf,
}

/// Suffix of the files that hold values.
pub const SESSION_SUFFIX: &str = ".session";

impl DirectoryStore {
    /// A store in `dir`, created if missing.
    pub fn open(dir: impl Into<PathBuf>) -> Result<DirectoryStore> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
            op: "create directory",
            path: dir.clone(),
            source,
        })?;
        Ok(DirectoryStore { dir })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}{SESSION_SUFFIX}"))
    }
}

struct FileLock(#[allow(dead_code)] File);

impl StoreLock for FileLock {}

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
            let Some(key) = name.to_str().and_then(|n| n.strip_suffix(SESSION_SUFFIX)) else {
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
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| Error::Io {
                op: "open lock file",
                path: path.clone(),
                source,
            })?;
        file.lock().map_err(|source| Error::Io {
            op: "lock",
            path,
            source,
        })?;
        Ok(Box::new(FileLock(file)))
    }

    fn location(&self, key: &str) -> Option<PathBuf> {
        Some(self.path(key))
    }
}
