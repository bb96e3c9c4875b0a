//! `llama_sessions.Model`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use llama_sessions::{ChatMessage, LlamaToken, Model, ModelParams};
use pyo3::exceptions::PyKeyError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyInt, PyMapping, PySequence, PyString};

use crate::errors::InvalidParameterError;
use crate::native::native;

/// A GGUF model loaded by llama.cpp.
///
/// Immutable and thread-safe: share one Model between many Contexts and threads.
#[pyclass(name = "Model", module = "llama_sessions._native", frozen)]
pub struct PyModel {
    pub(crate) inner: Model,
}

pub(crate) fn tokens_from_py(tokens: Vec<i64>) -> PyResult<Vec<LlamaToken>> {
    tokens
        .into_iter()
        .map(|t| {
            i32::try_from(t).map(LlamaToken).map_err(|_| {
                crate::errors::TokenizeError::new_err(format!(
                    "token id {t}: expected a 32-bit token id"
                ))
            })
        })
        .collect()
}

pub(crate) fn tokens_to_py(tokens: &[LlamaToken]) -> Vec<i32> {
    tokens.iter().map(|t| t.0).collect()
}

/// The name of `value`'s type, for "found ..." in messages.
pub(crate) fn type_name(value: &Bound<'_, PyAny>) -> String {
    value
        .get_type()
        .name()
        .map_or_else(|_| "?".to_owned(), |n| n.to_string())
}

/// Token ids from any sequence of ints (a list, a tuple, ...); a str, a float or anything else raises
/// InvalidParameterError naming what was found (a str is a sequence, but of characters).
pub(crate) fn token_ids_from_py(name: &str, tokens: &Bound<'_, PyAny>) -> PyResult<Vec<i64>> {
    let invalid = |found: String| {
        InvalidParameterError::new_err(format!(
            "invalid {name}: expected a list of int (token ids), found {found}"
        ))
    };
    if tokens.is_instance_of::<PyString>()
        || tokens.is_instance_of::<PyBytes>()
        || tokens.cast::<PySequence>().is_err()
    {
        return Err(invalid(type_name(tokens)));
    }
    let sequence = tokens.cast::<PySequence>()?;
    let mut ids = Vec::with_capacity(sequence.len().unwrap_or(0));
    for (i, item) in sequence.try_iter()?.enumerate() {
        let item = item?;
        if !item.is_instance_of::<PyInt>() || item.is_instance_of::<PyBool>() {
            return Err(invalid(format!("a {} at index {i}", type_name(&item))));
        }
        ids.push(item.extract::<i64>().map_err(|_| {
            crate::errors::TokenizeError::new_err(format!(
                "token id {item} at index {i}: expected a 32-bit token id"
            ))
        })?);
    }
    Ok(ids)
}

/// The messages of a chat: any iterable of them (a list, a tuple, a generator, ...), each a mapping with a
/// str "role" and "content". A str, bytes or a single mapping is refused: iterating it gives no messages.
pub(crate) fn messages_from_py(messages: &Bound<'_, PyAny>) -> PyResult<Vec<ChatMessage>> {
    let refused = |found: String| {
        InvalidParameterError::new_err(format!(
            "invalid messages: expected a sequence of {{'role': str, 'content': str}} mappings, found {found}"
        ))
    };
    if messages.is_instance_of::<PyString>() || messages.is_instance_of::<PyBytes>() {
        return Err(refused(format!("a {}", type_name(messages))));
    }
    if messages.cast::<PyMapping>().is_ok() {
        return Err(refused(format!(
            "a single {} (pass a list of messages)",
            type_name(messages)
        )));
    }
    let items = messages
        .try_iter()
        .map_err(|_| refused(format!("a {}", type_name(messages))))?;
    items
        .enumerate()
        .map(|(i, item)| message_from_py(i, &item?))
        .collect()
}

fn message_from_py(index: usize, item: &Bound<'_, PyAny>) -> PyResult<ChatMessage> {
    let bad = |found: String| {
        InvalidParameterError::new_err(format!(
            "invalid messages[{index}]: expected a mapping with str 'role' and 'content', found {found}"
        ))
    };
    let mapping = item
        .cast::<PyMapping>()
        .map_err(|_| bad(format!("a {}", type_name(item))))?;
    let field = |key: &str| -> PyResult<String> {
        match mapping.get_item(key) {
            Ok(v) => v
                .extract::<String>()
                .map_err(|_| bad(format!("a non-str {key:?}"))),
            Err(e) if e.is_instance_of::<PyKeyError>(item.py()) => {
                Err(bad(format!("no {key:?} key")))
            }
            Err(e) => Err(e),
        }
    };
    Ok(ChatMessage {
        role: field("role")?,
        content: field("content")?,
    })
}

#[pymethods]
impl PyModel {
    /// Load a GGUF model.
    ///
    /// Raises ModelLoadError for a missing, non-GGUF or truncated file, with the reason.
    #[staticmethod]
    #[pyo3(signature = (path, *, n_gpu_layers = 0, use_mmap = true))]
    fn load(py: Python<'_>, path: PathBuf, n_gpu_layers: i64, use_mmap: bool) -> PyResult<Self> {
        let n_gpu_layers = u32::try_from(n_gpu_layers).map_err(|_| {
            InvalidParameterError::new_err(format!(
                "invalid n_gpu_layers: expected an integer >= 0, found {n_gpu_layers}"
            ))
        })?;
        let params = ModelParams {
            n_gpu_layers,
            use_mmap,
        };
        let inner = native(py, |_| Model::load(&path, &params))?;
        Ok(PyModel { inner })
    }

