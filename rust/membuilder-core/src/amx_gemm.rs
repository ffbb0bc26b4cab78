//! Dense matrix products on Intel AMX tiles, for the encoder's linear layers ([`crate::encoder`]).
//!
//! `out = bf16(x) . bf16(W)^T + bias`: the same tile step as exact search ([`crate::amx_scan`]),
//! whose bank layout is exactly a weight matrix's (one row per output feature), but every score
//! is kept instead of filtered. Products of two bf16 values are exact in float32 and the sums are
//! float32, so the result differs from the float32 product only by rounding the two inputs to
//! bf16 (8 significant bits); the encoder keeps everything else (residuals, LayerNorm,
//! attention, GELU) in float32.
//!
//! Work is split by panels of 32 input rows; a panel's tiles stay in L1 while it passes over the
//! whole weight matrix (at most 1.2 MiB in bf16 for multilingual-e5-small, within L2).

use crate::amx_scan::{self, block, to_bf16, Bf16Rows, BlockScores, Tiles, BLOCK, PAIR};

/// Whether [`matmul`] can run here (see [`amx_scan::available`]).
pub fn available() -> bool {
    amx_scan::available()
}

/// Values per row of a packed input of `k` columns (`k` rounded up to 32).
pub fn padded_width(k: usize) -> usize {
    amx_scan::padded_dim(k)
}

/// Rows of a packed input of `m` rows (`m` rounded up to 32).
pub fn padded_rows(m: usize) -> usize {
    m.div_ceil(PAIR) * PAIR
}

/// A weight matrix (`n` output rows of `k` values, row-major as stored) rounded to bf16 in the
/// tile layout.
pub fn pack_weights(w: &[f32], n: usize, k: usize) -> Bf16Rows {
    amx_scan::pack_rows(w, k, n)
}

/// Rows of `x` (`m` x `k`, row-major) rounded to bf16 into `dst`, one row per `k` rounded up
/// to 32 values, the row count rounded up to 32. Padding columns are zero; padding rows are left
/// as they were (they only reach output rows that [`matmul`] never writes).
pub fn pack_activations(x: &[f32], m: usize, k: usize, dst: &mut Vec<u16>) {
    let k_p = padded_width(k);
    dst.resize(padded_rows(m) * k_p, 0);
    let per_job = 64;
    let mut jobs: Vec<&mut [u16]> = dst[..m * k_p].chunks_mut(per_job * k_p).collect();
    crate::par::for_each_mut(&mut jobs, |j, out| {
        for (i, row) in out.chunks_mut(k_p).enumerate() {
            let r = j * per_job + i;
            round_into(&x[r * k..(r + 1) * k], row);
        }
    });
}

crate::simd::dispatch! {
    /// `dst[i] = bf16(src[i])`, zeros after `src`'s end (vectorised; the rounding is integer
    /// arithmetic, branch-free).
    fn round_into(src: &[f32], dst: &mut [u16]) {
        let (head, tail) = dst.split_at_mut(src.len());
        for (d, &s) in head.iter_mut().zip(src) {
            *d = to_bf16(s);
        }
        tail.fill(0);
    }
}

/// What [`matmul`] does with each result before storing it.
pub trait Epilogue: Sync {
    /// The stored element.
    type Out: Copy + Send;
    /// `dst[j] = f(acc[j] + bias[j])` for the `dst.len()` columns of one output row.
    fn store(acc: &[f32], bias: &[f32], dst: &mut [Self::Out]);
}

/// `out = acc + bias`, float32.
pub struct Plain;

impl Epilogue for Plain {
    type Out = f32;
    #[inline(always)]
    fn store(acc: &[f32], bias: &[f32], dst: &mut [f32]) {
        for ((d, a), b) in dst.iter_mut().zip(acc).zip(bias) {
            *d = a + b;
        }
    }
}

/// `out = bf16(gelu(acc + bias))`: the FFN's hidden activations, stored directly as the next
/// product's packed input (no float32 copy of the widest matrix is ever written).
pub struct GeluBf16;

impl Epilogue for GeluBf16 {
    type Out = u16;
    #[inline(always)]
    fn store(acc: &[f32], bias: &[f32], dst: &mut [u16]) {
        for ((d, a), b) in dst.iter_mut().zip(acc).zip(bias) {
            *d = to_bf16(crate::encoder::gelu_one(a + b));
        }
    }
}

