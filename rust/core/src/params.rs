//! Context parameters: everything that shapes the KV cache, validated before llama.cpp sees it.

use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;

use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};

use crate::error::{Error, Result};
use crate::model::Model;

/// Element type of the K or V cache. Quantized types shrink the cache (and session files): q8_0 is about 53%
/// of f16, q4_0 about 28%.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvType {
    /// 16-bit float (llama.cpp's default).
    F16,
    /// 8-bit blocks.
    Q8_0,
    /// 4-bit blocks.
    Q4_0,
}

impl KvType {
    /// Every supported type.
    pub const ALL: [KvType; 3] = [KvType::F16, KvType::Q8_0, KvType::Q4_0];

    /// The lower-case name used by llama.cpp's tools ("f16", "q8_0", "q4_0").
    pub fn as_str(self) -> &'static str {
        match self {
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
            KvType::Q4_0 => "q4_0",
        }
    }

    /// Bytes of one cache row of `width` values (ggml's block sizes: q8_0 stores 32 values in 34 bytes, q4_0
    /// in 18).
    pub fn row_bytes(self, width: usize) -> usize {
        match self {
            KvType::F16 => 2 * width,
            KvType::Q8_0 => width.div_ceil(32) * 34,
            KvType::Q4_0 => width.div_ceil(32) * 18,
        }
    }

    fn to_llama(self) -> KvCacheType {
        match self {
            KvType::F16 => KvCacheType::F16,
            KvType::Q8_0 => KvCacheType::Q8_0,
            KvType::Q4_0 => KvCacheType::Q4_0,
        }
    }

    /// Parses a name as given for parameter `name`.
    pub fn parse(name: &'static str, value: &str) -> Result<KvType> {
        value.parse().map_err(|()| {
            Error::invalid(
                name,
                "one of \"f16\", \"q8_0\", \"q4_0\"",
                format!("{value:?}"),
            )
        })
    }
}

impl FromStr for KvType {
    type Err = ();
    fn from_str(s: &str) -> std::result::Result<Self, ()> {
        KvType::ALL
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(s))
            .ok_or(())
    }
}

impl fmt::Display for KvType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parameters of a [`crate::Context`]. Every field that changes the layout of the saved state (all but
/// `n_threads`) is explicit: flash attention in particular is on or off, never "auto", because a state saved
/// with one setting does not load with the other.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ContextParams {
    /// KV cells of the context, shared by all sequences: each sequence holds at most `n_ctx / n_seq_max`
    /// tokens. llama.cpp rounds it up (see [`ContextParams::allocated`]); a Context's own parameters hold what
    /// it allocated.
    pub n_ctx: u32,
    /// Most tokens decoded in one llama.cpp call; longer prompts are split. llama.cpp clamps it to the
    /// requested `n_ctx`.
    pub n_batch: u32,
    /// CPU threads for decoding.
    pub n_threads: u32,
    /// K cache element type.
    pub type_k: KvType,
    /// V cache element type (quantized V requires flash attention).
    pub type_v: KvType,
    /// Flash attention on or off.
    pub flash_attn: bool,
    /// Independent sequences in the context.
    pub n_seq_max: u32,
}

impl Default for ContextParams {
    fn default() -> Self {
        ContextParams {
            n_ctx: 4096,
            n_batch: 512,
            n_threads: default_threads(),
            type_k: KvType::F16,
            type_v: KvType::F16,
            flash_attn: false,
            n_seq_max: 1,
        }
    }
}

/// The cores this process may use.
pub fn default_threads() -> u32 {
    std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1)
}

/// Most threads llama.cpp's thread pool holds (`GGML_MAX_N_THREADS`); more overflow its worker array.
pub const MAX_THREADS: u32 = 512;

/// Largest `n_seq_max` llama.cpp accepts (`LLAMA_MAX_SEQ`).
pub const MAX_SEQUENCES: u32 = 256;

/// llama.cpp's granularity of KV cells per sequence (the `GGML_PAD(.., 256)` of `llama_context`'s constructor).
pub const N_CTX_PAD: u32 = 256;

