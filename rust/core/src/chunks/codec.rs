//! A chunk's bytes: the cell records and KV rows of `C` consecutive cells of one sequence, sliced out of
//! llama.cpp's per-sequence state, and the reverse, chunks `0..k` assembled into the state llama.cpp writes
//! for those `k·C` cells. Pure: no llama.cpp, no I/O.
//!
//! ```text
//! "LSKVCHK1"   u32 format version (1)   32-byte key   u32 first position   u32 cells   u64 payload bytes
//! payload:  per cell: i32 position, u32 1, [cell extension], i32 0   (sequence id normalized to 0)
//!           per layer: cells x K row bytes
//!           per layer: cells x V row bytes, or (V transposed) per V row of the layer: cells x element bytes
//! 32-byte BLAKE3 of everything before
//! ```
//!
//! Parsing is bounded: the payload length the header announces must equal the one the layout gives for the
//! announced cells (computed with checked arithmetic) and the buffer's length, before anything is read or
//! allocated; the checksum, the key, the position and every cell record are then checked.

use crate::llama_state::{check_sequence_state, Expected, StateLayout, IO_MAGIC};

use super::key::ChunkKey;

/// The first bytes of every chunk.
pub const CHUNK_MAGIC: [u8; 8] = *b"LSKVCHK1";
/// The chunk format's version.
pub const CHUNK_VERSION: u32 = 1;
/// Bytes before the payload: magic, version, key, first position, cells, payload length.
pub const CHUNK_HEADER_LEN: usize = 8 + 4 + 32 + 4 + 4 + 8;
/// Bytes of the trailing checksum.
pub const CHUNK_CHECKSUM_LEN: usize = 32;

/// BLAKE3 of a chunk's bytes before its checksum: on every core for a chunk of megabytes (a 256-token
/// chunk of a small model is several), which BLAKE3's tree mode hashes to the same digest.
fn checksum_of(bytes: &[u8]) -> blake3::Hash {
    const PARALLEL_FROM: usize = 1 << 20;
    if bytes.len() < PARALLEL_FROM {
        return blake3::hash(bytes);
    }
    let mut hasher = blake3::Hasher::new();
    hasher.update_rayon(bytes);
    hasher.finalize()
}

/// Bytes of one cell record in a state of `layout`: position, sequence-id count, extension, one id.
fn record_len(layout: &StateLayout) -> usize {
    12 + layout.cell_ext_bytes
}

/// Bytes of one cell's V data in one layer (a row, or its column of the transposed V).
fn v_cell_bytes(layout: &StateLayout, layer: usize) -> u64 {
    let l = &layout.layers[layer];
    if layout.v_trans {
        u64::from(l.v_element_bytes) * u64::from(l.v_width)
    } else {
        l.v_row_bytes
    }
}

/// The payload bytes of `cells` cells for `layout`, or None if that cannot be addressed.
pub fn payload_len(layout: &StateLayout, cells: usize) -> Option<usize> {
    let mut per_cell = record_len(layout) as u64;
    for (il, l) in layout.layers.iter().enumerate() {
        per_cell = per_cell
            .checked_add(l.k_row_bytes)?
            .checked_add(v_cell_bytes(layout, il))?;
    }
    usize::try_from(per_cell.checked_mul(cells as u64)?).ok()
}

/// The length of a sound chunk of `cells` cells for `layout` (header, payload, checksum), or None if that
/// cannot be addressed: how much a reader reads at most.
pub fn chunk_len(layout: &StateLayout, cells: usize) -> Option<usize> {
    payload_len(layout, cells)?.checked_add(CHUNK_HEADER_LEN + CHUNK_CHECKSUM_LEN)
}

/// Where the sections of a checked per-sequence state of `n` cells start: the cell records, then per layer
/// the first byte of its K rows and of its V data.
struct Sections {
    records: usize,
    k: Vec<usize>,
    v: Vec<usize>,
}

