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
    check_preamble(&mut r, expected)?;
    check_kv_section(&mut r, layout, expected, 0, "")?;
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
        check_cells(&mut r, layout, 0, 0, cells)?;
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

/// What a context's memory holds per sequence, section by section, in the order llama.cpp writes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryLayout {
    /// One KV cache (plain attention).
    Attention(StateLayout),
    /// Sliding-window attention (`llama_kv_cache_iswa`): the cache of the layers that see everything, then
    /// the cache of the layers that see the last `n_swa` positions, which holds (in a state) only those.
    SlidingWindow {
        /// The layers that attend to every position.
        base: StateLayout,
        /// The sliding-window layers.
        swa: StateLayout,
        /// The window: a state holds the last `n_swa` positions of these layers.
        n_swa: usize,
    },
    /// Attention layers in a KV cache, then recurrent layers (`llama_memory_hybrid`).
    Hybrid {
        /// The attention layers.
        attention: StateLayout,
        /// The recurrent layers.
        recurrent: RecurrentLayout,
    },
    /// Recurrent layers only (`llama_memory_recurrent`).
    Recurrent(RecurrentLayout),
}

/// The recurrent part of a state: one cell per sequence holding its whole history, as llama.cpp's
/// `llama_memory_recurrent::state_write` writes it:
///
/// ```text
/// u32 cell count (1, or 0 for an empty sequence); per cell: i32 position (the last token's), u32 0
/// u32 s_trans (0), u32 layer count (all layers of the model)
/// per recurrent layer: i32 R type, u64 R row bytes, cells x row bytes
/// per recurrent layer: i32 S type, u64 S row bytes, cells x row bytes
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecurrentLayout {
    /// The model's layer count, recurrent or not (llama.cpp writes it and skips the others).
    pub n_layer: u32,
    /// The recurrent layers' (convolution) R states, in order.
    pub r: Vec<RowLayout>,
    /// Their (SSM) S states.
    pub s: Vec<RowLayout>,
}

/// A type and a row size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowLayout {
    /// ggml type id.
    pub ty: i32,
    /// Bytes of one row (one cell).
    pub row_bytes: u64,
}

impl MemoryLayout {
    /// The memory kind's name, as the API and session headers spell it.
    pub fn kind(&self) -> &'static str {
        match self {
            MemoryLayout::Attention(_) => "attention",
            MemoryLayout::SlidingWindow { .. } => "sliding_window",
            MemoryLayout::Hybrid { .. } => "hybrid",
            MemoryLayout::Recurrent(_) => "recurrent",
        }
    }
}

/// Checks that `state` is a well-formed state of exactly `expected.token_count` tokens of sequence
/// `expected.saved_seq` for a context whose memory is `layout`: every KV section holds one cell per token it
/// must keep (all of them; in a sliding-window cache, the last `n_swa`), at consecutive positions, each in the
/// saved sequence alone; a recurrent section holds one cell (none for an empty sequence) at the last token's
/// position; every type and size is this context's and no byte is left over.
pub fn check_memory_state(
    state: &[u8],
    layout: &MemoryLayout,
    expected: Expected,
) -> Result<(), String> {
    let attention = match layout {
        MemoryLayout::Attention(kv) => return check_sequence_state(state, kv, expected),
        MemoryLayout::SlidingWindow { base, .. } => Some(base),
        MemoryLayout::Hybrid { attention, .. } => Some(attention),
        MemoryLayout::Recurrent(_) => None,
    };
    let mut r = Reader {
        bytes: state,
        at: 0,
    };
    check_preamble(&mut r, expected)?;
    if let Some(kv) = attention {
        check_kv_section(&mut r, kv, expected, 0, "")?;
    }
    match layout {
        MemoryLayout::SlidingWindow { swa, n_swa, .. } => {
            let first = expected.token_count.saturating_sub(*n_swa);
            check_kv_section(&mut r, swa, expected, first, "sliding-window cache: ")?;
        }
        MemoryLayout::Hybrid { recurrent, .. } | MemoryLayout::Recurrent(recurrent) => {
            check_recurrent_section(&mut r, recurrent, expected.token_count)?;
        }
        MemoryLayout::Attention(_) => unreachable!("handled above"),
    }
    if r.at != state.len() {
        return Err(format!(
            "{} bytes follow the end of the state",
            state.len() - r.at
        ));
    }
    Ok(())
}

