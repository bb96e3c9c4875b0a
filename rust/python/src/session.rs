//! `SessionInfo`, `inspect_session`, and the conversions the session methods of `Context` need (metadata as
//! JSON, sequence ids, interop warnings).

use std::path::PathBuf;

use llama_sessions::SessionKey;
use llama_sessions::{default_threads, Metadata, SeqId, SessionFormat, SessionInfo};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyDict, PyString};

use crate::errors::{to_py, InvalidParameterError, SessionInteropWarning};
use crate::native::native;
use crate::params::PyContextParams;

/// What a session holds, read from its verified header.
#[pyclass(name = "SessionInfo", module = "llama_sessions._native", frozen)]
pub struct PySessionInfo {
    pub(crate) info: SessionInfo,
}

#[pymethods]
impl PySessionInfo {
    /// "llama-sessions" or "llama.cpp" (llama.cpp's own session file).
    #[getter]
    fn format(&self) -> &'static str {
        self.info.format.as_str()
    }

    /// Version of that file format.
    #[getter]
    fn format_version(&self) -> u32 {
        self.info.format_version
    }

    /// Version of llama-sessions that wrote it (None for a llama.cpp file).
    #[getter]
    fn library_version(&self) -> Option<&str> {
        non_empty(&self.info.header.library_version)
    }

    /// The llama.cpp build whose state layout the bytes have (None for a llama.cpp file).
    #[getter]
    fn llama_cpp_build(&self) -> Option<&str> {
        non_empty(&self.info.header.llama_cpp_build)
    }

    /// When it was written, as an aware UTC datetime (None for a llama.cpp file).
    #[getter]
    fn created_at<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        match non_empty(&self.info.header.created_at) {
            None => Ok(None),
            Some(text) => py
                .import("datetime")?
                .getattr("datetime")?
                .call_method1("fromisoformat", (text,))
                .map(Some),
        }
    }

    /// Fingerprint of the model it belongs to (None for a llama.cpp file).
    #[getter]
    fn model_fingerprint(&self) -> Option<&str> {
        non_empty(&self.info.header.model.fingerprint)
    }

    /// `general.name` of that model, if it has one.
    #[getter]
    fn model_name(&self) -> Option<&str> {
        self.info.header.model.name.as_deref()
    }

    /// Architecture of that model (None for a llama.cpp file).
    #[getter]
    fn model_architecture(&self) -> Option<&str> {
        non_empty(&self.info.header.model.architecture)
    }

    /// File name the model was loaded from.
    #[getter]
    fn model_file_name(&self) -> Option<&str> {
        self.info.header.model.file_name.as_deref()
    }

    /// The context parameters it was saved with (n_threads is this machine's default); None for a llama.cpp
    /// file.
    #[getter]
    fn params(&self) -> PyResult<Option<PyContextParams>> {
        if self.info.format == SessionFormat::LlamaCpp {
            return Ok(None);
        }
        llama_sessions::params_from_record(&self.info.header.params, default_threads(), "session")
            .map(|inner| Some(PyContextParams { inner }))
            .map_err(to_py)
    }

    /// The tokens of each saved sequence, by sequence id.
    #[getter]
    fn sequences<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        for record in &self.info.header.sequences {
            dict.set_item(record.seq, &record.tokens)?;
        }
        Ok(dict)
    }

    /// Tokens held, over all sequences.
    #[getter]
    fn token_count(&self) -> usize {
        self.info.token_count()
    }

    /// The user's metadata.
    #[getter]
    fn metadata<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let text = serde_json::to_string(&self.info.header.metadata)
            .map_err(|e| to_py(llama_sessions::Error::Internal(e.to_string())))?;
        py.import("json")?.call_method1("loads", (text,))
    }

    /// Bytes of header.
    #[getter]
    fn header_bytes(&self) -> usize {
        self.info.header_bytes
    }

    /// Bytes of llama.cpp state (the KV cache rows of the tokens held).
    #[getter]
    fn state_bytes(&self) -> usize {
        self.info.state_bytes
    }

    /// Bytes of the whole session.
    #[getter]
    fn total_bytes(&self) -> usize {
        self.info.total_bytes
    }

    /// Whether the session is signed: loading it needs the secret_key it was signed with.
    #[getter]
    fn signed(&self) -> bool {
        self.info.signed
    }

    fn __repr__(&self) -> String {
        format!(
            "SessionInfo(format={:?}, tokens={}, model={:?}, total_bytes={}, signed={})",
            self.info.format.as_str(),
            self.info.token_count(),
            self.info
                .header
                .model
                .name
                .as_deref()
                .unwrap_or(&self.info.header.model.fingerprint),
            self.info.total_bytes,
            if self.info.signed { "True" } else { "False" }
        )
    }
}

