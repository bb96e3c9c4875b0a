//! llama.cpp's per-sequence state, parsed and checked in Rust before llama.cpp sees a byte of it.
//!
//! llama.cpp's reader checks the layer count, the K/V types and row sizes, but not the cell records: a cell at
//! a negative position loads and is never removed again (`seq_rm` clamps its start to 0), cells out of order
//! or with several sequence ids trip assertions. A checksum only proves that nobody changed the bytes by
//! accident, so every state is parsed here against the [`StateLayout`] of the context it is meant for, and
//! must describe exactly the recorded tokens: one cell per token, at positions `0..n` in order, each in the
//! saved sequence alone, with every size that of this context and no byte left over.
//!
//! The layout, as written by `llama_state_seq_get_data_ext` (vendored llama.cpp of [`crate::session_format::
//! LLAMA_CPP_BUILD`]), all little-endian:
//!
//! ```text
//! u32 io magic (0xaf143cd8)   i32 saved sequence id   u32 stream count
//! per stream: u32 cell count; when > 0:
//!     per cell: i32 position, u32 sequence-id count, [cell extension], that many i32 sequence ids
//!     u32 v_trans, u32 layer count, u32 K rotation, u32 V rotation
//!     per layer: i32 K type, u64 K row bytes, cells x row bytes
//!     V, per layer, either  i32 type, u64 row bytes, cells x row bytes               (not transposed)
//!                    or     i32 type, u32 element bytes, u32 width, width x cells x element bytes
//! ```
//!
//! Pure: no llama.cpp, no I/O, so the fuzzer runs it directly.

/// The first field of a per-sequence state.
pub const IO_MAGIC: u32 = 0xaf14_3cd8;

/// Everything a context's per-sequence state must have besides its cells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateLayout {
    /// KV streams: `n_seq_max` (one per sequence) unless the cache is unified.
    pub n_stream: u32,
    /// Bytes of llama.cpp's per-cell extension (M-RoPE positions and token): 0 for most models.
    pub cell_ext_bytes: usize,
    /// V stored transposed (no flash attention).
    pub v_trans: bool,
    /// K rotation (llama.cpp rotates quantized K caches).
    pub n_rot_k: u32,
    /// V rotation.
    pub n_rot_v: u32,
    /// Per layer, in order.
    pub layers: Vec<LayerLayout>,
    /// Most cells one sequence can hold.
    pub max_cells: usize,
}

/// The K and V record shapes of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerLayout {
    /// ggml type id of K.
    pub k_type: i32,
    /// Bytes of one K row (one cell).
    pub k_row_bytes: u64,
    /// ggml type id of V.
    pub v_type: i32,
    /// Bytes of one V row (one cell), when V is not transposed.
    pub v_row_bytes: u64,
    /// Bytes of one V element (the ggml type size), when V is transposed.
    pub v_element_bytes: u32,
    /// V values per cell (`n_embd_v_gqa`), when V is transposed.
    pub v_width: u32,
}

/// The state of one sequence, as the caller expects it to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    /// The sequence id the state was saved from (recorded in the session's header).
    pub saved_seq: u32,
    /// Tokens the header records for it: the state must hold exactly that many cells.
    pub token_count: usize,
}

/// Checks that `state` is a well-formed state of exactly `expected.token_count` tokens of sequence
/// `expected.saved_seq` for a context of `layout`. The error says what was expected and what was found.
pub fn check_sequence_state(
    state: &[u8],
    layout: &StateLayout,
    expected: Expected,
) -> Result<(), String> {
    let mut r = Reader {
        bytes: state,
        at: 0,
    };
    let magic = r.u32("the state's magic")?;
    if magic != IO_MAGIC {
        return Err(format!(
            "the state's magic is {magic:#010x}, expected {IO_MAGIC:#010x}"
        ));
    }
    let saved_seq = r.i32("the saved sequence id")?;
    if i64::from(saved_seq) != i64::from(expected.saved_seq) {
        return Err(format!(
            "the state belongs to sequence {saved_seq}, the header records sequence {}",
            expected.saved_seq
        ));
    }
    let n_stream = r.u32("the stream count")?;
    if n_stream != layout.n_stream {
        return Err(format!(
            "the state has {n_stream} KV streams, this context has {}",
            layout.n_stream
        ));
    }
    if expected.token_count > layout.max_cells {
        return Err(format!(
            "the header records {} tokens, a sequence of this context holds at most {}",
            expected.token_count, layout.max_cells
        ));
    }
    // llama.cpp keeps sequence s in stream s when streams are per sequence.
    let home_stream = if layout.n_stream > 1 {
        expected.saved_seq
    } else {
        0
    };
    for stream in 0..n_stream {
        let cells = r.u32("a stream's cell count")? as usize;
        let wanted = if stream == home_stream {
            expected.token_count
        } else {
            0
        };
        if cells != wanted {
            return Err(format!(
                "stream {stream} holds {cells} cells, expected {wanted} (one per recorded token)"
            ));
        }
        if cells > 0 {
            check_cells(&mut r, layout, expected.saved_seq, cells)?;
            check_rows(&mut r, layout, cells)?;
        }
    }
    if r.at != state.len() {
        return Err(format!(
            "{} bytes follow the end of the state",
            state.len() - r.at
        ));
    }
    Ok(())
}

