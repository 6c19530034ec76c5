//! 64-byte aligned buffers (cache-line aligned for the SIMD loads), without `unsafe`.
//!
//! A buffer is either its own `Vec` of 64-byte lines (bytemuck reinterprets it as bytes, i8 or f32;
//! the zero fill writes every page, so the thread that creates a buffer is the one that places it:
//! NUMA first touch), or a read-only slice of a mapping that many buffers share (`share_pages`).
//! The shared mapping is advised for transparent huge pages: a model's weights are many small
//! matrices (nano-125m's largest layer matrix is 1 MiB) that 4 KiB pages spread over ~12,000 TLB
//! entries, and every decode step walks them all. One thread, weights cold (examples/cold_gemm),
//! 4 KiB vs 2 MiB pages: 2688 x 768 GEMV 31.4 -> 23.0 us, 4-token GEMM 72.2 -> 52.6 us.

use std::sync::Arc;

use bytemuck::{Pod, Zeroable};

#[repr(C, align(64))]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Line([u8; 64]);

enum Storage {
    Lines(Vec<Line>),
    /// `len` bytes at `start` (a multiple of 64) of a mapping shared with other buffers.
    Shared {
        map: Arc<memmap2::Mmap>,
        start: usize,
    },
}

pub struct AlignedBuf {
    storage: Storage,
    len: usize,
}

impl AlignedBuf {
    /// `len` zero bytes, starting on a 64-byte boundary.
    pub fn zeroed(len: usize) -> Self {
        AlignedBuf { storage: Storage::Lines(vec![Line([0; 64]); len.div_ceil(64)]), len }
    }

    /// The 64-byte lines `lines` yields, in order (no zero fill first: each line is written once).
    pub fn from_lines(lines: impl ExactSizeIterator<Item = [u8; 64]>) -> Self {
        let mut buf = AlignedBuf { storage: Storage::Lines(Vec::new()), len: 0 };
        let count = lines.len();
        buf.refill(lines, count);
        buf
    }

    /// This buffer's own lines (a shared buffer is copied out first).
    fn lines_mut(&mut self) -> &mut Vec<Line> {
        if let Storage::Shared { .. } = self.storage {
            let mut lines = vec![Line([0; 64]); self.len.div_ceil(64)];
            bytemuck::cast_slice_mut::<Line, u8>(&mut lines)[..self.len].copy_from_slice(self.bytes());
            self.storage = Storage::Lines(lines);
        }
        match &mut self.storage {
            Storage::Lines(lines) => lines,
            Storage::Shared { .. } => unreachable!("replaced by its own lines above"),
        }
    }

    /// Replace the contents with the `count` lines `lines` yields, reusing this buffer's memory where
    /// it is large enough.
    pub fn refill(&mut self, lines: impl Iterator<Item = [u8; 64]>, count: usize) {
        let own = self.lines_mut();
        own.clear();
        own.reserve(count);
        own.extend(lines.map(Line));
        self.len = own.len() * 64;
    }

    /// This buffer's memory holding `len` bytes: the first min(len, old len) keep their values, the
    /// rest are zero.
    pub fn resized(mut self, len: usize) -> Self {
        let old = self.len;
        let own = self.lines_mut();
        own.resize(len.div_ceil(64), Line([0; 64]));
        // new lines are zero; the rest of the last old line may still hold bytes from before a shrink
        let stale = old..len.min(old.div_ceil(64) * 64);
        if !stale.is_empty() {
            bytemuck::cast_slice_mut::<Line, u8>(own)[stale].fill(0);
        }
        self.len = len;
        self
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether this buffer lives in a shared mapping (`share_pages`).
    pub fn is_shared(&self) -> bool {
        matches!(self.storage, Storage::Shared { .. })
    }

    pub fn bytes(&self) -> &[u8] {
        match &self.storage {
            Storage::Lines(lines) => &bytemuck::cast_slice::<Line, u8>(lines)[..self.len],
            Storage::Shared { map, start } => &map[*start..*start + self.len],
        }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut bytemuck::cast_slice_mut::<Line, u8>(self.lines_mut())[..len]
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

/// Copies of `bufs` in one anonymous mapping, advised for transparent huge pages and then made
/// read-only, each copy starting on a 64-byte boundary. The pages are first touched by the calling
/// thread (NUMA: call it on a thread of the node that computes with them). Where the kernel refuses
/// the advice (THP disabled), the copies still work, on 4 KiB pages.
pub fn share_pages(bufs: &[&AlignedBuf]) -> std::io::Result<Vec<AlignedBuf>> {
    let starts: Vec<usize> = bufs
        .iter()
        .scan(0usize, |at, b| {
            let start = *at;
            *at += b.len().div_ceil(64) * 64;
            Some(start)
        })
        .collect();
    let total = bufs.iter().map(|b| b.len().div_ceil(64) * 64).sum::<usize>().max(64);
    let mut map = memmap2::MmapMut::map_anon(total)?;
    #[cfg(target_os = "linux")]
    let _ = map.advise(memmap2::Advice::HugePage); // best effort: only the TLB reach depends on it
    for (b, &start) in bufs.iter().zip(&starts) {
        map[start..start + b.len()].copy_from_slice(b.bytes());
    }
    let map = Arc::new(map.make_read_only()?);
    Ok(bufs
        .iter()
        .zip(starts)
        .map(|(b, start)| AlignedBuf { storage: Storage::Shared { map: map.clone(), start }, len: b.len() })
        .collect())
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

    #[test]
    fn shared_pages_hold_the_same_bytes_aligned() {
        let bufs: Vec<AlignedBuf> = [0usize, 1, 63, 64, 65, 5000]
            .iter()
            .map(|&n| AlignedBuf::from_lines((0..n.div_ceil(64)).map(|i| [i as u8 + 1; 64])).resized(n))
            .collect();
        let shared = share_pages(&bufs.iter().collect::<Vec<_>>()).unwrap();
        for (a, b) in bufs.iter().zip(&shared) {
            assert!(b.is_shared());
            assert_eq!(a.bytes(), b.bytes());
            assert_eq!(b.bytes().as_ptr() as usize % 64, 0);
        }
        // writing to a shared buffer copies it out first; the others keep their bytes
        let mut last = shared.into_iter().last().unwrap();
        last.bytes_mut()[0] = 99;
        assert!(!last.is_shared());
        assert_eq!(last.bytes()[0], 99);
        assert_eq!(&last.bytes()[1..], &bufs[5].bytes()[1..]);
    }
}
