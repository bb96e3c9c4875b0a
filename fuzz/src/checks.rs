//! What every fuzz target asserts, shared by the fuzz crate (`fuzz/src/lib.rs`) and the corpus replay test
//! (`rust/core/tests/fuzz_corpus.rs`): both crate roots provide `session_format`, `llama_state`, `Error` and
//! `SessionKey`, so the very same checks run under the fuzzer and in `cargo test`.
//!
//! The readers must never panic; every refusal must be a session error (corrupt, version or signature, never
//! `Internal`); and whatever they accept must be what the format says. For the state checker that last part
//! is differential: [`decode_state`] is a second, naive reader of llama.cpp's state format, and a state is
//! accepted by `check_sequence_state` exactly when that reader finds one cell per recorded token at positions
//! `0..n` in order, each in the saved sequence alone, with this context's types and sizes.

use std::ops::Range;

use crate::llama_state::{
    self, Expected, LayerLayout, MemoryLayout, RecurrentLayout, RowLayout, StateLayout,
};
use crate::session_format::{self, ModelRecord, ParamsRecord, SequenceRecord, SessionHeader};
use crate::{Error, SessionKey};

/// The key the signed paths are fuzzed with (a fuzzer cannot forge a MAC, so the structure-aware target
/// signs its sessions with it to reach the parser behind the signature).
pub const KEY_SECRET: &[u8] = b"llama-sessions fuzzing key, not a secret";

/// The key derived from [`KEY_SECRET`].
pub fn key() -> SessionKey {
    SessionKey::new(KEY_SECRET).expect("the fuzzing secret is long enough")
}

/// Bytes of the MAC that ends a signed session.
fn mac_len() -> usize {
    session_format::encoded_len(0, 0, true) - session_format::encoded_len(0, 0, false)
}

// ---------------------------------------------------------------------------------------------------------
// Layouts
// ---------------------------------------------------------------------------------------------------------

/// SmolLM2-135M's layer as `Context::state_layout` reports it: 3 KV heads of 64 values, so rows of 192
/// values; f16 (type 1, 2 bytes) or q8_0 (type 8, 34-byte blocks of 32).
const fn smollm2_layer(q8: bool) -> LayerLayout {
    let (t, row, element) = if q8 { (8, 204, 34) } else { (1, 384, 2) };
    LayerLayout {
        k_type: t,
        k_row_bytes: row,
        v_type: t,
        v_row_bytes: row,
        v_element_bytes: element,
        v_width: 192,
    }
}

/// A layer of 4-byte rows, so that byte-level fuzzing builds complete states within a few hundred bytes.
const TINY_LAYER: LayerLayout = LayerLayout {
    k_type: 1,
    k_row_bytes: 4,
    v_type: 1,
    v_row_bytes: 4,
    v_element_bytes: 2,
    v_width: 2,
};

/// The layouts the state checker is fuzzed against. The first five are SmolLM2-135M's real ones in a
/// context of n_ctx 256 (f16 with V transposed or not, one or two sequences of 256 cells each; q8_0 with
/// flash attention and llama.cpp's rotation), which `fuzz_corpus.rs` compares with `Context::state_layout`;
/// the others are small, so that states fit in a fuzzer's input, with three streams, or the 12-byte cell
/// extension of M-RoPE models.
pub fn layouts() -> Vec<StateLayout> {
    // A context of n_ctx 256 holds 256 cells per sequence, whatever n_seq_max is.
    let smollm2 = |n_stream: u32, v_trans: bool, q8: bool| StateLayout {
        n_stream,
        cell_ext_bytes: 0,
        v_trans,
        n_rot_k: if q8 { 64 } else { 0 },
        n_rot_v: if q8 { 64 } else { 0 },
        layers: vec![smollm2_layer(q8); 30],
        max_cells: 256,
    };
    let tiny = |n_stream: u32, v_trans: bool, cell_ext_bytes: usize| StateLayout {
        n_stream,
        cell_ext_bytes,
        v_trans,
        n_rot_k: 0,
        n_rot_v: 0,
        layers: vec![TINY_LAYER; 2],
        max_cells: 16,
    };
    vec![
        smollm2(1, true, false),
        smollm2(1, false, false),
        smollm2(2, true, false),
        smollm2(2, false, false),
        smollm2(1, false, true),
        tiny(1, true, 0),
        tiny(1, false, 0),
        tiny(3, true, 0),
        tiny(2, false, 12),
    ]
}

// ---------------------------------------------------------------------------------------------------------
// A second reader of llama.cpp's state format (the oracle)
// ---------------------------------------------------------------------------------------------------------

/// One cell record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedCell {
    /// Its position.
    pub pos: i32,
    /// Its extension bytes (M-RoPE), verbatim.
    pub ext: Vec<u8>,
    /// Its sequence ids.
    pub seq_ids: Vec<i32>,
}

/// The V record header of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodedV {
    /// Not transposed: type and row bytes.
    Rows(i32, u64),
    /// Transposed: type, element bytes, width.
    Columns(i32, u32, u32),
}

/// The rows part of a stream that holds cells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedRows {
    /// The V transposition flag.
    pub v_trans: u32,
    /// The layer count as written.
    pub n_layer: u32,
    /// K and V rotations.
    pub n_rot: (u32, u32),
    /// Per layer: K type, K row bytes, and where its payload is.
    pub k: Vec<(i32, u64, Range<usize>)>,
    /// Per layer: the V header and where its payload is.
    pub v: Vec<(DecodedV, Range<usize>)>,
}

/// One KV stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedStream {
    /// The cell count as written (the cells follow only when it is not 0).
    pub cells: Vec<DecodedCell>,
    /// Present when the stream holds cells.
    pub rows: Option<DecodedRows>,
}

/// A per-sequence state, decoded without any expectation but the cell extension's size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedState {
    /// The io magic.
    pub magic: u32,
    /// The saved sequence id.
    pub saved_seq: i32,
    /// The streams.
    pub streams: Vec<DecodedStream>,
}

