//! Rewards for ADRPO: format gate, length penalties, aggregation and attribution weights.
//!
//! The reward of one rollout of one agent is `0` when its output failed the format gate, else
//! `task * (1 - lambda * length_penalty)` (task = accuracy on the session's synthetic QA, in
//! `[0, 1]`). Lengths are in tokens; both the policy's and the expert's length must be measured in
//! the same unit (a real tokenizer's tokens, or [`approx_tokens`], characters / 4, on both sides).
//!
//! All functions here are pure; the batch versions run in parallel through [`crate::par`].

use serde::{Deserialize, Serialize};

pub use crate::error::{BadKindCode, BatchError, ConfigError};
use crate::kinds::{Agent, BankKind};

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// Every number of the reward. Defaults are the paper's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardConfig {
    /// lambda: weight of the length penalty in `task * (1 - lambda * penalty)`; in `[0, 1]`.
    pub length_lambda: f64,
    /// Core: tokens at or below which there is no penalty (theta_min).
    pub core_theta_min: f64,
    /// Core: tokens at or above which the penalty is 1 (theta_max); `> core_theta_min`.
    pub core_theta_max: f64,
    /// Banks: lower end of the penalty-free ratio band to the expert's length (gamma_l).
    pub ratio_lower: f64,
    /// Banks: upper end of the penalty-free ratio band (gamma_u).
    pub ratio_upper: f64,
    /// Banks: ratio at which the penalty above the band reaches 1; `> ratio_upper`.
    pub ratio_upper_full: f64,
    /// Banks: ratio at which the penalty below the band reaches 1; `< ratio_lower`, `>= 0`.
    pub ratio_lower_full: f64,
    /// Banks: no penalty when |policy - expert| is under this many tokens.
    pub min_abs_diff: f64,
    /// alpha: advantage weight of the dominant kind's agent; `> 0`.
    pub attribution_alpha: f64,
    /// When false, every length penalty is 0.
    pub length_penalty_enabled: bool,
    /// When false, every attribution weight is 1.
    pub attribution_enabled: bool,
}

impl Default for RewardConfig {
    fn default() -> Self {
        RewardConfig {
            length_lambda: 0.8,
            core_theta_min: 150.0,
            core_theta_max: 400.0,
            ratio_lower: 0.5,
            ratio_upper: 1.3,
            ratio_upper_full: 2.0,
            ratio_lower_full: 0.2,
            min_abs_diff: 200.0,
            attribution_alpha: 4.0,
            length_penalty_enabled: true,
            attribution_enabled: true,
        }
    }
}

