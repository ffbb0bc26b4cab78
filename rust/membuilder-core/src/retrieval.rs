//! Top-k search kernels: exact (GEMM + per-query selection) and graph (usearch HNSW).
//!
//! Scores are inner products of L2-normalised vectors, i.e. cosine similarities. The order of hits
//! is always: score descending, then id ascending. To make that order independent of the path a
//! search took (single query, batch, exact, graph, base or overlay), every candidate is re-scored
//! with one canonical kernel, [`dot`], before the final selection: the scan-kernel and usearch
//! scores are only used to choose candidates, never reported. Exact search keeps every row whose
//! kernel score is within a proven rounding bound of the k-th best ([`kernel_margin`] for the
//! float32 kernels, a per-query bound for AMX's bf16 products: [`crate::amx_scan`]), so its
//! candidates always contain the canonical top k, ties included.
//!
//! The state-level searches (banks, views, batches) are in [`crate::state`] and
//! [`crate::overlay`]; this module holds what they share.

use std::ops::Range;

use crate::topk::{NearTop, TopK};

/// Extra candidates fetched from the graph index before exact re-scoring (graph search is
/// approximate; the margin buys recall, not exactness).
pub const RESCORE_MARGIN: usize = 16;

/// How far below the k-th best kernel score a row's kernel score can be while its canonical
/// ([`dot`]) score still ties or beats the k-th best canonical score.
///
/// For unit vectors, any order of summing `dim` f32 products (with or without FMA) is within
/// `gamma(dim) = dim u / (1 - dim u)` of the exact inner product (u = 2^-24; Higham, Accuracy and
/// Stability of Numerical Algorithms, eq. 3.5, with sum |q_i x_i| <= |q| |x| = 1). Two kernels
/// then differ by at most `D = 2 gamma`, and a row of the canonical top k has a kernel score of at
/// least `t - 2D`, where `t` is the k-th best kernel score: the margin is `4 gamma`. One extra
/// term covers the normalisation's own rounding (|x| = 1 within a few u), and the result is
/// rounded up generously; it is still about 1e-4 at 1,536 dimensions, far below the gap between
/// neighbouring scores in any real bank, so it costs almost no extra candidates.
pub fn kernel_margin(dim: usize) -> f32 {
    let n = (dim + 2) as f64;
    let u = f64::from(f32::EPSILON) / 2.0;
    let gamma = n * u / (1.0 - n * u);
    (4.0 * gamma * 1.25) as f32
}

/// The kernels exact search can run on, best first. All return the same candidates after
/// re-scoring (see [`kernel_margin`]), so the choice changes only speed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExactKernel {
    /// bf16 tile products on AMX with a proven admission bound ([`crate::amx_scan`]), for batches
    /// over a whole bank large enough to keep its bf16 copy; other searches run the AVX-512
    /// scan.
    Amx,
    /// The fused scan on AVX-512F ([`crate::fused_scan512`]).
    Avx512,
    /// The fused scan on AVX2 + FMA ([`crate::fused_scan`]).
    Avx2,
    /// matrixmultiply's GEMM and a selection pass (any CPU).
    Portable,
}

/// Environment variable that picks the exact-search kernel at start-up (`amx`, `avx512`,
/// `avx2`, `portable` or `auto`), for tests and benchmarks that compare the paths on one machine.
pub const EXACT_KERNEL_ENV: &str = "MEMBUILDER_EXACT_KERNEL";

impl ExactKernel {
    pub const ALL: [ExactKernel; 4] = [
        ExactKernel::Amx,
        ExactKernel::Avx512,
        ExactKernel::Avx2,
        ExactKernel::Portable,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ExactKernel::Amx => "amx",
            ExactKernel::Avx512 => "avx512",
            ExactKernel::Avx2 => "avx2",
            ExactKernel::Portable => "portable",
        }
    }

    pub fn from_name(name: &str) -> Option<ExactKernel> {
        ExactKernel::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Whether this CPU can run the kernel.
    pub fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            ExactKernel::Amx => crate::amx_scan::available(),
            #[cfg(target_arch = "x86_64")]
            ExactKernel::Avx512 => crate::fused_scan512::available(),
            #[cfg(target_arch = "x86_64")]
            ExactKernel::Avx2 => crate::fused_scan::available(),
            #[cfg(not(target_arch = "x86_64"))]
            ExactKernel::Amx | ExactKernel::Avx512 | ExactKernel::Avx2 => false,
            ExactKernel::Portable => true,
        }
    }

    /// The fastest kernel this CPU can run.
    pub fn best() -> ExactKernel {
        ExactKernel::ALL
            .into_iter()
            .find(|k| k.available())
            .unwrap_or(ExactKernel::Portable)
    }
}

/// The chosen kernel as `ExactKernel::ALL` index + 1; 0 until first read.
static EXACT_KERNEL: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// The kernel exact search runs on: [`ExactKernel::best`] unless [`EXACT_KERNEL_ENV`] or
/// [`set_exact_kernel`] chose another. A value of the variable that names no kernel, or one this
/// CPU cannot run, is reported once on stderr and ignored (the results would be the same; only
/// the speed differs).
pub fn exact_kernel() -> ExactKernel {
    use std::sync::atomic::Ordering;
    let code = EXACT_KERNEL.load(Ordering::Relaxed);
    if code != 0 {
        return ExactKernel::ALL[code as usize - 1];
    }
    let mut chosen = ExactKernel::best();
    if let Ok(name) = std::env::var(EXACT_KERNEL_ENV) {
        match ExactKernel::from_name(&name) {
            Some(k) if k.available() => chosen = k,
            _ if name == "auto" || name.is_empty() => {}
            _ => eprintln!(
                "membuilder: {EXACT_KERNEL_ENV}={name:?} is not a kernel this CPU can run \
                 (one of auto, {}); using {}",
                available_exact_kernels()
                    .iter()
                    .map(|k| k.name())
                    .collect::<Vec<_>>()
                    .join(", "),
                chosen.name()
            ),
        }
    }
    let code = ExactKernel::ALL.iter().position(|&k| k == chosen).unwrap() as u8 + 1;
    // A concurrent first call may have stored its own reading of the same inputs: same value.
    EXACT_KERNEL.store(code, Ordering::Relaxed);
    chosen
}

