//! Builds the tiny test models of every memory kind (see rust/core/tests/common/arch_models.rs):
//!
//! ```text
//! cargo run --release -p llama-sessions --example make_arch_models -- TOKENIZER_GGUF OUT_DIR [NAME...]
//! ```
//!
//! prints the path of each model, building those that are absent.

#[path = "../tests/common/arch_models.rs"]
mod arch_models;

use std::path::PathBuf;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!(
            "usage: make_arch_models TOKENIZER_GGUF OUT_DIR [NAME...] (names: {:?})",
            arch_models::MODELS
        );
        std::process::exit(2);
    }
    let tokenizer = PathBuf::from(&args[0]);
    let out_dir = PathBuf::from(&args[1]);
    let names: Vec<&str> = if args.len() > 2 {
        args[2..].iter().map(String::as_str).collect()
    } else {
        arch_models::MODELS.to_vec()
    };
    for name in names {
        println!(
            "{}",
            arch_models::ensure(name, &tokenizer, &out_dir).display()
        );
    }
}
