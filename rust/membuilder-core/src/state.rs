//! The memory state: one core block and three banks of entries, changed by two-phase apply.
//!
//! # Apply in two phases
//! [`MemoryState::plan`] looks at validated actions and says which texts need an embedding
//! ([`Plan::texts`]: every new memory text of ADD/UPDATE/MERGE in action order, then, in
//! `replace` mode, each old text of UPDATE/MERGE that has no exact match, see below). The caller
//! embeds them in one batch and calls [`MemoryState::commit`] with one vector per text. A plan
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
//!   text ([`normalize_text`]): then it is dropped and counted in `duplicates` (models often
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

use serde::{Deserialize, Serialize};

pub use crate::bank::normalize_text;
use crate::bank::Bank;
use crate::kinds::{Action, Agent, BankKind, Op};
use crate::overlay::Delta;
use crate::retrieval;

/// Where a memory came from. `session` is the 0-based session index in its conversation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    pub conversation: String,
    pub session: i64,
    pub timestamp: Option<String>,
    pub turn_ids: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpdateMode {
    /// UPDATE/MERGE keep the old entries and add the new text (the paper's semantics).
    History,
    /// UPDATE/MERGE retire the entries they name, then add the new text.
    Replace,
}

impl UpdateMode {
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateMode::History => "history",
            UpdateMode::Replace => "replace",
        }
    }

    pub fn parse(s: &str) -> Option<UpdateMode> {
        match s {
            "history" => Some(UpdateMode::History),
            "replace" => Some(UpdateMode::Replace),
            _ => None,
        }
    }
}

/// Settings fixed for the life of a state (and of its views).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateConfig {
    /// Embedding dimension (> 0).
    pub dim: usize,
    pub update_mode: UpdateMode,
    /// Characters (Unicode code points) above which the core block is due for compression.
    pub core_limit: usize,
    /// A bank with at most this many live entries is searched exactly; above, with a graph.
    pub exact_search_limit: usize,
    /// Cosine at or above which an unmatched old text is matched to its nearest entry.
    pub match_threshold: f32,
}

impl StateConfig {
    pub fn new(dim: usize) -> Self {
        StateConfig {
            dim,
            update_mode: UpdateMode::History,
            core_limit: 5000,
            exact_search_limit: 20_000,
            match_threshold: 0.92,
        }
    }

    pub fn validate(&self) -> Result<(), StateError> {
        if self.dim == 0 || self.dim > 65_536 {
            return Err(StateError::InvalidArgument(format!(
                "dim must be between 1 and 65536, got {}",
                self.dim
            )));
        }
        if !(self.match_threshold.is_finite() && (-1.0..=1.0).contains(&self.match_threshold)) {
            return Err(StateError::InvalidArgument(format!(
                "match_threshold must be a cosine in [-1, 1], got {}",
                self.match_threshold
            )));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum StateError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("invalid action at index {index}: {message}")]
    InvalidAction { index: usize, message: String },
    #[error(
        "this plan was made by another state or view, or before a later change to this one; \
         plan again and commit the new plan"
    )]
    StalePlan,
    #[error("no entry with id {0}")]
    UnknownId(u64),
    #[error("graph index failed: {0}")]
    Index(String),
}

pub type Result<T, E = StateError> = std::result::Result<T, E>;

/// Unique token per state or view, so a plan cannot be committed to a store that did not make it.
pub(crate) fn new_owner() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// An entry as returned to callers.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub id: u64,
    pub kind: BankKind,
    pub text: String,
    pub provenance: Arc<Provenance>,
    pub retired: bool,
}

/// An UPDATE/MERGE/REPLACE reference that named nothing.
#[derive(Clone, Debug, PartialEq)]
pub struct Unmatched {
    pub action_index: usize,
    pub agent: Agent,
    pub old_text: String,
    /// Best cosine among live entries of the bank (None: not embedded, core, or empty bank).
    pub best_score: Option<f32>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct CommitReport {
    pub added: Vec<u64>,
    pub retired: Vec<u64>,
    pub unmatched: Vec<Unmatched>,
    pub skipped: usize,
    pub duplicates: usize,
    pub core_before: String,
    pub core_after: String,
    pub compression_due: bool,
}

impl CommitReport {
    pub fn core_changed(&self) -> bool {
        self.core_before != self.core_after
    }
}

/// One search result.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hit {
    pub id: u64,
    pub score: f32,
    pub kind: BankKind,
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

/// The immutable-when-shared body of a state: what views share and what files hold.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub config: StateConfig,
    pub core: String,
    pub banks: [Bank; 3],
    pub next_id: u64,
}

