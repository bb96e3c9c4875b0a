//! The Context's bookkeeping, driven from Rust alone, on the real model.

mod common;

use common::{greedy, model};
use llama_sessions::{Context, ContextParams, Error, KvType, LlamaToken, NeverInterrupt};

fn small() -> ContextParams {
    ContextParams {
        n_ctx: 512,
        n_batch: 64,
        ..ContextParams::default()
    }
}

const SYSTEM: &str =
    "<|im_start|>system\nYou are a storyteller who writes long, vivid stories.<|im_end|>\n";
const QUESTION: &str =
    "<|im_start|>user\nTell me a long story about a dragon and a lighthouse.<|im_end|>\n<|im_start|>assistant\n";

/// Two generated token lists are the same, and not empty: empty ones agree whatever the KV cache holds.
#[track_caller]
fn assert_same_tokens(actual: &[LlamaToken], expected: &[LlamaToken]) {
    assert!(!expected.is_empty(), "the expected generation is empty");
    assert_eq!(actual, expected);
}

#[test]
fn greedy_generation_is_deterministic_across_contexts() {
    let mut a = Context::new(model(), small()).unwrap();
    let mut b = Context::new(model(), small()).unwrap();
    let ga = a
        .generate(0, QUESTION, greedy(12), &mut NeverInterrupt)
        .unwrap();
    let gb = b
        .generate(0, QUESTION, greedy(12), &mut NeverInterrupt)
        .unwrap();
    assert_eq!(ga.tokens.len(), 12);
    assert_same_tokens(&gb.tokens, &ga.tokens);
    assert_eq!(ga.text, gb.text);
}

#[test]
fn two_calls_continue_exactly_like_one() {
    let m = model();
    let whole = [
        m.tokenize(SYSTEM, true, true).unwrap(),
        m.tokenize(QUESTION, false, true).unwrap(),
    ]
    .concat();
    // Prompt A then B in two calls...
    let mut split = Context::new(m, small()).unwrap();
    split
        .generate(0, SYSTEM, greedy(0), &mut NeverInterrupt)
        .unwrap();
    assert_eq!(
        split.tokens(0).unwrap(),
        m.tokenize(SYSTEM, true, true).unwrap().as_slice()
    );
    let from_split = split
        .generate(0, QUESTION, greedy(10), &mut NeverInterrupt)
        .unwrap();
    // ...against the same tokens decoded in one call.
    let mut one = Context::new(m, small()).unwrap();
    // With the logits of its last token, as generate() asks for them: dropping them here would make the
    // next call decode that token again alone, a different computation whose float rounding may differ on
    // some CPUs (it does with AVX2's kernels) and tip a greedy choice.
    one.append(0, &whole, true, &mut NeverInterrupt).unwrap();
    let from_one = one
        .generate(0, "", greedy(10), &mut NeverInterrupt)
        .unwrap();
    assert_same_tokens(&from_split.tokens, &from_one.tokens);
    assert_eq!(split.tokens(0).unwrap(), one.tokens(0).unwrap());
    assert_eq!(split.token_count(0).unwrap(), whole.len() + 10);
}

#[test]
fn truncate_then_generate_reproduces_the_continuation() {
    let mut ctx = Context::new(model(), small()).unwrap();
    ctx.generate(0, SYSTEM, greedy(0), &mut NeverInterrupt)
        .unwrap();
    let k = ctx.token_count(0).unwrap();
    let first = ctx
        .generate(0, QUESTION, greedy(8), &mut NeverInterrupt)
        .unwrap();
    let all: Vec<LlamaToken> = ctx.tokens(0).unwrap().to_vec();
    for keep in [k + 3, k] {
        ctx.truncate(0, keep).unwrap();
        assert_eq!(ctx.token_count(0).unwrap(), keep);
        assert_eq!(ctx.tokens(0).unwrap(), &all[..keep]);
    }
    let again = ctx
        .generate(0, QUESTION, greedy(8), &mut NeverInterrupt)
        .unwrap();
    assert_same_tokens(&again.tokens, &first.tokens);
    assert_eq!(ctx.tokens(0).unwrap(), all.as_slice());
}

