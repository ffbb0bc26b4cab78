//! The [`Store`] trait and the plan/apply engine behind it: how a store (a [`MemoryState`] or a
//! [`StateView`]) is planned, committed, filled directly and searched. Both implement the trait
//! with a handful of primitives (their layers, and how to add, retire and set the core); every
//! operation callers use is a default method here, so the two cannot drift apart.
//!
//! [`MemoryState`]: crate::state::MemoryState
//! [`StateView`]: crate::overlay::StateView
//!
//! # Apply in two phases
//! [`Store::plan`] looks at validated actions and says which texts need an embedding
//! ([`Plan::texts`]: every new memory text of ADD/UPDATE/MERGE in action order, then, in
//! `replace` mode, each old text of UPDATE/MERGE that has no exact match, see below). The caller
//! embeds them in one batch and calls [`Store::commit`] with one vector per text. A plan
//! belongs to the state that made it and to that state's version: committing it to another state
//! or view, or after any other change, is refused ([`StateError::StalePlan`]).
//!
//! # Semantics (applied in action order; each action sees the effects of the earlier ones)
//! - core APPEND: `core + "\n" + text` (just `text` when the block is empty).
//! - core REPLACE: the first occurrence of `old[0]` is replaced by `text`; if `old[0]` does not
//!   occur, the block is unchanged and the reference is reported in `unmatched`.
//! - core REWRITE: the block becomes `text`.
//! - SKIP (core or bank): counted in `skipped`.
//! - bank ADD: the text is added, unless a live entry of the same bank has the same normalised
//!   text ([`crate::bank::normalize_text`]): then it is dropped and counted in `duplicates` (models often
//!   restate what they were shown; keeping both would only crowd retrieval).
//! - bank UPDATE / MERGE in `history` mode (the paper's default): old entries stay, the new text
//!   is added as for ADD.
//! - bank UPDATE / MERGE in `replace` mode: each old text retires the entry it names, then the new
//!   text is added as for ADD. An old text names the lowest-id live entry of the same bank with
//!   the same normalised text; failing that, the nearest live entry of that bank by cosine, if its
//!   score is at least `match_threshold`. Anything else is reported in `unmatched` (with the best
//!   score seen) and nothing is retired for it: references are never guessed. Old texts are
//!   embedded only when the plan sees no exact match for them; if an earlier action of the same
//!   plan retired that match, the reference is reported unmatched (with no score).
//!
//! Entry ids are assigned from one counter shared by the three banks, in commit order, and are
//! never reused in a state.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::bank::normalize_text;
use crate::config::{StateConfig, UpdateMode};
use crate::error::{Result, StateError};
use crate::kinds::{Action, Agent, BankKind, Op};
use crate::layers::Layers;
use crate::records::{CommitReport, Hit, Provenance, Unmatched};
use crate::vectors::prepare_vectors;

/// Unique token per state or view, so a plan cannot be committed to a store that did not make it.
pub(crate) fn new_owner() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// First phase of an apply (see the module docs).
#[derive(Clone, Debug)]
pub struct Plan {
    pub(crate) owner: u64,
    pub(crate) version: u64,
    pub texts: Vec<String>,
    pub(crate) actions: Vec<Action>,
    pub(crate) provenance: Arc<Provenance>,
    /// Per action: row in `texts` of its new bank text.
    pub(crate) new_slot: Vec<Option<usize>>,
    /// Per action: per old text, its row in `texts` if it was embedded.
    pub(crate) old_slots: Vec<Vec<Option<usize>>>,
    /// `normalize_text` of each new bank text (row `r` of `texts` for `r < new_norms.len()`),
    /// computed once here and reused by the commit's duplicate check and the bank's text index.
    pub(crate) new_norms: Vec<String>,
    /// Per action: `normalize_text` of each old text (replace mode only; empty otherwise).
    pub(crate) old_norms: Vec<Vec<String>>,
}

impl Plan {
    pub fn actions(&self) -> &[Action] {
        &self.actions
    }
}