impl RewardConfig {
    /// The numeric fields, in declaration order.
    pub const FLOAT_FIELDS: [&'static str; 9] = [
        "length_lambda",
        "core_theta_min",
        "core_theta_max",
        "ratio_lower",
        "ratio_upper",
        "ratio_upper_full",
        "ratio_lower_full",
        "min_abs_diff",
        "attribution_alpha",
    ];
    /// The boolean fields.
    pub const BOOL_FIELDS: [&'static str; 2] = ["length_penalty_enabled", "attribution_enabled"];

    /// Check every range; the error says which rule failed and with which values.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for name in Self::FLOAT_FIELDS {
            let v = self.get_float(name).unwrap_or(f64::NAN);
            if !v.is_finite() {
                return Err(ConfigError(format!(
                    "{name} must be a finite number, got {v}"
                )));
            }
        }
        let c = self;
        let rule = |ok: bool, msg: String| if ok { Ok(()) } else { Err(ConfigError(msg)) };
        rule(
            (0.0..=1.0).contains(&c.length_lambda),
            format!(
                "length_lambda must be in [0, 1] (so that rewards stay >= 0), got {}",
                c.length_lambda
            ),
        )?;
        rule(
            c.core_theta_min >= 0.0,
            format!("core_theta_min must be >= 0, got {}", c.core_theta_min),
        )?;
        rule(
            c.core_theta_max > c.core_theta_min,
            format!(
                "core_theta_max ({}) must be greater than core_theta_min ({})",
                c.core_theta_max, c.core_theta_min
            ),
        )?;
        rule(
            c.ratio_lower_full >= 0.0,
            format!("ratio_lower_full must be >= 0, got {}", c.ratio_lower_full),
        )?;
        rule(
            c.ratio_lower_full < c.ratio_lower,
            format!(
                "ratio_lower_full ({}) must be less than ratio_lower ({})",
                c.ratio_lower_full, c.ratio_lower
            ),
        )?;
        rule(
            c.ratio_lower <= c.ratio_upper,
            format!(
                "ratio_lower ({}) must be at most ratio_upper ({})",
                c.ratio_lower, c.ratio_upper
            ),
        )?;
        rule(
            c.ratio_upper < c.ratio_upper_full,
            format!(
                "ratio_upper ({}) must be less than ratio_upper_full ({})",
                c.ratio_upper, c.ratio_upper_full
            ),
        )?;
        rule(
            c.min_abs_diff >= 0.0,
            format!("min_abs_diff must be >= 0, got {}", c.min_abs_diff),
        )?;
        rule(
            c.attribution_alpha > 0.0,
            format!("attribution_alpha must be > 0, got {}", c.attribution_alpha),
        )?;
        Ok(())
    }

    pub fn get_float(&self, name: &str) -> Option<f64> {
        Some(match name {
            "length_lambda" => self.length_lambda,
            "core_theta_min" => self.core_theta_min,
            "core_theta_max" => self.core_theta_max,
            "ratio_lower" => self.ratio_lower,
            "ratio_upper" => self.ratio_upper,
            "ratio_upper_full" => self.ratio_upper_full,
            "ratio_lower_full" => self.ratio_lower_full,
            "min_abs_diff" => self.min_abs_diff,
            "attribution_alpha" => self.attribution_alpha,
            _ => return None,
        })
    }

    /// Set a numeric field by name (no validation; call [`validate`](Self::validate)).
    pub fn set_float(&mut self, name: &str, v: f64) -> Result<(), ConfigError> {
        let slot = match name {
            "length_lambda" => &mut self.length_lambda,
            "core_theta_min" => &mut self.core_theta_min,
            "core_theta_max" => &mut self.core_theta_max,
            "ratio_lower" => &mut self.ratio_lower,
            "ratio_upper" => &mut self.ratio_upper,
            "ratio_upper_full" => &mut self.ratio_upper_full,
            "ratio_lower_full" => &mut self.ratio_lower_full,
            "min_abs_diff" => &mut self.min_abs_diff,
            "attribution_alpha" => &mut self.attribution_alpha,
            _ => return Err(unknown_field(name)),
        };
        *slot = v;
        Ok(())
    }

    pub fn get_bool(&self, name: &str) -> Option<bool> {
        match name {
            "length_penalty_enabled" => Some(self.length_penalty_enabled),
            "attribution_enabled" => Some(self.attribution_enabled),
            _ => None,
        }
    }

    pub fn set_bool(&mut self, name: &str, v: bool) -> Result<(), ConfigError> {
        match name {
            "length_penalty_enabled" => self.length_penalty_enabled = v,
            "attribution_enabled" => self.attribution_enabled = v,
            _ => return Err(unknown_field(name)),
        }
        Ok(())
    }
}

#[cold]
fn unknown_field(name: &str) -> ConfigError {
    let all: Vec<&str> = RewardConfig::FLOAT_FIELDS
        .iter()
        .chain(RewardConfig::BOOL_FIELDS.iter())
        .copied()
        .collect();
    ConfigError(format!(
        "unknown reward config field {name:?}; known fields: {}",
        all.join(", ")
    ))
}

// ---------------------------------------------------------------------------------------------
// Scalar functions
// ---------------------------------------------------------------------------------------------

/// Characters / 4, rounded down (characters = Unicode scalar values). The unit used on both sides
/// when no tokenizer is given.
pub fn approx_tokens(text: &str) -> usize {
    text.chars().count() / 4
}

/// Core agent: 0 at or below theta_min, 1 at or above theta_max, linear between. In `[0, 1]`;
/// a NaN input gives 0 (the binding refuses NaN before it gets here).
pub fn core_length_penalty(tokens: f64, cfg: &RewardConfig) -> f64 {
    if tokens.is_nan() || tokens <= cfg.core_theta_min {
        0.0
    } else if tokens >= cfg.core_theta_max {
        1.0
    } else {
        ((tokens - cfg.core_theta_min) / (cfg.core_theta_max - cfg.core_theta_min)).clamp(0.0, 1.0)
    }
}

