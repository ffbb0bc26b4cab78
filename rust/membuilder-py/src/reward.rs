//! Binding of `membuilder_core::reward`: RewardConfig, the scalar reward functions, RewardBatch
//! and RewardKernel.
//!
//! Arrays: numpy arrays of the right dtype are read in place; anything else array-like is
//! converted once with `numpy.asarray`. Caller mistakes (NaN, negative token counts, lengths that
//! differ, kind codes outside -1..=2, out-of-range config values) raise `InvalidArgumentError`.

use membuilder_core::kinds::{Agent, BankKind};
use membuilder_core::reward::{self as core_reward, RewardConfig};
use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray2, PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use crate::actions::{parse_many, PyParseResult};
use crate::convert::{
    agent_from_str, agents_from_seq, bool_vec, check_code, f64_vec, kind_codes, optional_kind,
    str_objects, type_name,
};
use crate::errors::{core_err, invalid_argument};
use crate::util::detach;

fn check_token(py: Python<'_>, name: &str, v: f64) -> PyResult<f64> {
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(invalid_argument(
            py,
            format!("{name} is {v}; token counts must be finite and >= 0"),
        ))
    }
}

fn config_or_default(config: Option<PyRef<'_, PyRewardConfig>>) -> RewardConfig {
    config.map(|c| c.inner.clone()).unwrap_or_default()
}

fn kind_name(kind: Option<BankKind>) -> Option<&'static str> {
    kind.map(|k| k.as_str())
}

// ---------------------------------------------------------------------------------------------
// RewardConfig
// ---------------------------------------------------------------------------------------------

/// Every number of the reward, with the paper's defaults. All fields are read/write; a setter
/// that would make the configuration inconsistent raises and leaves it unchanged.
#[pyclass(name = "RewardConfig", module = "membuilder._core", from_py_object)]
#[derive(Clone)]
pub struct PyRewardConfig {
    pub inner: RewardConfig,
}

impl PyRewardConfig {
    fn set_float(&mut self, py: Python<'_>, name: &str, value: f64) -> PyResult<()> {
        let mut next = self.inner.clone();
        next.set_float(name, value).map_err(|e| core_err(py, e))?;
        next.validate().map_err(|e| core_err(py, e))?;
        self.inner = next;
        Ok(())
    }

    fn set_bool(&mut self, py: Python<'_>, name: &str, value: bool) -> PyResult<()> {
        self.inner
            .set_bool(name, value)
            .map_err(|e| core_err(py, e))
    }

    fn from_mapping(py: Python<'_>, fields: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let mut cfg = RewardConfig::default();
        if let Some(fields) = fields {
            for (k, v) in fields.iter() {
                let key: String = k
                    .cast::<PyString>()
                    .map_err(|_| invalid_argument(py, "reward config field names must be str"))?
                    .to_string_lossy()
                    .into_owned();
                if RewardConfig::FLOAT_FIELDS.contains(&key.as_str()) {
                    let x: f64 = v.extract().map_err(|_| {
                        invalid_argument(
                            py,
                            format!(
                                "reward config field {key:?} must be a number, got {}",
                                type_name(&v)
                            ),
                        )
                    })?;
                    cfg.set_float(&key, x).map_err(|e| core_err(py, e))?;
                } else if RewardConfig::BOOL_FIELDS.contains(&key.as_str()) {
                    let b: bool = v.extract().map_err(|_| {
                        invalid_argument(
                            py,
                            format!(
                                "reward config field {key:?} must be a bool, got {}",
                                type_name(&v)
                            ),
                        )
                    })?;
                    cfg.set_bool(&key, b).map_err(|e| core_err(py, e))?;
                } else {
                    // set_float reports the unknown name together with the list of known ones.
                    let e = cfg.set_float(&key, 0.0).unwrap_err();
                    return Err(core_err(py, e));
                }
            }
        }
        cfg.validate().map_err(|e| core_err(py, e))?;
        Ok(PyRewardConfig { inner: cfg })
    }
}

#[pymethods]
impl PyRewardConfig {
    #[new]
    #[pyo3(signature = (**fields))]
    fn new(py: Python<'_>, fields: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        Self::from_mapping(py, fields)
    }