fn sections(layout: &StateLayout, home_stream: usize, n: usize) -> Sections {
    let records = 12 + 4 * home_stream + 4;
    let mut at = records + n * record_len(layout) + 16;
    let mut k = Vec::with_capacity(layout.layers.len());
    for l in &layout.layers {
        at += 4 + 8;
        k.push(at);
        at += n * l.k_row_bytes as usize;
    }
    let mut v = Vec::with_capacity(layout.layers.len());
    for il in 0..layout.layers.len() {
        // i32 type, then a u64 row size, or (transposed) a u32 element size and a u32 width.
        at += 12;
        v.push(at);
        at += n * v_cell_bytes(layout, il) as usize;
    }
    Sections { records, k, v }
}

fn home_stream(layout: &StateLayout, seq: u32) -> usize {
    if layout.n_stream > 1 {
        seq as usize
    } else {
        0
    }
}

/// Slices chunk `index` (cells `index·C..(index+1)·C`, C = `chunk_tokens`) out of `state`, llama.cpp's state
/// of sequence `saved_seq` holding `token_count` tokens, and encodes it under `key`. The state is checked
/// against `layout` first.
pub fn encode_chunk(
    state: &[u8],
    layout: &StateLayout,
    saved_seq: u32,
    token_count: usize,
    chunk_tokens: usize,
    index: usize,
    key: &ChunkKey,
) -> Result<Vec<u8>, String> {
    encode_cells(
        state,
        layout,
        saved_seq,
        token_count,
        index * chunk_tokens,
        chunk_tokens,
        key,
    )
}

/// Slices cells `first..first + cells` (at least one) out of `state`, llama.cpp's state of sequence
/// `saved_seq` holding `token_count` tokens, and encodes them under `key`: a full chunk, or the partial tail
/// a session manifest carries. The state is checked against `layout` first.
pub fn encode_cells(
    state: &[u8],
    layout: &StateLayout,
    saved_seq: u32,
    token_count: usize,
    first: usize,
    cells: usize,
    key: &ChunkKey,
) -> Result<Vec<u8>, String> {
    check_sequence_state(
        state,
        layout,
        Expected {
            saved_seq,
            token_count,
        },
    )?;
    if cells == 0 || first + cells > token_count {
        return Err(format!(
            "cells {first}..{} are not within the {token_count} tokens held",
            first + cells
        ));
    }
    let n = token_count;
    let c = cells;
    let s = sections(layout, home_stream(layout, saved_seq), n);
    let payload = payload_len(layout, c).ok_or("the chunk's size cannot be addressed")?;
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + payload + CHUNK_CHECKSUM_LEN);
    out.extend_from_slice(&CHUNK_MAGIC);
    out.extend_from_slice(&CHUNK_VERSION.to_le_bytes());
    out.extend_from_slice(&key.0);
    out.extend_from_slice(&(first as u32).to_le_bytes());
    out.extend_from_slice(&(c as u32).to_le_bytes());
    out.extend_from_slice(&(payload as u64).to_le_bytes());
    let rec = record_len(layout);
    for i in first..first + c {
        let at = s.records + i * rec;
        out.extend_from_slice(&state[at..at + rec - 4]);
        out.extend_from_slice(&0i32.to_le_bytes());
    }
    for (il, l) in layout.layers.iter().enumerate() {
        let row = l.k_row_bytes as usize;
        let at = s.k[il] + first * row;
        out.extend_from_slice(&state[at..at + c * row]);
    }
    for (il, l) in layout.layers.iter().enumerate() {
        if layout.v_trans {
            let elem = l.v_element_bytes as usize;
            for j in 0..l.v_width as usize {
                let at = s.v[il] + (j * n + first) * elem;
                out.extend_from_slice(&state[at..at + c * elem]);
            }
        } else {
            let row = l.v_row_bytes as usize;
            let at = s.v[il] + first * row;
            out.extend_from_slice(&state[at..at + c * row]);
        }
    }
    debug_assert_eq!(out.len(), CHUNK_HEADER_LEN + payload);
    let checksum = checksum_of(&out);
    out.extend_from_slice(checksum.as_bytes());
    Ok(out)
}

/// The BLAKE3 hash of a chunk's bytes that its last 32 bytes record: what a session manifest names a
/// chunk's exact contents by (the key names only its tokens). None if `bytes` is too short to be a chunk.
pub fn chunk_digest(bytes: &[u8]) -> Option<[u8; 32]> {
    if bytes.len() < CHUNK_HEADER_LEN + CHUNK_CHECKSUM_LEN {
        return None;
    }
    bytes[bytes.len() - CHUNK_CHECKSUM_LEN..].try_into().ok()
}