fn check_preamble(r: &mut Reader<'_>, expected: Expected) -> Result<(), String> {
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
    Ok(())
}

/// One KV cache's part of a sequence state: the cells of positions `first..token_count`.
fn check_kv_section(
    r: &mut Reader<'_>,
    layout: &StateLayout,
    expected: Expected,
    first: usize,
    what: &str,
) -> Result<(), String> {
    let n_stream = r.u32("the stream count")?;
    if n_stream != layout.n_stream {
        return Err(format!(
            "{what}the state has {n_stream} KV streams, this context has {}",
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
            expected.token_count - first
        } else {
            0
        };
        if cells != wanted {
            return Err(format!(
                "{what}stream {stream} holds {cells} cells, expected {wanted} (one per position {first}..{})",
                expected.token_count
            ));
        }
        if cells > 0 {
            check_cells(r, layout, expected.saved_seq, first, cells)
                .map_err(|e| format!("{what}{e}"))?;
            check_rows(r, layout, cells).map_err(|e| format!("{what}{e}"))?;
        }
    }
    Ok(())
}

fn check_recurrent_section(
    r: &mut Reader<'_>,
    layout: &RecurrentLayout,
    token_count: usize,
) -> Result<(), String> {
    let cells = r.u32("the recurrent cell count")? as usize;
    let wanted = usize::from(token_count > 0);
    if cells != wanted {
        return Err(format!(
            "the recurrent state holds {cells} cells, expected {wanted} (one per sequence that holds tokens)"
        ));
    }
    if cells == 1 {
        let pos = r.i32("the recurrent cell's position")?;
        if i64::from(pos) != token_count as i64 - 1 {
            return Err(format!(
                "the recurrent cell is at position {pos}, expected {} (the last token's)",
                token_count - 1
            ));
        }
        let n_seq = r.u32("the recurrent cell's sequence-id count")?;
        if n_seq != 0 {
            return Err(format!(
                "the recurrent cell lists {n_seq} sequence ids, a sequence's state lists none"
            ));
        }
    }
    let s_trans = r.u32("the S transposition flag")?;
    if s_trans != 0 {
        return Err(format!("S transposition {s_trans}, llama.cpp writes 0"));
    }
    let n_layer = r.u32("the recurrent layer count")?;
    if n_layer != layout.n_layer {
        return Err(format!(
            "the recurrent state has {n_layer} layers, this model has {}",
            layout.n_layer
        ));
    }
    for (part, rows) in [("R", &layout.r), ("S", &layout.s)] {
        for (i, row) in rows.iter().enumerate() {
            expect_i32(
                r,
                row.ty,
                &format!("the {part} type of recurrent layer {i}"),
            )?;
            expect_u64(
                r,
                row.row_bytes,
                &format!("the {part} row size of recurrent layer {i}"),
            )?;
            r.skip_rows(cells, row.row_bytes, &format!("{part} rows"))?;
        }
    }
    Ok(())
}

/// Learns a context's layout from llama.cpp's state of a sequence holding exactly one token (at position 0)
/// in a fresh context of that layout: the sections are those of `kind` ("sliding_window", "hybrid",
/// "recurrent"), their layer counts, types and row sizes are read from the state itself. llama.cpp wrote
/// these bytes for this very context, so they are trusted; what they teach is then required of every state
/// handed back. `max_cells` and `n_swa` come from the context and the model.
pub fn learn_memory_layout(
    state: &[u8],
    kind: &str,
    max_cells: usize,
    n_swa: usize,
    cell_ext_bytes: usize,
) -> Result<MemoryLayout, String> {
    let mut r = Reader {
        bytes: state,
        at: 0,
    };
    let magic = r.u32("the state's magic")?;
    if magic != IO_MAGIC {
        return Err(format!("the probe state's magic is {magic:#010x}"));
    }
    let seq = r.i32("the saved sequence id")?;
    if seq != 0 {
        return Err(format!("the probe state is of sequence {seq}, expected 0"));
    }
    let layout = match kind {
        "sliding_window" => {
            let base = learn_kv_section(&mut r, max_cells, cell_ext_bytes)?;
            let swa = learn_kv_section(&mut r, max_cells, cell_ext_bytes)?;
            MemoryLayout::SlidingWindow { base, swa, n_swa }
        }
        "hybrid" => {
            let attention = learn_kv_section(&mut r, max_cells, cell_ext_bytes)?;
            let recurrent = learn_recurrent_section(&mut r)?;
            MemoryLayout::Hybrid {
                attention,
                recurrent,
            }
        }
        "recurrent" => MemoryLayout::Recurrent(learn_recurrent_section(&mut r)?),
        other => return Err(format!("no layout to learn for memory kind {other:?}")),
    };
    if r.at != state.len() {
        return Err(format!(
            "{} bytes follow the probe state's last section",
            state.len() - r.at
        ));
    }
    Ok(layout)
}

/// A KV section whose first stream holds one cell (position 0, sequence 0) and the others none.
fn learn_kv_section(
    r: &mut Reader<'_>,
    max_cells: usize,
    cell_ext_bytes: usize,
) -> Result<StateLayout, String> {
    let n_stream = r.u32("the stream count")?;
    let mut found = None;
    for stream in 0..n_stream {
        let cells = r.u32("a stream's cell count")?;
        match (stream, cells) {
            (0, 1) => {}
            (_, 0) => continue,
            _ => return Err(format!("the probe's stream {stream} holds {cells} cells")),
        }
        let pos = r.i32("the cell's position")?;
        let n_seq = r.u32("the cell's sequence-id count")?;
        if (pos, n_seq) != (0, 1) {
            return Err(format!(
                "the probe's cell is at position {pos} in {n_seq} sequences"
            ));
        }
        r.skip(cell_ext_bytes, "a cell's extension")?;
        r.i32("the cell's sequence id")?;
        let v_trans = r.u32("the V transposition flag")? != 0;
        let n_layer = r.u32("the layer count")?;
        let n_rot_k = r.u32("the K rotation")?;
        let n_rot_v = r.u32("the V rotation")?;
        let mut layers = Vec::new();
        for _ in 0..n_layer {
            let k_type = r.i32("a K type")?;
            let k_row_bytes = r.u64("a K row size")?;
            r.skip_rows(1, k_row_bytes, "K rows")?;
            layers.push(LayerLayout {
                k_type,
                k_row_bytes,
                v_type: 0,
                v_row_bytes: 0,
                v_element_bytes: 0,
                v_width: 0,
            });
        }
        for layer in &mut layers {
            layer.v_type = r.i32("a V type")?;
            if v_trans {
                layer.v_element_bytes = r.u32("a V element size")?;
                layer.v_width = r.u32("a V width")?;
                let column = u64::from(layer.v_element_bytes) * u64::from(layer.v_width);
                r.skip_rows(1, column, "V columns")?;
            } else {
                layer.v_row_bytes = r.u64("a V row size")?;
                r.skip_rows(1, layer.v_row_bytes, "V rows")?;
            }
        }
        found = Some(StateLayout {
            n_stream,
            cell_ext_bytes,
            v_trans,
            n_rot_k,
            n_rot_v,
            layers,
            max_cells,
        });
    }
    found.ok_or_else(|| "the probe's KV section holds no cell".to_owned())
}

fn learn_recurrent_section(r: &mut Reader<'_>) -> Result<RecurrentLayout, String> {
    let cells = r.u32("the recurrent cell count")?;
    if cells != 1 {
        return Err(format!("the probe's recurrent state holds {cells} cells"));
    }
    r.i32("the recurrent cell's position")?;
    r.u32("the recurrent cell's sequence-id count")?;
    r.u32("the S transposition flag")?;
    let n_layer = r.u32("the recurrent layer count")?;
    // R rows of every recurrent layer, then S rows of the same layers: the two lists have the same length,
    // which the byte count tells (each row is one cell long here).
    let mut rows = Vec::new();
    while r.at < r.bytes.len() {
        let ty = r.i32("a recurrent row type")?;
        let row_bytes = r.u64("a recurrent row size")?;
        r.skip_rows(1, row_bytes, "recurrent rows")?;
        rows.push(RowLayout { ty, row_bytes });
    }
    if rows.len() % 2 != 0 {
        return Err(format!(
            "the probe's recurrent state has {} row blocks, expected R and S for each layer",
            rows.len()
        ));
    }
    let s = rows.split_off(rows.len() / 2);
    Ok(RecurrentLayout {
        n_layer,
        r: rows,
        s,
    })
}

/// Builds a well-formed state of `token_count` tokens of sequence `seq` for `layout` (payload bytes all
/// `fill`), the way llama.cpp writes one.
pub fn synthesize_memory(layout: &MemoryLayout, seq: u32, token_count: usize, fill: u8) -> Vec<u8> {
    let kv_part = |kv: &StateLayout, first: usize| -> Vec<u8> {
        let mut full = synthesize(kv, seq, token_count, fill);
        if first == 0 {
            return full.split_off(8);
        }
        // Rebuild with the positions first..token_count: synthesize the cells count, then shift positions.
        let mut part = synthesize(kv, seq, token_count - first, fill).split_off(8);
        let home = if kv.n_stream > 1 { seq as usize } else { 0 };
        // Offset of the home stream's first cell: the stream count, the empty streams before it, its count.
        let mut at = 4 + 4 * home + 4;
        for i in 0..token_count - first {
            part[at..at + 4].copy_from_slice(&((first + i) as i32).to_le_bytes());
            at += 12 + kv.cell_ext_bytes;
        }
        part
    };
    let mut out = Vec::new();
    out.extend_from_slice(&IO_MAGIC.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    match layout {
        MemoryLayout::Attention(kv) => out.extend(kv_part(kv, 0)),
        MemoryLayout::SlidingWindow { base, swa, n_swa } => {
            out.extend(kv_part(base, 0));
            out.extend(kv_part(swa, token_count.saturating_sub(*n_swa)));
        }
        MemoryLayout::Hybrid {
            attention,
            recurrent,
        } => {
            out.extend(kv_part(attention, 0));
            out.extend(recurrent_part(recurrent, token_count, fill));
        }
        MemoryLayout::Recurrent(recurrent) => {
            out.extend(recurrent_part(recurrent, token_count, fill))
        }
    }
    out
}

fn recurrent_part(layout: &RecurrentLayout, token_count: usize, fill: u8) -> Vec<u8> {
    let mut out = Vec::new();
    let cells = usize::from(token_count > 0);
    out.extend_from_slice(&(cells as u32).to_le_bytes());
    if cells == 1 {
        out.extend_from_slice(&(token_count as i32 - 1).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
    }
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&layout.n_layer.to_le_bytes());
    for row in layout.r.iter().chain(&layout.s) {
        out.extend_from_slice(&row.ty.to_le_bytes());
        out.extend_from_slice(&row.row_bytes.to_le_bytes());
        out.extend(std::iter::repeat_n(fill, cells * row.row_bytes as usize));
    }
    out
}

fn check_cells(
    r: &mut Reader<'_>,
    layout: &StateLayout,
    seq: u32,
    first: usize,
    cells: usize,
) -> Result<(), String> {
    for i in 0..cells {
        let pos = r.i32("a cell's position")?;
        let want = first + i;
        if i64::from(pos) != want as i64 {
            return Err(format!(
                "cell {i} is at position {pos}, expected {want} (cells must hold positions {first}..{} in \
                 order)",
                first + cells
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

    /// The records of `cells` cells that each hold one sequence (position, sequence-id count, the model's
    /// `cell_ext_bytes` of extension, the sequence id), and the bytes of one record.
    fn one_sequence_cell_records(
        &mut self,
        cells: usize,
        cell_ext_bytes: usize,
    ) -> Result<(&[u8], usize), String> {
        let record = 12 + cell_ext_bytes;
        let records = self.take(
            cells
                .checked_mul(record)
                .ok_or("the cell records cannot be addressed")?,
            "the cell records",
        )?;
        Ok((records, record))
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

/// llama.cpp's state of sequence `from_seq` of a unified KV cache (one stream for every sequence), as a context
/// with `to_seq` alone in its cache writes it: sequence id `to_seq`, and the cells in position order with their
/// K and V rows moved along.
///
/// A unified cache places each batch's tokens in the first free cells, so once other sequences have freed
/// cells a sequence's later positions may sit before its earlier ones; its state lists cells in cell order.
/// A context of its own holds positions `0..n` in cells `0..n`, and a state in that order is what sessions
/// store (byte for byte the same as a plain Context's) and what the checked restore accepts. Every cell must
/// list `from_seq` alone, with distinct positions; `cell_ext_bytes` is the per-cell extension of the model.
/// The row sizes are read from the state itself, each bounded by its length.
pub fn into_position_order(
    state: &[u8],
    cell_ext_bytes: usize,
    from_seq: i32,
    to_seq: i32,
    out: &mut [u8],
) -> Result<(), String> {
    if out.len() != state.len() {
        return Err(format!(
            "a state of {} bytes is rewritten into {} bytes",
            state.len(),
            out.len()
        ));
    }
    let mut r = Reader {
        bytes: state,
        at: 0,
    };
    let mut out = SliceOut { bytes: out, at: 0 };
    let magic = r.u32("the state's magic")?;
    if magic != IO_MAGIC {
        return Err(format!(
            "the state's magic is {magic:#010x}, expected {IO_MAGIC:#010x}"
        ));
    }
    let saved = r.i32("the saved sequence id")?;
    if saved != from_seq {
        return Err(format!(
            "the state belongs to sequence {saved}, expected {from_seq}"
        ));
    }
    let n_stream = r.u32("the stream count")?;
    if n_stream != 1 {
        return Err(format!(
            "the state has {n_stream} KV streams, a unified cache has 1"
        ));
    }
    out.extend_from_slice(&IO_MAGIC.to_le_bytes());
    out.extend_from_slice(&to_seq.to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes());
    let cells = r.u32("the cell count")? as usize;
    out.extend_from_slice(&(cells as u32).to_le_bytes());
    if cells == 0 {
        return finish(r, &out);
    }
    let (records, record) = r.one_sequence_cell_records(cells, cell_ext_bytes)?;
    let mut order: Vec<(i32, usize)> = Vec::with_capacity(cells);
    for (i, cell) in records.chunks_exact(record).enumerate() {
        let word = |at: usize| i32::from_le_bytes(cell[at..at + 4].try_into().expect("4 bytes"));
        if word(4) != 1 || word(8 + cell_ext_bytes) != from_seq {
            return Err(format!(
                "cell {i} does not belong to sequence {from_seq} alone"
            ));
        }
        order.push((word(0), i));
    }
    order.sort_unstable();
    if let Some(pair) = order.windows(2).find(|pair| pair[0].0 == pair[1].0) {
        return Err(format!("two cells hold position {}", pair[0].0));
    }
    let order: Vec<usize> = order.into_iter().map(|(_, i)| i).collect();
    for &i in &order {
        let cell = &records[i * record..(i + 1) * record];
        out.extend_from_slice(&cell[..record - 4]);
        out.extend_from_slice(&to_seq.to_le_bytes());
    }
    let v_trans = r.u32("the V transposition flag")?;
    let n_layer = r.u32("the layer count")?;
    out.extend_from_slice(&v_trans.to_le_bytes());
    out.extend_from_slice(&n_layer.to_le_bytes());
    out.extend_from_slice(r.take(8, "the K/V rotations")?);
    // Rows (one per cell) of K for every layer, then of V: moved whole, in the new order.
    let permute = |r: &mut Reader<'_>, out: &mut SliceOut<'_>, what: &str| -> Result<(), String> {
        let row =
            usize::try_from(r.u64(what)?).map_err(|_| format!("{what} cannot be addressed"))?;
        out.extend_from_slice(&(row as u64).to_le_bytes());
        let rows = r.take(
            cells
                .checked_mul(row)
                .ok_or_else(|| format!("{what} cannot be addressed"))?,
            what,
        )?;
        for &i in &order {
            out.extend_from_slice(&rows[i * row..(i + 1) * row]);
        }
        Ok(())
    };
    for _ in 0..n_layer {
        out.extend_from_slice(r.take(4, "a layer's K type")?);
        permute(&mut r, &mut out, "a layer's K rows")?;
    }
    for _ in 0..n_layer {
        out.extend_from_slice(r.take(4, "a layer's V type")?);
        if v_trans == 0 {
            permute(&mut r, &mut out, "a layer's V rows")?;
            continue;
        }
        // Transposed: for each of `width` values, one element per cell.
        let element = r.u32("a layer's V element size")? as usize;
        let width = r.u32("a layer's V width")? as usize;
        out.extend_from_slice(&(element as u32).to_le_bytes());
        out.extend_from_slice(&(width as u32).to_le_bytes());
        let column = cells
            .checked_mul(element)
            .ok_or("a layer's V columns cannot be addressed")?;
        let values = r.take(
            column
                .checked_mul(width)
                .ok_or("a layer's V columns cannot be addressed")?,
            "a layer's V columns",
        )?;
        for run in values.chunks_exact(column) {
            for &i in &order {
                out.extend_from_slice(&run[i * element..(i + 1) * element]);
            }
        }
    }
    finish(r, &out)
}

/// The positions of the cells in llama.cpp's state of one sequence, in the order of its cells (those of its
/// first stream that has any); `cell_ext_bytes` is the per-cell extension of the model.
pub fn cell_positions(state: &[u8], cell_ext_bytes: usize) -> Result<Vec<i32>, String> {
    let mut r = Reader {
        bytes: state,
        at: 0,
    };
    r.skip(8, "the magic and the sequence id")?;
    for _ in 0..r.u32("the stream count")? {
        let cells = r.u32("a cell count")? as usize;
        if cells > 0 {
            let (records, record) = r.one_sequence_cell_records(cells, cell_ext_bytes)?;
            return Ok(records
                .chunks_exact(record)
                .map(|cell| i32::from_le_bytes(cell[..4].try_into().expect("4 bytes")))
                .collect());
        }
    }
    Ok(Vec::new())
}

fn finish(r: Reader<'_>, out: &SliceOut<'_>) -> Result<(), String> {
    if r.at != r.bytes.len() {
        return Err(format!(
            "{} bytes follow the end of the state",
            r.bytes.len() - r.at
        ));
    }
    // Every byte written mirrors one read, so the two lengths agree; checked rather than assumed.
    if out.at != out.bytes.len() {
        return Err(format!(
            "{} of {} bytes were rewritten",
            out.at,
            out.bytes.len()
        ));
    }
    Ok(())
}

/// A cursor that fills a slice from its start and never writes past its end (what would not fit is
/// counted, and [`finish`] refuses the result).
struct SliceOut<'a> {
    bytes: &'a mut [u8],
    at: usize,
}

impl SliceOut<'_> {
    fn extend_from_slice(&mut self, b: &[u8]) {
        if let Some(to) = self.bytes.get_mut(self.at..self.at + b.len()) {
            to.copy_from_slice(b);
        }
        self.at += b.len();
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

    /// A state of `seq` whose cells hold `positions` in that (cell) order, each cell's payload bytes its
    /// position (K rows, V rows or V elements), so that where a row went can be read back.
    fn scattered(layout: &StateLayout, seq: u32, positions: &[u8]) -> Vec<u8> {
        let mut state = synthesize(layout, seq, positions.len(), 0);
        // Cell records start after magic, sequence id, stream count and cell count.
        let records = 16;
        for (i, &p) in positions.iter().enumerate() {
            state[records + i * 12..records + i * 12 + 4]
                .copy_from_slice(&u32::from(p).to_le_bytes());
        }
        let mut at = records + positions.len() * 12 + 16;
        for l in &layout.layers {
            at += 12;
            for &p in positions {
                state[at..at + l.k_row_bytes as usize].fill(p);
                at += l.k_row_bytes as usize;
            }
        }
        for l in &layout.layers {
            if layout.v_trans {
                at += 12;
                for _ in 0..l.v_width {
                    for &p in positions {
                        state[at..at + l.v_element_bytes as usize].fill(p);
                        at += l.v_element_bytes as usize;
                    }
                }
            } else {
                at += 12;
                for &p in positions {
                    state[at..at + l.v_row_bytes as usize].fill(p);
                    at += l.v_row_bytes as usize;
                }
            }
        }
        assert_eq!(at, state.len());
        state
    }

    fn in_order(state: &[u8], from: i32, to: i32) -> Result<Vec<u8>, String> {
        let mut out = vec![0; state.len()];
        into_position_order(state, 0, from, to, &mut out).map(|()| out)
    }

    #[test]
    fn a_unified_caches_scattered_cells_come_out_in_position_order_with_their_rows() {
        for v_trans in [false, true] {
            let layout = layout(v_trans, 1);
            let state = scattered(&layout, 3, &[2, 0, 3, 1]);
            let ordered = in_order(&state, 3, 0).unwrap();
            assert_eq!(
                ordered,
                scattered(&layout, 0, &[0, 1, 2, 3]),
                "v_trans {v_trans}"
            );
            // Back into the cache under another id: already in order, only the id changes.
            assert_eq!(
                in_order(&ordered, 0, 5).unwrap(),
                scattered(&layout, 5, &[0, 1, 2, 3])
            );
            check_sequence_state(&ordered, &layout, expected(0, 4)).unwrap();
        }
        let empty = synthesize(&layout(false, 1), 2, 0, 0);
        assert_eq!(
            in_order(&empty, 2, 0).unwrap(),
            synthesize(&layout(false, 1), 0, 0, 0)
        );
    }

    #[test]
    fn cell_positions_are_read_in_cell_order_and_bounded_by_the_state() {
        let layout = layout(true, 1);
        let state = scattered(&layout, 3, &[2, 0, 3, 1]);
        assert_eq!(cell_positions(&state, 0).unwrap(), [2, 0, 3, 1]);
        assert_eq!(
            cell_positions(&synthesize(&layout, 0, 0, 0), 0).unwrap(),
            Vec::<i32>::new()
        );
        // Cut inside the third cell record.
        let error = cell_positions(&state[..16 + 2 * 12 + 5], 0).unwrap_err();
        assert!(error.contains("inside the cell records"), "{error}");
    }

    #[test]
    fn a_state_that_cannot_be_put_in_order_is_refused() {
        let layout = layout(true, 1);
        let state = scattered(&layout, 1, &[1, 0]);
        let refused = |bytes: &[u8], from: i32| in_order(bytes, from, 0).unwrap_err();
        assert_eq!(
            refused(&state, 2),
            "the state belongs to sequence 1, expected 2"
        );
        assert_eq!(
            refused(&scattered(&layout, 1, &[1, 1]), 1),
            "two cells hold position 1"
        );
        let mut shared = state.clone();
        shared[16 + 4..16 + 8].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(
            refused(&shared, 1),
            "cell 0 does not belong to sequence 1 alone"
        );
        let mut longer = state.clone();
        longer.push(0);
        assert_eq!(refused(&longer, 1), "1 bytes follow the end of the state");
        assert!(refused(&state[..state.len() - 1], 1).contains("the state ends at byte"));
        // A huge announced row size is refused by the length, never allocated.
        let mut huge = state.clone();
        let k_row = 16 + 2 * 12 + 16 + 4;
        huge[k_row..k_row + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(refused(&huge, 1).contains("K rows"));
        let mut short = vec![0; state.len() - 1];
        assert_eq!(
            into_position_order(&state, 0, 1, 0, &mut short).unwrap_err(),
            format!(
                "a state of {} bytes is rewritten into {} bytes",
                state.len(),
                state.len() - 1
            )
        );
        let streams = synthesize(&self::layout(true, 2), 1, 2, 0);
        assert_eq!(
            refused(&streams, 1),
            "the state has 2 KV streams, a unified cache has 1"
        );
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

    fn memory_layouts() -> Vec<MemoryLayout> {
        let recurrent = RecurrentLayout {
            n_layer: 3,
            r: vec![
                RowLayout {
                    ty: 0,
                    row_bytes: 12,
                };
                2
            ],
            s: vec![
                RowLayout {
                    ty: 0,
                    row_bytes: 20,
                };
                2
            ],
        };
        vec![
            MemoryLayout::SlidingWindow {
                base: layout(true, 1),
                swa: layout(false, 1),
                n_swa: 4,
            },
            MemoryLayout::SlidingWindow {
                base: layout(false, 3),
                swa: layout(true, 3),
                n_swa: 4,
            },
            MemoryLayout::Hybrid {
                attention: layout(true, 2),
                recurrent: recurrent.clone(),
            },
            MemoryLayout::Recurrent(recurrent),
        ]
    }

    #[test]
    fn synthesized_states_of_every_memory_kind_pass_and_every_truncation_fails() {
        for l in memory_layouts() {
            let n_seq = match &l {
                MemoryLayout::SlidingWindow { base, .. } => base.n_stream,
                MemoryLayout::Hybrid { attention, .. } => attention.n_stream,
                _ => 2,
            };
            for seq in 0..n_seq {
                for n in [0, 1, 3, 4, 5, 16] {
                    let s = synthesize_memory(&l, seq, n, 7);
                    check_memory_state(&s, &l, expected(seq, n))
                        .unwrap_or_else(|e| panic!("{} seq {seq} n {n}: {e}", l.kind()));
                    for other in [n.saturating_sub(1), n + 1] {
                        if other != n {
                            assert!(check_memory_state(&s, &l, expected(seq, other)).is_err());
                        }
                    }
                }
            }
            let s = synthesize_memory(&l, 0, 6, 1);
            for len in 0..s.len() {
                assert!(check_memory_state(&s[..len], &l, expected(0, 6)).is_err());
            }
            let mut longer = s.clone();
            longer.push(0);
            assert!(check_memory_state(&longer, &l, expected(0, 6)).is_err());
        }
    }

    #[test]
    fn hostile_recurrent_and_window_cells_are_refused() {
        let layouts = memory_layouts();
        // Recurrent only: the cell count follows the magic and the sequence id.
        let recurrent = &layouts[3];
        let good = synthesize_memory(recurrent, 0, 5, 0);
        for (at, value, message) in [
            (8, 2, "the recurrent state holds 2 cells, expected 1"),
            (12, 3, "the recurrent cell is at position 3, expected 4"),
            (16, 1, "the recurrent cell lists 1 sequence ids"),
            (20, 1, "S transposition 1"),
            (24, 2, "the recurrent state has 2 layers, this model has 3"),
        ] {
            let mut s = good.clone();
            put_i32(&mut s, at, value);
            let err = check_memory_state(&s, recurrent, expected(0, 5)).unwrap_err();
            assert!(
                err.starts_with(message),
                "{err:?} should start with {message:?}"
            );
        }
        // Sliding window, one stream: the window cache's cells start after the full cache.
        let window = &layouts[0];
        let MemoryLayout::SlidingWindow { base, .. } = window else {
            unreachable!()
        };
        let good = synthesize_memory(window, 0, 6, 0);
        let base_len = synthesize(base, 0, 6, 0).len();
        // The window cache: stream count, cell count 4 (positions 2..6), then the cells.
        let first_cell = base_len + 8;
        let mut s = good.clone();
        put_i32(&mut s, first_cell, 0);
        let err = check_memory_state(&s, window, expected(0, 6)).unwrap_err();
        assert!(
            err.starts_with("sliding-window cache: cell 0 is at position 0, expected 2"),
            "{err}"
        );
        let mut s = good.clone();
        put_i32(&mut s, base_len + 4, 6);
        assert!(check_memory_state(&s, window, expected(0, 6))
            .unwrap_err()
            .starts_with("sliding-window cache: stream 0 holds 6 cells, expected 4"));
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
