//! The prefix cache on the real model: chunks sliced from llama.cpp's per-sequence state assemble into
//! exactly the state llama.cpp writes for their cells (every KV type, with and without flash attention); a
//! context with a shared cache restores the chunks another computed and decodes only the rest; a chunk for
//! other KV parameters, another namespace, or with damaged bytes never enters the cache.

mod common;

use common::{greedy, model, temp_dir};
use llama_sessions::chunks::codec::{assemble, encode_chunk, parse_chunk};
use llama_sessions::chunks::{ChunkScope, PrefixCache};
use llama_sessions::{Context, ContextParams, KvType, LlamaToken, NeverInterrupt};

const C: usize = 32;

fn params(kv: KvType, flash_attn: bool, n_seq_max: u32) -> ContextParams {
    ContextParams {
        n_ctx: 256 * n_seq_max,
        n_batch: 64,
        n_threads: 2,
        type_k: kv,
        type_v: if flash_attn { kv } else { KvType::F16 },
        flash_attn,
        n_seq_max,
    }
}

/// `lines` lines of text, the first `shared` of them the same whatever `variant` is.
fn text(lines: usize, shared: usize, variant: &str) -> String {
    (0..lines)
        .map(|i| {
            if i < shared {
                format!("Line {i}: the keeper lit lamp number {i} at dusk.\n")
            } else {
                format!("Line {i}: {variant} watched ship {i} pass the rocks.\n")
            }
        })
        .collect()
}

fn tokenize(text: &str) -> Vec<LlamaToken> {
    model().tokenize(text, true, true).unwrap()
}

/// Decodes `tokens` into the empty sequence `seq` (`max_tokens` generated after them); returns the prompt
/// tokens it decoded.
fn run(ctx: &mut Context, seq: u32, tokens: &[LlamaToken], max_tokens: usize) -> usize {
    let (mut generator, reused) = ctx
        .start_generation_reusing_prefix_tokens(
            seq,
            tokens,
            greedy(max_tokens),
            &mut NeverInterrupt,
        )
        .unwrap();
    assert_eq!(reused, 0);
    while generator
        .next_piece(ctx, &mut NeverInterrupt)
        .unwrap()
        .is_some()
    {}
    generator.stats().prompt_tokens
}