/// `out` (`m` rows of `out_stride` elements) `= E(a . w^T + bias)` in its first `w.rows()`
/// columns, `a` packed by [`pack_activations`] for `m` rows of `w`'s width. The other columns
/// of `out` are left as they were.
///
/// # Safety
/// [`available`] must be true; `a` packed for `m` rows and `w`'s width;
/// `out.len() >= m * out_stride`, `out_stride >= w.rows()`, `bias.len() == w.rows()`.
pub unsafe fn matmul<E: Epilogue>(
    a: &[u16],
    m: usize,
    w: &Bf16Rows,
    bias: &[f32],
    out: &mut [E::Out],
    out_stride: usize,
) {
    let n = w.rows();
    let (_, k_p) = w.packed();
    debug_assert!(out.len() >= m * out_stride && out_stride >= n && bias.len() == n);
    debug_assert!(a.len() >= padded_rows(m) * k_p);
    let panels = m.div_ceil(PAIR);
    // At least a few panels per task (each configures its tiles), and every thread busy.
    let per_task = panels.div_ceil(crate::par::threads() * 4).max(2);
    let mut jobs: Vec<&mut [E::Out]> = out[..m * out_stride]
        .chunks_mut(per_task * PAIR * out_stride)
        .collect();
    crate::par::for_each_mut(&mut jobs, |job, dst| {
        // SAFETY: as the caller guarantees.
        unsafe { panels_of::<E>(a, job * per_task * PAIR, w, bias, dst, out_stride) }
    });
}

/// The panels of 32 rows from row `r_first` whose outputs are `dst` (whole rows of
/// `out_stride`), on this thread.
#[target_feature(enable = "avx512f")]
unsafe fn panels_of<E: Epilogue>(
    a: &[u16],
    r_first: usize,
    w: &Bf16Rows,
    bias: &[f32],
    dst: &mut [E::Out],
    out_stride: usize,
) {
    let n = w.rows();
    let (wd, k_p) = w.packed();
    let _tiles = Tiles::configure();
    let mut scores = BlockScores([0.0; 4 * BLOCK * BLOCK]);
    let mut line = [0f32; PAIR];
    let rows_here = dst.len() / out_stride;
    for p in 0..rows_here.div_ceil(PAIR) {
        let pa = a.as_ptr().add((r_first + p * PAIR) * k_p);
        let valid = (rows_here - p * PAIR).min(PAIR);
        for c0 in (0..n).step_by(PAIR) {
            block(pa, wd.as_ptr().add(c0 * k_p), k_p, &mut scores);
            let cols = (n - c0).min(PAIR);
            // Tile 2h + g holds rows 16h.. x columns 16g.., one row per 16 floats.
            for i in 0..valid {
                let (h, ii) = (i / BLOCK, i % BLOCK);
                let t0 = (2 * h * BLOCK + ii) * BLOCK;
                line[..BLOCK].copy_from_slice(&scores.0[t0..t0 + BLOCK]);
                let t1 = t0 + BLOCK * BLOCK;
                line[BLOCK..].copy_from_slice(&scores.0[t1..t1 + BLOCK]);
                let at = (p * PAIR + i) * out_stride + c0;
                E::store(&line[..cols], &bias[c0..c0 + cols], &mut dst[at..at + cols]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_gives_the_same_bits_at_every_vector_width() {
        let src: Vec<f32> = (0..1000u32)
            .map(|i| f32::from_bits(0x0000_1234u32.wrapping_mul(i.wrapping_mul(2_654_435_761))))
            .filter(|x| x.is_finite())
            .collect();
        let mut results = Vec::new();
        crate::simd::at_every_level(|_| {
            let mut dst = vec![7u16; src.len() + 5];
            round_into(&src, &mut dst);
            results.push(dst);
        });
        let want: Vec<u16> = src.iter().map(|&x| to_bf16(x)).chain([0; 5]).collect();
        assert!(results.iter().all(|r| *r == want));
    }

    #[test]
    fn matmul_is_the_product_of_the_rounded_inputs() {
        if !available() {
            eprintln!("skipped: no AMX here");
            return;
        }
        let mut seed = 7u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        for &(m, k, n) in &[
            (1, 1, 1),
            (5, 40, 17),
            (33, 64, 32),
            (70, 384, 96),
            (31, 100, 65),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| next()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| next()).collect();
            let bias: Vec<f32> = (0..n).map(|_| next()).collect();
            let packed = pack_weights(&w, n, k);
            let mut a = Vec::new();
            pack_activations(&x, m, k, &mut a);
            let mut out = vec![f32::NAN; m * n];
            unsafe { matmul::<Plain>(&a, m, &packed, &bias, &mut out, n) };
            let r = |v: f32| f64::from(amx_scan::from_bf16(to_bf16(v)));
            for i in 0..m {
                for j in 0..n {
                    let exact: f64 = (0..k)
                        .map(|t| r(x[i * k + t]) * r(w[j * k + t]))
                        .sum::<f64>()
                        + f64::from(bias[j]);
                    let got = f64::from(out[i * n + j]);
                    // float32 accumulation of k exact products of values below 0.5
                    let tol = 1e-6 * (k as f64 + 2.0);
                    assert!(
                        (got - exact).abs() <= tol,
                        "m{m} k{k} n{n} [{i},{j}]: {got} vs {exact}"
                    );
                }
            }
        }
    }
}