/// A chunk that passed [`parse_chunk`]: its payload, checked against the layout.
#[derive(Debug, Clone, Copy)]
pub struct ChunkView<'a> {
    cells: usize,
    payload: &'a [u8],
}

/// Checks that `bytes` is the chunk `key` of cells `first..first + cells` for `layout`: magic, version, key,
/// position, lengths (before anything else is read), checksum, and every cell record. The error says what
/// was expected and what was found.
pub fn parse_chunk<'a>(
    bytes: &'a [u8],
    key: &ChunkKey,
    first: usize,
    cells: usize,
    layout: &StateLayout,
) -> Result<ChunkView<'a>, String> {
    if bytes.len() < CHUNK_HEADER_LEN + CHUNK_CHECKSUM_LEN {
        return Err(format!(
            "the chunk is {} bytes, shorter than a header and a checksum ({})",
            bytes.len(),
            CHUNK_HEADER_LEN + CHUNK_CHECKSUM_LEN
        ));
    }
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    if bytes[..8] != CHUNK_MAGIC {
        return Err("the chunk does not start with the chunk magic".to_owned());
    }
    let version = u32_at(8);
    if version != CHUNK_VERSION {
        return Err(format!(
            "the chunk's format version is {version}, this build reads {CHUNK_VERSION}"
        ));
    }
    if bytes[12..44] != key.0 {
        return Err("the chunk records another key than the one it was stored under".to_owned());
    }
    let found_first = u32_at(44) as usize;
    let found_cells = u32_at(48) as usize;
    if (found_first, found_cells) != (first, cells) {
        return Err(format!(
            "the chunk holds cells {found_first}..{}, expected {first}..{}",
            found_first + found_cells,
            first + cells
        ));
    }
    let announced = u64::from_le_bytes(bytes[52..60].try_into().expect("8 bytes"));
    let want = payload_len(layout, cells).ok_or("the chunk's size cannot be addressed")?;
    if announced != want as u64 {
        return Err(format!(
            "the chunk announces {announced} payload bytes, this context's layout needs {want}"
        ));
    }
    let total = CHUNK_HEADER_LEN + want + CHUNK_CHECKSUM_LEN;
    if bytes.len() != total {
        return Err(format!(
            "the chunk is {} bytes, expected {total}",
            bytes.len()
        ));
    }
    let body = &bytes[..CHUNK_HEADER_LEN + want];
    if checksum_of(body).as_bytes()[..] != bytes[CHUNK_HEADER_LEN + want..] {
        return Err("the chunk's checksum does not match its bytes".to_owned());
    }
    let payload = &bytes[CHUNK_HEADER_LEN..CHUNK_HEADER_LEN + want];
    let rec = record_len(layout);
    for i in 0..cells {
        let r = &payload[i * rec..(i + 1) * rec];
        let pos = i32::from_le_bytes(r[0..4].try_into().expect("4 bytes"));
        let n_seq = u32::from_le_bytes(r[4..8].try_into().expect("4 bytes"));
        let id = i32::from_le_bytes(r[rec - 4..].try_into().expect("4 bytes"));
        if i64::from(pos) != (first + i) as i64 || n_seq != 1 || id != 0 {
            return Err(format!(
                "cell {i} of the chunk is at position {pos} in {n_seq} sequences (id {id}), expected \
                 position {} in sequence 0 alone",
                first + i
            ));
        }
    }
    Ok(ChunkView { cells, payload })
}

