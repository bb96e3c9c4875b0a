//! The state path against hostile bytes, on the real model: llama.cpp's per-sequence state is parsed against
//! the context's layout before llama.cpp sees it, forged cell records are refused with the context unchanged,
//! lengths a file announces never size an allocation, and signed sessions load with their key only.

mod common;

use common::{greedy, model, temp_dir};
use llama_sessions::llama_state::{check_sequence_state, Expected};
use llama_sessions::session_format::{self, open};
use llama_sessions::{
    Context, ContextParams, ContextPool, Error, KvType, Metadata, NeverInterrupt, SessionKey,
};

const PROMPT: &str = "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n";
const MORE: &str = "<|im_start|>user\nAnd three animals?<|im_end|>\n<|im_start|>assistant\n";

fn params(kv: KvType, flash_attn: bool, n_seq_max: u32) -> ContextParams {
    ContextParams {
        n_ctx: 256 * n_seq_max,
        n_batch: 64,
        type_k: kv,
        type_v: if flash_attn { kv } else { KvType::F16 },
        flash_attn,
        n_seq_max,
        ..ContextParams::default()
    }
}

fn tokens(generation: llama_sessions::Generation) -> Vec<i32> {
    generation.tokens.iter().map(|t| t.0).collect()
}

/// A context holding `PROMPT` plus a short answer in sequence `seq`.
fn prepared(p: ContextParams, seq: u32) -> Context {
    prepare(Context::new(model(), p).unwrap(), seq)
}

/// `ctx` after reading PROMPT and answering in sequence `seq`.
fn prepare(mut ctx: Context, seq: u32) -> Context {
    let answer = ctx
        .generate(seq, PROMPT, greedy(4), &mut NeverInterrupt)
        .unwrap();
    assert!(!answer.tokens.is_empty());
    ctx
}

#[test]
fn the_computed_layout_is_the_one_llama_cpp_writes() {
    let cases = [
        (KvType::F16, false, 1),
        (KvType::F16, true, 1),
        (KvType::Q8_0, true, 1),
        (KvType::Q4_0, true, 1),
        (KvType::Q8_0, false, 1),
        (KvType::F16, false, 3),
    ];
    for (kv, flash, n_seq) in cases {
        let seq = n_seq - 1;
        let ctx = prepared(params(kv, flash, n_seq), seq);
        let snapshot = ctx.snapshot(Some(seq), &Metadata::new(), None).unwrap();
        let opened = open(&snapshot, "t").unwrap();
        let state = &snapshot[opened.state_ranges[0].clone()];
        let expected = Expected {
            saved_seq: seq,
            token_count: ctx.token_count(seq).unwrap(),
        };
        let layout = ctx.state_layout().unwrap();
        check_sequence_state(state, layout, expected)
            .unwrap_or_else(|e| panic!("{kv} flash={flash} n_seq={n_seq}: {e}"));
        assert_eq!(layout.v_trans, !flash);
        assert_eq!(layout.n_stream, n_seq);
    }
}

/// Where cell `i`'s record starts inside a one-sequence snapshot whose sequence is in stream `stream`: magic, sequence id, stream count, the counts of the streams before it,
/// its own count, then 12 bytes per cell.
fn cell_at(state_start: usize, stream: usize, i: usize) -> usize {
    state_start + 12 + 4 * (stream + 1) + 12 * i
}

/// Rewrites the checksum after an edit, as an attacker who can write the file would.
fn reseal(bytes: &mut [u8]) {
    let body = bytes.len() - session_format::CHECKSUM_LEN;
    let checksum = xxhash_rust::xxh3::xxh3_128(&bytes[..body]);
    bytes[body..].copy_from_slice(&checksum.to_le_bytes());
}

/// An edit of session bytes.
type Forgery = Box<dyn Fn(&mut Vec<u8>)>;

fn put_i32(bytes: &mut [u8], at: usize, value: i32) {
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
}

