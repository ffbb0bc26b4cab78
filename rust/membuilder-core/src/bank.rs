//! One bank of memories (episodic, semantic or procedural): entries, their vectors stored
//! contiguously, an exact-text lookup, and an optional HNSW graph.
//!
//! Rows are append-only: an entry keeps its row for life and retiring only clears its `live`
//! flag. Ids are assigned in increasing order by the owning state, so within a bank row order is
//! id order (which makes "ties by ascending id" the same as "ties by ascending row").

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use crate::kinds::BankKind;
use crate::records::Provenance;
use crate::retrieval::{self, Graph, TileCache};

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
    pub by_text: HashMap<String, Vec<u32>, BuildHasherDefault<TextHasher>>,
    /// HNSW over a prefix of the rows; shared (read-only) with clones and views.
    pub graph: Option<Arc<Graph>>,
    /// Tile-major copy of the rows for large exact batches, made on demand; cleared on append.
    pub tiles: TileCache,
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
            by_text: HashMap::default(),
            graph: None,
            tiles: TileCache::default(),
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
        let norm = normalize_text(&text);
        self.push_normalized(id, text, norm, provenance, vector, live);
    }

    /// [`Bank::push`] for a caller that already has `normalize_text(&text)` (a plan computes it
    /// once; normalising again on commit was a measurable share of the apply path).
    pub fn push_normalized(
        &mut self,
        id: u64,
        text: String,
        norm: String,
        provenance: Arc<Provenance>,
        vector: &[f32],
        live: bool,
    ) {
        debug_assert_eq!(vector.len(), self.dim);
        debug_assert_eq!(norm, normalize_text(&text));
        debug_assert!(
            self.rows.last().is_none_or(|r| r.id < id),
            "ids must increase"
        );
        let row = self.rows.len() as u32;
        self.by_text.entry(norm).or_default().push(row);
        self.rows.push(Row {
            id,
            text,
            provenance,
        });
        self.vectors.extend_from_slice(vector);
        self.tiles.clear();
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
        let exact = retrieval::exact_candidates(
            &self.vectors,
            Some(&self.tiles),
            dim,
            exact_rows,
            queries,
            nq,
            k,
            &accept,
        );
        let id_of = |row: usize| self.rows[row].id;
        let Some(g) = graph else {
            return crate::par::map_indices(nq, |q| {
                let rows = exact[q].iter().map(|&(_, r)| r as usize);
                let qv = &queries[q * dim..(q + 1) * dim];
                retrieval::rescore(&self.vectors, dim, &id_of, qv, rows, k)
            });
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
                    None,
                    dim,
                    0..g.covered,
                    qv,
                    1,
                    k,
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

/// A fast, non-keyed hash for the exact-text index (every planned and committed text is looked
/// up; SipHash was a visible share of the apply path). Texts come from our own models and the
/// index is private to one bank, so flooding resistance buys nothing here.
#[derive(Clone, Copy, Debug, Default)]
pub struct TextHasher(u64);

impl TextHasher {
    const K: u64 = 0x51_7c_c1_b7_27_22_0a_95;

    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(Self::K);
    }
}

impl Hasher for TextHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut last = [0u8; 8];
            last[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(last));
        }
    }

    #[inline]
    fn write_u8(&mut self, b: u8) {
        self.add(b as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        // The multiply leaves its entropy in the high bits; fold them into the low bits, which
        // pick the bucket.
        self.0 ^ (self.0 >> 29)
    }
}

