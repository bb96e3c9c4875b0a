//! The process-wide llama.cpp backend and its log.
//!
//! `LlamaBackend::init()` succeeds only once per process, so the backend lives in a `OnceLock`. llama.cpp
//! logs everything to stderr by default; we route its log through a callback that keeps the recent warnings
//! and errors of the calling thread (so that a failure can say *why*, e.g. "failed to allocate buffer"), and
//! prints them only when `LLAMA_SESSIONS_LOG` is set.

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr};
use std::sync::OnceLock;

use llama_cpp_2::llama_backend::LlamaBackend;

use crate::error::{Error, Result};

static BACKEND: OnceLock<std::result::Result<LlamaBackend, String>> = OnceLock::new();

/// How much recent log text each thread keeps for error messages.
const RECENT_LOG_LIMIT: usize = 4096;

thread_local! {
    static RECENT_LOG: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Whether llama.cpp's log goes to stderr: `LLAMA_SESSIONS_LOG`, read once when the backend starts. The log
/// callback runs on llama.cpp's threads, where reading the environment would race with Python writing it
/// (`getenv` against `setenv` is undefined behaviour in C).
static PRINT_LOG: OnceLock<bool> = OnceLock::new();

/// The backend, initialised on first use.
pub(crate) fn backend() -> Result<&'static LlamaBackend> {
    BACKEND
        .get_or_init(|| {
            PRINT_LOG.get_or_init(|| std::env::var_os("LLAMA_SESSIONS_LOG").is_some());
            install_log_callback();
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| Error::Internal(format!("llama.cpp backend initialisation failed: {e}")))
}

fn install_log_callback() {
    // SAFETY: `capture_log` has the exact signature of `ggml_log_callback`, never unwinds (it catches panics)
    // and ignores `user_data`, so passing a null pointer for it is sound. llama.cpp stores the pointer in a
    // global and calls it from any thread; `capture_log` only touches thread-local state.
    unsafe { llama_cpp_sys_2::llama_log_set(Some(capture_log), std::ptr::null_mut()) };
}

unsafe extern "C" fn capture_log(
    level: llama_cpp_sys_2::ggml_log_level,
    text: *const c_char,
    _user_data: *mut c_void,
) {
    if text.is_null() {
        return;
    }
    // SAFETY: llama.cpp passes a NUL-terminated string that stays valid for the duration of this call; we
    // copy it before returning.
    let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    let _ = std::panic::catch_unwind(|| record_log(level, &text));
}

fn record_log(level: llama_cpp_sys_2::ggml_log_level, text: &str) {
    let important = level == llama_cpp_sys_2::GGML_LOG_LEVEL_WARN
        || level == llama_cpp_sys_2::GGML_LOG_LEVEL_ERROR
        || level == llama_cpp_sys_2::GGML_LOG_LEVEL_CONT;
    if *PRINT_LOG.get_or_init(|| false) {
        eprint!("{text}");
    }
    if !important {
        return;
    }
    RECENT_LOG.with(|log| {
        let mut log = log.borrow_mut();
        log.push_str(text);
        if log.len() > RECENT_LOG_LIMIT {
            let mut cut = log.len() - RECENT_LOG_LIMIT;
            while !log.is_char_boundary(cut) {
                cut += 1;
            }
            log.drain(..cut);
        }
    });
}

/// Forget this thread's recent log, so that the next [`take_recent_log`] returns only what follows.
pub(crate) fn clear_recent_log() {
    RECENT_LOG.with(|log| log.borrow_mut().clear());
}

/// The warnings and errors llama.cpp logged on this thread since the last [`clear_recent_log`], one line
/// each, or a fallback when it logged nothing.
pub(crate) fn take_recent_log(fallback: &str) -> String {
    let text = RECENT_LOG.with(|log| std::mem::take(&mut *log.borrow_mut()));
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        fallback.to_owned()
    } else {
        lines.join("; ")
    }
}