fn non_empty(text: &str) -> Option<&str> {
    (!text.is_empty()).then_some(text)
}

/// Reads and verifies a session from a path or from bytes, without a model.
#[pyfunction]
#[pyo3(signature = (source, *, secret_key = None))]
pub fn inspect_session(
    py: Python<'_>,
    source: Bound<'_, PyAny>,
    secret_key: Option<PyBackedBytes>,
) -> PyResult<PySessionInfo> {
    let key = session_key(secret_key)?;
    let info = if let Ok(bytes) = source.extract::<PyBackedBytes>() {
        native(py, |_| {
            llama_sessions::inspect_session_bytes(&bytes, "session bytes", key.as_ref())
        })
    } else {
        let path: PathBuf = source.extract()?;
        native(py, |_| llama_sessions::inspect_session(&path, key.as_ref()))
    };
    info.map(|info| PySessionInfo { info })
}

/// The key derived from a `secret_key` argument (bytes of at least 16), if one was given.
pub fn session_key(secret_key: Option<PyBackedBytes>) -> PyResult<Option<SessionKey>> {
    secret_key
        .map(|secret| SessionKey::new(&secret))
        .transpose()
        .map_err(to_py)
}

/// `metadata` (a dict of JSON values, or None) as the core's JSON object.
pub fn metadata_from_py(py: Python<'_>, metadata: Option<Bound<'_, PyAny>>) -> PyResult<Metadata> {
    let Some(metadata) = metadata.filter(|m| !m.is_none()) else {
        return Ok(Metadata::new());
    };
    let invalid = |found: String| {
        InvalidParameterError::new_err(format!(
            "invalid metadata: expected a dict of JSON values (str keys; str, int, float, bool, None, list, \
             dict values), found {found}"
        ))
    };
    if !metadata.is_instance_of::<PyDict>() {
        return Err(invalid(metadata.get_type().name()?.to_string()));
    }
    let text = py
        .import("json")?
        .call_method1("dumps", (&metadata,))
        .map_err(|e| invalid(e.value(py).to_string()))?;
    let text: String = text.cast::<PyString>()?.extract()?;
    serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))
}

/// A sequence id argument: `None` (all sequences) or `0 <= seq`; the upper bound is checked by the core.
pub fn seq_arg(seq: Option<i64>) -> PyResult<Option<SeqId>> {
    seq.map(seq_id).transpose()
}

/// A sequence id: `0 <= seq` (the upper bound, n_seq_max, is checked by the core).
pub fn seq_id(seq: i64) -> PyResult<SeqId> {
    SeqId::try_from(seq).map_err(|_| {
        InvalidParameterError::new_err(format!(
            "invalid seq: expected 0 <= seq < n_seq_max, found {seq}"
        ))
    })
}

/// Shows the core's warnings as `SessionInteropWarning`s.
pub fn warn_all(py: Python<'_>, warnings: &[String]) -> PyResult<()> {
    let category = py.get_type::<SessionInteropWarning>();
    for warning in warnings {
        let message =
            std::ffi::CString::new(warning.replace('\0', " ")).expect("NULs were replaced");
        PyErr::warn(py, &category, &message, 1)?;
    }
    Ok(())
}
