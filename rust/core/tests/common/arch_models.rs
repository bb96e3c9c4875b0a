//! Tiny random-weight GGUF models, one per memory kind llama.cpp runs, built on demand for the tests (and by
//! the `make_arch_models` example, which the Python tests run):
//!
//! | file                | architecture | memory                                         |
//! |---------------------|--------------|------------------------------------------------|
//! | `tiny-llama.gguf`   | llama        | one KV cache (plain attention)                 |
//! | `tiny-gemma3.gguf`  | gemma3       | sliding window: a base cache and an SWA cache   |
//! | `tiny-lfm2.gguf`    | lfm2         | hybrid: KV cache (layer 0) + short-conv state   |
//! | `tiny-mamba2.gguf`  | mamba2       | recurrent only (SSM state per sequence)         |
//!
//! llama.cpp builds each model from GGUF metadata alone (`llama_model_init_from_user`, as its own
//! test-llama-archs does), a seeded generator fills the weights, and `llama_model_save_to_file` writes it.
//! The tokenizer is the one of the GGUF given (SmolLM2), so prompts are ordinary text. The same build writes
//! the same bytes every time. A model is written to a temporary name and renamed, so a file present is whole.

#![allow(dead_code)]

use std::ffi::{c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::Once;

use llama_cpp_sys_2 as sys;

/// Width of the residual stream: small, but a multiple of 32 so that quantized KV caches (q8_0, q4_0 blocks
/// of 32 values) fit a head.
const N_EMBD: u32 = 64;
const N_HEAD: u32 = 2;
const N_FF: u32 = 128;
const N_CTX_TRAIN: u32 = 4096;
/// gemma3's window: tests run prompts several times longer.
pub const GEMMA3_N_SWA: u32 = 16;
const SEED: u64 = 0x5eed_1a11_a5e5_5105;

/// The models this example knows, by file stem.
pub const MODELS: [&str; 4] = ["tiny-llama", "tiny-gemma3", "tiny-lfm2", "tiny-mamba2"];

/// Where the test models live: `$LLAMA_SESSIONS_ARCH_MODELS`, or `models/arch` in the user cache.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LLAMA_SESSIONS_ARCH_MODELS") {
        return PathBuf::from(dir);
    }
    user_cache_dir().join("models/arch")
}

/// The user cache of llama-sessions: `$LLAMA_SESSIONS_CACHE`, `$XDG_CACHE_HOME/llama-sessions` or
/// `~/.cache/llama-sessions` (where `python -m llama_sessions fetch-model` puts the default model).
pub fn user_cache_dir() -> PathBuf {
    std::env::var_os("LLAMA_SESSIONS_CACHE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("llama-sessions"))
        })
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/llama-sessions")
        })
}

/// The path of test model `name` in `out_dir`, built first (with the tokenizer of `tokenizer`) if absent.
pub fn ensure(name: &str, tokenizer: &Path, out_dir: &Path) -> PathBuf {
    let path = out_dir.join(format!("{name}.gguf"));
    if !path.exists() {
        std::fs::create_dir_all(out_dir).expect("create the model directory");
        build(name, tokenizer, &path);
    }
    path
}

/// The path of test model `name` with the chat template of `tokenizer` added (`{name}-chat.gguf` in
/// `out_dir`), built first if absent: llama.cpp's model saver leaves the template out, and chat tests need
/// one.
pub fn ensure_with_chat_template(name: &str, tokenizer: &Path, out_dir: &Path) -> PathBuf {
    let path = out_dir.join(format!("{name}-chat.gguf"));
    if path.exists() {
        return path;
    }
    let plain = ensure(name, tokenizer, out_dir);
    let key = cstr("tokenizer.chat_template");
    let tokenizer_c = cstr(tokenizer.to_str().expect("UTF-8 path"));
    let plain_c = cstr(plain.to_str().expect("UTF-8 path"));
    let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
    let tmp_c = cstr(tmp.to_str().expect("UTF-8 path"));
    // SAFETY: each gguf_context is live from its gguf_init_from_file until its gguf_free (metadata only, no
    // tensor data is loaded); the template string is copied (CStr::to_owned) before its context is freed;
    // every name is a NUL-terminated CString that outlives the call.
    let data_offset = unsafe {
        let src = sys::gguf_init_from_file(
            tokenizer_c.as_ptr(),
            sys::gguf_init_params {
                no_alloc: true,
                ctx: std::ptr::null_mut(),
            },
        );
        assert!(!src.is_null(), "cannot read {}", tokenizer.display());
        let id = sys::gguf_find_key(src, key.as_ptr());
        assert!(id >= 0, "{} has no chat template", tokenizer.display());
        let template = CStr::from_ptr(sys::gguf_get_val_str(src, id)).to_owned();
        sys::gguf_free(src);
        let model = sys::gguf_init_from_file(
            plain_c.as_ptr(),
            sys::gguf_init_params {
                no_alloc: true,
                ctx: std::ptr::null_mut(),
            },
        );
        assert!(!model.is_null(), "cannot read {}", plain.display());
        let data_offset = sys::gguf_get_data_offset(model);
        sys::gguf_set_val_str(model, key.as_ptr(), template.as_ptr());
        // The metadata, padded to the alignment; the tensor data (offsets relative to its start) follows.
        let written = sys::gguf_write_to_file(model, tmp_c.as_ptr(), true);
        sys::gguf_free(model);
        assert!(written, "cannot write {}", tmp.display());
        data_offset
    };
    let original = std::fs::read(&plain).expect("read the model");
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&tmp)
        .expect("open the new model");
    std::io::Write::write_all(&mut file, &original[data_offset..]).expect("write the tensor data");
    drop(file);
    std::fs::rename(&tmp, &path).expect("rename the finished model");
    path
}

