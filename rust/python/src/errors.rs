//! Core errors to Python exceptions: one exhaustive match, so a new core variant without a mapping does not
//! compile. The classes are defined in Python (`llama_sessions/errors.py`) where they are documented.

use llama_sessions::{Error, ParamValue};
use pyo3::exceptions::PyKeyboardInterrupt;
use pyo3::types::{PyAnyMethods, PyDictMethods};
use pyo3::{PyErr, Python};

pyo3::import_exception!(llama_sessions.errors, ModelLoadError);
pyo3::import_exception!(llama_sessions.errors, InvalidParameterError);
pyo3::import_exception!(llama_sessions.errors, ContextCreateError);
pyo3::import_exception!(llama_sessions.errors, ContextFullError);
pyo3::import_exception!(llama_sessions.errors, KvBudgetFullError);
pyo3::import_exception!(llama_sessions.errors, TokenizeError);
pyo3::import_exception!(llama_sessions.errors, DecodeError);
pyo3::import_exception!(llama_sessions.errors, ChatTemplateError);
pyo3::import_exception!(llama_sessions.errors, StreamInvalidatedError);
pyo3::import_exception!(llama_sessions.errors, InternalError);
pyo3::import_exception!(llama_sessions.errors, SessionCorruptError);
pyo3::import_exception!(llama_sessions.errors, SessionModelMismatchError);
pyo3::import_exception!(llama_sessions.errors, SessionParamsMismatchError);
pyo3::import_exception!(llama_sessions.errors, SessionVersionError);
pyo3::import_exception!(llama_sessions.errors, SessionSignatureError);
pyo3::import_exception!(llama_sessions.errors, SessionInteropWarning);
pyo3::import_exception!(llama_sessions.errors, SessionNotFoundError);
pyo3::import_exception!(llama_sessions.errors, SessionExistsError);
pyo3::import_exception!(llama_sessions.errors, SessionConflictError);
pyo3::import_exception!(llama_sessions.errors, SessionBusyError);
pyo3::import_exception!(llama_sessions.errors, RemoteStoreError);

/// errno of an I/O error: the OS's own, or the closest one for errors raised without one.
fn errno_of(error: &std::io::Error) -> i32 {
    use std::io::ErrorKind;
    error.raw_os_error().unwrap_or(match error.kind() {
        ErrorKind::NotFound => libc_errno::ENOENT,
        ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem => libc_errno::EACCES,
        ErrorKind::IsADirectory => libc_errno::EISDIR,
        ErrorKind::NotADirectory => libc_errno::ENOTDIR,
        ErrorKind::AlreadyExists => libc_errno::EEXIST,
        ErrorKind::StorageFull => libc_errno::ENOSPC,
        ErrorKind::OutOfMemory => libc_errno::ENOMEM,
        _ => libc_errno::EIO,
    })
}

/// The errno values used above (Linux's, which are also those of the other Unix systems for these).
mod libc_errno {
    pub const ENOENT: i32 = 2;
    pub const EIO: i32 = 5;
    pub const ENOMEM: i32 = 12;
    pub const EACCES: i32 = 13;
    pub const EEXIST: i32 = 17;
    pub const ENOTDIR: i32 = 20;
    pub const EISDIR: i32 = 21;
    pub const ENOSPC: i32 = 28;
}

/// A `StorageError` (an `OSError` and a `LlamaSessionsError`, of the built-in subclass matching its errno) with
/// `errno`, `strerror` and `filename` set.
fn storage_error(op: &str, path: &std::path::Path, source: &std::io::Error) -> PyErr {
    let code = errno_of(source);
    let reason = source.to_string();
    let reason = reason
        .split(" (os error")
        .next()
        .unwrap_or(&reason)
        .to_owned();
    let strerror = format!("cannot {op}: {reason}");
    Python::attach(|py| {
        let made = py
            .import("llama_sessions.errors")
            .and_then(|m| m.getattr("_storage_error"))
            .and_then(|f| f.call1((code, strerror.clone(), path.to_string_lossy().into_owned())));
        match made {
            Ok(error) => PyErr::from_value(error),
            Err(e) => e,
        }
    })
}

/// A parameter's value as the Python object a ContextParams field holds: an int, a str or a bool.
fn param_value(py: Python<'_>, value: ParamValue) -> pyo3::Py<pyo3::PyAny> {
    use pyo3::IntoPyObjectExt;
    let object = match value {
        ParamValue::Int(n) => n.into_py_any(py),
        ParamValue::Text(text) => text.into_py_any(py),
        ParamValue::Bool(b) => b.into_py_any(py),
    };
    object.unwrap_or_else(|_| py.None())
}

/// Converts a core error into the Python exception users catch.
pub fn to_py(error: Error) -> PyErr {
    let message = error.to_string();
    match error {
        Error::ModelLoad { .. } => ModelLoadError::new_err(message),
        Error::InvalidParameter { .. } => InvalidParameterError::new_err(message),
        Error::ContextCreate { .. } => ContextCreateError::new_err(message),
        Error::ContextFull { .. } | Error::ChatOverflow { .. } => {
            ContextFullError::new_err(message)
        }
        Error::KvBudgetFull { .. } => KvBudgetFullError::new_err(message),
        Error::Tokenize(_) => TokenizeError::new_err(message),
        Error::Decode { .. } => DecodeError::new_err(message),
        Error::ChatTemplate(_) => ChatTemplateError::new_err(message),
        Error::Interrupted => PyKeyboardInterrupt::new_err(message),
        Error::StreamInvalidated => StreamInvalidatedError::new_err(message),
        Error::Io { op, path, source } => storage_error(op, &path, &source),
        Error::RemoteStore { .. } => RemoteStoreError::new_err(message),
        Error::SessionCorrupt { .. } => SessionCorruptError::new_err(message),
        Error::SessionModelMismatch { .. } => SessionModelMismatchError::new_err(message),
        Error::SessionParamsMismatch {
            mismatches, advice, ..
        } => {
            let error = SessionParamsMismatchError::new_err(message);
            // `mismatches`: {name: (saved, current)}, each value of the parameter's own type, for code that
            // wants to react to a specific parameter.
            Python::attach(|py| {
                let dict = pyo3::types::PyDict::new(py);
                for m in mismatches {
                    let pair = (param_value(py, m.saved), param_value(py, m.current));
                    if dict.set_item(m.name, pair).is_err() {
                        return;
                    }
                }
                let value = error.value(py);
                let _ = value.setattr("mismatches", dict);
                let _ = value.setattr("advice", advice);
            });
            error
        }
        Error::SessionVersion { .. } => SessionVersionError::new_err(message),
        Error::SessionSignature { .. } => SessionSignatureError::new_err(message),
        Error::SessionNotFound { .. } => SessionNotFoundError::new_err(message),
        Error::SessionExists { .. } => SessionExistsError::new_err(message),
        Error::SessionConflict { .. } => SessionConflictError::new_err(message),
        Error::SessionBusy { .. } => SessionBusyError::new_err(message),
        Error::Internal(_) => InternalError::new_err(message),
    }
}
