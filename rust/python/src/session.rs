//! `SessionInfo`, `inspect_session`, and the conversions the session methods of `Context` need (metadata as
//! JSON, sequence ids, interop warnings).

use std::path::PathBuf;

use llama_sessions::SessionKey;
use llama_sessions::{default_threads, Metadata, SeqId, SessionFormat, SessionInfo};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

use crate::errors::{to_py, InvalidParameterError, SessionInteropWarning};
use crate::native::native;
use crate::params::PyContextParams;

/// What a session holds, read from its verified header (see inspect_session()).
#[pyclass(name = "SessionInfo", module = "llama_sessions._native", frozen)]
pub struct PySessionInfo {
    pub(crate) info: SessionInfo,
}

#[pymethods]
impl PySessionInfo {
    /// "llama-sessions", or "llama.cpp" for llama.cpp's own session file.
    #[getter]
    fn format(&self) -> &'static str {
        self.info.format.as_str()
    }

    /// Version of that format.
    #[getter]
    fn format_version(&self) -> u32 {
        self.info.format_version
    }

    /// For a chunk manifest (how a SessionManager stores a session by default), how many KV chunks it
    /// names in the manager's chunk store; None for a session in one file.
    #[getter]
    fn chunks(&self) -> Option<usize> {
        self.info.header.chunks.as_ref().map(|m| m.chunks.len())
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

    /// When it was written, an aware UTC datetime (None for a llama.cpp file).
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

    /// ``general.name`` of that model, if it has one.
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

    /// The parameters it was saved with (n_threads is this machine's default); None for a llama.cpp
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

    /// The metadata given to save_session() or snapshot().
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

    /// Bytes of llama.cpp state: the KV cache rows of the tokens held, nothing else.
    #[getter]
    fn state_bytes(&self) -> usize {
        self.info.state_bytes
    }

    /// Bytes of the whole session.
    #[getter]
    fn total_bytes(&self) -> usize {
        self.info.total_bytes
    }

    /// Whether the session is signed (loading it needs the secret_key it was signed with).
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

/// Read and verify a session file or session bytes without a model.
///
/// A llama-sessions session is checked completely (SessionCorruptError, SessionVersionError); a signed one
/// by its checksum, and by its signature when ``secret_key`` is given (SessionSignatureError). Of a
/// llama.cpp session file only the header can be checked.
#[pyfunction]
#[pyo3(signature = (source, *, secret_key = None))]
pub fn inspect_session(
    py: Python<'_>,
    source: Bound<'_, PyAny>,
    secret_key: Option<PyBackedBytes>,
) -> PyResult<PySessionInfo> {
    let key = session_key(secret_key)?;
    let info = if let Some(bytes) = session_bytes_from_py(&source)? {
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

/// `metadata` (a dict of JSON values, or None) as the core's JSON object. Converted value by value, so that
/// nothing is changed on the way: a non-str key (which `json.dumps` would turn into a string), a NaN or an
/// infinity (which JSON cannot represent) or any other type raises InvalidParameterError naming where it is.
pub fn metadata_from_py(py: Python<'_>, metadata: Option<Bound<'_, PyAny>>) -> PyResult<Metadata> {
    let _ = py;
    let Some(metadata) = metadata.filter(|m| !m.is_none()) else {
        return Ok(Metadata::new());
    };
    if !metadata.is_instance_of::<PyDict>() {
        return Err(invalid_metadata(format!(
            "found {}",
            crate::model::type_name(&metadata)
        )));
    }
    match json_from_py(&metadata, "metadata", 0)? {
        serde_json::Value::Object(map) => Ok(map),
        _ => unreachable!("a dict converts to a JSON object"),
    }
}

/// Deepest nesting of metadata: what serde_json reads back (its recursion limit is 128).
const MAX_METADATA_DEPTH: usize = 100;

fn invalid_metadata(found: String) -> PyErr {
    InvalidParameterError::new_err(format!(
        "invalid metadata: expected a dict of JSON values (str keys; str, int, float, bool, None, list, dict \
         values), {found}"
    ))
}

/// One JSON value from Python; `path` says where it is (`metadata['a'][0]`).
fn json_from_py(value: &Bound<'_, PyAny>, path: &str, depth: usize) -> PyResult<serde_json::Value> {
    use serde_json::Value;
    if depth > MAX_METADATA_DEPTH {
        return Err(invalid_metadata(format!(
            "found {path} nested deeper than {MAX_METADATA_DEPTH} levels"
        )));
    }
    if value.is_none() {
        return Ok(Value::Null);
    }
    if value.is_instance_of::<PyBool>() {
        return Ok(Value::Bool(value.extract()?));
    }
    if value.is_instance_of::<PyInt>() {
        if let Ok(n) = value.extract::<i64>() {
            return Ok(Value::from(n));
        }
        if let Ok(n) = value.extract::<u64>() {
            return Ok(Value::from(n));
        }
        return Err(invalid_metadata(format!(
            "found {path} = {value}, an int outside the 64-bit range JSON readers keep exactly"
        )));
    }
    if value.is_instance_of::<PyFloat>() {
        let x: f64 = value.extract()?;
        return serde_json::Number::from_f64(x)
            .map(Value::Number)
            .ok_or_else(|| {
                invalid_metadata(format!(
                    "found {path} = {}: JSON has no NaN or infinity",
                    value
                        .repr()
                        .map_or_else(|_| x.to_string(), |r| r.to_string())
                ))
            });
    }
    if value.is_instance_of::<PyString>() {
        return Ok(Value::String(value.extract()?));
    }
    if let Ok(dict) = value.cast::<PyDict>() {
        let mut map = Metadata::new();
        for (key, item) in dict.iter() {
            if !key.is_instance_of::<PyString>() {
                return Err(invalid_metadata(format!(
                    "found the key {} ({}) in {path}",
                    key.repr()?,
                    crate::model::type_name(&key)
                )));
            }
            let key: String = key.extract()?;
            let inner = format!("{path}[{key:?}]");
            map.insert(key, json_from_py(&item, &inner, depth + 1)?);
        }
        return Ok(Value::Object(map));
    }
    if value.is_instance_of::<PyList>() || value.is_instance_of::<PyTuple>() {
        let items = value
            .try_iter()?
            .enumerate()
            .map(|(i, item)| json_from_py(&item?, &format!("{path}[{i}]"), depth + 1))
            .collect::<PyResult<Vec<_>>>()?;
        return Ok(Value::Array(items));
    }
    Err(invalid_metadata(format!(
        "found {path} of type {}",
        crate::model::type_name(value)
    )))
}

/// Session bytes from `bytes` (no copy) or any other object of the buffer protocol (bytearray, memoryview,
/// array, mmap, ...: copied once); `None` when `data` is not a buffer.
pub fn session_bytes_from_py(data: &Bound<'_, PyAny>) -> PyResult<Option<PyBackedBytes>> {
    if let Ok(bytes) = data.extract::<PyBackedBytes>() {
        return Ok(Some(bytes));
    }
    let py = data.py();
    let Ok(view) = py.import("builtins")?.getattr("memoryview")?.call1((data,)) else {
        return Ok(None);
    };
    // `tobytes` copies the buffer's bytes in C order, whatever its item format or strides.
    let copied = view.call_method0("tobytes")?;
    view.call_method0("release")?;
    Ok(Some(copied.extract::<PyBackedBytes>()?))
}

/// [`session_bytes_from_py`] for an argument that must be session bytes.
pub fn session_bytes_arg(name: &str, data: &Bound<'_, PyAny>) -> PyResult<PyBackedBytes> {
    session_bytes_from_py(data)?.ok_or_else(|| {
        InvalidParameterError::new_err(format!(
            "invalid {name}: expected bytes or another bytes-like object (bytearray, memoryview, ...), found {}",
            crate::model::type_name(data)
        ))
    })
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
