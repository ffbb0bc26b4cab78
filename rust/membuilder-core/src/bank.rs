//! One bank of memories (episodic, semantic or procedural): entries, their vectors stored
//! contiguously, an exact-text lookup, and an optional HNSW graph.
//!
//! Rows are append-only: an entry keeps its row for life and retiring only clears its `live`
//! flag. Ids are assigned in increasing order by the owning state, so within a bank row order is
//! id order (which makes "ties by ascending id" the same as "ties by ascending row").

use std::collections::HashMap;
use std::sync::Arc;

use crate::kinds::BankKind;
use crate::retrieval::{self, Graph};
use crate::state::Provenance;

/// One entry's data (its vector lives in [`Bank::vectors`] at the same row).
#[derive(Clone, Debug)]
pub struct Row {
    pub id: u64,
    pub text: String,
    pub provenance: Arc<Provenance>,
}

#[derive(Clone, Debug)]
pub struct Bank {
    pub kind: BankKind,
    pub dim: usize,
    pub rows: Vec<Row>,
    /// Row-major, `rows.len() * dim` floats, each row L2-normalised.
    pub vectors: Vec<f32>,
    pub live: Vec<bool>,
    pub n_live: usize,
    /// Normalised text -> rows with that text (ascending), live or not.
    pub by_text: HashMap<String, Vec<u32>>,
    /// HNSW over a prefix of the rows; shared (read-only) with clones and views.
    pub graph: Option<Arc<Graph>>,
}

