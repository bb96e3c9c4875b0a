//! Every memory kind llama.cpp runs, on tiny random-weight models built here (tests/common/arch_models.rs):
//! plain attention (llama), sliding window (gemma3, window 16), hybrid (lfm2) and recurrent (mamba2). States
//! round-trip exactly through files, snapshots and sequence copies; hostile states are refused before
//! llama.cpp sees them; truncate and prefix reuse stay exact where the memory cannot be cut back.

#[allow(dead_code)]
mod common;

use common::arch_models::GEMMA3_N_SWA;
use common::{arch_model, greedy, temp_dir};
use llama_sessions::llama_state::{check_memory_state, Expected, MemoryLayout};
use llama_sessions::session_format::{self, open};
use llama_sessions::{
    Context, ContextParams, Error, KvType, MemoryKind, Metadata, Model, NeverInterrupt,
};

/// Each test model and its memory kind.
const MODELS: [(&str, MemoryKind); 4] = [
    ("tiny-llama", MemoryKind::Attention),
    ("tiny-gemma3", MemoryKind::SlidingWindow),
    ("tiny-lfm2", MemoryKind::Hybrid),
    ("tiny-mamba2", MemoryKind::Recurrent),
];

/// About 90 tokens: several times gemma3's window of 16.
const LONG_PROMPT: &str = "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting \
    the steps as his father had, and lit the great lamp that swept across the bay. Ships passed in the \
    night, their lanterns swaying, and the keeper wrote each one into his logbook with the hour, the \
    wind and the colour of the sea. One winter a dragon came out of the fog";
const MORE: &str = " and then the keeper said";

// Every field is set today; the update keeps this compiling when ContextParams gains one.
#[allow(clippy::needless_update)]
fn params(n_seq_max: u32, kv: KvType) -> ContextParams {
    ContextParams {
        n_ctx: 256 * n_seq_max,
        n_batch: 32,
        type_k: kv,
        type_v: kv,
        flash_attn: kv != KvType::F16,
        n_seq_max,
        // One thread: the models are tiny, and on a busy machine llama.cpp's threads wait on each other for
        // seconds.
        n_threads: 1,
        ..ContextParams::default()
    }
}

/// The KV types each model is tested with: every one where there is a KV cache.
fn kv_types(kind: MemoryKind) -> Vec<KvType> {
    if kind == MemoryKind::Recurrent {
        vec![KvType::F16]
    } else {
        KvType::ALL.to_vec()
    }
}

fn generated(ctx: &mut Context, seq: u32, prompt: &str, n: usize) -> Vec<i32> {
    let tokens: Vec<i32> = ctx
        .generate(seq, prompt, greedy(n), &mut NeverInterrupt)
        .unwrap()
        .tokens
        .iter()
        .map(|t| t.0)
        .collect();
    assert!(!tokens.is_empty(), "empty generation");
    tokens
}

/// A context that decoded `LONG_PROMPT` and generated after it, in sequence `seq`.
fn prepared(model: &Model, p: ContextParams, seq: u32) -> Context {
    let mut ctx = Context::new(model, p).unwrap();
    generated(&mut ctx, seq, LONG_PROMPT, 6);
    ctx
}

#[test]
fn each_model_reports_its_memory_kind() {
    for (name, kind) in MODELS {
        let model = arch_model(name);
        assert_eq!(model.memory_kind(), kind, "{name}");
        assert_eq!(
            model.memory_kind().partial_truncation(),
            matches!(kind, MemoryKind::Attention | MemoryKind::SlidingWindow)
        );
        let n_swa = if kind == MemoryKind::SlidingWindow {
            GEMMA3_N_SWA
        } else {
            0
        };
        assert_eq!(model.n_swa(), n_swa, "{name}");
        let ctx = Context::new(model, params(1, KvType::F16)).unwrap();
        assert_eq!(ctx.memory_layout().unwrap().kind(), kind.as_str());
        assert_eq!(
            ctx.token_count(0).unwrap(),
            0,
            "the layout probe left nothing behind"
        );
        assert_eq!(ctx.llama_cell_count(0).unwrap(), 0);
        assert!(ctx.kv_cache_bytes() > 0, "{name}");
    }
}

