//! Continuous batching: the Engine's turns, decoded together, on the real model.

mod common;

use common::{arch_model, greedy, model};
use llama_sessions::{
    Context, ContextParams, Engine, Error, LlamaToken, NeverInterrupt, SequenceTokens, StopReason,
};

/// 4 sequences of 512 cells, 64 tokens per step.
fn params() -> ContextParams {
    ContextParams {
        n_ctx: 2048,
        n_batch: 64,
        ..ContextParams::default()
    }
}

const STORY: &str = "<|im_start|>user\nTell me a long story about a dragon and a lighthouse.<|im_end|>\n<|im_start|>assistant\n";

/// Prompts that make the model write at length, each a different request.
const PROMPTS: [&str; 4] = [
    STORY,
    "<|im_start|>user\nWrite a long essay about the history of bread.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nDescribe, in detail, a walk through a busy city market.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nExplain at length how a steam engine works.<|im_end|>\n<|im_start|>assistant\n",
];

/// A prompt of more than `n` tokens.
fn long_prompt(n: usize) -> String {
    let mut text = String::from("<|im_start|>user\nRead these notes and summarise them.\n");
    let mut i = 0;
    while model().tokenize(&text, true, true).unwrap().len() < n {
        text.push_str(&format!(
            "Note {i}: the lighthouse keeper counted {} ships passing the northern rocks today.\n",
            i * 7 + 3
        ));
        i += 1;
    }
    text + "<|im_end|>\n<|im_start|>assistant\n"
}

fn prompt_tokens(prompt: &str) -> Vec<LlamaToken> {
    model().tokenize(prompt, true, true).unwrap()
}

#[test]
fn one_turn_generates_exactly_what_a_context_generates() {
    let engine = Engine::new(model(), params(), 4).unwrap();
    let prompt = long_prompt(150);
    let turn = engine.submit(1, &prompt, greedy(24)).unwrap();
    let batched = turn.finish().unwrap();

    // A plain Context with the engine's parameters: the same sequence, chunks and batches.
    let mut ctx = Context::new(model(), engine.params().clone()).unwrap();
    let alone = ctx
        .generate(1, &prompt, greedy(24), &mut NeverInterrupt)
        .unwrap();
    assert!(!alone.tokens.is_empty());
    assert_eq!(batched.tokens, alone.tokens);
    assert_eq!(batched.text, alone.text);
    assert!(!batched.text.is_empty());
    assert_eq!(batched.stop_reason, alone.stop_reason);
    assert_eq!(
        batched.stats.prompt_tokens,
        prompt_tokens(&prompt).len(),
        "every prompt token was read"
    );
    assert_eq!(engine.tokens(1).unwrap(), ctx.tokens(1).unwrap());
    assert_eq!(
        engine.sequence_state(1).unwrap(),
        ctx.sequence_state(1).unwrap()
    );
}

#[test]
fn concurrent_turns_each_hold_what_their_stream_returned() {
    let engine = Engine::new(model(), params(), 4).unwrap();
    let turns: Vec<_> = PROMPTS
        .iter()
        .enumerate()
        .map(|(seq, prompt)| engine.submit(seq as u32, prompt, greedy(16)).unwrap())
        .collect();
    let mut generated = 0;
    for (seq, turn) in turns.into_iter().enumerate() {
        let generation = turn.finish().unwrap();
        assert!(!generation.text.is_empty(), "sequence {seq} wrote nothing");
        assert!(!generation.tokens.is_empty());
        generated += generation.tokens.len();
        let expected = [prompt_tokens(PROMPTS[seq]), generation.tokens].concat();
        assert_eq!(engine.tokens(seq as u32).unwrap(), expected);
    }
    // Decoded together: far fewer steps than tokens (one turn alone takes a step per token).
    let steps = engine.steps().unwrap();
    assert!(
        steps < generated as u64,
        "{steps} steps for {generated} tokens"
    );
}

#[test]
fn a_long_prompt_does_not_hold_back_a_generating_turn() {
    let params = ContextParams {
        n_ctx: 2048,
        n_batch: 128,
        ..ContextParams::default()
    };
    let engine = Engine::new(model(), params, 2).unwrap();
    let mut generating = engine.submit(0, STORY, greedy(96)).unwrap();
    // Once it has a piece it is generating.
    assert!(generating.next_piece().unwrap().is_some());
    let prompt = long_prompt(600);
    let reader = engine.submit(1, &prompt, greedy(4)).unwrap();
    let reader_tokens = prompt_tokens(&prompt).len();
    let reader_steps = {
        let mut reader = reader;
        while reader.next_piece().unwrap().is_some() {}
        reader.prompt_chunks().to_vec()
    };
    while generating.next_piece().unwrap().is_some() {}
    assert_eq!(generating.stop_reason(), Some(StopReason::MaxTokens));

    // The prompt was read in chunks that left room for the other turn's token, ...
    assert_eq!(
        reader_steps.iter().map(|&(_, n)| n).sum::<usize>(),
        reader_tokens
    );
    assert!(reader_steps.len() >= reader_tokens.div_ceil(127));
    assert!(reader_steps.iter().all(|&(_, n)| n <= 127));
    // ... and the generating turn got a token in every one of those steps.
    for (step, _) in &reader_steps {
        assert!(
            generating.token_steps().contains(step),
            "no token in step {step}: {:?} vs {:?}",
            generating.token_steps(),
            reader_steps
        );
    }
}

