//! Top-k search kernels: exact (GEMM + per-query selection) and graph (usearch HNSW).
//!
//! Scores are inner products of L2-normalised vectors, i.e. cosine similarities. The order of hits
//! is always: score descending, then id ascending. To make that order independent of the path a
//! search took (single query, batch, exact, graph, base or overlay), every candidate is re-scored
//! with one canonical kernel, [`dot`], before the final selection: the GEMM and usearch scores are
//! only used to choose candidates (with a margin of extra candidates), never reported.
//!
//! The state-level searches (banks, views, batches) are in [`crate::state`] and
//! [`crate::overlay`]; this module holds what they share.

use std::ops::Range;

/// Extra candidates kept by the approximate (GEMM / graph) phase before exact re-scoring, so that
/// rounding differences between kernels cannot change which entries make the top k.
pub const RESCORE_MARGIN: usize = 16;

/// Rows per GEMM block: the score block of `QUERY_BLOCK x ROW_BLOCK` floats stays in L2.
const ROW_BLOCK: usize = 2048;
/// Queries per GEMM block.
const QUERY_BLOCK: usize = 128;

/// The canonical inner product. Sixteen independent accumulators let the compiler vectorise the
/// loop while keeping the summation order fixed (so a score never depends on the caller).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 16];
    let ca = a.chunks_exact(16);
    let cb = b.chunks_exact(16);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    // Pairwise reduction, fixed order.
    let mut w = 8;
    while w > 0 {
        for l in 0..w {
            acc[l] += acc[l + w];
        }
        w /= 2;
    }
    acc[0] + tail
}

/// Why a vector was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VectorProblem {
    NonFinite,
    Zero,
}

impl VectorProblem {
    pub fn describe(self) -> &'static str {
        match self {
            VectorProblem::NonFinite => "contains NaN or infinity",
            VectorProblem::Zero => "has zero length and cannot be normalised",
        }
    }
}

/// L2-normalise `v` in place. Refuses non-finite values and the zero vector (its direction, and
/// so every cosine with it, is undefined).
pub fn normalize(v: &mut [f32]) -> Result<(), VectorProblem> {
    let inv = (1.0 / checked_norm_sq(v)?.sqrt()) as f32;
    for x in v.iter_mut() {
        *x *= inv;
    }
    Ok(())
}

/// Whether [`normalize`] would accept `v`, without changing it (same checks, same answer).
pub fn check_normalizable(v: &[f32]) -> Result<(), VectorProblem> {
    checked_norm_sq(v).map(|_| ())
}

/// The squared L2 norm of `v` (in f64, so long vectors of small values do not underflow), after
/// the checks both [`normalize`] and [`check_normalizable`] make.
fn checked_norm_sq(v: &[f32]) -> Result<f64, VectorProblem> {
    let mut ss = 0f64;
    for &x in v.iter() {
        if !x.is_finite() {
            return Err(VectorProblem::NonFinite);
        }
        ss += (x as f64) * (x as f64);
    }
    if ss <= 0.0 || !ss.is_finite() {
        return Err(VectorProblem::Zero);
    }
    Ok(ss)
}

/// `a` ranks before `b`: higher score, or equal score and smaller key.
#[inline]
pub fn ranks_before(a: (f32, u64), b: (f32, u64)) -> bool {
    a.0 > b.0 || (a.0 == b.0 && a.1 < b.1)
}

/// Bounded best-first list of `(score, key)`.
#[derive(Clone, Debug)]
pub struct TopK {
    cap: usize,
    items: Vec<(f32, u64)>,
}

impl TopK {
    pub fn new(cap: usize) -> Self {
        TopK {
            cap,
            items: Vec::with_capacity(cap.min(1024)),
        }
    }

    /// Whether `(score, key)` would enter the list (cheap pre-check before other tests).
    #[inline]
    pub fn admits(&self, score: f32, key: u64) -> bool {
        self.items.len() < self.cap || ranks_before((score, key), *self.items.last().unwrap())
    }

