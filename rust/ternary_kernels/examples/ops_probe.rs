//! The engine's entry point (`ops::ternary_matmul`, work-stealing) on the nano-125m shapes, 1 and 2
//! threads, against the kernel alone, from inside rayon's pool as the decode step calls it.
//! Usage: cargo run --release --example ops_probe -- [TOKENS]
//! GAP_US=100 spins that long between calls (serial work, during which an idle worker falls asleep).
use std::time::Instant;

use _ternary::act::TernaryActs;
use _ternary::format::TernaryShape;
use _ternary::kernels::{self, active_isa};
use _ternary::{ops, PackedTernary};

const REPS: usize = 300;

fn main() {
    let tokens = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(8);
    let gap_us: u128 = std::env::var("GAP_US").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let isa = active_isa().expect("isa");
    for (m, k) in [(1280usize, 768usize), (768, 768), (5376, 768), (768, 2688)] {
        let shape = TernaryShape { rows: m, cols: k, group_size: 128 };
        let codes: Vec<i8> = (0..m * k).map(|i| ((i * 7919 + i / 3) % 3) as i8 - 1).collect();
        let mat = PackedTernary::new(&codes, &vec![0.01; m * shape.groups()], shape).expect("matrix");
        let x: Vec<f32> = (0..tokens * k).map(|i| ((i * 31) % 200) as f32 / 100.0 - 1.0).collect();
        let ops_n = 2.0 * (m * k * tokens) as f64;
        let mut line = format!("{m}x{k} T{tokens}:");
        for threads in [1, 2] {
            let (best, mean) = rayon::scope(|_| {
                let (mut best, mut total) = (f64::MAX, 0.0);
                for _ in 0..REPS {
                    let t = Instant::now();
                    std::hint::black_box(ops::ternary_matmul(&mat, &x, tokens, isa, threads).expect("matmul"));
                    let e = t.elapsed().as_secs_f64();
                    (best, total) = (best.min(e), total + e);
                    let w = Instant::now();
                    while w.elapsed().as_micros() < gap_us {}
                }
                (best, total / REPS as f64)
            });
            line += &format!(
                "  ops t{threads} best {:.1} us ({:.0} GOPS), mean {:.1} us",
                best * 1e6,
                ops_n / best * 1e-9,
                mean * 1e6
            );
        }
        let acts = TernaryActs::for_isa(&x, tokens, shape, isa);
        let part = &mat.parts[0];
        let ldo = part.tiles * 4;
        let mut out = vec![0f32; tokens * ldo];
        let mut best = f64::MAX;
        for _ in 0..REPS {
            let t = Instant::now();
            kernels::ternary(isa, &shape, part.codes.bytes(), part.scales.f32s(), &acts, &mut out, ldo);
            best = best.min(t.elapsed().as_secs_f64());
        }
        line += &format!("  kernel alone t1 {:.0} GOPS", ops_n / best * 1e-9);
        println!("{line}");
    }
}
