#![no_main]
//! See `llama_sessions_fuzz::checks::check_memory`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    llama_sessions_fuzz::checks::check_memory(data);
});
