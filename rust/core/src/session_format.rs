//! The session envelope: how a Context's state is framed in a file or a snapshot.
//!
//! ```text
//! offset  size          field
//! 0       8             magic  89 'L' 'L' 'S' 'E' 'S' 'S' 0A
//! 8       4             format version (u32 LE)
//! 12      4             header length H (u32 LE)
//! 16      8             state length S (u64 LE)
//! 24      8             prelude check: XXH3-64 of bytes 0..24 (u64 LE)
//! 32      H             header: UTF-8 JSON (SessionHeader)
//! 32+H    S             llama.cpp's sequence states, one after another, in header order
//! 32+H+S  16            checksum: XXH3-128 of bytes 0..32+H+S (u128 LE)
//! 48+H+S  32            signed sessions only: keyed BLAKE3 MAC of bytes 0..48+H+S (`crate::signing`)
//! ```
//!
//! A signed session says so in its header (`"signature": "blake3-keyed-256"`), which the checksum covers.
//!
//! Every future format version keeps the first 32 bytes, so that a reader can tell "newer version" from
//! "corrupt" before it knows anything else. Everything here is pure: no llama.cpp, no I/O.

use std::ops::Range;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{xxh3_128, xxh3_64};

use crate::error::{Error, Result};
use crate::signing::{SessionKey, MAC_LEN, SCHEME};

/// First bytes of every llama-sessions session. The high first byte and the final newline catch a transfer
/// that mangled bytes or line endings, as PNG's magic does.
pub const MAGIC: [u8; 8] = *b"\x89LLSESS\n";
/// The format version this build writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
/// Magic, version, lengths and the prelude check.
pub const PRELUDE_LEN: usize = 32;
/// The XXH3-128 checksum at the end.
pub const CHECKSUM_LEN: usize = 16;
/// Largest JSON header accepted (a header holds the token ids, about 7 bytes per token).
pub const MAX_HEADER_LEN: usize = 256 << 20;
/// Largest user metadata object, serialized.
pub const MAX_METADATA_LEN: usize = 16 << 20;

/// The llama.cpp build this crate is compiled against, as recorded in sessions. llama.cpp's state layout can
/// change between builds without a version bump, so a session is only loaded by the build that wrote it
/// (a test checks this constant against `Cargo.lock`).
pub const LLAMA_CPP_BUILD: &str = "llama-cpp-sys-2 0.1.161";

/// llama.cpp's own session file ("ggsn", written by `llama_state_save_file`).
pub const LLAMA_CPP_MAGIC: [u8; 4] = 0x6767_736e_u32.to_le_bytes();
/// The "ggsn" version this llama.cpp build reads and writes.
pub const LLAMA_CPP_VERSION: u32 = 11;

/// Everything recorded about a session besides llama.cpp's bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionHeader {
    /// Version of llama-sessions that wrote it.
    pub library_version: String,
    /// The llama.cpp build that produced the state bytes ([`LLAMA_CPP_BUILD`]).
    pub llama_cpp_build: String,
    /// When it was written, RFC 3339 UTC.
    pub created_at: String,
    /// The model the state belongs to.
    pub model: ModelRecord,
    /// The context parameters the state depends on.
    pub params: ParamsRecord,
    /// The model's memory when it is not one KV cache (sliding window, hybrid, recurrent): what a restore
    /// needs to match. Absent for plain attention (and in files written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryRecord>,
    /// The sequences held, with their tokens and the size of their state bytes, in file order.
    pub sequences: Vec<SequenceRecord>,
    /// The caller's metadata (a JSON object).
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// The signature scheme of a signed session ([`SCHEME`]); absent when unsigned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// Present in a chunk manifest (how a [`crate::SessionManager`] stores sessions): its one sequence's
    /// state is the full chunks named here, kept in a chunk store, followed by the partial tail chunk that
    /// the state bytes of this session hold. Absent in a single-file session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<ChunkManifest>,
}

