//! Binding of `membuilder_core::actions`: Action, Rejection, ParseResult, parse_actions(_batch).
//!
//! A model's bad output never raises here: it becomes a `Rejection`. Only the caller's mistakes
//! (unknown agent names, mismatched batch lengths, an Action built with bad fields) raise
//! `InvalidArgumentError`.

use membuilder_core::actions as core_actions;
use membuilder_core::actions::JsonValue as Value;
use membuilder_core::kinds::{Action, Agent, BankKind, Op};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};

use crate::convert::{agent_from_str, agents_from_seq, str_objects, text_lossy, texts_from_seq};
use crate::errors::invalid_argument;
use crate::util::detach;

fn value_to_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => pyo3::types::PyBool::new(py, *b).to_owned().into_any(),
        Value::Number(n) => match n.as_i64() {
            Some(i) => i.into_pyobject(py)?.into_any(),
            None => n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any(),
        },
        Value::String(s) => PyString::new(py, s).into_any(),
        Value::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(value_to_py(py, item)?)?;
            }
            list.into_any()
        }
        Value::Object(m) => {
            let d = PyDict::new(py);
            for (k, item) in m {
                d.set_item(k, value_to_py(py, item)?)?;
            }
            d.into_any()
        }
    })
}

fn py_repr(py: Python<'_>, s: &str) -> String {
    PyString::new(py, s)
        .repr()
        .map(|r| r.to_string())
        .unwrap_or_else(|_| format!("{s:?}"))
}

// ---------------------------------------------------------------------------------------------
// Action
// ---------------------------------------------------------------------------------------------

/// Python `Action`; `inner` is read by the state binding to plan with it.
#[pyclass(name = "Action", module = "membuilder._core", frozen, from_py_object)]
#[derive(Clone)]
pub struct PyAction {
    pub inner: Action,
}

#[pymethods]
impl PyAction {
    #[new]
    #[pyo3(signature = (agent, op, text=None, old=None, reason=None))]
    fn new(
        py: Python<'_>,
        agent: &str,
        op: &str,
        text: Option<&Bound<'_, PyAny>>,
        old: Option<&Bound<'_, PyAny>>,
        reason: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let agent = agent_from_str(py, agent)?;
        let op = Op::parse(op).ok_or_else(|| {
            invalid_argument(
                py,
                format!("unknown op {op:?}; expected APPEND, REPLACE, REWRITE, ADD, UPDATE, MERGE or SKIP"),
            )
        })?;
        let opt_text = |v: Option<&Bound<'_, PyAny>>, what: &str| -> PyResult<Option<String>> {
            match v {
                None => Ok(None),
                Some(v) if v.is_none() => Ok(None),
                Some(v) => text_lossy(py, v, what).map(Some),
            }
        };
        let text = opt_text(text, "text")?;
        let reason = opt_text(reason, "reason")?;
        let old = match old {
            None => Vec::new(),
            Some(v) if v.is_none() => Vec::new(),
            Some(v) => texts_from_seq(py, v, "old")?,
        };
        let action = Action {
            agent,
            op,
            text,
            old,
            reason,
        };
        match core_actions::validate_action(&action) {
            Ok(inner) => Ok(PyAction { inner }),
            Err(r) => Err(invalid_argument(
                py,
                format!(
                    "invalid {} action: {} ({})",
                    agent.as_str(),
                    r.message,
                    r.code
                ),
            )),
        }
    }

    #[getter]
    fn agent(&self) -> &'static str {
        self.inner.agent.as_str()
    }

    #[getter]
    fn op(&self) -> &'static str {
        self.inner.op.as_str()
    }

    #[getter]
    fn text(&self) -> Option<String> {
        self.inner.text.clone()
    }

    #[getter]
    fn old(&self) -> Vec<String> {
        self.inner.old.clone()
    }

    #[getter]
    fn reason(&self) -> Option<String> {
        self.inner.reason.clone()
    }

    /// The action in the canonical JSON shape the agents' prompts ask for.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        value_to_py(py, &core_actions::action_to_value(&self.inner))
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        match other.cast::<PyAction>() {
            Ok(o) => o.get().inner == self.inner,
            Err(_) => false,
        }
    }

    fn __hash__(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        core_actions::actions_to_json(std::slice::from_ref(&self.inner)).hash(&mut h);
        h.finish()
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let a = &self.inner;
        let mut parts = vec![
            format!("agent={}", py_repr(py, a.agent.as_str())),
            format!("op={}", py_repr(py, a.op.as_str())),
        ];
        if let Some(t) = &a.text {
            parts.push(format!("text={}", py_repr(py, t)));
        }
        if !a.old.is_empty() {
            let olds: Vec<String> = a.old.iter().map(|o| py_repr(py, o)).collect();
            parts.push(format!("old=[{}]", olds.join(", ")));
        }
        if let Some(r) = &a.reason {
            parts.push(format!("reason={}", py_repr(py, r)));
        }
        format!("Action({})", parts.join(", "))
    }
}

// ---------------------------------------------------------------------------------------------
// Rejection
// ---------------------------------------------------------------------------------------------

/// Python `Rejection`: a stable `code`, a human `message`, and the operation's `index` (or None).
#[pyclass(
    name = "Rejection",
    module = "membuilder._core",
    frozen,
    skip_from_py_object
)]
#[derive(Clone)]
pub struct PyRejection {
    pub inner: core_actions::Rejection,
}

