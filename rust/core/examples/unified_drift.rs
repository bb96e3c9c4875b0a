//! Why a session's numbers move in a shared (unified) KV cache, with llama.cpp's API alone (no code of this
//! crate): sequence 1 reads 100 tokens and then 60 more in a unified cache where sequence 0 first read N
//! tokens, and its last logits are compared with those of the same reading in a cache of its own.
//!
//! - The offset: N = 8, 16, 32, 64, 82, 128, 256, with flash attention off and on. llama.cpp sums a token's
//!   attention terms over the cells in SIMD lanes; an offset that keeps each term in its lane (a multiple of
//!   8 without flash attention, of 64 with it, on AVX2) gives the same logits bit for bit, any other adds the
//!   terms in another order, and the 8-bit quantization of the activations turns the last-bit differences
//!   into logits a few tenths apart.
//! - Isolation: the same layout with the neighbour's words changed gives the same logits bit for bit.
//!
//! cargo run --release -p llama-sessions --example unified_drift -- MODEL.gguf
#![allow(clippy::disallowed_methods)]
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use std::num::NonZeroU32;

/// Decodes `tokens` into sequence `seq` from position `from`, in one batch; the last token's logits.
fn read(ctx: &mut LlamaContext, seq: i32, tokens: &[LlamaToken], from: i32) -> Vec<f32> {
    let mut batch = LlamaBatch::new(512, 1);
    for (i, &token) in tokens.iter().enumerate() {
        batch
            .add(token, from + i as i32, &[seq], i + 1 == tokens.len())
            .unwrap();
    }
    ctx.decode(&mut batch).unwrap();
    ctx.get_logits_ith(tokens.len() as i32 - 1).to_vec()
}

fn largest_difference(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn main() {
    let path = std::env::args()
        .nth(1)
        .expect("usage: unified_drift MODEL.gguf");
    let backend = LlamaBackend::init().unwrap();
    let model = LlamaModel::load_from_file(&backend, path, &LlamaModelParams::default()).unwrap();
    let tokens: Vec<LlamaToken> = (0..2000)
        .map(|i| LlamaToken::new(200 + (i * 37) % 20000))
        .collect();
    let (first, more) = (&tokens[0..100], &tokens[100..160]);
    let unified_cache = |flash_attention: bool| {
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(2048))
            .with_n_batch(512)
            .with_n_ubatch(512)
            .with_n_seq_max(2)
            .with_n_threads(2)
            .with_n_threads_batch(2)
            .with_kv_unified(true)
            .with_flash_attention_policy(if flash_attention {
                llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED
            } else {
                llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED
            });
        model.new_context(&backend, params).unwrap()
    };
    let after_neighbour = |flash_attention: bool, neighbour: &[LlamaToken]| {
        let mut ctx = unified_cache(flash_attention);
        read(&mut ctx, 0, neighbour, 0);
        read(&mut ctx, 1, first, 0);
        read(&mut ctx, 1, more, first.len() as i32)
    };
    for flash_attention in [false, true] {
        let mut alone = unified_cache(flash_attention);
        read(&mut alone, 1, first, 0);
        let reference = read(&mut alone, 1, more, first.len() as i32);
        for n in [8usize, 16, 32, 64, 82, 128, 256] {
            let logits = after_neighbour(flash_attention, &tokens[1000..1000 + n]);
            println!(
                "flash_attention={flash_attention}: after a neighbour of {n:>3} cells, logits at most {:.4} from alone",
                largest_difference(&logits, &reference)
            );
        }
        let one = after_neighbour(flash_attention, &tokens[1000..1082]);
        let other = after_neighbour(flash_attention, &tokens[1500..1582]);
        println!(
            "flash_attention={flash_attention}: a neighbour of 82 cells with other words, logits at most {:.4} from the first",
            largest_difference(&one, &other)
        );
    }
}
