//! Just enough of the GGUF format to check a file before llama.cpp sees it and to fingerprint its content.
//!
//! The fingerprint identifies what determines a KV cache: it hashes (BLAKE3) the whole GGUF header (format
//! version, every metadata key and value, every tensor's name, type, shape and offset) and a fixed sample of
//! the tensor data: up to [`SAMPLES_PER_TENSOR`] blocks of [`SAMPLE_BYTES`] bytes spread evenly over every
//! tensor, first and last block included. A different fine-tune, quantization or vocabulary changes it; two
//! files that differ only in bytes that fall between the sampled blocks of every tensor do not. The cost is
//! the header plus a few hundred KB of reads, whatever the model's size.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use crate::error::{Error, Result};

/// Blocks sampled from each tensor's data.
pub const SAMPLES_PER_TENSOR: u64 = 8;
/// Size of each sampled block.
pub const SAMPLE_BYTES: u64 = 256;

const GGUF_MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Nesting limit for array values: GGUF arrays of arrays exist but never go deep.
const MAX_ARRAY_DEPTH: u32 = 4;

/// What we learn from a GGUF file's header.
#[derive(Debug, Clone)]
pub struct GgufSummary {
    /// `blake3:` followed by 32 hex digits.
    pub fingerprint: String,
}

struct HashingReader<R> {
    inner: R,
    hasher: blake3::Hasher,
    position: u64,
    file_len: u64,
}

impl<R: Read> HashingReader<R> {
    fn bytes(&mut self, n: u64, what: &str) -> std::result::Result<Vec<u8>, String> {
        if n > self.file_len.saturating_sub(self.position) {
            return Err(format!(
                "truncated: {what} needs {n} bytes at offset {} but the file has {} bytes",
                self.position, self.file_len
            ));
        }
        let mut buf = vec![0u8; usize::try_from(n).map_err(|_| format!("{what} too large"))?];
        self.inner
            .read_exact(&mut buf)
            .map_err(|e| format!("reading {what} at offset {}: {e}", self.position))?;
        self.hasher.update(&buf);
        self.position += n;
        Ok(buf)
    }

    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        let b = self.bytes(4, what)?;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        let b = self.bytes(8, what)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    fn string(&mut self, what: &str) -> std::result::Result<String, String> {
        let len = self.u64(what)?;
        let b = self.bytes(len, what)?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    /// Reads (and hashes) one metadata value of type `ty`, returning it when it is a u32 (for alignment).
    fn value(&mut self, ty: u32, depth: u32) -> std::result::Result<Option<u64>, String> {
        let fixed = |ty: u32| -> Option<u64> {
            match ty {
                0 | 1 | 7 => Some(1),
                2 | 3 => Some(2),
                4..=6 => Some(4),
                10..=12 => Some(8),
                _ => None,
            }
        };
        match ty {
            4 => Ok(Some(u64::from(self.u32("metadata value")?))),
            8 => self.string("metadata string").map(|_| None),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err("metadata arrays nested too deeply".into());
                }
                let elem_ty = self.u32("array type")?;
                let n = self.u64("array length")?;
                if let Some(size) = fixed(elem_ty) {
                    let total = n
                        .checked_mul(size)
                        .ok_or_else(|| format!("array of {n} elements is too large"))?;
                    self.bytes(total, "metadata array")?;
                } else {
                    for _ in 0..n {
                        self.value(elem_ty, depth + 1)?;
                    }
                }
                Ok(None)
            }
            other => match fixed(other) {
                Some(size) => self.bytes(size, "metadata value").map(|_| None),
                None => Err(format!("unknown metadata value type {other}")),
            },
        }
    }
}

