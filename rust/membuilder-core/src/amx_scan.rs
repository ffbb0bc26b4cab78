//! Exact-search candidates on Intel AMX: bf16 tile products, admitted within a proven bound.
//!
//! The fused scans ([`crate::fused_scan`], [`crate::fused_scan512`]) compute every score in
//! float32, one FMA per dimension and query lane. AMX does a 16 x 16 block of dot products over
//! 32 dimensions in one instruction (`TDPBF16PS`: bf16 inputs, products exact in float32,
//! float32 accumulation), an order of magnitude more multiply-adds per cycle. Its scores are
//! those of the vectors rounded to bf16, so they are not the float32 ones; exactness is kept the
//! way the fused scans keep it across kernels, with a wider margin:
//!
//! - Every bank row `x` and query `q` is rounded to bf16 (nearest, ties to even; a value too
//!   small for a normal bf16 becomes zero), and the rounding's residuals `e = x - bf16(x)` and
//!   `r = q - bf16(q)` are exact in float32. Then `q.x - bf16(q).bf16(x) = bf16(q).e + r.x`, so by
//!   Cauchy-Schwarz the rounding moves a score by at most `|bf16(q)| E + |r| X`, where `E` and `X`
//!   are the largest `|e|` and `|x|` over the bank (measured when it is packed) and `|r|` is
//!   measured per query. The float32 accumulation of the `n` exact products adds at most
//!   `gamma(n) |bf16(q)| (X + E)` (Higham, eq. 3.5), and AMX's flushing of results below 2^-126
//!   at most `2 n 2^-126`. That is [`Bf16Queries::margin`]'s `A` for the query.
//! - The canonical kernel ([`crate::retrieval::dot`]) is within `C = gamma(n) |q| X` of the exact
//!   score, so a row of the canonical top k has an AMX score of at least `t - 2 (A + C)`, `t`
//!   being the k-th best AMX score (the argument of [`crate::retrieval::kernel_margin`]). Each
//!   query keeps every row within that margin of its k-th best, and the caller re-scores them
//!   with the canonical kernel: the result is the exact top k, identical to every other path.
//!
//! The margin is ~0.005 for unit vectors (|r| is ~2^-10 for a random rounding), about 40 times
//! the float32 kernels' at 384 dimensions: in `benches/bench_retrieval.py` a query re-scores ~16
//! rows instead of ~10, which costs far less than the float32 scan it replaces.
//!
//! Layout: the bank is copied once per version (kept by the bank like the float32 tile copy) in
//! blocks of 16 rows, each block holding, for every pair of dimensions, the 16 rows' two values
//! (AMX's "VNNI" layout for the right-hand tile), so the tile for 32 dimensions is 1 KiB in one
//! piece. Queries are rows of bf16, padded to 32 dimensions and 32 queries. One step computes a
//! 32 queries x 32 rows block in four accumulator tiles; its scores are stored and compared with
//! each query's admission threshold on AVX-512 (16 rows per compare).
//!
//! Linux asks each process to request the tile state before using it (`arch_prctl`), done once by
//! [`available`]; elsewhere, or where the request is refused, the kernel is not available.

use std::arch::asm;
use std::arch::x86_64::*;
use std::ops::Range;

use crate::topk::NearTop;

/// Rows of a tile: 16 queries (left tile) or 16 bank rows (right tile, as 16 value pairs).
pub(crate) const BLOCK: usize = 16;
/// Queries and rows of one step's block of four accumulator tiles.
pub(crate) const PAIR: usize = 2 * BLOCK;
/// bf16 values in one tile row (64 bytes): the dimensions one `TDPBF16PS` sums.
pub(crate) const STEP: usize = 32;
/// Bytes of bank rows per chunk: half of a 2 MiB L2. Each 32-query group of a task passes over a
/// chunk with its own tiles in L1, so the chunk is read from memory once per task.
const CHUNK_BYTES: usize = 1 << 20;
/// Queries per task of [`crate::retrieval`]'s split: each chunk read from memory serves this
/// many queries (a multiple of 32).
pub const QUERY_BLOCK: usize = 512;

