//! Best-of-N GOPS of one shape for every path (robust to a busy machine: the minimum time is the
//! run that was not preempted). Usage: cargo run --release --example quick_gops -- M K TOKENS [THREADS]
use std::time::Instant;

use _ternary::format::TernaryShape;
use _ternary::kernels::ALL_ISAS;
use _ternary::topology::Topology;
use _ternary::{place_ternary, ternary_matmul, Pool};

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (m, k, tokens) = (
        args.first().copied().unwrap_or(2048),
        args.get(1).copied().unwrap_or(2048),
        args.get(2).copied().unwrap_or(1),
    );
    let threads = args.get(3).copied().unwrap_or(1);
    let pool = Pool::new(threads, &Topology::detect()).expect("pool");
    let shape = TernaryShape { rows: m, cols: k, group_size: 128 };
    let mut seed = 12345u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let codes: Vec<i8> = (0..m * k).map(|_| (next() % 3) as i8 - 1).collect();
    let scales: Vec<f32> = (0..m * shape.groups()).map(|_| 0.01).collect();
    let x: Vec<f32> = (0..tokens * k).map(|_| (next() % 2001) as f32 / 1000.0 - 1.0).collect();
    let mat = place_ternary(&codes, &scales, shape, &pool).expect("matrix");
    for isa in ALL_ISAS.into_iter().filter(|i| i.available()) {
        let reps = if isa.name() == "scalar" { 5 } else { 200 };
        let mut best = f64::MAX;
        for _ in 0..reps {
            let t = Instant::now();
            std::hint::black_box(ternary_matmul(&mat, &x, tokens, isa, &pool).expect("run"));
            best = best.min(t.elapsed().as_secs_f64());
        }
        // The kernel alone (no activation quantization, allocation or gather), on the first part.
        let acts = _ternary::act::TernaryActs::for_isa(&x, tokens, shape, isa);
        let part = &mat.parts[0];
        let ldo = part.tiles * 4;
        let mut out = vec![0f32; tokens * ldo];
        let mut kbest = f64::MAX;
        for _ in 0..reps {
            let t = Instant::now();
            _ternary::kernels::ternary(isa, &shape, part.codes.bytes(), part.scales.f32s(), &acts, &mut out, ldo);
            kbest = kbest.min(t.elapsed().as_secs_f64());
        }
        let kops = 2.0 * (part.tiles * 4 * k * tokens) as f64;
        println!(
            "{:<11} {m}x{k} T{tokens} t{threads}: {:8.1} us  {:6.1} GOPS   (kernel alone {:6.1} GOPS)",
            isa.name(),
            best * 1e6,
            2.0 * (m * k * tokens) as f64 / best / 1e9,
            kops / kbest / 1e9
        );
    }
    // The table-lookup experiment (kernels/lut.rs) on the same matrix, one token, tables built per call.
    if tokens == 1 && _ternary::kernels::Isa::Avx512Bw.available() {
        if let Some(lut) = _ternary::kernels::lut::LutMatrix::new(&codes, &scales, m, k) {
            let acts = _ternary::act::TernaryActs::new(&x, 1, shape);
            let q = &acts.q.i8s()[..k];
            let mut out = vec![0f32; m];
            let mut best = f64::MAX;
            for _ in 0..200 {
                let t = Instant::now();
                _ternary::kernels::lut::gemv(&lut, q, acts.s[0], &mut out);
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!(
                "lut-pshufb  {m}x{k} T1 t1: {:8.1} us  {:6.1} GOPS   (kernel + tables, avx512bw)",
                best * 1e6,
                2.0 * (m * k) as f64 / best / 1e9
            );
        }
    }
}
