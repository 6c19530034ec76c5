//! Best-of-N GOPS of the int8 head kernel for every path.
//! Usage: cargo run --release --example quick_int8 -- M K TOKENS
use std::time::Instant;

use _ternary::kernels::ALL_ISAS;
use _ternary::pack::{Int8Shape, PackedInt8};
use _ternary::topology::Topology;
use _ternary::{int8_matmul, Pool};

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (m, k, tokens) =
        (args.first().copied().unwrap_or(4096), args.get(1).copied().unwrap_or(768), args.get(2).copied().unwrap_or(1));
    let pool = Pool::new(1, &Topology::detect()).expect("pool");
    let w: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0).collect();
    let (q, s) = PackedInt8::quantize_f32(&w, m, k).expect("quantize");
    let mat = PackedInt8::new(&q, &s, Int8Shape { rows: m, cols: k }).expect("int8");
    let x: Vec<f32> = (0..tokens * k).map(|i| ((i * 31) % 200) as f32 / 100.0 - 1.0).collect();
    for isa in ALL_ISAS.into_iter().filter(|i| i.available()) {
        let mut best = f64::MAX;
        for _ in 0..100 {
            let t = Instant::now();
            std::hint::black_box(int8_matmul(&mat, &x, tokens, isa, &pool).expect("run"));
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "{:<11} int8 {m}x{k} T{tokens}: {:8.1} us {:6.1} GOPS",
            isa.name(),
            best * 1e6,
            2.0 * (m * k * tokens) as f64 / best / 1e9
        );
    }
}
