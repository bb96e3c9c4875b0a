//! Shared setup: the real test model, loaded once per test binary.

#[allow(dead_code)]
pub mod remote;

use std::path::PathBuf;
use std::sync::OnceLock;

use llama_sessions::{GenerateOptions, Model, ModelParams, SamplingParams};

/// The test model: `$LLAMA_SESSIONS_MODEL`, or the default model in the user cache (which
/// `python -m llama_sessions fetch-model` or `.ci/run` puts there).
pub fn model_path() -> PathBuf {
    if let Some(path) = std::env::var_os("LLAMA_SESSIONS_MODEL") {
        return PathBuf::from(path);
    }
    let path = arch_models::user_cache_dir().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "test model missing at {}: run `python -m llama_sessions fetch-model` or set LLAMA_SESSIONS_MODEL",
        path.display()
    );
    path
}

pub fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        Model::load(model_path(), &ModelParams::default()).expect("load test model")
    })
}

pub fn greedy(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop: Vec::new(),
    }
}

/// An empty directory for one test, under the system's temporary directory.
#[allow(dead_code)]
pub fn temp_dir(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("llama-sessions-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub mod arch_models;

/// Test model `name` of [`arch_models::MODELS`], built on first use (with the default model's tokenizer) and
/// loaded once per test binary.
#[allow(dead_code)]
pub fn arch_model(name: &str) -> &'static Model {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static MODELS: OnceLock<Mutex<HashMap<String, &'static Model>>> = OnceLock::new();
    let mut models = MODELS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    models.entry(name.to_owned()).or_insert_with(|| {
        let path = arch_models::ensure(name, &model_path(), &arch_models::cache_dir());
        let model = Model::load(path, &ModelParams::default()).expect("load an arch test model");
        Box::leak(Box::new(model))
    })
}

/// Test model `name` with a chat template ([`arch_models::ensure_with_chat_template`]), loaded once per test
/// binary.
#[allow(dead_code)]
pub fn arch_chat_model(name: &str) -> &'static Model {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static MODELS: OnceLock<Mutex<HashMap<String, &'static Model>>> = OnceLock::new();
    let mut models = MODELS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    models.entry(name.to_owned()).or_insert_with(|| {
        let path =
            arch_models::ensure_with_chat_template(name, &model_path(), &arch_models::cache_dir());
        let model = Model::load(path, &ModelParams::default()).expect("load an arch test model");
        Box::leak(Box::new(model))
    })
}