/// Checks the state part of llama.cpp's own session file ("ggsn", whole-context state of a context with one
/// sequence): the architecture name, then the memory of sequence 0 with at least `min_cells` cells (the tokens
/// the file lists; llama.cpp's writer may keep more cells than it lists tokens) at positions `0..n` in order.
/// Returns the number of cells.
pub fn check_whole_state(
    state: &[u8],
    layout: &StateLayout,
    arch: &str,
    min_cells: usize,
) -> Result<usize, String> {
    let mut r = Reader {
        bytes: state,
        at: 0,
    };
    let arch_len = r.u32("the architecture name's length")? as usize;
    let found = r.take(arch_len, "the architecture name")?;
    if found != arch.as_bytes() {
        return Err(format!(
            "it was written for architecture {:?}, this model is {arch:?}",
            String::from_utf8_lossy(&found[..found.len().min(64)])
        ));
    }
    let n_stream = r.u32("the stream count")?;
    if n_stream != 1 || layout.n_stream != 1 {
        return Err(format!(
            "the state has {n_stream} KV streams; a llama.cpp session file is for a context with one sequence"
        ));
    }
    let cells = r.u32("the cell count")? as usize;
    if cells < min_cells || cells > layout.max_cells {
        return Err(format!(
            "the state holds {cells} cells, expected between {min_cells} (the tokens it lists) and {} (this \
             context's size)",
            layout.max_cells
        ));
    }
    if cells > 0 {
        check_cells(&mut r, layout, 0, cells)?;
        check_rows(&mut r, layout, cells)?;
    }
    if r.at != state.len() {
        return Err(format!(
            "{} bytes follow the end of the state",
            state.len() - r.at
        ));
    }
    Ok(cells)
}

fn check_cells(
    r: &mut Reader<'_>,
    layout: &StateLayout,
    seq: u32,
    cells: usize,
) -> Result<(), String> {
    for i in 0..cells {
        let pos = r.i32("a cell's position")?;
        if i64::from(pos) != i as i64 {
            return Err(format!(
                "cell {i} is at position {pos}, expected {i} (cells must hold positions 0..{cells} in order)"
            ));
        }
        let n_seq = r.u32("a cell's sequence-id count")?;
        if n_seq != 1 {
            return Err(format!(
                "cell {i} belongs to {n_seq} sequences, expected exactly 1"
            ));
        }
        r.skip(layout.cell_ext_bytes, "a cell's extension")?;
        let id = r.i32("a cell's sequence id")?;
        if i64::from(id) != i64::from(seq) {
            return Err(format!(
                "cell {i} belongs to sequence {id}, expected sequence {seq}"
            ));
        }
    }
    Ok(())
}

fn check_rows(r: &mut Reader<'_>, layout: &StateLayout, cells: usize) -> Result<(), String> {
    let v_trans = r.u32("the V transposition flag")?;
    if v_trans != u32::from(layout.v_trans) {
        return Err(format!(
            "V transposition {v_trans}, this context's is {} (flash attention decides it)",
            u32::from(layout.v_trans)
        ));
    }
    let n_layer = r.u32("the layer count")?;
    if n_layer as usize != layout.layers.len() {
        return Err(format!(
            "the state has {n_layer} layers, this model has {}",
            layout.layers.len()
        ));
    }
    let n_rot_k = r.u32("the K rotation")?;
    let n_rot_v = r.u32("the V rotation")?;
    if (n_rot_k, n_rot_v) != (layout.n_rot_k, layout.n_rot_v) {
        return Err(format!(
            "K/V rotation {n_rot_k}/{n_rot_v}, this context's is {}/{}",
            layout.n_rot_k, layout.n_rot_v
        ));
    }
    for (il, layer) in layout.layers.iter().enumerate() {
        expect_i32(r, layer.k_type, &format!("the K type of layer {il}"))?;
        expect_u64(
            r,
            layer.k_row_bytes,
            &format!("the K row size of layer {il}"),
        )?;
        r.skip_rows(cells, layer.k_row_bytes, "K rows")?;
    }
    for (il, layer) in layout.layers.iter().enumerate() {
        expect_i32(r, layer.v_type, &format!("the V type of layer {il}"))?;
        if layout.v_trans {
            expect_u32(
                r,
                layer.v_element_bytes,
                &format!("the V element size of layer {il}"),
            )?;
            expect_u32(r, layer.v_width, &format!("the V width of layer {il}"))?;
            let column = u64::from(layer.v_element_bytes) * u64::from(layer.v_width);
            r.skip_rows(cells, column, "V columns")?;
        } else {
            expect_u64(
                r,
                layer.v_row_bytes,
                &format!("the V row size of layer {il}"),
            )?;
            r.skip_rows(cells, layer.v_row_bytes, "V rows")?;
        }
    }
    Ok(())
}