impl Snapshot {
    pub fn new(config: StateConfig) -> Self {
        let dim = config.dim;
        Snapshot {
            config,
            core: String::new(),
            banks: BankKind::ALL.map(|k| Bank::new(k, dim)),
            next_id: 0,
        }
    }

    pub fn maintain_graphs(&mut self) -> Result<()> {
        let limit = self.config.exact_search_limit;
        for b in self.banks.iter_mut() {
            b.maintain_graph(limit).map_err(StateError::Index)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Read access over a base and an optional overlay delta
// ---------------------------------------------------------------------------------------------

/// A state as seen through an optional view delta; every read goes through here so that states
/// and views share one implementation of matching and search.
#[derive(Clone, Copy)]
pub struct Layers<'a> {
    pub base: &'a Snapshot,
    pub delta: Option<&'a Delta>,
}

impl<'a> Layers<'a> {
    pub fn config(&self) -> &'a StateConfig {
        &self.base.config
    }

    pub fn core(&self) -> &'a str {
        match self.delta.and_then(|d| d.core.as_deref()) {
            Some(c) => c,
            None => &self.base.core,
        }
    }

    pub fn compression_due(&self) -> bool {
        self.core().chars().count() > self.config().core_limit
    }

    fn retired_in_view(&self, id: u64) -> bool {
        self.delta.is_some_and(|d| d.retired.contains(&id))
    }

    /// Live entries in one bank, or all.
    pub fn count(&self, kind: Option<BankKind>) -> usize {
        let kinds: Vec<BankKind> = kind.map_or(BankKind::ALL.to_vec(), |k| vec![k]);
        kinds
            .into_iter()
            .map(|k| {
                let i = k as usize;
                let base = self.base.banks[i].n_live;
                match self.delta {
                    Some(d) => base - d.retired_by_bank[i] + d.banks[i].n_live,
                    None => base,
                }
            })
            .sum()
    }

    /// Locate an id: (bank, row, in_delta).
    fn locate(&self, id: u64) -> Option<(&'a Bank, usize, bool)> {
        if let Some(d) = self.delta {
            if id >= d.first_id {
                for b in d.banks.iter() {
                    if let Some(r) = b.row_of(id) {
                        return Some((b, r, true));
                    }
                }
                return None;
            }
        }
        for b in self.base.banks.iter() {
            if let Some(r) = b.row_of(id) {
                return Some((b, r, false));
            }
        }
        None
    }

    pub fn get(&self, id: u64) -> Option<Entry> {
        let (bank, row, in_delta) = self.locate(id)?;
        let r = &bank.rows[row];
        let live = bank.live[row] && (in_delta || !self.retired_in_view(id));
        Some(Entry {
            id,
            kind: bank.kind,
            text: r.text.clone(),
            provenance: Arc::clone(&r.provenance),
            retired: !live,
        })
    }

    pub fn is_live(&self, id: u64) -> bool {
        match self.locate(id) {
            Some((bank, row, in_delta)) => {
                bank.live[row] && (in_delta || !self.retired_in_view(id))
            }
            None => false,
        }
    }

