//! Files that are either entirely the old version or entirely the new one.
//!
//! A write goes to a temporary file in the target's directory (on Linux an unnamed `O_TMPFILE`, so a killed
//! writer leaves nothing behind), is fsynced, renamed over the target, and the directory is fsynced:
//! `atomic-write-file` does exactly that.

use std::io::{Read, Write};
use std::path::Path;

use atomic_write_file::AtomicWriteFile;

use crate::error::{Error, Result};

fn io_error<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Replaces the file at `path` by the concatenation of `parts`, durably and atomically.
pub(crate) fn write_atomically(path: &Path, parts: &[&[u8]]) -> Result<()> {
    if path.is_dir() {
        return Err(Error::Io {
            op: "write",
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::IsADirectory, "is a directory"),
        });
    }
    let mut file = AtomicWriteFile::options()
        .open(path)
        .map_err(io_error("create a temporary file next to", path))?;
    for part in parts {
        file.write_all(part).map_err(io_error("write", path))?;
    }
    // An error here drops `file`, which discards the temporary file and leaves the target as it was.
    file.commit()
        .map_err(io_error("commit (fsync and rename)", path))
}

/// Reads the whole file into one buffer.
pub(crate) fn read_all(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(io_error("read", path))
}

/// Reads at most `len` bytes from the start of the file.
pub(crate) fn read_prefix(path: &Path, len: usize) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).map_err(io_error("open", path))?;
    let mut prefix = Vec::with_capacity(len);
    file.take(len as u64)
        .read_to_end(&mut prefix)
        .map_err(io_error("read", path))?;
    Ok(prefix)
}
