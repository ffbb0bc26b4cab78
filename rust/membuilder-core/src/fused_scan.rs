//! Exact batched inner-product top-k with the selection fused into the score kernel (x86-64,
//! AVX2 + FMA, chosen at run time; the AVX-512 variant of the same scan is
//! [`crate::fused_scan512`]).
//!
//! The textbook way (and faiss's) is a BLAS GEMM that writes a block of the (queries x rows) score
//! matrix to memory, then a second pass that reads every score back to select each query's best.
//! For top-k retrieval almost every score is thrown away, so here each 16 x 6 tile of scores is
//! compared with its queries' current admission thresholds while it is still in registers; only
//! the few scores that could enter a query's list leave the registers. Nothing is written per
//! score and nothing is re-read.
//!
//! Layout: the queries of a batch are packed into 16-query panels (`k`-major, so one 64-byte line
//! holds the 16 queries' values at dimension `k`). Rows are read either from the bank's own
//! row-major matrix (six sequential streams per tile; small batches) or from a tile-major copy
//! ([`pack_rows`], kept by the bank between batches), where the six values a step broadcasts share
//! one line. Rows are processed in chunks sized to stay in L2 while every panel of a task passes
//! over them. The inner loop is the same 16 x 6 register tile BLAS kernels use on AVX2: two vector
//! loads, six broadcasts and twelve FMAs per dimension.
//!
//! Each lane sums its query's products with its row in dimension order, one FMA at a time, so a
//! kernel score is a fixed function of (query, row), whatever the blocking or threads. Callers
//! still re-score the winners with [`crate::retrieval::dot`] (see [`crate::topk::NearTop`]).

use std::arch::x86_64::*;
use std::ops::Range;

use crate::topk::NearTop;

/// Queries per panel: two 8-lane vectors.
pub const PANEL: usize = 16;
/// Rows per tile: one broadcast each, 12 accumulators (16 registers in all with the two query
/// vectors and the broadcast).
pub const TILE: usize = 6;
/// Bytes of bank rows per chunk: most of a 512 KiB L2 (each panel passing over the chunk is
/// only 16 queries, and stays in L1 while it does).
const CHUNK_BYTES: usize = 384 * 1024;

/// Whether this CPU can run the kernel (the result is cached by the standard library).
pub fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// One cache line of a packed panel: the 16 queries' values at one dimension.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub struct Line([f32; PANEL]);

/// Queries `queries` (row-major, `dim` columns) packed into panels of [`PANEL`] in `out`
/// (replacing its contents, reusing its allocation); the padding lanes of the last panel are zero.
pub fn pack_into(queries: &[f32], nq: usize, dim: usize, out: &mut Vec<Line>) {
    let panels = nq.div_ceil(PANEL);
    out.clear();
    out.resize(panels * dim, Line([0.0; PANEL]));
    // Panel by panel (one panel, 16 x dim floats, stays in L1 while it is filled), each query
    // read in order.
    for (p, lines) in out.chunks_mut(dim.max(1)).enumerate() {
        let q0 = p * PANEL;
        let lanes = (nq - q0).min(PANEL);
        for lane in 0..lanes {
            let src = &queries[(q0 + lane) * dim..(q0 + lane + 1) * dim];
            for (line, &x) in lines.iter_mut().zip(src) {
                line.0[lane] = x;
            }
        }
    }
}

/// Rows per chunk for `dim`: a multiple of [`TILE`], at least one tile.
pub(crate) fn chunk_rows(dim: usize) -> usize {
    let rows = CHUNK_BYTES / (4 * dim.max(1));
    (rows / TILE).max(1) * TILE
}

