//! llama.cpp's own batch gain on this machine, the ceiling of any scheduler over it: the median time of one
//! decode step in which each of N sequences (1, 2, 4, 8, 16) adds one token, after each has read PROMPT_LEN
//! tokens (default 200, as in the reference figures of the batching issue). One context per N (split KV
//! layout, flash attention off, 2 threads); the five take turns, a few steps each, for ROUNDS rounds, so
//! that this VM's drift over minutes falls on all of them alike. Aggregate tokens/s = N / step time.
//! llama.cpp's API directly, on the calling thread: a measurement of llama.cpp, not of this crate.
//!
//! cargo run --release -p llama-sessions --example batch_scaling -- MODEL.gguf [PROMPT_LEN]
#![allow(clippy::disallowed_methods)]
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use std::num::NonZeroU32;
use std::time::Instant;

const COUNTS: [i32; 5] = [1, 2, 4, 8, 16];
const ROUNDS: usize = 8;
const STEPS_PER_ROUND: usize = 5;
/// Cells per sequence: the prompt and every timed step must fit.
const CELLS: usize = 512;

fn main() {
    let path = std::env::args()
        .nth(1)
        .expect("usage: batch_scaling MODEL.gguf [PROMPT_LEN]");
    let prompt_len: usize = std::env::args()
        .nth(2)
        .map_or(200, |s| s.parse().expect("PROMPT_LEN: a number of tokens"));
    let steps = ROUNDS * STEPS_PER_ROUND;
    assert!(
        (1..=CELLS - steps).contains(&prompt_len),
        "PROMPT_LEN must be 1 to {} ({CELLS} cells per sequence, {steps} of them for the timed steps), not {prompt_len}",
        CELLS - steps
    );
    let backend = LlamaBackend::init().unwrap();
    let model = LlamaModel::load_from_file(&backend, path, &LlamaModelParams::default()).unwrap();
    let all: Vec<LlamaToken> = (0..5000)
        .map(|i| LlamaToken::new(200 + (i * 37) % 20000))
        .collect();
    let mut batch = LlamaBatch::new(512, 1);
    let mut contexts = Vec::new();
    for n in COUNTS {
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(CELLS as u32 * n as u32))
            .with_n_batch(512)
            .with_n_ubatch(512)
            .with_n_seq_max(n as u32)
            .with_n_threads(2)
            .with_n_threads_batch(2)
            .with_kv_unified(false)
            .with_flash_attention_policy(llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED);
        let mut ctx = model.new_context(&backend, params).unwrap();
        for s in 0..n {
            let prompt = &all[s as usize..s as usize + prompt_len];
            for (c, chunk) in prompt.chunks(256).enumerate() {
                batch.clear();
                for (i, &t) in chunk.iter().enumerate() {
                    batch.add(t, (c * 256 + i) as i32, &[s], false).unwrap();
                }
                ctx.decode(&mut batch).unwrap();
            }
        }
        contexts.push((n, ctx, Vec::new()));
    }
    for round in 0..ROUNDS {
        for (n, ctx, times) in &mut contexts {
            for step in round * STEPS_PER_ROUND..(round + 1) * STEPS_PER_ROUND {
                batch.clear();
                for s in 0..*n {
                    let position = (prompt_len + step) as i32;
                    batch
                        .add(all[(step + s as usize) % 100], position, &[s], true)
                        .unwrap();
                }
                let t = Instant::now();
                ctx.decode(&mut batch).unwrap();
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    let mut single = 0.0;
    for (n, _, times) in &mut contexts {
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let median = times[steps / 2];
        let rate = f64::from(*n) * 1e3 / median;
        if *n == 1 {
            single = rate;
        }
        println!(
            "{n:>2} sequences, {prompt_len} tokens each: step median {median:.1} ms (p10 {:.1}, p90 {:.1}), {rate:.0} tokens/s together, {:.2}x one",
            times[steps / 10],
            times[steps * 9 / 10],
            rate / single
        );
    }
}