/// Choose the kernel for every later exact search in this process (`None`: the best one this
/// CPU has). Refuses a kernel this CPU cannot run.
pub fn set_exact_kernel(kernel: Option<ExactKernel>) -> Result<ExactKernel, String> {
    let k = kernel.unwrap_or_else(ExactKernel::best);
    if !k.available() {
        return Err(format!(
            "this CPU cannot run the {} exact-search kernel",
            k.name()
        ));
    }
    let code = ExactKernel::ALL.iter().position(|&x| x == k).unwrap() as u8 + 1;
    EXACT_KERNEL.store(code, std::sync::atomic::Ordering::Relaxed);
    Ok(k)
}

/// The kernels this CPU can run, best first.
pub fn available_exact_kernels() -> Vec<ExactKernel> {
    ExactKernel::ALL
        .into_iter()
        .filter(|k| k.available())
        .collect()
}

/// The instruction set [`dot`] (the canonical re-scoring kernel) runs on here.
pub fn dot_path() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        return "avx2";
    }
    "portable"
}

/// Rows per GEMM block: the score block of `QUERY_BLOCK x ROW_BLOCK` floats stays in L2.
const ROW_BLOCK: usize = 2048;
/// Queries per GEMM block.
const QUERY_BLOCK: usize = 128;

/// The canonical inner product. Sixteen independent accumulators let the compiler vectorise the
/// loop while keeping the summation order fixed (so a score never depends on the caller). Where
/// the CPU has AVX2 the same code runs on 8-lane registers: every lane does the same multiplies
/// and adds in the same order (Rust never fuses them into FMAs on its own), so the result is
/// bit-identical to the portable build.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was just detected.
        return unsafe { dot_avx2(a, b) };
    }
    dot_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_portable(a, b)
}

#[inline(always)]
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
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

/// A bank's copy of its rows in the layout its exact-search kernel reads: tile-major float32 for
/// the fused scans (see [`crate::fused_scan::pack_rows`]) or bf16 tiles for AMX (see
/// [`crate::amx_scan::pack_rows`]). Made by the first batch search large enough to use it and
/// kept until the bank changes; views and batches over one base share it, so rows are copied
/// once per bank version instead of once per batch. Copies above [`TILE_CACHE_MAX_BYTES`] are
/// not kept (such batches copy a segment at a time), nor bf16 copies above
/// [`BF16_CACHE_MAX_BYTES`] (such batches run the AVX-512 scan). A clone of a bank starts
/// without one.
#[derive(Default)]
pub struct TileCache {
    f32_tiles: std::sync::Mutex<Option<(usize, std::sync::Arc<Vec<f32>>)>>,
    #[cfg(target_arch = "x86_64")]
    bf16_tiles: std::sync::Mutex<Option<std::sync::Arc<crate::amx_scan::Bf16Rows>>>,
}

/// Largest tile-major copy a bank keeps.
pub const TILE_CACHE_MAX_BYTES: usize = 256 << 20;

/// Largest bf16 copy a bank keeps for AMX: half the size of the bank's own vectors, so banks of
/// up to 1 GiB of vectors (e.g. 100k x 1,536) keep one; larger ones are searched on AVX-512.
pub const BF16_CACHE_MAX_BYTES: usize = 512 << 20;

impl Clone for TileCache {
    fn clone(&self) -> Self {
        TileCache::default()
    }
}

impl std::fmt::Debug for TileCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rows = lock(&self.f32_tiles).as_ref().map(|(n, _)| *n);
        write!(f, "TileCache {{ rows: {rows:?} }}")
    }
}

/// A cache slot's lock: a panic while packing leaves at worst no copy, and what the lock guards
/// is still sound.
fn lock<T>(slot: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    slot.lock().unwrap_or_else(|e| e.into_inner())
}

