//! The AVX-512 variant of [`crate::fused_scan`]: the same score-and-select scan on 16-lane
//! registers, chosen at run time where the CPU has AVX-512F (see [`crate::retrieval::ExactKernel`]).
//!
//! With 32 vector registers the register tile grows to 32 queries x 12 rows: two panel lines
//! (two 16-query panels) and twelve broadcasts feed 24 FMAs per dimension, twice the queries per
//! instruction of the AVX2 tile and more FMAs per load. It reads the very same inputs as the AVX2
//! kernel: the query panels of [`crate::fused_scan::pack_into`] (a pair of adjacent panels per
//! tile) and either the bank's matrix or the 6-row tile-major copy of
//! [`crate::fused_scan::pack_rows`] (two adjacent 6-row tiles per 12-row tile), so a bank's cached
//! copy serves both kernels.
//!
//! Each lane still sums its query's products with its row in dimension order, one FMA at a time,
//! so this kernel's scores are bit-identical to the AVX2 kernel's, and the proven margin of
//! [`crate::retrieval::kernel_margin`] covers them in the same way.

use std::arch::x86_64::*;
use std::ops::Range;

use crate::fused_scan::{chunk_rows, debug_check_scan_args, Line, Rows, PANEL, TILE};
use crate::topk::NearTop;

/// Queries per register tile: two panels.
const QUERIES: usize = 2 * PANEL;
/// Rows per register tile: two tile-major tiles (24 accumulators, 26 registers with the two
/// query vectors, of 32).
const ROWS: usize = 2 * TILE;

/// Whether this CPU can run the kernel (the result is cached by the standard library).
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f")
}

/// [`crate::fused_scan::scan`] on AVX-512: same arguments, same contract, same offers.
///
/// # Safety
/// The CPU must support AVX-512F ([`available`]); the other requirements are those of
/// [`crate::fused_scan::scan`].
#[target_feature(enable = "avx512f")]
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
    // Admission thresholds per lane, +inf on padding lanes (including the missing second panel
    // of an odd panel count, so its duplicate scores never pass).
    let mut thresholds = vec![f32::INFINITY; n_panels.div_ceil(2) * QUERIES];
    for (t, list) in thresholds.iter_mut().zip(found.iter()) {
        *t = list.threshold();
    }
    // Chunks of whole 12-row tiles, so that only a range's last tile can be partial.
    let chunk = chunk_rows(dim).div_ceil(ROWS) * ROWS;
    let mut c0 = rows.start;
    while c0 < rows.end {
        let c1 = (c0 + chunk).min(rows.end);
        for p in (0..n_panels).step_by(2) {
            let a0 = packed.as_ptr().add((panels.start + p) * dim) as *const f32;
            // An odd last panel is paired with itself; its second half is never admitted.
            let a1 = if p + 1 < n_panels {
                packed.as_ptr().add((panels.start + p + 1) * dim) as *const f32
            } else {
                a0
            };
            let lane0 = p * PANEL;
            let mut r0 = c0;
            while r0 < c1 {
                let valid = (c1 - r0).min(ROWS);
                let acc = match source {
                    Rows::Tiles { tiles, first } => {
                        let b0 = tiles.as_ptr().add((r0 - first) * dim);
                        // The second tile exists only when rows of it are in range.
                        let b1 = if valid > TILE { b0.add(TILE * dim) } else { b0 };
                        tile_packed(a0, a1, b0, b1, dim)
                    }
                    Rows::Matrix(m) => {
                        // Rows past the end of the chunk repeat its last row; their scores are
                        // ignored.
                        let mut ptrs = [m.as_ptr(); ROWS];
                        for (j, ptr) in ptrs.iter_mut().enumerate() {
                            *ptr = m.as_ptr().add((r0 + j.min(valid - 1)) * dim);
                        }
                        tile(a0, a1, &ptrs, dim)
                    }
                };
                let t0 = _mm512_loadu_ps(thresholds.as_ptr().add(lane0));
                let t1 = _mm512_loadu_ps(thresholds.as_ptr().add(lane0 + PANEL));
                // Per row, a 32-bit mask of the lanes at or above their threshold; rows past
                // `valid` are masked off.
                let mut masks = [0u32; ROWS];
                let mut any = 0u32;
                for (j, mask) in masks.iter_mut().enumerate() {
                    let lo = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(acc[2 * j], t0) as u32;
                    let hi = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(acc[2 * j + 1], t1) as u32;
                    let keep = if j < valid { u32::MAX } else { 0 };
                    *mask = (lo | (hi << 16)) & keep;
                    any |= *mask;
                }
                if any != 0 {
                    // Rare once the lists fill; a threshold may have risen since the mask was
                    // taken, so it is tested again.
                    let mut scores = [0f32; ROWS * QUERIES];
                    for (j, v) in acc.iter().enumerate() {
                        _mm512_storeu_ps(scores.as_mut_ptr().add(PANEL * j), *v);
                    }
                    for (j, &mask) in masks.iter().enumerate() {
                        let row = r0 + j;
                        let mut m = mask;
                        while m != 0 {
                            let lane = m.trailing_zeros() as usize;
                            m &= m - 1;
                            let s = scores[j * QUERIES + lane];
                            let l = lane0 + lane;
                            if s >= thresholds[l] && accept(q_first + l, row) {
                                thresholds[l] = found[l].push(s, row as u64);
                            }
                        }
                    }
                }
                r0 += ROWS;
            }
        }
        c0 = c1;
    }
}