    /// Entries in id order.
    pub fn entries(&self, kind: Option<BankKind>, include_retired: bool) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut push_bank = |bank: &Bank, in_delta: bool| {
            if kind.is_some_and(|k| k != bank.kind) {
                return;
            }
            for (row, r) in bank.rows.iter().enumerate() {
                let live = bank.live[row] && (in_delta || !self.retired_in_view(r.id));
                if live || include_retired {
                    out.push(Entry {
                        id: r.id,
                        kind: bank.kind,
                        text: r.text.clone(),
                        provenance: Arc::clone(&r.provenance),
                        retired: !live,
                    });
                }
            }
        };
        for b in self.base.banks.iter() {
            push_bank(b, false);
        }
        if let Some(d) = self.delta {
            for b in d.banks.iter() {
                push_bank(b, true);
            }
        }
        out.sort_by_key(|e| e.id);
        out
    }

    /// Lowest-id live entry of `kind` whose normalised text is `norm`.
    pub fn find_exact(&self, kind: BankKind, norm: &str) -> Option<u64> {
        let i = kind as usize;
        let b = &self.base.banks[i];
        for &row in b.rows_with_text(norm) {
            let row = row as usize;
            if b.live[row] && !self.retired_in_view(b.rows[row].id) {
                return Some(b.rows[row].id);
            }
        }
        if let Some(d) = self.delta {
            let b = &d.banks[i];
            for &row in b.rows_with_text(norm) {
                if b.live[row as usize] {
                    return Some(b.rows[row as usize].id);
                }
            }
        }
        None
    }

    /// Top-k for many normalised queries (row-major, `nq` rows). `exact` forces exact search
    /// even where a bank has a graph (used for matching, which must be deterministic).
    pub fn search(
        &self,
        queries: &[f32],
        nq: usize,
        k: usize,
        kind: Option<BankKind>,
        exact: bool,
    ) -> Vec<Vec<Hit>> {
        let refs: Vec<(Layers<'a>, usize)> = (0..nq).map(|q| (*self, q)).collect();
        search_layers(&refs, queries, k, kind, exact)
    }
}