impl TileCache {
    /// Forget the copies (the bank's rows changed).
    pub fn clear(&mut self) {
        *self.f32_tiles.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
        #[cfg(target_arch = "x86_64")]
        {
            *self.bf16_tiles.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    /// Whether a copy is held (for tests).
    pub fn is_filled(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if lock(&self.bf16_tiles).is_some() {
            return true;
        }
        lock(&self.f32_tiles).is_some()
    }

    /// The bf16 copy of rows `0..rows.end` of `matrix` for [`crate::amx_scan`], made now if
    /// needed, when a batch of `nq` queries over `rows` should use one; `None` when it should
    /// not (small batches, ranges that do not start at row 0, copies too large to keep).
    #[cfg(target_arch = "x86_64")]
    fn bf16_for(
        &self,
        matrix: &[f32],
        dim: usize,
        rows: &Range<usize>,
        nq: usize,
    ) -> Option<std::sync::Arc<crate::amx_scan::Bf16Rows>> {
        use crate::amx_scan::{pack_rows, Bf16Rows};
        let bytes = Bf16Rows::bytes_for(rows.end, dim);
        if nq < PACK_MIN_QUERIES || rows.start != 0 || bytes > BF16_CACHE_MAX_BYTES {
            return None;
        }
        let mut slot = lock(&self.bf16_tiles);
        if let Some(copy) = slot.as_ref() {
            if copy.rows() == rows.end {
                return Some(copy.clone());
            }
        }
        let copy = std::sync::Arc::new(pack_rows(matrix, dim, rows.end));
        *slot = Some(copy.clone());
        Some(copy)
    }

    /// The copy of rows `0..rows.end` of `matrix`, made now if needed, when a fused scan of `nq`
    /// queries over `rows` should use one; `None` when it should not.
    #[cfg(target_arch = "x86_64")]
    fn tiles_for(
        &self,
        matrix: &[f32],
        dim: usize,
        rows: &Range<usize>,
        nq: usize,
    ) -> Option<std::sync::Arc<Vec<f32>>> {
        use crate::fused_scan::TILE;
        let bytes = rows.end.div_ceil(TILE) * TILE * dim * 4;
        if nq < PACK_MIN_QUERIES || rows.start != 0 || bytes > TILE_CACHE_MAX_BYTES {
            return None;
        }
        let mut slot = lock(&self.f32_tiles);
        if let Some((n, tiles)) = slot.as_ref() {
            if *n == rows.end {
                return Some(tiles.clone());
            }
        }
        let tiles = std::sync::Arc::new(crate::fused_scan::pack_rows(matrix, dim, 0..rows.end));
        *slot = Some((rows.end, tiles.clone()));
        Some(tiles)
    }
}

/// Exact candidate selection over rows `rows` of a row-major matrix (`dim` columns) for `nq`
/// queries (row-major, normalised): per query, among the rows for which `accept(query, row)`
/// holds, the best `k` by kernel score and every row within [`kernel_margin`] of the `k`-th, as
/// `(kernel score, row)` best first. Re-scoring these with [`dot`] and keeping `k` gives exactly
/// the canonical top `k`. `cache`, the matrix owner's [`TileCache`], lets large batches reuse
/// one tile-major copy of the rows.
///
/// The work is split into (query block x row range) tasks run on rayon when [`crate::par`]
/// allows, so one query over a large bank and many queries over a small one both use all cores.
/// Each task runs the kernel [`exact_kernel`] chose: bf16 tiles on AMX ([`crate::amx_scan`]) for
/// batches of `PACK_MIN_QUERIES` or more over a whole bank whose bf16 copy `cache` can keep,
/// the fused scan on AVX-512 ([`crate::fused_scan512`]) or AVX2/FMA ([`crate::fused_scan`]) where
/// the CPU has one, else a portable blocked GEMM followed by a selection pass.
#[allow(clippy::too_many_arguments)]
pub fn exact_candidates<F>(
    matrix: &[f32],
    cache: Option<&TileCache>,
    dim: usize,
    rows: Range<usize>,
    queries: &[f32],
    nq: usize,
    k: usize,
    accept: &F,
) -> Vec<Vec<(f32, u64)>>
where
    F: Fn(usize, usize) -> bool + Sync,
{
    if nq == 0 || k == 0 || rows.start >= rows.end || dim == 0 {
        return vec![Vec::new(); nq];
    }
    debug_assert!(matrix.len() >= rows.end * dim);
    debug_assert_eq!(queries.len(), nq * dim);
    #[allow(unused_mut)]
    let mut kernel = exact_kernel();
    #[cfg(target_arch = "x86_64")]
    if kernel == ExactKernel::Amx {
        if let Some(bank) = cache.and_then(|c| c.bf16_for(matrix, dim, &rows, nq)) {
            return amx_candidates(&bank, rows, queries, nq, k, accept);
        }
        // Small batches, sub-ranges and banks too large to keep a copy of.
        kernel = ExactKernel::Avx512;
    }
    #[cfg(target_arch = "x86_64")]
    if kernel != ExactKernel::Portable {
        let tiles = cache.and_then(|c| c.tiles_for(matrix, dim, &rows, nq));
        let tiles = tiles.as_ref().map(|t| t.as_slice());
        return fused(
            kernel,
            matrix,
            tiles,
            dim,
            rows,
            queries,
            nq,
            k,
            accept,
            PACK_SEGMENT_BYTES,
        );
    }
    let _ = (cache, kernel);
    exact_candidates_gemm(matrix, dim, rows, queries, nq, k, accept)
}

/// [`exact_candidates`] through [`crate::fused_scan`]: over `tiles` (a tile-major copy of rows
/// `0..rows.end`) when given; else over the matrix itself for small batches (or when
/// `segment_bytes` is 0); else over tile-major copies of at most `segment_bytes` made here, one
/// segment at a time. Inputs are non-empty and consistent (checked by [`exact_candidates`]).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn fused<F>(
    kernel: ExactKernel,
    matrix: &[f32],
    tiles: Option<&[f32]>,
    dim: usize,
    rows: Range<usize>,
    queries: &[f32],
    nq: usize,
    k: usize,
    accept: &F,
    segment_bytes: usize,
) -> Vec<Vec<(f32, u64)>>
where
    F: Fn(usize, usize) -> bool + Sync,
{
    debug_assert!(nq > 0 && k > 0 && rows.start < rows.end && dim > 0);
    with_query_panels(queries, nq, dim, |packed| {
        fused_panels(
            kernel,
            matrix,
            tiles,
            dim,
            rows,
            packed,
            nq,
            k,
            accept,
            segment_bytes,
        )
    })
}

thread_local! {
    /// Query panels of the last fused search on this thread, kept for the next one: a fresh
    /// allocation of a batch's panels costs more in page faults than packing them does.
    #[cfg(target_arch = "x86_64")]
    static QUERY_PANELS: std::cell::RefCell<Vec<crate::fused_scan::Line>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Panel buffers above this size are not kept between searches.
#[cfg(target_arch = "x86_64")]
const QUERY_PANELS_KEEP_BYTES: usize = 64 << 20;

/// Run `body` on `queries` packed into panels, in this thread's reusable buffer when it is free
/// (a search started from inside another one's task finds it taken and packs into its own).
#[cfg(target_arch = "x86_64")]
fn with_query_panels<T>(
    queries: &[f32],
    nq: usize,
    dim: usize,
    body: impl FnOnce(&[crate::fused_scan::Line]) -> T,
) -> T {
    use crate::fused_scan::{pack_into, Line};
    QUERY_PANELS.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            pack_into(queries, nq, dim, &mut buf);
            let out = body(&buf);
            if buf.capacity() * std::mem::size_of::<Line>() > QUERY_PANELS_KEEP_BYTES {
                *buf = Vec::new();
            }
            out
        }
        Err(_) => {
            let mut own = Vec::new();
            pack_into(queries, nq, dim, &mut own);
            body(&own)
        }
    })
}