    #[inline]
    pub fn push(&mut self, score: f32, key: u64) {
        if self.cap == 0 || !self.admits(score, key) {
            return;
        }
        let pos = self
            .items
            .partition_point(|&x| ranks_before(x, (score, key)));
        self.items.insert(pos, (score, key));
        if self.items.len() > self.cap {
            self.items.pop();
        }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn into_vec(self) -> Vec<(f32, u64)> {
        self.items
    }
}

/// Merge best-first lists into the best `k`.
pub fn merge_topk(lists: impl IntoIterator<Item = Vec<(f32, u64)>>, k: usize) -> Vec<(f32, u64)> {
    let mut all: Vec<(f32, u64)> = lists.into_iter().flatten().collect();
    all.sort_by(|a, b| {
        if ranks_before(*a, *b) {
            std::cmp::Ordering::Less
        } else if ranks_before(*b, *a) {
            std::cmp::Ordering::Greater
        } else {
            std::cmp::Ordering::Equal
        }
    });
    all.truncate(k);
    all
}

/// Exact candidate selection over rows `rows` of a row-major matrix (`dim` columns) for `nq`
/// queries (row-major, normalised), keeping per query the best `cap` rows (by GEMM score, ties by
/// row) for which `accept(query, row)` holds. Returns per query `(approximate score, row)`,
/// best first; callers re-score with [`dot`].
///
/// The work is split into (query block x row range) tasks run on rayon when [`crate::par`]
/// allows, so one query over a large bank and many queries over a small one both use all cores.
pub fn exact_candidates<F>(
    matrix: &[f32],
    dim: usize,
    rows: Range<usize>,
    queries: &[f32],
    nq: usize,
    cap: usize,
    accept: &F,
) -> Vec<Vec<(f32, u64)>>
where
    F: Fn(usize, usize) -> bool + Sync,
{
    let n_rows = rows.end.saturating_sub(rows.start);
    if nq == 0 || cap == 0 || n_rows == 0 || dim == 0 {
        return vec![Vec::new(); nq];
    }
    debug_assert!(matrix.len() >= rows.end * dim);
    debug_assert_eq!(queries.len(), nq * dim);
    let q_blocks = nq.div_ceil(QUERY_BLOCK);
    let threads = crate::par::threads();
    // Split rows so that there are about two tasks per thread, but never below one row block.
    let max_splits = n_rows.div_ceil(ROW_BLOCK);
    let splits = (2 * threads).div_ceil(q_blocks).clamp(1, max_splits.max(1));
    let split_len = n_rows.div_ceil(splits);
    let tasks = q_blocks * splits;
    let partial: Vec<Vec<TopK>> = crate::par::map_indices(tasks, |t| {
        let (qb, sp) = (t / splits, t % splits);
        let q0 = qb * QUERY_BLOCK;
        let q1 = (q0 + QUERY_BLOCK).min(nq);
        let r0 = rows.start + sp * split_len;
        let r1 = (r0 + split_len).min(rows.end);
        let mut tops: Vec<TopK> = (q0..q1).map(|_| TopK::new(cap)).collect();
        if r0 >= r1 {
            return tops;
        }
        let m = q1 - q0;
        let mut scores = vec![0f32; m * ROW_BLOCK.min(r1 - r0)];
        let mut c0 = r0;
        while c0 < r1 {
            let c1 = (c0 + ROW_BLOCK).min(r1);
            let n = c1 - c0;
            // SAFETY: the pointers and strides describe in-bounds row-major matrices:
            // A = queries[q0..q1] (m x dim), B = matrix rows c0..c1 read transposed (dim x n),
            // C = scores (m x n), all sizes checked above.
            unsafe {
                matrixmultiply::sgemm(
                    m,
                    dim,
                    n,
                    1.0,
                    queries.as_ptr().add(q0 * dim),
                    dim as isize,
                    1,
                    matrix.as_ptr().add(c0 * dim),
                    1,
                    dim as isize,
                    0.0,
                    scores.as_mut_ptr(),
                    n as isize,
                    1,
                );
            }
            for (qi, top) in tops.iter_mut().enumerate() {
                let row_scores = &scores[qi * n..(qi + 1) * n];
                let q = q0 + qi;
                for (j, &s) in row_scores.iter().enumerate() {
                    let row = c0 + j;
                    if top.admits(s, row as u64) && accept(q, row) {
                        top.push(s, row as u64);
                    }
                }
            }
            c0 = c1;
        }
        tops
    });
    // Gather: per query, merge its `splits` partial lists.
    let mut out: Vec<Vec<Vec<(f32, u64)>>> = (0..nq).map(|_| Vec::with_capacity(splits)).collect();
    for (t, tops) in partial.into_iter().enumerate() {
        let q0 = (t / splits) * QUERY_BLOCK;
        for (qi, top) in tops.into_iter().enumerate() {
            out[q0 + qi].push(top.into_vec());
        }
    }
    out.into_iter()
        .map(|lists| merge_topk(lists, cap))
        .collect()
}

/// Re-score candidate rows with [`dot`] and map rows to `(score, id)` best-first, keeping `k`.
pub fn rescore(
    matrix: &[f32],
    dim: usize,
    id_of: &impl Fn(usize) -> u64,
    query: &[f32],
    rows: impl IntoIterator<Item = usize>,
    k: usize,
) -> Vec<(f32, u64)> {
    let mut top = TopK::new(k);
    for row in rows {
        let s = dot(query, &matrix[row * dim..(row + 1) * dim]);
        top.push(s, id_of(row));
    }
    top.into_vec()
}

// ---------------------------------------------------------------------------------------------
// Graph index (usearch HNSW, inner product)
// ---------------------------------------------------------------------------------------------

/// Thread contexts reserved in every graph: usearch refuses a search when all are taken, and we
/// then fall back to exact search, so this bounds only how many graph searches run at once.
const GRAPH_THREADS: usize = 64;

/// An HNSW graph over the first `covered` rows of one bank; keys are row numbers (rows are never
/// removed, retired rows are filtered after the search).
pub struct Graph {
    index: usearch::Index,
    pub covered: usize,
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Graph {{ covered: {} }}", self.covered)
    }
}