/// The architecture's hyperparameters, as GGUF metadata keys without the architecture prefix.
enum Value {
    U32(u32),
    F32(f32),
    U32s(Vec<u32>),
}

fn hparams(name: &str) -> (&'static str, Vec<(&'static str, Value)>) {
    use Value::{U32s, F32, U32};
    let mut kv = vec![
        ("context_length", U32(N_CTX_TRAIN)),
        ("embedding_length", U32(N_EMBD)),
        ("feed_forward_length", U32(N_FF)),
        ("attention.layer_norm_rms_epsilon", F32(1e-5)),
    ];
    let arch = match name {
        "tiny-llama" => {
            kv.push(("block_count", U32(2)));
            kv.push(("attention.head_count", U32(N_HEAD)));
            kv.push(("attention.head_count_kv", U32(N_HEAD)));
            "llama"
        }
        "tiny-gemma3" => {
            // Layer 0 slides over GEMMA3_N_SWA tokens, layer 1 attends to everything (pattern 2: every
            // second layer is global).
            kv.push(("block_count", U32(2)));
            kv.push(("attention.head_count", U32(N_HEAD)));
            kv.push(("attention.head_count_kv", U32(N_HEAD)));
            kv.push(("attention.sliding_window", U32(GEMMA3_N_SWA)));
            kv.push(("attention.sliding_window_pattern", U32(2)));
            "gemma3"
        }
        "tiny-lfm2" => {
            // Layer 0 is attention, layer 1 a short convolution (no KV heads).
            kv.push(("block_count", U32(2)));
            kv.push(("attention.head_count", U32s(vec![N_HEAD, 0])));
            kv.push(("attention.head_count_kv", U32s(vec![N_HEAD, 0])));
            kv.push(("shortconv.l_cache", U32(3)));
            "lfm2"
        }
        "tiny-mamba2" => {
            kv.push(("block_count", U32(2)));
            kv.push(("attention.head_count", U32(0)));
            kv.push(("attention.head_count_kv", U32(0)));
            kv.push(("ssm.conv_kernel", U32(4)));
            kv.push(("ssm.inner_size", U32(2 * N_EMBD)));
            kv.push(("ssm.state_size", U32(16)));
            kv.push(("ssm.time_step_rank", U32(N_HEAD)));
            kv.push(("ssm.group_count", U32(1)));
            "mamba2"
        }
        other => panic!("unknown model {other:?}; known: {MODELS:?}"),
    };
    (arch, kv)
}

fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL in keys")
}