/// [`fused`] with the queries already packed.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn fused_panels<F>(
    kernel: ExactKernel,
    matrix: &[f32],
    tiles: Option<&[f32]>,
    dim: usize,
    rows: Range<usize>,
    packed: &[crate::fused_scan::Line],
    nq: usize,
    k: usize,
    accept: &F,
    segment_bytes: usize,
) -> Vec<Vec<(f32, u64)>>
where
    F: Fn(usize, usize) -> bool + Sync,
{
    use crate::fused_scan::{self, Rows, PANEL, TILE};
    let margin = kernel_margin(dim);
    let scan = |source: Rows<'_>, rows: Range<usize>| {
        in_tasks(
            nq,
            rows,
            |_| margin,
            FUSED_QUERY_BLOCK,
            k,
            |q0, q1, r, found| {
                let panels = q0 / PANEL..q1.div_ceil(PANEL);
                // SAFETY: the kernel's `available()` was checked when it was chosen; `source`
                // covers `rows` (task ranges start on a tile boundary of it) and `packed` every panel
                // of the `nq` queries; `found` has one list per query q0..q1, and q0 is a multiple of
                // PANEL and q1 either one too or nq.
                unsafe {
                    match kernel {
                        // AMX needs AVX-512F; `exact_candidates` sends AMX searches without a bf16
                        // copy here.
                        ExactKernel::Amx | ExactKernel::Avx512 => crate::fused_scan512::scan(
                            source, dim, r, packed, panels, nq, found, accept,
                        ),
                        // `exact_candidates` sends the portable kernel elsewhere.
                        ExactKernel::Avx2 | ExactKernel::Portable => {
                            fused_scan::scan(source, dim, r, packed, panels, nq, found, accept)
                        }
                    }
                }
            },
        )
    };
    if let Some(tiles) = tiles {
        return scan(Rows::Tiles { tiles, first: 0 }, rows);
    }
    if nq < PACK_MIN_QUERIES || segment_bytes == 0 {
        return scan(Rows::Matrix(matrix), rows);
    }
    // Enough queries to repay a tile-major copy of the rows, and no cached one: copy a segment
    // at a time so that the copy stays small whatever the bank's size.
    let seg_rows = (segment_bytes / (4 * dim * TILE)).max(1) * TILE;
    let mut lists: Vec<NearTop> = (0..nq).map(|_| NearTop::new(k, margin)).collect();
    let mut s0 = rows.start;
    while s0 < rows.end {
        let s1 = (s0 + seg_rows).min(rows.end);
        let tiles = fused_scan::pack_rows(matrix, dim, s0..s1);
        let first = s0;
        let found = scan(
            Rows::Tiles {
                tiles: &tiles,
                first,
            },
            s0..s1,
        );
        if s0 == rows.start && s1 == rows.end {
            return found;
        }
        for (list, cands) in lists.iter_mut().zip(found) {
            list.offer_all(cands);
        }
        s0 = s1;
    }
    lists.into_iter().map(NearTop::into_vec).collect()
}

/// [`exact_candidates`] on AMX over `bank`, the bf16 copy of rows `0..rows.end` (inputs checked
/// by [`exact_candidates`]): each query keeps every row within its own proven margin
/// ([`crate::amx_scan::Bf16Queries::margin`]) of its k-th best bf16 score, so re-scoring gives
/// the canonical top k as on every other path.
#[cfg(target_arch = "x86_64")]
fn amx_candidates<F>(
    bank: &crate::amx_scan::Bf16Rows,
    rows: Range<usize>,
    queries: &[f32],
    nq: usize,
    k: usize,
    accept: &F,
) -> Vec<Vec<(f32, u64)>>
where
    F: Fn(usize, usize) -> bool + Sync,
{
    let packed = crate::amx_scan::pack_queries(queries, nq, bank);
    let margin = |q: usize| packed.margin(q);
    let q_block = crate::amx_scan::QUERY_BLOCK;
    in_tasks(nq, rows, margin, q_block, k, |q0, q1, r, found| {
        // SAFETY: `Amx` is chosen only where `amx_scan::available()`; the queries were packed
        // for this bank, task query blocks start on a multiple of `q_block` (a multiple of 32)
        // and `r` lies inside the bank's copy.
        unsafe { crate::amx_scan::scan(bank, &packed, r, q0, q1, found, accept) }
    })
}

/// Batches smaller than this scan the bank's matrix directly; larger ones first copy the rows
/// tile-major, or to bf16 for AMX (one extra pass over the rows, repaid by the faster kernel over
/// many queries).
#[cfg(target_arch = "x86_64")]
const PACK_MIN_QUERIES: usize = 64;

/// Largest tile-major copy made at once.
#[cfg(target_arch = "x86_64")]
const PACK_SEGMENT_BYTES: usize = 16 << 20;

/// Queries per fused task (a multiple of the panel width): each chunk of rows brought into L2
/// is used by this many queries before the next one is read.
#[cfg(target_arch = "x86_64")]
const FUSED_QUERY_BLOCK: usize = 128;

