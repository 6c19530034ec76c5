//! 64-byte aligned, zero-initialised buffers (cache-line aligned for the SIMD loads), without `unsafe`.
//!
//! Storage is a `Vec` of 64-byte lines; bytemuck reinterprets it as bytes, i8 or f32. The zero fill
//! writes every page, so the thread that creates a buffer is the one that places it (NUMA first touch).

use bytemuck::{Pod, Zeroable};

#[repr(C, align(64))]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Line([u8; 64]);

pub struct AlignedBuf {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedBuf {
    /// `len` zero bytes, starting on a 64-byte boundary.
    pub fn zeroed(len: usize) -> Self {
        AlignedBuf { lines: vec![Line([0; 64]); len.div_ceil(64)], len }
    }

    /// The 64-byte lines `lines` yields, in order (no zero fill first: each line is written once).
    pub fn from_lines(lines: impl ExactSizeIterator<Item = [u8; 64]>) -> Self {
        let mut buf = AlignedBuf { lines: Vec::new(), len: 0 };
        let count = lines.len();
        buf.refill(lines, count);
        buf
    }

    /// Replace the contents with the `count` lines `lines` yields, reusing this buffer's memory where
    /// it is large enough.
    pub fn refill(&mut self, lines: impl Iterator<Item = [u8; 64]>, count: usize) {
        self.lines.clear();
        self.lines.reserve(count);
        self.lines.extend(lines.map(Line));
        self.len = self.lines.len() * 64;
    }

    /// This buffer's memory holding `len` bytes: the first min(len, old len) keep their values, the
    /// rest are zero.
    pub fn resized(mut self, len: usize) -> Self {
        self.lines.resize(len.div_ceil(64), Line([0; 64]));
        self.len = len;
        self
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice::<Line, u8>(&self.lines)[..self.len]
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut::<Line, u8>(&mut self.lines)[..self.len]
    }

    pub fn i8s(&self) -> &[i8] {
        bytemuck::cast_slice(self.bytes())
    }

    pub fn i8s_mut(&mut self) -> &mut [i8] {
        bytemuck::cast_slice_mut(self.bytes_mut())
    }

    /// The buffer as f32 (its length must be a multiple of 4 bytes; true for every f32 buffer we make).
    pub fn f32s(&self) -> &[f32] {
        bytemuck::cast_slice(&self.bytes()[..self.len / 4 * 4])
    }

    pub fn f32s_mut(&mut self) -> &mut [f32] {
        let n = self.len / 4 * 4;
        bytemuck::cast_slice_mut(&mut self.bytes_mut()[..n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        for len in [0usize, 1, 63, 64, 65, 1000] {
            let b = AlignedBuf::zeroed(len);
            assert_eq!(b.bytes().len(), len);
            assert!(b.bytes().iter().all(|&x| x == 0));
            assert_eq!(b.bytes().as_ptr() as usize % 64, 0);
        }
    }

    #[test]
    fn from_lines_keeps_order() {
        let b = AlignedBuf::from_lines((0..3u8).map(|i| [i; 64]));
        assert_eq!(b.len(), 192);
        assert_eq!((b.bytes()[0], b.bytes()[64], b.bytes()[191]), (0, 1, 2));
        assert_eq!(b.bytes().as_ptr() as usize % 64, 0);
        let mut b = b;
        b.refill((5..6u8).map(|i| [i; 64]), 1);
        assert_eq!(b.bytes(), &[5u8; 64][..]);
        let b = b.resized(100);
        assert_eq!((&b.bytes()[..64], &b.bytes()[64..]), (&[5u8; 64][..], &[0u8; 36][..]));
        assert_eq!(b.resized(10).bytes(), &[5u8; 10][..]);
    }
}
