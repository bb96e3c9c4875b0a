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
    m.add_class::<manager::PySessionManager>()?;
    m.add_class::<manager::PyStoredSession>()?;
    m.add_class::<manager::ChatStream>()?;
    m.add_function(wrap_pyfunction!(manager::list_sessions, m)?)?;
    m.add_function(wrap_pyfunction!(manager::delete_session, m)?)?;
    m.add_function(wrap_pyfunction!(manager::validate_session_id, m)?)?;
    m.add_function(wrap_pyfunction!(session::inspect_session, m)?)?;
    m.add("__version__", llama_sessions::VERSION)?;
    Ok(())
}