#[test]
fn the_memory_is_used_by_every_model() {
    // Two prompts that end alike continue differently: the memory of what came before matters, so a state
    // lost in a round trip would show in the continuation.
    for (name, _) in MODELS {
        let model = arch_model(name);
        let mut a = Context::new(model, params(1, KvType::F16)).unwrap();
        let mut b = Context::new(model, params(1, KvType::F16)).unwrap();
        let first = generated(&mut a, 0, "A dragon came out of the fog and", 6);
        let second = generated(&mut b, 0, "The keeper counted the stairs and", 6);
        assert_ne!(first, second, "{name}");
    }
}

#[test]
fn real_states_match_the_learnt_layout_section_by_section() {
    for (name, kind) in MODELS {
        let model = arch_model(name);
        for kv in kv_types(kind) {
            let ctx = prepared(model, params(2, kv), 1);
            let snapshot = ctx.snapshot(Some(1), &Metadata::new(), None).unwrap();
            let opened = open(&snapshot, "t").unwrap();
            let state = &snapshot[opened.state_ranges[0].clone()];
            let n = ctx.token_count(1).unwrap();
            assert!(
                n > 4 * GEMMA3_N_SWA as usize,
                "the prompt must go far past the window"
            );
            let layout = ctx.memory_layout().unwrap();
            let expected = Expected {
                saved_seq: 1,
                token_count: n,
            };
            check_memory_state(state, layout, expected)
                .unwrap_or_else(|e| panic!("{name} {kv}: {e}"));
            // The same state announced with one token more or less is refused.
            for token_count in [n - 1, n + 1] {
                let other = Expected {
                    saved_seq: 1,
                    token_count,
                };
                assert!(check_memory_state(state, layout, other).is_err(), "{name}");
            }
            match (kind, layout) {
                (MemoryKind::SlidingWindow, MemoryLayout::SlidingWindow { base, swa, n_swa }) => {
                    assert_eq!((base.layers.len(), swa.layers.len()), (1, 1));
                    assert_eq!(*n_swa, GEMMA3_N_SWA as usize);
                }
                (
                    MemoryKind::Hybrid,
                    MemoryLayout::Hybrid {
                        attention,
                        recurrent,
                    },
                ) => {
                    assert_eq!(attention.layers.len(), 1);
                    assert_eq!((recurrent.r.len(), recurrent.s.len()), (1, 1));
                }
                (MemoryKind::Recurrent, MemoryLayout::Recurrent(recurrent)) => {
                    assert_eq!(recurrent.n_layer, 2);
                    assert_eq!((recurrent.r.len(), recurrent.s.len()), (2, 2));
                }
                (MemoryKind::Attention, MemoryLayout::Attention(_)) => {}
                other => panic!("{name}: kind and layout disagree: {other:?}"),
            }
        }
    }
}