pub(crate) mod sealed {
    //! The primitives a commit changes a store with. Public in name only (this module is not
    //! reachable from outside the crate), so that no other crate can implement [`super::Store`]
    //! or change a store without going through a plan.
    use std::sync::Arc;

    use crate::error::Result;
    use crate::kinds::BankKind;
    use crate::records::Provenance;

    pub trait Mutate {
        /// The identity token plans of this store carry (see `new_owner`).
        fn owner(&self) -> u64;
        fn bump_version(&mut self);
        /// Append a live entry; `norm` is `normalize_text(&text)`.
        fn push_entry(
            &mut self,
            kind: BankKind,
            text: String,
            norm: String,
            provenance: Arc<Provenance>,
            vector: &[f32],
        ) -> u64;
        /// Retire a live entry; false if it was not live.
        fn retire(&mut self, id: u64) -> bool;
        fn set_core_text(&mut self, text: String);
        /// Called once at the end of a commit (graph maintenance for states).
        fn finish(&mut self) -> Result<()>;
    }
}

/// A memory store: a [`MemoryState`](crate::state::MemoryState) or a
/// [`StateView`](crate::overlay::StateView). Implementors give their [`Layers`] and version;
/// everything else is defined once, here.
pub trait Store: sealed::Mutate + Send + Sync {
    /// The store as a base and (for views) a delta; every read goes through it.
    fn layers(&self) -> Layers<'_>;

    /// Bumped by every change; a plan is valid only for the version it was made at.
    fn version(&self) -> u64;

    fn config(&self) -> &StateConfig {
        self.layers().config()
    }

    fn core(&self) -> &str {
        self.layers().core()
    }

    /// Phase one of an apply (see the module docs).
    fn plan(&self, actions: &[Action], provenance: Provenance) -> Result<Plan> {
        self.plan_owned(actions.to_vec(), provenance)
    }

    /// [`Store::plan`] for actions the caller no longer needs (the plan keeps them: no copy).
    fn plan_owned(&self, actions: Vec<Action>, provenance: Provenance) -> Result<Plan> {
        make_plan(
            self.layers(),
            self.owner(),
            self.version(),
            actions,
            provenance,
        )
    }

    /// Phase two: apply `plan` with one vector per text of [`Plan::texts`].
    fn commit(&mut self, plan: &Plan, vectors: &[f32]) -> Result<CommitReport> {
        apply_plan(self, plan, vectors)
    }

    /// Whether `plan` may be committed here now.
    fn check_plan(&self, plan: &Plan) -> Result<()> {
        if plan.owner == self.owner() && plan.version == self.version() {
            Ok(())
        } else {
            Err(StateError::StalePlan)
        }
    }

    /// Insert entries directly (the raw-turn builder): no duplicate check, no matching.
    fn add_entries(
        &mut self,
        kind: BankKind,
        texts: &[String],
        vectors: &[f32],
        provenances: &[Provenance],
    ) -> Result<Vec<u64>> {
        add_direct(self, kind, texts, vectors, provenances)
    }

    /// Replace the core block (after compression).
    fn set_core(&mut self, text: String) {
        self.set_core_text(text);
        self.bump_version();
    }

    /// Top-k for `nq` queries (row-major, normalised here). Errors on shape or bad vectors.
    fn search(&self, queries: &[f32], k: usize, kind: Option<BankKind>) -> Result<Vec<Vec<Hit>>> {
        let dim = self.config().dim;
        let nq = queries.len().checked_div(dim).unwrap_or(0);
        let q = prepare_vectors(queries, nq, dim, "search")?;
        Ok(self.layers().search(&q, nq, k, kind, false))
    }
}

