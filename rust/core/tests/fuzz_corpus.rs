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

const TARGETS: [(&str, Check); 3] = [
    ("session_envelope", checks::check_envelope),
    ("state_checker", checks::check_state),
    ("structured_session", checks::check_structured),
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
    }
    // The corpus reaches both sides of every reader; a corpus that stopped reaching acceptance would replay
    // without testing it.
    for what in [
        "session",
        "sequence state",
        "whole state",
        "structured session",
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