/// [`exact_candidates`] through a portable GEMM (matrixmultiply) and a selection pass (inputs
/// checked by [`exact_candidates`]).
fn exact_candidates_gemm<F>(
    matrix: &[f32],
    dim: usize,
    rows: Range<usize>,
    queries: &[f32],
    nq: usize,
    k: usize,
    accept: &F,
) -> Vec<Vec<(f32, u64)>>
where
    F: Fn(usize, usize) -> bool + Sync,
{
    debug_assert!(nq > 0 && k > 0 && rows.start < rows.end && dim > 0);
    let margin = kernel_margin(dim);
    in_tasks(
        nq,
        rows,
        |_| margin,
        QUERY_BLOCK,
        k,
        |q0, q1, r, found| {
            let (r0, r1) = (r.start, r.end);
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
                for (qi, list) in found.iter_mut().enumerate() {
                    let row_scores = &scores[qi * n..(qi + 1) * n];
                    for (j, &s) in row_scores.iter().enumerate() {
                        if s >= list.threshold() && accept(q0 + qi, c0 + j) {
                            list.push(s, (c0 + j) as u64);
                        }
                    }
                }
                c0 = c1;
            }
        },
    )
}

/// Row splits of [`in_tasks`] are multiples of this: of the fused scans' tile heights (6 rows on
/// AVX2, 12 on AVX-512) and of AMX's 32-row blocks.
const SPLIT_ALIGN: usize = 96;
#[cfg(target_arch = "x86_64")]
const _: () = assert!(SPLIT_ALIGN.is_multiple_of(2 * crate::fused_scan::TILE));

/// One query's partial top lists from every row split, and its merged candidates.
type QuerySlot = (Vec<NearTop>, Vec<(f32, u64)>);

/// Split `nq` queries x `rows` into (query block x row range) tasks, run `task(q0, q1, rows,
/// lists)` for each (in parallel when allowed; `lists` has one empty [`NearTop`] per query
/// q0..q1, with margin `margin(query)`) and merge each query's lists by the same rule.
fn in_tasks<M, T>(
    nq: usize,
    rows: Range<usize>,
    margin: M,
    q_block: usize,
    k: usize,
    task: T,
) -> Vec<Vec<(f32, u64)>>
where
    M: Fn(usize) -> f32 + Sync + Send,
    T: Fn(usize, usize, Range<usize>, &mut [NearTop]) + Sync + Send,
{
    let n_rows = rows.end - rows.start;
    let q_blocks = nq.div_ceil(q_block);
    let threads = crate::par::threads();
    // Split rows so that there are about two tasks per thread, but never below one row block.
    let max_splits = n_rows.div_ceil(ROW_BLOCK);
    let splits = (2 * threads).div_ceil(q_blocks).clamp(1, max_splits.max(1));
    // Whole tiles per split, so that a scan over a tile-major copy starts on a tile.
    let split_len = n_rows.div_ceil(splits).div_ceil(SPLIT_ALIGN) * SPLIT_ALIGN;
    let partial: Vec<Vec<NearTop>> = crate::par::map_indices(q_blocks * splits, |t| {
        let (qb, sp) = (t / splits, t % splits);
        let q0 = qb * q_block;
        let q1 = (q0 + q_block).min(nq);
        let r0 = rows.start + sp * split_len;
        let r1 = (r0 + split_len).min(rows.end);
        let mut found: Vec<NearTop> = (q0..q1).map(|q| NearTop::new(k, margin(q))).collect();
        if r0 < r1 {
            task(q0, q1, r0..r1, &mut found);
        }
        found
    });
    // Gather per query its `splits` partial lists, then merge them in parallel (a thousand small
    // selections and sorts are a visible share of a batch).
    let mut slots: Vec<QuerySlot> = (0..nq)
        .map(|_| (Vec::with_capacity(splits), Vec::new()))
        .collect();
    for (t, found) in partial.into_iter().enumerate() {
        let q0 = (t / splits) * q_block;
        for (qi, list) in found.into_iter().enumerate() {
            slots[q0 + qi].0.push(list);
        }
    }
    crate::par::for_each_mut(&mut slots, |q, (lists, out)| {
        let mut lists = std::mem::take(lists);
        if lists.len() == 1 {
            *out = lists.pop().expect("one list").into_vec();
            return;
        }
        let mut merged = NearTop::new(k, margin(q));
        for list in lists {
            merged.offer_all(list.into_vec());
        }
        *out = merged.into_vec();
    });
    slots.into_iter().map(|(_, out)| out).collect()
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
    let rows: Vec<usize> = rows.into_iter().collect();
    // Candidate rows lie anywhere in the bank, mostly outside the caches: ask for all of them
    // first so their lines arrive in parallel instead of one miss after another.
    for &row in &rows {
        prefetch(&matrix[row * dim..(row + 1) * dim]);
    }
    let mut top = TopK::new(k);
    for row in rows {
        let s = dot(query, &matrix[row * dim..(row + 1) * dim]);
        top.push(s, id_of(row));
    }
    top.into_vec()
}