/// Where a scan reads its rows from.
#[derive(Clone, Copy)]
pub enum Rows<'a> {
    /// The bank's own row-major matrix (`dim` values per row).
    Matrix(&'a [f32]),
    /// A tile-major copy made by [`pack_rows`] of the rows from `first` on: for a scan over many
    /// query panels, the six values a tile step broadcasts then sit in one line instead of six.
    Tiles { tiles: &'a [f32], first: usize },
}

/// Rows `rows` of `matrix` (row-major, `dim` columns) copied tile-major: tile `t` holds rows
/// `rows.start + 6t ..` as `dim` groups of [`TILE`] values (the last tile padded with zeros).
/// Tiles are filled in parallel when allowed.
pub fn pack_rows(matrix: &[f32], dim: usize, rows: Range<usize>) -> Vec<f32> {
    let n = rows.end.saturating_sub(rows.start);
    let tiles = n.div_ceil(TILE);
    let mut out = vec![0f32; tiles * TILE * dim];
    // Jobs of about 64 tiles, so that the pool's overhead stays small against the copying.
    let per_job = 64 * TILE * dim;
    let mut jobs: Vec<&mut [f32]> = out.chunks_mut(per_job.max(1)).collect();
    crate::par::for_each_mut(&mut jobs, |job_index, dst| {
        let first_tile = job_index * 64;
        for (t, tile) in dst.chunks_mut(TILE * dim).enumerate() {
            let r0 = rows.start + (first_tile + t) * TILE;
            for j in 0..TILE.min(rows.end - r0) {
                let src = &matrix[(r0 + j) * dim..(r0 + j + 1) * dim];
                for (k, &x) in src.iter().enumerate() {
                    tile[k * TILE + j] = x;
                }
            }
        }
    });
    out
}

/// The argument contract shared by every fused scan (this one and the AVX-512 one), checked in
/// debug builds: the rows exist in `source`, the tiles start on a tile boundary, the panels are
/// packed, and there is one list per real query of `panels`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn debug_check_scan_args(
    source: Rows<'_>,
    dim: usize,
    rows: &Range<usize>,
    packed: &[Line],
    panels: &Range<usize>,
    nq: usize,
    lists: usize,
) {
    debug_assert!(match source {
        Rows::Matrix(m) => m.len() >= rows.end * dim,
        Rows::Tiles { tiles, first } => {
            (rows.start - first).is_multiple_of(TILE)
                && tiles.len() >= (rows.end - first).div_ceil(TILE) * TILE * dim
        }
    });
    debug_assert!(packed.len() >= panels.end * dim);
    debug_assert_eq!(lists, nq.min(panels.end * PANEL) - panels.start * PANEL);
}

/// Scan rows `rows` (read from `source`) for the queries of panels `panels` (packed by
/// [`pack_into`]; `nq` is the total number of real queries, so padding lanes are ignored),
/// offering to `found` (one list per query of these panels, in order) every row at or above that
/// list's threshold for which `accept(query, row)` holds. Scores offered are the kernel's.
///
/// # Safety
/// The CPU must support AVX2 and FMA ([`available`]); a [`Rows::Matrix`] must hold `rows.end * dim`
/// values, a [`Rows::Tiles`] every tile of `rows` with `rows.start - first` a multiple of [`TILE`];
/// `packed` the panels `panels` for this `dim`, and `found` one list per query of those panels
/// (the last one possibly partial).
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn scan<F>(
    source: Rows<'_>,
    dim: usize,
    rows: Range<usize>,
    packed: &[Line],
    panels: Range<usize>,
    nq: usize,
    found: &mut [NearTop],
    accept: &F,
) where
    F: Fn(usize, usize) -> bool,
{
    let q_first = panels.start * PANEL;
    let n_panels = panels.end - panels.start;
    debug_check_scan_args(source, dim, &rows, packed, &panels, nq, found.len());
    if rows.start >= rows.end || dim == 0 || n_panels == 0 {
        return;
    }
    // Admission thresholds per lane, kept beside the lists so a tile loads them as two vectors;
    // +inf on padding lanes.
    let mut thresholds = vec![f32::INFINITY; n_panels * PANEL];
    for (t, list) in thresholds.iter_mut().zip(found.iter()) {
        *t = list.threshold();
    }
    let chunk = chunk_rows(dim);
    let mut c0 = rows.start;
    while c0 < rows.end {
        let c1 = (c0 + chunk).min(rows.end);
        for p in 0..n_panels {
            let panel = packed.as_ptr().add((panels.start + p) * dim) as *const f32;
            let lane0 = p * PANEL;
            let mut r0 = c0;
            while r0 < c1 {
                let valid = (c1 - r0).min(TILE);
                let acc = match source {
                    Rows::Tiles { tiles, first } => {
                        tile_packed(panel, tiles.as_ptr().add((r0 - first) * dim), dim)
                    }
                    Rows::Matrix(m) => {
                        // Rows past the end of the chunk repeat its last row; their scores are
                        // ignored.
                        let mut ptrs = [m.as_ptr(); TILE];
                        for (j, ptr) in ptrs.iter_mut().enumerate() {
                            *ptr = m.as_ptr().add((r0 + j.min(valid - 1)) * dim);
                        }
                        tile(panel, &ptrs, dim)
                    }
                };
                let t0 = _mm256_loadu_ps(thresholds.as_ptr().add(lane0));
                let t1 = _mm256_loadu_ps(thresholds.as_ptr().add(lane0 + 8));
                // Per row, a 16-bit mask of the lanes at or above their threshold (a constant
                // trip count keeps `acc` in registers; rows past `valid` are masked off).
                let mut masks = [0u32; TILE];
                let mut any = 0u32;
                for (j, mask) in masks.iter_mut().enumerate() {
                    let lo = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(acc[2 * j], t0));
                    let hi = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(acc[2 * j + 1], t1));
                    let keep = if j < valid { 0xffff } else { 0 };
                    *mask = ((lo as u32) | ((hi as u32) << 8)) & keep;
                    any |= *mask;
                }
                if any != 0 {
                    // Rare once the lists fill: hand only the flagged scores to the lists. A
                    // threshold may have risen since the mask was taken, so it is tested again.
                    let mut scores = [0f32; 2 * TILE * 8];
                    for (j, v) in acc.iter().enumerate() {
                        _mm256_storeu_ps(scores.as_mut_ptr().add(8 * j), *v);
                    }
                    for (j, &mask) in masks.iter().enumerate() {
                        let row = r0 + j;
                        let mut m = mask;
                        while m != 0 {
                            let lane = m.trailing_zeros() as usize;
                            m &= m - 1;
                            let s = scores[j * PANEL + lane];
                            let l = lane0 + lane;
                            if s >= thresholds[l] && accept(q_first + l, row) {
                                thresholds[l] = found[l].push(s, row as u64);
                            }
                        }
                    }
                }
                r0 += TILE;
            }
        }
        c0 = c1;
    }
}