/// Whether this CPU and operating system let this process run the kernel: AMX-BF16 and
/// AMX-TILE, AVX-512F for the comparisons, and the tile state granted (requested on first call).
pub fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| cpu_has_amx_bf16() && request_tile_state())
}

fn cpu_has_amx_bf16() -> bool {
    if !is_x86_feature_detected!("avx512f") || __cpuid(0).eax < 7 {
        return false;
    }
    let edx = __cpuid_count(7, 0).edx;
    // CPUID.(7,0).EDX bit 22: AMX-BF16, bit 24: AMX-TILE.
    edx & (1 << 22) != 0 && edx & (1 << 24) != 0
}

/// Ask Linux for this process's permission to use the AMX tile data (`ARCH_REQ_XCOMP_PERM` for
/// `XFEATURE_XTILEDATA`); true when granted. The permission holds for every thread of the
/// process and is inherited by forked children.
#[cfg(target_os = "linux")]
fn request_tile_state() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: the arch_prctl system call with these arguments only changes this process's
    // permitted extended state; rcx and r11 are clobbered by `syscall`.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

#[cfg(not(target_os = "linux"))]
fn request_tile_state() -> bool {
    false
}

/// `x` rounded to bf16 (nearest, ties to even); zeros and float32 subnormals become zero, so
/// that no bf16 subnormal reaches AMX (which would read it as zero). Inputs are finite and at
/// most 1 in magnitude here (normalised vectors), so rounding never overflows.
#[inline]
pub(crate) fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if b & 0x7f80_0000 == 0 {
        return ((b >> 16) & 0x8000) as u16;
    }
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