/// Bank agents: the ratio of the policy's length to the expert's. 0 when the expert wrote nothing,
/// when the absolute difference is under `min_abs_diff`, or when the ratio is inside
/// `[ratio_lower, ratio_upper]`; above, linear to 1 at `ratio_upper_full`; below, linear to 1 at
/// `ratio_lower_full`. In `[0, 1]`.
pub fn ratio_length_penalty(tokens: f64, expert_tokens: f64, cfg: &RewardConfig) -> f64 {
    if tokens.is_nan() || expert_tokens.is_nan() || expert_tokens <= 0.0 {
        return 0.0;
    }
    if (tokens - expert_tokens).abs() < cfg.min_abs_diff {
        return 0.0;
    }
    let ratio = tokens / expert_tokens;
    let p = if ratio >= cfg.ratio_lower && ratio <= cfg.ratio_upper {
        0.0
    } else if ratio > cfg.ratio_upper {
        (ratio - cfg.ratio_upper) / (cfg.ratio_upper_full - cfg.ratio_upper)
    } else {
        (cfg.ratio_lower - ratio) / (cfg.ratio_lower - cfg.ratio_lower_full)
    };
    p.clamp(0.0, 1.0)
}

/// The length penalty of one rollout: core by absolute length, banks by ratio; 0 when the
/// length penalty is disabled.
pub fn length_penalty(agent: Agent, tokens: f64, expert_tokens: f64, cfg: &RewardConfig) -> f64 {
    if !cfg.length_penalty_enabled {
        return 0.0;
    }
    match agent {
        Agent::Core => core_length_penalty(tokens, cfg),
        _ => ratio_length_penalty(tokens, expert_tokens, cfg),
    }
}

/// 0 if the format gate failed, else `task * (1 - lambda * penalty)`.
pub fn final_reward(format_ok: bool, task: f64, penalty: f64, cfg: &RewardConfig) -> f64 {
    if !format_ok {
        return 0.0;
    }
    task * (1.0 - cfg.length_lambda * penalty)
}

/// How many retrieved entries were episodic, semantic, procedural; -1 padding is ignored.
pub fn retrieval_counts(kinds: &[i8]) -> Result<[u64; 3], BadKindCode> {
    let mut c = [0u64; 3];
    for &k in kinds {
        match k {
            -1 => {}
            0..=2 => c[k as usize] += 1,
            other => return Err(BadKindCode(other)),
        }
    }
    Ok(c)
}

/// The kind retrieved most; ties go to the first in kind order; `None` when all are zero.
pub fn dominant_kind(counts: [u64; 3]) -> Option<BankKind> {
    let mut best: Option<(BankKind, u64)> = None;
    for (kind, &n) in BankKind::ALL.iter().zip(counts.iter()) {
        if n > 0 && !matches!(best, Some((_, b)) if b >= n) {
            best = Some((*kind, n));
        }
    }
    best.map(|(k, _)| k)
}

/// alpha for the dominant kind's agent, 1 for everyone else; the core agent always 1; 1 when
/// attribution is disabled or nothing was retrieved.
pub fn attribution_weight(agent: Agent, dominant: Option<BankKind>, cfg: &RewardConfig) -> f64 {
    match (cfg.attribution_enabled, dominant) {
        (true, Some(kind)) if agent.bank() == Some(kind) => cfg.attribution_alpha,
        _ => 1.0,
    }
}

// ---------------------------------------------------------------------------------------------
// Batches
// ---------------------------------------------------------------------------------------------

/// Inputs of [`score_batch`]; every slice has one entry per sample.
#[derive(Clone, Copy, Debug)]
pub struct ScoreInputs<'a> {
    pub agents: &'a [Agent],
    pub format_ok: &'a [bool],
    /// Task reward per sample, finite (normally in `[0, 1]`).
    pub task: &'a [f64],
    pub policy_tokens: &'a [f64],
    pub expert_tokens: &'a [f64],
    /// Row-major `(n, m)` kind codes of every memory retrieved for the sample's questions, and `m`.
    pub retrieved_kinds: Option<(&'a [i8], usize)>,
    /// False marks a sample whose reward could not be computed: reward 0, weight 0.
    pub valid: Option<&'a [bool]>,
}