/// Scores of one tile: for each of the [`TILE`] rows, two vectors of 8 queries (row `j` is
/// `acc[2j]` for lanes 0-7 and `acc[2j+1]` for lanes 8-15).
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile(panel: *const f32, rows: &[*const f32; TILE], dim: usize) -> [__m256; 2 * TILE] {
    let [r0, r1, r2, r3, r4, r5] = *rows;
    let mut c = [_mm256_setzero_ps(); 2 * TILE];
    for k in 0..dim {
        let a0 = _mm256_load_ps(panel.add(k * PANEL));
        let a1 = _mm256_load_ps(panel.add(k * PANEL + 8));
        macro_rules! row {
            ($j:expr, $r:expr) => {
                let b = _mm256_broadcast_ss(&*$r.add(k));
                c[2 * $j] = _mm256_fmadd_ps(a0, b, c[2 * $j]);
                c[2 * $j + 1] = _mm256_fmadd_ps(a1, b, c[2 * $j + 1]);
            };
        }
        row!(0, r0);
        row!(1, r1);
        row!(2, r2);
        row!(3, r3);
        row!(4, r4);
        row!(5, r5);
    }
    c
}

/// [`tile`] over a tile-major copy ([`pack_rows`]): the six broadcasts of a step are adjacent.
/// Four steps per iteration, with a prefetch of the tile's data a few hundred bytes ahead (the
/// first panel to pass over a chunk brings it in from L3).
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile_packed(panel: *const f32, tile: *const f32, dim: usize) -> [__m256; 2 * TILE] {
    let mut c = [_mm256_setzero_ps(); 2 * TILE];
    macro_rules! step {
        ($k:expr) => {
            let a0 = _mm256_load_ps(panel.add($k * PANEL));
            let a1 = _mm256_load_ps(panel.add($k * PANEL + 8));
            let b = tile.add($k * TILE);
            macro_rules! row {
                ($j:expr) => {
                    let v = _mm256_broadcast_ss(&*b.add($j));
                    c[2 * $j] = _mm256_fmadd_ps(a0, v, c[2 * $j]);
                    c[2 * $j + 1] = _mm256_fmadd_ps(a1, v, c[2 * $j + 1]);
                };
            }
            row!(0);
            row!(1);
            row!(2);
            row!(3);
            row!(4);
            row!(5);
        };
    }
    let mut k = 0;
    while k + 4 <= dim {
        // A hint only: prefetching past the end of the tile data is harmless.
        _mm_prefetch::<_MM_HINT_T0>(tile.wrapping_add(k * TILE + 96) as *const i8);
        step!(k);
        step!(k + 1);
        step!(k + 2);
        step!(k + 3);
        k += 4;
    }
    while k < dim {
        step!(k);
        k += 1;
    }
    c
}