#[test]
fn forged_cell_records_are_refused_and_change_nothing() {
    let source = prepared(params(KvType::F16, false, 1), 0);
    let snapshot = source.snapshot(None, &Metadata::new(), None).unwrap();
    let start = open(&snapshot, "t").unwrap().state_ranges[0].start;
    let n = source.token_count(0).unwrap();
    let forgeries: Vec<(&str, Forgery)> = vec![
        (
            "a cell at position -5",
            Box::new(move |b| put_i32(b, cell_at(start, 0, 0), -5)),
        ),
        (
            "cells out of order",
            Box::new(move |b| {
                put_i32(b, cell_at(start, 0, 1), 2);
                put_i32(b, cell_at(start, 0, 2), 1);
            }),
        ),
        (
            "a cell past the token count",
            Box::new(move |b| put_i32(b, cell_at(start, 0, n - 1), n as i32 + 100)),
        ),
        (
            "a cell with two sequence ids",
            Box::new(move |b| put_i32(b, cell_at(start, 0, 3) + 4, 2)),
        ),
        (
            "a cell of another sequence",
            Box::new(move |b| put_i32(b, cell_at(start, 0, 3) + 8, 7)),
        ),
        (
            "another cell count",
            Box::new(move |b| put_i32(b, start + 12, n as i32 - 1)),
        ),
    ];
    // Each forgery is handed to a context of its own and to a pooled one (a sequence of a shared context,
    // whose restore rewrites the checked bytes for the pool).
    let pool = ContextPool::new(model(), params(KvType::F16, false, 1), 2, 0).unwrap();
    let targets = forgeries.iter().flat_map(|(what, forge)| {
        [
            (*what, forge, prepared(params(KvType::F16, false, 1), 0)),
            (
                *what,
                forge,
                prepare(pool.try_context().unwrap().unwrap(), 0),
            ),
        ]
    });
    for (what, forge, mut target) in targets {
        let before = target.tokens(0).unwrap().to_vec();
        let mut forged = snapshot.clone();
        forge(&mut forged);
        reseal(&mut forged);
        match target.restore(&forged, None, None) {
            Err(Error::SessionCorrupt { reason, .. }) => {
                assert!(
                    reason.starts_with("llama.cpp's state of sequence 0: "),
                    "{what}: {reason}"
                )
            }
            other => panic!("{what}: expected SessionCorrupt, got {other:?}"),
        }
        assert_eq!(target.tokens(0).unwrap(), before.as_slice(), "{what}");
        assert_eq!(target.llama_cell_count(0).unwrap(), before.len(), "{what}");
        // The cache still answers as an untouched twin does.
        let mut twin = prepared(params(KvType::F16, false, 1), 0);
        let answer = tokens(
            target
                .generate(0, MORE, greedy(6), &mut NeverInterrupt)
                .unwrap(),
        );
        assert!(!answer.is_empty());
        assert_eq!(
            answer,
            tokens(
                twin.generate(0, MORE, greedy(6), &mut NeverInterrupt)
                    .unwrap()
            ),
            "{what}"
        );
    }
}

#[test]
fn a_restore_into_one_sequence_that_fails_leaves_the_others_alone() {
    let p = params(KvType::F16, false, 2);
    let source = prepared(p.clone(), 1);
    let snapshot = source.snapshot(Some(1), &Metadata::new(), None).unwrap();
    let start = open(&snapshot, "t").unwrap().state_ranges[0].start;
    let mut forged = snapshot.clone();
    put_i32(&mut forged, cell_at(start, 1, 0), -5);
    reseal(&mut forged);
    let mut target = prepared(p, 0);
    target
        .generate(
            1,
            "Other text in sequence one.",
            greedy(0),
            &mut NeverInterrupt,
        )
        .unwrap();
    let held: Vec<_> = (0..2).map(|s| target.tokens(s).unwrap().to_vec()).collect();
    assert!(matches!(
        target.restore(&forged, Some(1), None),
        Err(Error::SessionCorrupt { .. })
    ));
    for (s, before) in held.iter().enumerate() {
        assert_eq!(target.tokens(s as u32).unwrap(), before.as_slice());
    }
    // The untouched snapshot restores into sequence 1 and sequence 0 is still there.
    target.restore(&snapshot, Some(1), None).unwrap();
    assert_eq!(target.tokens(0).unwrap(), held[0].as_slice());
    assert_eq!(target.tokens(1).unwrap(), source.tokens(1).unwrap());
}