/// A cursor for the oracle: `None` when the bytes run out, sizes checked before anything is allocated.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Option<Range<usize>> {
        let end = self.at.checked_add(n)?;
        if end > self.bytes.len() {
            return None;
        }
        let range = self.at..end;
        self.at = end;
        Some(range)
    }
    fn left(&self) -> usize {
        self.bytes.len() - self.at
    }
    fn u32(&mut self) -> Option<u32> {
        let r = self.take(4)?;
        Some(u32::from_le_bytes(self.bytes[r].try_into().ok()?))
    }
    fn i32(&mut self) -> Option<i32> {
        self.u32().map(|v| v as i32)
    }
    fn u64(&mut self) -> Option<u64> {
        let r = self.take(8)?;
        Some(u64::from_le_bytes(self.bytes[r].try_into().ok()?))
    }
    fn payload(&mut self, cells: usize, row: u64) -> Option<Range<usize>> {
        let n = (cells as u64).checked_mul(row)?;
        self.take(usize::try_from(n).ok()?)
    }
}

fn decode_streams(
    c: &mut Cursor<'_>,
    n_stream: u32,
    cell_ext: usize,
) -> Option<Vec<DecodedStream>> {
    // Every stream takes at least its 4-byte count.
    if n_stream as usize > c.left() / 4 {
        return None;
    }
    let mut streams = Vec::with_capacity(n_stream as usize);
    for _ in 0..n_stream {
        let n_cells = c.u32()? as usize;
        // Every cell takes at least its position and its sequence-id count.
        if n_cells > c.left() / 8 {
            return None;
        }
        let mut cells = Vec::with_capacity(n_cells);
        for _ in 0..n_cells {
            let pos = c.i32()?;
            let n_seq = c.u32()? as usize;
            let ext = c.take(cell_ext)?;
            if n_seq > c.left() / 4 {
                return None;
            }
            let seq_ids = (0..n_seq).map(|_| c.i32()).collect::<Option<Vec<_>>>()?;
            cells.push(DecodedCell {
                pos,
                ext: c.bytes[ext].to_vec(),
                seq_ids,
            });
        }
        let rows = if n_cells == 0 {
            None
        } else {
            let v_trans = c.u32()?;
            let n_layer = c.u32()?;
            let n_rot = (c.u32()?, c.u32()?);
            // Every layer takes at least a 12-byte K header and a 12-byte V header.
            if n_layer as usize > c.left() / 24 {
                return None;
            }
            let mut k = Vec::new();
            for _ in 0..n_layer {
                let t = c.i32()?;
                let row = c.u64()?;
                let payload = c.payload(n_cells, row)?;
                k.push((t, row, payload));
            }
            let mut v = Vec::new();
            for _ in 0..n_layer {
                let t = c.i32()?;
                if v_trans != 0 {
                    let element = c.u32()?;
                    let width = c.u32()?;
                    let payload = c.payload(n_cells, u64::from(element) * u64::from(width))?;
                    v.push((DecodedV::Columns(t, element, width), payload));
                } else {
                    let row = c.u64()?;
                    let payload = c.payload(n_cells, row)?;
                    v.push((DecodedV::Rows(t, row), payload));
                }
            }
            Some(DecodedRows {
                v_trans,
                n_layer,
                n_rot,
                k,
                v,
            })
        };
        streams.push(DecodedStream { cells, rows });
    }
    Some(streams)
}

/// Decodes a per-sequence state completely (`None` if it is truncated or has bytes left over).
pub fn decode_state(state: &[u8], cell_ext: usize) -> Option<DecodedState> {
    let mut c = Cursor {
        bytes: state,
        at: 0,
    };
    let magic = c.u32()?;
    let saved_seq = c.i32()?;
    let n_stream = c.u32()?;
    let streams = decode_streams(&mut c, n_stream, cell_ext)?;
    (c.at == state.len()).then_some(DecodedState {
        magic,
        saved_seq,
        streams,
    })
}

/// Writes a decoded state back, with `counts` as the stream count and then each stream's cell count (which an
/// edit may have made disagree with the records); payloads are copied from `source` (the bytes it was decoded
/// from).
pub fn encode_state(state: &DecodedState, counts: &[u32], source: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let put = |out: &mut Vec<u8>, v: u32| out.extend_from_slice(&v.to_le_bytes());
    put(&mut out, state.magic);
    put(&mut out, state.saved_seq as u32);
    put(&mut out, counts.first().copied().unwrap_or(0));
    for (i, stream) in state.streams.iter().enumerate() {
        put(&mut out, counts.get(i + 1).copied().unwrap_or(0));
        for cell in &stream.cells {
            put(&mut out, cell.pos as u32);
            put(&mut out, cell.seq_ids.len() as u32);
            out.extend_from_slice(&cell.ext);
            for &id in &cell.seq_ids {
                put(&mut out, id as u32);
            }
        }
        if let Some(rows) = &stream.rows {
            put(&mut out, rows.v_trans);
            put(&mut out, rows.n_layer);
            put(&mut out, rows.n_rot.0);
            put(&mut out, rows.n_rot.1);
            for (t, row, payload) in &rows.k {
                put(&mut out, *t as u32);
                out.extend_from_slice(&row.to_le_bytes());
                out.extend_from_slice(&source[payload.clone()]);
            }
            for (header, payload) in &rows.v {
                match *header {
                    DecodedV::Rows(t, row) => {
                        put(&mut out, t as u32);
                        out.extend_from_slice(&row.to_le_bytes());
                    }
                    DecodedV::Columns(t, element, width) => {
                        put(&mut out, t as u32);
                        put(&mut out, element);
                        put(&mut out, width);
                    }
                }
                out.extend_from_slice(&source[payload.clone()]);
            }
        }
    }
    out
}

/// The counts `encode_state` writes for an unedited state: the stream count, then each stream's cells.
pub fn natural_counts(state: &DecodedState) -> Vec<u32> {
    std::iter::once(state.streams.len() as u32)
        .chain(state.streams.iter().map(|s| s.cells.len() as u32))
        .collect()
}

/// Whether the rows of a stream are exactly this layout's.
fn rows_match(rows: &DecodedRows, layout: &StateLayout) -> bool {
    rows.v_trans == u32::from(layout.v_trans)
        && rows.n_layer as usize == layout.layers.len()
        && rows.n_rot == (layout.n_rot_k, layout.n_rot_v)
        && rows.k.len() == layout.layers.len()
        && rows
            .k
            .iter()
            .zip(&layout.layers)
            .all(|((t, row, _), l)| (*t, *row) == (l.k_type, l.k_row_bytes))
        && rows.v.iter().zip(&layout.layers).all(|((header, _), l)| {
            *header
                == if layout.v_trans {
                    DecodedV::Columns(l.v_type, l.v_element_bytes, l.v_width)
                } else {
                    DecodedV::Rows(l.v_type, l.v_row_bytes)
                }
        })
}