/// Outputs of [`score_batch`], one entry per sample.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BatchScores {
    pub length_penalty: Vec<f64>,
    pub reward: Vec<f64>,
    pub weight: Vec<f64>,
    pub dominant: Vec<Option<BankKind>>,
    /// Per sample, how many retrieved entries were episodic, semantic, procedural (the counts
    /// the dominant kind is taken from; zeros without `retrieved_kinds`).
    pub retrieved: Vec<[u64; 3]>,
}

const MIN_PAR_LEN: usize = 2048;

fn check_len(name: &str, got: usize, n: usize) -> Result<(), BatchError> {
    if got != n {
        return Err(BatchError(format!(
            "{name} has {got} entries but agents has {n}; give one per sample"
        )));
    }
    Ok(())
}

fn check_tokens(name: &str, xs: &[f64]) -> Result<(), BatchError> {
    if let Some((i, v)) = xs
        .iter()
        .enumerate()
        .find(|(_, v)| !(v.is_finite() && **v >= 0.0))
    {
        return Err(BatchError(format!(
            "{name}[{i}] is {v}; token counts must be finite and >= 0"
        )));
    }
    Ok(())
}

/// Length penalties of many samples (see [`length_penalty`]).
pub fn length_penalties(
    agents: &[Agent],
    policy_tokens: &[f64],
    expert_tokens: &[f64],
    cfg: &RewardConfig,
) -> Result<Vec<f64>, BatchError> {
    let n = agents.len();
    check_len("policy_tokens", policy_tokens.len(), n)?;
    check_len("expert_tokens", expert_tokens.len(), n)?;
    check_tokens("policy_tokens", policy_tokens)?;
    check_tokens("expert_tokens", expert_tokens)?;
    Ok(crate::par::map_indices_min(n, MIN_PAR_LEN, |i| {
        length_penalty(agents[i], policy_tokens[i], expert_tokens[i], cfg)
    }))
}