#[test]
fn an_interrupt_while_the_last_token_is_decoded_again_keeps_it() {
    let mut ctx = Context::new(model(), params(KvType::F16, false, 1)).unwrap();
    ctx.generate(0, PROMPT, greedy(0), &mut NeverInterrupt)
        .unwrap();
    let held = ctx.tokens(0).unwrap().to_vec();
    // Encoding only keeps no logits, so the next generation decodes the last token again first.
    let mut always = || true;
    let result = ctx.generate(0, "", greedy(4), &mut always);
    assert!(
        matches!(result, Err(Error::Interrupted) | Ok(_)),
        "{result:?}"
    );
    assert_eq!(ctx.tokens(0).unwrap(), held.as_slice());
}

#[test]
fn thread_counts_and_penalty_windows_are_bounded() {
    let err = Context::new(
        model(),
        ContextParams {
            n_threads: 10_000_000,
            ..params(KvType::F16, false, 1)
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidParameter {
                name: "n_threads",
                ..
            }
        ),
        "{err}"
    );
    let mut ctx = Context::new(model(), params(KvType::F16, false, 1)).unwrap();
    let mut options = greedy(2);
    options.sampling.repeat_penalty = 1.1;
    options.sampling.repeat_last_n = u32::MAX / 2;
    let err = ctx
        .generate(0, PROMPT, options, &mut NeverInterrupt)
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidParameter {
                name: "repeat_last_n",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(ctx.token_count(0).unwrap(), 0);
}

#[test]
fn signed_sessions_round_trip_with_their_key_only() {
    let dir = temp_dir("signed");
    let key = SessionKey::new(b"a secret of at least sixteen bytes").unwrap();
    let other = SessionKey::new(b"another secret, also long enough").unwrap();
    let mut source = prepared(params(KvType::F16, false, 1), 0);
    let path = dir.join("signed.session");
    let info = source
        .save_session(&path, None, &Metadata::new(), Some(&key))
        .unwrap();
    assert!(info.signed);
    let expected = tokens(
        source
            .generate(0, MORE, greedy(6), &mut NeverInterrupt)
            .unwrap(),
    );
    assert!(!expected.is_empty());

    let mut fresh = Context::new(model(), params(KvType::F16, false, 1)).unwrap();
    fresh.load_session(&path, None, Some(&key)).unwrap();
    assert_eq!(
        tokens(
            fresh
                .generate(0, MORE, greedy(6), &mut NeverInterrupt)
                .unwrap()
        ),
        expected
    );
    let mut target = Context::new(model(), params(KvType::F16, false, 1)).unwrap();
    for attempt in [None, Some(&other)] {
        assert!(matches!(
            target.load_session(&path, None, attempt),
            Err(Error::SessionSignature { .. })
        ));
        assert_eq!(target.token_count(0).unwrap(), 0);
    }
    // An unsigned session with a key, and snapshots the same way.
    let unsigned = source.snapshot(None, &Metadata::new(), None).unwrap();
    assert!(matches!(
        target.restore(&unsigned, None, Some(&key)),
        Err(Error::SessionSignature { .. })
    ));
    let signed = source.snapshot(None, &Metadata::new(), Some(&key)).unwrap();
    target.restore(&signed, None, Some(&key)).unwrap();
    assert_eq!(target.tokens(0).unwrap(), source.tokens(0).unwrap());
    let (ctx, loaded) = Context::from_session(model(), &path, 2, Some(&key)).unwrap();
    assert!(loaded.info.signed);
    assert!(ctx.token_count(0).unwrap() > 0);
    assert!(llama_sessions::inspect_session(&path, None).unwrap().signed);
    std::fs::remove_dir_all(&dir).unwrap();
}