/// The chunks a session manifest is made of (see [`SessionHeader::chunks`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkManifest {
    /// Tokens per chunk.
    pub chunk_tokens: u32,
    /// The namespace the keys were derived in.
    pub namespace: String,
    /// The full chunks, in order: each one's key (64 hex digits: which tokens, under which parameters) and
    /// the BLAKE3 digest of its bytes (64 hex digits: which exact KV rows, so that a signed manifest binds
    /// them too).
    pub chunks: Vec<ManifestChunk>,
}

/// One chunk of a [`ChunkManifest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestChunk {
    /// The chunk's key ([`crate::chunks::ChunkKey::to_hex`]).
    pub key: String,
    /// BLAKE3 of the chunk's bytes, as its last 32 bytes record ([`crate::chunks::codec::chunk_digest`]).
    pub digest: String,
}

/// The memory geometry a session's states were written with, for models whose memory is not one KV cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRecord {
    /// "sliding_window", "hybrid" or "recurrent".
    pub kind: String,
    /// The sliding window, in tokens (0 without one).
    #[serde(default)]
    pub n_swa: u32,
    /// Cells of the sliding-window cache per sequence (0 without one).
    #[serde(default)]
    pub swa_cache_cells: u64,
    /// Row bytes of the recurrent R states, per recurrent layer.
    #[serde(default)]
    pub recurrent_r_bytes: Vec<u64>,
    /// Row bytes of the recurrent S states, per recurrent layer.
    #[serde(default)]
    pub recurrent_s_bytes: Vec<u64>,
}

/// The identity of the model that wrote a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRecord {
    /// [`crate::Model::fingerprint`]: what decides whether the state belongs to a model.
    pub fingerprint: String,
    /// `general.name`, for messages.
    pub name: Option<String>,
    /// `general.architecture`.
    pub architecture: String,
    /// The file name the model was loaded from, for messages.
    pub file_name: Option<String>,
}

impl ModelRecord {
    /// "name (fingerprint)", for messages.
    pub fn describe(&self) -> String {
        let name = self
            .name
            .as_deref()
            .or(self.file_name.as_deref())
            .unwrap_or("unnamed model");
        format!("{name:?} ({})", self.fingerprint)
    }
}

/// Context parameters that the saved state depends on (all of [`crate::ContextParams`] but `n_threads`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamsRecord {
    /// KV cells of the context, shared by its sequences, as llama.cpp allocated them (earlier builds recorded
    /// the requested value; a load compares it as llama.cpp allocates it).
    pub n_ctx: u32,
    /// Tokens per decode call as llama.cpp applied it (clamped to the requested `n_ctx`); it decides how a
    /// continuation is batched, so it is part of exactness.
    pub n_batch: u32,
    /// K cache type ("f16", "q8_0", "q4_0").
    pub type_k: String,
    /// V cache type.
    pub type_v: String,
    /// Flash attention (it decides whether V is stored transposed).
    pub flash_attn: bool,
    /// Sequences in the context (llama.cpp keeps one KV stream per sequence).
    pub n_seq_max: u32,
}

/// One sequence in a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequenceRecord {
    /// The sequence id it was saved from.
    pub seq: u32,
    /// Its tokens, in position order.
    pub tokens: Vec<i32>,
    /// Length of its llama.cpp state bytes.
    pub state_bytes: u64,
}

/// A verified session: its header and where each sequence's state bytes are.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenedSession {
    /// The parsed header.
    pub header: SessionHeader,
    /// The format version it was written with.
    pub format_version: u32,
    /// Length of the JSON header.
    pub header_len: usize,
    /// Byte range of each sequence's state in the session bytes, in header order.
    pub state_ranges: Vec<Range<usize>>,
    /// Length of the whole session.
    pub total_len: usize,
    /// Whether it ends with a MAC (see [`crate::signing`]).
    pub signed: bool,
}