/// Scores of one 32 x 12 tile over the matrix: row `j` is `acc[2j]` for the first panel's 16
/// queries and `acc[2j+1]` for the second's.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile(
    a0: *const f32,
    a1: *const f32,
    rows: &[*const f32; ROWS],
    dim: usize,
) -> [__m512; 2 * ROWS] {
    let mut c = [_mm512_setzero_ps(); 2 * ROWS];
    for k in 0..dim {
        let x0 = _mm512_load_ps(a0.add(k * PANEL));
        let x1 = _mm512_load_ps(a1.add(k * PANEL));
        for (j, r) in rows.iter().enumerate() {
            let b = _mm512_set1_ps(*r.add(k));
            c[2 * j] = _mm512_fmadd_ps(x0, b, c[2 * j]);
            c[2 * j + 1] = _mm512_fmadd_ps(x1, b, c[2 * j + 1]);
        }
    }
    c
}

/// [`tile`] over the tile-major copy: rows 0-5 from the tile at `b0`, rows 6-11 from the one at
/// `b1`. Four steps per iteration, with a prefetch of both tiles' data a few hundred bytes ahead.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile_packed(
    a0: *const f32,
    a1: *const f32,
    b0: *const f32,
    b1: *const f32,
    dim: usize,
) -> [__m512; 2 * ROWS] {
    let mut c = [_mm512_setzero_ps(); 2 * ROWS];
    macro_rules! step {
        ($k:expr) => {
            let x0 = _mm512_load_ps(a0.add($k * PANEL));
            let x1 = _mm512_load_ps(a1.add($k * PANEL));
            let p = b0.add($k * TILE);
            let q = b1.add($k * TILE);
            macro_rules! row {
                ($j:expr, $src:expr) => {
                    let v = _mm512_set1_ps(*$src);
                    c[2 * $j] = _mm512_fmadd_ps(x0, v, c[2 * $j]);
                    c[2 * $j + 1] = _mm512_fmadd_ps(x1, v, c[2 * $j + 1]);
                };
            }
            row!(0, p);
            row!(1, p.add(1));
            row!(2, p.add(2));
            row!(3, p.add(3));
            row!(4, p.add(4));
            row!(5, p.add(5));
            row!(6, q);
            row!(7, q.add(1));
            row!(8, q.add(2));
            row!(9, q.add(3));
            row!(10, q.add(4));
            row!(11, q.add(5));
        };
    }
    let mut k = 0;
    while k + 4 <= dim {
        // Hints only: prefetching past the end of the tile data is harmless.
        _mm_prefetch::<_MM_HINT_T0>(b0.wrapping_add(k * TILE + 96) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(b1.wrapping_add(k * TILE + 96) as *const i8);
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