fn graph_options(dim: usize) -> usearch::IndexOptions {
    usearch::IndexOptions {
        dimensions: dim,
        metric: usearch::MetricKind::IP,
        quantization: usearch::ScalarKind::F32,
        connectivity: 16,
        expansion_add: 128,
        expansion_search: 64,
        multi: false,
    }
}

impl Graph {
    /// Build a graph over rows `0..rows` (added in parallel when allowed).
    pub fn build(matrix: &[f32], dim: usize, rows: usize) -> Result<Graph, String> {
        let index = usearch::Index::new(&graph_options(dim)).map_err(|e| e.to_string())?;
        let mut g = Graph { index, covered: 0 };
        g.extend(matrix, dim, rows)?;
        Ok(g)
    }

    /// Add rows `covered..rows`. usearch needs capacity reserved before adding; reserve with
    /// headroom so that growing a bank one session at a time does not reallocate every time.
    pub fn extend(&mut self, matrix: &[f32], dim: usize, rows: usize) -> Result<(), String> {
        if rows <= self.covered {
            return Ok(());
        }
        if self.index.capacity() < rows {
            let want = rows.max(self.index.capacity() * 3 / 2);
            self.index
                .reserve_capacity_and_threads(want, GRAPH_THREADS)
                .map_err(|e| e.to_string())?;
        }
        let from = self.covered;
        let errors: Vec<String> = crate::par::map_indices(rows - from, |i| {
            let row = from + i;
            match self
                .index
                .add(row as u64, &matrix[row * dim..(row + 1) * dim])
            {
                Ok(()) => None,
                Err(e) => Some(e.to_string()),
            }
        })
        .into_iter()
        .flatten()
        .collect();
        if let Some(e) = errors.into_iter().next() {
            return Err(e);
        }
        self.covered = rows;
        Ok(())
    }

    /// Up to `count` candidate rows (approximate), or `None` if usearch refused (then search
    /// exactly instead).
    pub fn candidates(&self, query: &[f32], count: usize) -> Option<Vec<usize>> {
        let m = self.index.search(query, count).ok()?;
        Some(m.keys.into_iter().map(|k| k as usize).collect())
    }

    pub fn serialized(&self) -> Result<Vec<u8>, String> {
        let mut buf = vec![0u8; self.index.serialized_length()];
        self.index
            .save_to_buffer(&mut buf)
            .map_err(|e| e.to_string())?;
        Ok(buf)
    }

    pub fn restore(buf: &[u8], covered: usize) -> Result<Graph, String> {
        let index = usearch::Index::restore_from_buffer(buf).map_err(|e| e.to_string())?;
        if index.size() != covered {
            return Err(format!(
                "graph holds {} vectors, expected {covered}",
                index.size()
            ));
        }
        index
            .reserve_capacity_and_threads(covered.max(1), GRAPH_THREADS)
            .map_err(|e| e.to_string())?;
        index.change_expansion_search(64);
        index.change_expansion_add(128);
        Ok(Graph { index, covered })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn dot_matches_naive() {
        for n in [0usize, 1, 5, 16, 17, 33, 384] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            assert!((dot(&a, &b) - naive(&a, &b)).abs() < 1e-4);
        }
    }

    #[test]
    fn normalize_refuses_zero_and_nan() {
        assert_eq!(normalize(&mut [0.0, 0.0]), Err(VectorProblem::Zero));
        assert_eq!(
            normalize(&mut [f32::NAN, 1.0]),
            Err(VectorProblem::NonFinite)
        );
        let mut v = [3.0, 4.0];
        normalize(&mut v).unwrap();
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
    }

    #[test]
    fn topk_orders_by_score_then_key() {
        let mut t = TopK::new(3);
        for (s, k) in [(0.5, 9), (0.9, 4), (0.5, 2), (0.5, 1), (0.1, 0)] {
            t.push(s, k);
        }
        assert_eq!(t.into_vec(), vec![(0.9, 4), (0.5, 1), (0.5, 2)]);
    }

    #[test]
    fn exact_candidates_match_brute_force() {
        let dim = 24;
        let rows = 5000;
        let mut seed = 7u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        let matrix: Vec<f32> = (0..rows * dim).map(|_| rnd()).collect();
        let nq = 130;
        let queries: Vec<f32> = (0..nq * dim).map(|_| rnd()).collect();
        let got = exact_candidates(&matrix, dim, 10..rows, &queries, nq, 5, &|_, r| r % 3 != 0);
        for q in 0..nq {
            let qv = &queries[q * dim..(q + 1) * dim];
            let mut all: Vec<(f32, u64)> = (10..rows)
                .filter(|r| r % 3 != 0)
                .map(|r| (dot(qv, &matrix[r * dim..(r + 1) * dim]), r as u64))
                .collect();
            all = merge_topk(vec![all], 5);
            let got_rows: Vec<u64> = got[q].iter().map(|x| x.1).collect();
            let want_rows: Vec<u64> = all.iter().map(|x| x.1).collect();
            assert_eq!(got_rows, want_rows);
        }
    }
}