/// The exact-match form of a memory text: Unicode lower case, runs of whitespace collapsed to one
/// space, and leading/trailing punctuation, quotes and spaces removed. `"  The User's dog is
/// Rex. "` and `"the user's dog is rex"` match; inner punctuation is kept.
///
/// One pass and one allocation (it runs for every text a plan or commit touches). The result is
/// exactly `text.to_lowercase()`, split on Unicode whitespace, joined with single spaces, then
/// trimmed of spaces and edge punctuation (see [`normalize_text_reference`], which the tests
/// compare against).
pub fn normalize_text(text: &str) -> String {
    // `str::to_lowercase` maps a capital sigma by its position in a word (final form), which a
    // per-character lower-casing cannot see; such (rare) texts take the reference path.
    if text.contains('\u{3A3}') {
        return normalize_text_reference(text);
    }
    let bytes = text.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(text.len());
    // A whitespace run seen after some output, not yet written (runs collapse to one space, and
    // trailing ones are dropped).
    let mut space = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b.is_ascii() {
            // ASCII white space in Unicode's sense (`char::is_whitespace`): \t \n \v \f \r and space.
            if is_ascii_space(b) {
                space = !out.is_empty();
                i += 1;
            } else {
                // A run of other ASCII bytes (most of a word): copy it whole, then lower-case it.
                let run = bytes[i..]
                    .iter()
                    .position(|&c| !c.is_ascii() || is_ascii_space(c))
                    .map_or(bytes.len(), |o| i + o);
                if space {
                    out.push(b' ');
                    space = false;
                }
                let from = out.len();
                out.extend_from_slice(&bytes[i..run]);
                out[from..].make_ascii_lowercase();
                i = run;
            }
            continue;
        }
        let c = text[i..].chars().next().expect("char boundary");
        i += c.len_utf8();
        for l in c.to_lowercase() {
            if l.is_whitespace() {
                space = !out.is_empty();
            } else {
                if space {
                    out.push(b' ');
                    space = false;
                }
                let mut buf = [0u8; 4];
                out.extend_from_slice(l.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    let mut out = String::from_utf8(out).expect("built from whole characters");
    let edge = |c: char| c == ' ' || is_edge_punct(c);
    let trimmed = out.trim_matches(edge);
    if trimmed.len() == out.len() {
        return out;
    }
    let start = trimmed.as_ptr() as usize - out.as_ptr() as usize;
    let end = start + trimmed.len();
    out.truncate(end);
    out.drain(..start);
    out
}

#[inline]
fn is_ascii_space(b: u8) -> bool {
    matches!(b, b'\t'..=b'\r' | b' ')
}

/// The definition of [`normalize_text`], step by step (slower: three allocations).
pub fn normalize_text_reference(text: &str) -> String {
    let lowered = text.to_lowercase();
    let collapsed = lowered.split_whitespace().collect::<Vec<_>>().join(" ");
    collapsed
        .trim_matches(|c: char| c == ' ' || is_edge_punct(c))
        .to_string()
}

fn is_edge_punct(c: char) -> bool {
    c.is_ascii_punctuation() || matches!(c, '“' | '”' | '‘' | '’' | '«' | '»' | '…' | '„' | '‚')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn normalize_matches_reference_on_edge_cases() {
        for t in [
            "",
            "   ",
            "  The User's dog is Rex. ",
            "\u{3A3}\u{391}\u{3A3} \u{39F}\u{394}\u{39F}\u{3A3}",
            "...\"«Hello»\"...",
            "a\u{3000}b\u{85}c\u{a0}d\te\nf",
            "\u{b}A\u{c}B\u{1c}C\u{1f} D\r\n",
            "İstanbul ǅ ẞ",
            "…„‚",
            "caf\u{e9} na\u{ef}ve \u{6771}\u{4eac} \u{1f600}!",
        ] {
            assert_eq!(normalize_text(t), normalize_text_reference(t), "{t:?}");
        }
    }

    proptest! {
        #[test]
        fn normalize_matches_reference(t in "(\\PC|\\s|[.,!?\"'“”‘’«»…„‚ΣσςİI])*") {
            prop_assert_eq!(normalize_text(&t), normalize_text_reference(&t));
        }

        #[test]
        fn normalize_matches_reference_any_string(t in any::<String>()) {
            prop_assert_eq!(normalize_text(&t), normalize_text_reference(&t));
        }
    }
}