    /// All fields as a plain dict (float and bool values).
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for name in RewardConfig::FLOAT_FIELDS {
            d.set_item(name, self.inner.get_float(name).unwrap_or(f64::NAN))?;
        }
        for name in RewardConfig::BOOL_FIELDS {
            d.set_item(name, self.inner.get_bool(name).unwrap_or(false))?;
        }
        Ok(d)
    }

    /// Build from a dict like the one `to_dict` returns; missing fields keep their defaults.
    #[staticmethod]
    fn from_dict(py: Python<'_>, d: &Bound<'_, PyAny>) -> PyResult<Self> {
        let d = d.cast::<PyDict>().map_err(|_| {
            invalid_argument(py, format!("from_dict needs a dict, got {}", type_name(d)))
        })?;
        Self::from_mapping(py, Some(d))
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        match other.cast::<PyRewardConfig>() {
            Ok(o) => o.borrow().inner == self.inner,
            Err(_) => false,
        }
    }

    fn __reduce__<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<(Bound<'py, PyAny>, (Bound<'py, PyDict>,))> {
        let ctor = py.get_type::<PyRewardConfig>().getattr("from_dict")?;
        Ok((ctor, (self.to_dict(py)?,)))
    }

    fn __repr__(&self) -> String {
        let mut parts = Vec::new();
        for name in RewardConfig::FLOAT_FIELDS {
            parts.push(format!(
                "{name}={:?}",
                self.inner.get_float(name).unwrap_or(f64::NAN)
            ));
        }
        for name in RewardConfig::BOOL_FIELDS {
            let b = self.inner.get_bool(name).unwrap_or(false);
            parts.push(format!("{name}={}", if b { "True" } else { "False" }));
        }
        format!("RewardConfig({})", parts.join(", "))
    }

    #[getter]
    fn length_lambda(&self) -> f64 {
        self.inner.length_lambda
    }
    #[setter]
    fn set_length_lambda(&mut self, py: Python<'_>, value: f64) -> PyResult<()> {
        self.set_float(py, "length_lambda", value)
    }
    #[getter]
    fn core_theta_min(&self) -> f64 {
        self.inner.core_theta_min
    }
    #[setter]
    fn set_core_theta_min(&mut self, py: Python<'_>, value: f64) -> PyResult<()> {
        self.set_float(py, "core_theta_min", value)
    }
    #[getter]
    fn core_theta_max(&self) -> f64 {
        self.inner.core_theta_max
    }
    #[setter]
    fn set_core_theta_max(&mut self, py: Python<'_>, value: f64) -> PyResult<()> {
        self.set_float(py, "core_theta_max", value)
    }
    #[getter]
    fn ratio_lower(&self) -> f64 {
        self.inner.ratio_lower
    }
    #[setter]
    fn set_ratio_lower(&mut self, py: Python<'_>, value: f64) -> PyResult<()> {
        self.set_float(py, "ratio_lower", value)
    }
    #[getter]
    fn ratio_upper(&self) -> f64 {
        self.inner.ratio_upper
    }
    #[setter]
    fn set_ratio_upper(&mut self, py: Python<'_>, value: f64) -> PyResult<()> {
        self.set_float(py, "ratio_upper", value)
    }
    #[getter]
    fn ratio_upper_full(&self) -> f64 {
        self.inner.ratio_upper_full
    }
    #[setter]
    fn set_ratio_upper_full(&mut self, py: Python<'_>, value: f64) -> PyResult<()> {
        self.set_float(py, "ratio_upper_full", value)
    }
    #[getter]
    fn ratio_lower_full(&self) -> f64 {
        self.inner.ratio_lower_full
    }
    #[setter]
    fn set_ratio_lower_full(&mut self, py: Python<'_>, value: f64) -> PyResult<()> {
        self.set_float(py, "ratio_lower_full", value)
    }
    #[getter]
    fn min_abs_diff(&self) -> f64 {
        self.inner.min_abs_diff
    }
    #[setter]
    fn set_min_abs_diff(&mut self, py: Python<'_>, value: f64) -> PyResult<()> {
        self.set_float(py, "min_abs_diff", value)
    }
    #[getter]
    fn attribution_alpha(&self) -> f64 {
        self.inner.attribution_alpha
    }
    #[setter]
    fn set_attribution_alpha(&mut self, py: Python<'_>, value: f64) -> PyResult<()> {
        self.set_float(py, "attribution_alpha", value)
    }
    #[getter]
    fn length_penalty_enabled(&self) -> bool {
        self.inner.length_penalty_enabled
    }
    #[setter]
    fn set_length_penalty_enabled(&mut self, py: Python<'_>, value: bool) -> PyResult<()> {
        self.set_bool(py, "length_penalty_enabled", value)
    }
    #[getter]
    fn attribution_enabled(&self) -> bool {
        self.inner.attribution_enabled
    }
    #[setter]
    fn set_attribution_enabled(&mut self, py: Python<'_>, value: bool) -> PyResult<()> {
        self.set_bool(py, "attribution_enabled", value)
    }
}