impl OpenedSession {
    /// Total length of llama.cpp's state bytes.
    pub fn state_len(&self) -> usize {
        self.state_ranges.iter().map(ExactSizeIterator::len).sum()
    }
}

/// What a file or buffer appears to be, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionKind {
    /// A llama-sessions session.
    LlamaSessions,
    /// llama.cpp's own session file ("ggsn").
    LlamaCpp,
    /// Neither.
    Unknown,
}

/// Tells the kind of session from its first bytes (at least 8 are needed to recognise ours).
pub fn detect(prefix: &[u8]) -> SessionKind {
    if prefix.starts_with(&MAGIC) {
        SessionKind::LlamaSessions
    } else if prefix.starts_with(&LLAMA_CPP_MAGIC) {
        SessionKind::LlamaCpp
    } else {
        SessionKind::Unknown
    }
}

/// Length of a session with a `header_len`-byte header and `state_len` bytes of state, signed or not.
pub fn encoded_len(header_len: usize, state_len: usize, signed: bool) -> usize {
    PRELUDE_LEN + header_len + state_len + CHECKSUM_LEN + if signed { MAC_LEN } else { 0 }
}

/// Serializes `header`, checking the limits.
pub fn encode_header(header: &SessionHeader) -> Result<Vec<u8>> {
    let json = serde_json::to_vec(header)
        .map_err(|e| Error::Internal(format!("cannot serialize a session header: {e}")))?;
    if json.len() > MAX_HEADER_LEN {
        return Err(Error::invalid(
            "session",
            format!("a header of at most {MAX_HEADER_LEN} bytes"),
            format!("{} bytes", json.len()),
        ));
    }
    Ok(json)
}

/// Writes the prelude and the header into the start of `out`, which is exactly
/// `encoded_len(header_json.len(), state_len)` long; returns the range the state bytes go to.
pub fn write_prelude(out: &mut [u8], header_json: &[u8], state_len: usize) -> Range<usize> {
    let unsigned = encoded_len(header_json.len(), state_len, false);
    assert!(out.len() == unsigned || out.len() == unsigned + MAC_LEN);
    out[0..8].copy_from_slice(&MAGIC);
    out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    let header_len =
        u32::try_from(header_json.len()).expect("header length is checked against the limit");
    out[12..16].copy_from_slice(&header_len.to_le_bytes());
    out[16..24].copy_from_slice(&(state_len as u64).to_le_bytes());
    let check = xxh3_64(&out[0..24]);
    out[24..32].copy_from_slice(&check.to_le_bytes());
    let header_end = PRELUDE_LEN + header_json.len();
    out[PRELUDE_LEN..header_end].copy_from_slice(header_json);
    header_end..header_end + state_len
}

/// Writes the checksum, and with a key the MAC after it, into the end of `out` (which
/// [`write_prelude`] sized for the same choice).
pub fn seal(out: &mut [u8], key: Option<&SessionKey>) {
    let mac_len = if key.is_some() { MAC_LEN } else { 0 };
    let body = out.len() - CHECKSUM_LEN - mac_len;
    let checksum = xxh3_128(&out[..body]);
    out[body..body + CHECKSUM_LEN].copy_from_slice(&checksum.to_le_bytes());
    if let Some(key) = key {
        let signed_end = body + CHECKSUM_LEN;
        let mac = key.mac(&out[..signed_end]);
        out[signed_end..].copy_from_slice(mac.as_bytes());
    }
}

/// Digests of session bytes computed while they were read (so that verifying needs no second pass).
#[derive(Debug, Clone, Copy, Default)]
pub struct Precomputed {
    /// XXH3-128 of all but the last [`CHECKSUM_LEN`] bytes (where an unsigned session's checksum starts).
    pub unsigned_checksum: Option<u128>,
    /// XXH3-128 of all but the last `CHECKSUM_LEN + MAC_LEN` bytes (a signed session's checksummed part).
    pub signed_checksum: Option<u128>,
}