/// Batched top-k where query `i` (row `i` of `queries`, normalised) runs against `items[i].0`.
/// Queries over the same base share one exact scan of it; each view's own retirements are
/// filtered per query and its delta is searched by brute force. Hits are ordered by score desc,
/// id asc.
pub fn search_layers(
    items: &[(Layers<'_>, usize)],
    queries: &[f32],
    k: usize,
    kind: Option<BankKind>,
    exact: bool,
) -> Vec<Vec<Hit>> {
    let n = items.len();
    let mut results: Vec<Vec<Hit>> = vec![Vec::new(); n];
    if n == 0 || k == 0 {
        return results;
    }
    let dim = items[0].0.base.config.dim;
    let kinds: Vec<BankKind> = kind.map_or(BankKind::ALL.to_vec(), |k| vec![k]);
    // Group queries by base (pointer identity): views of one base share its matrix.
    let mut groups: Vec<(*const Snapshot, Vec<usize>)> = Vec::new();
    for (i, (layers, _)) in items.iter().enumerate() {
        let p = layers.base as *const Snapshot;
        match groups.iter_mut().find(|g| g.0 == p) {
            Some(g) => g.1.push(i),
            None => groups.push((p, vec![i])),
        }
    }
    let mut per_item: Vec<Vec<Vec<(f32, u64, BankKind)>>> = vec![Vec::new(); n];
    for (_, members) in groups.iter() {
        let base = items[members[0]].0.base;
        // The group's queries, in member order: the caller's own rows when they already are
        // (one store searched with all its queries: no copy of a large batch to page in).
        let in_order = members.len() * dim == queries.len()
            && members.iter().enumerate().all(|(j, &i)| items[i].1 == j);
        let qbuf: std::borrow::Cow<'_, [f32]> = if in_order {
            std::borrow::Cow::Borrowed(queries)
        } else {
            let mut buf = Vec::with_capacity(members.len() * dim);
            for &i in members {
                let q = items[i].1;
                buf.extend_from_slice(&queries[q * dim..(q + 1) * dim]);
            }
            std::borrow::Cow::Owned(buf)
        };
        for &bk in &kinds {
            let bi = bk as usize;
            let bank = &base.banks[bi];
            let n_excluded = members
                .iter()
                .map(|&i| items[i].0.delta.map_or(0, |d| d.retired_by_bank[bi]))
                .max()
                .unwrap_or(0);
            let excluded = |q: usize, row: usize| match items[members[q]].0.delta {
                Some(d) => !d.retired.is_empty() && d.retired.contains(&bank.rows[row].id),
                None => false,
            };
            let lists = bank.search_many(&qbuf, members.len(), k, n_excluded, &excluded, !exact);
            for (q, list) in lists.into_iter().enumerate() {
                per_item[members[q]].push(list.into_iter().map(|(s, id)| (s, id, bk)).collect());
            }
        }
    }
    // Deltas: brute force per query (they hold one rollout's additions).
    let delta_lists: Vec<Vec<Vec<(f32, u64, BankKind)>>> = crate::par::map_indices(n, |i| {
        let (layers, q) = items[i];
        let Some(d) = layers.delta else {
            return Vec::new();
        };
        let qv = &queries[q * dim..(q + 1) * dim];
        kinds
            .iter()
            .map(|&bk| {
                let b = &d.banks[bk as usize];
                if b.n_live == 0 {
                    return Vec::new();
                }
                let id_of = |row: usize| b.rows[row].id;
                let rows = (0..b.len()).filter(|&r| b.live[r]);
                retrieval::rescore(&b.vectors, dim, &id_of, qv, rows, k)
                    .into_iter()
                    .map(|(s, id)| (s, id, bk))
                    .collect()
            })
            .collect()
    });
    for (i, (mut lists, extra)) in per_item.into_iter().zip(delta_lists).enumerate() {
        lists.extend(extra);
        let mut all: Vec<(f32, u64, BankKind)> = lists.into_iter().flatten().collect();
        all.sort_by(|a, b| {
            if retrieval::ranks_before((a.0, a.1), (b.0, b.1)) {
                std::cmp::Ordering::Less
            } else if retrieval::ranks_before((b.0, b.1), (a.0, a.1)) {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        });
        all.truncate(k);
        results[i] = all
            .into_iter()
            .map(|(score, id, kind)| Hit { id, score, kind })
            .collect();
    }
    results
}

// ---------------------------------------------------------------------------------------------
// Mutation: shared by MemoryState and StateView
// ---------------------------------------------------------------------------------------------

/// What commit needs to change a store.
pub(crate) trait Target {
    fn layers(&self) -> Layers<'_>;
    fn owner(&self) -> u64;
    fn version(&self) -> u64;
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
pub(crate) fn make_plan(
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

/// Check and normalise `rows x dim` vectors (copy); errors name the row.
pub fn prepare_vectors(vectors: &[f32], rows: usize, dim: usize, what: &str) -> Result<Vec<f32>> {
    if vectors.len() != rows * dim {
        return Err(StateError::InvalidArgument(format!(
            "{what}: expected {rows} vectors of dimension {dim} ({} floats), got {} floats",
            rows * dim,
            vectors.len()
        )));
    }
    let mut v = vectors.to_vec();
    for (r, chunk) in v.chunks_exact_mut(dim.max(1)).enumerate() {
        retrieval::normalize(chunk).map_err(|p| {
            StateError::InvalidArgument(format!("{what}: vector {r} {}", p.describe()))
        })?;
    }
    Ok(v)
}

/// The checks of [`prepare_vectors`] (same errors), without copying or normalising: for callers
/// that validate a whole batch up front and normalise each part later.
pub fn check_vectors(vectors: &[f32], rows: usize, dim: usize, what: &str) -> Result<()> {
    if vectors.len() != rows * dim {
        return Err(StateError::InvalidArgument(format!(
            "{what}: expected {rows} vectors of dimension {dim} ({} floats), got {} floats",
            rows * dim,
            vectors.len()
        )));
    }
    for (r, chunk) in vectors.chunks_exact(dim.max(1)).enumerate() {
        retrieval::check_normalizable(chunk).map_err(|p| {
            StateError::InvalidArgument(format!("{what}: vector {r} {}", p.describe()))
        })?;
    }
    Ok(())
}

/// Phase two (see the module docs).
pub(crate) fn apply_plan<T: Target>(
    target: &mut T,
    plan: &Plan,
    vectors: &[f32],
) -> Result<CommitReport> {
    if plan.owner != target.owner() || plan.version != target.version() {
        return Err(StateError::StalePlan);
    }
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
pub(crate) fn add_direct<T: Target>(
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

// ---------------------------------------------------------------------------------------------
// MemoryState
// ---------------------------------------------------------------------------------------------

/// A mutable memory. Its body is behind an `Arc` so that views share it; changing a state that
/// has views first copies the body (copy on write), so views never see later changes.
#[derive(Debug)]
pub struct MemoryState {
    pub(crate) snap: Arc<Snapshot>,
    owner: u64,
    version: u64,
}

impl Clone for MemoryState {
    /// A deep, independent copy (new identity: plans of the original do not apply to it).
    fn clone(&self) -> Self {
        MemoryState {
            snap: Arc::new((*self.snap).clone()),
            owner: new_owner(),
            version: 0,
        }
    }
}

impl MemoryState {
    pub fn new(config: StateConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self::from_snapshot(Snapshot::new(config)))
    }

    pub fn from_snapshot(snap: Snapshot) -> Self {
        MemoryState {
            snap: Arc::new(snap),
            owner: new_owner(),
            version: 0,
        }
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.snap
    }

    pub fn shared_snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.snap)
    }

    pub fn layers(&self) -> Layers<'_> {
        Layers {
            base: &self.snap,
            delta: None,
        }
    }

    pub fn config(&self) -> &StateConfig {
        &self.snap.config
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn core(&self) -> &str {
        &self.snap.core
    }

    pub fn plan(&self, actions: &[Action], provenance: Provenance) -> Result<Plan> {
        make_plan(
            self.layers(),
            self.owner,
            self.version,
            actions.to_vec(),
            provenance,
        )
    }

    pub fn commit(&mut self, plan: &Plan, vectors: &[f32]) -> Result<CommitReport> {
        apply_plan(self, plan, vectors)
    }

    /// Whether `plan` may be committed here now.
    pub fn check_plan(&self, plan: &Plan) -> Result<()> {
        if plan.owner == self.owner && plan.version == self.version {
            Ok(())
        } else {
            Err(StateError::StalePlan)
        }
    }

    pub fn add_entries(
        &mut self,
        kind: BankKind,
        texts: &[String],
        vectors: &[f32],
        provenances: &[Provenance],
    ) -> Result<Vec<u64>> {
        add_direct(self, kind, texts, vectors, provenances)
    }

    pub fn set_core(&mut self, text: String) {
        self.set_core_text(text);
        self.version += 1;
    }

    /// Top-k for `nq` queries (row-major, normalised here). Errors on shape or bad vectors.
    pub fn search(
        &self,
        queries: &[f32],
        k: usize,
        kind: Option<BankKind>,
    ) -> Result<Vec<Vec<Hit>>> {
        let dim = self.config().dim;
        let nq = queries.len().checked_div(dim).unwrap_or(0);
        let q = prepare_vectors(queries, nq, dim, "search")?;
        Ok(self.layers().search(&q, nq, k, kind, false))
    }

    /// A view of the state as it is now (O(1): shares the body).
    pub fn view(&self) -> crate::overlay::StateView {
        crate::overlay::StateView::new(Arc::clone(&self.snap))
    }
}

impl Target for MemoryState {
    fn layers(&self) -> Layers<'_> {
        Layers {
            base: &self.snap,
            delta: None,
        }
    }
    fn owner(&self) -> u64 {
        self.owner
    }
    fn version(&self) -> u64 {
        self.version
    }
    fn bump_version(&mut self) {
        self.version += 1;
    }
    fn push_entry(
        &mut self,
        kind: BankKind,
        text: String,
        norm: String,
        provenance: Arc<Provenance>,
        vector: &[f32],
    ) -> u64 {
        let snap = Arc::make_mut(&mut self.snap);
        let id = snap.next_id;
        snap.next_id += 1;
        snap.banks[kind as usize].push_normalized(id, text, norm, provenance, vector, true);
        id
    }
    fn retire(&mut self, id: u64) -> bool {
        let Some((bi, row)) = self
            .snap
            .banks
            .iter()
            .enumerate()
            .find_map(|(bi, b)| b.row_of(id).map(|r| (bi, r)))
        else {
            return false;
        };
        if !self.snap.banks[bi].live[row] {
            return false;
        }
        Arc::make_mut(&mut self.snap).banks[bi].retire_row(row)
    }
    fn set_core_text(&mut self, text: String) {
        if self.snap.core != text {
            Arc::make_mut(&mut self.snap).core = text;
        }
    }
    fn finish(&mut self) -> Result<()> {
        // Only touch (and so possibly copy) the body when a bank's graph is out of step.
        let limit = self.snap.config.exact_search_limit;
        let stale = self.snap.banks.iter().any(|b| b.graph_needs_work(limit));
        if stale {
            Arc::make_mut(&mut self.snap).maintain_graphs()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Random action sequences on a state (and on a view) against a brute-force model.
    use super::*;
    use crate::retrieval::dot;
    use proptest::prelude::*;

    const DIM: usize = 8;

    /// A deterministic embedding: texts about one topic (first word) are close.
    fn embed(text: &str) -> Vec<f32> {
        let norm = normalize_text(text);
        let topic = norm.split(' ').next().unwrap_or("").to_string();
        let h = |s: &str, salt: u64| {
            let mut x = salt ^ 0x9E37_79B9_7F4A_7C15;
            for b in s.bytes() {
                x = (x ^ b as u64).wrapping_mul(0x100_0000_01B3);
            }
            x
        };
        let mut v = Vec::with_capacity(DIM);
        let (mut a, mut b) = (h(&topic, 1), h(&norm, 2));
        for _ in 0..DIM {
            a = a
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            b = b
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let ta = ((a >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
            let tb = ((b >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
            v.push(ta + 0.3 * tb);
        }
        retrieval::normalize(&mut v).unwrap();
        v
    }

    #[derive(Clone, Debug)]
    struct ModelEntry {
        id: u64,
        kind: BankKind,
        text: String,
        vec: Vec<f32>,
        retired: bool,
    }

    #[derive(Clone, Debug, Default)]
    struct Model {
        core: String,
        entries: Vec<ModelEntry>,
        next: u64,
    }

    impl Model {
        fn exact(&self, kind: BankKind, norm: &str) -> Option<usize> {
            self.entries
                .iter()
                .position(|e| !e.retired && e.kind == kind && normalize_text(&e.text) == norm)
        }
        fn nearest(&self, kind: BankKind, v: &[f32]) -> Option<(usize, f32)> {
            let mut best: Option<(usize, f32)> = None;
            for (i, e) in self.entries.iter().enumerate() {
                if e.retired || e.kind != kind {
                    continue;
                }
                let s = dot(v, &e.vec);
                if best.is_none_or(|(_, b)| s > b) {
                    best = Some((i, s));
                }
            }
            best
        }
        /// Applies the documented semantics; `embedded(i, j)` says whether plan embedded old j
        /// of action i.
        fn apply(
            &mut self,
            actions: &[Action],
            mode: UpdateMode,
            thr: f32,
        ) -> (Vec<u64>, Vec<u64>) {
            // Decide embeddings the way the plan does (before any change).
            let mut pending: Vec<(BankKind, String)> = Vec::new();
            let mut embedded = HashSet::new();
            for (i, a) in actions.iter().enumerate() {
                let Some(kind) = a.agent.bank() else { continue };
                if !matches!(a.op, Op::Add | Op::Update | Op::Merge) {
                    continue;
                }
                if mode == UpdateMode::Replace && a.op != Op::Add {
                    for (j, o) in a.old.iter().enumerate() {
                        let n = normalize_text(o);
                        if self.exact(kind, &n).is_none() && !pending.contains(&(kind, n)) {
                            embedded.insert((i, j));
                        }
                    }
                }
                pending.push((kind, normalize_text(a.text.as_deref().unwrap())));
            }
            let (mut added, mut retired) = (Vec::new(), Vec::new());
            for (i, a) in actions.iter().enumerate() {
                match (a.agent.bank(), a.op) {
                    (_, Op::Skip) => {}
                    (None, Op::Append) => {
                        let t = a.text.clone().unwrap();
                        self.core = if self.core.is_empty() {
                            t
                        } else {
                            format!("{}\n{}", self.core, t)
                        };
                    }
                    (None, Op::Rewrite) => self.core = a.text.clone().unwrap(),
                    (None, Op::Replace) => {
                        let o = &a.old[0];
                        if !o.is_empty() && self.core.contains(o.as_str()) {
                            self.core =
                                self.core
                                    .replacen(o.as_str(), a.text.as_deref().unwrap(), 1);
                        }
                    }
                    (None, _) => unreachable!("generated core ops only"),
                    (Some(kind), _) => {
                        if mode == UpdateMode::Replace && a.op != Op::Add {
                            for (j, o) in a.old.iter().enumerate() {
                                if let Some(p) = self.exact(kind, &normalize_text(o)) {
                                    self.entries[p].retired = true;
                                    retired.push(self.entries[p].id);
                                } else if embedded.contains(&(i, j)) {
                                    if let Some((p, s)) = self.nearest(kind, &embed(o)) {
                                        if s >= thr {
                                            self.entries[p].retired = true;
                                            retired.push(self.entries[p].id);
                                        }
                                    }
                                }
                            }
                        }
                        let t = a.text.clone().unwrap();
                        if self.exact(kind, &normalize_text(&t)).is_none() {
                            let vec = embed(&t);
                            self.entries.push(ModelEntry {
                                id: self.next,
                                kind,
                                text: t,
                                vec,
                                retired: false,
                            });
                            added.push(self.next);
                            self.next += 1;
                        }
                    }
                }
            }
            (added, retired)
        }
    }

    fn action_strategy() -> impl Strategy<Value = Action> {
        let text = (0..3usize, 0..4usize, 0..3usize).prop_map(|(t, o, d)| {
            let base = format!(
                "{} likes {}",
                ["ana", "bo", "cy"][t],
                ["tea", "jazz", "chess", "rain"][o]
            );
            match d {
                0 => base,
                1 => format!("  {}!", base.to_uppercase()),
                _ => format!("{base} a lot"),
            }
        });
        let agent = prop_oneof![
            Just(Agent::Core),
            Just(Agent::Episodic),
            Just(Agent::Semantic),
            Just(Agent::Procedural)
        ];
        (
            agent,
            0..4usize,
            text.clone(),
            proptest::collection::vec(text, 1..3),
        )
            .prop_map(|(agent, op, t, olds)| {
                let (op, text, old) = match (agent, op) {
                    (Agent::Core, 0) => (Op::Append, Some(t), vec![]),
                    (Agent::Core, 1) => (Op::Replace, Some("x".into()), vec![t]),
                    (Agent::Core, 2) => (Op::Rewrite, Some(t), vec![]),
                    (Agent::Core, _) => (Op::Skip, None, vec![]),
                    (_, 0) => (Op::Add, Some(t), vec![]),
                    (_, 1) => (Op::Update, Some(t), olds[..1].to_vec()),
                    (_, 2) => (Op::Merge, Some(t), olds),
                    (_, _) => (Op::Skip, None, vec![]),
                };
                Action {
                    agent,
                    op,
                    text,
                    old,
                    reason: None,
                }
            })
    }

    fn run_sessions<T: Target>(
        t: &mut T,
        model: &mut Model,
        sessions: &[Vec<Action>],
        mode: UpdateMode,
    ) {
        for actions in sessions {
            let plan = make_plan(
                t.layers(),
                t.owner(),
                t.version(),
                actions.clone(),
                Provenance::default(),
            )
            .unwrap();
            let vecs: Vec<f32> = plan.texts.iter().flat_map(|s| embed(s)).collect();
            let rep = apply_plan(t, &plan, &vecs).unwrap();
            let (added, retired) = model.apply(actions, mode, 0.92);
            assert_eq!(rep.added, added);
            assert_eq!(rep.retired, retired);
            assert_eq!(t.layers().core(), model.core);
            let got: Vec<(u64, BankKind, String, bool)> = t
                .layers()
                .entries(None, true)
                .into_iter()
                .map(|e| (e.id, e.kind, e.text, e.retired))
                .collect();
            let want: Vec<(u64, BankKind, String, bool)> = model
                .entries
                .iter()
                .map(|e| (e.id, e.kind, e.text.clone(), e.retired))
                .collect();
            assert_eq!(got, want);
        }
    }

    fn config(mode: UpdateMode) -> StateConfig {
        let mut c = StateConfig::new(DIM);
        c.update_mode = mode;
        c
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn state_and_views_follow_the_model(
            replace in any::<bool>(),
            base in proptest::collection::vec(proptest::collection::vec(action_strategy(), 0..6), 1..4),
            more in proptest::collection::vec(proptest::collection::vec(action_strategy(), 0..6), 1..4),
        ) {
            let mode = if replace { UpdateMode::Replace } else { UpdateMode::History };
            let mut st = MemoryState::new(config(mode)).unwrap();
            let mut model = Model::default();
            run_sessions(&mut st, &mut model, &base, mode);
            // A view follows the model from the base's state, and never changes the base.
            let before = (st.core().to_string(), st.layers().entries(None, true));
            let mut view = st.view();
            let mut vmodel = model.clone();
            run_sessions(&mut view, &mut vmodel, &more, mode);
            prop_assert_eq!(&before, &(st.core().to_string(), st.layers().entries(None, true)));
            // The state changing afterwards does not change the view.
            let vbefore = (view.core().to_string(), view.layers().entries(None, true));
            run_sessions(&mut st, &mut model, &more, mode);
            prop_assert_eq!(&vbefore, &(view.core().to_string(), view.layers().entries(None, true)));
            // Materialised view == view.
            let m = view.materialize().unwrap();
            prop_assert_eq!(&vbefore, &(m.core().to_string(), m.layers().entries(None, true)));
        }
    }
}