fn check_action(index: usize, a: &Action) -> Result<()> {
    let bad = |message: &str| StateError::InvalidAction {
        index,
        message: message.to_string(),
    };
    let need_text = || a.text.is_none().then(|| bad("this operation needs a text"));
    match (a.agent, a.op) {
        (Agent::Core, Op::Append | Op::Rewrite) => need_text().map_or(Ok(()), Err),
        (Agent::Core, Op::Replace) => {
            if let Some(e) = need_text() {
                return Err(e);
            }
            if a.old.is_empty() {
                return Err(bad("REPLACE needs the old text to replace"));
            }
            Ok(())
        }
        (_, Op::Skip) => Ok(()),
        (Agent::Core, op) => Err(bad(&format!("{} is not a core operation", op.as_str()))),
        (_, Op::Add) => need_text().map_or(Ok(()), Err),
        (_, Op::Update | Op::Merge) => {
            if let Some(e) = need_text() {
                return Err(e);
            }
            if a.old.is_empty() {
                return Err(bad("UPDATE/MERGE need at least one old memory"));
            }
            Ok(())
        }
        (_, op) => Err(bad(&format!("{} is not a bank operation", op.as_str()))),
    }
}

/// Phase one (see the module docs). Takes the actions by value: the plan keeps them.
fn make_plan(
    layers: Layers<'_>,
    owner: u64,
    version: u64,
    actions: Vec<Action>,
    provenance: Provenance,
) -> Result<Plan> {
    let mode = layers.config().update_mode;
    let mut texts = Vec::new();
    let mut new_norms = Vec::new();
    let mut new_slot = Vec::with_capacity(actions.len());
    // Texts this plan adds, per bank: an old text naming one of them needs no embedding (it
    // will match exactly at commit). Only consulted in replace mode.
    let mut pending: [HashSet<String>; 3] = Default::default();
    let mut old_texts: Vec<String> = Vec::new();
    let mut old_rel: Vec<Vec<Option<usize>>> = Vec::with_capacity(actions.len());
    let mut old_norms: Vec<Vec<String>> = Vec::new();
    for (i, a) in actions.iter().enumerate() {
        check_action(i, a)?;
        let mut olds = Vec::new();
        let (Some(kind), Op::Add | Op::Update | Op::Merge) = (a.agent.bank(), a.op) else {
            new_slot.push(None);
            old_rel.push(olds);
            continue;
        };
        let text = a.text.clone().unwrap_or_default();
        if mode == UpdateMode::Replace {
            let mut norms = Vec::new();
            if matches!(a.op, Op::Update | Op::Merge) {
                for old in &a.old {
                    let norm = normalize_text(old);
                    if layers.find_exact(kind, &norm).is_some()
                        || pending[kind as usize].contains(&norm)
                    {
                        olds.push(None);
                    } else {
                        olds.push(Some(old_texts.len()));
                        old_texts.push(old.clone());
                    }
                    norms.push(norm);
                }
            }
            old_norms.resize(i, Vec::new());
            old_norms.push(norms);
        }
        let norm = normalize_text(&text);
        if mode == UpdateMode::Replace {
            pending[kind as usize].insert(norm.clone());
        }
        new_norms.push(norm);
        new_slot.push(Some(texts.len()));
        texts.push(text);
        old_rel.push(olds);
    }
    let offset = texts.len();
    texts.extend(old_texts);
    let old_slots = old_rel
        .into_iter()
        .map(|v| v.into_iter().map(|s| s.map(|j| j + offset)).collect())
        .collect();
    Ok(Plan {
        owner,
        version,
        texts,
        actions,
        provenance: Arc::new(provenance),
        new_slot,
        old_slots,
        new_norms,
        old_norms,
    })
}

