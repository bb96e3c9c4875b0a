//! The [`StateLayout`] of a context: what llama.cpp's state of one of its sequences must look like, derived
//! from the model's hyperparameters and the context's parameters the way llama.cpp's KV cache derives them
//! (`llama_kv_cache`'s constructor and `state_write_data`). A test compares it with the layout parsed from
//! states llama.cpp really wrote, for every KV type with and without flash attention, so a llama.cpp update
//! that changes the rules fails there first.

use crate::llama_state::{LayerLayout, MemoryLayout, StateLayout};
use crate::model::{MemoryKind, Model};
use crate::params::{ContextParams, KvType};

/// How a new context learns the layout of its sequences' states.
pub(super) enum LayoutPlan {
    /// Derived from the hyperparameters (plain attention), or why it cannot be.
    Ready(Result<MemoryLayout, String>),
    /// Sliding-window, hybrid and recurrent memories: the sections are those of `kind`; their layers, types
    /// and row sizes are read from llama.cpp's state of one token decoded in the fresh context
    /// ([`crate::llama_state::learn_memory_layout`]).
    Probe {
        kind: MemoryKind,
        n_swa: usize,
        cell_ext_bytes: usize,
    },
}

/// Bytes of llama.cpp's per-cell extension in `model`'s KV state records (M-RoPE positions and token).
pub(crate) fn cell_ext_bytes(model: &Model) -> usize {
    if uses_multi_position_rope(model) {
        12
    } else {
        0
    }
}

/// How the context learns its layout: see [`LayoutPlan`].
pub(super) fn plan(model: &Model, params: &ContextParams, max_cells: usize) -> LayoutPlan {
    let kind = model.memory_kind();
    let cell_ext_bytes = cell_ext_bytes(model);
    match kind {
        MemoryKind::Attention => {
            LayoutPlan::Ready(state_layout(model, params, max_cells).map(MemoryLayout::Attention))
        }
        MemoryKind::Hybrid if model.n_swa() > 0 => LayoutPlan::Ready(Err(format!(
            "{:?} models with a sliding window in their attention layers keep three memories (full, window \
             and recurrent) whose state this build does not check yet, so it refuses to load it",
            model.architecture()
        ))),
        _ => LayoutPlan::Probe {
            kind,
            n_swa: model.n_swa() as usize,
            cell_ext_bytes,
        },
    }
}

/// Metadata keys whose nonzero value means a memory that is not one plain KV cache (sliding-window attention
/// keeps a second cache; recurrent layers keep a state per sequence), found in a model llama.cpp runs with
/// one KV cache: such a model is not one this build knows, so its sessions are refused rather than handed to
/// llama.cpp unchecked.
const OTHER_MEMORY_KEYS: [(&str, &str); 6] = [
    ("attention.sliding_window", "sliding-window attention"),
    ("ssm.state_size", "recurrent (state-space) layers"),
    ("ssm.conv_kernel", "recurrent (state-space) layers"),
    ("wkv.head_size", "recurrent (RWKV) layers"),
    ("shortconv.l_cache", "recurrent (short convolution) layers"),
    ("attention.kv_lora_rank", "compressed (MLA) attention"),
];

/// The layout of `model`'s per-sequence state in a context of `params` whose sequences hold `max_cells`
/// cells each, or why this build cannot check it.
fn state_layout(
    model: &Model,
    params: &ContextParams,
    max_cells: usize,
) -> Result<StateLayout, String> {
    let arch = model.architecture();
    let meta = model.metadata();
    for (key, what) in OTHER_MEMORY_KEYS {
        let value = meta.get(&format!("{arch}.{key}"));
        if value.is_some_and(|v| v.parse::<f64>() != Ok(0.0)) {
            return Err(format!(
                "this build checks the saved state of models with one plain KV cache; {arch:?} models have \
                 {what}, whose state it cannot verify yet, so it refuses to load it"
            ));
        }
    }
    let llama = &model.inner.llama;
    let n_layer = llama.n_layer();
    let n_head = llama.n_head();
    let n_head_kv = meta
        .get(&format!("{arch}.attention.head_count_kv"))
        .map_or(Ok(n_head), |v| v.parse::<u32>())
        .map_err(|_| {
            format!("{arch:?} models with a different number of KV heads per layer are not supported yet")
        })?;
    if n_head == 0 || n_layer == 0 {
        return Err(format!(
            "the model reports {n_layer} layers and {n_head} heads"
        ));
    }
    let head_dim = |key: &str| -> Result<u32, String> {
        match meta.get(&format!("{arch}.attention.{key}")) {
            Some(v) => v
                .parse::<u32>()
                .map_err(|_| format!("{arch}.attention.{key} is {v:?}, not a number")),
            None => Ok(u32::try_from(llama.n_embd()).unwrap_or(0) / n_head),
        }
    };
    let head_k = head_dim("key_length")?;
    let head_v = head_dim("value_length")?;
    let width_k = head_k * n_head_kv;
    let width_v = head_v * n_head_kv;
    let layer = LayerLayout {
        k_type: ggml_type(params.type_k),
        k_row_bytes: params.type_k.row_bytes(width_k as usize) as u64,
        v_type: ggml_type(params.type_v),
        v_row_bytes: params.type_v.row_bytes(width_v as usize) as u64,
        v_element_bytes: type_size(params.type_v),
        v_width: width_v,
    };
    // llama.cpp rotates quantized caches (Hadamard) unless LLAMA_ATTN_ROT_DISABLE is set; it reads the variable
    // when it creates the cache, which happens right after this.
    let rotation_disabled = std::env::var("LLAMA_ATTN_ROT_DISABLE")
        .ok()
        .and_then(|v| v.trim().parse::<i64>().ok())
        .is_some_and(|v| v != 0);
    let n_rot_k = if !rotation_disabled && params.type_k != KvType::F16 && head_k % 64 == 0 {
        let mut n = 64;
        while head_k % (2 * n) == 0 {
            n *= 2;
        }
        n
    } else {
        0
    };
    let n_rot_v = if !rotation_disabled && params.type_v != KvType::F16 && head_v % 64 == 0 {
        64
    } else {
        0
    };
    Ok(StateLayout {
        n_stream: params.n_seq_max,
        cell_ext_bytes: cell_ext_bytes(model),
        v_trans: !params.flash_attn,
        n_rot_k,
        n_rot_v,
        layers: vec![layer; n_layer as usize],
        max_cells,
    })
}

/// M-RoPE models keep a 2-D position per cell, which llama.cpp writes as a 12-byte cell extension.
fn uses_multi_position_rope(model: &Model) -> bool {
    use llama_cpp_2::model::RopeType;
    matches!(
        model.inner.llama.rope_type(),
        Some(RopeType::MRope | RopeType::Vision)
    )
}

/// ggml's type id.
fn ggml_type(kv: KvType) -> i32 {
    match kv {
        KvType::F16 => 1,
        KvType::Q4_0 => 2,
        KvType::Q8_0 => 8,
    }
}

/// ggml's `ggml_type_size`: bytes of one block (one element for f16).
fn type_size(kv: KvType) -> u32 {
    match kv {
        KvType::F16 => 2,
        KvType::Q4_0 => 18,
        KvType::Q8_0 => 34,
    }
}