/// The checks of [`parse_chunk`] that need no layout: magic, version, the key it records, the length its
/// header announces, the checksum. What `gc` runs over a store's files.
pub fn check_integrity(bytes: &[u8], key: &ChunkKey) -> Result<(), String> {
    if bytes.len() < CHUNK_HEADER_LEN + CHUNK_CHECKSUM_LEN || bytes[..8] != CHUNK_MAGIC {
        return Err("not a chunk: too short or no chunk magic".to_owned());
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != CHUNK_VERSION || bytes[12..44] != key.0 {
        return Err("another format version or another key".to_owned());
    }
    let announced = u64::from_le_bytes(bytes[52..60].try_into().expect("8 bytes"));
    let total = announced.checked_add((CHUNK_HEADER_LEN + CHUNK_CHECKSUM_LEN) as u64);
    if total != Some(bytes.len() as u64) {
        return Err(format!(
            "the chunk announces {announced} payload bytes and is {} bytes long",
            bytes.len()
        ));
    }
    let body = bytes.len() - CHUNK_CHECKSUM_LEN;
    if checksum_of(&bytes[..body]).as_bytes()[..] != bytes[body..] {
        return Err("the chunk's checksum does not match its bytes".to_owned());
    }
    Ok(())
}

/// Where an assembled state goes: a growing `Vec`, or ([`SliceSink`]) memory of exactly its length.
pub trait StateSink {
    /// Appends `bytes`.
    fn put(&mut self, bytes: &[u8]);
}

impl StateSink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// Fills a buffer of exactly [`assembled_len`] bytes, front to back.
pub struct SliceSink<'a> {
    buffer: &'a mut [u8],
    at: usize,
}

impl<'a> SliceSink<'a> {
    /// Writes into `buffer` from its start.
    pub fn new(buffer: &'a mut [u8]) -> SliceSink<'a> {
        SliceSink { buffer, at: 0 }
    }

    /// Bytes written so far.
    pub fn written(&self) -> usize {
        self.at
    }
}

impl StateSink for SliceSink<'_> {
    fn put(&mut self, bytes: &[u8]) {
        self.buffer[self.at..self.at + bytes.len()].copy_from_slice(bytes);
        self.at += bytes.len();
    }
}

