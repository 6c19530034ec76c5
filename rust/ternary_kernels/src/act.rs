//! Per-token int8 absmax activation quantization (python/nanochat/quant.py, bit for bit), and the
//! activation layouts the kernels read.
//!
//! ```text
//! s = 127 / max(max|x|, 1e-5)        q = clamp(round_half_even(x * s), -128, 127)
//! ```
//!
//! A token with a NaN or inf gets s = NaN and q = 0, so every output of that token is NaN.

use crate::aligned::AlignedBuf;
use crate::format::{TernaryShape, INT8_COL_ALIGN};

const EPS: f32 = 1e-5;

/// 1.5 * 2^23: adding it to an f32 of magnitude < 2^22 rounds it to an integer, ties to even (the
/// FPU's default rounding), held in the low mantissa bits: vectorizable, no libm call per element.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// Quantize one token into `q` (same length as `x`); returns s.
pub fn quantize_token(x: &[f32], q: &mut [i8]) -> f32 {
    // For finite floats the order of |v| is the order of its bits with the sign cleared, and inf/NaN
    // sit above every finite value: one integer max (which vectorizes) finds both.
    let max_bits = x.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff));
    if max_bits >= 0x7f80_0000 {
        q.fill(0);
        return f32::NAN;
    }
    let s = 127.0f32 / f32::from_bits(max_bits).max(EPS);
    let magic_bits = ROUND_MAGIC.to_bits() as i32;
    for (dst, &v) in q.iter_mut().zip(x) {
        // |v * s| <= 127 (+ rounding), far below 2^22: after adding the magic number the integer
        // round_half_even(v * s) sits in the low mantissa bits.
        let rounded = (v * s + ROUND_MAGIC).to_bits() as i32 - magic_bits;
        *dst = rounded.clamp(-128, 127) as i8;
    }
    s
}

/// x [tokens, cols] -> (q [tokens, cols], s [tokens]).
pub fn quantize_activations(x: &[f32], tokens: usize, cols: usize) -> (Vec<i8>, Vec<f32>) {
    let mut q = vec![0i8; tokens * cols];
    let mut s = vec![0f32; tokens];
    for t in 0..tokens {
        s[t] = quantize_token(&x[t * cols..(t + 1) * cols], &mut q[t * cols..(t + 1) * cols]);
    }
    (q, s)
}

/// Quantized activations for a ternary matrix of `shape`.
pub struct TernaryActs {
    pub tokens: usize,
    /// K padded to whole groups.
    pub kp: usize,
    pub groups: usize,
    pub s: Vec<f32>,
    /// [tokens][kp], zero padded.
    pub q: AlignedBuf,
    /// [tokens][groups]: sum of q over each group (the correction for the code + 1 fields).
    pub group_sums: Vec<i32>,
}

impl TernaryActs {
    pub fn new(x: &[f32], tokens: usize, shape: TernaryShape) -> TernaryActs {
        let (cols, kp, groups, gs) = (shape.cols, shape.padded_cols(), shape.groups(), shape.group_size);
        let mut q = AlignedBuf::zeroed(tokens * kp);
        let mut s = vec![0f32; tokens];
        let mut group_sums = vec![0i32; tokens * groups];
        for t in 0..tokens {
            let qt = &mut q.i8s_mut()[t * kp..(t + 1) * kp];
            s[t] = quantize_token(&x[t * cols..(t + 1) * cols], &mut qt[..cols]);
            for (g, sum) in group_sums[t * groups..(t + 1) * groups].iter_mut().enumerate() {
                *sum = qt[g * gs..(g + 1) * gs].iter().map(|&v| v as i32).sum();
            }
        }
        TernaryActs { tokens, kp, groups, s, q, group_sums }
    }
}

/// Quantized activations for an int8 matrix with `cols` inputs.
pub struct Int8Acts {
    pub tokens: usize,
    pub kp: usize,
    pub s: Vec<f32>,
    /// [tokens][kp], zero padded.
    pub q: AlignedBuf,
    /// [tokens]: sum of q (the correction for the +128 offset the VNNI kernel applies to weights).
    pub sums: Vec<i32>,
}

impl Int8Acts {
    pub fn new(x: &[f32], tokens: usize, cols: usize) -> Int8Acts {
        let kp = cols.div_ceil(INT8_COL_ALIGN) * INT8_COL_ALIGN;
        let mut q = AlignedBuf::zeroed(tokens * kp);
        let mut s = vec![0f32; tokens];
        let mut sums = vec![0i32; tokens];
        for t in 0..tokens {
            let qt = &mut q.i8s_mut()[t * kp..(t + 1) * kp];
            s[t] = quantize_token(&x[t * cols..(t + 1) * cols], &mut qt[..cols]);
            sums[t] = qt.iter().map(|&v| v as i32).sum();
        }
        Int8Acts { tokens, kp, s, q, sums }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_quant_py_rule() {
        let x = [0.5f32, -1.0, 0.25, 0.0, 0.125, -0.75];
        let mut q = [0i8; 6];
        let s = quantize_token(&x, &mut q);
        assert_eq!(s, 127.0);
        // 0.25 * 127 = 31.75 -> 32; 0.5 * 127 = 63.5 -> 64 (half to even); -0.75 * 127 = -95.25 -> -95
        assert_eq!(q, [64, -127, 32, 0, 16, -95]);
    }

    #[test]
    fn tiny_and_non_finite_tokens() {
        let mut q = [0i8; 3];
        assert_eq!(quantize_token(&[0.0, 0.0, 0.0], &mut q), 127.0 / 1e-5);
        assert_eq!(q, [0, 0, 0]);
        assert!(quantize_token(&[1.0, f32::NAN, 0.0], &mut q).is_nan());
        assert!(quantize_token(&[1.0, f32::INFINITY, 0.0], &mut q).is_nan());
    }
}