// ---------------------------------------------------------------------------------------------
// Scalar functions
// ---------------------------------------------------------------------------------------------

/// Characters / 4 (rounded down), characters = Unicode code points.
#[pyfunction]
fn approx_tokens(text: &Bound<'_, PyString>) -> PyResult<usize> {
    match text.to_str() {
        Ok(s) => Ok(core_reward::approx_tokens(s)),
        // Lone surrogates: count code points as Python does.
        Err(_) => Ok(text.len()? / 4),
    }
}

#[pyfunction]
#[pyo3(signature = (tokens, config=None))]
fn core_length_penalty(
    py: Python<'_>,
    tokens: f64,
    config: Option<PyRef<'_, PyRewardConfig>>,
) -> PyResult<f64> {
    let tokens = check_token(py, "tokens", tokens)?;
    Ok(core_reward::core_length_penalty(
        tokens,
        &config_or_default(config),
    ))
}

#[pyfunction]
#[pyo3(signature = (tokens, expert_tokens, config=None))]
fn ratio_length_penalty(
    py: Python<'_>,
    tokens: f64,
    expert_tokens: f64,
    config: Option<PyRef<'_, PyRewardConfig>>,
) -> PyResult<f64> {
    let tokens = check_token(py, "tokens", tokens)?;
    let expert = check_token(py, "expert_tokens", expert_tokens)?;
    Ok(core_reward::ratio_length_penalty(
        tokens,
        expert,
        &config_or_default(config),
    ))
}

#[pyfunction]
#[pyo3(signature = (agent, tokens, expert_tokens, config=None))]
fn length_penalty(
    py: Python<'_>,
    agent: &str,
    tokens: f64,
    expert_tokens: f64,
    config: Option<PyRef<'_, PyRewardConfig>>,
) -> PyResult<f64> {
    let agent = agent_from_str(py, agent)?;
    let tokens = check_token(py, "tokens", tokens)?;
    let expert = check_token(py, "expert_tokens", expert_tokens)?;
    Ok(core_reward::length_penalty(
        agent,
        tokens,
        expert,
        &config_or_default(config),
    ))
}

#[pyfunction]
#[pyo3(signature = (format_ok, task, penalty, config=None))]
fn final_reward(
    py: Python<'_>,
    format_ok: bool,
    task: f64,
    penalty: f64,
    config: Option<PyRef<'_, PyRewardConfig>>,
) -> PyResult<f64> {
    if !task.is_finite() {
        return Err(invalid_argument(
            py,
            format!("task is {task}; it must be a finite number (normally in [0, 1])"),
        ));
    }
    if !(0.0..=1.0).contains(&penalty) {
        return Err(invalid_argument(
            py,
            format!("penalty is {penalty}; length penalties are in [0, 1]"),
        ));
    }
    Ok(core_reward::final_reward(
        format_ok,
        task,
        penalty,
        &config_or_default(config),
    ))
}

#[pyfunction]
fn retrieval_counts(py: Python<'_>, kinds: &Bound<'_, PyAny>) -> PyResult<(u64, u64, u64)> {
    let (codes, _) = kind_codes(py, kinds, "kinds")?;
    let c = core_reward::retrieval_counts(&codes).map_err(|e| core_err(py, e))?;
    Ok((c[0], c[1], c[2]))
}