/// Verifies `bytes` completely (prelude, length, checksum, header) without trusting any of it, and says
/// where the state bytes are. `origin` names the bytes in errors. A signed session is verified by its
/// checksum and reported as signed; see [`open_signed`] to check its MAC.
pub fn open(bytes: &[u8], origin: &str) -> Result<OpenedSession> {
    open_with_checksum(bytes, origin, Precomputed::default())
}

/// The fixed fields of the prelude, after its own check.
#[derive(Debug, Clone, Copy)]
struct Prelude {
    format_version: u32,
    header_len: usize,
    /// Length of an unsigned session with these lengths; a signed one is [`MAC_LEN`] longer.
    unsigned_len: usize,
}

/// The one prelude parser: magic, check, version (0 never existed: corrupt; newer: a version error) and
/// addressable lengths. `bytes` may be the whole session or just its first [`PRELUDE_LEN`] bytes.
fn parse_prelude(bytes: &[u8], origin: &str) -> Result<Prelude> {
    let corrupt = |reason: String| Error::SessionCorrupt {
        origin: origin.to_owned(),
        reason,
    };
    if !bytes.starts_with(&MAGIC) {
        let found = &bytes[..bytes.len().min(8)];
        return Err(corrupt(
            if bytes.len() < MAGIC.len() && MAGIC.starts_with(bytes) {
                format!("truncated to {} bytes, inside the magic", bytes.len())
            } else {
                format!(
                    "not a llama-sessions session (expected the magic {}, found {})",
                    hex(&MAGIC),
                    hex(found)
                )
            },
        ));
    }
    if bytes.len() < PRELUDE_LEN {
        return Err(corrupt(format!(
            "truncated to {} bytes, inside the {PRELUDE_LEN}-byte prelude",
            bytes.len()
        )));
    }
    let stored_check = u64::from_le_bytes(bytes[24..32].try_into().expect("8 bytes"));
    if xxh3_64(&bytes[0..24]) != stored_check {
        return Err(corrupt(
            "the prelude (version and lengths) does not match its check".to_owned(),
        ));
    }
    let format_version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if format_version == 0 {
        return Err(corrupt("format version 0 does not exist".to_owned()));
    }
    if format_version > FORMAT_VERSION {
        return Err(Error::SessionVersion {
            origin: origin.to_owned(),
            reason: format!(
                "written in session format version {format_version}, this build reads versions 1 to \
                 {FORMAT_VERSION}; upgrade llama-sessions"
            ),
        });
    }
    let header_len = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
    if header_len > MAX_HEADER_LEN {
        return Err(corrupt(format!(
            "the prelude announces a {header_len}-byte header, the format allows at most {MAX_HEADER_LEN}"
        )));
    }
    let state_len = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    let unsigned_len = usize::try_from(state_len)
        .ok()
        .and_then(|s| {
            PRELUDE_LEN
                .checked_add(header_len)?
                .checked_add(s)?
                .checked_add(CHECKSUM_LEN + MAC_LEN)
        })
        .map(|signed_len| signed_len - MAC_LEN)
        .ok_or_else(|| corrupt(format!("state length {state_len} cannot be addressed")))?;
    Ok(Prelude {
        format_version,
        header_len,
        unsigned_len,
    })
}

/// What a session's prelude announces: enough for a reader to bound what it reads next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnnouncedLengths {
    /// The session format's version.
    pub format_version: u32,
    /// Where the header ends: the prelude and the header.
    pub header_end: usize,
    /// Bytes of llama.cpp state after the header.
    pub state_len: u64,
    /// The most bytes the whole session can have (a signed one: the MAC included).
    pub max_len: usize,
}

/// The lengths the prelude at the start of `bytes` announces, after its check (the rest of `bytes`, if any,
/// is not looked at).
pub fn announced_lengths(bytes: &[u8], origin: &str) -> Result<AnnouncedLengths> {
    let prelude = parse_prelude(bytes, origin)?;
    let header_end = PRELUDE_LEN + prelude.header_len;
    Ok(AnnouncedLengths {
        format_version: prelude.format_version,
        header_end,
        state_len: (prelude.unsigned_len - header_end - CHECKSUM_LEN) as u64,
        max_len: prelude.unsigned_len + MAC_LEN,
    })
}