#[inline]
pub(crate) fn from_bf16(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// Round `src` into `dst` (bf16) and return `(|src|^2, |src - bf16(src)|^2)` in f64.
#[inline]
fn round_row(src: &[f32], mut dst: impl FnMut(usize, u16)) -> (f64, f64) {
    let (mut norm, mut err) = (0f64, 0f64);
    for (k, &x) in src.iter().enumerate() {
        let h = to_bf16(x);
        dst(k, h);
        // Exact in float32: the residual of rounding to fewer significant bits.
        let e = f64::from(x - from_bf16(h));
        norm += f64::from(x) * f64::from(x);
        err += e * e;
    }
    (norm, err)
}

/// `gamma(n) = n u / (1 - n u)` for float32 (u = 2^-24), with two extra terms of slack.
fn gamma(n: usize) -> f64 {
    let nu = (n + 2) as f64 * f64::from(f32::EPSILON) / 2.0;
    nu / (1.0 - nu)
}

/// A bank's rows `0..rows` rounded to bf16 in the tile layout (see the module documentation),
/// with what the admission bound needs to know of them.
pub struct Bf16Rows {
    data: Vec<u16>,
    rows: usize,
    dim: usize,
    /// `dim` rounded up to [`STEP`] (the padding is zeros, which add nothing).
    dim_p: usize,
    /// Largest `|x|` over the rows.
    max_norm: f64,
    /// Largest `|x - bf16(x)|` over the rows.
    max_err: f64,
}

impl Bf16Rows {
    /// Rows covered (`0..rows`).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Bytes a copy of `rows` rows of `dim` values holds (rows padded to a 32-row block pair,
    /// dimensions to a 32-value step).
    pub fn bytes_for(rows: usize, dim: usize) -> usize {
        padded_len(rows, dim) * 2
    }

    /// The packed values (blocks of 16 rows in the tile layout) and the padded dimension.
    pub(crate) fn packed(&self) -> (&[u16], usize) {
        (&self.data, self.dim_p)
    }
}

/// `dim` rounded up to [`STEP`] (at least one step).
pub(crate) fn padded_dim(dim: usize) -> usize {
    dim.div_ceil(STEP).max(1) * STEP
}

/// bf16 values in a copy of `rows` rows of `dim` values.
fn padded_len(rows: usize, dim: usize) -> usize {
    rows.div_ceil(PAIR) * PAIR * padded_dim(dim)
}

/// Blocks (of 16 rows) per parallel job of [`pack_rows`].
const JOB_BLOCKS: usize = 32;

/// Rows `0..rows` of `matrix` (row-major, `dim` columns) rounded to bf16 and laid out for
/// [`scan`]; blocks are filled in parallel when allowed.
pub fn pack_rows(matrix: &[f32], dim: usize, rows: usize) -> Bf16Rows {
    let dim_p = padded_dim(dim);
    let mut data = vec![0u16; padded_len(rows, dim)];
    // Jobs of JOB_BLOCKS blocks, each with the largest norms it saw.
    let per_job = JOB_BLOCKS * BLOCK * dim_p;
    let mut jobs: Vec<(&mut [u16], f64, f64)> =
        data.chunks_mut(per_job).map(|c| (c, 0.0, 0.0)).collect();
    crate::par::for_each_mut(&mut jobs, |job, (dst, max_norm, max_err)| {
        for (b, block) in dst.chunks_mut(BLOCK * dim_p).enumerate() {
            let r0 = (job * JOB_BLOCKS + b) * BLOCK;
            for j in 0..BLOCK.min(rows.saturating_sub(r0)) {
                let src = &matrix[(r0 + j) * dim..(r0 + j + 1) * dim];
                // Dimension k of row j sits in pair k / 2, slot k % 2.
                let (n, e) = round_row(src, |k, h| block[(k / 2 * BLOCK + j) * 2 + k % 2] = h);
                *max_norm = max_norm.max(n);
                *max_err = max_err.max(e);
            }
        }
    });
    let max_norm = jobs.iter().map(|j| j.1).fold(0.0, f64::max).sqrt();
    let max_err = jobs.iter().map(|j| j.2).fold(0.0, f64::max).sqrt();
    Bf16Rows {
        data,
        rows,
        dim,
        dim_p,
        max_norm,
        max_err,
    }
}

/// A batch of queries rounded to bf16 for one bank, with each query's admission margin.
pub struct Bf16Queries {
    data: Vec<u16>,
    margins: Vec<f32>,
    dim_p: usize,
}

impl Bf16Queries {
    /// How far below its k-th best AMX score query `q` must keep rows (see the module
    /// documentation: `2 (A + C)`, rounded up).
    pub fn margin(&self, q: usize) -> f32 {
        self.margins[q]
    }
}

/// Queries (row-major, `nq` x `bank.dim`) rounded to bf16 for [`scan`] over `bank`.
pub fn pack_queries(queries: &[f32], nq: usize, bank: &Bf16Rows) -> Bf16Queries {
    let (dim, dim_p) = (bank.dim, bank.dim_p);
    let mut data = vec![0u16; nq.div_ceil(PAIR) * PAIR * dim_p];
    let g = gamma(dim_p);
    let (big_x, big_e) = (bank.max_norm, bank.max_err);
    let underflow = 2.0 * dim_p as f64 * f64::from(f32::MIN_POSITIVE);
    let margins = (0..nq)
        .map(|q| {
            let dst = &mut data[q * dim_p..(q + 1) * dim_p];
            let src = &queries[q * dim..(q + 1) * dim];
            let (norm_sq, err_sq) = round_row(src, |k, h| dst[k] = h);
            let (norm, r) = (norm_sq.sqrt(), err_sq.sqrt());
            let rounded = norm + r; // |bf16(q)| <= |q| + |r|
            let a = rounded * big_e + r * big_x + g * rounded * (big_x + big_e) + underflow;
            let c = g * norm * big_x;
            // 1% of slack for the f64 arithmetic above, then rounded up to a float32.
            let m = (2.0 * (a + c) * 1.01) as f32;
            f32::from_bits(m.to_bits() + 1)
        })
        .collect();
    Bf16Queries {
        data,
        margins,
        dim_p,
    }
}

/// The tile configuration every scan loads: eight tiles of 16 rows x 64 bytes (palette 1).
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    const fn new() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64; // bytes per row (little-endian u16)
            c[48 + t] = BLOCK as u8; // rows
            t += 1;
        }
        TileConfig(c)
    }
}

static TILE_CONFIG: TileConfig = TileConfig::new();

