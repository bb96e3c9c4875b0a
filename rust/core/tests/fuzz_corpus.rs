//! Replays the fuzz corpus (`fuzz/corpus/<target>/`) and every crash the fuzzer ever found
//! (`fuzz/regressions/<target>/`) through the same checks the fuzz targets run (`fuzz/src/checks.rs`), here
//! against the real crate, so that the default `cargo test` keeps them passing. Also checks that the layouts
//! the state checker is fuzzed against are SmolLM2's real ones.

#[allow(dead_code)]
mod common;

// What `checks.rs` reaches through `crate::` (the fuzz crate's root provides the same names).
use llama_sessions::{llama_state, session_format, Error, SessionKey};

#[path = "../../../fuzz/src/checks.rs"]
#[allow(dead_code)]
mod checks;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use checks::Outcome;
use llama_sessions::{Context, ContextParams, KvType};

/// A fuzz target's checks.
type Check = fn(&[u8]) -> Outcome;

const TARGETS: [(&str, Check); 4] = [
    ("session_envelope", checks::check_envelope),
    ("state_checker", checks::check_state),
    ("structured_session", checks::check_structured),
    ("memory_state", checks::check_memory),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `check` on every file of `dir`, naming the file that fails; counts the outcomes.
fn replay(dir: &Path, check: Check, outcomes: &mut BTreeMap<(&'static str, bool), usize>) -> usize {
    let files = files(dir);
    for path in &files {
        let bytes = std::fs::read(path).unwrap();
        match std::panic::catch_unwind(|| check(&bytes)) {
            Ok(outcome) => {
                *outcomes
                    .entry((outcome.what, outcome.accepted))
                    .or_default() += 1
            }
            Err(_) => panic!(
                "{} fails the fuzz checks (see the panic above)",
                path.display()
            ),
        }
    }
    files.len()
}

#[test]
fn the_fuzz_corpus_and_every_regression_pass_the_fuzz_checks() {
    let mut outcomes = BTreeMap::new();
    for (target, check) in TARGETS {
        let corpus = replay(
            &fuzz_dir().join("corpus").join(target),
            check,
            &mut outcomes,
        );
        assert!(corpus > 0, "fuzz/corpus/{target} is empty");
        replay(
            &fuzz_dir().join("regressions").join(target),
            check,
            &mut outcomes,
        );
        replay(
            &fuzz_dir().join("real_states").join(target),
            check,
            &mut outcomes,
        );
    }
    // The corpus reaches both sides of every reader; a corpus that stopped reaching acceptance would replay
    // without testing it.
    for what in [
        "session",
        "sequence state",
        "whole state",
        "structured session",
        "memory state",
    ] {
        for accepted in [true, false] {
            assert!(
                outcomes.get(&(what, accepted)).copied().unwrap_or(0) > 0,
                "no corpus file where the {what} is accepted={accepted}: {outcomes:?}"
            );
        }
    }
}

/// Coverage decides what the kept corpus holds, not defects: an input with one wrong cell position may be
/// dropped for one that covers the same branches with several defects at once. So every kind of edit of the
/// structure-aware target is also applied alone (with values from a fixed pseudo-random sequence) to a valid
/// session of every fuzzed layout, signed and not, and judged against the oracle.
#[test]
fn each_edit_of_the_structured_target_alone_is_judged_as_the_oracle_judges_it() {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut random = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut outcomes = BTreeMap::new();
    for (index, layout) in checks::layouts().iter().enumerate() {
        for kind in 0..24u8 {
            for case in 0..8u8 {
                // Layout, signed (0) or not, one sequence (with its id when there are several streams),
                // three tokens, a fill byte, one edit of this kind to that sequence, then its values.
                let mut input = vec![index as u8, case % 2, 0];
                if layout.n_stream > 1 {
                    input.push(case / 2);
                }
                input.extend_from_slice(&[3, 0x5a, 1, kind, 0]);
                input.extend(random().to_le_bytes());
                input.extend(random().to_le_bytes());
                let outcome = std::panic::catch_unwind(|| checks::check_structured(&input))
                    .unwrap_or_else(|_| {
                        panic!("edit kind {kind}: structured input {input:?} fails")
                    });
                *outcomes.entry(outcome.accepted).or_insert(0) += 1;
            }
        }
    }
    assert!(outcomes.len() == 2, "{outcomes:?}");
}

#[test]
fn the_fuzzed_smollm2_layouts_are_the_real_ones() {
    let params = |flash_attn: bool, n_seq_max: u32, kv: KvType| ContextParams {
        n_ctx: 256,
        n_batch: 64,
        type_k: kv,
        type_v: kv,
        flash_attn,
        n_seq_max,
        ..ContextParams::default()
    };
    let real = [
        params(false, 1, KvType::F16),
        params(true, 1, KvType::F16),
        params(false, 2, KvType::F16),
        params(true, 2, KvType::F16),
        params(true, 1, KvType::Q8_0),
    ];
    let fuzzed = checks::layouts();
    for (i, p) in real.into_iter().enumerate() {
        let ctx = Context::new(common::model(), p.clone()).unwrap();
        assert_eq!(ctx.state_layout().unwrap(), &fuzzed[i], "{p:?}");
    }
}

#[test]
fn the_fuzz_crate_bounds_sequences_as_the_library_does() {
    let root = std::fs::read_to_string(fuzz_dir().join("src/lib.rs")).unwrap();
    let line = format!(
        "pub const MAX_SEQUENCES: u32 = {};",
        llama_sessions::MAX_SEQUENCES
    );
    assert!(root.contains(&line), "fuzz/src/lib.rs lacks {line:?}");
}

/// The tiny test models' contexts the memory layouts are fuzzed for: n_ctx 256 per sequence, f16, one
/// thread.
fn tiny_context(name: &str, n_seq_max: u32) -> Context {
    let params = ContextParams {
        n_ctx: 256 * n_seq_max,
        n_batch: 32,
        n_seq_max,
        n_threads: 1,
        ..ContextParams::default()
    };
    Context::new(common::arch_model(name), params).unwrap()
}

#[test]
fn the_fuzzed_memory_layouts_are_the_tiny_models_real_ones() {
    let fuzzed = checks::memory_layouts();
    let real = [
        ("tiny-gemma3", 1),
        ("tiny-gemma3", 2),
        ("tiny-lfm2", 1),
        ("tiny-lfm2", 2),
        ("tiny-mamba2", 1),
    ];
    for (i, (name, n_seq_max)) in real.into_iter().enumerate() {
        let ctx = tiny_context(name, n_seq_max);
        assert_eq!(
            ctx.memory_layout().unwrap(),
            &fuzzed[i].1,
            "{}",
            fuzzed[i].0
        );
    }
    // A hybrid's checkpoint is its recurrent section alone.
    let llama_state::MemoryLayout::Hybrid { recurrent, .. } = &fuzzed[2].1 else {
        panic!("tiny-lfm2 is hybrid");
    };
    assert_eq!(
        fuzzed[5].1,
        llama_state::MemoryLayout::Recurrent(recurrent.clone())
    );
}

/// Real states of the tiny models (sliding window past its 16 cells, hybrid, recurrent, a hybrid's
/// checkpoint), as target (d)'s inputs, named for the corpus. The checkpoint is read the way the context
/// takes one (`LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY`), through `Context::snapshot` of a sequence for the
/// others.
fn real_memory_inputs() -> Vec<(String, Vec<u8>)> {
    let mut inputs = Vec::new();
    // About 25 tokens: past tiny-gemma3's window of 16.
    let prompt =
        "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the \
                  steps as his father had, and lit the great lamp";
    for (index, name, n_seq_max, seq) in [
        (0, "tiny-gemma3", 1, 0),
        (1, "tiny-gemma3", 2, 1),
        (2, "tiny-lfm2", 1, 0),
        (3, "tiny-lfm2", 2, 1),
        (4, "tiny-mamba2", 1, 0),
    ] {
        let mut ctx = tiny_context(name, n_seq_max);
        for words in [0, 3, usize::MAX] {
            let text: String = prompt.split(' ').take(words).collect::<Vec<_>>().join(" ");
            ctx.reset();
            if !text.is_empty() {
                ctx.generate(
                    seq,
                    &text,
                    common::greedy(0),
                    &mut llama_sessions::NeverInterrupt,
                )
                .unwrap();
            }
            let n = ctx.token_count(seq).unwrap();
            let snapshot = ctx
                .snapshot(Some(seq), &llama_sessions::Metadata::new(), None)
                .unwrap();
            let opened = session_format::open(&snapshot, "snapshot").unwrap();
            let state = &snapshot[opened.state_ranges[0].clone()];
            inputs.push((
                format!("real-{name}-{n_seq_max}-seq{seq}-{n}-tokens"),
                checks::memory_input(index, seq, u8::try_from(n).unwrap(), state),
            ));
            if name == "tiny-lfm2" && n_seq_max == 1 {
                // The checkpoint the prompt's decode took at its end.
                for (at, partial) in ctx.checkpoint_states(seq).unwrap() {
                    inputs.push((
                        format!("real-tiny-lfm2-checkpoint-{at}-tokens"),
                        checks::memory_input(5, seq, u8::try_from(at).unwrap(), partial),
                    ));
                }
            }
        }
    }
    inputs
}

/// The real states pass target (d)'s checks (accepted, as the oracle says); with
/// `LLAMA_SESSIONS_WRITE_FUZZ_SEEDS=1` they are (re)written into `fuzz/real_states/memory_state/`, where they
/// seed the fuzzer (scripts/fuzz.sh) apart from the minimized corpus, and are replayed by the test above.
#[test]
fn real_states_of_every_memory_kind_pass_the_memory_state_checks() {
    let inputs = real_memory_inputs();
    let dir = fuzz_dir().join("real_states/memory_state");
    for (name, input) in &inputs {
        let outcome = checks::check_memory(input);
        assert!(outcome.accepted, "{name} is refused");
        if std::env::var_os("LLAMA_SESSIONS_WRITE_FUZZ_SEEDS").is_some() {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), input).unwrap();
        }
    }
    assert_eq!(inputs.len(), 17);
    assert_eq!(
        files(&dir).len(),
        inputs.len(),
        "fuzz/real_states/memory_state: write them with LLAMA_SESSIONS_WRITE_FUZZ_SEEDS=1"
    );
}