#[pymethods]
impl PyRejection {
    #[getter]
    fn code(&self) -> &'static str {
        self.inner.code
    }

    #[getter]
    fn message(&self) -> String {
        self.inner.message.clone()
    }

    #[getter]
    fn index(&self) -> Option<usize> {
        self.inner.index
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        match other.cast::<PyRejection>() {
            Ok(o) => o.get().inner == self.inner,
            Err(_) => false,
        }
    }

    fn __hash__(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (self.inner.code, &self.inner.message, self.inner.index).hash(&mut h);
        h.finish()
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let index = self
            .inner
            .index
            .map_or("None".to_string(), |i| i.to_string());
        format!(
            "Rejection(code={}, index={index}, message={})",
            py_repr(py, self.inner.code),
            py_repr(py, &self.inner.message)
        )
    }
}

// ---------------------------------------------------------------------------------------------
// ParseResult
// ---------------------------------------------------------------------------------------------

/// Python `ParseResult`; `inner` is read by the state binding to plan with its valid actions.
#[pyclass(
    name = "ParseResult",
    module = "membuilder._core",
    frozen,
    from_py_object
)]
#[derive(Clone)]
pub struct PyParseResult {
    pub inner: core_actions::ParseResult,
}

#[pymethods]
impl PyParseResult {
    #[getter]
    fn agent(&self) -> &'static str {
        self.inner.agent.as_str()
    }

    #[getter]
    fn actions(&self) -> Vec<PyAction> {
        self.inner
            .actions
            .iter()
            .map(|a| PyAction { inner: a.clone() })
            .collect()
    }

    #[getter]
    fn rejections(&self) -> Vec<PyRejection> {
        self.inner
            .rejections
            .iter()
            .map(|r| PyRejection { inner: r.clone() })
            .collect()
    }

    /// The format gate: the output parsed and no operation was rejected.
    #[getter]
    fn ok(&self) -> bool {
        self.inner.ok()
    }

    /// Characters of new content (core: content/new_text; banks: memory/new_memory summed).
    #[getter]
    fn content_chars(&self) -> usize {
        self.inner.content_chars
    }

    /// The new content joined with newlines, for counting tokens with a real tokenizer.
    fn content_text(&self) -> String {
        self.inner.content_text()
    }

    /// Canonical JSON of the valid actions: `{"operations": [...]}`, keys sorted, compact.
    fn to_json(&self) -> String {
        self.inner.to_json()
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        match other.cast::<PyParseResult>() {
            Ok(o) => o.get().inner == self.inner,
            Err(_) => false,
        }
    }

    fn __repr__(&self) -> String {
        let codes: Vec<&str> = self.inner.rejections.iter().map(|r| r.code).collect();
        format!(
            "ParseResult(agent='{}', ok={}, actions={}, rejections={:?}, content_chars={})",
            self.inner.agent.as_str(),
            if self.inner.ok() { "True" } else { "False" },
            self.inner.actions.len(),
            codes,
            self.inner.content_chars
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Functions
// ---------------------------------------------------------------------------------------------

/// Parse one raw model output. Never raises for anything a model can emit.
#[pyfunction]
fn parse_actions(py: Python<'_>, agent: &str, raw: &Bound<'_, PyAny>) -> PyResult<PyParseResult> {
    let agent = agent_from_str(py, agent)?;
    let raw = text_lossy(py, raw, "raw")?;
    let inner = if raw.len() > 64 * 1024 {
        detach(py, || core_actions::parse(agent, &raw))
    } else {
        core_actions::parse(agent, &raw)
    };
    Ok(PyParseResult { inner })
}

/// Parse many outputs in parallel with the GIL released. Raises only on mismatched lengths (and
/// unknown agent names).
#[pyfunction]
fn parse_actions_batch(
    py: Python<'_>,
    agents: &Bound<'_, PyAny>,
    raws: &Bound<'_, PyAny>,
) -> PyResult<Vec<PyParseResult>> {
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
    Ok(parse_many(py, &agents, &raws)
        .into_iter()
        .map(|inner| PyParseResult { inner })
        .collect())
}

/// Parse with the GIL released, in parallel. The texts are borrowed from the Python strings
/// (their UTF-8 form); only strings with lone surrogates are copied, lossily.
pub(crate) fn parse_many(
    py: Python<'_>,
    agents: &[Agent],
    raws: &[Bound<'_, PyString>],
) -> Vec<core_actions::ParseResult> {
    let texts: Vec<std::borrow::Cow<'_, str>> = raws.iter().map(|s| s.to_string_lossy()).collect();
    detach(py, || {
        let items: Vec<(Agent, &str)> = agents
            .iter()
            .copied()
            .zip(texts.iter().map(|s| s.as_ref()))
            .collect();
        core_actions::parse_batch(&items)
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<PyAction>()?;
    m.add_class::<PyRejection>()?;
    m.add_class::<PyParseResult>()?;
    m.add_function(wrap_pyfunction!(parse_actions, m)?)?;
    m.add_function(wrap_pyfunction!(parse_actions_batch, m)?)?;
    let agents: Vec<&str> = Agent::ALL.iter().map(|a| a.as_str()).collect();
    m.add("AGENTS", PyTuple::new(py, agents)?)?;
    let kinds: Vec<&str> = BankKind::ALL.iter().map(|k| k.as_str()).collect();
    m.add("BANK_KINDS", PyTuple::new(py, kinds)?)?;
    Ok(())
}
