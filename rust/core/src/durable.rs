//! Files that are either entirely the old version or entirely the new one.
//!
//! A write goes to a temporary file in the target's directory (on Linux an unnamed `O_TMPFILE`, so a writer
//! killed while writing leaves nothing behind), is fsynced, renamed over the target, and the directory is
//! fsynced: `atomic-write-file` does exactly that. To rename, it first links the file under a random name
//! (`.<name>.XXXXXX`) and renames that a moment later; a writer killed in between leaves that name behind
//! (the target is intact). Such leftovers never collide with a later write (names are random, created
//! exclusively), and every write removes the stale ones of its target.

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
        .map_err(io_error("commit (fsync and rename)", path))?;
    remove_stale_temporaries(path);
    Ok(())
}

/// A temporary name is linked and renamed within microseconds; one whose inode changed longer ago than this
/// belongs to a writer that died between the two calls.
const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// Removes what killed writers left of `path`: `.<name>.XXXXXX` files (`atomic-write-file`'s temporary names)
/// whose inode has not changed for [`STALE_AFTER`]. Best effort: errors are ignored.
fn remove_stale_temporaries(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!(".{name}.");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(suffix) = file_name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        if suffix.len() != 6 || !suffix.bytes().all(|b| b.is_ascii_alphanumeric()) {
            continue;
        }
        if is_stale(&entry) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(unix)]
fn is_stale(entry: &std::fs::DirEntry) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = entry.metadata() else {
        return false;
    };
    // ctime changes when the name is linked, so it dates the link, not the (possibly long) write before it.
    let changed = std::time::UNIX_EPOCH
        + std::time::Duration::new(
            u64::try_from(meta.ctime()).unwrap_or(0),
            u32::try_from(meta.ctime_nsec()).unwrap_or(0),
        );
    meta.is_file()
        && std::time::SystemTime::now()
            .duration_since(changed)
            .is_ok_and(|age| age > STALE_AFTER)
}

#[cfg(not(unix))]
fn is_stale(entry: &std::fs::DirEntry) -> bool {
    entry
        .metadata()
        .and_then(|m| m.modified())
        .ok()
        .and_then(|m| m.elapsed().ok())
        .is_some_and(|age| age > STALE_AFTER)
}

/// Memory holding a file's contents: on the heap for small files; for large ones an anonymous mapping
/// advised to use huge pages, so that filling it costs a few dozen page faults instead of one per 4 KiB
/// (thousands for a session of tens of MB: that was a third of a load).
pub(crate) struct FileBytes {
    storage: Storage,
    len: usize,
}

enum Storage {
    Heap(Vec<u8>),
    Mapped(memmap2::MmapMut),
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.storage {
            Storage::Heap(v) => &v[..self.len],
            Storage::Mapped(m) => &m[..self.len],
        }
    }
}

impl std::ops::DerefMut for FileBytes {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.storage {
            Storage::Heap(v) => &mut v[..self.len],
            Storage::Mapped(m) => &mut m[..self.len],
        }
    }
}

/// `len` zeroed bytes, in huge-page-advised memory when large (see [`FileBytes`]).
pub(crate) fn zeroed(len: usize) -> std::io::Result<FileBytes> {
    let storage = if len >= MAPPED_READ_MIN {
        let map = memmap2::MmapMut::map_anon(len)?;
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage); // advice only: without huge pages it still works
        Storage::Mapped(map)
    } else {
        Storage::Heap(vec![0; len])
    };
    Ok(FileBytes { storage, len })
}

/// Files at least this large are read into huge-page-advised memory.
const MAPPED_READ_MIN: usize = 2 << 20;
/// Bytes read per call: the checksum of a chunk is computed while it is still in the CPU cache.
const READ_CHUNK: usize = 1 << 20;

/// Opens a file to read it whole: the file, its length, and zeroed memory of that length.
fn open_for_reading(path: &Path) -> Result<(std::fs::File, usize, FileBytes)> {
    let file = std::fs::File::open(path).map_err(io_error("open", path))?;
    let meta = file.metadata().map_err(io_error("stat", path))?;
    if meta.is_dir() {
        return Err(io_error("read", path)(std::io::Error::new(
            std::io::ErrorKind::IsADirectory,
            "is a directory",
        )));
    }
    let len = usize::try_from(meta.len()).unwrap_or(usize::MAX);
    let bytes = zeroed(len).map_err(io_error("allocate memory for", path))?;
    Ok((file, len, bytes))
}