#[test]
fn a_prompt_that_does_not_fit_changes_nothing() {
    let mut ctx = Context::new(
        model(),
        ContextParams {
            n_ctx: 32,
            ..small()
        },
    )
    .unwrap();
    ctx.generate(0, "Hello there.", greedy(0), &mut NeverInterrupt)
        .unwrap();
    let before = ctx.tokens(0).unwrap().to_vec();
    // llama.cpp rounds n_ctx up (to 256 here); the context reports what it really holds.
    assert_eq!(ctx.capacity(), 256);
    let long = "word ".repeat(ctx.capacity());
    match ctx.generate(0, &long, greedy(4), &mut NeverInterrupt) {
        Err(Error::ContextFull { held, capacity, .. }) => {
            assert_eq!(held, before.len());
            assert_eq!(capacity, 256);
        }
        other => panic!("expected ContextFull, got {other:?}"),
    }
    assert_eq!(ctx.tokens(0).unwrap(), before.as_slice());
    // The KV cache is untouched too: the context continues like one that never saw the long prompt.
    let after = ctx
        .generate(0, " How", greedy(2), &mut NeverInterrupt)
        .unwrap();
    let mut fresh = Context::new(model(), ctx.params().clone()).unwrap();
    fresh
        .generate(0, "Hello there.", greedy(0), &mut NeverInterrupt)
        .unwrap();
    let expected = fresh
        .generate(0, " How", greedy(2), &mut NeverInterrupt)
        .unwrap();
    assert_eq!(expected.tokens.len(), 2);
    assert_same_tokens(&after.tokens, &expected.tokens);
    assert_eq!(ctx.tokens(0).unwrap(), fresh.tokens(0).unwrap());
}

#[test]
fn out_of_vocabulary_tokens_are_refused_before_llama_cpp_sees_them() {
    let mut ctx = Context::new(model(), small()).unwrap();
    let bad = LlamaToken(i32::try_from(model().n_vocab()).unwrap());
    assert!(matches!(
        ctx.append(0, &[bad], false, &mut NeverInterrupt),
        Err(Error::Tokenize(_))
    ));
    assert!(matches!(
        model().detokenize(&[LlamaToken(-1)], false),
        Err(Error::Tokenize(_))
    ));
    assert_eq!(ctx.token_count(0).unwrap(), 0);
}

#[test]
fn invalid_parameters_name_the_parameter() {
    let cases: Vec<(ContextParams, &str)> = vec![
        (
            ContextParams {
                n_ctx: 0,
                ..small()
            },
            "n_ctx",
        ),
        (
            ContextParams {
                n_ctx: model().n_ctx_train() + 1,
                ..small()
            },
            "n_ctx",
        ),
        (
            ContextParams {
                n_batch: 0,
                ..small()
            },
            "n_batch",
        ),
        (
            ContextParams {
                type_v: KvType::Q8_0,
                flash_attn: false,
                ..small()
            },
            "type_v",
        ),
        (
            ContextParams {
                n_seq_max: 0,
                ..small()
            },
            "n_seq_max",
        ),
    ];
    for (params, expected) in cases {
        match Context::new(model(), params) {
            Err(Error::InvalidParameter { name, .. }) => assert_eq!(name, expected),
            other => panic!("expected InvalidParameter({expected}), got {other:?}"),
        }
    }
}

#[test]
fn quantized_caches_generate() {
    for kv in [KvType::Q8_0, KvType::Q4_0] {
        let params = ContextParams {
            type_k: kv,
            type_v: kv,
            flash_attn: true,
            ..small()
        };
        let mut ctx = Context::new(model(), params).unwrap();
        let g = ctx
            .generate(0, QUESTION, greedy(4), &mut NeverInterrupt)
            .unwrap();
        assert_eq!(g.tokens.len(), 4);
    }
}

#[test]
fn an_interrupt_keeps_what_was_decoded() {
    let mut ctx = Context::new(
        model(),
        ContextParams {
            n_batch: 8,
            ..small()
        },
    )
    .unwrap();
    let prompt =
        "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen \
                  sixteen seventeen eighteen nineteen twenty";
    let n = model().tokenize(prompt, true, true).unwrap().len();
    assert!(n > 16);
    let mut calls = 0;
    let mut stop_after_two_chunks = || {
        calls += 1;
        calls > 2
    };
    let result = ctx.generate(0, prompt, greedy(4), &mut stop_after_two_chunks);
    assert!(matches!(result, Err(Error::Interrupted)));
    assert_eq!(ctx.token_count(0).unwrap(), 16);
    let expected = model().tokenize(prompt, true, true).unwrap();
    assert_eq!(ctx.tokens(0).unwrap(), &expected[..16]);
}

#[test]
fn stop_strings_end_the_generation_and_are_not_returned() {
    let mut ctx = Context::new(model(), small()).unwrap();
    let free = ctx
        .generate(0, QUESTION, greedy(12), &mut NeverInterrupt)
        .unwrap();
    let stop: String = free.text.chars().skip(3).take(3).collect();
    assert!(!stop.is_empty());
    ctx.reset();
    let mut options = greedy(12);
    options.stop = vec![stop.clone()];
    let stopped = ctx
        .generate(0, QUESTION, options, &mut NeverInterrupt)
        .unwrap();
    assert_eq!(stopped.stop_reason, llama_sessions::StopReason::StopString);
    let before_stop = &free.text[..free.text.find(&stop).unwrap()];
    assert!(
        !before_stop.is_empty(),
        "{:?} starts with {stop:?}",
        free.text
    );
    assert_eq!(stopped.text, before_stop);
}