/// [`open`], with checksums already computed by the caller while it read the bytes.
pub fn open_with_checksum(
    bytes: &[u8],
    origin: &str,
    precomputed: Precomputed,
) -> Result<OpenedSession> {
    let corrupt = |reason: String| Error::SessionCorrupt {
        origin: origin.to_owned(),
        reason,
    };
    let prelude = parse_prelude(bytes, origin)?;
    let signed = bytes.len() == prelude.unsigned_len + MAC_LEN;
    let expected_len = if signed {
        bytes.len()
    } else {
        prelude.unsigned_len
    };
    if bytes.len() != expected_len {
        return Err(corrupt(if bytes.len() < expected_len {
            format!(
                "truncated: the prelude announces {expected_len} bytes, found {}",
                bytes.len()
            )
        } else {
            format!(
                "{} bytes of trailing data after the {expected_len} bytes the prelude announces",
                bytes.len() - expected_len
            )
        }));
    }
    let body = prelude.unsigned_len - CHECKSUM_LEN;
    let stored = u128::from_le_bytes(
        bytes[body..body + CHECKSUM_LEN]
            .try_into()
            .expect("16 bytes"),
    );
    let precomputed = if signed {
        precomputed.signed_checksum
    } else {
        precomputed.unsigned_checksum
    };
    let computed = precomputed.unwrap_or_else(|| xxh3_128(&bytes[..body]));
    if stored != computed {
        return Err(corrupt(format!(
            "checksum mismatch (stored {stored:032x}, computed {computed:032x}): the bytes changed after \
             they were written"
        )));
    }
    let opened = parse_body(bytes, origin, prelude, signed)?;
    if signed != opened.header.signature.is_some() {
        return Err(corrupt(if signed {
            format!(
                "{MAC_LEN} bytes of trailing data after the {} bytes the prelude announces",
                prelude.unsigned_len
            )
        } else {
            "its header says it is signed, but it has no signature".to_owned()
        }));
    }
    Ok(opened)
}

/// Verifies a signed session with `key`: the MAC over everything before it first (nothing else is trusted
/// or parsed before that), then the rest as [`open`] does, the checksum excepted (the MAC covers it).
/// `precomputed_mac`: the MAC of all but the last [`MAC_LEN`] bytes, computed by the caller while reading.
pub fn open_signed(
    bytes: &[u8],
    origin: &str,
    key: &SessionKey,
    precomputed_mac: Option<blake3::Hash>,
) -> Result<OpenedSession> {
    let signature = |reason: String| Error::SessionSignature {
        origin: origin.to_owned(),
        reason,
    };
    if bytes.len() < PRELUDE_LEN + CHECKSUM_LEN + MAC_LEN {
        return Err(signature(format!(
            "{} bytes are too few for a signed session",
            bytes.len()
        )));
    }
    let signed_end = bytes.len() - MAC_LEN;
    let computed = precomputed_mac.unwrap_or_else(|| key.mac(&bytes[..signed_end]));
    let stored: [u8; MAC_LEN] = bytes[signed_end..].try_into().expect("32 bytes");
    // blake3::Hash compares in constant time.
    if computed != blake3::Hash::from(stored) {
        let unsigned = parse_prelude(bytes, origin).is_ok_and(|p| p.unsigned_len == bytes.len());
        return Err(signature(if unsigned {
            "it is not signed (it was saved without a secret_key), and a secret_key was given"
                .to_owned()
        } else {
            "its signature does not match: it was modified after it was signed, or signed with another key"
                .to_owned()
        }));
    }
    let prelude = parse_prelude(bytes, origin)?;
    if bytes.len() != prelude.unsigned_len + MAC_LEN {
        return Err(Error::SessionCorrupt {
            origin: origin.to_owned(),
            reason: format!(
                "it is {} bytes long, its prelude announces {} plus the signature",
                bytes.len(),
                prelude.unsigned_len
            ),
        });
    }
    let opened = parse_body(bytes, origin, prelude, true)?;
    if opened.header.signature.as_deref() != Some(SCHEME) {
        return Err(signature(format!(
            "its header names signature scheme {:?}, expected {SCHEME:?}",
            opened.header.signature
        )));
    }
    Ok(opened)
}