/// Whether a stream holds exactly `n` cells at positions `0..n` in order, each in sequence `seq` alone, with
/// this layout's rows.
fn stream_holds(stream: &DecodedStream, layout: &StateLayout, seq: u32, n: usize) -> bool {
    stream.cells.len() == n
        && stream
            .cells
            .iter()
            .enumerate()
            .all(|(i, c)| i64::from(c.pos) == i as i64 && c.seq_ids == [seq as i32])
        && match &stream.rows {
            None => n == 0,
            Some(rows) => rows_match(rows, layout),
        }
}

/// The oracle's verdict on a per-sequence state: what `check_sequence_state` must say.
pub fn oracle_accepts_sequence(state: &[u8], layout: &StateLayout, expected: Expected) -> bool {
    let Some(decoded) = decode_state(state, layout.cell_ext_bytes) else {
        return false;
    };
    let home = if layout.n_stream > 1 {
        i64::from(expected.saved_seq)
    } else {
        0
    };
    decoded.magic == llama_state::IO_MAGIC
        && i64::from(decoded.saved_seq) == i64::from(expected.saved_seq)
        && decoded.streams.len() == layout.n_stream as usize
        && expected.token_count <= layout.max_cells
        && decoded.streams.iter().enumerate().all(|(s, stream)| {
            let n = if s as i64 == home {
                expected.token_count
            } else {
                0
            };
            stream_holds(stream, layout, expected.saved_seq, n)
        })
}

/// The oracle's verdict on a whole-context state (a llama.cpp session file's state): the cell count when
/// `check_whole_state` must accept it.
pub fn oracle_accepts_whole(
    state: &[u8],
    layout: &StateLayout,
    arch: &str,
    min_cells: usize,
) -> Option<usize> {
    let mut c = Cursor {
        bytes: state,
        at: 0,
    };
    let arch_len = c.u32()? as usize;
    let name = c.take(arch_len)?;
    if &state[name] != arch.as_bytes() {
        return None;
    }
    let n_stream = c.u32()?;
    if n_stream != 1 || layout.n_stream != 1 {
        return None;
    }
    let streams = decode_streams(&mut c, 1, layout.cell_ext_bytes)?;
    let n = streams[0].cells.len();
    (c.at == state.len()
        && (min_cells..=layout.max_cells).contains(&n)
        && stream_holds(&streams[0], layout, 0, n))
    .then_some(n)
}

// ---------------------------------------------------------------------------------------------------------
// A little input reader for the targets: fixed-width values, 0 once the input runs out
// ---------------------------------------------------------------------------------------------------------

/// Reads fuzzer-chosen values off the front of an input.
pub struct Input<'a> {
    bytes: &'a [u8],
}

impl<'a> Input<'a> {
    /// Reads from `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Input { bytes }
    }
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0; N];
        let n = N.min(self.bytes.len());
        out[..n].copy_from_slice(&self.bytes[..n]);
        self.bytes = &self.bytes[n..];
        out
    }
    /// One byte.
    pub fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    /// Whether anything is left.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }
}

/// A value near the interesting ones: small, the boundaries of the type, or the raw fuzzer value.
fn interesting_u32(input: &mut Input<'_>, near: u32) -> u32 {
    let raw = input.u32();
    match input.u8() % 8 {
        0 => near.wrapping_add(1),
        1 => near.wrapping_sub(1),
        2 => 0,
        3 => u32::MAX,
        4 => i32::MAX as u32,
        5 => 1 << 31,
        6 => raw % 300,
        _ => raw,
    }
}

fn interesting_u64(input: &mut Input<'_>, near: u64) -> u64 {
    let raw = input.u64();
    match input.u8() % 8 {
        0 => near.wrapping_add(1),
        1 => near.wrapping_sub(1),
        2 => 0,
        3 => u64::MAX,
        4 => u64::MAX / 2 + 1,
        5 => near.wrapping_mul(2),
        6 => raw % 100_000,
        _ => raw,
    }
}

// ---------------------------------------------------------------------------------------------------------
// Error classification
// ---------------------------------------------------------------------------------------------------------

/// The errors a session reader may return for bad bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// [`Error::SessionCorrupt`].
    Corrupt,
    /// [`Error::SessionVersion`].
    Version,
    /// [`Error::SessionSignature`].
    Signature,
}

/// The refusal an error is, panicking (a finding) on any other error.
fn refusal(err: &Error, call: &str) -> Refusal {
    match err {
        Error::SessionCorrupt { .. } => Refusal::Corrupt,
        Error::SessionVersion { .. } => Refusal::Version,
        Error::SessionSignature { .. } => Refusal::Signature,
        other => panic!("{call} returned an error that is not a session refusal: {other:?}"),
    }
}

/// `refusal`, requiring one of `allowed`.
fn expect_refusal(err: &Error, call: &str, allowed: &[Refusal]) {
    let r = refusal(err, call);
    assert!(
        allowed.contains(&r),
        "{call}: {r:?} is not one of {allowed:?}: {err}"
    );
}

/// What a target's input came to, for the corpus replay test to count (a corpus that no longer reaches the
/// accepting paths would replay without testing them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Outcome {
    /// What was checked: "session", "sequence state", "whole state", "structured session" or "memory
    /// state".
    pub what: &'static str,
    /// Whether the reader under test accepted it.
    pub accepted: bool,
}

// ---------------------------------------------------------------------------------------------------------
// Target (a): the envelope readers
// ---------------------------------------------------------------------------------------------------------

/// What a prelude says, read independently of the reader under test.
fn prelude_fields(bytes: &[u8]) -> Option<(u32, usize, u64)> {
    let version = u32::from_le_bytes(bytes.get(8..12)?.try_into().ok()?);
    let header_len = u32::from_le_bytes(bytes.get(12..16)?.try_into().ok()?) as usize;
    let state_len = u64::from_le_bytes(bytes.get(16..24)?.try_into().ok()?);
    Some((version, header_len, state_len))
}

