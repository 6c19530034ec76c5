//! The pool's one-token GEMV on cold weights (cycling through more matrices than the LLC), on N
//! threads: GB/s of weights per round, best and median of the rounds. For A/B runs of two builds on
//! a shared machine (alternate them). Usage: cargo run --release --example pool_cold -- M K THREADS [ROUNDS]
use std::hint::black_box;
use std::time::Instant;

use _ternary::format::TernaryShape;
use _ternary::kernels::active_isa;
use _ternary::topology::Topology;
use _ternary::{place_ternary, ternary_matmul, Pool};

fn main() {
    let a: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (m, k, threads) = (a[0], a[1], a[2]);
    let rounds = a.get(3).copied().unwrap_or(9);
    let isa = active_isa().expect("isa");
    let pool = Pool::new(threads, &Topology::detect()).expect("pool");
    let shape = TernaryShape { rows: m, cols: k, group_size: 128 };
    // 640 MB of weights: more than any LLC here (the Xeon host has 300 MiB)
    let count = (640 << 20) / (m * k / 4) + 1;
    let codes: Vec<i8> = (0..m * k).map(|i| ((i * 7919 + i / 3) % 3) as i8 - 1).collect();
    let scales = vec![0.01; m * shape.groups()];
    let mats: Vec<_> = (0..count).map(|_| place_ternary(&codes, &scales, shape, &pool).expect("matrix")).collect();
    let x: Vec<f32> = (0..k).map(|i| ((i * 31) % 200) as f32 / 100.0 - 1.0).collect();
    let bytes: f64 = mats.iter().map(|m| m.nbytes()).sum::<usize>() as f64;
    let mut rates: Vec<f64> = (0..rounds)
        .map(|_| {
            let t = Instant::now();
            for mat in &mats {
                black_box(ternary_matmul(mat, &x, 1, isa, &pool).expect("gemv"));
            }
            bytes / t.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    println!(
        "{m}x{k} t{threads} cold GEMV, {count} matrices, {rounds} rounds: best {:.1} GB/s, median {:.1} GB/s",
        rates[rounds - 1],
        rates[rounds / 2]
    );
}
