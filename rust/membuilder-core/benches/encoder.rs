//! Criterion benches of the encoder (no Python): its dense products on AMX tiles, one shape per
//! linear layer of multilingual-e5-small, and the whole forward pass on random weights of that
//! size for short texts (memories, ~55 tokens) and long ones (LongMemEval turns, ~256 tokens).
//! The comparison with the other e5 engines on real texts is `benches/bench_embed.py`.
//!
//!     cargo bench -p membuilder-core --bench encoder
//!     RAYON_NUM_THREADS=1 cargo bench -p membuilder-core --bench encoder    # one core

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use membuilder_core::encoder::{Encoder, LayerWeights, Precision, Shape};
use membuilder_core::{amx_gemm, cpu};

const HIDDEN: usize = 384;
const FFN: usize = 1536;
const LAYERS: usize = 12;
/// Tokens per product: a batch of ~40 memory texts.
const ROWS: usize = 2048;

fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
        })
        .collect()
}

fn products(c: &mut Criterion) {
    if !amx_gemm::available() {
        eprintln!("no AMX here: the bf16 products are not benched");
        return;
    }
    let mut group = c.benchmark_group("amx product, 2048 rows");
    // (name, input width k, outputs n): the four linear layers of one e5 layer.
    for (name, k, n) in [
        ("qkv 384->1152", HIDDEN, 3 * HIDDEN),
        ("attention out 384->384", HIDDEN, HIDDEN),
        ("ffn in 384->1536 (gelu, bf16 out)", HIDDEN, FFN),
        ("ffn out 1536->384", FFN, HIDDEN),
    ] {
        let w = amx_gemm::pack_weights(&random(n * k, 1, 0.1), n, k);
        let bias = random(n, 2, 0.1);
        let mut a = Vec::new();
        amx_gemm::pack_activations(&random(ROWS * k, 3, 1.0), ROWS, k, &mut a);
        group.throughput(Throughput::Elements((ROWS * k * n) as u64)); // multiply-adds
        if n == FFN {
            let stride = amx_gemm::padded_width(n);
            let mut out = vec![0u16; amx_gemm::padded_rows(ROWS) * stride];
            group.bench_function(name, |b| {
                // SAFETY: AMX available; `a` packed for ROWS rows of width k; `out` sized above.
                b.iter(|| unsafe {
                    amx_gemm::matmul::<amx_gemm::GeluBf16>(&a, ROWS, &w, &bias, &mut out, stride)
                })
            });
        } else {
            let mut out = vec![0f32; ROWS * n];
            group.bench_function(name, |b| {
                // SAFETY: as above.
                b.iter(|| unsafe {
                    amx_gemm::matmul::<amx_gemm::Plain>(&a, ROWS, &w, &bias, &mut out, n)
                })
            });
        }
    }
    group.finish();
}

fn forward(c: &mut Criterion) {
    let shape = Shape {
        hidden: HIDDEN,
        heads: 12,
        ffn: FFN,
        eps: 1e-12,
    };
    let h = HIDDEN;
    let owned: Vec<[Vec<f32>; 12]> = (0..LAYERS as u64)
        .map(|l| {
            let s = 100 * (l + 1);
            [
                random(3 * h * h, s, 0.1),
                random(3 * h, s + 1, 0.1),
                random(h * h, s + 2, 0.1),
                random(h, s + 3, 0.1),
                vec![1.0; h],
                vec![0.0; h],
                random(FFN * h, s + 4, 0.1),
                random(FFN, s + 5, 0.1),
                random(h * FFN, s + 6, 0.05),
                random(h, s + 7, 0.1),
                vec![1.0; h],
                vec![0.0; h],
            ]
        })
        .collect();
    let layers: Vec<LayerWeights<'_>> = owned
        .iter()
        .map(|w| LayerWeights::from_ordered(std::array::from_fn(|i| w[i].as_slice())))
        .collect();
    let (ln_w, ln_b) = (vec![1.0; h], vec![0.0; h]);
    let mut precisions = vec![Precision::F32];
    if Precision::best_here() == Precision::Bf16 {
        precisions.push(Precision::Bf16);
    }
    for precision in precisions {
        let enc = Encoder::new(shape, Some(precision), &ln_w, &ln_b, &layers).unwrap();
        eprintln!("CPU: {}; encoder path: {}", cpu::model(), enc.path());
        let mut group = c.benchmark_group(format!("encoder forward ({})", precision.name()));
        group.sample_size(10);
        for (name, len, count) in [
            ("40 texts x 55 tokens", 55, 40),
            ("8 texts x 256 tokens", 256, 8),
        ] {
            let lengths = vec![len; count];
            let x = random(len * count * h, 9, 1.0);
            group.throughput(Throughput::Elements((len * count) as u64)); // tokens
            group.bench_function(name, |b| {
                b.iter(|| {
                    let mut x = x.clone();
                    black_box(enc.encode(&mut x, &lengths).unwrap())
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, products, forward);
criterion_main!(benches);