#[test]
fn dropping_a_stream_cancels_only_its_turn() {
    let engine = Engine::new(model(), params(), 4).unwrap();
    let mut cancelled = engine.submit(0, PROMPTS[0], greedy(400)).unwrap();
    let mut other = engine.submit(1, PROMPTS[1], greedy(32)).unwrap();
    assert!(cancelled.next_piece().unwrap().is_some());
    let streamed = cancelled.tokens().to_vec();
    drop(cancelled);
    // The sequence is free at once: a new turn on it is accepted.
    let next = engine.submit(0, "\nMore.", greedy(2)).unwrap();
    let held = engine.tokens(0).unwrap();
    let prompt = prompt_tokens(PROMPTS[0]);
    assert!(held.starts_with(&[prompt.as_slice(), &streamed].concat()));
    assert!(
        held.len() < prompt.len() + 400,
        "the cancelled turn ran to its end"
    );
    while other.next_piece().unwrap().is_some() {}
    assert_eq!(other.stop_reason(), Some(StopReason::MaxTokens));
    assert_eq!(other.tokens().len(), 32);
    assert_eq!(
        engine.tokens(1).unwrap(),
        [prompt_tokens(PROMPTS[1]), other.tokens().to_vec()].concat()
    );
    next.finish().unwrap();
}

#[test]
fn a_state_saved_under_batching_continues_exactly_in_a_plain_context() {
    let engine = Engine::new(model(), params(), 4).unwrap();
    let turns: Vec<_> = (0..3)
        .map(|seq| {
            engine
                .submit(seq, PROMPTS[seq as usize], greedy(20))
                .unwrap()
        })
        .collect();
    for turn in turns {
        assert!(!turn.finish().unwrap().tokens.is_empty());
    }
    let snapshot = engine.snapshot(2, Default::default(), None).unwrap();
    let saved = engine.tokens(2).unwrap();
    let mut plain = Context::new(model(), engine.params().clone()).unwrap();
    plain.restore(&snapshot, Some(2), None).unwrap();
    assert_eq!(plain.tokens(2).unwrap(), engine.tokens(2).unwrap());
    assert_eq!(
        plain.sequence_state(2).unwrap(),
        engine.sequence_state(2).unwrap()
    );

    let follow_up = "<|im_end|>\n<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\n";
    let in_plain = plain
        .generate(2, follow_up, greedy(16), &mut NeverInterrupt)
        .unwrap();
    let in_engine = engine
        .submit(2, follow_up, greedy(16))
        .unwrap()
        .finish()
        .unwrap();
    assert!(!in_plain.tokens.is_empty());
    assert_eq!(in_engine.tokens, in_plain.tokens);
    assert_eq!(
        engine.sequence_state(2).unwrap(),
        plain.sequence_state(2).unwrap()
    );

    // The snapshot restored into another of the engine's sequences is the sequence it was taken of.
    engine.restore(3, snapshot, None).unwrap();
    assert_eq!(engine.tokens(3).unwrap(), saved);
}

#[test]
fn a_turn_that_cannot_fit_is_refused_before_anything_changes() {
    let params = ContextParams {
        n_ctx: 1024,
        n_batch: 64,
        ..ContextParams::default()
    };
    let engine = Engine::new(model(), params, 4).unwrap();
    assert_eq!(engine.capacity(), 256);
    let prompt = long_prompt(300);
    let n = prompt_tokens(&prompt).len();
    let refused = engine.submit(0, &prompt, greedy(4)).unwrap_err();
    assert!(
        matches!(
            refused,
            Error::ContextFull {
                requested,
                available: 256,
                held: 0,
                capacity: 256,
                n_seq_max: 4,
            } if requested == n
        ),
        "{refused:?}"
    );
    assert!(engine.tokens(0).unwrap().is_empty());

    // A turn that fills its sequence ends with ContextFull, holding every cell's token.
    let fitting = long_prompt(240);
    let turn = engine.submit(0, &fitting, greedy(64)).unwrap();
    // While it runs the sequence is busy.
    let busy = engine.submit(0, "more", greedy(1)).unwrap_err();
    assert!(
        matches!(busy, Error::InvalidParameter { name: "seq", .. }),
        "{busy:?}"
    );
    let generation = turn.finish().unwrap();
    assert_eq!(generation.stop_reason, StopReason::ContextFull);
    assert_eq!(engine.tokens(0).unwrap().len(), 256);
}

