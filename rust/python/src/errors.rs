//! Core errors to Python exceptions: one exhaustive match, so a new core variant without a mapping does not
//! compile. The classes are defined in Python (`llama_sessions/errors.py`) where they are documented.

use llama_sessions::Error;
use pyo3::exceptions::{PyFileNotFoundError, PyKeyboardInterrupt, PyOSError, PyPermissionError};
use pyo3::types::{PyAnyMethods, PyDictMethods};
use pyo3::{PyErr, Python};

pyo3::import_exception!(llama_sessions.errors, ModelLoadError);
pyo3::import_exception!(llama_sessions.errors, InvalidParameterError);
pyo3::import_exception!(llama_sessions.errors, ContextCreateError);
pyo3::import_exception!(llama_sessions.errors, ContextFullError);
pyo3::import_exception!(llama_sessions.errors, TokenizeError);
pyo3::import_exception!(llama_sessions.errors, DecodeError);
pyo3::import_exception!(llama_sessions.errors, ChatTemplateError);
pyo3::import_exception!(llama_sessions.errors, StreamInvalidatedError);
pyo3::import_exception!(llama_sessions.errors, InternalError);
pyo3::import_exception!(llama_sessions.errors, SessionCorruptError);
pyo3::import_exception!(llama_sessions.errors, SessionModelMismatchError);
pyo3::import_exception!(llama_sessions.errors, SessionParamsMismatchError);
pyo3::import_exception!(llama_sessions.errors, SessionVersionError);
pyo3::import_exception!(llama_sessions.errors, SessionInteropWarning);
pyo3::import_exception!(llama_sessions.errors, SessionNotFoundError);
pyo3::import_exception!(llama_sessions.errors, SessionExistsError);
pyo3::import_exception!(llama_sessions.errors, SessionConflictError);
pyo3::import_exception!(llama_sessions.errors, SessionBusyError);

/// Converts a core error into the Python exception users catch.
pub fn to_py(error: Error) -> PyErr {
    let message = error.to_string();
    match error {
        Error::ModelLoad { .. } => ModelLoadError::new_err(message),
        Error::InvalidParameter { .. } => InvalidParameterError::new_err(message),
        Error::ContextCreate { .. } => ContextCreateError::new_err(message),
        Error::ContextFull { .. } => ContextFullError::new_err(message),
        Error::Tokenize(_) => TokenizeError::new_err(message),
        Error::Decode { .. } => DecodeError::new_err(message),
        Error::ChatTemplate(_) => ChatTemplateError::new_err(message),
        Error::Interrupted => PyKeyboardInterrupt::new_err(message),
        Error::StreamInvalidated => StreamInvalidatedError::new_err(message),
        Error::Io { source, .. } => match source.kind() {
            std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(message),
            std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(message),
            _ => PyOSError::new_err(message),
        },
        Error::SessionCorrupt { .. } => SessionCorruptError::new_err(message),
        Error::SessionModelMismatch { .. } => SessionModelMismatchError::new_err(message),
        Error::SessionParamsMismatch { mismatches, .. } => {
            let error = SessionParamsMismatchError::new_err(message);
            // `mismatches`: {name: (saved, current)}, for code that wants to react to a specific parameter.
            Python::attach(|py| {
                let pairs: Vec<(&str, (String, String))> = mismatches
                    .into_iter()
                    .map(|m| (m.name, (m.saved, m.current)))
                    .collect();
                let dict = pyo3::types::PyDict::new(py);
                for (name, pair) in pairs {
                    if dict.set_item(name, pair).is_err() {
                        return;
                    }
                }
                let _ = error.value(py).setattr("mismatches", dict);
            });
            error
        }
        Error::SessionVersion { .. } => SessionVersionError::new_err(message),
        Error::SessionNotFound { .. } => SessionNotFoundError::new_err(message),
        Error::SessionExists { .. } => SessionExistsError::new_err(message),
        Error::SessionConflict { .. } => SessionConflictError::new_err(message),
        Error::SessionBusy { .. } => SessionBusyError::new_err(message),
        Error::Internal(_) => InternalError::new_err(message),
    }
}
