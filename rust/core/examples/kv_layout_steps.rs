//! How long one decode step of 8 sequences (one token each) takes in llama.cpp, by KV layout: split (one
//! stream per sequence, what `ContextPool` uses) or unified (one cache shared by the sequences, which a cell
//! budget needs), with flash attention off and on. Each sequence first reads PROMPT_LEN tokens (default 400).
//! llama.cpp's API directly, on the calling thread: a measurement of llama.cpp, not of this crate.
//!
//! cargo run --release -p llama-sessions --example kv_layout_steps -- MODEL.gguf [PROMPT_LEN]
#![allow(clippy::disallowed_methods)]
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use std::num::NonZeroU32;
use std::time::Instant;

fn main() {
    let path = std::env::args().nth(1).unwrap();
    let prompt_len: usize = std::env::args().nth(2).map_or(400, |s| s.parse().unwrap());
    // Split, each sequence has 8192 / 8 = 1024 cells: the prompt and the 40 timed steps must fit.
    assert!(
        (1..=984).contains(&prompt_len),
        "PROMPT_LEN must be 1 to 984 (1,024 cells per sequence, 40 of them for the timed steps), not {prompt_len}"
    );
    let backend = LlamaBackend::init().unwrap();
    let model = LlamaModel::load_from_file(&backend, path, &LlamaModelParams::default()).unwrap();
    let all: Vec<LlamaToken> = (0..5000)
        .map(|i| LlamaToken::new(200 + (i * 37) % 20000))
        .collect();
    for (unified, fa) in [(false, false), (false, true), (true, false), (true, true)] {
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(8 * 1024))
            .with_n_batch(512)
            .with_n_ubatch(512)
            .with_n_seq_max(8)
            .with_n_threads(2)
            .with_n_threads_batch(2)
            .with_kv_unified(unified)
            .with_flash_attention_policy(if fa {
                llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED
            } else {
                llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED
            });
        let mut ctx = model.new_context(&backend, params).unwrap();
        let mut batch = LlamaBatch::new(512, 1);
        for s in 0..8i32 {
            let toks = &all[s as usize..s as usize + prompt_len];
            for (c, chunk) in toks.chunks(256).enumerate() {
                batch.clear();
                for (i, &t) in chunk.iter().enumerate() {
                    batch.add(t, (c * 256 + i) as i32, &[s], false).unwrap();
                }
                ctx.decode(&mut batch).unwrap();
            }
        }
        let mut times = Vec::new();
        for (step, pos) in (0..40).zip(prompt_len as i32..) {
            batch.clear();
            for s in 0..8i32 {
                batch
                    .add(all[(step + s as usize) % 100], pos, &[s], true)
                    .unwrap();
            }
            let t = Instant::now();
            ctx.decode(&mut batch).unwrap();
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!(
            "unified={unified} fa={fa} prompt={prompt_len}: 8-token step median {:.1} ms (p10 {:.1}, p90 {:.1})",
            times[20], times[4], times[36]
        );
    }
}