/// What must hold of a session `open`, `open_with_checksum` or `open_signed` accepted.
fn check_opened(bytes: &[u8], opened: &session_format::OpenedSession) {
    use session_format::{CHECKSUM_LEN, FORMAT_VERSION, MAGIC, PRELUDE_LEN};
    assert!(bytes.starts_with(&MAGIC));
    let (version, header_len, state_len) = prelude_fields(bytes).expect("an accepted prelude");
    assert_eq!(
        xxhash_rust::xxh3::xxh3_64(&bytes[..24]).to_le_bytes(),
        bytes[24..32]
    );
    assert!((1..=FORMAT_VERSION).contains(&version));
    assert_eq!(opened.format_version, version);
    assert_eq!(opened.header_len, header_len);
    assert_eq!(opened.total_len, bytes.len());
    let mac = if opened.signed { mac_len() } else { 0 };
    assert_eq!(
        bytes.len() as u64,
        (PRELUDE_LEN + header_len + CHECKSUM_LEN + mac) as u64 + state_len
    );
    assert_eq!(opened.signed, opened.header.signature.is_some());
    let state_start = PRELUDE_LEN + header_len;
    let state_end = state_start + state_len as usize;
    assert_eq!(opened.state_ranges.len(), opened.header.sequences.len());
    let mut at = state_start;
    for (range, record) in opened.state_ranges.iter().zip(&opened.header.sequences) {
        assert_eq!(
            range.start, at,
            "state ranges are contiguous, in header order"
        );
        assert_eq!(range.len() as u64, record.state_bytes);
        at = range.end;
    }
    assert_eq!(at, state_end, "the state ranges cover the state exactly");
    assert_eq!(opened.state_len(), state_len as usize);
    let mut seqs: Vec<u32> = opened.header.sequences.iter().map(|s| s.seq).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(
        seqs.len(),
        opened.header.sequences.len(),
        "sequence ids are unique"
    );
    assert!(seqs.iter().all(|&s| s < opened.header.params.n_seq_max));
    // The header the listing path reads is the one a load verifies.
    let header = session_format::read_header(&bytes[..state_start], "t").expect("read_header");
    assert_eq!(header, opened.header);
    assert_eq!(
        session_format::header_end(&bytes[..PRELUDE_LEN], "t").expect("header_end"),
        state_start
    );
}

/// Runs every envelope reader on `bytes` (verbatim); accepted means `open` accepted them.
pub fn check_envelope_bytes(bytes: &[u8]) -> Outcome {
    use session_format::{CHECKSUM_LEN, PRELUDE_LEN};
    use Refusal::{Corrupt, Signature, Version};
    let opened = session_format::open(bytes, "t");
    match &opened {
        Ok(o) => check_opened(bytes, o),
        Err(e) => expect_refusal(e, "open", &[Corrupt, Version]),
    }
    // A checksum computed while reading is the one-shot checksum.
    if bytes.len() >= CHECKSUM_LEN + mac_len() {
        let unsigned_body = bytes.len() - CHECKSUM_LEN;
        let precomputed = session_format::Precomputed {
            unsigned_checksum: Some(xxhash_rust::xxh3::xxh3_128(&bytes[..unsigned_body])),
            signed_checksum: Some(xxhash_rust::xxh3::xxh3_128(
                &bytes[..unsigned_body - mac_len()],
            )),
        };
        let with = session_format::open_with_checksum(bytes, "t", precomputed);
        assert_eq!(
            with.as_ref().map_err(ToString::to_string),
            opened.as_ref().map_err(ToString::to_string)
        );
    }
    let key = key();
    match session_format::open_signed(bytes, "t", &key, None) {
        Ok(o) => {
            assert!(o.signed);
            assert_eq!(
                o.header.signature.as_deref(),
                Some("blake3-keyed-256"),
                "open_signed accepts its own scheme only"
            );
            let signed_end = bytes.len() - mac_len();
            assert_eq!(
                key.mac(&bytes[..signed_end]).as_bytes(),
                &bytes[signed_end..]
            );
            // The MAC covers the checksum, so open_signed does not check it; when it holds, both agree.
            if let Ok(plain) = &opened {
                assert_eq!(plain, &o);
            } else {
                let body = signed_end - CHECKSUM_LEN;
                assert_ne!(
                    xxhash_rust::xxh3::xxh3_128(&bytes[..body]).to_le_bytes(),
                    bytes[body..signed_end],
                    "open refused a signed session whose checksum holds and open_signed accepted"
                );
            }
        }
        Err(e) => expect_refusal(&e, "open_signed", &[Corrupt, Version, Signature]),
    }
    match session_format::read_header(bytes, "t") {
        Ok(header) => {
            if let Ok(o) = &opened {
                assert_eq!(o.header, header);
            }
        }
        Err(e) => {
            expect_refusal(&e, "read_header", &[Corrupt, Version]);
            assert!(opened.is_err(), "read_header refused what open accepted");
        }
    }
    match session_format::header_end(&bytes[..bytes.len().min(PRELUDE_LEN)], "t") {
        Ok(end) => assert_eq!(Some(end - PRELUDE_LEN), prelude_fields(bytes).map(|p| p.1)),
        Err(e) => expect_refusal(&e, "header_end", &[Corrupt, Version]),
    }
    match session_format::open_llama_cpp(bytes, "t") {
        Ok(h) => {
            assert!(bytes.starts_with(&session_format::LLAMA_CPP_MAGIC));
            assert_eq!(h.state_offset, 12 + 4 * h.tokens.len());
            assert!(h.state_offset <= bytes.len());
            for (i, t) in h.tokens.iter().enumerate() {
                assert_eq!(t.to_le_bytes(), bytes[12 + 4 * i..16 + 4 * i]);
            }
        }
        Err(e) => expect_refusal(&e, "open_llama_cpp", &[Corrupt, Version]),
    }
    assert_eq!(
        session_format::detect(bytes) == session_format::SessionKind::LlamaSessions,
        bytes.starts_with(&session_format::MAGIC)
    );
    Outcome {
        what: "session",
        accepted: opened.is_ok(),
    }
}