    /// The path the model was loaded from.
    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.path().to_path_buf()
    }

    /// ``general.architecture`` from the GGUF metadata, e.g. ``"llama"``.
    #[getter]
    fn architecture(&self) -> String {
        self.inner.architecture().to_owned()
    }

    /// Number of tokens in the vocabulary.
    #[getter]
    fn n_vocab(&self) -> usize {
        self.inner.n_vocab()
    }

    /// The context length the model was trained with (the largest n_ctx a Context accepts).
    #[getter]
    fn n_ctx_train(&self) -> u32 {
        self.inner.n_ctx_train()
    }

    /// Number of layers.
    #[getter]
    fn n_layer(&self) -> u32 {
        self.inner.n_layer()
    }

    /// Embedding width.
    #[getter]
    fn n_embd(&self) -> u32 {
        self.inner.n_embd()
    }

    /// How llama.cpp keeps the memory of a sequence: ``"attention"`` (one KV cache), ``"sliding_window"``
    /// (a full-attention cache and a window cache), ``"hybrid"`` (attention and recurrent layers) or
    /// ``"recurrent"``. See docs/architectures.md for what each supports.
    #[getter]
    fn memory(&self) -> &'static str {
        self.inner.memory_kind().as_str()
    }

    /// Whether llama.cpp can cut a sequence back in place. When it cannot (recurrent state),
    /// ``Context.truncate`` decodes the kept tokens again from the start: still exact, at the cost of
    /// decoding them.
    #[getter]
    fn partial_truncation(&self) -> bool {
        self.inner.memory_kind().partial_truncation()
    }

    /// The sliding window in tokens (0 without one).
    #[getter]
    fn n_swa(&self) -> u32 {
        self.inner.n_swa()
    }

    /// The GGUF metadata, every value rendered as a string by llama.cpp.
    #[getter]
    fn metadata(&self) -> BTreeMap<String, String> {
        self.inner.metadata().clone()
    }

    /// The model's chat template (Jinja source), or None.
    #[getter]
    fn chat_template(&self) -> Option<String> {
        self.inner.chat_template()
    }

    /// A short string identifying the model's content.
    ///
    /// BLAKE3 over the whole GGUF header (metadata, tensor names, types, shapes) and a fixed sample of
    /// every tensor's data; see docs/fingerprint.md for what it does and does not detect.
    #[getter]
    fn fingerprint(&self) -> String {
        self.inner.fingerprint().to_owned()
    }

    /// Turn text into token ids.
    ///
    /// ``add_bos`` adds the beginning-of-sequence token if the model uses one; ``special`` parses
    /// special-token text such as ``"<|im_start|>"`` into control tokens (otherwise it is plain text).
    ///
    /// ``Context.generate`` and ``Context.stream`` tokenize their prompt with ``special=True`` (the caller
    /// writes the markup), so to count a prompt's tokens as they will, pass ``special=True``: with the
    /// default, each ``<|im_start|>`` of a templated prompt is several plain-text tokens instead of one.
    #[pyo3(signature = (text, add_bos = true, special = false))]
    fn tokenize(
        &self,
        py: Python<'_>,
        text: &str,
        add_bos: bool,
        special: bool,
    ) -> PyResult<Vec<i32>> {
        let tokens = native(py, |_| self.inner.tokenize(text, add_bos, special))?;
        Ok(tokens_to_py(&tokens))
    }

    /// Turn token ids (a list, tuple or other sequence of int) into text. ``special`` renders control
    /// tokens as their text.
    ///
    /// Raises InvalidParameterError for anything but a sequence of int (a str is refused, not read as
    /// characters), TokenizeError for an id outside the vocabulary.
    #[pyo3(signature = (tokens, special = false))]
    fn detokenize(
        &self,
        py: Python<'_>,
        tokens: &Bound<'_, PyAny>,
        special: bool,
    ) -> PyResult<String> {
        let tokens = tokens_from_py(token_ids_from_py("tokens", tokens)?)?;
        native(py, |_| self.inner.detokenize(&tokens, special))
    }

    /// Format ``[{"role": ..., "content": ...}, ...]`` with the model's chat template.
    ///
    /// ``messages`` may be any sequence or iterable of such mappings (a list, a tuple, a generator); a str,
    /// bytes or a single mapping raises InvalidParameterError, as does a message without a str "role" and
    /// "content".
    ///
    /// Uses llama.cpp's built-in template engine (the common templates, not a full Jinja engine).
    /// Raises ChatTemplateError when the model has no usable template.
    #[pyo3(signature = (messages, add_generation_prompt = true))]
    fn apply_chat_template(
        &self,
        py: Python<'_>,
        messages: &Bound<'_, PyAny>,
        add_generation_prompt: bool,
    ) -> PyResult<String> {
        let messages = messages_from_py(messages)?;
        native(py, |_| {
            self.inner
                .apply_chat_template(&messages, add_generation_prompt)
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "Model(path={:?}, architecture={:?}, fingerprint={:?})",
            self.inner.path(),
            self.inner.architecture(),
            self.inner.fingerprint()
        )
    }
}
