//! `llama_sessions.ContextParams`: an immutable, typed record of a Context's parameters.

use llama_sessions::{default_threads, ContextParams, KvType};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::InvalidParameterError;

const FIELDS: [&str; 7] = [
    "n_ctx",
    "n_batch",
    "n_threads",
    "type_k",
    "type_v",
    "flash_attn",
    "n_seq_max",
];

/// Parameters of a Context. Immutable; `replace(**changes)` returns a modified copy.
///
/// Every field that shapes the saved state is explicit: `flash_attn` is True or False, never "auto".
#[pyclass(
    name = "ContextParams",
    module = "llama_sessions._native",
    frozen,
    eq,
    hash
)]
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PyContextParams {
    pub(crate) inner: ContextParams,
}

fn positive_u32(name: &'static str, value: i64) -> PyResult<u32> {
    u32::try_from(value).ok().filter(|v| *v > 0).ok_or_else(|| {
        InvalidParameterError::new_err(format!(
            "invalid {name}: expected an integer >= 1, found {value}"
        ))
    })
}

fn kv_type(name: &'static str, value: &str) -> PyResult<KvType> {
    KvType::parse(name, value).map_err(crate::errors::to_py)
}

fn strict_bool(name: &'static str, value: &Bound<'_, PyAny>) -> PyResult<bool> {
    if value.is_instance_of::<pyo3::types::PyBool>() {
        value.extract()
    } else {
        Err(InvalidParameterError::new_err(format!(
            "invalid {name}: expected True or False, found {}",
            value.repr()?
        )))
    }
}

impl PyContextParams {
    /// Applies keyword overrides to `base`, rejecting unknown names.
    pub(crate) fn with_overrides(
        base: &ContextParams,
        overrides: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<ContextParams> {
        let mut params = base.clone();
        let Some(overrides) = overrides else {
            return Ok(params);
        };
        for (key, value) in overrides.iter() {
            let key: String = key.extract()?;
            match key.as_str() {
                "n_ctx" => params.n_ctx = positive_u32("n_ctx", value.extract()?)?,
                "n_batch" => params.n_batch = positive_u32("n_batch", value.extract()?)?,
                "n_threads" => {
                    params.n_threads = if value.is_none() {
                        default_threads()
                    } else {
                        positive_u32("n_threads", value.extract()?)?
                    }
                }
                "type_k" => params.type_k = kv_type("type_k", &value.extract::<String>()?)?,
                "type_v" => params.type_v = kv_type("type_v", &value.extract::<String>()?)?,
                "flash_attn" => params.flash_attn = strict_bool("flash_attn", &value)?,
                "n_seq_max" => params.n_seq_max = positive_u32("n_seq_max", value.extract()?)?,
                other => {
                    return Err(PyTypeError::new_err(format!(
                        "unexpected context parameter {other:?}: expected one of {}",
                        FIELDS.join(", ")
                    )))
                }
            }
        }
        Ok(params)
    }
}

#[pymethods]
impl PyContextParams {
    /// n_ctx: tokens the context holds; n_batch: most tokens per llama.cpp decode call; n_threads: CPU
    /// threads (None: the cores available); type_k/type_v: "f16", "q8_0" or "q4_0" (a quantized V needs
    /// flash_attn=True); flash_attn: True or False; n_seq_max: independent sequences.
    #[new]
    #[pyo3(signature = (**kwargs))]
    fn new(kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        Ok(PyContextParams {
            inner: Self::with_overrides(&ContextParams::default(), kwargs)?,
        })
    }

    /// A copy with the given fields changed.
    #[pyo3(signature = (**changes))]
    fn replace(&self, changes: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        Ok(PyContextParams {
            inner: Self::with_overrides(&self.inner, changes)?,
        })
    }

    /// Tokens the context holds (shared by all sequences).
    #[getter]
    fn n_ctx(&self) -> u32 {
        self.inner.n_ctx
    }

    /// Most tokens decoded per llama.cpp call; longer prompts are split.
    #[getter]
    fn n_batch(&self) -> u32 {
        self.inner.n_batch
    }

    /// CPU threads used for decoding.
    #[getter]
    fn n_threads(&self) -> u32 {
        self.inner.n_threads
    }

    /// K cache type: "f16", "q8_0" or "q4_0".
    #[getter]
    fn type_k(&self) -> &'static str {
        self.inner.type_k.as_str()
    }

    /// V cache type: "f16", "q8_0" or "q4_0".
    #[getter]
    fn type_v(&self) -> &'static str {
        self.inner.type_v.as_str()
    }

    /// Flash attention on or off.
    #[getter]
    fn flash_attn(&self) -> bool {
        self.inner.flash_attn
    }

    /// Independent sequences in the context.
    #[getter]
    fn n_seq_max(&self) -> u32 {
        self.inner.n_seq_max
    }

    fn __repr__(&self) -> String {
        let p = &self.inner;
        format!(
            "ContextParams(n_ctx={}, n_batch={}, n_threads={}, type_k={:?}, type_v={:?}, flash_attn={}, \
             n_seq_max={})",
            p.n_ctx,
            p.n_batch,
            p.n_threads,
            p.type_k.as_str(),
            p.type_v.as_str(),
            if p.flash_attn { "True" } else { "False" },
            p.n_seq_max
        )
    }
}
