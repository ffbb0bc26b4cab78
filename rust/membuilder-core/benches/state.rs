//! Criterion benches of the state's hot paths (no Python): batched exact search, view creation,
//! and one session applied to a view. The Python-level comparisons with faiss, numpy and usearch
//! are in the repository's `benches/` (pytest-benchmark).
//!
//!     cargo bench -p membuilder-core --bench state

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use membuilder_core::kinds::{Action, Agent, BankKind, Op};
use membuilder_core::{cpu, retrieval};
use membuilder_core::{MemoryState, Provenance, StateConfig, Store, UpdateMode};

const DIM: usize = 384;

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n * DIM)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

fn state(n: usize) -> MemoryState {
    let mut cfg = StateConfig::new(DIM);
    cfg.update_mode = UpdateMode::Replace;
    cfg.exact_search_limit = usize::MAX;
    let mut st = MemoryState::new(cfg).unwrap();
    let texts: Vec<String> = (0..n).map(|i| format!("fact {i}")).collect();
    let provs = vec![Provenance::default(); n];
    st.add_entries(BankKind::Semantic, &texts, &random(n, 1), &provs)
        .unwrap();
    st
}

fn bench(c: &mut Criterion) {
    // Say what this ran on: the CPU and each exact-search kernel it can run (benched in turn).
    let kernels = retrieval::available_exact_kernels();
    eprintln!(
        "CPU: {} ({}); exact-search kernels: {} (default {}); re-scoring: {}",
        cpu::model(),
        cpu::features().join(" "),
        kernels
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(", "),
        retrieval::exact_kernel().name(),
        retrieval::dot_path()
    );
    let st = state(10_000);
    let queries = random(1000, 2);
    for kernel in kernels {
        retrieval::set_exact_kernel(Some(kernel)).unwrap();
        let name = format!(
            "exact search 1000 queries x 10k x 384, top-10 ({})",
            kernel.name()
        );
        c.bench_function(&name, |b| {
            b.iter(|| black_box(st.search(&queries, 10, None).unwrap()))
        });
    }
    retrieval::set_exact_kernel(None).unwrap();
    c.bench_function("create 1000 views of a 10k state", |b| {
        b.iter(|| black_box((0..1000).map(|_| st.view()).collect::<Vec<_>>()))
    });
    let actions = vec![
        Action {
            agent: Agent::Semantic,
            op: Op::Add,
            text: Some("new fact".into()),
            old: vec![],
            reason: None,
        },
        Action {
            agent: Agent::Semantic,
            op: Op::Update,
            text: Some("fact 3 revised".into()),
            old: vec!["fact 3".into()],
            reason: None,
        },
        Action {
            agent: Agent::Core,
            op: Op::Append,
            text: Some("Ana.".into()),
            old: vec![],
            reason: None,
        },
    ];
    let vecs = random(2, 3);
    c.bench_function("view + plan + commit one session (10k base)", |b| {
        b.iter(|| {
            let mut v = st.view();
            let p = v.plan(&actions, Provenance::default()).unwrap();
            black_box(v.commit(&p, &vecs).unwrap())
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
