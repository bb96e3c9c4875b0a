//! `llama_sessions.ContextParams`: an immutable, typed record of a Context's parameters.

use llama_sessions::{default_threads, ContextParams, KvType};
use pyo3::prelude::*;

use crate::errors::InvalidParameterError;

/// Parameters of a Context. Immutable; ``replace(**changes)`` returns a modified copy.
///
/// Every field that shapes the saved state is explicit: ``flash_attn`` is True or False, never "auto".
/// Out-of-range values raise InvalidParameterError (a ValueError) naming the parameter.
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

/// `n_threads` as a keyword of `replace()` (and so of `Context()`): absent keeps the value, an int sets it. Passing
/// `None` explicitly cannot be told apart from absent, so it keeps the value too.
fn threads_override(value: Option<Bound<'_, PyAny>>) -> PyResult<Option<Option<i64>>> {
    value.map(|v| v.extract::<i64>().map(Some)).transpose()
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

/// Optional values for each field, as given by keyword arguments; `None` keeps the base value.
#[derive(Default)]
struct Overrides<'py> {
    pub n_ctx: Option<i64>,
    pub n_batch: Option<i64>,
    /// `Some(None)`: reset to the cores available.
    pub n_threads: Option<Option<i64>>,
    pub type_k: Option<String>,
    pub type_v: Option<String>,
    pub flash_attn: Option<Bound<'py, PyAny>>,
    pub n_seq_max: Option<i64>,
}

impl Overrides<'_> {
    /// `base` with these values applied, each checked and named in the error when invalid.
    fn apply(self, base: &ContextParams) -> PyResult<ContextParams> {
        let mut params = base.clone();
        if let Some(v) = self.n_ctx {
            params.n_ctx = positive_u32("n_ctx", v)?;
        }
        if let Some(v) = self.n_batch {
            params.n_batch = positive_u32("n_batch", v)?;
        }
        if let Some(v) = self.n_threads {
            params.n_threads = match v {
                Some(v) => positive_u32("n_threads", v)?,
                None => default_threads(),
            };
        }
        if let Some(v) = self.type_k {
            params.type_k = kv_type("type_k", &v)?;
        }
        if let Some(v) = self.type_v {
            params.type_v = kv_type("type_v", &v)?;
        }
        if let Some(v) = self.flash_attn {
            params.flash_attn = strict_bool("flash_attn", &v)?;
        }
        if let Some(v) = self.n_seq_max {
            params.n_seq_max = positive_u32("n_seq_max", v)?;
        }
        Ok(params)
    }
}

#[pymethods]
impl PyContextParams {
    /// n_ctx: KV cells, shared by all sequences; n_batch: most tokens per llama.cpp decode call; n_threads: CPU
    /// threads (None: the cores available); type_k/type_v: "f16", "q8_0" or "q4_0" (a quantized V needs
    /// flash_attn=True); flash_attn: True or False; n_seq_max: independent sequences.
    #[new]
    // `flash_attn` arrives untyped so that a non-bool ("auto", 1) gets InvalidParameterError naming it.
    #[pyo3(signature = (*, n_ctx = 4096, n_batch = 512, n_threads = None, type_k = "f16".to_owned(), type_v = "f16".to_owned(), flash_attn = None, n_seq_max = 1))]
    #[pyo3(
        text_signature = "(*, n_ctx=4096, n_batch=512, n_threads=None, type_k='f16', type_v='f16', flash_attn=False, n_seq_max=1)"
    )]
    #[allow(clippy::too_many_arguments)]
    fn new(
        n_ctx: i64,
        n_batch: i64,
        n_threads: Option<i64>,
        type_k: String,
        type_v: String,
        flash_attn: Option<Bound<'_, PyAny>>,
        n_seq_max: i64,
    ) -> PyResult<Self> {
        let overrides = Overrides {
            n_ctx: Some(n_ctx),
            n_batch: Some(n_batch),
            n_threads: Some(n_threads),
            type_k: Some(type_k),
            type_v: Some(type_v),
            flash_attn,
            n_seq_max: Some(n_seq_max),
        };
        Ok(PyContextParams {
            inner: overrides.apply(&ContextParams::default())?,
        })
    }

    /// A copy with the given fields changed (None keeps a field as it is).
    #[pyo3(signature = (*, n_ctx = None, n_batch = None, n_threads = None, type_k = None, type_v = None, flash_attn = None, n_seq_max = None))]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn replace(
        &self,
        n_ctx: Option<i64>,
        n_batch: Option<i64>,
        n_threads: Option<Bound<'_, PyAny>>,
        type_k: Option<String>,
        type_v: Option<String>,
        flash_attn: Option<Bound<'_, PyAny>>,
        n_seq_max: Option<i64>,
    ) -> PyResult<Self> {
        let overrides = Overrides {
            n_ctx,
            n_batch,
            n_threads: threads_override(n_threads)?,
            type_k,
            type_v,
            flash_attn,
            n_seq_max,
        };
        Ok(PyContextParams {
            inner: overrides.apply(&self.inner)?,
        })
    }

    /// KV cells requested for the context, shared by all sequences: each holds at most
    /// ``n_ctx / n_seq_max`` tokens. llama.cpp rounds it up (to a multiple of 256 per sequence);
    /// ``Context.params.n_ctx`` is what it allocated.
    #[getter]
    fn n_ctx(&self) -> u32 {
        self.inner.n_ctx
    }

    /// Most tokens decoded per llama.cpp call; longer prompts are split. llama.cpp clamps it to
    /// ``n_ctx``; ``Context.params.n_batch`` is what it applied.
    #[getter]
    fn n_batch(&self) -> u32 {
        self.inner.n_batch
    }

    /// CPU threads used for decoding (default: the cores available; 1 to 512, llama.cpp's limit).
    #[getter]
    fn n_threads(&self) -> u32 {
        self.inner.n_threads
    }

    /// K cache type.
    #[getter]
    fn type_k(&self) -> &'static str {
        self.inner.type_k.as_str()
    }

    /// V cache type (a quantized V needs flash_attn=True).
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
