//! Sessions from Rust alone, on the real model: round trips, verification before trust, sequences, interop.

mod common;

use common::{greedy, model, temp_dir};
use llama_sessions::session_format::LLAMA_CPP_BUILD;
use llama_sessions::{
    inspect_session, Context, ContextParams, Error, KvType, Metadata, NeverInterrupt, ParamValue,
    SessionFormat,
};

const SYSTEM: &str =
    "<|im_start|>system\nYou are a storyteller who writes long, vivid stories.<|im_end|>\n";
const QUESTION: &str =
    "<|im_start|>user\nTell me a story about a dragon and a lighthouse.<|im_end|>\n<|im_start|>assistant\n";

fn small() -> ContextParams {
    ContextParams {
        n_ctx: 512,
        n_batch: 64,
        ..ContextParams::default()
    }
}

fn prepared(params: ContextParams) -> Context {
    let mut ctx = Context::new(model(), params).unwrap();
    ctx.generate(0, SYSTEM, greedy(0), &mut NeverInterrupt)
        .unwrap();
    ctx
}

/// The greedy continuation after QUESTION; never empty, so that comparing two of them proves something.
fn continuation(ctx: &mut Context) -> Vec<i32> {
    let tokens: Vec<i32> = ctx
        .generate(0, QUESTION, greedy(12), &mut NeverInterrupt)
        .unwrap()
        .tokens
        .iter()
        .map(|t| t.0)
        .collect();
    assert!(!tokens.is_empty(), "empty continuation");
    tokens
}

#[test]
fn file_round_trip_continues_identically_for_every_kv_type() {
    let dir = temp_dir("kv");
    for kv in KvType::ALL {
        let params = ContextParams {
            type_k: kv,
            type_v: kv,
            flash_attn: kv != KvType::F16,
            ..small()
        };
        let mut original = prepared(params.clone());
        let path = dir.join(format!("{kv}.session"));
        let info = original
            .save_session(&path, None, &Metadata::new(), None)
            .unwrap();
        assert_eq!(info.token_count(), original.token_count(0).unwrap());
        assert_eq!(info, inspect_session(&path, None).unwrap());
        assert_eq!(
            std::fs::metadata(&path).unwrap().len() as usize,
            info.total_bytes
        );
        let expected = continuation(&mut original);

        let mut fresh = Context::new(model(), params).unwrap();
        fresh.load_session(&path, None, None).unwrap();
        assert_eq!(
            fresh.tokens(0).unwrap(),
            original.tokens(0).unwrap()[..info.token_count()].as_ref()
        );
        assert_eq!(continuation(&mut fresh), expected, "{kv}");
    }
}

#[test]
fn snapshot_restores_after_generation_and_truncate() {
    let mut ctx = prepared(small());
    ctx.generate(0, QUESTION, greedy(8), &mut NeverInterrupt)
        .unwrap();
    ctx.truncate(0, ctx.token_count(0).unwrap() - 3).unwrap();
    let snapshot = ctx.snapshot(None, &Metadata::new(), None).unwrap();
    let tokens = ctx.tokens(0).unwrap().to_vec();
    let expected = continuation(&mut ctx);
    ctx.restore(&snapshot, None, None).unwrap();
    assert_eq!(ctx.tokens(0).unwrap(), tokens.as_slice());
    assert_eq!(continuation(&mut ctx), expected);
}

#[test]
fn write_session_refuses_a_buffer_of_another_size() {
    let ctx = prepared(small());
    let plan = ctx.plan_session(None, &Metadata::new(), false).unwrap();
    let mut short = vec![0; plan.len() - 1];
    assert!(matches!(
        ctx.write_session(&plan, &mut short, None),
        Err(Error::Internal(_))
    ));
    let mut exact = vec![0; plan.len()];
    ctx.write_session(&plan, &mut exact, None).unwrap();
}

#[test]
fn verification_happens_before_llama_cpp_and_leaves_the_context_unchanged() {
    let mut ctx = prepared(small());
    let snapshot = ctx.snapshot(None, &Metadata::new(), None).unwrap();
    ctx.generate(0, QUESTION, greedy(4), &mut NeverInterrupt)
        .unwrap();
    let before = ctx.tokens(0).unwrap().to_vec();
    for cut in [0, 5, 31, 32, 100, snapshot.len() / 2, snapshot.len() - 1] {
        let err = ctx.restore(&snapshot[..cut], None, None).unwrap_err();
        assert!(matches!(err, Error::SessionCorrupt { .. }), "{cut}: {err}");
    }
    for i in (0..snapshot.len()).step_by(997) {
        let mut flipped = snapshot.clone();
        flipped[i] ^= 0x10;
        let err = ctx.restore(&flipped, None, None).unwrap_err();
        assert!(matches!(err, Error::SessionCorrupt { .. }), "{i}: {err}");
    }
    assert_eq!(ctx.tokens(0).unwrap(), before.as_slice());
}