/// Hint that `data` will be read soon (x86-64; a no-op elsewhere).
#[inline]
fn prefetch(data: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in data.chunks(16) {
        // SAFETY: a prefetch is only a hint and never faults; the address is inside `data`.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr() as *const i8
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
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
    use crate::topk::ranks_before;

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

    /// Every exact path (the dispatching entry point, and each kernel directly) against brute
    /// force with the canonical kernel, over shapes that leave partial panels, tiles, chunks and
    /// query blocks, and over banks full of exact and near ties (duplicated rows, rows that differ
    /// in the last bits): re-scoring the candidates must give exactly the canonical top k.
    #[test]
    fn exact_candidates_contain_the_canonical_top_k() {
        let mut seed = 7u64;
        let mut rnd = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        for (dim, rows, nq, k, distinct) in [
            (24, 5000, 130, 5, 5000),
            (1, 50, 3, 4, 50),
            (5, 7, 17, 10, 7),
            (384, 1301, 33, 26, 1301),
            (1536, 200, 20, 3, 200),
            // Only 40 distinct directions: every query sees dozens of exact ties.
            (64, 3000, 40, 10, 40),
            (64, 3000, 100, 10, 40),
            (384, 2000, 70, 10, 2000),
            // A dimension that is no multiple of the kernel's unrolling.
            (1000, 300, 70, 5, 300),
        ] {
            let mut matrix: Vec<f32> = Vec::with_capacity(rows * dim);
            let protos: Vec<Vec<f32>> = (0..distinct)
                .map(|_| {
                    let mut v: Vec<f32> = (0..dim).map(|_| rnd()).collect();
                    normalize(&mut v).unwrap();
                    v
                })
                .collect();
            for r in 0..rows {
                let mut v = protos[r % distinct].clone();
                if r % 7 == 3 {
                    // A near tie: the same direction, one value nudged by one ulp.
                    v[r % dim] = f32::from_bits(v[r % dim].to_bits() + 1);
                }
                matrix.extend(v);
            }
            let queries: Vec<f32> = (0..nq)
                .flat_map(|_| {
                    let mut v: Vec<f32> = (0..dim).map(|_| rnd()).collect();
                    normalize(&mut v).unwrap();
                    v
                })
                .collect();
            let accept = |_: usize, r: usize| r >= 2 && !r.is_multiple_of(3);
            let range = 2..rows;
            let cache = TileCache::default();
            let mut runs = vec![
                exact_candidates(&matrix, None, dim, range.clone(), &queries, nq, k, &accept),
                // Twice through one cache (filled by the first call when the batch is large).
                exact_candidates(
                    &matrix,
                    Some(&cache),
                    dim,
                    0..rows,
                    &queries,
                    nq,
                    k,
                    &accept,
                ),
                exact_candidates(
                    &matrix,
                    Some(&cache),
                    dim,
                    0..rows,
                    &queries,
                    nq,
                    k,
                    &accept,
                ),
                exact_candidates_gemm(&matrix, dim, range.clone(), &queries, nq, k, &accept),
            ];
            #[cfg(target_arch = "x86_64")]
            for kernel in fused_kernels() {
                // The matrix directly, whatever the batch size.
                let direct = fused(
                    kernel,
                    &matrix,
                    None,
                    dim,
                    range.clone(),
                    &queries,
                    nq,
                    k,
                    &accept,
                    0,
                );
                runs.push(direct);
                // Tile-major copies a few tiles at a time: several segments per scan.
                let seg = 4 * 6 * 7 * dim;
                runs.push(fused(
                    kernel,
                    &matrix,
                    None,
                    dim,
                    range.clone(),
                    &queries,
                    nq,
                    k,
                    &accept,
                    seg,
                ));
            }
            let id_of = |r: usize| r as u64;
            for q in 0..nq {
                let qv = &queries[q * dim..(q + 1) * dim];
                let want = rescore(
                    &matrix,
                    dim,
                    &id_of,
                    qv,
                    range.clone().filter(|&r| accept(q, r)),
                    k,
                );
                for got in &runs {
                    assert!(got[q].len() >= want.len());
                    assert!(got[q].windows(2).all(|w| !ranks_before(w[1], w[0])));
                    let cands = got[q].iter().map(|&(_, r)| r as usize);
                    let top = rescore(&matrix, dim, &id_of, qv, cands, k);
                    assert_eq!(top, want, "dim {dim} rows {rows} query {q}");
                }
            }
            #[cfg(target_arch = "x86_64")]
            assert_eq!(
                cache.is_filled(),
                crate::fused_scan::available() && nq >= PACK_MIN_QUERIES
            );
        }
    }

    /// The fused kernels this CPU can run (the others are skipped: their tests pass vacuously
    /// here and run on CPUs that have them).
    #[cfg(target_arch = "x86_64")]
    fn fused_kernels() -> Vec<ExactKernel> {
        [ExactKernel::Avx512, ExactKernel::Avx2]
            .into_iter()
            .filter(|k| k.available())
            .collect()
    }

    /// Each fused kernel directly, over every dimension from 1 to 64 and a spread up to 1,536,
    /// with batch sizes that leave odd and partial panels, bank sizes that leave partial tiles
    /// (and rows shared by many exact and one-ulp ties): every score a kernel offers is its
    /// query's products with its row summed in dimension order with FMA (so both kernels agree
    /// to the bit), and re-scoring its candidates gives exactly the brute-force canonical top k.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn fused_kernels_match_brute_force_at_every_shape() {
        let kernels = fused_kernels();
        if kernels.is_empty() {
            eprintln!("no fused kernel on this CPU: skipped");
            return;
        }
        let mut seed = 23u64;
        let mut rnd = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        let dims: Vec<usize> = (1..=64)
            .chain([
                95, 127, 128, 129, 255, 383, 384, 385, 511, 768, 1023, 1024, 1536,
            ])
            .collect();
        for (i, &dim) in dims.iter().enumerate() {
            // Vary rows and queries with the dimension; keep the big dimensions cheap.
            let rows = if dim > 500 {
                61 + i % 13
            } else {
                37 + (i * 7) % 50
            };
            let nq = [1, 15, 16, 17, 33, 47, 64, 70][i % 8];
            let k = 1 + i % 6;
            let distinct = (rows / 3).max(1);
            let protos: Vec<Vec<f32>> = (0..distinct)
                .map(|_| loop {
                    let mut v: Vec<f32> = (0..dim).map(|_| rnd()).collect();
                    if normalize(&mut v).is_ok() {
                        break v;
                    }
                })
                .collect();
            let mut matrix = Vec::with_capacity(rows * dim);
            for r in 0..rows {
                let mut v = protos[r % distinct].clone();
                if r % 5 == 1 {
                    v[r % dim] = f32::from_bits(v[r % dim].to_bits() + 1);
                }
                matrix.extend(v);
            }
            let mut queries: Vec<f32> = Vec::with_capacity(nq * dim);
            for q in 0..nq {
                if q % 4 == 3 {
                    // A query equal to a row: its best score ties across that row's duplicates.
                    let r = (q * 3) % rows;
                    queries.extend_from_slice(&matrix[r * dim..(r + 1) * dim]);
                } else {
                    let mut v: Vec<f32> = (0..dim).map(|_| rnd()).collect();
                    normalize(&mut v).unwrap_or_else(|_| v.fill(1.0 / (dim as f32).sqrt()));
                    queries.extend(v);
                }
            }
            let accept = |q: usize, r: usize| (q + r) % 11 != 4;
            let range = 1..rows;
            let id_of = |r: usize| r as u64;
            for &kernel in &kernels {
                for seg in [0, 6 * dim, 1 << 20] {
                    let got = fused(
                        kernel,
                        &matrix,
                        None,
                        dim,
                        range.clone(),
                        &queries,
                        nq,
                        k,
                        &accept,
                        seg,
                    );
                    for q in 0..nq {
                        let qv = &queries[q * dim..(q + 1) * dim];
                        for &(s, r) in &got[q] {
                            let row = &matrix[r as usize * dim..(r as usize + 1) * dim];
                            let seq = qv.iter().zip(row).fold(0f32, |a, (x, y)| x.mul_add(*y, a));
                            assert_eq!(s.to_bits(), seq.to_bits(), "{kernel:?} dim {dim} q {q}");
                        }
                        let want = rescore(
                            &matrix,
                            dim,
                            &id_of,
                            qv,
                            range.clone().filter(|&r| accept(q, r)),
                            k,
                        );
                        let cands = got[q].iter().map(|&(_, r)| r as usize);
                        let top = rescore(&matrix, dim, &id_of, qv, cands, k);
                        assert_eq!(top, want, "{kernel:?} dim {dim} rows {rows} nq {nq} q {q}");
                    }
                }
            }
        }
    }

    /// Whether the AMX tests can run here (they pass vacuously where they cannot, and run on
    /// CPUs that have AMX).
    #[cfg(target_arch = "x86_64")]
    fn amx_here() -> bool {
        let ok = crate::amx_scan::available();
        if !ok {
            eprintln!("no AMX on this CPU (or not granted by the OS): skipped");
        }
        ok
    }

    /// A deterministic stream of 31-bit numbers for test data (an LCG).
    fn lcg(mut seed: u64) -> impl FnMut() -> u64 {
        move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            seed >> 33
        }
    }

    /// One query's AMX candidates `got`: each within `bound` of its canonical score, and their
    /// re-scored top `k` equal to the brute-force top `k` over `eligible`.
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    fn check_amx_query(
        matrix: &[f32],
        dim: usize,
        qv: &[f32],
        got: &[(f32, u64)],
        bound: f32,
        eligible: impl Iterator<Item = usize>,
        k: usize,
        what: &str,
    ) {
        let id_of = |r: usize| r as u64;
        for &(s, r) in got {
            let r = r as usize;
            let canonical = dot(qv, &matrix[r * dim..(r + 1) * dim]);
            assert!(
                (s - canonical).abs() <= bound,
                "{what} row {r}: {s} vs {canonical}, bound {bound}"
            );
        }
        let want = rescore(matrix, dim, &id_of, qv, eligible, k);
        let top = rescore(matrix, dim, &id_of, qv, got.iter().map(|c| c.1 as usize), k);
        assert_eq!(top, want, "{what}");
    }

    /// The AMX kernel directly (where this CPU and OS allow it), over dimensions that leave
    /// partial 32-value steps, banks that leave partial blocks, ranges that start and end inside
    /// a block, rows that differ from each other by one float32 ulp (far below bf16's
    /// resolution, so bf16 cannot order them) and queries equal to rows: every offered score is
    /// within the query's proven bound of its canonical score, and re-scoring the candidates
    /// gives exactly the brute-force canonical top k.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn amx_candidates_match_brute_force_at_every_shape() {
        if !amx_here() {
            return;
        }
        let mut next = lcg(41);
        let mut rnd = move || (next() as f32 / (1u64 << 31) as f32) - 0.5;
        let shapes: Vec<(usize, usize, usize)> = (1..=40)
            .map(|d| (d, 20 + d * 3, [1, 31, 32, 33, 70][d % 5]))
            .chain([
                (63, 300, 65),
                (96, 1000, 130),
                (384, 2000, 200),
                (385, 517, 64),
                (1536, 400, 40),
            ])
            .collect();
        let mut widest = 0f32;
        for (i, &(dim, rows, nq)) in shapes.iter().enumerate() {
            let k = 1 + i % 10;
            let distinct = (rows / 3).max(1);
            let unit = |rnd: &mut dyn FnMut() -> f32| loop {
                let mut v: Vec<f32> = (0..dim).map(|_| rnd()).collect();
                if normalize(&mut v).is_ok() {
                    break v;
                }
            };
            let protos: Vec<Vec<f32>> = (0..distinct).map(|_| unit(&mut rnd)).collect();
            let mut matrix = Vec::with_capacity(rows * dim);
            for r in 0..rows {
                let mut v = protos[r % distinct].clone();
                if r % 5 == 1 {
                    v[r % dim] = f32::from_bits(v[r % dim].to_bits() + 1);
                }
                matrix.extend(v);
            }
            let mut queries = Vec::with_capacity(nq * dim);
            for q in 0..nq {
                if q % 4 == 3 {
                    let r = (q * 7) % rows;
                    queries.extend_from_slice(&matrix[r * dim..(r + 1) * dim]);
                } else {
                    queries.extend(unit(&mut rnd));
                }
            }
            let bank = crate::amx_scan::pack_rows(&matrix, dim, rows);
            let accept = |q: usize, r: usize| (q + r) % 11 != 4;
            let packed = crate::amx_scan::pack_queries(&queries, nq, &bank);
            for range in [0..rows, (rows / 7)..(rows - rows / 5).max(rows / 7 + 1)] {
                let got = amx_candidates(&bank, range.clone(), &queries, nq, k, &accept);
                for q in 0..nq {
                    let bound = packed.margin(q) / 2.0;
                    widest = widest.max(bound);
                    assert!(got[q]
                        .iter()
                        .all(|&(_, r)| range.contains(&(r as usize)) && accept(q, r as usize)));
                    check_amx_query(
                        &matrix,
                        dim,
                        &queries[q * dim..(q + 1) * dim],
                        &got[q],
                        bound,
                        range.clone().filter(|&r| accept(q, r)),
                        k,
                        &format!("dim {dim} rows {rows} nq {nq} q {q} {range:?}"),
                    );
                }
            }
        }
        // The bound is a few thousandths for unit vectors, not a blanket that admits everything.
        assert!(widest < 0.01, "{widest}");
    }

    /// The AMX bound where bf16 rounding is at its worst and where it flushes: values across the
    /// whole float range (down to float32 subnormals, which become zero in bf16), values halfway
    /// between two bf16 numbers, and vectors dominated by one component.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn amx_bound_holds_for_values_across_the_float_range() {
        if !amx_here() {
            return;
        }
        let mut next = lcg(5);
        let (dim, rows, nq, k) = (100, 700, 96, 8);
        let mut vector = |kind: u64| -> Vec<f32> {
            loop {
                let mut v: Vec<f32> = (0..dim)
                    .map(|i| {
                        let sign = if next().is_multiple_of(2) { 1.0 } else { -1.0 };
                        match kind {
                            // Magnitudes from 1 down to 2^-140 (subnormal in float32).
                            0 => sign * f32::powi(2.0, -((next() % 141) as i32)),
                            // Exactly halfway between two bf16 numbers: 1 + (2j + 1) 2^-8.
                            1 => sign * (1.0 + (2 * (next() % 128) + 1) as f32 / 256.0),
                            // One large component, the rest tiny.
                            _ => {
                                if i == 0 {
                                    sign
                                } else {
                                    sign * 1e-3 * (next() % 1000) as f32 / 1000.0
                                }
                            }
                        }
                    })
                    .collect();
                if normalize(&mut v).is_ok() {
                    break v;
                }
            }
        };
        let matrix: Vec<f32> = (0..rows).flat_map(|r| vector(r as u64 % 3)).collect();
        let queries: Vec<f32> = (0..nq).flat_map(|q| vector(q as u64 % 3)).collect();
        let bank = crate::amx_scan::pack_rows(&matrix, dim, rows);
        let packed = crate::amx_scan::pack_queries(&queries, nq, &bank);
        let accept = |_: usize, _: usize| true;
        let got = amx_candidates(&bank, 0..rows, &queries, nq, k, &accept);
        for q in 0..nq {
            check_amx_query(
                &matrix,
                dim,
                &queries[q * dim..(q + 1) * dim],
                &got[q],
                packed.margin(q) / 2.0,
                0..rows,
                k,
                &format!("q {q}"),
            );
        }
    }

    #[test]
    fn exact_kernel_choice() {
        let best = ExactKernel::best();
        assert!(best.available() && ExactKernel::Portable.available());
        assert_eq!(available_exact_kernels()[0], best);
        for k in ExactKernel::ALL {
            assert_eq!(ExactKernel::from_name(k.name()), Some(k));
        }
        assert_eq!(ExactKernel::from_name("sse"), None);
        // Only the default may be (re)set here: tests run in parallel in one process.
        assert_eq!(set_exact_kernel(None), Ok(best));
        #[cfg(target_arch = "x86_64")]
        if !ExactKernel::Avx512.available() {
            assert!(set_exact_kernel(Some(ExactKernel::Avx512)).is_err());
        }
    }

    #[test]
    fn kernel_margin_bounds_real_rounding() {
        // The margin must exceed twice the largest difference seen between two summation orders.
        let mut seed = 11u64;
        let mut rnd = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        for dim in [8usize, 384, 1536, 4096] {
            let mut worst = 0f32;
            for _ in 0..200 {
                let mut a: Vec<f32> = (0..dim).map(|_| rnd()).collect();
                let mut b: Vec<f32> = (0..dim).map(|_| rnd()).collect();
                normalize(&mut a).unwrap();
                normalize(&mut b).unwrap();
                let seq: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
                worst = worst.max((dot(&a, &b) - seq).abs());
            }
            assert!(worst * 2.0 < kernel_margin(dim), "dim {dim}: {worst}");
            // Small enough to cost no candidates at embedding sizes.
            assert!(dim > 1536 || kernel_margin(dim) < 1e-3);
        }
    }

    #[test]
    fn near_top_keeps_the_best_k_and_everything_within_the_margin() {
        let mut n = NearTop::new(2, 0.1);
        for (i, s) in [0.5f32, 0.9, 0.1, 0.85, 0.82, 0.3, 0.79, 0.95, 0.2, 0.0]
            .iter()
            .enumerate()
        {
            if *s >= n.threshold() {
                n.push(*s, i as u64);
            }
        }
        // Best two are 0.95 and 0.9; everything >= 0.8 stays.
        let keys: Vec<u64> = n.into_vec().into_iter().map(|x| x.1).collect();
        assert_eq!(keys, vec![7, 1, 3, 4]);
        assert!(NearTop::new(0, 0.1).into_vec().is_empty());
        assert_eq!(NearTop::new(0, 0.1).threshold(), f32::INFINITY);
    }

    #[test]
    fn exact_candidates_handle_empty_inputs() {
        let m = vec![1f32; 40];
        let q = vec![1f32; 8];
        assert_eq!(
            exact_candidates(&m, None, 4, 0..10, &q, 2, 0, &|_, _| true),
            vec![vec![]; 2]
        );
        assert_eq!(
            exact_candidates(&m, None, 4, 5..5, &q, 2, 3, &|_, _| true),
            vec![vec![]; 2]
        );
        assert!(exact_candidates(&m, None, 4, 0..10, &[], 0, 3, &|_, _| true).is_empty());
        let none = exact_candidates(&m, None, 4, 0..10, &q, 2, 3, &|_, _| false);
        assert_eq!(none, vec![vec![]; 2]);
    }
}
