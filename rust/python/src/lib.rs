//! `llama_sessions._native`: the thin PyO3 layer over the `llama-sessions` core. It converts types,
//! releases the GIL around native work and maps errors (all three through [`native::native`]); all logic
//! lives in the core crate.

mod context;
mod errors;
mod interrupt;
mod manager;
mod model;
mod native;
mod params;
mod prefix_cache;
mod progress;
mod session;

use pyo3::prelude::*;

/// Native core of llama_sessions. Import from `llama_sessions`, not from here.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<model::PyModel>()?;
    m.add_class::<params::PyContextParams>()?;
    m.add_class::<context::PyContext>()?;
    m.add_class::<context::TokenStream>()?;
    m.add_class::<context::PyGenerationStats>()?;
    m.add_class::<session::PySessionInfo>()?;
    m.add_class::<prefix_cache::PyPrefixCache>()?;
    m.add_class::<manager::PySessionManager>()?;
    m.add_class::<manager::PyStoredSession>()?;
    m.add_class::<manager::ChatStream>()?;
    m.add_function(wrap_pyfunction!(manager::list_sessions, m)?)?;
    m.add_function(wrap_pyfunction!(manager::inspect_stored_session, m)?)?;
    m.add_function(wrap_pyfunction!(manager::delete_session, m)?)?;
    m.add_function(wrap_pyfunction!(manager::validate_session_id, m)?)?;
    m.add_function(wrap_pyfunction!(session::inspect_session, m)?)?;
    m.add("__version__", llama_sessions::VERSION)?;
    m.add(
        "LLAMA_CPP_BUILD",
        llama_sessions::session_format::LLAMA_CPP_BUILD,
    )?;
    let defaults = pyo3::types::PyDict::new(m.py());
    let sampling = llama_sessions::DEFAULT_SAMPLING;
    // The f32 values as their shortest decimal (0.8, not 0.800000011920929), which is what Python users type.
    let decimal = |x: f32| x.to_string().parse::<f64>().unwrap_or(f64::from(x));
    defaults.set_item("max_tokens", llama_sessions::DEFAULT_MAX_TOKENS)?;
    defaults.set_item("temperature", decimal(sampling.temperature))?;
    defaults.set_item("top_k", sampling.top_k)?;
    defaults.set_item("top_p", decimal(sampling.top_p))?;
    defaults.set_item("min_p", decimal(sampling.min_p))?;
    defaults.set_item("repeat_penalty", decimal(sampling.repeat_penalty))?;
    m.add("SAMPLING_DEFAULTS", defaults)?;
    Ok(())
}