/// Tiles configured for a scan on this thread; released (back to their initial state, so the
/// thread carries no tile data between scans) when dropped.
pub(crate) struct Tiles;

impl Tiles {
    /// # Safety
    /// [`available`] must be true.
    pub(crate) unsafe fn configure() -> Tiles {
        asm!("ldtilecfg [{}]", in(reg) TILE_CONFIG.0.as_ptr(), options(nostack, readonly));
        Tiles
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: only reachable after `configure`, on the same thread.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// One step's four accumulator tiles as stored: tile `2 h + g` holds queries `16 h ..` x rows
/// `16 g ..` of the block, one query per 16-float line.
#[repr(C, align(64))]
pub(crate) struct BlockScores(pub(crate) [f32; 4 * BLOCK * BLOCK]);

/// Scores of queries `a` (32 rows of `dim_p` bf16) with the 32 rows of the bank block at `b`
/// into `out`.
///
/// # Safety
/// Tiles configured ([`Tiles::configure`]); `a` holds 32 query rows and `b` two 16-row blocks.
#[inline]
pub(crate) unsafe fn block(a: *const u16, b: *const u16, dim_p: usize, out: &mut BlockScores) {
    let a_stride = dim_p * 2;
    let a1 = a.add(BLOCK * dim_p);
    let b1 = b.add(BLOCK * dim_p);
    asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        options(nostack, nomem)
    );
    for c in 0..dim_p / STEP {
        // Step c: dimensions 32c..32c+32, i.e. value pairs 16c.. of each bank block.
        asm!(
            "tileloadd tmm4, [{a0} + {sa}*1]",
            "tileloadd tmm5, [{a1} + {sa}*1]",
            "tileloadd tmm6, [{b0} + {sb}*1]",
            "tileloadd tmm7, [{b1} + {sb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a0 = in(reg) a.add(c * STEP),
            a1 = in(reg) a1.add(c * STEP),
            b0 = in(reg) b.add(c * STEP * BLOCK),
            b1 = in(reg) b1.add(c * STEP * BLOCK),
            sa = in(reg) a_stride,
            sb = in(reg) 64usize,
            options(nostack, readonly)
        );
    }
    let o = out.0.as_mut_ptr();
    asm!(
        "tilestored [{o0} + {s}*1], tmm0",
        "tilestored [{o1} + {s}*1], tmm1",
        "tilestored [{o2} + {s}*1], tmm2",
        "tilestored [{o3} + {s}*1], tmm3",
        o0 = in(reg) o,
        o1 = in(reg) o.add(BLOCK * BLOCK),
        o2 = in(reg) o.add(2 * BLOCK * BLOCK),
        o3 = in(reg) o.add(3 * BLOCK * BLOCK),
        s = in(reg) 64usize,
        options(nostack)
    );
}

/// Scan bank rows `rows` for queries `q0..q1` of `queries` (`q0` a multiple of 32), offering to
/// `found` (one list per query, in order) every row whose AMX score is at or above that list's
/// threshold and for which `accept(query, row)` holds. The lists must have been made with
/// [`Bf16Queries::margin`] as their margin.
///
/// # Safety
/// [`available`] must be true; `queries` packed for `bank`, `rows.end <= bank.rows()`,
/// `q1 <= ` the number of packed queries.
#[target_feature(enable = "avx512f")]
pub unsafe fn scan<F>(
    bank: &Bf16Rows,
    queries: &Bf16Queries,
    rows: Range<usize>,
    q0: usize,
    q1: usize,
    found: &mut [NearTop],
    accept: &F,
) where
    F: Fn(usize, usize) -> bool,
{
    debug_assert!(q0.is_multiple_of(PAIR) && q0 <= q1 && found.len() == q1 - q0);
    debug_assert!(rows.end <= bank.rows && queries.dim_p == bank.dim_p);
    debug_assert!(queries.data.len() >= q1.div_ceil(PAIR) * PAIR * bank.dim_p);
    if rows.start >= rows.end || q0 >= q1 {
        return;
    }
    let dim_p = bank.dim_p;
    let n_pairs = (q1 - q0).div_ceil(PAIR);
    // Admission thresholds per query, +inf on the padding queries of the last pair.
    let mut thresholds = vec![f32::INFINITY; n_pairs * PAIR];
    for (t, list) in thresholds.iter_mut().zip(found.iter()) {
        *t = list.threshold();
    }
    let _tiles = Tiles::configure();
    let mut out = BlockScores([0.0; 4 * BLOCK * BLOCK]);
    let chunk = (CHUNK_BYTES / (PAIR * dim_p * 2)).max(1) * PAIR;
    let mut c0 = rows.start / PAIR * PAIR;
    while c0 < rows.end {
        let c1 = (c0 + chunk).min(rows.end);
        // The next chunk is fetched into L2 while this one is scored, a few lines per block, so
        // that the first query group's pass over it does not wait on memory.
        let next_end = (c1 + chunk).min(rows.end).div_ceil(PAIR) * PAIR;
        let mut fetch = bank.data.as_ptr().add(c1 * dim_p) as *const i8;
        let fetch_end = bank.data.as_ptr().add(next_end.max(c1) * dim_p) as *const i8;
        let blocks = n_pairs * (c1 - c0).div_ceil(PAIR);
        let per_block = (fetch_end as usize - fetch as usize).div_ceil(64 * blocks.max(1));
        for p in 0..n_pairs {
            let a = queries.data.as_ptr().add((q0 + p * PAIR) * dim_p);
            let mut r0 = c0;
            while r0 < c1 {
                // The rows of this block inside `rows` (ranges need not start or end on a block).
                let lo = rows.start.saturating_sub(r0);
                let hi = (rows.end - r0).min(PAIR);
                let in_range: u32 = (u32::MAX >> (PAIR - hi)) & (u32::MAX << lo);
                let b = bank.data.as_ptr().add(r0 * dim_p);
                block(a, b, dim_p, &mut out);
                for _ in 0..per_block {
                    if fetch < fetch_end {
                        _mm_prefetch::<_MM_HINT_T1>(fetch);
                        fetch = fetch.add(64);
                    }
                }
                for h in 0..2 {
                    for i in 0..BLOCK {
                        let lane = p * PAIR + h * BLOCK + i;
                        let t = _mm512_set1_ps(thresholds[lane]);
                        let line0 = out.0.as_ptr().add((2 * h * BLOCK + i) * BLOCK);
                        let line1 = line0.add(BLOCK * BLOCK);
                        let m0 = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(_mm512_load_ps(line0), t) as u32;
                        let m1 = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(_mm512_load_ps(line1), t) as u32;
                        let mut m = (m0 | (m1 << 16)) & in_range;
                        while m != 0 {
                            let j = m.trailing_zeros() as usize;
                            m &= m - 1;
                            let s = if j < BLOCK {
                                *line0.add(j)
                            } else {
                                *line1.add(j - BLOCK)
                            };
                            let row = r0 + j;
                            // The threshold may have risen since the mask was taken.
                            if s >= thresholds[lane] && accept(q0 + lane, row) {
                                thresholds[lane] = found[lane].push(s, row as u64);
                            }
                        }
                    }
                }
                r0 += PAIR;
            }
        }
        c0 = c1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_is_to_nearest_even_and_flushes_subnormals() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to the even one, 1.
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6: up.
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(to_bf16(-0.5), 0xbf00);
        assert_eq!(to_bf16(f32::from_bits(1)), 0);
        assert_eq!(to_bf16(-f32::from_bits(0x007f_ffff)), 0x8000);
        for x in [0.1f32, -0.3, 0.6543, 1e-30] {
            let e = (x - from_bf16(to_bf16(x))).abs();
            assert!(e <= x.abs() / 256.0, "{x}: {e}");
        }
    }

    #[test]
    fn tile_config_names_eight_full_tiles() {
        let c = &TILE_CONFIG.0;
        assert_eq!(c[0], 1);
        for t in 0..8 {
            assert_eq!(u16::from_le_bytes([c[16 + 2 * t], c[17 + 2 * t]]), 64);
            assert_eq!(c[48 + t], 16);
        }
    }
}
