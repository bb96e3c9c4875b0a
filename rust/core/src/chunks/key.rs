//! Chunk keys: a chained BLAKE3 hash over token ids and everything that shapes the KV bytes.
//!
//! `scope = BLAKE3-derive("llama-sessions 2026-11 kv chunk scope v1", fields)` where the fields (each
//! length-prefixed, so no two field lists hash alike) are: the llama.cpp build, the model fingerprint, the KV
//! types, flash attention, the chunk length, the state layout's geometry (cell extension, V transposition,
//! K/V rotation, every layer's types and row sizes) and the caller's namespace. Then
//! `key(i) = BLAKE3-derive("llama-sessions 2026-11 kv chunk key v1", scope || key(i-1) or "root" || tokens)`
//! with the chunk's token ids as little-endian i32. A key therefore names one exact prefix (every token
//! before the chunk, through the chain) under one exact set of KV-shaping parameters.

use crate::llama_state::StateLayout;
use crate::params::ContextParams;
use crate::session_format::LLAMA_CPP_BUILD;
use llama_cpp_2::token::LlamaToken;

const SCOPE_CONTEXT: &str = "llama-sessions 2026-11 kv chunk scope v1";
const KEY_CONTEXT: &str = "llama-sessions 2026-11 kv chunk key v1";

/// The key of one chunk: 32 bytes of BLAKE3, written as 64 lowercase hex digits in file names.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkKey(pub [u8; 32]);

impl ChunkKey {
    /// 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 64 hex digits (what [`ChunkKey::to_hex`] writes); `None` for anything else.
    pub fn from_hex(hex: &str) -> Option<ChunkKey> {
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(ChunkKey(out))
    }
}

impl std::fmt::Debug for ChunkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChunkKey({})", &self.to_hex()[..16])
    }
}

/// Everything besides the tokens that decides a chunk's bytes, hashed once per context.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ChunkScope {
    digest: [u8; 32],
    chunk_tokens: usize,
}

impl std::fmt::Debug for ChunkScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hex: String = self.digest[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        write!(f, "ChunkScope({hex}.., {} tokens)", self.chunk_tokens)
    }
}

impl ChunkScope {
    /// The scope of chunks of `chunk_tokens` tokens written by a context of `params` over the model with
    /// `fingerprint`, whose per-sequence state has `layout`, in `namespace`. The layout's stream count and
    /// cell count are left out: they shape the envelope of a state, which assembly writes for the context at
    /// hand, not the rows.
    pub fn new(
        fingerprint: &str,
        params: &ContextParams,
        layout: &StateLayout,
        chunk_tokens: usize,
        namespace: &str,
    ) -> ChunkScope {
        let mut h = blake3::Hasher::new_derive_key(SCOPE_CONTEXT);
        let mut field = |bytes: &[u8]| {
            h.update(&(bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        field(LLAMA_CPP_BUILD.as_bytes());
        field(fingerprint.as_bytes());
        field(params.type_k.as_str().as_bytes());
        field(params.type_v.as_str().as_bytes());
        field(&[u8::from(params.flash_attn)]);
        field(&(chunk_tokens as u64).to_le_bytes());
        let mut geometry = Vec::new();
        geometry.extend_from_slice(&(layout.cell_ext_bytes as u64).to_le_bytes());
        geometry.push(u8::from(layout.v_trans));
        geometry.extend_from_slice(&layout.n_rot_k.to_le_bytes());
        geometry.extend_from_slice(&layout.n_rot_v.to_le_bytes());
        geometry.extend_from_slice(&(layout.layers.len() as u64).to_le_bytes());
        for l in &layout.layers {
            geometry.extend_from_slice(&l.k_type.to_le_bytes());
            geometry.extend_from_slice(&l.k_row_bytes.to_le_bytes());
            geometry.extend_from_slice(&l.v_type.to_le_bytes());
            geometry.extend_from_slice(&l.v_row_bytes.to_le_bytes());
            geometry.extend_from_slice(&l.v_element_bytes.to_le_bytes());
            geometry.extend_from_slice(&l.v_width.to_le_bytes());
        }
        field(&geometry);
        field(namespace.as_bytes());
        ChunkScope {
            digest: *h.finalize().as_bytes(),
            chunk_tokens,
        }
    }

    /// Tokens per chunk.
    pub fn chunk_tokens(&self) -> usize {
        self.chunk_tokens
    }

    /// The key of the chunk holding `tokens` (exactly [`ChunkScope::chunk_tokens`] of them) after the chunk
    /// `parent` (None for the first chunk of a sequence).
    pub fn key(&self, parent: Option<&ChunkKey>, tokens: &[LlamaToken]) -> ChunkKey {
        let mut h = blake3::Hasher::new_derive_key(KEY_CONTEXT);
        h.update(&self.digest);
        match parent {
            Some(p) => {
                h.update(b"P");
                h.update(&p.0);
            }
            None => {
                h.update(b"R");
            }
        }
        h.update(&(tokens.len() as u64).to_le_bytes());
        for t in tokens {
            h.update(&t.0.to_le_bytes());
        }
        ChunkKey(*h.finalize().as_bytes())
    }

    /// The keys of the full chunks of `tokens`, in order (a partial last chunk has none).
    pub fn chain(&self, tokens: &[LlamaToken]) -> Vec<ChunkKey> {
        let mut keys: Vec<ChunkKey> = Vec::with_capacity(tokens.len() / self.chunk_tokens.max(1));
        for chunk in tokens.chunks_exact(self.chunk_tokens.max(1)) {
            let key = self.key(keys.last(), chunk);
            keys.push(key);
        }
        keys
    }
}