#[test]
fn saved_and_restored_states_continue_identically_on_every_model() {
    let dir = temp_dir("arch-round-trip");
    for (name, kind) in MODELS {
        let model = arch_model(name);
        for kv in kv_types(kind) {
            let what = format!("{name} {kv}");
            let mut original = prepared(model, params(1, kv), 0);
            let snapshot = original.snapshot(None, &Metadata::new(), None).unwrap();
            let path = dir.join(format!("{name}-{kv}.session"));
            original
                .save_session(&path, None, &Metadata::new(), None)
                .unwrap();
            let held = original.tokens(0).unwrap().to_vec();
            let expected = generated(&mut original, 0, MORE, 8);

            let mut from_snapshot = Context::new(model, params(1, kv)).unwrap();
            from_snapshot.restore(&snapshot, None, None).unwrap();
            assert_eq!(from_snapshot.tokens(0).unwrap(), held.as_slice(), "{what}");
            assert_eq!(
                generated(&mut from_snapshot, 0, MORE, 8),
                expected,
                "{what}"
            );

            let mut from_file = Context::new(model, params(1, kv)).unwrap();
            from_file.load_session(&path, None, None).unwrap();
            assert_eq!(generated(&mut from_file, 0, MORE, 8), expected, "{what}");

            // Into another sequence of a context with two, and copied from there to the first.
            let mut two = Context::new(model, params(2, kv)).unwrap();
            let mut reference = prepared(model, params(2, kv), 0);
            let snapshot0 = reference.snapshot(Some(0), &Metadata::new(), None).unwrap();
            let expected2 = generated(&mut reference, 0, MORE, 8);
            two.restore(&snapshot0, Some(1), None).unwrap();
            two.copy_sequence(1, 0).unwrap();
            assert_eq!(generated(&mut two, 1, MORE, 8), expected2, "{what} seq 1");
            assert_eq!(generated(&mut two, 0, MORE, 8), expected2, "{what} copy");
        }
    }
}

#[test]
fn a_session_saved_after_generation_and_restored_twice_stays_exact() {
    for (name, _) in MODELS {
        let model = arch_model(name);
        let mut ctx = prepared(model, params(1, KvType::F16), 0);
        generated(&mut ctx, 0, MORE, 5);
        let snapshot = ctx.snapshot(None, &Metadata::new(), None).unwrap();
        let expected = generated(&mut ctx, 0, " Later", 6);
        let mut fresh = Context::new(model, params(1, KvType::F16)).unwrap();
        fresh.restore(&snapshot, None, None).unwrap();
        // A second save of the restored state is the same state.
        let again = fresh.snapshot(None, &Metadata::new(), None).unwrap();
        let (a, b) = (open(&snapshot, "a").unwrap(), open(&again, "b").unwrap());
        assert_eq!(
            snapshot[a.state_ranges[0].clone()],
            again[b.state_ranges[0].clone()],
            "{name}"
        );
        assert_eq!(generated(&mut fresh, 0, " Later", 6), expected, "{name}");
    }
}

/// Rewrites the checksum after an edit, as an attacker who can write the file would.
fn reseal(bytes: &mut [u8]) {
    let body = bytes.len() - session_format::CHECKSUM_LEN;
    let checksum = xxhash_rust::xxh3::xxh3_128(&bytes[..body]);
    bytes[body..].copy_from_slice(&checksum.to_le_bytes());
}

/// The restore fails with `SessionCorrupt` and changes nothing.
fn assert_refused(ctx: &mut Context, bytes: &[u8], what: &str) {
    let before = ctx.tokens(0).unwrap().to_vec();
    let cells = ctx.llama_cell_count(0).unwrap();
    match ctx.restore(bytes, None, None) {
        Err(Error::SessionCorrupt { reason, .. }) => {
            assert!(reason.contains("llama.cpp's state"), "{what}: {reason}")
        }
        other => panic!("{what}: expected SessionCorrupt, got {other:?}"),
    }
    assert_eq!(ctx.tokens(0).unwrap(), before.as_slice(), "{what}");
    assert_eq!(ctx.llama_cell_count(0).unwrap(), cells, "{what}");
}

