//! Ternary GEMM with cold weights: cycles through enough matrices to overflow the LLC, as a decode
//! step does, 1 thread. Usage: cargo run --release --example cold_gemm -- M K TOKENS
use _ternary::act::TernaryActs;
use _ternary::format::TernaryShape;
use _ternary::kernels::{self, active_isa};
use _ternary::PackedTernary;
use std::time::Instant;
fn main() {
    let a: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (m, k, tokens) = (a[0], a[1], a[2]);
    let isa = active_isa().expect("isa");
    let shape = TernaryShape { rows: m, cols: k, group_size: 128 };
    let count = (96 << 20) / (m * k / 4) + 1;
    let mats: Vec<PackedTernary> = (0..count)
        .map(|s| {
            let codes: Vec<i8> = (0..m * k).map(|i| (((i + s) * 7919 + i / 3) % 3) as i8 - 1).collect();
            PackedTernary::new(&codes, &vec![0.01; m * shape.groups()], shape).expect("matrix")
        })
        .collect();
    let x: Vec<f32> = (0..tokens * k).map(|i| ((i * 31) % 200) as f32 / 100.0 - 1.0).collect();
    let acts = TernaryActs::for_isa(&x, tokens, shape, isa);
    let mut out = vec![0f32; tokens * m];
    let ops = 2.0 * (m * k * tokens) as f64;
    let (mut cold, mut hot) = (f64::MAX, f64::MAX);
    for _ in 0..5 {
        let t = Instant::now();
        for mat in &mats {
            kernels::ternary(isa, &shape, mat.parts[0].codes.bytes(), mat.parts[0].scales.f32s(), &acts, &mut out, m);
        }
        cold = cold.min(t.elapsed().as_secs_f64() / count as f64);
        let t = Instant::now();
        for _ in 0..count {
            kernels::ternary(
                isa,
                &shape,
                mats[0].parts[0].codes.bytes(),
                mats[0].parts[0].scales.f32s(),
                &acts,
                &mut out,
                m,
            );
        }
        hot = hot.min(t.elapsed().as_secs_f64() / count as f64);
    }
    println!(
        "{m}x{k} T{tokens}: cold {:.1} us ({:.0} GOPS), hot {:.1} us ({:.0} GOPS), {count} matrices",
        cold * 1e6,
        ops / cold / 1e9,
        hot * 1e6,
        ops / hot / 1e9
    );
}