#[pyfunction]
fn dominant_kind(py: Python<'_>, counts: &Bound<'_, PyAny>) -> PyResult<Option<&'static str>> {
    let v: Vec<i64> = counts.extract().map_err(|_| {
        invalid_argument(
            py,
            "counts must be a sequence of three integers (episodic, semantic, procedural)",
        )
    })?;
    if v.len() != 3 || v.iter().any(|x| *x < 0) {
        return Err(invalid_argument(
            py,
            format!("counts must be three non-negative integers (episodic, semantic, procedural), got {v:?}"),
        ));
    }
    Ok(kind_name(core_reward::dominant_kind([
        v[0] as u64,
        v[1] as u64,
        v[2] as u64,
    ])))
}

#[pyfunction]
#[pyo3(signature = (agent, dominant, config=None))]
fn attribution_weight(
    py: Python<'_>,
    agent: &str,
    dominant: Option<&str>,
    config: Option<PyRef<'_, PyRewardConfig>>,
) -> PyResult<f64> {
    let agent = agent_from_str(py, agent)?;
    let dominant = optional_kind(py, dominant)?;
    Ok(core_reward::attribution_weight(
        agent,
        dominant,
        &config_or_default(config),
    ))
}

/// `approx_tokens(p.content_text())` of every parse result, as float64 token counts, without
/// building the texts (what the length penalty measures when no tokenizer is given).
#[pyfunction]
fn approx_content_tokens<'py>(
    py: Python<'py>,
    parses: Vec<PyRef<'py, PyParseResult>>,
) -> Bound<'py, PyArray1<f64>> {
    parses
        .iter()
        .map(|p| p.inner.content_approx_tokens() as f64)
        .collect::<Vec<f64>>()
        .into_pyarray(py)
}

// ---------------------------------------------------------------------------------------------
// RewardBatch and RewardKernel
// ---------------------------------------------------------------------------------------------

/// Per-sample outputs of `RewardKernel.score`; numpy arrays, one entry per sample.
#[pyclass(
    name = "RewardBatch",
    module = "membuilder._core",
    frozen,
    skip_from_py_object
)]
pub struct PyRewardBatch {
    format_ok: Py<PyArray1<bool>>,
    policy_tokens: Py<PyArray1<f64>>,
    length_penalty: Py<PyArray1<f64>>,
    reward: Py<PyArray1<f64>>,
    weight: Py<PyArray1<f64>>,
    dominant: Vec<Option<&'static str>>,
    retrieved: Py<PyArray2<i64>>,
}

#[pymethods]
impl PyRewardBatch {
    #[getter]
    fn format_ok(&self, py: Python<'_>) -> Py<PyArray1<bool>> {
        self.format_ok.clone_ref(py)
    }
    #[getter]
    fn policy_tokens(&self, py: Python<'_>) -> Py<PyArray1<f64>> {
        self.policy_tokens.clone_ref(py)
    }
    #[getter]
    fn length_penalty(&self, py: Python<'_>) -> Py<PyArray1<f64>> {
        self.length_penalty.clone_ref(py)
    }
    #[getter]
    fn reward(&self, py: Python<'_>) -> Py<PyArray1<f64>> {
        self.reward.clone_ref(py)
    }
    #[getter]
    fn weight(&self, py: Python<'_>) -> Py<PyArray1<f64>> {
        self.weight.clone_ref(py)
    }
    #[getter]
    fn dominant(&self) -> Vec<Option<&'static str>> {
        self.dominant.clone()
    }
    /// `(n, 3)` int64: per sample, the retrieved entries that were episodic, semantic,
    /// procedural (what `dominant` is taken from; zeros without `retrieved_kinds`).
    #[getter]
    fn retrieved(&self, py: Python<'_>) -> Py<PyArray2<i64>> {
        self.retrieved.clone_ref(py)
    }
    fn __len__(&self) -> usize {
        self.dominant.len()
    }
    fn __repr__(&self) -> String {
        format!("RewardBatch(n={})", self.dominant.len())
    }
}

/// Batch entry points over many rollouts at once (GIL released). `config` is a copy: assign a
/// new RewardConfig to change it.
#[pyclass(
    name = "RewardKernel",
    module = "membuilder._core",
    skip_from_py_object
)]
pub struct PyRewardKernel {
    cfg: RewardConfig,
}

struct Scored {
    format_ok: Vec<bool>,
    policy_tokens: Vec<f64>,
    scores: core_reward::BatchScores,
}

