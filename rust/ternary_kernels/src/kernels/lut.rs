//! Experiment, not dispatched: a T-MAC / bitnet.cpp-TL style table-lookup GEMV (AVX-512BW), kept to
//! measure against decode-and-multiply (benches/kernels.rs, docs/kernels.md).
//!
//! Layout (its own): rows in blocks of 64; for each k-quad (4 weights) one 64-byte vector whose
//! byte i is row i: low nibble = fields (k, k+1), high nibble = (k+2, k+3), field = code + 1.
//! Per token and weight pair (x0, x1), a 16-entry table T[f0 | f1 << 2] = (f0-1) x0 + (f1-1) x1
//! (|T| <= 254, so i16, split into a low-byte and a high-byte table for `vpshufb`). Per quad:
//! 2 nibble extracts, 4 lookups, 4 byte->i16 interleaves, 4 adds: 15 ops per 256 weights against
//! 12 for `vpdpbusd` decode-and-multiply, and exactness forbids the int8 tables T-MAC uses.
//! Group size fixed at 128, K a multiple of 128, M a multiple of 64: enough for the measurement.

use std::arch::x86_64::*;

pub const ROWS: usize = 64;
pub const GROUP: usize = 128;

pub struct LutMatrix {
    pub rows: usize,
    pub cols: usize,
    /// [row block][k quad][64 rows]
    pub codes: Vec<u8>,
    /// [row block][group][64 rows]
    pub scales: Vec<f32>,
}

impl LutMatrix {
    /// Codes int8 [M, K] and scales f32 [M, K / 128] (M % 64 == 0, K % 128 == 0).
    pub fn new(codes: &[i8], scales: &[f32], rows: usize, cols: usize) -> Option<LutMatrix> {
        if !rows.is_multiple_of(ROWS)
            || !cols.is_multiple_of(GROUP)
            || codes.len() != rows * cols
            || scales.len() != rows * cols / GROUP
        {
            return None;
        }
        let quads = cols / 4;
        let groups = cols / GROUP;
        let mut packed = vec![0u8; rows * quads];
        let mut sc = vec![0f32; rows * groups];
        for row in 0..rows {
            let (blk, i) = (row / ROWS, row % ROWS);
            for qd in 0..quads {
                let f = |j: usize| (codes[row * cols + 4 * qd + j] + 1) as u8;
                packed[(blk * quads + qd) * ROWS + i] = f(0) | f(1) << 2 | f(2) << 4 | f(3) << 6;
            }
            for g in 0..groups {
                sc[(blk * groups + g) * ROWS + i] = scales[row * groups + g];
            }
        }
        Some(LutMatrix { rows, cols, codes: packed, scales: sc })
    }
}

/// Low-byte and high-byte tables for every weight pair of one quantized token: [pair][lo 16 | hi 16].
pub fn tables(q: &[i8]) -> Vec<u8> {
    let mut t = vec![0u8; q.len() / 2 * 32];
    for (p, pair) in q.chunks_exact(2).enumerate() {
        for f0 in 0..3i32 {
            for f1 in 0..3i32 {
                let v = ((f0 - 1) * pair[0] as i32 + (f1 - 1) * pair[1] as i32) as i16;
                let idx = (f0 | f1 << 2) as usize;
                t[p * 32 + idx] = v as u8;
                t[p * 32 + 16 + idx] = (v >> 8) as u8;
            }
        }
    }
    t
}

/// y[M] = (sum_g scale * dot_g) / s, with the group dots from table lookups (panics without
/// avx512f + avx512bw); float order per row is the scalar kernel's.
pub fn gemv(m: &LutMatrix, q: &[i8], s: f32, out: &mut [f32]) {
    assert!(q.len() == m.cols && out.len() >= m.rows && m.codes.len() == m.rows * m.cols / 4);
    assert!(super::Isa::Avx512Bw.available(), "the table-lookup kernel needs avx512f and avx512bw");
    let t = tables(q);
    // SAFETY: the asserts above bound every code, table and output offset used and check the CPU
    // has avx512f + avx512bw.
    unsafe { gemv_bw(m, &t, s, out) }
}