fn common_prefix(a: &[LlamaToken], b: &[LlamaToken]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The state of the first `n` cells of sequence `seq` (the context is cut back to them).
fn state_of_first(ctx: &mut Context, seq: u32, n: usize) -> Vec<u8> {
    ctx.truncate(seq, n).unwrap();
    ctx.sequence_state(seq).unwrap()
}

#[test]
fn assembled_chunks_are_byte_for_byte_the_state_llama_cpp_writes() {
    let cases = [
        (KvType::F16, false, 1),
        (KvType::F16, true, 1),
        (KvType::Q8_0, true, 1),
        (KvType::Q4_0, true, 1),
        (KvType::Q8_0, false, 1),
        (KvType::F16, false, 3),
    ];
    let tokens = tokenize(&text(10, 10, ""));
    assert!(tokens.len() > 3 * C, "{} tokens", tokens.len());
    for (kv, flash, n_seq) in cases {
        let seq = n_seq - 1;
        let mut ctx = Context::new(model(), params(kv, flash, n_seq)).unwrap();
        run(&mut ctx, seq, &tokens, 0);
        let n = tokens.len();
        let state = ctx.sequence_state(seq).unwrap();
        let layout = ctx.state_layout().unwrap().clone();
        let scope = ChunkScope::new(model().fingerprint(), ctx.params(), &layout, C, "");
        let keys = scope.chain(&tokens);
        assert_eq!(keys.len(), n / C);
        let chunks: Vec<Vec<u8>> = (0..keys.len())
            .map(|i| encode_chunk(&state, &layout, seq, n, C, i, &keys[i]).unwrap())
            .collect();
        let views: Vec<_> = chunks
            .iter()
            .enumerate()
            .map(|(i, bytes)| parse_chunk(bytes, &keys[i], i * C, C, &layout).unwrap())
            .collect();
        for k in (1..=keys.len()).rev() {
            let want = state_of_first(&mut ctx, seq, k * C);
            assert!(
                assemble(&views[..k], &layout, seq) == want,
                "{kv:?} flash {flash} n_seq {n_seq}: chunks 0..{k} differ from llama.cpp's state"
            );
        }
    }
}

#[test]
fn a_second_context_restores_the_shared_chunks_and_decodes_only_the_rest() {
    let dir = temp_dir("prefix-cache-shared");
    let cache = PrefixCache::on_disk(&dir, 1 << 30, C, "").unwrap();
    let first = tokenize(&text(9, 6, "the first keeper"));
    let second = tokenize(&text(9, 6, "a stranger"));
    let shared = common_prefix(&first, &second);
    assert!((2 * C..3 * C).contains(&shared), "{shared} shared tokens");

    let mut a =
        Context::with_prefix_cache(model(), params(KvType::F16, false, 1), cache.clone()).unwrap();
    assert_eq!(run(&mut a, 0, &first, 4), first.len());
    // Offered when the prompt was decoded: its full chunks.
    assert_eq!(cache.stats().entries as usize, first.len() / C);

    let mut b =
        Context::with_prefix_cache(model(), params(KvType::F16, false, 1), cache.clone()).unwrap();
    assert_eq!(run(&mut b, 0, &second, 4), second.len() - 2 * C);
    assert_eq!(cache.stats().hits, 2);
    assert_eq!(&b.tokens(0).unwrap()[..second.len()], second.as_slice());
    assert_eq!(
        state_of_first(&mut b, 0, 2 * C),
        state_of_first(&mut a, 0, 2 * C)
    );
    // The same prompt encoded (no logits needed) in a third context: every full chunk comes from the
    // cache.
    let mut c =
        Context::with_prefix_cache(model(), params(KvType::F16, false, 1), cache.clone()).unwrap();
    assert_eq!(run(&mut c, 0, &first, 0), first.len() - first.len() / C * C);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn chunks_of_other_kv_parameters_or_another_namespace_never_match() {
    let cache = PrefixCache::in_memory(1 << 30, C, "").unwrap();
    let tokens = tokenize(&text(9, 9, ""));
    let full_chunks = tokens.len() / C;
    let mut f16 =
        Context::with_prefix_cache(model(), params(KvType::F16, false, 1), cache.clone()).unwrap();
    assert_eq!(run(&mut f16, 0, &tokens, 0), tokens.len());
    for (kv, flash) in [
        (KvType::F16, true),
        (KvType::Q8_0, true),
        (KvType::Q8_0, false),
    ] {
        let mut other =
            Context::with_prefix_cache(model(), params(kv, flash, 1), cache.clone()).unwrap();
        assert_eq!(
            run(&mut other, 0, &tokens, 0),
            tokens.len(),
            "{kv:?} {flash}"
        );
    }
    let tenant = PrefixCache::new(cache.store().clone(), C, "tenant b").unwrap();
    let mut other =
        Context::with_prefix_cache(model(), params(KvType::F16, false, 1), tenant).unwrap();
    assert_eq!(run(&mut other, 0, &tokens, 0), tokens.len());
    assert_eq!(cache.stats().hits, 0);
    assert_eq!(cache.stats().entries as usize, 5 * full_chunks);

    // Planted: the f16 chunk's bytes under the key a q8_0 context looks up, once as they are (they record
    // another key) and once re-keyed with a fresh checksum (the layout's lengths differ): both are refused,
    // removed, and the prefix is decoded.
    let store = cache.store().clone();
    let f16_layout = f16.state_layout().unwrap().clone();
    let f16_key =
        ChunkScope::new(model().fingerprint(), f16.params(), &f16_layout, C, "").chain(&tokens)[0];
    let planted = store.get(&f16_key, usize::MAX - 1).unwrap().unwrap();
    let q8 = Context::new(model(), params(KvType::Q8_0, true, 1)).unwrap();
    let q8_scope = ChunkScope::new(
        model().fingerprint(),
        q8.params(),
        q8.state_layout().unwrap(),
        C,
        "",
    );
    let q8_key = q8_scope.chain(&tokens)[0];
    let mut rekeyed = planted.clone();
    rekeyed[12..44].copy_from_slice(&q8_key.0);
    let body = rekeyed.len() - 32;
    let checksum = *blake3::hash(&rekeyed[..body]).as_bytes();
    rekeyed[body..].copy_from_slice(&checksum);
    for bytes in [planted, rekeyed] {
        store.put(&q8_key, &bytes).unwrap();
        let corrupt_before = cache.stats().corrupt;
        let mut q8 =
            Context::with_prefix_cache(model(), params(KvType::Q8_0, true, 1), cache.clone())
                .unwrap();
        assert_eq!(run(&mut q8, 0, &tokens, 0), tokens.len());
        assert_eq!(cache.stats().corrupt, corrupt_before + 1);
        // Offered again after the decode: the sound chunk replaced the planted one.
        let sound = store.get(&q8_key, usize::MAX - 1).unwrap().unwrap();
        parse_chunk(&sound, &q8_key, 0, C, q8.state_layout().unwrap()).unwrap();
    }
}

#[test]
fn a_damaged_chunk_file_is_a_miss_and_the_prefix_is_decoded_again() {
    let dir = temp_dir("prefix-cache-damaged");
    let cache = PrefixCache::on_disk(&dir, 1 << 30, C, "").unwrap();
    let tokens = tokenize(&text(9, 9, ""));
    assert!(tokens.len() > 3 * C);
    let mut a =
        Context::with_prefix_cache(model(), params(KvType::F16, false, 1), cache.clone()).unwrap();
    run(&mut a, 0, &tokens, 0);
    let a_full = a.sequence_state(0).unwrap();
    let layout = a.state_layout().unwrap().clone();
    let keys = ChunkScope::new(model().fingerprint(), a.params(), &layout, C, "").chain(&tokens);
    let file = |i: usize| dir.join(format!("{}.kvchunk", keys[i].to_hex()));

    // A flipped byte in chunk 1: chunk 0 is restored, the rest decoded, chunk 1 written again soundly.
    let mut bytes = std::fs::read(file(1)).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    std::fs::write(file(1), &bytes).unwrap();
    let mut b =
        Context::with_prefix_cache(model(), params(KvType::F16, false, 1), cache.clone()).unwrap();
    assert_eq!(run(&mut b, 0, &tokens, 0), tokens.len() - C);
    assert_eq!(cache.stats().corrupt, 1);
    parse_chunk(&std::fs::read(file(1)).unwrap(), &keys[1], C, C, &layout).unwrap();
    assert_eq!(b.tokens(0).unwrap(), tokens.as_slice());
    assert_eq!(state_of_first(&mut b, 0, C), state_of_first(&mut a, 0, C));

    // Chunk 0 cut short: nothing is restored; the context decodes it all, exactly as the first did.
    let bytes = std::fs::read(file(0)).unwrap();
    std::fs::write(file(0), &bytes[..bytes.len() - 1]).unwrap();
    let mut c =
        Context::with_prefix_cache(model(), params(KvType::F16, false, 1), cache.clone()).unwrap();
    assert_eq!(run(&mut c, 0, &tokens, 0), tokens.len());
    assert_eq!(cache.stats().corrupt, 2);
    assert!(c.sequence_state(0).unwrap() == a_full);
    std::fs::remove_dir_all(&dir).unwrap();
}
