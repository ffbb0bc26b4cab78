//! Cross-layer search: top-k over a base snapshot (one shared exact or graph scan per base),
//! with each view's retirements filtered out and its delta searched by brute force, merged into
//! one ranking (score descending, id ascending).

use crate::kinds::BankKind;
use crate::layers::Layers;
use crate::records::Hit;
use crate::retrieval;
use crate::snapshot::Snapshot;
use crate::topk::ranks_before;

impl<'a> Layers<'a> {
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
            if ranks_before((a.0, a.1), (b.0, b.1)) {
                std::cmp::Ordering::Less
            } else if ranks_before((b.0, b.1), (a.0, a.1)) {
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
