//! Portable reference kernels: the integer arithmetic every SIMD path must reproduce exactly.
//!
//! Ternary: for each row and token, dot_g = sum_{k in g} (field - 1) * q[k] per group (exact i32),
//! y = (sum_g scale_g * dot_g, summed in group order) / s.
//! Int8: dot = sum_k w[k] * q[k] (exact i32), y = scale * dot / s.

use crate::act::{Int8Acts, TernaryActs};
use crate::format::{TernaryShape, ROWS_PER_TILE, VECTOR_BYTES, WEIGHTS_PER_VECTOR};

/// Ternary rows of `codes`/`scales` (whole tiles of one part) for every token:
/// out[t * ldo + tile * 4 + r].
pub fn ternary(shape: &TernaryShape, codes: &[u8], scales: &[f32], acts: &TernaryActs, out: &mut [f32], ldo: usize) {
    let tile_bytes = shape.tile_code_bytes();
    let groups = shape.groups();
    let vpg = shape.vectors_per_group();
    let n_tiles = codes.len() / tile_bytes;
    let q_all = acts.q.i8s();
    for tile in 0..n_tiles {
        let tile_codes = &codes[tile * tile_bytes..(tile + 1) * tile_bytes];
        let tile_scales = &scales[tile * groups * ROWS_PER_TILE..(tile + 1) * groups * ROWS_PER_TILE];
        for t in 0..acts.tokens {
            let q = &q_all[t * acts.kp..(t + 1) * acts.kp];
            let mut acc = [0f32; ROWS_PER_TILE];
            for g in 0..groups {
                let mut dots = [0i32; ROWS_PER_TILE];
                for v in g * vpg..(g + 1) * vpg {
                    // Bytes 16r..16r+16 of a vector are row r; field f of byte 16r+i is the weight
                    // at k = 64v + 16f + i (format.rs), so each (row, field) is a 16-long dot product.
                    let vector = &tile_codes[v * VECTOR_BYTES..(v + 1) * VECTOR_BYTES];
                    let xs = &q[v * WEIGHTS_PER_VECTOR..(v + 1) * WEIGHTS_PER_VECTOR];
                    for (r, row_bytes) in vector.chunks_exact(16).enumerate() {
                        for f in 0..4 {
                            let x16 = &xs[16 * f..16 * f + 16];
                            let sum: i32 =
                                row_bytes.iter().zip(x16).map(|(&b, &x)| ((b >> (2 * f)) & 3) as i32 * x as i32).sum();
                            dots[r] += sum;
                        }
                    }
                }
                let correction = acts.group_sums[t * groups + g];
                for r in 0..ROWS_PER_TILE {
                    acc[r] += tile_scales[g * ROWS_PER_TILE + r] * (dots[r] - correction) as f32;
                }
            }
            for r in 0..ROWS_PER_TILE {
                out[t * ldo + tile * ROWS_PER_TILE + r] = acc[r] / acts.s[t];
            }
        }
    }
}

/// Int8 rows `q` ([rows][kp]) with per-row `scales` for every token: out[t * ldo + r].
pub fn int8(q: &[i8], scales: &[f32], acts: &Int8Acts, out: &mut [f32], ldo: usize) {
    let kp = acts.kp;
    let x_all = acts.q.i8s();
    for (r, w) in q.chunks_exact(kp).enumerate() {
        for t in 0..acts.tokens {
            let x = &x_all[t * kp..(t + 1) * kp];
            let dot: i32 = w.iter().zip(x).map(|(&a, &b)| a as i32 * b as i32).sum();
            out[t * ldo + r] = finish_int8(scales[r], dot, acts.s[t]);
        }
    }
}

/// The one float epilogue of the int8 head, shared by every path so they agree bit for bit.
#[inline(always)]
pub fn finish_int8(scale: f32, dot: i32, s: f32) -> f32 {
    (scale * dot as f32) / s
}
