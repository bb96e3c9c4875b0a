//! Writes the seed inputs of each fuzz target into `DIR/<target>/` (valid sessions, states and llama.cpp
//! files that the fuzzer starts from): `cargo run --manifest-path fuzz/Cargo.toml --example make_seeds DIR`.
//! scripts/fuzz.sh runs it before fuzzing.

use std::path::Path;

use llama_sessions_fuzz::checks::{
    header_for, key, layouts, memory_input, memory_layouts, seal_session,
};
use llama_sessions_fuzz::llama_state::{synthesize, synthesize_memory};
use llama_sessions_fuzz::session_format::{SequenceRecord, LLAMA_CPP_MAGIC, LLAMA_CPP_VERSION};

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).expect("create the seed directory");
    std::fs::write(dir.join(name), bytes).expect("write a seed");
}

fn main() {
    let root = std::path::PathBuf::from(std::env::args_os().nth(1).expect("usage: make_seeds DIR"));
    let layouts = layouts();

    // (a) sessions: the first byte chooses the repairs (none, or all of them), the rest is the session.
    let envelope = root.join("session_envelope");
    let tiny = layouts
        .iter()
        .find(|l| l.n_stream == 3)
        .expect("a three-stream layout");
    let states = vec![synthesize(tiny, 0, 3, 0x11), synthesize(tiny, 2, 1, 0x22)];
    let records = |states: &[Vec<u8>]| {
        vec![
            SequenceRecord {
                seq: 0,
                tokens: vec![1, 2, 3],
                state_bytes: states[0].len() as u64,
            },
            SequenceRecord {
                seq: 2,
                tokens: vec![4],
                state_bytes: states[1].len() as u64,
            },
        ]
    };
    let header = header_for(tiny, records(&states));
    for (name, key) in [("unsigned", None), ("signed", Some(key()))] {
        let session = seal_session(&header, &states, key.as_ref());
        write(
            &envelope,
            &format!("{name}-as-is"),
            &[[0u8].as_slice(), &session].concat(),
        );
        write(
            &envelope,
            &format!("{name}-repaired"),
            &[[0x0fu8].as_slice(), &session].concat(),
        );
    }
    let mut ggsn = LLAMA_CPP_MAGIC.to_vec();
    ggsn.extend_from_slice(&LLAMA_CPP_VERSION.to_le_bytes());
    ggsn.extend_from_slice(&2u32.to_le_bytes());
    ggsn.extend_from_slice(&[1, 0, 0, 0, 2, 0, 0, 0]);
    write(&envelope, "llama-cpp", &[[0u8].as_slice(), &ggsn].concat());

    // (b) states: layout choice, saved sequence, token count, then the state.
    let state_dir = root.join("state_checker");
    for (i, layout) in layouts.iter().enumerate() {
        let small = layout.layers.len() <= 4;
        let tokens = if small { 3 } else { 0 };
        let seq = layout.n_stream - 1;
        let state = synthesize(layout, seq, tokens, 0x5a);
        let prefix = [i as u8, seq as u8, tokens as u8];
        write(
            &state_dir,
            &format!("sequence-{i}"),
            &[prefix.as_slice(), &state].concat(),
        );
        if layout.n_stream == 1 && small {
            // A whole-context state: the architecture name, then the memory of sequence 0.
            let memory = synthesize(layout, 0, tokens, 0x5a);
            let mut whole = 5u32.to_le_bytes().to_vec();
            whole.extend_from_slice(b"llama");
            whole.extend_from_slice(&memory[8..]);
            let prefix = [128 + i as u8, 2, 0];
            write(
                &state_dir,
                &format!("whole-{i}"),
                &[prefix.as_slice(), &whole].concat(),
            );
        }
    }

    // (c) structured cases: layout, signed, sequences, per sequence (id, tokens, fill), edits.
    let structured = root.join("structured_session");
    for (i, _) in layouts.iter().enumerate() {
        write(
            &structured,
            &format!("valid-{i}"),
            &[i as u8, 1, 2, 0, 3, 7, 1, 2, 9, 0, 1],
        );
        write(
            &structured,
            &format!("signed-{i}"),
            &[i as u8, 0, 1, 0, 2, 7, 0, 1],
        );
    }

    // (d) memory states: layout, saved sequence, token count, then the state; every layout empty, and the
    // small ones with a few tokens, past the window (real states of the tiny models are in the corpus).
    let memory = root.join("memory_state");
    for (i, (_, layout)) in memory_layouts().iter().enumerate() {
        let small = i >= 6;
        for tokens in if small { vec![0, 1, 5] } else { vec![0] } {
            let state = synthesize_memory(layout, 0, tokens, 0x5a);
            write(
                &memory,
                &format!("memory-{i}-{tokens}"),
                &memory_input(i, 0, tokens as u8, &state),
            );
        }
    }
}
