//! Per-call cost of the pinned pool: an empty job on every thread, and the in-cache GEMV on 1 thread
//! and all threads, called back to back (best of 9 rounds of 2000 / N calls).
//! Usage: cargo run --release --example dispatch_probe
use std::hint::black_box;
use std::time::Instant;

use _ternary::format::TernaryShape;
use _ternary::kernels::best_isa;
use _ternary::topology::Topology;
use _ternary::{place_ternary, ternary_matmul, Pool};

fn best_us(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..9)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..reps {
                f();
            }
            t.elapsed().as_secs_f64() * 1e6 / reps as f64
        })
        .fold(f64::MAX, f64::min)
}

fn main() {
    let topo = Topology::detect();
    let all = topo.cpu_count();
    let pools: Vec<Pool> = [1, all].iter().map(|&n| Pool::new(n, &topo).expect("pool")).collect();
    for pool in &pools[1..] {
        let us = best_us(20000, || {
            black_box(pool.run(&[64], usize::MAX, |item| vec![item.tiles.len() as f32]));
        });
        println!("empty job on {} threads: {us:.2} us", pool.threads());
    }
    for (m, k) in [(768usize, 768usize), (2048, 2048), (4096, 4096)] {
        let shape = TernaryShape { rows: m, cols: k, group_size: 128 };
        let codes: Vec<i8> = (0..m * k).map(|i| ((i * 7919 + i / 5) % 3) as i8 - 1).collect();
        let scales = vec![0.01f32; m * shape.groups()];
        let x: Vec<f32> = (0..k).map(|i| ((i * 31) % 200) as f32 / 100.0 - 1.0).collect();
        let times: Vec<f64> = pools
            .iter()
            .map(|pool| {
                let mat = place_ternary(&codes, &scales, shape, pool).expect("matrix");
                best_us((1 << 26) / (m * k) + 1, || {
                    black_box(ternary_matmul(&mat, &x, 1, best_isa(), pool).expect("gemv"));
                })
            })
            .collect();
        let line: Vec<String> = pools
            .iter()
            .zip(&times)
            .map(|(p, t)| format!("t{} {t:.1} us ({:.0} GOPS)", p.threads(), 2.0 * (m * k) as f64 / t / 1e3))
            .collect();
        println!("GEMV {m}x{k}: {} -> {:.2}x", line.join(", "), times[0] / times[times.len() - 1]);
    }
}