/// Parses the header and locates the state ranges of a session whose integrity is established.
fn parse_body(bytes: &[u8], origin: &str, prelude: Prelude, signed: bool) -> Result<OpenedSession> {
    let corrupt = |reason: String| Error::SessionCorrupt {
        origin: origin.to_owned(),
        reason,
    };
    let header_len = prelude.header_len;
    let header_bytes = &bytes[PRELUDE_LEN..PRELUDE_LEN + header_len];
    let header: SessionHeader = serde_json::from_slice(header_bytes)
        .map_err(|e| corrupt(format!("the header is not a valid session header: {e}")))?;
    let state_start = PRELUDE_LEN + header_len;
    let state_end = prelude.unsigned_len - CHECKSUM_LEN;
    let mut state_ranges =
        Vec::with_capacity(header.sequences.len().min(crate::MAX_SEQUENCES as usize));
    let mut offset = state_start;
    for record in &header.sequences {
        let len = usize::try_from(record.state_bytes).unwrap_or(usize::MAX);
        let end = offset.checked_add(len).filter(|&end| end <= state_end);
        let Some(end) = end else {
            return Err(corrupt(format!(
                "sequence {} announces {} state bytes, more than the file holds",
                record.seq, record.state_bytes
            )));
        };
        state_ranges.push(offset..end);
        offset = end;
    }
    if offset != state_end {
        return Err(corrupt(format!(
            "the sequences account for {} of {} state bytes",
            offset - state_start,
            state_end - state_start
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    for record in &header.sequences {
        if record.seq >= header.params.n_seq_max || !seen.insert(record.seq) {
            return Err(corrupt(format!(
                "sequence id {} is repeated or not below n_seq_max={}",
                record.seq, header.params.n_seq_max
            )));
        }
    }
    Ok(OpenedSession {
        header,
        format_version: prelude.format_version,
        header_len,
        state_ranges,
        total_len: bytes.len(),
        signed,
    })
}

/// Length of the prelude plus the header announced by `prelude` (the first [`PRELUDE_LEN`] bytes), after
/// checking the prelude; reading that many bytes gives [`read_header`] what it needs.
pub fn header_end(prelude: &[u8], origin: &str) -> Result<usize> {
    parse_prelude(prelude, origin).map(|p| PRELUDE_LEN + p.header_len)
}

/// Parses the header from the first [`header_end`] bytes of a session, *without* the checksum over the state
/// (for listings: a load still verifies everything).
pub fn read_header(prefix: &[u8], origin: &str) -> Result<SessionHeader> {
    let end = header_end(prefix, origin)?;
    let header = prefix
        .get(PRELUDE_LEN..end)
        .ok_or_else(|| Error::SessionCorrupt {
            origin: origin.to_owned(),
            reason: format!(
                "truncated inside the header ({} of {end} bytes)",
                prefix.len()
            ),
        })?;
    serde_json::from_slice(header).map_err(|e| Error::SessionCorrupt {
        origin: origin.to_owned(),
        reason: format!("the header is not a valid session header: {e}"),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The header of llama.cpp's own session file: magic, version, token count, tokens; the state follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlamaCppSessionHeader {
    /// The tokens it lists.
    pub tokens: Vec<i32>,
    /// Where the state starts.
    pub state_offset: usize,
}

/// Parses the header of a llama.cpp ("ggsn") session, checking what can be checked without llama.cpp.
pub fn open_llama_cpp(bytes: &[u8], origin: &str) -> Result<LlamaCppSessionHeader> {
    let corrupt = |reason: String| Error::SessionCorrupt {
        origin: origin.to_owned(),
        reason,
    };
    if !bytes.starts_with(&LLAMA_CPP_MAGIC) {
        return Err(corrupt(
            "not a llama.cpp session (no \"ggsn\" magic)".to_owned(),
        ));
    }
    if bytes.len() < 12 {
        return Err(corrupt(format!(
            "truncated to {} bytes, inside llama.cpp's 12-byte session header",
            bytes.len()
        )));
    }
    let version = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
    if version != LLAMA_CPP_VERSION {
        return Err(Error::SessionVersion {
            origin: origin.to_owned(),
            reason: format!(
                "llama.cpp session version {version}, this build's llama.cpp reads version {LLAMA_CPP_VERSION}"
            ),
        });
    }
    let n_tokens = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
    let state_offset = n_tokens
        .checked_mul(4)
        .and_then(|n| n.checked_add(12))
        .filter(|&end| end <= bytes.len())
        .ok_or_else(|| {
            corrupt(format!(
                "truncated: it lists {n_tokens} tokens but holds {} bytes",
                bytes.len()
            ))
        })?;
    let tokens = bytes[12..state_offset]
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    Ok(LlamaCppSessionHeader {
        tokens,
        state_offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> SessionHeader {
        SessionHeader {
            library_version: "0.1.0".into(),
            llama_cpp_build: LLAMA_CPP_BUILD.into(),
            created_at: "2026-11-22T00:00:00Z".into(),
            model: ModelRecord {
                fingerprint: "blake3:00".into(),
                name: Some("m".into()),
                architecture: "llama".into(),
                file_name: None,
            },
            params: ParamsRecord {
                n_ctx: 512,
                n_batch: 64,
                type_k: "f16".into(),
                type_v: "f16".into(),
                flash_attn: false,
                n_seq_max: 2,
            },
            memory: None,
            sequences: vec![
                SequenceRecord {
                    seq: 0,
                    tokens: vec![1, 2, 3],
                    state_bytes: 5,
                },
                SequenceRecord {
                    seq: 1,
                    tokens: vec![],
                    state_bytes: 2,
                },
            ],
            metadata: serde_json::Map::new(),
            signature: None,
            chunks: None,
        }
    }

    fn encode(header: &SessionHeader, state: &[u8]) -> Vec<u8> {
        let json = encode_header(header).unwrap();
        let mut out = vec![0; encoded_len(json.len(), state.len(), false)];
        let range = write_prelude(&mut out, &json, state.len());
        out[range].copy_from_slice(state);
        seal(&mut out, None);
        out
    }

    #[test]
    fn round_trip_gives_the_header_and_the_state_ranges() {
        let bytes = encode(&header(), b"abcdeXY");
        let opened = open(&bytes, "t").unwrap();
        assert_eq!(opened.header, header());
        assert_eq!(&bytes[opened.state_ranges[0].clone()], b"abcde");
        assert_eq!(&bytes[opened.state_ranges[1].clone()], b"XY");
        assert_eq!(opened.total_len, bytes.len());
    }

    #[test]
    fn every_truncation_and_every_bit_flip_is_corrupt() {
        let bytes = encode(&header(), b"abcdeXY");
        for len in 0..bytes.len() {
            let err = open(&bytes[..len], "t").unwrap_err();
            assert!(matches!(err, Error::SessionCorrupt { .. }), "{len}: {err}");
        }
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            let err = open(&flipped, "t").unwrap_err();
            assert!(
                matches!(err, Error::SessionCorrupt { .. }),
                "bit {bit}: {err}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            open(&longer, "t"),
            Err(Error::SessionCorrupt { .. })
        ));
    }

    #[test]
    fn a_checksum_computed_while_reading_is_the_one_shot_checksum() {
        let mut h = header();
        h.sequences[0].state_bytes = (3 << 20) - 2;
        let bytes = encode(&h, &vec![7u8; 3 << 20]);
        let dir =
            std::env::temp_dir().join(format!("llama-sessions-format-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.session");
        std::fs::write(&path, &bytes).unwrap();
        let (read, precomputed) = crate::session::read_session_bytes(&path).unwrap();
        assert_eq!(&*read, bytes.as_slice());
        assert_eq!(
            precomputed.unsigned_checksum,
            Some(xxh3_128(&bytes[..bytes.len() - CHECKSUM_LEN]))
        );
        assert_eq!(
            precomputed.signed_checksum,
            Some(xxh3_128(&bytes[..bytes.len() - CHECKSUM_LEN - MAC_LEN]))
        );
        assert_eq!(
            open_with_checksum(&read, "t", precomputed).unwrap(),
            open(&bytes, "t").unwrap()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_newer_format_version_is_a_version_error() {
        let mut bytes = encode(&header(), b"abcdeXY");
        bytes[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        let check = xxh3_64(&bytes[0..24]);
        bytes[24..32].copy_from_slice(&check.to_le_bytes());
        assert!(matches!(
            open(&bytes, "t"),
            Err(Error::SessionVersion { .. })
        ));
    }

    #[test]
    fn version_zero_is_corrupt_for_every_reader() {
        let mut bytes = encode(&header(), b"abcdeXY");
        bytes[8..12].copy_from_slice(&0u32.to_le_bytes());
        let check = xxh3_64(&bytes[0..24]);
        bytes[24..32].copy_from_slice(&check.to_le_bytes());
        for err in [
            open(&bytes, "t").unwrap_err(),
            header_end(&bytes[..PRELUDE_LEN], "t").unwrap_err(),
            read_header(&bytes, "t").unwrap_err(),
        ] {
            assert!(
                matches!(&err, Error::SessionCorrupt { reason, .. } if reason == "format version 0 does not exist"),
                "{err}"
            );
        }
    }

    fn encode_signed(header: &SessionHeader, state: &[u8], key: &SessionKey) -> Vec<u8> {
        let mut header = header.clone();
        header.signature = Some(SCHEME.to_owned());
        let json = encode_header(&header).unwrap();
        let mut out = vec![0; encoded_len(json.len(), state.len(), true)];
        let range = write_prelude(&mut out, &json, state.len());
        out[range].copy_from_slice(state);
        seal(&mut out, Some(key));
        out
    }

    #[test]
    fn signed_sessions_open_with_their_key_only() {
        let key = SessionKey::new(b"0123456789abcdef").unwrap();
        let other = SessionKey::new(b"0123456789abcdeg").unwrap();
        let bytes = encode_signed(&header(), b"abcdeXY", &key);
        let opened = open_signed(&bytes, "t", &key, None).unwrap();
        assert!(opened.signed);
        assert_eq!(&bytes[opened.state_ranges[0].clone()], b"abcde");
        // Without a key it opens (for inspection) and says it is signed.
        assert!(open(&bytes, "t").unwrap().signed);
        let signature_error =
            |r: Result<OpenedSession>| matches!(r, Err(Error::SessionSignature { .. }));
        assert!(signature_error(open_signed(&bytes, "t", &other, None)));
        assert!(signature_error(open_signed(
            &encode(&header(), b"abcdeXY"),
            "t",
            &key,
            None
        )));
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            let err = open_signed(&flipped, "t", &key, None).unwrap_err();
            assert!(
                matches!(err, Error::SessionSignature { .. }),
                "bit {bit}: {err}"
            );
        }
        assert!(SessionKey::new(b"short").is_err());
    }

    #[test]
    fn state_sizes_must_add_up() {
        let mut h = header();
        h.sequences[1].state_bytes = 3;
        let bytes = encode(&h, b"abcdeXY");
        assert!(matches!(
            open(&bytes, "t"),
            Err(Error::SessionCorrupt { .. })
        ));
    }
}