impl PyRewardKernel {
    #[allow(clippy::too_many_arguments)]
    fn score_inner(
        &self,
        py: Python<'_>,
        agents: Vec<Agent>,
        format_ok: Vec<bool>,
        task: Vec<f64>,
        policy_tokens: Vec<f64>,
        expert_tokens: Vec<f64>,
        retrieved: Option<(Vec<i8>, usize)>,
        valid: Option<Vec<bool>>,
    ) -> PyResult<Scored> {
        let cfg = &self.cfg;
        let result = detach(py, || {
            let inp = core_reward::ScoreInputs {
                agents: &agents,
                format_ok: &format_ok,
                task: &task,
                policy_tokens: &policy_tokens,
                expert_tokens: &expert_tokens,
                retrieved_kinds: retrieved.as_ref().map(|(k, m)| (k.as_slice(), *m)),
                valid: valid.as_deref(),
            };
            core_reward::score_batch(&inp, cfg)
        });
        let scores = result.map_err(|e| core_err(py, e))?;
        Ok(Scored {
            format_ok,
            policy_tokens,
            scores,
        })
    }

    fn to_batch(py: Python<'_>, s: Scored) -> PyRewardBatch {
        let n = s.scores.retrieved.len();
        let counts: Vec<i64> = s
            .scores
            .retrieved
            .iter()
            .flat_map(|c| c.map(|x| x as i64))
            .collect();
        let retrieved = counts
            .into_pyarray(py)
            .reshape([n, 3])
            .expect("n * 3 counts reshape to (n, 3)")
            .unbind();
        PyRewardBatch {
            format_ok: s.format_ok.into_pyarray(py).unbind(),
            policy_tokens: s.policy_tokens.into_pyarray(py).unbind(),
            length_penalty: s.scores.length_penalty.into_pyarray(py).unbind(),
            reward: s.scores.reward.into_pyarray(py).unbind(),
            weight: s.scores.weight.into_pyarray(py).unbind(),
            dominant: s.scores.dominant.into_iter().map(kind_name).collect(),
            retrieved,
        }
    }
}

#[pymethods]
impl PyRewardKernel {
    #[new]
    #[pyo3(signature = (config=None))]
    fn new(config: Option<PyRef<'_, PyRewardConfig>>) -> Self {
        PyRewardKernel {
            cfg: config_or_default(config),
        }
    }

    #[getter]
    fn config(&self) -> PyRewardConfig {
        PyRewardConfig {
            inner: self.cfg.clone(),
        }
    }

    #[setter]
    fn set_config(&mut self, config: PyRef<'_, PyRewardConfig>) {
        self.cfg = config.inner.clone();
    }