/// Reads the whole file, handing each chunk to `digest` (with its offset) while it is still in the CPU cache.
/// Returns the bytes and whether the file still had the size it had when it was opened.
pub(crate) fn read_all(
    path: &Path,
    digest: &mut dyn FnMut(usize, &[u8]),
) -> Result<(FileBytes, bool)> {
    let (mut file, len, mut bytes) = open_for_reading(path)?;
    let buffer: &mut [u8] = &mut bytes;
    let mut filled = 0;
    while filled < len {
        let end = (filled + READ_CHUNK).min(len);
        let n = match file.read(&mut buffer[filled..end]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(io_error("read", path)(source)),
        };
        digest(filled, &buffer[filled..filled + n]);
        filled += n;
    }
    // One more byte means the file grew while it was read.
    let grew = file.read(&mut [0u8]).map(|n| n > 0).unwrap_or(true);
    bytes.len = filled;
    Ok((bytes, filled == len && !grew))
}

/// [`read_all`] with `digest` running on this thread while another thread reads the next chunks, for a digest
/// that costs about as much as the reading (a keyed BLAKE3 MAC): the two overlap instead of adding up. Each
/// chunk is handed over once it is filled, as a shared borrow of its own disjoint part of the buffer.
pub(crate) fn read_all_overlapped(
    path: &Path,
    digest: &mut dyn FnMut(usize, &[u8]),
) -> Result<(FileBytes, bool)> {
    let (mut file, len, mut bytes) = open_for_reading(path)?;
    let buffer: &mut [u8] = &mut bytes;
    let filled = std::thread::scope(|scope| -> Result<usize> {
        let (sender, receiver) = std::sync::mpsc::sync_channel::<(usize, &[u8])>(4);
        let reader = scope.spawn(move || -> std::io::Result<usize> {
            let mut filled = 0;
            for chunk in buffer.chunks_mut(READ_CHUNK) {
                let mut n = 0;
                while n < chunk.len() {
                    match file.read(&mut chunk[n..]) {
                        Ok(0) => break,
                        Ok(k) => n += k,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e),
                    }
                }
                let (done, _) = chunk.split_at(n);
                if sender.send((filled, done)).is_err() {
                    break;
                }
                filled += n;
                if n < READ_CHUNK {
                    break;
                }
            }
            // One more byte means the file grew while it was read.
            let grew = file.read(&mut [0u8]).map(|k| k > 0).unwrap_or(true);
            Ok(if grew { usize::MAX } else { filled })
        });
        for (offset, chunk) in receiver {
            digest(offset, chunk);
        }
        reader
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            .map_err(io_error("read", path))
    })?;
    let whole = filled == len;
    bytes.len = filled.min(len);
    Ok((bytes, whole))
}

/// Reads at most `len` bytes from the start of the file. The buffer grows with what is read, so a length
/// announced by a file (and so possibly hostile) never sizes an allocation beyond the file itself.
pub(crate) fn read_prefix(path: &Path, len: usize) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).map_err(io_error("open", path))?;
    let file_len = file.metadata().map_err(io_error("stat", path))?.len();
    let mut prefix = Vec::with_capacity(
        len.min(usize::try_from(file_len).unwrap_or(usize::MAX))
            .min(1 << 20),
    );
    file.take(len as u64)
        .read_to_end(&mut prefix)
        .map_err(io_error("read", path))?;
    Ok(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overlapped_read_hands_every_byte_to_the_digest_once_in_order() {
        let dir =
            std::env::temp_dir().join(format!("llama-sessions-durable-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for len in [0, 1, READ_CHUNK - 1, READ_CHUNK, 3 * READ_CHUNK + 5] {
            let path = dir.join(format!("{len}.bin"));
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            std::fs::write(&path, &data).unwrap();
            let mut seen = Vec::new();
            let (bytes, whole) = read_all_overlapped(&path, &mut |offset, chunk| {
                assert_eq!(offset, seen.len());
                seen.extend_from_slice(chunk);
            })
            .unwrap();
            assert!(whole);
            assert_eq!(&*bytes, data.as_slice());
            assert_eq!(seen, data);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