/// The length of the state [`assemble`] writes for `chunks` and `layout`.
pub fn assembled_len(chunks: &[ChunkView<'_>], layout: &StateLayout) -> usize {
    let n: usize = chunks.iter().map(|c| c.cells).sum();
    let streams = 12 + 4 * layout.n_stream as usize;
    if n == 0 {
        return streams;
    }
    streams + payload_len(layout, n).unwrap_or(0) + 16 + 24 * layout.layers.len()
}

/// The state llama.cpp writes for sequence `seq` of a context of `layout` holding the cells of `chunks`
/// (parsed for consecutive positions from 0, so their cells are too) and nothing else.
pub fn assemble(chunks: &[ChunkView<'_>], layout: &StateLayout, seq: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(assembled_len(chunks, layout));
    assemble_into(chunks, layout, seq, &mut out);
    out
}

/// [`assemble`] into `out`.
pub fn assemble_into(
    chunks: &[ChunkView<'_>],
    layout: &StateLayout,
    seq: u32,
    out: &mut dyn StateSink,
) {
    let n: usize = chunks.iter().map(|c| c.cells).sum();
    let home = home_stream(layout, seq);
    let rec = record_len(layout);
    let push32 = |out: &mut dyn StateSink, v: u32| out.put(&v.to_le_bytes());
    push32(out, IO_MAGIC);
    push32(out, seq);
    push32(out, layout.n_stream);
    for stream in 0..layout.n_stream as usize {
        if stream != home || n == 0 {
            push32(out, 0);
            continue;
        }
        push32(out, n as u32);
        for chunk in chunks {
            for i in 0..chunk.cells {
                let r = &chunk.payload[i * rec..(i + 1) * rec];
                out.put(&r[..rec - 4]);
                out.put(&seq.to_le_bytes());
            }
        }
        push32(out, u32::from(layout.v_trans));
        push32(out, layout.layers.len() as u32);
        push32(out, layout.n_rot_k);
        push32(out, layout.n_rot_v);
        // Within a chunk's payload: records, then each layer's K rows, then each layer's V data.
        let k_start = |chunk: &ChunkView<'_>, layer: usize| -> usize {
            chunk.cells * rec
                + layout.layers[..layer]
                    .iter()
                    .map(|l| chunk.cells * l.k_row_bytes as usize)
                    .sum::<usize>()
        };
        let v_start = |chunk: &ChunkView<'_>, layer: usize| -> usize {
            k_start(chunk, layout.layers.len())
                + (0..layer)
                    .map(|il| chunk.cells * v_cell_bytes(layout, il) as usize)
                    .sum::<usize>()
        };
        for (il, l) in layout.layers.iter().enumerate() {
            out.put(&l.k_type.to_le_bytes());
            out.put(&l.k_row_bytes.to_le_bytes());
            for chunk in chunks {
                let at = k_start(chunk, il);
                out.put(&chunk.payload[at..at + chunk.cells * l.k_row_bytes as usize]);
            }
        }
        for (il, l) in layout.layers.iter().enumerate() {
            out.put(&l.v_type.to_le_bytes());
            if layout.v_trans {
                push32(out, l.v_element_bytes);
                push32(out, l.v_width);
                let elem = l.v_element_bytes as usize;
                for j in 0..l.v_width as usize {
                    for chunk in chunks {
                        let at = v_start(chunk, il) + j * chunk.cells * elem;
                        out.put(&chunk.payload[at..at + chunk.cells * elem]);
                    }
                }
            } else {
                out.put(&l.v_row_bytes.to_le_bytes());
                for chunk in chunks {
                    let at = v_start(chunk, il);
                    out.put(&chunk.payload[at..at + chunk.cells * l.v_row_bytes as usize]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llama_state::{synthesize, LayerLayout};

    fn layout(v_trans: bool, n_stream: u32, cell_ext_bytes: usize) -> StateLayout {
        let layer = LayerLayout {
            k_type: 1,
            k_row_bytes: 6,
            v_type: 1,
            v_row_bytes: 8,
            v_element_bytes: 2,
            v_width: 4,
        };
        StateLayout {
            n_stream,
            cell_ext_bytes,
            v_trans,
            n_rot_k: 0,
            n_rot_v: 0,
            layers: vec![layer; 3],
            max_cells: 64,
        }
    }

    /// A synthesized state whose row bytes all differ (so a slice from the wrong place shows), with cell
    /// extensions that differ too.
    fn distinct_state(l: &StateLayout, seq: u32, n: usize) -> Vec<u8> {
        let mut s = synthesize(l, seq, n, 0);
        let sec = sections(l, home_stream(l, seq), n);
        let mut counter = 0u8;
        let mut vary = |s: &mut Vec<u8>, from: usize, len: usize| {
            for b in &mut s[from..from + len] {
                *b = counter;
                counter = counter.wrapping_add(37);
            }
        };
        for i in 0..n {
            vary(
                &mut s,
                sec.records + i * record_len(l) + 8,
                l.cell_ext_bytes,
            );
        }
        for (il, layer) in l.layers.iter().enumerate() {
            vary(&mut s, sec.k[il], n * layer.k_row_bytes as usize);
            vary(&mut s, sec.v[il], n * v_cell_bytes(l, il) as usize);
        }
        s
    }

    fn key(i: u8) -> ChunkKey {
        ChunkKey([i; 32])
    }

    #[test]
    fn chunks_assemble_into_the_state_of_their_cells_for_every_shape() {
        for v_trans in [false, true] {
            for n_stream in [1, 3] {
                for ext in [0, 12] {
                    let l = layout(v_trans, n_stream, ext);
                    let seq = n_stream - 1;
                    let (c, n) = (4, 14);
                    let full = distinct_state(&l, seq, n);
                    let encoded: Vec<Vec<u8>> = (0..n / c)
                        .map(|i| encode_chunk(&full, &l, seq, n, c, i, &key(i as u8)).unwrap())
                        .collect();
                    for k in 0..=n / c {
                        let views: Vec<ChunkView<'_>> = (0..k)
                            .map(|i| parse_chunk(&encoded[i], &key(i as u8), i * c, c, &l).unwrap())
                            .collect();
                        // Into another sequence too: the chunk carries no sequence id.
                        for target in [seq, 0] {
                            let want = truncated(&full, &l, seq, n, k * c, target);
                            assert_eq!(
                                assemble(&views, &l, target),
                                want,
                                "{v_trans} {n_stream} {ext} {k}"
                            );
                            // Into memory of the announced length: the same bytes, filling it exactly.
                            let mut exact = vec![0xAA; assembled_len(&views, &l)];
                            let mut sink = SliceSink::new(&mut exact);
                            assemble_into(&views, &l, target, &mut sink);
                            assert_eq!(sink.written(), want.len());
                            assert_eq!(exact, want);
                        }
                    }
                }
            }
        }
    }

    /// The state of the first `keep` cells of `full` (a state of `n` cells of `seq`) for sequence `target`,
    /// built by hand from the layout.
    fn truncated(
        full: &[u8],
        l: &StateLayout,
        seq: u32,
        n: usize,
        keep: usize,
        target: u32,
    ) -> Vec<u8> {
        let mut want = synthesize(l, target, keep, 0);
        if keep == 0 {
            return want;
        }
        let src = sections(l, home_stream(l, seq), n);
        let dst = sections(l, home_stream(l, target), keep);
        let (rec, ext) = (record_len(l), l.cell_ext_bytes);
        for i in 0..keep {
            let (d, s) = (dst.records + i * rec + 8, src.records + i * rec + 8);
            want[d..d + ext].copy_from_slice(&full[s..s + ext]);
        }
        for (il, layer) in l.layers.iter().enumerate() {
            let row = layer.k_row_bytes as usize;
            want[dst.k[il]..dst.k[il] + keep * row]
                .copy_from_slice(&full[src.k[il]..src.k[il] + keep * row]);
            if l.v_trans {
                let e = layer.v_element_bytes as usize;
                for j in 0..layer.v_width as usize {
                    let d = dst.v[il] + j * keep * e;
                    let s = src.v[il] + j * n * e;
                    want[d..d + keep * e].copy_from_slice(&full[s..s + keep * e]);
                }
            } else {
                let row = layer.v_row_bytes as usize;
                want[dst.v[il]..dst.v[il] + keep * row]
                    .copy_from_slice(&full[src.v[il]..src.v[il] + keep * row]);
            }
        }
        want
    }

    #[test]
    fn every_truncation_and_every_flipped_byte_of_a_chunk_is_refused() {
        let l = layout(true, 1, 0);
        let full = distinct_state(&l, 0, 8);
        let chunk = encode_chunk(&full, &l, 0, 8, 4, 1, &key(1)).unwrap();
        parse_chunk(&chunk, &key(1), 4, 4, &l).unwrap();
        for len in 0..chunk.len() {
            assert!(parse_chunk(&chunk[..len], &key(1), 4, 4, &l).is_err());
        }
        for at in 0..chunk.len() {
            let mut bad = chunk.clone();
            bad[at] ^= 0x40;
            assert!(parse_chunk(&bad, &key(1), 4, 4, &l).is_err(), "byte {at}");
        }
        let mut longer = chunk.clone();
        longer.push(0);
        assert!(parse_chunk(&longer, &key(1), 4, 4, &l).is_err());
    }

    #[test]
    fn a_chunk_for_another_key_position_or_layout_is_refused() {
        let l = layout(false, 1, 0);
        let full = distinct_state(&l, 0, 8);
        let chunk = encode_chunk(&full, &l, 0, 8, 4, 0, &key(0)).unwrap();
        let err = parse_chunk(&chunk, &key(9), 0, 4, &l).unwrap_err();
        assert_eq!(
            err,
            "the chunk records another key than the one it was stored under"
        );
        let err = parse_chunk(&chunk, &key(0), 4, 4, &l).unwrap_err();
        assert_eq!(err, "the chunk holds cells 0..4, expected 4..8");
        let mut wider = l.clone();
        wider.layers[2].k_row_bytes = 12;
        let err = parse_chunk(&chunk, &key(0), 0, 4, &wider).unwrap_err();
        assert!(err.starts_with("the chunk announces"), "{err}");
        // A huge announced cell count against an absurd layout: refused by arithmetic, nothing allocated.
        let mut huge = l.clone();
        huge.layers[0].k_row_bytes = u64::MAX / 2;
        assert!(parse_chunk(&chunk, &key(0), 0, 4, &huge).is_err());
    }

    #[test]
    fn encoding_refuses_a_state_that_does_not_check() {
        let l = layout(false, 1, 0);
        let full = distinct_state(&l, 0, 8);
        assert!(encode_chunk(&full[..full.len() - 1], &l, 0, 8, 4, 0, &key(0)).is_err());
        assert!(encode_chunk(&full, &l, 0, 8, 4, 2, &key(0)).is_err());
        assert!(encode_chunk(&full, &l, 0, 8, 0, 0, &key(0)).is_err());
    }
}
