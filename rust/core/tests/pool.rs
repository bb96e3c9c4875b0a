//! Pooled contexts: Contexts that share one llama.cpp context, one sequence each, and are decoded together.

mod common;

use common::{arch_model, greedy, model};
use llama_sessions::{
    Context, ContextParams, ContextPool, Error, Generation, Metadata, NeverInterrupt,
};

/// Each pooled context: 512 cells, 64 tokens per decode.
fn params() -> ContextParams {
    ContextParams {
        n_ctx: 512,
        n_batch: 64,
        ..ContextParams::default()
    }
}

const PROMPTS: [&str; 4] = [
    "<|im_start|>user\nTell me a long story about a dragon and a lighthouse.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a long essay about the history of bread.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nDescribe, in detail, a walk through a busy city market.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nExplain at length how a steam engine works.<|im_end|>\n<|im_start|>assistant\n",
];

fn generate(ctx: &mut Context, prompt: &str, max_tokens: usize) -> Generation {
    ctx.generate(0, prompt, greedy(max_tokens), &mut NeverInterrupt)
        .unwrap()
}

#[test]
fn a_pooled_context_is_a_plain_context_of_the_same_parameters() {
    let pool = ContextPool::new(model(), params(), 4, 0).unwrap();
    assert_eq!(pool.params().n_ctx, 512);
    assert_eq!(pool.params().n_seq_max, 1);
    let mut pooled = pool.try_context().unwrap().unwrap();
    let mut plain = Context::new(model(), params()).unwrap();
    assert_eq!(pooled.params(), plain.params());
    assert_eq!(pooled.capacity(), plain.capacity());

    let a = generate(&mut pooled, PROMPTS[0], 24);
    let b = generate(&mut plain, PROMPTS[0], 24);
    assert_eq!(a.tokens.len(), 24);
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(pooled.tokens(0).unwrap(), plain.tokens(0).unwrap());
    let metadata = Metadata::new();
    let saved = pooled.snapshot(None, &metadata, None).unwrap();
    assert!(
        pooled.sequence_state(0).unwrap() == plain.sequence_state(0).unwrap(),
        "state bytes differ"
    );

    // Restored into a plain context, the pooled session continues identically, and the other way round.
    let mut restored = Context::new(model(), params()).unwrap();
    restored.restore(&saved, None, None).unwrap();
    let mut pooled_again = pool.try_context().unwrap().unwrap();
    pooled_again.restore(&saved, None, None).unwrap();
    let more = "<|im_end|>\n<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\n";
    let c = generate(&mut restored, more, 16);
    let d = generate(&mut pooled_again, more, 16);
    assert_eq!(c.tokens.len(), 16);
    assert_eq!(c.tokens, d.tokens);
    assert!(
        restored.sequence_state(0).unwrap() == pooled_again.sequence_state(0).unwrap(),
        "state bytes differ"
    );
}