#[test]
fn parameter_mismatches_name_each_parameter() {
    let ctx = prepared(small());
    let snapshot = ctx.snapshot(None, &Metadata::new(), None).unwrap();
    let mut other = Context::new(
        model(),
        ContextParams {
            n_ctx: 256,
            n_batch: 32,
            ..small()
        },
    )
    .unwrap();
    match other.restore(&snapshot, None, None).unwrap_err() {
        Error::SessionParamsMismatch { mismatches, .. } => {
            let names: Vec<_> = mismatches.iter().map(|m| m.name).collect();
            assert_eq!(names, ["n_ctx", "n_batch"]);
            assert_eq!(mismatches[0].saved, ParamValue::Int(512));
            assert_eq!(mismatches[0].current, ParamValue::Int(256));
        }
        e => panic!("{e}"),
    }
    assert_eq!(other.token_count(0).unwrap(), 0);
}

#[test]
fn from_session_uses_the_recorded_parameters() {
    let dir = temp_dir("from");
    let params = ContextParams {
        n_ctx: 768,
        n_batch: 32,
        ..small()
    };
    let mut original = prepared(params.clone());
    let path = dir.join("s.session");
    let mut metadata = Metadata::new();
    metadata.insert("user".into(), "ada".into());
    original.save_session(&path, None, &metadata, None).unwrap();
    let (mut restored, loaded) = Context::from_session(model(), &path, 2, None).unwrap();
    assert_eq!(restored.params().n_ctx, 768);
    assert_eq!(restored.params().n_batch, 32);
    assert_eq!(loaded.info.header.metadata, metadata);
    assert_eq!(continuation(&mut restored), continuation(&mut original));
    let inspected = inspect_session(&path, None).unwrap();
    assert_eq!(inspected, loaded.info);
}

#[test]
fn a_sequence_moves_between_contexts_and_copies_within_one() {
    let params = ContextParams {
        n_seq_max: 3,
        n_ctx: 1536,
        ..small()
    };
    let mut a = Context::new(model(), params.clone()).unwrap();
    a.generate(1, SYSTEM, greedy(0), &mut NeverInterrupt)
        .unwrap();
    let one = a.snapshot(Some(1), &Metadata::new(), None).unwrap();
    a.copy_sequence(1, 2).unwrap();
    assert_eq!(a.tokens(2).unwrap(), a.tokens(1).unwrap());

    let mut b = Context::new(model(), params).unwrap();
    b.restore(&one, Some(0), None).unwrap();
    assert_eq!(b.tokens(0).unwrap(), a.tokens(1).unwrap());
    let seq = |ctx: &mut Context, s| {
        ctx.generate(s, QUESTION, greedy(10), &mut NeverInterrupt)
            .unwrap()
            .tokens
    };
    let from_b = seq(&mut b, 0);
    let from_copy = seq(&mut a, 2);
    let from_original = seq(&mut a, 1);
    assert!(!from_original.is_empty());
    assert_eq!(from_b, from_original);
    assert_eq!(from_copy, from_original);
}

#[test]
fn llama_cpp_files_load_with_a_warning_and_continue_identically() {
    let dir = temp_dir("interop");
    let mut ctx = prepared(small());
    let ours = dir.join("ours.bin");
    let info = ctx.save_llama_cpp_session(&ours).unwrap();
    assert_eq!(info.format, SessionFormat::LlamaCpp);
    let expected = continuation(&mut ctx);

    let mut fresh = Context::new(model(), small()).unwrap();
    let loaded = fresh.load_session(&ours, None, None).unwrap();
    assert_eq!(loaded.warnings.len(), 1);
    assert_eq!(loaded.info.format, SessionFormat::LlamaCpp);
    assert_eq!(continuation(&mut fresh), expected);
}

#[test]
fn the_recorded_llama_cpp_build_is_the_locked_one() {
    let lock =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../Cargo.lock")).unwrap();
    let entry = lock
        .split("[[package]]")
        .find(|p| p.contains("name = \"llama-cpp-sys-2\""))
        .unwrap();
    let version = entry
        .lines()
        .find_map(|l| l.strip_prefix("version = "))
        .unwrap()
        .trim_matches('"');
    assert_eq!(LLAMA_CPP_BUILD, format!("llama-cpp-sys-2 {version}"));
}