/// Phase two (see the module docs).
fn apply_plan<T: Store + ?Sized>(
    target: &mut T,
    plan: &Plan,
    vectors: &[f32],
) -> Result<CommitReport> {
    target.check_plan(plan)?;
    let dim = target.layers().config().dim;
    let mode = target.layers().config().update_mode;
    let threshold = target.layers().config().match_threshold;
    let vecs = prepare_vectors(vectors, plan.texts.len(), dim, "commit")?;
    let row = |i: usize| &vecs[i * dim..(i + 1) * dim];
    let mut report = CommitReport {
        core_before: target.layers().core().to_string(),
        ..Default::default()
    };
    for (i, a) in plan.actions.iter().enumerate() {
        match (a.agent.bank(), a.op) {
            (_, Op::Skip) => report.skipped += 1,
            (None, Op::Append) => {
                let text = a.text.as_deref().unwrap_or("");
                let core = target.layers().core();
                let new = if core.is_empty() {
                    text.to_string()
                } else {
                    format!("{core}\n{text}")
                };
                target.set_core_text(new);
            }
            (None, Op::Rewrite) => target.set_core_text(a.text.clone().unwrap_or_default()),
            (None, Op::Replace) => {
                let old = &a.old[0];
                let core = target.layers().core();
                if !old.is_empty() && core.contains(old.as_str()) {
                    let new = core.replacen(old.as_str(), a.text.as_deref().unwrap_or(""), 1);
                    target.set_core_text(new);
                } else {
                    report.unmatched.push(Unmatched {
                        action_index: i,
                        agent: a.agent,
                        old_text: old.clone(),
                        best_score: None,
                    });
                }
            }
            (Some(kind), Op::Add | Op::Update | Op::Merge) => {
                if mode == UpdateMode::Replace && a.op != Op::Add {
                    for (j, old) in a.old.iter().enumerate() {
                        let norm = match plan.old_norms.get(i).and_then(|n| n.get(j)) {
                            Some(n) => std::borrow::Cow::Borrowed(n.as_str()),
                            None => std::borrow::Cow::Owned(normalize_text(old)),
                        };
                        if let Some(id) = target.layers().find_exact(kind, &norm) {
                            target.retire(id);
                            report.retired.push(id);
                            continue;
                        }
                        let mut best = None;
                        if let Some(slot) = plan.old_slots[i][j] {
                            let hits = target.layers().search(row(slot), 1, 1, Some(kind), true);
                            if let Some(h) = hits[0].first() {
                                best = Some(h.score);
                                if h.score >= threshold {
                                    target.retire(h.id);
                                    report.retired.push(h.id);
                                    continue;
                                }
                            }
                        }
                        report.unmatched.push(Unmatched {
                            action_index: i,
                            agent: a.agent,
                            old_text: old.clone(),
                            best_score: best,
                        });
                    }
                }
                let slot = plan.new_slot[i].expect("bank text slot");
                let norm = &plan.new_norms[slot];
                if target.layers().find_exact(kind, norm).is_some() {
                    report.duplicates += 1;
                } else {
                    let text = a.text.clone().unwrap_or_default();
                    let id = target.push_entry(
                        kind,
                        text,
                        norm.clone(),
                        Arc::clone(&plan.provenance),
                        row(slot),
                    );
                    report.added.push(id);
                }
            }
            _ => unreachable!("checked by make_plan"),
        }
    }
    target.finish()?;
    target.bump_version();
    report.core_after = target.layers().core().to_string();
    report.compression_due = target.layers().compression_due();
    Ok(report)
}

/// Direct insertion (the raw-turn builder): no duplicate check, no matching.
fn add_direct<T: Store + ?Sized>(
    target: &mut T,
    kind: BankKind,
    texts: &[String],
    vectors: &[f32],
    provenances: &[Provenance],
) -> Result<Vec<u64>> {
    if provenances.len() != texts.len() {
        return Err(StateError::InvalidArgument(format!(
            "add_entries: {} texts but {} provenances",
            texts.len(),
            provenances.len()
        )));
    }
    let dim = target.layers().config().dim;
    let vecs = prepare_vectors(vectors, texts.len(), dim, "add_entries")?;
    let mut ids = Vec::with_capacity(texts.len());
    for (i, (t, p)) in texts.iter().zip(provenances).enumerate() {
        ids.push(target.push_entry(
            kind,
            t.clone(),
            normalize_text(t),
            Arc::new(p.clone()),
            &vecs[i * dim..(i + 1) * dim],
        ));
    }
    target.finish()?;
    target.bump_version();
    Ok(ids)
}