/// Target (a): the first byte chooses repairs that let random bytes past the integrity checks (the prelude
/// check, consistent lengths, the checksum, a MAC with the fuzzing key), so that the fuzzer reaches the
/// header parser and the range logic; the rest is the session. Every reader runs on the result.
pub fn check_envelope(data: &[u8]) -> Outcome {
    use session_format::{CHECKSUM_LEN, PRELUDE_LEN};
    let mut input = Input::new(data);
    let repairs = input.u8();
    let mut bytes = input.rest().to_vec();
    let sign = repairs & 8 != 0;
    let trailer = CHECKSUM_LEN + if sign { mac_len() } else { 0 };
    if repairs & 2 != 0 && bytes.len() >= PRELUDE_LEN + trailer {
        // Make the lengths agree with the bytes: keep the announced header length where it fits.
        let header_len = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
        let room = bytes.len() - PRELUDE_LEN - trailer;
        let header_len = header_len.min(room);
        bytes[12..16].copy_from_slice(&(header_len as u32).to_le_bytes());
        bytes[16..24].copy_from_slice(&((room - header_len) as u64).to_le_bytes());
    }
    if repairs & 1 != 0 && bytes.len() >= PRELUDE_LEN {
        let check = xxhash_rust::xxh3::xxh3_64(&bytes[..24]);
        bytes[24..32].copy_from_slice(&check.to_le_bytes());
    }
    if repairs & 4 != 0 && bytes.len() >= trailer {
        let body = bytes.len() - trailer;
        let checksum = xxhash_rust::xxh3::xxh3_128(&bytes[..body]);
        bytes[body..body + CHECKSUM_LEN].copy_from_slice(&checksum.to_le_bytes());
    }
    if sign && bytes.len() >= mac_len() {
        let signed_end = bytes.len() - mac_len();
        let mac = key().mac(&bytes[..signed_end]);
        bytes[signed_end..].copy_from_slice(mac.as_bytes());
    }
    check_envelope_bytes(&bytes)
}

// ---------------------------------------------------------------------------------------------------------
// Target (b): the state checker
// ---------------------------------------------------------------------------------------------------------

/// Checks one per-sequence state against the oracle; true when accepted.
pub fn check_sequence_state_against_oracle(
    state: &[u8],
    layout: &StateLayout,
    expected: Expected,
) -> bool {
    let verdict = llama_state::check_sequence_state(state, layout, expected);
    let oracle = oracle_accepts_sequence(state, layout, expected);
    assert_eq!(
        verdict.is_ok(),
        oracle,
        "check_sequence_state said {verdict:?}, the oracle says accepted={oracle} ({expected:?})"
    );
    if let Err(reason) = &verdict {
        assert!(!reason.is_empty());
    }
    verdict.is_ok()
}