#[test]
fn a_panic_on_the_scheduler_becomes_an_error_for_every_caller() {
    let engine = Engine::new(model(), params(), 4).unwrap();
    let mut turn = engine.submit(0, STORY, greedy(400)).unwrap();
    assert!(turn.next_piece().unwrap().is_some());
    engine.panic_scheduler();
    let failure = loop {
        match turn.next_piece() {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the turn ended normally"),
            Err(e) => break e,
        }
    };
    assert!(
        matches!(&failure, Error::Internal(m) if m.contains("panicked")),
        "{failure:?}"
    );
    let later = engine.tokens(0).unwrap_err();
    assert!(
        matches!(&later, Error::Internal(m) if m.contains("panicked")),
        "{later:?}"
    );
}

#[test]
fn decode_batch_checks_every_part_before_decoding() {
    let mut ctx = Context::new(
        model(),
        ContextParams {
            n_ctx: 1024,
            n_batch: 64,
            n_seq_max: 4,
            ..ContextParams::default()
        },
    )
    .unwrap();
    let a = prompt_tokens(PROMPTS[0]);
    let b = prompt_tokens(PROMPTS[1]);
    let part = |seq, tokens| SequenceTokens {
        want_logits: true,
        ..SequenceTokens::sampled(seq, tokens)
    };
    let twice = ctx.decode_batch(&[part(0, &a), part(0, &b)]).unwrap_err();
    assert!(matches!(
        twice,
        Error::InvalidParameter { name: "parts", .. }
    ));
    let long = vec![a[0]; 65];
    let too_many = ctx.decode_batch(&[part(1, &long)]).unwrap_err();
    assert!(matches!(
        too_many,
        Error::InvalidParameter { name: "parts", .. }
    ));
    // Sequence 2 one token short of room for `b`.
    let held = ctx.capacity() - b.len() + 1;
    for chunk in vec![a[1]; held].chunks(64) {
        ctx.append(2, chunk, false, &mut NeverInterrupt).unwrap();
    }
    let over = ctx.decode_batch(&[part(0, &a), part(2, &b)]).unwrap_err();
    assert!(
        matches!(over, Error::ContextFull { requested, held: h, .. } if requested == b.len() && h == held),
        "{over:?}"
    );
    assert_eq!(ctx.token_count(0).unwrap(), 0, "nothing was decoded");

    // Two prompts in one call hold what each decoded alone holds.
    ctx.decode_batch(&[part(1, &b), part(0, &a)]).unwrap();
    assert_eq!(ctx.tokens(0).unwrap(), a.as_slice());
    assert_eq!(ctx.tokens(1).unwrap(), b.as_slice());
}

/// The other memories llama.cpp runs (sliding window, hybrid, recurrent: the recurrent ones take state
/// checkpoints at the prompt's edges) through the engine: one turn is exactly a plain Context's, and turns
/// decoded together hold what their streams returned.
#[test]
fn every_memory_kind_batches_exactly() {
    for name in ["tiny-gemma3", "tiny-lfm2", "tiny-mamba2"] {
        let model = arch_model(name);
        let params = ContextParams {
            n_ctx: 1024,
            n_batch: 32,
            // The models are tiny; one thread keeps llama.cpp's threads from waiting on each other.
            n_threads: 1,
            ..ContextParams::default()
        };
        let engine = Engine::new(model, params, 4).unwrap();
        let prompts = [long_prompt(40), long_prompt(70)];
        let alone = engine
            .submit(0, &prompts[0], greedy(8))
            .unwrap()
            .finish()
            .unwrap();
        let mut ctx = Context::new(model, engine.params().clone()).unwrap();
        let expected = ctx
            .generate(0, &prompts[0], greedy(8), &mut NeverInterrupt)
            .unwrap();
        assert!(!expected.tokens.is_empty(), "{name}");
        assert_eq!(alone.tokens, expected.tokens, "{name}");
        assert_eq!(
            engine.sequence_state(0).unwrap(),
            ctx.sequence_state(0).unwrap(),
            "{name}"
        );

        let turns: Vec<_> = [1, 2]
            .into_iter()
            .zip(&prompts)
            .map(|(seq, prompt)| engine.submit(seq, prompt, greedy(8)).unwrap())
            .collect();
        for (seq, turn) in [1, 2].into_iter().zip(turns) {
            let generation = turn.finish().unwrap();
            assert!(!generation.tokens.is_empty(), "{name}");
            let prompt = model
                .tokenize(&prompts[seq as usize - 1], true, true)
                .unwrap();
            assert_eq!(
                engine.tokens(seq).unwrap(),
                [prompt, generation.tokens].concat(),
                "{name}"
            );
        }
        // A state saved under batching loads into a plain Context.
        let snapshot = engine.snapshot(2, Default::default(), None).unwrap();
        ctx.restore(&snapshot, Some(2), None).unwrap();
        assert_eq!(
            ctx.sequence_state(2).unwrap(),
            engine.sequence_state(2).unwrap(),
            "{name}"
        );
    }
}