fn expect_i32(r: &mut Reader<'_>, want: i32, what: &str) -> Result<(), String> {
    let found = r.i32(what)?;
    if found != want {
        return Err(format!("{what} is {found}, this context's is {want}"));
    }
    Ok(())
}

fn expect_u32(r: &mut Reader<'_>, want: u32, what: &str) -> Result<(), String> {
    let found = r.u32(what)?;
    if found != want {
        return Err(format!("{what} is {found}, this context's is {want}"));
    }
    Ok(())
}

fn expect_u64(r: &mut Reader<'_>, want: u64, what: &str) -> Result<(), String> {
    let found = r.u64(what)?;
    if found != want {
        return Err(format!("{what} is {found}, this context's is {want}"));
    }
    Ok(())
}

/// A cursor that never reads past the end: every read names what it was reading when the bytes ran out.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize, what: &str) -> Result<&[u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| {
                format!(
                    "the state ends at byte {} inside {what} ({n} bytes needed at byte {})",
                    self.bytes.len(),
                    self.at
                )
            })?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn skip(&mut self, n: usize, what: &str) -> Result<(), String> {
        self.take(n, what).map(|_| ())
    }

    fn skip_rows(&mut self, cells: usize, row_bytes: u64, what: &str) -> Result<(), String> {
        let n = u64::try_from(cells)
            .ok()
            .and_then(|c| c.checked_mul(row_bytes))
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| {
                format!("{cells} cells of {row_bytes}-byte {what} cannot be addressed")
            })?;
        self.skip(n, what)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    fn i32(&mut self, what: &str) -> Result<i32, String> {
        let b = self.take(4, what)?;
        Ok(i32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        let b = self.take(8, what)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
}

/// Builds a well-formed state for `layout` (payload bytes all `fill`): what the tests and the fuzzer's
/// structure-aware mutator start from.
pub fn synthesize(layout: &StateLayout, seq: u32, token_count: usize, fill: u8) -> Vec<u8> {
    let mut out = Vec::new();
    let push32 = |out: &mut Vec<u8>, v: u32| out.extend_from_slice(&v.to_le_bytes());
    push32(&mut out, IO_MAGIC);
    push32(&mut out, seq);
    push32(&mut out, layout.n_stream);
    let home = if layout.n_stream > 1 { seq } else { 0 };
    for stream in 0..layout.n_stream {
        let cells = if stream == home { token_count } else { 0 };
        push32(&mut out, cells as u32);
        if cells == 0 {
            continue;
        }
        for i in 0..cells {
            push32(&mut out, i as u32);
            push32(&mut out, 1);
            out.extend(std::iter::repeat_n(0u8, layout.cell_ext_bytes));
            push32(&mut out, seq);
        }
        push32(&mut out, u32::from(layout.v_trans));
        push32(&mut out, layout.layers.len() as u32);
        push32(&mut out, layout.n_rot_k);
        push32(&mut out, layout.n_rot_v);
        for l in &layout.layers {
            out.extend_from_slice(&l.k_type.to_le_bytes());
            out.extend_from_slice(&l.k_row_bytes.to_le_bytes());
            out.extend(std::iter::repeat_n(fill, cells * l.k_row_bytes as usize));
        }
        for l in &layout.layers {
            out.extend_from_slice(&l.v_type.to_le_bytes());
            if layout.v_trans {
                push32(&mut out, l.v_element_bytes);
                push32(&mut out, l.v_width);
                let n = cells * l.v_element_bytes as usize * l.v_width as usize;
                out.extend(std::iter::repeat_n(fill, n));
            } else {
                out.extend_from_slice(&l.v_row_bytes.to_le_bytes());
                out.extend(std::iter::repeat_n(fill, cells * l.v_row_bytes as usize));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(v_trans: bool, n_stream: u32) -> StateLayout {
        let layer = LayerLayout {
            k_type: 1,
            k_row_bytes: 8,
            v_type: 1,
            v_row_bytes: 8,
            v_element_bytes: 2,
            v_width: 4,
        };
        StateLayout {
            n_stream,
            cell_ext_bytes: 0,
            v_trans,
            n_rot_k: 0,
            n_rot_v: 0,
            layers: vec![layer; 2],
            max_cells: 16,
        }
    }

    fn expected(saved_seq: u32, token_count: usize) -> Expected {
        Expected {
            saved_seq,
            token_count,
        }
    }

    #[test]
    fn synthesized_states_pass_for_every_shape() {
        for v_trans in [false, true] {
            for n_stream in [1, 3] {
                let l = layout(v_trans, n_stream);
                for seq in 0..n_stream {
                    for n in [0, 1, 5, 16] {
                        let s = synthesize(&l, seq, n, 7);
                        check_sequence_state(&s, &l, expected(seq, n)).unwrap();
                    }
                }
            }
        }
    }

    #[test]
    fn every_truncation_and_every_extension_is_refused() {
        let l = layout(true, 2);
        let s = synthesize(&l, 1, 3, 0);
        for len in 0..s.len() {
            assert!(check_sequence_state(&s[..len], &l, expected(1, 3)).is_err());
        }
        let mut longer = s.clone();
        longer.push(0);
        let err = check_sequence_state(&longer, &l, expected(1, 3)).unwrap_err();
        assert_eq!(err, "1 bytes follow the end of the state");
    }

    /// Offsets of the cell records of a one-stream state: 12 bytes of magic, seq and stream count, 4 of
    /// cell count, then 12 per cell.
    fn cell_offset(i: usize) -> usize {
        16 + 12 * i
    }

    fn put_i32(s: &mut [u8], at: usize, v: i32) {
        s[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    #[test]
    fn bad_cells_are_refused_with_what_was_found() {
        let l = layout(false, 1);
        let good = synthesize(&l, 0, 4, 0);
        type Edit = Box<dyn Fn(&mut Vec<u8>)>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|s| put_i32(s, cell_offset(0), -5)),
                "cell 0 is at position -5, expected 0",
            ),
            (
                Box::new(|s| {
                    put_i32(s, cell_offset(1), 2);
                    put_i32(s, cell_offset(2), 1);
                }),
                "cell 1 is at position 2, expected 1",
            ),
            (
                Box::new(|s| put_i32(s, cell_offset(3), 9)),
                "cell 3 is at position 9, expected 3",
            ),
            (
                Box::new(|s| put_i32(s, cell_offset(2) + 4, 2)),
                "cell 2 belongs to 2 sequences, expected exactly 1",
            ),
            (
                Box::new(|s| put_i32(s, cell_offset(2) + 8, 1)),
                "cell 2 belongs to sequence 1, expected sequence 0",
            ),
            (
                Box::new(|s| put_i32(s, 12, 3)),
                "stream 0 holds 3 cells, expected 4",
            ),
            (
                Box::new(|s| put_i32(s, 4, 1)),
                "the state belongs to sequence 1",
            ),
            (
                Box::new(|s| put_i32(s, 0, 0)),
                "the state's magic is 0x00000000",
            ),
        ];
        for (edit, message) in cases {
            let mut s = good.clone();
            edit(&mut s);
            let err = check_sequence_state(&s, &l, expected(0, 4)).unwrap_err();
            assert!(
                err.starts_with(message),
                "{err:?} should start with {message:?}"
            );
        }
    }

    #[test]
    fn sizes_of_another_context_are_refused() {
        let l = layout(false, 1);
        let s = synthesize(&l, 0, 2, 0);
        let mut other = l.clone();
        other.layers[1].k_row_bytes = 16;
        let err =
            check_sequence_state(&synthesize(&other, 0, 2, 0), &l, expected(0, 2)).unwrap_err();
        assert!(
            err.starts_with("the K row size of layer 1 is 16, this context's is 8"),
            "{err}"
        );
        let mut trans = l.clone();
        trans.v_trans = true;
        assert!(check_sequence_state(&s, &trans, expected(0, 2))
            .unwrap_err()
            .starts_with("V transposition 0, this context's is 1"));
        let mut rotated = l.clone();
        rotated.n_rot_k = 64;
        assert!(check_sequence_state(&s, &rotated, expected(0, 2)).is_err());
        let mut fewer = l.clone();
        fewer.max_cells = 1;
        assert!(check_sequence_state(&s, &fewer, expected(0, 2))
            .unwrap_err()
            .contains("at most 1"));
    }

    #[test]
    fn a_huge_row_size_is_refused_without_allocating() {
        let l = layout(false, 1);
        let mut huge = l.clone();
        huge.layers[0].k_row_bytes = u64::MAX / 2;
        let s = synthesize(&l, 0, 3, 0);
        // The same bytes checked against a layout that announces enormous rows: no overflow, no panic.
        assert!(check_sequence_state(&s, &huge, expected(0, 3)).is_err());
    }
}