impl Bank {
    pub fn new(kind: BankKind, dim: usize) -> Self {
        Bank {
            kind,
            dim,
            rows: Vec::new(),
            vectors: Vec::new(),
            live: Vec::new(),
            n_live: 0,
            by_text: HashMap::new(),
            graph: None,
        }
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Append an entry; `vector` must already be normalised and of length `dim`.
    pub fn push(
        &mut self,
        id: u64,
        text: String,
        provenance: Arc<Provenance>,
        vector: &[f32],
        live: bool,
    ) {
        debug_assert_eq!(vector.len(), self.dim);
        debug_assert!(
            self.rows.last().is_none_or(|r| r.id < id),
            "ids must increase"
        );
        let row = self.rows.len() as u32;
        self.by_text
            .entry(normalize_text(&text))
            .or_default()
            .push(row);
        self.rows.push(Row {
            id,
            text,
            provenance,
        });
        self.vectors.extend_from_slice(vector);
        self.live.push(live);
        if live {
            self.n_live += 1;
        }
    }

    pub fn row_of(&self, id: u64) -> Option<usize> {
        self.rows.binary_search_by_key(&id, |r| r.id).ok()
    }

    /// Clear an entry's live flag; returns whether it was live.
    pub fn retire_row(&mut self, row: usize) -> bool {
        if self.live[row] {
            self.live[row] = false;
            self.n_live -= 1;
            true
        } else {
            false
        }
    }

    pub fn vector(&self, row: usize) -> &[f32] {
        &self.vectors[row * self.dim..(row + 1) * self.dim]
    }

    /// Rows whose normalised text is `norm` (ascending, live or not).
    pub fn rows_with_text(&self, norm: &str) -> &[u32] {
        self.by_text.get(norm).map_or(&[], |v| v.as_slice())
    }

    /// Keep the graph in step with the bank: none while the bank has at most `limit` live
    /// entries; above it, build one, or extend ours (only when no view or clone shares it: a
    /// shared graph is immutable, and rows past its prefix are searched exactly until the
    /// uncovered tail grows past a quarter of the graph, when a private graph is rebuilt).
    pub fn maintain_graph(&mut self, limit: usize) -> Result<(), String> {
        if self.n_live <= limit {
            // Small (or small again after retirements): exact search is both exact and fast.
            self.graph = None;
            return Ok(());
        }
        let rows = self.rows.len();
        match &mut self.graph {
            None => {
                self.graph = Some(Arc::new(Graph::build(&self.vectors, self.dim, rows)?));
            }
            Some(g) => {
                if let Some(g) = Arc::get_mut(g) {
                    g.extend(&self.vectors, self.dim, rows)?;
                } else if rows - g.covered > g.covered / 4 {
                    self.graph = Some(Arc::new(Graph::build(&self.vectors, self.dim, rows)?));
                }
            }
        }
        Ok(())
    }

    /// Whether [`Bank::maintain_graph`] would change anything (so callers can avoid copying a
    /// shared body just to find out).
    pub fn graph_needs_work(&self, limit: usize) -> bool {
        match &self.graph {
            None => self.n_live > limit,
            Some(_) if self.n_live <= limit => true,
            Some(g) => {
                let tail = self.rows.len() - g.covered;
                tail > 0 && (Arc::strong_count(g) == 1 || tail > g.covered / 4)
            }
        }
    }

    /// Best live rows for `nq` normalised queries (row-major `queries`): per query `(score, id)`
    /// best first, at most `k`, skipping rows for which `excluded(q, row)` holds (a view's own
    /// retirements; may differ per query). Uses the graph when there is one and `use_graph`
    /// (over-fetching to make up for retired and excluded rows, and falling back to exact search
    /// when the graph returns too few), exact search otherwise; scores always come from
    /// [`retrieval::dot`]. `n_excluded` bounds the excluded live rows of any query (it sizes the
    /// over-fetch).
    pub fn search_many<E>(
        &self,
        queries: &[f32],
        nq: usize,
        k: usize,
        n_excluded: usize,
        excluded: &E,
        use_graph: bool,
    ) -> Vec<Vec<(f32, u64)>>
    where
        E: Fn(usize, usize) -> bool + Sync,
    {
        let dim = self.dim;
        if k == 0 || self.n_live == 0 {
            return vec![Vec::new(); nq];
        }
        let cap = k + retrieval::RESCORE_MARGIN;
        let accept = |q: usize, row: usize| self.live[row] && !excluded(q, row);
        let graph = self
            .graph
            .as_ref()
            .filter(|g| use_graph && g.covered > 0 && n_excluded < g.covered / 2);
        let exact_rows = match graph {
            Some(g) => g.covered..self.rows.len(),
            None => 0..self.rows.len(),
        };
        let exact =
            retrieval::exact_candidates(&self.vectors, dim, exact_rows, queries, nq, cap, &accept);
        let id_of = |row: usize| self.rows[row].id;
        let Some(g) = graph else {
            return exact
                .iter()
                .enumerate()
                .map(|(q, cands)| {
                    let rows = cands.iter().map(|&(_, r)| r as usize);
                    retrieval::rescore(
                        &self.vectors,
                        dim,
                        &id_of,
                        &queries[q * dim..(q + 1) * dim],
                        rows,
                        k,
                    )
                })
                .collect();
        };
        // Graph path, per query; retired rows of the bank are in the graph too, so over-fetch by
        // their number plus the caller's exclusions.
        let live_in_graph = self.live[..g.covered].iter().filter(|&&l| l).count();
        let retired_in_graph = g.covered - live_in_graph;
        let fetch = (cap + retired_in_graph + n_excluded).min(g.covered);
        crate::par::map_indices(nq, |q| {
            let qv = &queries[q * dim..(q + 1) * dim];
            let mut rows: Vec<usize> = match g.candidates(qv, fetch) {
                Some(c) => c
                    .into_iter()
                    .filter(|&r| r < g.covered && accept(q, r))
                    .collect(),
                None => Vec::new(),
            };
            let want = cap.min(live_in_graph.saturating_sub(n_excluded));
            if rows.len() < want.min(k) {
                // Too many of the graph's answers were filtered out (or usearch refused): search
                // the prefix exactly instead.
                rows = retrieval::exact_candidates(
                    &self.vectors,
                    dim,
                    0..g.covered,
                    qv,
                    1,
                    cap,
                    &|_, r| accept(q, r),
                )
                .pop()
                .unwrap_or_default()
                .into_iter()
                .map(|(_, r)| r as usize)
                .collect();
            }
            rows.extend(exact[q].iter().map(|&(_, r)| r as usize));
            retrieval::rescore(&self.vectors, dim, &id_of, qv, rows, k)
        })
    }
}

/// The exact-match form of a memory text: Unicode lower case, runs of whitespace collapsed to one
/// space, and leading/trailing punctuation, quotes and spaces removed. `"  The User's dog is
/// Rex. "` and `"the user's dog is rex"` match; inner punctuation is kept.
pub fn normalize_text(text: &str) -> String {
    let lowered = text.to_lowercase();
    let collapsed = lowered.split_whitespace().collect::<Vec<_>>().join(" ");
    collapsed
        .trim_matches(|c: char| c == ' ' || is_edge_punct(c))
        .to_string()
}

fn is_edge_punct(c: char) -> bool {
    c.is_ascii_punctuation() || matches!(c, '“' | '”' | '‘' | '’' | '«' | '»' | '…' | '„' | '‚')
}