    /// Length penalty per sample.
    fn length_penalties<'py>(
        &self,
        py: Python<'py>,
        agents: &Bound<'py, PyAny>,
        policy_tokens: &Bound<'py, PyAny>,
        expert_tokens: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let agents = agents_from_seq(py, agents)?;
        let policy = f64_vec(py, policy_tokens, "policy_tokens")?;
        let expert = f64_vec(py, expert_tokens, "expert_tokens")?;
        let cfg = &self.cfg;
        let out = detach(py, || {
            core_reward::length_penalties(&agents, &policy, &expert, cfg)
        })
        .map_err(|e| core_err(py, e))?;
        Ok(out.into_pyarray(py))
    }

    /// Rewards and attribution weights for n samples (see the stub for the argument shapes).
    #[pyo3(signature = (agents, format_ok, task, policy_tokens, expert_tokens, retrieved_kinds=None, valid=None))]
    #[allow(clippy::too_many_arguments)]
    fn score(
        &self,
        py: Python<'_>,
        agents: &Bound<'_, PyAny>,
        format_ok: &Bound<'_, PyAny>,
        task: &Bound<'_, PyAny>,
        policy_tokens: &Bound<'_, PyAny>,
        expert_tokens: &Bound<'_, PyAny>,
        retrieved_kinds: Option<&Bound<'_, PyAny>>,
        valid: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyRewardBatch> {
        let agents = agents_from_seq(py, agents)?;
        let format_ok = bool_vec(py, format_ok, "format_ok")?;
        let task = f64_vec(py, task, "task")?;
        let policy = f64_vec(py, policy_tokens, "policy_tokens")?;
        let expert = f64_vec(py, expert_tokens, "expert_tokens")?;
        let retrieved = match retrieved_kinds {
            None => None,
            Some(obj) if obj.is_none() => None,
            Some(obj) => {
                let fast = obj.extract::<PyReadonlyArray2<'_, i8>>().ok().map(|a| {
                    let shape = a.shape().to_vec();
                    (a.as_array().iter().copied().collect::<Vec<i8>>(), shape)
                });
                let (codes, shape) = match fast {
                    Some((codes, shape)) => {
                        for &c in &codes {
                            check_code(py, "retrieved_kinds", c as i64)?;
                        }
                        (codes, shape)
                    }
                    None => kind_codes(py, obj, "retrieved_kinds")?,
                };
                if shape.len() != 2 || shape[0] != agents.len() {
                    return Err(invalid_argument(
                        py,
                        format!("retrieved_kinds must have shape (n, m) with n = {} samples, got {shape:?}", agents.len()),
                    ));
                }
                Some((codes, shape[1]))
            }
        };
        let valid = match valid {
            None => None,
            Some(obj) if obj.is_none() => None,
            Some(obj) => Some(bool_vec(py, obj, "valid")?),
        };
        let s = self.score_inner(
            py, agents, format_ok, task, policy, expert, retrieved, valid,
        )?;
        Ok(Self::to_batch(py, s))
    }

    /// Parse, gate, count content tokens (unless `policy_tokens` is given: `approx_tokens` of
    /// the content text, as `approx_content_tokens` and the reward scorer count them) and
    /// score. Returns the parse results and the batch.
    #[pyo3(signature = (agents, raws, task, expert_tokens, policy_tokens=None))]
    fn score_outputs(
        &self,
        py: Python<'_>,
        agents: &Bound<'_, PyAny>,
        raws: &Bound<'_, PyAny>,
        task: &Bound<'_, PyAny>,
        expert_tokens: &Bound<'_, PyAny>,
        policy_tokens: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<(Vec<PyParseResult>, PyRewardBatch)> {
        let agents = agents_from_seq(py, agents)?;
        let raws = str_objects(py, raws, "raws")?;
        if agents.len() != raws.len() {
            return Err(invalid_argument(
                py,
                format!(
                    "agents has {} entries but raws has {}; give one agent per output",
                    agents.len(),
                    raws.len()
                ),
            ));
        }
        let task = f64_vec(py, task, "task")?;
        let expert = f64_vec(py, expert_tokens, "expert_tokens")?;
        let given = match policy_tokens {
            None => None,
            Some(obj) if obj.is_none() => None,
            Some(obj) => Some(f64_vec(py, obj, "policy_tokens")?),
        };
        let parsed = parse_many(py, &agents, &raws);
        let format_ok: Vec<bool> = parsed.iter().map(|p| p.ok()).collect();
        let policy = match given {
            Some(p) => p,
            None => parsed
                .iter()
                .map(|p| p.content_approx_tokens() as f64)
                .collect(),
        };
        let s = self.score_inner(py, agents, format_ok, task, policy, expert, None, None)?;
        let results = parsed
            .into_iter()
            .map(|inner| PyParseResult { inner })
            .collect();
        Ok((results, Self::to_batch(py, s)))
    }

    fn __repr__(&self) -> String {
        format!(
            "RewardKernel(config={})",
            PyRewardConfig {
                inner: self.cfg.clone()
            }
            .__repr__()
        )
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyRewardConfig>()?;
    m.add_class::<PyRewardBatch>()?;
    m.add_class::<PyRewardKernel>()?;
    m.add_function(wrap_pyfunction!(approx_tokens, m)?)?;
    m.add_function(wrap_pyfunction!(core_length_penalty, m)?)?;
    m.add_function(wrap_pyfunction!(ratio_length_penalty, m)?)?;
    m.add_function(wrap_pyfunction!(length_penalty, m)?)?;
    m.add_function(wrap_pyfunction!(final_reward, m)?)?;
    m.add_function(wrap_pyfunction!(retrieval_counts, m)?)?;
    m.add_function(wrap_pyfunction!(dominant_kind, m)?)?;
    m.add_function(wrap_pyfunction!(attribution_weight, m)?)?;
    m.add_function(wrap_pyfunction!(approx_content_tokens, m)?)?;
    Ok(())
}
