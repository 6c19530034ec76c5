//! One decode attention task (one sequence, one kv head of 3 query heads, head_dim 64: nano-125m's
//! shape) with its cache hot, at a few positions: the compute part of the decode step's attention.
//! Usage: cargo run --release --example attn_probe
use _ternary::layer_ops::{attend_decode, AttnShape};
use half::f16;
use std::time::Instant;
fn main() {
    let hd = 64;
    for pos in [2usize, 96, 400] {
        let s = AttnShape { n_heads: 3, n_kv_heads: 1, head_dim: hd, capacity: 512 };
        let qkv: Vec<f32> = (0..5 * hd).map(|i| (i % 13) as f32 * 0.1).collect();
        let cos = vec![1.0f32; hd];
        let sin = vec![0.0f32; hd];
        let mut k = vec![f16::from_f32(0.1); 512 * hd];
        let mut v = vec![f16::from_f32(0.2); 512 * hd];
        let mut out = vec![0f32; 3 * hd];
        let mut best = f64::MAX;
        for _ in 0..2000 {
            let t = Instant::now();
            attend_decode(s, &qkv, &cos, &sin, &mut k, &mut v, pos, 0.125, &mut out).unwrap();
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!("one (seq, kv head) task, pos {pos}: {:.2} us", best * 1e6);
    }
}