#[test]
fn hostile_recurrent_and_window_states_never_reach_llama_cpp() {
    // The recurrent cell count sits right after the KV part (hybrid) or the magic and sequence id
    // (recurrent); llama.cpp aborts on a count of 2 with different positions, so it must never see one.
    for name in ["tiny-mamba2", "tiny-lfm2", "tiny-gemma3"] {
        let model = arch_model(name);
        let source = prepared(model, params(1, KvType::F16), 0);
        let snapshot = source.snapshot(None, &Metadata::new(), None).unwrap();
        let range = open(&snapshot, "t").unwrap().state_ranges[0].clone();
        let n = source.token_count(0).unwrap();
        let mut target = prepared(model, params(1, KvType::F16), 0);
        generated(&mut target, 0, MORE, 3);
        let find = |needle: &[u8]| -> usize {
            let state = &snapshot[range.clone()];
            range.start
                + state
                    .windows(needle.len())
                    .position(|w| w == needle)
                    .expect("the pattern is in the state")
        };
        let mut edits: Vec<(String, usize, Vec<u8>)> = Vec::new();
        if name != "tiny-gemma3" {
            // The recurrent cell: u32 count 1, i32 position n-1, u32 0.
            let mut cell = 1u32.to_le_bytes().to_vec();
            cell.extend_from_slice(&(n as i32 - 1).to_le_bytes());
            cell.extend_from_slice(&0u32.to_le_bytes());
            let at = find(&cell);
            edits.push((
                "two recurrent cells".into(),
                at,
                2u32.to_le_bytes().to_vec(),
            ));
            edits.push((
                "recurrent cell at another position".into(),
                at + 4,
                3i32.to_le_bytes().to_vec(),
            ));
            edits.push((
                "recurrent cell listing a sequence".into(),
                at + 8,
                1u32.to_le_bytes().to_vec(),
            ));
        } else {
            // The window cache holds positions n-16..n: its first cell record (position, 1, seq 0).
            let first = n - GEMMA3_N_SWA as usize;
            let mut cell = (first as i32).to_le_bytes().to_vec();
            cell.extend_from_slice(&1u32.to_le_bytes());
            cell.extend_from_slice(&0i32.to_le_bytes());
            let at = find(&cell);
            edits.push((
                "window cell at a negative position".into(),
                at,
                (-1i32).to_le_bytes().to_vec(),
            ));
            edits.push((
                "window cell out of order".into(),
                at,
                (first as i32 + 1).to_le_bytes().to_vec(),
            ));
        }
        for (what, at, value) in edits {
            let mut forged = snapshot.clone();
            forged[at..at + value.len()].copy_from_slice(&value);
            reseal(&mut forged);
            assert_refused(&mut target, &forged, &format!("{name}: {what}"));
        }
    }
}

#[test]
fn a_header_recording_other_memory_geometry_is_a_params_mismatch() {
    let model = arch_model("tiny-gemma3");
    let ctx = prepared(model, params(1, KvType::F16), 0);
    let mut snapshot = ctx.snapshot(None, &Metadata::new(), None).unwrap();
    let needle = format!("\"n_swa\":{GEMMA3_N_SWA}");
    let at = snapshot
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())
        .expect("the header records n_swa");
    let forged = format!("\"n_swa\":{}", GEMMA3_N_SWA + 1);
    snapshot[at..at + forged.len()].copy_from_slice(forged.as_bytes());
    reseal(&mut snapshot);
    let mut fresh = Context::new(model, params(1, KvType::F16)).unwrap();
    match fresh.restore(&snapshot, None, None) {
        Err(Error::SessionParamsMismatch { mismatches, .. }) => {
            assert_eq!(mismatches.len(), 1);
            assert_eq!(mismatches[0].name, "n_swa");
        }
        other => panic!("expected SessionParamsMismatch, got {other:?}"),
    }
    // A session of another memory kind (a plain model's) does not load into a recurrent model either way:
    // the model fingerprint differs first.
    let plain = prepared(arch_model("tiny-llama"), params(1, KvType::F16), 0)
        .snapshot(None, &Metadata::new(), None)
        .unwrap();
    let mut recurrent = Context::new(arch_model("tiny-mamba2"), params(1, KvType::F16)).unwrap();
    assert!(matches!(
        recurrent.restore(&plain, None, None),
        Err(Error::SessionModelMismatch { .. })
    ));
}

