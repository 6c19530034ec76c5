//! AVX-512 kernels (placeholder: scalar until the SIMD loops land).
use crate::act::{Int8Acts, TernaryActs};
use crate::format::TernaryShape;
pub fn ternary(_vnni: bool, shape: &TernaryShape, codes: &[u8], scales: &[f32], acts: &TernaryActs, out: &mut [f32], ldo: usize) {
    super::scalar::ternary(shape, codes, scales, acts, out, ldo)
}
pub fn int8(_vnni: bool, q: &[i8], scales: &[f32], acts: &Int8Acts, out: &mut [f32], ldo: usize) {
    super::scalar::int8(q, scales, acts, out, ldo)
}