fn pad(n: u64) -> u64 {
    n.div_ceil(u64::from(N_CTX_PAD)) * u64::from(N_CTX_PAD)
}

impl ContextParams {
    /// These parameters as llama.cpp allocates them (the rules of `llama_context`'s constructor, for a model
    /// with causal attention and one KV stream per sequence): `n_batch` is clamped to the requested `n_ctx`,
    /// then `n_ctx` is rounded up to a multiple of 256 and to `n_seq_max` shares that are each a multiple of
    /// 256. `Context(n_ctx=300)` holds 512 cells, `n_ctx=512, n_seq_max=4` holds 1024 (256 per sequence).
    /// A Context reads its sizes back from llama.cpp; this is for parameters recorded by versions that stored
    /// the requested sizes, so that they compare as what they allocated.
    pub fn allocated(&self) -> ContextParams {
        let (n_ctx, n_batch) = allocated_sizes(self.n_ctx, self.n_batch, self.n_seq_max);
        ContextParams {
            n_ctx,
            n_batch,
            ..self.clone()
        }
    }

    /// Checks every field against the model, naming the first offending parameter.
    pub fn validate(&self, model: &Model) -> Result<()> {
        let n_ctx_train = model.n_ctx_train();
        if self.n_ctx == 0 || self.n_ctx > n_ctx_train {
            return Err(Error::invalid(
                "n_ctx",
                format!("1 <= n_ctx <= {n_ctx_train} (the model's training context)"),
                self.n_ctx,
            ));
        }
        if self.n_batch == 0 {
            return Err(Error::invalid("n_batch", "n_batch >= 1", self.n_batch));
        }
        if self.n_threads == 0 || self.n_threads > MAX_THREADS {
            return Err(Error::invalid(
                "n_threads",
                format!("1 <= n_threads <= {MAX_THREADS} (llama.cpp's GGML_MAX_N_THREADS)"),
                self.n_threads,
            ));
        }
        if self.n_seq_max == 0 || self.n_seq_max > MAX_SEQUENCES {
            return Err(Error::invalid(
                "n_seq_max",
                format!("1 <= n_seq_max <= {MAX_SEQUENCES}"),
                self.n_seq_max,
            ));
        }
        if self.type_v != KvType::F16 && !self.flash_attn {
            return Err(Error::invalid(
                "type_v",
                "\"f16\" unless flash_attn=True (llama.cpp needs flash attention for a quantized V cache)",
                format!("{:?} with flash_attn=False", self.type_v.as_str()),
            ));
        }
        Ok(())
    }

    pub(crate) fn to_llama(&self) -> LlamaContextParams {
        let flash = if self.flash_attn {
            llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED
        } else {
            llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED
        };
        let threads = i32::try_from(self.n_threads).unwrap_or(i32::MAX);
        LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(self.n_ctx))
            .with_n_batch(self.n_batch)
            .with_n_ubatch(self.n_batch)
            .with_n_threads(threads)
            .with_n_threads_batch(threads)
            .with_type_k(self.type_k.to_llama())
            .with_type_v(self.type_v.to_llama())
            .with_flash_attention_policy(flash)
            .with_n_seq_max(self.n_seq_max)
            .with_no_perf(true)
    }
}

/// `(n_ctx, n_batch)` as llama.cpp allocates them for these requested values (see
/// [`ContextParams::allocated`]); values too large for a u32 saturate (a context that large is refused anyway).
pub(crate) fn allocated_sizes(n_ctx: u32, n_batch: u32, n_seq_max: u32) -> (u32, u32) {
    let n_batch = n_batch.min(n_ctx);
    let n_seq = u64::from(n_seq_max.max(1));
    let per_seq = pad(pad(u64::from(n_ctx)) / n_seq);
    let n_ctx = u32::try_from(per_seq * n_seq).unwrap_or(u32::MAX);
    (n_ctx, n_batch)
}