/// Parses the header of the GGUF file at `path` and computes its fingerprint.
pub fn inspect(path: &Path) -> Result<GgufSummary> {
    let fail = |reason: String| Error::ModelLoad {
        path: path.to_path_buf(),
        reason,
    };
    let file = File::open(path).map_err(|e| fail(format!("cannot open: {e}")))?;
    let file_len = file
        .metadata()
        .map_err(|e| fail(format!("cannot stat: {e}")))?
        .len();
    let mut r = HashingReader {
        inner: BufReader::with_capacity(1 << 16, file),
        hasher: blake3::Hasher::new(),
        position: 0,
        file_len,
    };
    let header = (|| -> std::result::Result<(u64, Vec<u64>), String> {
        let magic = r.bytes(4, "magic")?;
        if magic != GGUF_MAGIC {
            return Err(format!(
                "not a GGUF file: expected magic {:?}, found {:?}",
                String::from_utf8_lossy(GGUF_MAGIC),
                String::from_utf8_lossy(&magic)
            ));
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(format!(
                "unsupported GGUF version: expected 2 or 3, found {version}"
            ));
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        let mut alignment = DEFAULT_ALIGNMENT;
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let ty = r.u32("metadata type")?;
            let value = r.value(ty, 0)?;
            if key == "general.alignment" {
                alignment = value
                    .filter(|a| *a > 0 && a.is_power_of_two())
                    .ok_or_else(|| {
                        "general.alignment: expected a power of two as uint32".to_string()
                    })?;
            }
        }
        let mut offsets = Vec::new();
        for _ in 0..n_tensors {
            r.string("tensor name")?;
            let n_dims = r.u32("tensor dimension count")?;
            if n_dims > 8 {
                return Err(format!(
                    "tensor with {n_dims} dimensions: expected at most 8"
                ));
            }
            r.bytes(u64::from(n_dims) * 8, "tensor shape")?;
            r.u32("tensor type")?;
            offsets.push(r.u64("tensor offset")?);
        }
        let data_start = r.position.div_ceil(alignment) * alignment;
        Ok((data_start, offsets))
    })()
    .map_err(&fail)?;
    let (data_start, mut offsets) = header;
    offsets.sort_unstable();
    offsets.dedup();
    if let Some(&last) = offsets.last() {
        if data_start.saturating_add(last) >= file_len {
            return Err(fail(format!(
                "truncated: the last tensor's data starts at offset {} but the file has {file_len} bytes",
                data_start.saturating_add(last)
            )));
        }
    }

    let mut hasher = r.hasher;
    hasher.update(&file_len.to_le_bytes());
    let mut file = r.inner.into_inner();
    let mut block = vec![0u8; SAMPLE_BYTES as usize];
    for (i, &start) in offsets.iter().enumerate() {
        let begin = data_start + start;
        let end = offsets
            .get(i + 1)
            .map_or(file_len, |next| data_start + next);
        for offset in sample_offsets(begin, end) {
            let len = (end - offset).min(SAMPLE_BYTES) as usize;
            file.seek(SeekFrom::Start(offset))
                .and_then(|_| file.read_exact(&mut block[..len]))
                .map_err(|e| fail(format!("reading tensor data at offset {offset}: {e}")))?;
            hasher.update(&block[..len]);
        }
    }
    let hex = hasher.finalize().to_hex();
    Ok(GgufSummary {
        fingerprint: format!("blake3:{}", &hex[..32]),
    })
}

/// Evenly spaced block starts within `[begin, end)`, first and last block included.
fn sample_offsets(begin: u64, end: u64) -> Vec<u64> {
    let len = end.saturating_sub(begin);
    if len <= SAMPLE_BYTES {
        return if len == 0 { vec![] } else { vec![begin] };
    }
    let last_start = end - SAMPLE_BYTES;
    let n = SAMPLES_PER_TENSOR.min(len.div_ceil(SAMPLE_BYTES));
    (0..n)
        .map(|i| begin + (last_start - begin) * i / (n - 1).max(1))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_cover_first_and_last_block() {
        let offsets = sample_offsets(1000, 1000 + 100_000);
        assert_eq!(offsets.len(), SAMPLES_PER_TENSOR as usize);
        assert_eq!(offsets[0], 1000);
        assert_eq!(*offsets.last().unwrap(), 1000 + 100_000 - SAMPLE_BYTES);
        assert_eq!(sample_offsets(5, 5), Vec::<u64>::new());
        assert_eq!(sample_offsets(5, 6), vec![5]);
    }
}