#[test]
fn concurrent_contexts_are_decoded_together_and_each_holds_exactly_its_own() {
    let pool = ContextPool::new(model(), params(), 4, 0).unwrap();
    let alone: Vec<Generation> = PROMPTS
        .iter()
        .map(|p| generate(&mut Context::new(model(), params()).unwrap(), p, 32))
        .collect();
    let steps_before = pool.stats().steps;
    type Saved = (Vec<u8>, Vec<u8>);
    let results: Vec<(Generation, Saved, Vec<llama_sessions::LlamaToken>)> =
        std::thread::scope(|scope| {
            let handles: Vec<_> = PROMPTS
                .iter()
                .map(|prompt| {
                    let mut ctx = pool.try_context().unwrap().unwrap();
                    scope.spawn(move || {
                        let generation = generate(&mut ctx, prompt, 32);
                        let state = ctx.snapshot(None, &Metadata::new(), None).unwrap();
                        assert!(!state.is_empty());
                        let state = (state, ctx.sequence_state(0).unwrap());
                        (generation, state, ctx.tokens(0).unwrap().to_vec())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
    let stats = pool.stats();
    assert!(
        stats.max_sequences_in_step >= 2,
        "the four contexts were never decoded in one step: {stats:?}"
    );
    assert!(
        stats.steps - steps_before < 4 * 33,
        "four contexts took as many steps as one after the other: {stats:?}"
    );
    for (((generation, (session, state), tokens), solo), prompt) in
        results.iter().zip(&alone).zip(PROMPTS)
    {
        assert_eq!(generation.tokens.len(), 32);
        // Each sequence holds exactly its own prompt and what its generation returned.
        let prompt = model().tokenize(prompt, true, true).unwrap();
        assert_eq!(tokens, &[prompt, generation.tokens.clone()].concat());
        // Its state is exact: a plain context restored from it holds the same tokens and state bytes.
        let mut plain = Context::new(model(), params()).unwrap();
        plain.restore(session, None, None).unwrap();
        assert_eq!(plain.tokens(0).unwrap(), &tokens[..]);
        assert!(
            &plain.sequence_state(0).unwrap() == state,
            "state bytes differ"
        );
        // Greedy output in a batch may differ from running alone in the last bits (reported by the
        // agreement example, not asserted); the first tokens agree.
        assert_eq!(generation.tokens[..4], solo.tokens[..4]);
    }
}

#[test]
fn a_dropped_context_gives_its_sequence_back_empty() {
    let pool = ContextPool::new(model(), params(), 2, 0).unwrap();
    let mut first = pool.try_context().unwrap().unwrap();
    let second = pool.try_context().unwrap().unwrap();
    assert!(pool.try_context().unwrap().is_none(), "two sequences only");
    assert_eq!(pool.free_sequences(), 0);
    generate(&mut first, PROMPTS[1], 8);
    drop(first);
    assert_eq!(pool.free_sequences(), 1);
    let third = pool.try_context().unwrap().unwrap();
    assert_eq!(third.token_count(0).unwrap(), 0);
    assert_eq!(
        third.llama_cell_count(0).unwrap(),
        0,
        "no cell of the dropped context is left"
    );
    drop(second);
    // The pool outlives its handle while a context is alive, and stops with the last one.
    drop(pool);
    let mut third = third;
    assert_eq!(generate(&mut third, PROMPTS[2], 4).tokens.len(), 4);
}

#[test]
fn what_needs_a_context_of_its_own_is_refused_with_the_way_out() {
    let pool = ContextPool::new(model(), params(), 2, 0).unwrap();
    let mut ctx = pool.try_context().unwrap().unwrap();
    generate(&mut ctx, PROMPTS[0], 4);
    let dir = common::temp_dir("pool-llama-cpp");
    let err = ctx.save_llama_cpp_session(&dir.join("s.bin")).unwrap_err();
    assert!(matches!(err, Error::InvalidParameter { .. }), "{err:?}");
    assert!(err.to_string().contains("export"), "{err}");
    assert!(!dir.join("s.bin").exists());
    let tokens = ctx.tokens(0).unwrap().to_vec();
    let err = ctx
        .decode_batch(&[llama_sessions::SequenceTokens::sampled(0, &tokens[..1])])
        .unwrap_err();
    assert!(matches!(err, Error::InvalidParameter { .. }), "{err:?}");
    assert_eq!(ctx.tokens(0).unwrap(), &tokens[..], "nothing changed");
    // A pool needs one sequence per context.
    let err = ContextPool::new(
        model(),
        ContextParams {
            n_seq_max: 2,
            ..params()
        },
        2,
        0,
    )
    .unwrap_err();
    assert!(matches!(err, Error::InvalidParameter { .. }), "{err:?}");
}

#[test]
fn models_whose_memory_is_not_one_kv_cache_are_refused() {
    // Their states hold sections whose stream counts a pool cannot rewrite to a single context's; a manager
    // gives their sessions contexts of their own.
    for name in ["tiny-gemma3", "tiny-lfm2", "tiny-mamba2"] {
        let params = ContextParams {
            n_ctx: 256,
            n_batch: 32,
            ..ContextParams::default()
        };
        let err = ContextPool::new(arch_model(name), params, 2, 0).unwrap_err();
        assert!(
            matches!(err, Error::InvalidParameter { .. }),
            "{name}: {err:?}"
        );
        assert!(err.to_string().contains("memory"), "{err}");
    }
}

#[test]
fn the_pool_may_hold_more_cells_than_the_model_was_trained_on() {
    // Each sequence's n_ctx is bounded by the training context (8192 here), not their sum.
    let params = ContextParams {
        n_ctx: 4096,
        n_batch: 64,
        ..ContextParams::default()
    };
    let pool = ContextPool::new(model(), params, 4, 0).unwrap();
    assert_eq!(pool.params().n_ctx, 4096);
    let err = ContextPool::new(
        model(),
        ContextParams {
            n_ctx: 16384,
            ..ContextParams::default()
        },
        2,
        0,
    )
    .unwrap_err();
    assert!(matches!(err, Error::InvalidParameter { .. }), "{err:?}");
}

#[test]
fn a_panic_on_the_decoder_becomes_an_error_for_every_context() {
    let pool = ContextPool::new(model(), params(), 2, 0).unwrap();
    let mut a = pool.try_context().unwrap().unwrap();
    let mut b = pool.try_context().unwrap().unwrap();
    generate(&mut a, PROMPTS[0], 4);
    let held = a.tokens(0).unwrap().to_vec();
    pool.panic_decoder();
    for ctx in [&mut a, &mut b] {
        let err = ctx
            .generate(0, "More.", greedy(4), &mut NeverInterrupt)
            .unwrap_err();
        assert!(matches!(err, Error::Internal(_)), "{err:?}");
        assert!(err.to_string().contains("decoder thread stopped"), "{err}");
    }
    // What was decoded before stays, exactly: the failed calls cut their sequences back.
    assert_eq!(a.tokens(0).unwrap(), &held[..]);
    assert_eq!(a.llama_cell_count(0).unwrap(), held.len());
    assert_eq!(b.token_count(0).unwrap(), 0);
}