/// Rewards, penalties and attribution weights of many samples.
pub fn score_batch(inp: &ScoreInputs<'_>, cfg: &RewardConfig) -> Result<BatchScores, BatchError> {
    let n = inp.agents.len();
    check_len("format_ok", inp.format_ok.len(), n)?;
    check_len("task", inp.task.len(), n)?;
    check_len("policy_tokens", inp.policy_tokens.len(), n)?;
    check_len("expert_tokens", inp.expert_tokens.len(), n)?;
    if let Some(v) = inp.valid {
        check_len("valid", v.len(), n)?;
    }
    check_tokens("policy_tokens", inp.policy_tokens)?;
    check_tokens("expert_tokens", inp.expert_tokens)?;
    if let Some((i, v)) = inp.task.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(BatchError(format!(
            "task[{i}] is {v}; task rewards must be finite"
        )));
    }
    let retrieved: Vec<[u64; 3]> = match inp.retrieved_kinds {
        None => vec![[0; 3]; n],
        Some((kinds, m)) => {
            if kinds.len() != n * m {
                return Err(BatchError(format!(
                    "retrieved_kinds has {} entries; expected {n} rows of {m}",
                    kinds.len()
                )));
            }
            let mut out = Vec::with_capacity(n);
            for i in 0..n {
                let row = &kinds[i * m..(i + 1) * m];
                out.push(
                    retrieval_counts(row)
                        .map_err(|e| BatchError(format!("retrieved_kinds row {i}: {e}")))?,
                );
            }
            out
        }
    };
    let dominant: Vec<Option<BankKind>> = retrieved.iter().map(|&c| dominant_kind(c)).collect();
    let triples: Vec<(f64, f64, f64)> = crate::par::map_indices_min(n, MIN_PAR_LEN, |i| {
        let agent = inp.agents[i];
        let pen = length_penalty(agent, inp.policy_tokens[i], inp.expert_tokens[i], cfg);
        if inp.valid.is_some_and(|v| !v[i]) {
            return (pen, 0.0, 0.0);
        }
        let reward = final_reward(inp.format_ok[i], inp.task[i], pen, cfg);
        (pen, reward, attribution_weight(agent, dominant[i], cfg))
    });
    let mut out = BatchScores {
        length_penalty: Vec::with_capacity(n),
        reward: Vec::with_capacity(n),
        weight: Vec::with_capacity(n),
        dominant,
        retrieved,
    };
    for (p, r, w) in triples {
        out.length_penalty.push(p);
        out.reward.push(r);
        out.weight.push(w);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg() -> RewardConfig {
        RewardConfig::default()
    }

    #[test]
    fn defaults_are_the_papers_and_valid() {
        let c = cfg();
        c.validate().unwrap();
        assert_eq!(c.length_lambda, 0.8);
        assert_eq!((c.core_theta_min, c.core_theta_max), (150.0, 400.0));
        assert_eq!(
            (
                c.ratio_lower,
                c.ratio_upper,
                c.ratio_upper_full,
                c.ratio_lower_full
            ),
            (0.5, 1.3, 2.0, 0.2)
        );
        assert_eq!((c.min_abs_diff, c.attribution_alpha), (200.0, 4.0));
    }

    #[test]
    fn bad_configs_are_refused() {
        for (name, v) in [
            ("length_lambda", 1.5),
            ("length_lambda", -0.1),
            ("core_theta_max", 100.0),
            ("ratio_lower_full", 0.6),
            ("ratio_upper", 0.4),
            ("ratio_upper_full", 1.0),
            ("min_abs_diff", -1.0),
            ("attribution_alpha", 0.0),
            ("core_theta_min", f64::NAN),
        ] {
            let mut c = cfg();
            c.set_float(name, v).unwrap();
            let e = c.validate().unwrap_err();
            assert!(!e.0.is_empty(), "{name}");
        }
        assert!(cfg().set_float("nope", 1.0).is_err());
        assert!(serde_json::from_str::<RewardConfig>(r#"{"nope": 1}"#).is_err());
        let c: RewardConfig = serde_json::from_str(r#"{"length_lambda": 0.5}"#).unwrap();
        assert_eq!(c.length_lambda, 0.5);
        assert_eq!(c.core_theta_max, 400.0);
    }

    #[test]
    fn penalties_at_known_points() {
        let c = cfg();
        assert_eq!(core_length_penalty(150.0, &c), 0.0);
        assert_eq!(core_length_penalty(275.0, &c), 0.5);
        assert_eq!(core_length_penalty(400.0, &c), 1.0);
        assert_eq!(core_length_penalty(1e9, &c), 1.0);
        assert_eq!(ratio_length_penalty(500.0, 0.0, &c), 0.0);
        assert_eq!(ratio_length_penalty(1000.0, 850.0, &c), 0.0); // diff under 200
        assert_eq!(ratio_length_penalty(1200.0, 1000.0, &c), 0.0); // ratio 1.2 in band
        assert!((ratio_length_penalty(1650.0, 1000.0, &c) - 0.5).abs() < 1e-12);
        assert_eq!(ratio_length_penalty(3000.0, 1000.0, &c), 1.0);
        assert!((ratio_length_penalty(350.0, 1000.0, &c) - 0.5).abs() < 1e-12);
        assert_eq!(ratio_length_penalty(0.0, 1000.0, &c), 1.0);
        assert_eq!(length_penalty(Agent::Core, 400.0, 0.0, &c), 1.0);
        let mut off = cfg();
        off.length_penalty_enabled = false;
        assert_eq!(length_penalty(Agent::Core, 400.0, 0.0, &off), 0.0);
    }

    #[test]
    fn reward_and_attribution() {
        let c = cfg();
        assert_eq!(final_reward(false, 1.0, 0.0, &c), 0.0);
        assert!((final_reward(true, 0.5, 0.5, &c) - 0.3).abs() < 1e-12);
        assert_eq!(approx_tokens("héllo wörld!"), 3);
        assert_eq!(retrieval_counts(&[0, 1, 1, -1, 2]).unwrap(), [1, 2, 1]);
        assert_eq!(retrieval_counts(&[3]).unwrap_err(), BadKindCode(3));
        assert_eq!(dominant_kind([0, 0, 0]), None);
        assert_eq!(dominant_kind([2, 2, 1]), Some(BankKind::Episodic));
        assert_eq!(dominant_kind([1, 2, 2]), Some(BankKind::Semantic));
        assert_eq!(
            attribution_weight(Agent::Semantic, Some(BankKind::Semantic), &c),
            4.0
        );
        assert_eq!(
            attribution_weight(Agent::Episodic, Some(BankKind::Semantic), &c),
            1.0
        );
        assert_eq!(
            attribution_weight(Agent::Core, Some(BankKind::Semantic), &c),
            1.0
        );
        assert_eq!(attribution_weight(Agent::Semantic, None, &c), 1.0);
        let mut off = cfg();
        off.attribution_enabled = false;
        assert_eq!(
            attribution_weight(Agent::Semantic, Some(BankKind::Semantic), &off),
            1.0
        );
    }

    #[test]
    fn batch_scoring() {
        let c = cfg();
        let agents = [
            Agent::Core,
            Agent::Semantic,
            Agent::Episodic,
            Agent::Procedural,
        ];
        let kinds: [i8; 8] = [1, 1, 1, -1, 0, -1, -1, -1];
        let inp = ScoreInputs {
            agents: &agents,
            format_ok: &[true, true, false, true],
            task: &[1.0, 0.6, 1.0, 0.4],
            policy_tokens: &[275.0, 10.0, 10.0, 10.0],
            expert_tokens: &[0.0, 10.0, 10.0, 10.0],
            retrieved_kinds: Some((&kinds, 2)),
            valid: Some(&[true, true, true, false]),
        };
        let s = score_batch(&inp, &c).unwrap();
        assert!((s.reward[0] - 0.6).abs() < 1e-12);
        assert_eq!(s.reward[1], 0.6);
        assert_eq!(s.reward[2], 0.0);
        assert_eq!(s.reward[3], 0.0);
        // A sample that failed the format gate keeps its weight (its reward is 0); an invalid one gets 0.
        assert_eq!(s.weight, vec![1.0, 4.0, 4.0, 0.0]);
        assert_eq!(
            s.dominant,
            vec![
                Some(BankKind::Semantic),
                Some(BankKind::Semantic),
                Some(BankKind::Episodic),
                None
            ]
        );
        assert_eq!(
            s.retrieved,
            vec![[0, 2, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]]
        );
        let bad = ScoreInputs {
            task: &[1.0],
            ..inp
        };
        assert!(score_batch(&bad, &c).is_err());
        let bad = ScoreInputs {
            policy_tokens: &[1.0, f64::NAN, 1.0, 1.0],
            ..inp
        };
        assert!(score_batch(&bad, &c).is_err());
    }

    proptest! {
        #[test]
        fn penalties_in_unit_interval_and_monotone(a in 0.0f64..5000.0, b in 0.0f64..5000.0, e in 0.0f64..3000.0) {
            let c = cfg();
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            let pl = core_length_penalty(lo, &c);
            let ph = core_length_penalty(hi, &c);
            prop_assert!((0.0..=1.0).contains(&pl) && (0.0..=1.0).contains(&ph));
            prop_assert!(pl <= ph);
            let r = ratio_length_penalty(a, e, &c);
            prop_assert!((0.0..=1.0).contains(&r));
            // Above the expert, more tokens never lower the penalty.
            if lo >= e {
                prop_assert!(ratio_length_penalty(lo, e, &c) <= ratio_length_penalty(hi, e, &c));
            }
            // Below the expert, fewer tokens never lower the penalty.
            if hi <= e {
                prop_assert!(ratio_length_penalty(hi, e, &c) <= ratio_length_penalty(lo, e, &c));
            }
        }

        #[test]
        fn reward_bounded_by_task(task in 0.0f64..1.0, pen in 0.0f64..1.0, ok in any::<bool>()) {
            let c = cfg();
            let r = final_reward(ok, task, pen, &c);
            prop_assert!(r >= 0.0 && r <= task + 1e-12);
        }

        #[test]
        fn dominant_is_a_maximum(c0 in 0u64..5, c1 in 0u64..5, c2 in 0u64..5) {
            let counts = [c0, c1, c2];
            match dominant_kind(counts) {
                None => prop_assert_eq!(counts, [0, 0, 0]),
                Some(k) => {
                    let n = counts[k.code() as usize];
                    prop_assert_eq!(n, *counts.iter().max().unwrap());
                    prop_assert!(counts[..k.code() as usize].iter().all(|x| *x < n));
                }
            }
        }
    }
}