#[test]
fn truncate_is_exact_on_every_memory_kind() {
    // After truncate(n), the sequence continues exactly as a fresh context that decoded the same n tokens.
    for (name, kind) in MODELS {
        let model = arch_model(name);
        let mut ctx = prepared(model, params(1, KvType::F16), 0);
        let prompt_len = model.tokenize(LONG_PROMPT, true, true).unwrap().len();
        let kept = ctx.tokens(0).unwrap()[..prompt_len].to_vec();
        assert_eq!(ctx.exact_floor(0) > 0, !kind.partial_truncation(), "{name}");
        ctx.truncate(0, prompt_len).unwrap();
        assert_eq!(ctx.tokens(0).unwrap(), kept.as_slice(), "{name}");
        let mut fresh = Context::new(model, params(1, KvType::F16)).unwrap();
        fresh
            .generate(0, LONG_PROMPT, greedy(0), &mut NeverInterrupt)
            .unwrap();
        assert_eq!(fresh.tokens(0).unwrap(), kept.as_slice());
        assert_eq!(
            generated(&mut ctx, 0, MORE, 8),
            generated(&mut fresh, 0, MORE, 8),
            "{name}"
        );
    }
}

#[test]
fn truncate_of_a_restored_window_below_it_decodes_again_exactly() {
    // A restored gemma3 state holds only the window's last 16 positions of its sliding-window layer: cutting
    // it back further decodes the kept tokens again, and continues as a fresh context would.
    let model = arch_model("tiny-gemma3");
    let source = prepared(model, params(1, KvType::F16), 0);
    let snapshot = source.snapshot(None, &Metadata::new(), None).unwrap();
    let mut restored = Context::new(model, params(1, KvType::F16)).unwrap();
    restored.restore(&snapshot, None, None).unwrap();
    let n = restored.token_count(0).unwrap();
    assert_eq!(restored.exact_floor(0), n - 1);
    let prompt_len = model.tokenize(LONG_PROMPT, true, true).unwrap().len();
    restored.truncate(0, prompt_len).unwrap();
    assert_eq!(restored.exact_floor(0), 0);
    let mut fresh = Context::new(model, params(1, KvType::F16)).unwrap();
    fresh
        .generate(0, LONG_PROMPT, greedy(0), &mut NeverInterrupt)
        .unwrap();
    assert_eq!(
        generated(&mut restored, 0, MORE, 8),
        generated(&mut fresh, 0, MORE, 8)
    );
}

#[test]
fn prefix_reuse_on_recurrent_memory_goes_back_to_the_checkpoint_when_the_history_changed() {
    for name in ["tiny-mamba2", "tiny-lfm2"] {
        let model = arch_model(name);
        let mut ctx = prepared(model, params(1, KvType::F16), 0);
        let prompt_len = model.tokenize(LONG_PROMPT, true, true).unwrap().len();
        let edited = format!("{LONG_PROMPT} that nobody saw");
        let (generation, reused) = ctx
            .generate_reusing_prefix(0, &edited, greedy(8), &mut NeverInterrupt)
            .unwrap();
        // The held answer cannot be cut off in place: the state checkpoint taken at the end of the prompt
        // serves, and only what follows it is decoded.
        assert_eq!(reused, prompt_len, "{name}");
        assert_eq!(
            generation.stats.prompt_tokens,
            model.tokenize(&edited, true, true).unwrap().len() - prompt_len,
            "{name}"
        );
        let mut fresh = Context::new(model, params(1, KvType::F16)).unwrap();
        let expected = fresh
            .generate(0, &edited, greedy(8), &mut NeverInterrupt)
            .unwrap();
        assert!(!expected.tokens.is_empty());
        assert_eq!(generation.tokens, expected.tokens, "{name}");
        // Extending what is held reuses all of it.
        let mut longer = ctx.tokens(0).unwrap().to_vec();
        let held = longer.len();
        longer.extend(model.tokenize(MORE, false, true).unwrap());
        let (_, reused) = ctx
            .start_generation_reusing_prefix_tokens(0, &longer, greedy(4), &mut NeverInterrupt)
            .unwrap();
        assert_eq!(reused, held, "{name}");
    }
}