/// Builds test model `name` at `path` with the tokenizer of the GGUF `tokenizer`.
pub fn build(name: &str, tokenizer: &Path, path: &Path) {
    static BACKEND: Once = Once::new();
    // SAFETY: llama_backend_init only sets up ggml's global state; it is called once, before the first model.
    BACKEND.call_once(|| unsafe { sys::llama_backend_init() });
    let (arch, kv) = hparams(name);
    let tokenizer_c = cstr(tokenizer.to_str().expect("UTF-8 path"));
    // SAFETY: every pointer handed to gguf_* below is either a live gguf_context returned by gguf_init_* (freed
    // once, at the end) or a NUL-terminated CString that outlives the call; gguf copies keys and values.
    unsafe {
        let src = sys::gguf_init_from_file(
            tokenizer_c.as_ptr(),
            sys::gguf_init_params {
                no_alloc: true,
                ctx: std::ptr::null_mut(),
            },
        );
        assert!(!src.is_null(), "cannot read {}", tokenizer.display());
        let meta = sys::gguf_init_empty();
        // Keep the tokenizer, drop everything else of the source model.
        sys::gguf_set_kv(meta, src);
        sys::gguf_free(src);
        let keys: Vec<String> = (0..sys::gguf_get_n_kv(meta))
            .map(|i| {
                CStr::from_ptr(sys::gguf_get_key(meta, i))
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        for key in keys {
            if !key.starts_with("tokenizer.") {
                sys::gguf_remove_key(meta, cstr(&key).as_ptr());
            }
        }
        sys::gguf_set_val_str(
            meta,
            cstr("general.architecture").as_ptr(),
            cstr(arch).as_ptr(),
        );
        sys::gguf_set_val_str(meta, cstr("general.name").as_ptr(), cstr(name).as_ptr());
        for (key, value) in kv {
            let key = cstr(&format!("{arch}.{key}"));
            match value {
                Value::U32(v) => sys::gguf_set_val_u32(meta, key.as_ptr(), v),
                Value::F32(v) => sys::gguf_set_val_f32(meta, key.as_ptr(), v),
                Value::U32s(v) => sys::gguf_set_arr_data(
                    meta,
                    key.as_ptr(),
                    sys::GGUF_TYPE_UINT32,
                    v.as_ptr().cast(),
                    v.len(),
                ),
            }
        }
        // The vocabulary (49152 tokens) dominates the size: its two matrices are q8_0 (a few MB each).
        for tensor in ["token_embd.weight", "output.weight"] {
            let mut t: sys::ggml_tensor = std::mem::zeroed();
            t.type_ = sys::GGML_TYPE_Q8_0;
            sys::ggml_set_name(&mut t, cstr(tensor).as_ptr());
            sys::gguf_add_tensor(meta, &t);
        }
        let mut params = sys::llama_model_default_params();
        params.n_gpu_layers = 0;
        let mut seed = SEED;
        let model = sys::llama_model_init_from_user(
            meta,
            Some(fill_tensor),
            (&raw mut seed).cast::<c_void>(),
            params,
        );
        sys::gguf_free(meta);
        assert!(
            !model.is_null(),
            "llama.cpp could not build {name} ({arch})"
        );
        let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
        let tmp_c = cstr(tmp.to_str().expect("UTF-8 path"));
        sys::llama_model_save_to_file(model, tmp_c.as_ptr());
        sys::llama_model_free(model);
        std::fs::rename(&tmp, path).expect("rename the finished model");
    }
}

/// Fills a tensor from a generator seeded by the tensor's name and the model seed: norm weights around 1,
/// matrices N(0, 1/fan_in) so that every layer, and so the memory, changes what comes out (with tiny weights
/// the output would only depend on the last token, and a lost state would go unnoticed).
unsafe extern "C" fn fill_tensor(tensor: *mut sys::ggml_tensor, userdata: *mut c_void) {
    // SAFETY: llama.cpp passes a live tensor and the userdata given to llama_model_init_from_user, a u64.
    unsafe {
        let seed = *userdata.cast::<u64>();
        let name = CStr::from_ptr((*tensor).name.as_ptr()).to_bytes();
        let mut rng = SplitMix(seed ^ fnv1a(name));
        let n = usize::try_from(sys::ggml_nelements(tensor)).expect("a tensor's size");
        let fan_in = (*tensor).ne[0] as f32;
        let is_norm = name.windows(4).any(|w| w == b"norm");
        let values: Vec<f32> = (0..n)
            .map(|_| {
                if is_norm {
                    1.0 + 0.1 * rng.normal()
                } else {
                    rng.normal() / fan_in.sqrt()
                }
            })
            .collect();
        let bytes = sys::ggml_nbytes(tensor);
        match (*tensor).type_ {
            sys::GGML_TYPE_F32 => {
                sys::ggml_backend_tensor_set(tensor, values.as_ptr().cast(), 0, bytes);
            }
            sys::GGML_TYPE_Q8_0 => {
                let mut quantized = vec![0u8; bytes];
                let n_per_row = (*tensor).ne[0];
                let rows = i64::try_from(n).expect("size") / n_per_row;
                sys::ggml_quantize_chunk(
                    sys::GGML_TYPE_Q8_0,
                    values.as_ptr(),
                    quantized.as_mut_ptr().cast(),
                    0,
                    rows,
                    n_per_row,
                    std::ptr::null(),
                );
                sys::ggml_backend_tensor_set(tensor, quantized.as_ptr().cast(), 0, bytes);
            }
            other => panic!("no filler for ggml type {other}"),
        }
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// SplitMix64: tiny, seeded, the same on every platform.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f32 {
        ((self.next() >> 40) as f32 + 1.0) / (1u64 << 24) as f32
    }

    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.unit(), self.unit());
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
}
