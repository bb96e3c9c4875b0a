//! Core errors to Python exceptions: one exhaustive match, so a new core variant without a mapping does not
//! compile. The classes are defined in Python (`llama_sessions/errors.py`) where they are documented.

use llama_sessions::Error;
use pyo3::exceptions::{PyFileNotFoundError, PyKeyboardInterrupt, PyOSError, PyPermissionError};
use pyo3::PyErr;

pyo3::import_exception!(llama_sessions.errors, ModelLoadError);
pyo3::import_exception!(llama_sessions.errors, InvalidParameterError);
pyo3::import_exception!(llama_sessions.errors, ContextCreateError);
pyo3::import_exception!(llama_sessions.errors, ContextFullError);
pyo3::import_exception!(llama_sessions.errors, TokenizeError);
pyo3::import_exception!(llama_sessions.errors, DecodeError);
pyo3::import_exception!(llama_sessions.errors, ChatTemplateError);
pyo3::import_exception!(llama_sessions.errors, StreamInvalidatedError);
pyo3::import_exception!(llama_sessions.errors, InternalError);

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
        Error::Internal(_) => InternalError::new_err(message),
    }
}