#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn gemv_bw(m: &LutMatrix, t: &[u8], s: f32, out: &mut [f32]) {
    let quads = m.cols / 4;
    let groups = m.cols / GROUP;
    let nib = _mm512_set1_epi8(0x0f);
    for blk in 0..m.rows / ROWS {
        let mut facc = [_mm512_setzero_ps(); 4];
        for g in 0..groups {
            // i16 accumulators: rows (lane L) 16L..16L+7 in acc[0], 16L+8..16L+15 in acc[1]; a group
            // adds 32 quads of at most 2 x 254, well inside i16.
            let mut acc = [_mm512_setzero_si512(); 2];
            for qd in g * GROUP / 4..(g + 1) * GROUP / 4 {
                let w = _mm512_loadu_si512(m.codes.as_ptr().add((blk * quads + qd) * ROWS) as *const __m512i);
                let lo_idx = _mm512_and_si512(w, nib);
                let hi_idx = _mm512_and_si512(_mm512_srli_epi16::<4>(w), nib);
                let tp = t.as_ptr().add(qd * 64);
                let ta_lo = _mm512_broadcast_i32x4(_mm_loadu_si128(tp as *const __m128i));
                let ta_hi = _mm512_broadcast_i32x4(_mm_loadu_si128(tp.add(16) as *const __m128i));
                let tb_lo = _mm512_broadcast_i32x4(_mm_loadu_si128(tp.add(32) as *const __m128i));
                let tb_hi = _mm512_broadcast_i32x4(_mm_loadu_si128(tp.add(48) as *const __m128i));
                let a_lo = _mm512_shuffle_epi8(ta_lo, lo_idx);
                let a_hi = _mm512_shuffle_epi8(ta_hi, lo_idx);
                let b_lo = _mm512_shuffle_epi8(tb_lo, hi_idx);
                let b_hi = _mm512_shuffle_epi8(tb_hi, hi_idx);
                acc[0] = _mm512_add_epi16(
                    acc[0],
                    _mm512_add_epi16(_mm512_unpacklo_epi8(a_lo, a_hi), _mm512_unpacklo_epi8(b_lo, b_hi)),
                );
                acc[1] = _mm512_add_epi16(
                    acc[1],
                    _mm512_add_epi16(_mm512_unpackhi_epi8(a_lo, a_hi), _mm512_unpackhi_epi8(b_lo, b_hi)),
                );
            }
            // Widen to i32 in row order: lane L of acc[0] is rows 16L..16L+7, of acc[1] 16L+8..16L+15.
            let mut dots = [0i32; ROWS];
            let mut a0 = [0i16; 32];
            let mut a1 = [0i16; 32];
            _mm512_storeu_si512(a0.as_mut_ptr() as *mut __m512i, acc[0]);
            _mm512_storeu_si512(a1.as_mut_ptr() as *mut __m512i, acc[1]);
            for lane in 0..4 {
                for j in 0..8 {
                    dots[16 * lane + j] = a0[8 * lane + j] as i32;
                    dots[16 * lane + 8 + j] = a1[8 * lane + j] as i32;
                }
            }
            let sp = m.scales.as_ptr().add((blk * groups + g) * ROWS);
            for (c, f) in facc.iter_mut().enumerate() {
                let d = _mm512_cvtepi32_ps(_mm512_loadu_si512(dots.as_ptr().add(16 * c) as *const __m512i));
                *f = _mm512_add_ps(*f, _mm512_mul_ps(_mm512_loadu_ps(sp.add(16 * c)), d));
            }
        }
        for (c, f) in facc.iter().enumerate() {
            _mm512_storeu_ps(out.as_mut_ptr().add(blk * ROWS + 16 * c), _mm512_div_ps(*f, _mm512_set1_ps(s)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::act::TernaryActs;
    use crate::format::TernaryShape;
    use crate::kernels::{scalar, Isa};
    use crate::pack::PackedTernary;

    #[test]
    fn lut_matches_scalar_exactly() {
        if let Some(feat) = Isa::Avx512Bw.missing_feature() {
            eprintln!("skipping the table-lookup experiment: this CPU lacks {feat}");
            return;
        }
        let (rows, cols) = (128, 384);
        let codes: Vec<i8> = (0..rows * cols).map(|i| ((i * 7 + i / 5) % 3) as i8 - 1).collect();
        let scales: Vec<f32> = (0..rows * cols / GROUP).map(|i| 0.01 + (i % 13) as f32 * 0.007).collect();
        let x: Vec<f32> = (0..cols).map(|i| ((i * 37) % 255) as f32 / 127.0 - 1.0).collect();
        let shape = TernaryShape { rows, cols, group_size: GROUP };
        let acts = TernaryActs::new(&x, 1, shape);
        let packed = PackedTernary::new(&codes, &scales, shape).unwrap();
        let mut want = vec![0f32; rows];
        let part = &packed.parts[0];
        scalar::ternary(&shape, part.codes.bytes(), part.scales.f32s(), &acts, &mut want, rows);
        let m = LutMatrix::new(&codes, &scales, rows, cols).unwrap();
        let mut got = vec![0f32; rows];
        gemv(&m, &acts.q.i8s()[..cols], acts.s[0], &mut got);
        assert_eq!(got, want);
    }
}