/// Target (b): the first bytes choose a layout and what the header records (a saved sequence id and a token
/// count, or for the whole-state checker an architecture and the tokens the file lists); the rest is the
/// state.
pub fn check_state(data: &[u8]) -> Outcome {
    let mut input = Input::new(data);
    let layouts = layouts();
    let choice = input.u8();
    let layout = &layouts[usize::from(choice % 16) % layouts.len()];
    if choice >= 128 {
        let min_cells = usize::from(input.u8() % 20);
        let arch = if input.u8().is_multiple_of(2) {
            "llama"
        } else {
            ""
        };
        let state = input.rest();
        let verdict = llama_state::check_whole_state(state, layout, arch, min_cells);
        let oracle = oracle_accepts_whole(state, layout, arch, min_cells);
        assert_eq!(
            verdict.as_ref().ok(),
            oracle.as_ref(),
            "check_whole_state said {verdict:?}, the oracle says {oracle:?}"
        );
        Outcome {
            what: "whole state",
            accepted: verdict.is_ok(),
        }
    } else {
        let saved_seq = u32::from(input.u8() % 4);
        let token_count = usize::from(input.u8() % 24);
        let expected = Expected {
            saved_seq,
            token_count,
        };
        Outcome {
            what: "sequence state",
            accepted: check_sequence_state_against_oracle(input.rest(), layout, expected),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Target (c): structure-aware: valid sessions, edited inside, checksum recomputed
// ---------------------------------------------------------------------------------------------------------

/// A session header of the shape `Context::snapshot` writes.
pub fn header_for(layout: &StateLayout, sequences: Vec<SequenceRecord>) -> SessionHeader {
    SessionHeader {
        library_version: "0.1.0".into(),
        llama_cpp_build: session_format::LLAMA_CPP_BUILD.into(),
        created_at: "2026-11-22T00:00:00Z".into(),
        model: ModelRecord {
            fingerprint: "blake3:00".into(),
            name: Some("SmolLM2-135M-Instruct".into()),
            architecture: "llama".into(),
            file_name: None,
        },
        params: ParamsRecord {
            n_ctx: (layout.max_cells * layout.n_stream as usize) as u32,
            n_batch: 64,
            type_k: "f16".into(),
            type_v: "f16".into(),
            flash_attn: !layout.v_trans,
            n_seq_max: layout.n_stream,
        },
        memory: None,
        sequences,
        metadata: serde_json::Map::new(),
        signature: None,
        chunks: None,
    }
}

/// Frames `states` under `header` (whose `state_bytes` are left as they are), sealed with the checksum and,
/// with a key, the MAC.
pub fn seal_session(
    header: &SessionHeader,
    states: &[Vec<u8>],
    key: Option<&SessionKey>,
) -> Vec<u8> {
    let mut header = header.clone();
    if key.is_some() {
        header.signature = Some("blake3-keyed-256".into());
    }
    let json = session_format::encode_header(&header).expect("a small header");
    let state_len = states.iter().map(Vec::len).sum();
    let mut out = vec![0; session_format::encoded_len(json.len(), state_len, key.is_some())];
    let range = session_format::write_prelude(&mut out, &json, state_len);
    let mut at = range.start;
    for state in states {
        out[at..at + state.len()].copy_from_slice(state);
        at += state.len();
    }
    session_format::seal(&mut out, key);
    out
}

/// One sequence of the structured case, decoded so that its records can be edited.
struct EditableState {
    /// The bytes the payload ranges point into.
    source: Vec<u8>,
    decoded: DecodedState,
    /// The stream count and cell counts as written, once an edit chose them (until then they follow the
    /// cells).
    counts: Option<Vec<u32>>,
    /// Bytes that replace the encoding (after a bit flip that left no decodable structure).
    raw: Option<Vec<u8>>,
    /// Bytes cut from the end of the encoding, then bytes appended.
    truncate: usize,
    append: Vec<u8>,
    /// The `state_bytes` the header records, once an edit chose it (until then it follows the encoding).
    state_bytes: Option<u64>,
}

impl EditableState {
    fn cells(&mut self) -> Option<&mut Vec<DecodedCell>> {
        self.decoded
            .streams
            .iter_mut()
            .map(|s| &mut s.cells)
            .find(|c| !c.is_empty())
    }
    /// The rows of the first stream with cells, when they have at least one layer.
    fn rows(&mut self) -> Option<&mut DecodedRows> {
        self.decoded
            .streams
            .iter_mut()
            .find_map(|s| s.rows.as_mut())
            .filter(|r| !r.k.is_empty() && !r.v.is_empty())
    }
    fn encode(&self) -> Vec<u8> {
        let mut out = match &self.raw {
            Some(raw) => raw.clone(),
            None => {
                let natural = natural_counts(&self.decoded);
                encode_state(
                    &self.decoded,
                    self.counts.as_ref().unwrap_or(&natural),
                    &self.source,
                )
            }
        };
        out.truncate(out.len().saturating_sub(self.truncate));
        out.extend_from_slice(&self.append);
        out
    }
}

/// Applies one fuzzer-chosen edit to the inner records of a session.
fn apply_edit(
    input: &mut Input<'_>,
    header: &mut SessionHeader,
    states: &mut [EditableState],
    cell_ext: usize,
) {
    let kind = input.u8();
    let index = usize::from(input.u8()) % states.len().min(header.sequences.len());
    let record = &mut header.sequences[index];
    let state = &mut states[index];
    match kind % 24 {
        // The stream count and the cell counts, as written.
        0 => {
            let counts = state
                .counts
                .get_or_insert_with(|| natural_counts(&state.decoded));
            let slot = usize::from(input.u8()) % counts.len();
            counts[slot] = interesting_u32(input, counts[slot]);
        }
        // A cell's position, sequence-id count, sequence id; a cell removed, duplicated or swapped.
        1 => {
            let which = usize::from(input.u16());
            if let Some(cells) = state.cells() {
                let n = cells.len();
                let cell = &mut cells[which % n];
                cell.pos = interesting_u32(input, cell.pos as u32) as i32;
            }
        }
        2 => {
            let which = usize::from(input.u16());
            let extra = input.u32() as i32;
            if let Some(cells) = state.cells() {
                let n = cells.len();
                let cell = &mut cells[which % n];
                if input.u8().is_multiple_of(2) {
                    cell.seq_ids.push(extra);
                } else {
                    cell.seq_ids.pop();
                }
            }
        }
        3 => {
            let which = usize::from(input.u16());
            if let Some(cells) = state.cells() {
                let n = cells.len();
                let cell = &mut cells[which % n];
                if let Some(id) = cell.seq_ids.first_mut() {
                    *id = interesting_u32(input, *id as u32) as i32;
                }
            }
        }
        4 => {
            let which = usize::from(input.u16());
            let duplicate = input.u8() % 3;
            if let Some(cells) = state.cells() {
                let i = which % cells.len();
                match duplicate {
                    0 => {
                        cells.remove(i);
                    }
                    1 => {
                        let cell = cells[i].clone();
                        cells.insert(i, cell);
                    }
                    _ => {
                        let j = (i + 1) % cells.len();
                        cells.swap(i, j);
                    }
                }
            }
        }
        5 => {
            let which = usize::from(input.u16());
            let byte = input.u8();
            if let Some(cells) = state.cells() {
                let n = cells.len();
                let cell = &mut cells[which % n];
                if cell.ext.is_empty() {
                    cell.ext.push(byte);
                } else {
                    cell.ext.pop();
                }
            }
        }
        // The saved sequence id and the magic.
        6 => {
            state.decoded.saved_seq = interesting_u32(input, state.decoded.saved_seq as u32) as i32
        }
        7 => state.decoded.magic = interesting_u32(input, state.decoded.magic),
        // The rows' V transposition, layer count, rotations, types and sizes.
        8 => {
            let v = input.u8() % 3;
            if let Some(rows) = state.rows() {
                rows.v_trans = u32::from(v);
            }
        }
        9 => {
            let near = state.rows().map(|r| r.n_layer);
            let value = interesting_u32(input, near.unwrap_or(0));
            if let Some(rows) = state.rows() {
                rows.n_layer = value;
            }
        }
        10 => {
            let k = interesting_u32(input, 0);
            let v = input.u8();
            if let Some(rows) = state.rows() {
                if v.is_multiple_of(2) {
                    rows.n_rot.0 = k;
                } else {
                    rows.n_rot.1 = k;
                }
            }
        }
        11 => {
            let layer = usize::from(input.u8());
            let t = interesting_u32(input, 1) as i32;
            if let Some(rows) = state.rows() {
                let n = rows.k.len();
                rows.k[layer % n].0 = t;
            }
        }
        12 => {
            let layer = usize::from(input.u8());
            let raw = input.u64();
            let which = input.u8();
            if let Some(rows) = state.rows() {
                let n = rows.k.len();
                let slot = &mut rows.k[layer % n].1;
                *slot = match which % 4 {
                    0 => slot.wrapping_add(1),
                    1 => u64::MAX,
                    2 => raw,
                    _ => slot.wrapping_sub(1),
                };
            }
        }
        13 => {
            let layer = usize::from(input.u8());
            let t = interesting_u32(input, 1) as i32;
            let size = interesting_u64(input, 384);
            let width = input.u32();
            let which = input.u8();
            if let Some(rows) = state.rows() {
                let n = rows.v.len();
                let header = &mut rows.v[layer % n].0;
                *header = match (*header, which % 4) {
                    (DecodedV::Rows(_, row), 0) => DecodedV::Rows(t, row),
                    (DecodedV::Rows(t0, _), 1) => DecodedV::Rows(t0, size),
                    (DecodedV::Rows(t0, row), _) => DecodedV::Columns(t0, row as u32, width),
                    (DecodedV::Columns(_, e, w), 0) => DecodedV::Columns(t, e, w),
                    (DecodedV::Columns(t0, _, w), 1) => DecodedV::Columns(t0, size as u32, w),
                    (DecodedV::Columns(t0, e, _), 2) => DecodedV::Columns(t0, e, width),
                    (DecodedV::Columns(t0, e, w), _) => {
                        DecodedV::Rows(t0, u64::from(e) * u64::from(w))
                    }
                };
            }
        }
        14 => {
            // A layer record removed or repeated, the payload sizes following.
            let layer = usize::from(input.u8());
            let remove = input.u8().is_multiple_of(2);
            if let Some(rows) = state.rows() {
                let n = rows.k.len();
                let (k, v) = (rows.k[layer % n].clone(), rows.v[layer % n].clone());
                if remove {
                    rows.k.remove(layer % n);
                    rows.v.remove(layer % n);
                } else {
                    rows.k.push(k);
                    rows.v.push(v);
                }
                rows.n_layer = rows.k.len() as u32;
            }
        }
        // Bytes cut from the end, or appended.
        15 => state.truncate = usize::from(input.u16() % 2048),
        16 => state.append = input.u32().to_le_bytes()[..usize::from(input.u8() % 5)].to_vec(),
        // The header: token ids, the token list's length, state_bytes, sequence ids, n_seq_max.
        17 => {
            let which = usize::from(input.u16());
            let value = interesting_u32(input, 0) as i32;
            if !record.tokens.is_empty() {
                let n = record.tokens.len();
                record.tokens[which % n] = value;
            }
        }
        18 => {
            if input.u8().is_multiple_of(2) {
                record.tokens.pop();
            } else {
                record.tokens.push(input.u32() as i32);
            }
        }
        19 => state.state_bytes = Some(interesting_u64(input, record.state_bytes)),
        20 => record.seq = interesting_u32(input, record.seq),
        21 => header.params.n_seq_max = interesting_u32(input, header.params.n_seq_max),
        22 => {
            // A sequence listed twice.
            let copy = header.sequences[index].clone();
            header.sequences.push(copy);
        }
        // Any byte of the state, flipped; the result is decoded again when it still decodes.
        _ => {
            let at = input.u32();
            let bit = input.u8() % 8;
            let mut bytes = state.encode();
            if !bytes.is_empty() {
                let n = bytes.len();
                bytes[at as usize % n] ^= 1 << bit;
                state.truncate = 0;
                state.append.clear();
                match decode_state(&bytes, cell_ext) {
                    Some(decoded) => {
                        state.counts = None;
                        state.raw = None;
                        state.decoded = decoded;
                        state.source = bytes;
                    }
                    None => state.raw = Some(bytes),
                }
            }
        }
    }
}

/// Target (c): builds a valid session of one or more sequences (header through serde, states through
/// `llama_state::synthesize`), applies fuzzer-chosen edits to the inner records, recomputes the checksum
/// (and with the fuzzing key the MAC) so that the envelope stays valid, then opens it and checks every
/// sequence's state as a restore does.
pub fn check_structured(data: &[u8]) -> Outcome {
    let mut input = Input::new(data);
    let layouts = layouts();
    let layout = &layouts[usize::from(input.u8()) % layouts.len()];
    let signed = input.u8().is_multiple_of(4);
    let n_sequences = 1 + usize::from(input.u8()) % layout.n_stream.min(3) as usize;
    // Small states for SmolLM2's layouts (each cell is 30 layers of 2 x 384 bytes), more for the small ones.
    let max_tokens = if layout.layers.len() > 4 {
        6
    } else {
        layout.max_cells + 1
    };
    let mut records = Vec::new();
    let mut states = Vec::new();
    for i in 0..n_sequences {
        let seq = if layout.n_stream > 1 {
            (i as u32 + u32::from(input.u8())) % layout.n_stream
        } else {
            0
        };
        if records.iter().any(|r: &SequenceRecord| r.seq == seq) {
            continue;
        }
        let n_tokens = usize::from(input.u8()) % max_tokens;
        let n_tokens = n_tokens.min(layout.max_cells);
        let fill = input.u8();
        let source = llama_state::synthesize(layout, seq, n_tokens, fill);
        let decoded = decode_state(&source, layout.cell_ext_bytes).expect("synthesize decodes");
        let counts = natural_counts(&decoded);
        assert_eq!(
            encode_state(&decoded, &counts, &source),
            source,
            "the oracle round-trips"
        );
        assert!(
            llama_state::check_sequence_state(
                &source,
                layout,
                Expected {
                    saved_seq: seq,
                    token_count: n_tokens
                }
            )
            .is_ok(),
            "synthesize builds a state the checker accepts"
        );
        records.push(SequenceRecord {
            seq,
            tokens: (0..n_tokens).map(|t| (t as i32 * 7919) % 49152).collect(),
            state_bytes: source.len() as u64,
        });
        states.push(EditableState {
            source,
            decoded,
            counts: None,
            raw: None,
            truncate: 0,
            append: Vec::new(),
            state_bytes: None,
        });
    }
    let mut header = header_for(layout, records);
    let n_edits = input.u8() % 8;
    for _ in 0..n_edits {
        if input.is_empty() {
            break;
        }
        apply_edit(&mut input, &mut header, &mut states, layout.cell_ext_bytes);
    }
    let encoded: Vec<Vec<u8>> = states.iter().map(EditableState::encode).collect();
    for ((record, state), bytes) in header.sequences.iter_mut().zip(&states).zip(&encoded) {
        record.state_bytes = state.state_bytes.unwrap_or(bytes.len() as u64);
    }
    let key = key();
    let bytes = seal_session(&header, &encoded, signed.then_some(&key));
    check_envelope_bytes(&bytes);
    let refused = Outcome {
        what: "structured session",
        accepted: false,
    };
    let opened = if signed {
        session_format::open_signed(&bytes, "t", &key, None)
    } else {
        session_format::open(&bytes, "t")
    };
    let opened = match opened {
        Ok(opened) => opened,
        Err(e) => {
            expect_refusal(&e, "open", &[Refusal::Corrupt]);
            return refused;
        }
    };
    // What a restore checks next: each sequence's state against the context's layout.
    let mut all_accepted = true;
    for (record, range) in opened.header.sequences.iter().zip(&opened.state_ranges) {
        let expected = Expected {
            saved_seq: record.seq,
            token_count: record.tokens.len(),
        };
        all_accepted &=
            check_sequence_state_against_oracle(&bytes[range.clone()], layout, expected);
    }
    Outcome {
        what: "structured session",
        accepted: all_accepted,
    }
}

// ---------------------------------------------------------------------------------------------------------
// Target (d): the memory states of sliding-window, hybrid and recurrent models
// ---------------------------------------------------------------------------------------------------------

/// The tiny test models' layer (rust/core/tests/common/arch_models.rs): 2 heads of 32, f16, V transposed.
const TINY_MODEL_LAYER: LayerLayout = LayerLayout {
    k_type: 1,
    k_row_bytes: 128,
    v_type: 1,
    v_row_bytes: 0,
    v_element_bytes: 2,
    v_width: 64,
};

fn tiny_model_kv(n_stream: u32) -> StateLayout {
    StateLayout {
        n_stream,
        cell_ext_bytes: 0,
        v_trans: true,
        n_rot_k: 0,
        n_rot_v: 0,
        layers: vec![TINY_MODEL_LAYER],
        max_cells: 256,
    }
}

fn rows(sizes: &[u64]) -> Vec<RowLayout> {
    sizes
        .iter()
        .map(|&row_bytes| RowLayout { ty: 0, row_bytes })
        .collect()
}

/// tiny-lfm2's recurrent section: one short-convolution layer of (3 - 1) x 64 f32 (its S row is empty).
fn tiny_lfm2_recurrent() -> RecurrentLayout {
    RecurrentLayout {
        n_layer: 2,
        r: rows(&[512]),
        s: rows(&[0]),
    }
}

/// The memory layouts `check_memory_state` is fuzzed against, by name. The first five are the tiny test
/// models' real ones in a context of n_ctx 256 per sequence, f16, one or two sequences (`fuzz_corpus.rs`
/// compares them with `Context::memory_layout`): tiny-gemma3 (window 16), tiny-lfm2, tiny-mamba2; then
/// tiny-lfm2's partial state (a checkpoint: the recurrent section alone); then small ones whose states fit
/// in a few hundred bytes, so that byte-level mutations build whole states.
pub fn memory_layouts() -> Vec<(&'static str, MemoryLayout)> {
    let small_kv = |n_stream: u32, v_trans: bool| StateLayout {
        n_stream,
        cell_ext_bytes: 0,
        v_trans,
        n_rot_k: 0,
        n_rot_v: 0,
        layers: vec![TINY_LAYER],
        max_cells: 64,
    };
    let small_recurrent = RecurrentLayout {
        n_layer: 3,
        r: rows(&[4, 8]),
        s: rows(&[12, 0]),
    };
    vec![
        (
            "tiny-gemma3",
            MemoryLayout::SlidingWindow {
                base: tiny_model_kv(1),
                swa: tiny_model_kv(1),
                n_swa: 16,
            },
        ),
        (
            "tiny-gemma3 2 sequences",
            MemoryLayout::SlidingWindow {
                base: tiny_model_kv(2),
                swa: tiny_model_kv(2),
                n_swa: 16,
            },
        ),
        (
            "tiny-lfm2",
            MemoryLayout::Hybrid {
                attention: tiny_model_kv(1),
                recurrent: tiny_lfm2_recurrent(),
            },
        ),
        (
            "tiny-lfm2 2 sequences",
            MemoryLayout::Hybrid {
                attention: tiny_model_kv(2),
                recurrent: tiny_lfm2_recurrent(),
            },
        ),
        (
            "tiny-mamba2",
            MemoryLayout::Recurrent(RecurrentLayout {
                n_layer: 2,
                r: rows(&[1920, 1920]),
                s: rows(&[8192, 8192]),
            }),
        ),
        (
            "tiny-lfm2 checkpoint",
            MemoryLayout::Recurrent(tiny_lfm2_recurrent()),
        ),
        (
            "small window",
            MemoryLayout::SlidingWindow {
                base: small_kv(1, true),
                swa: small_kv(1, false),
                n_swa: 3,
            },
        ),
        (
            "small window 2 sequences",
            MemoryLayout::SlidingWindow {
                base: small_kv(2, false),
                swa: small_kv(2, true),
                n_swa: 2,
            },
        ),
        (
            "small hybrid",
            MemoryLayout::Hybrid {
                attention: small_kv(1, true),
                recurrent: small_recurrent.clone(),
            },
        ),
        ("small recurrent", MemoryLayout::Recurrent(small_recurrent)),
    ]
}

/// Streams of the layout's KV sections (none for recurrent memory).
fn kv_streams(layout: &MemoryLayout) -> Option<u32> {
    match layout {
        MemoryLayout::Attention(kv)
        | MemoryLayout::SlidingWindow { base: kv, .. }
        | MemoryLayout::Hybrid { attention: kv, .. } => Some(kv.n_stream),
        MemoryLayout::Recurrent(_) => None,
    }
}

/// The second reader for memory states: the structure of a valid state (counts, positions, sequence ids,
/// types, row sizes, the order of the sections) is fixed by the layout, the saved sequence and the token
/// count; only the rows' payload is free. So a state is valid exactly when it has the length of the one
/// `synthesize_memory` writes and equals it on every byte that is not payload (the bytes where the states
/// synthesized with payload 0x00 and 0xff differ).
pub fn oracle_accepts_memory(state: &[u8], layout: &MemoryLayout, expected: Expected) -> bool {
    let max_cells = match layout {
        MemoryLayout::Attention(kv)
        | MemoryLayout::SlidingWindow { base: kv, .. }
        | MemoryLayout::Hybrid { attention: kv, .. } => kv.max_cells,
        MemoryLayout::Recurrent(_) => usize::MAX,
    };
    if expected.token_count > max_cells {
        return false;
    }
    let zeros = llama_state::synthesize_memory(layout, expected.saved_seq, expected.token_count, 0);
    let ones =
        llama_state::synthesize_memory(layout, expected.saved_seq, expected.token_count, 0xff);
    state.len() == zeros.len()
        && state
            .iter()
            .zip(zeros.iter().zip(&ones))
            .all(|(&byte, (&zero, &one))| zero != one || byte == zero)
}

/// The input of target (d) for `state`: the layout's index, the saved sequence, the token count.
pub fn memory_input(layout_index: usize, saved_seq: u32, token_count: u8, state: &[u8]) -> Vec<u8> {
    let mut input = vec![layout_index as u8, saved_seq as u8, token_count];
    input.extend_from_slice(state);
    input
}

/// Target (d): the first bytes choose a memory layout, the saved sequence (a stream of the layout's KV
/// caches) and the token count; the rest is the state. `check_memory_state` must never panic, refuse with a
/// reason, and accept exactly what [`oracle_accepts_memory`] accepts.
pub fn check_memory(data: &[u8]) -> Outcome {
    let mut input = Input::new(data);
    let layouts = memory_layouts();
    let (_, layout) = &layouts[usize::from(input.u8()) % layouts.len()];
    let seq_byte = u32::from(input.u8());
    let saved_seq = kv_streams(layout).map_or(seq_byte % 4, |n| seq_byte % n);
    let token_count = usize::from(input.u8());
    let expected = Expected {
        saved_seq,
        token_count,
    };
    let state = input.rest();
    let verdict = llama_state::check_memory_state(state, layout, expected);
    let oracle = oracle_accepts_memory(state, layout, expected);
    assert_eq!(
        verdict.is_ok(),
        oracle,
        "check_memory_state said {verdict:?}, the oracle says accepted={oracle} ({} {expected:?})",
        layout.kind()
    );
    if let Err(reason) = &verdict {
        assert!(!reason.is_empty());
    }
    Outcome {
        what: "memory state",
        accepted: verdict.is_ok(),
    }
}
