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
use crate::kernels::Isa;

const EPS: f32 = 1e-5;

/// 1.5 * 2^23: adding it to an f32 of magnitude < 2^22 rounds it to an integer, ties to even (the
/// FPU's default rounding), held in the low mantissa bits: vectorizable, no libm call per element.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// Quantize one token into `q` (same length as `x`); returns s.
#[inline(always)]
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

/// Quantize one token x into q[..x.len()] (q: the token's zero-padded row) and write the sum of q over
/// each `group` values into `sums`; returns s. The same source compiled for AVX2 / AVX-512 where the
/// CPU has them (integer and IEEE f32 operations only, never fused: the same bits on every path), since
/// the default x86-64 target vectorizes it to SSE2 only: 768 values took 360 ns, 7% of a 768 x 768
/// GEMV.
pub fn quantize_token_sums(x: &[f32], q: &mut [i8], group: usize, sums: &mut [i32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512bw") {
            // SAFETY: the CPU has AVX-512F and AVX-512BW (checked on the line above; BW implies F).
            return unsafe { quantize_sums_avx512(x, q, group, sums) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked on the line above).
            return unsafe { quantize_sums_avx2(x, q, group, sums) };
        }
    }
    quantize_sums(x, q, group, sums)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
fn quantize_sums_avx512(x: &[f32], q: &mut [i8], group: usize, sums: &mut [i32]) -> f32 {
    quantize_sums(x, q, group, sums)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn quantize_sums_avx2(x: &[f32], q: &mut [i8], group: usize, sums: &mut [i32]) -> f32 {
    quantize_sums(x, q, group, sums)
}

#[inline(always)]
fn quantize_sums(x: &[f32], q: &mut [i8], group: usize, sums: &mut [i32]) -> f32 {
    let s = quantize_token(x, &mut q[..x.len()]);
    for (sum, values) in sums.iter_mut().zip(q.chunks(group.max(1))) {
        *sum = values.iter().map(|&v| v as i32).sum();
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
    /// [tokens][groups]: `[-sum, 0, 0, 0]`, a 128-bit lane that starts a VNNI accumulator (one load).
    pub group_starts: Vec<[i32; 4]>,
    /// q with every 16 values repeated 4 times (tokens `lane_stride(kp)` bytes apart), for the AVX-512 kernels'
    /// blocks of 2+ tokens: built by `for_isa` when the path reads it, else None (the kernel then
    /// builds its own copy).
    pub lanes: Option<AlignedBuf>,
}

impl TernaryActs {
    pub fn new(x: &[f32], tokens: usize, shape: TernaryShape) -> TernaryActs {
        let (cols, kp, groups, gs) = (shape.cols, shape.padded_cols(), shape.groups(), shape.group_size);
        // This thread's spare (see `SPARES`) holds stale values: each token's padding is zeroed below.
        let mut q = match SPARES.with(|spares| spares.q.take()) {
            Some(spare) => spare.resized(tokens * kp),
            None => AlignedBuf::zeroed(tokens * kp),
        };
        let mut s = vec![0f32; tokens];
        let mut group_sums = vec![0i32; tokens * groups];
        for t in 0..tokens {
            let qt = &mut q.i8s_mut()[t * kp..(t + 1) * kp];
            qt[cols..].fill(0);
            let sums = &mut group_sums[t * groups..(t + 1) * groups];
            s[t] = quantize_token_sums(&x[t * cols..(t + 1) * cols], qt, gs, sums);
        }
        let group_starts = group_sums.iter().map(|&sum| [sum.wrapping_neg(), 0, 0, 0]).collect();
        TernaryActs { tokens, kp, groups, s, q, group_sums, group_starts, lanes: None }
    }

    /// `new`, plus the lane copies when `isa` reads them: what a caller that runs `isa` should build.
    pub fn for_isa(x: &[f32], tokens: usize, shape: TernaryShape, isa: Isa) -> TernaryActs {
        let mut acts = TernaryActs::new(x, tokens, shape);
        if acts.needs_lanes(isa) {
            acts.lanes = Some(lane_copies(acts.q.i8s(), acts.kp));
        }
        acts
    }

    /// Whether `isa`'s ternary kernel reads `lanes` for these tokens (`lanes_pay_off`).
    pub fn needs_lanes(&self, isa: Isa) -> bool {
        isa.reads_lanes() && lanes_pay_off(self.tokens, self.kp)
    }
}

/// A register block of tokens loads its activations from lane copies while those stay in L1 (32 KiB)
/// beside the weights: at most this many bytes of copies (`lane_stride` per token).
pub const LANES_L1_BYTES: usize = 24 * 1024;

/// The AVX-512 GEMM's register blocks hold up to this many tokens; a call with more passes over each
/// weight tile more than once, and only the first pass reads the weights from memory.
pub const ONE_PASS_TOKENS: usize = 6;

/// Whether a register block of `block_tokens` tokens (2+) of K = kp, in a call of `tokens` tokens,
/// reads lane copies rather than broadcasting from q. Copies that spill to L2 delay the weights
/// streaming in from memory when a call passes over them once (one thread, weights cold,
/// examples/cold_gemm, copies vs broadcasts: 768 x 2688 at 4-6 tokens 189-220 -> 261-298 GOPS,
/// 2048 x 2048 at 3-6 tokens 208-237 -> 257-304, 4096 x 4096 194-205 -> 238-295). Where they fit,
/// or where later passes find the weights in cache (8+ tokens), copies win by a vector-pipe slot
/// per load: 768 x 768 at 32 tokens 369 vs 335 GOPS, 2048 x 2048 at 32 tokens 728.9 vs 759.6 us.
pub fn block_reads_lanes(block_tokens: usize, kp: usize, tokens: usize) -> bool {
    block_tokens >= 2 && (tokens > ONE_PASS_TOKENS || block_tokens * lane_stride(kp) <= LANES_L1_BYTES)
}

/// Whether any register block of a call with `tokens` tokens reads lane copies.
pub fn lanes_pay_off(tokens: usize, kp: usize) -> bool {
    tokens >= 2 && block_reads_lanes(2, kp, tokens)
}

/// Each 16 values of `q` ([tokens][kp], kp a multiple of 16) written 4 times in a row: the 128-bit
/// group a 512-bit kernel vector multiplies in each of its four lanes. Loading it whole replaces a
/// broadcast from memory, which on Zen 4 also takes a vector-pipe slot beside every 2 vpdpbusd
/// (a plain load does not): GEMM at 32 tokens went from ~338 to ~376 GOPS on one thread, as long
/// as the copies stay in L1 (`block_reads_lanes`).
/// Tokens start `lane_stride(kp)` bytes apart. The buffer is this thread's spare when it has one
/// (see `SPARES`).
pub fn lane_copies(q: &[i8], kp: usize) -> AlignedBuf {
    assert!(
        kp.is_multiple_of(16) && kp > 0 && q.len().is_multiple_of(kp),
        "lane copies need whole tokens of whole 16-value groups, got {} values in rows of {kp}",
        q.len()
    );
    let mut lanes = SPARES.with(|spares| spares.lanes.take()).unwrap_or_else(|| AlignedBuf::zeroed(0));
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked on the line above).
            unsafe { crate::kernels::avx512::fill_lane_copies(q, kp, &mut lanes) };
            return lanes;
        }
    }
    fill_lane_copies(q, kp, &mut lanes);
    lanes
}

/// Bytes from one token's lane copies to the next: kp x 4, plus one 64-byte line when that is a whole
/// number of 4 KiB. Otherwise the copies of one vector step of every token in a 6-token block sit in
/// the same L1 set (its index is address bits 6-11), more than its ways hold beside the weights:
/// 2048 x 2048 at 32 tokens, kernel alone, 361 -> 378 GOPS with the extra line.
pub fn lane_stride(kp: usize) -> usize {
    let bytes = kp * LANE_COPIES;
    if bytes.is_multiple_of(4096) {
        bytes + 64
    } else {
        bytes
    }
}

/// The portable build of `lane_copies`' fill (eight 8-byte stores per line).
fn fill_lane_copies(q: &[i8], kp: usize, lanes: &mut AlignedBuf) {
    fill_lanes_with(q, kp, lanes, |group| {
        let group: [u8; 16] = bytemuck::cast_slice::<i8, u8>(group).try_into().expect("16 values");
        bytemuck::cast::<[u128; LANE_COPIES], [u8; 64]>([u128::from_ne_bytes(group); LANE_COPIES])
    })
}

/// `lane_copies`' layout with `copies` making one line from 16 values: each token's lines, then the
/// zero line `lane_stride` may add. Inlined into each build, so `copies` compiles with its features.
#[inline(always)]
pub(crate) fn fill_lanes_with(q: &[i8], kp: usize, lanes: &mut AlignedBuf, copies: impl Fn(&[i8]) -> [u8; 64]) {
    let pad = (lane_stride(kp) - kp * LANE_COPIES) / 64;
    let lines = q
        .chunks_exact(kp)
        .flat_map(|token| token.chunks_exact(16).map(&copies).chain(std::iter::repeat_n([0u8; 64], pad)));
    lanes.refill(lines, q.len() / kp * lane_stride(kp) / 64);
}

/// The buffers of the last `TernaryActs` a thread dropped, kept for its next one. A fresh buffer
/// means page faults (costly in a VM): one of 128 KiB or more is a new mmap, and smaller ones regrow
/// the heap top that glibc trimmed after the previous call. They made a 2048 x 2048 GEMM of 32
/// tokens 25% slower (lane copies) and a 768 x 2688 one 8% (q). A spare holds as much as the
/// largest GEMM this thread ran.
struct Spares {
    q: std::cell::Cell<Option<AlignedBuf>>,
    lanes: std::cell::Cell<Option<AlignedBuf>>,
}

thread_local! {
    static SPARES: Spares = const { Spares { q: std::cell::Cell::new(None), lanes: std::cell::Cell::new(None) } };
}

impl Drop for TernaryActs {
    fn drop(&mut self) {
        let q = std::mem::replace(&mut self.q, AlignedBuf::zeroed(0));
        let lanes = self.lanes.take();
        // During thread teardown the slots may be gone already; then the buffers are simply freed.
        let _ = SPARES.try_with(|spares| {
            spares.q.set(Some(q));
            if lanes.is_some() {
                spares.lanes.set(lanes);
            }
        });
    }
}

/// Copies of each 16 activations in `TernaryActs::lanes` (one per 128-bit lane of a 512-bit vector).
pub const LANE_COPIES: usize = 4;

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
            s[t] = quantize_token_sums(&x[t * cols..(t + 1) * cols], qt, kp, &mut sums[t..t + 1]);
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
    fn the_dispatched_build_equals_the_generic_one() {
        let mut seed = 7u32;
        for (cols, group) in [(1usize, 64usize), (63, 64), (768, 128), (1000, 256), (2688, 128)] {
            let kp = cols.div_ceil(group) * group;
            let mut x: Vec<f32> = (0..cols)
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (seed >> 8) as f32 / (1u32 << 24) as f32 * 6.0 - 3.0
                })
                .collect();
            for poison in [None, Some(f32::NAN), Some(f32::NEG_INFINITY)] {
                if let Some(p) = poison {
                    x[cols / 2] = p;
                }
                let (mut q1, mut q2) = (vec![0i8; kp], vec![0i8; kp]);
                let (mut s1, mut s2) = (vec![0i32; kp / group], vec![0i32; kp / group]);
                let got = quantize_token_sums(&x, &mut q1, group, &mut s1);
                let want = quantize_sums(&x, &mut q2, group, &mut s2);
                assert_eq!((got.to_bits(), &q1, &s1), (want.to_bits(), &q2, &s2), "{cols} {group} {poison:?}");
                let by_hand: Vec<i32> = q2.chunks(group).map(|c| c.iter().map(|&v| v as i32).sum()).collect();
                assert_eq!(s2, by_hand);
            }
        }
    }

    #[test]
    fn lane_copies_repeat_each_16_values_four_times() {
        let shape = TernaryShape { rows: 4, cols: 200, group_size: 64 }; // kp = 256: padding included
        let x: Vec<f32> = (0..3 * 200).map(|i| ((i * 37) % 101) as f32 - 50.0).collect();
        let acts = TernaryActs::new(&x, 3, shape);
        let q = acts.q.i8s();
        let want: Vec<i8> = q.chunks(16).flat_map(|group| group.repeat(LANE_COPIES)).collect();
        assert_eq!(lane_stride(256), 1024);
        let mut portable = AlignedBuf::zeroed(0);
        fill_lane_copies(q, 256, &mut portable);
        assert_eq!(portable.i8s(), &want[..]);
        assert_eq!(lane_copies(q, 256).i8s(), &want[..]); // the dispatched build
                                                          // kp = 1024: 4 KiB of copies per token, so each token is followed by one zero line
        let wide = TernaryShape { rows: 4, cols: 1000, group_size: 128 };
        let y: Vec<f32> = (0..2 * 1000).map(|i| ((i * 11) % 97) as f32 - 48.0).collect();
        let acts_wide = TernaryActs::new(&y, 2, wide);
        let qw = acts_wide.q.i8s();
        let want_wide: Vec<i8> = qw
            .chunks(1024)
            .flat_map(|token| token.chunks(16).flat_map(|g| g.repeat(LANE_COPIES)).chain([0i8; 64]))
            .collect();
        assert_eq!(lane_stride(1024), 4096 + 64);
        let mut portable = AlignedBuf::zeroed(0);
        fill_lane_copies(qw, 1024, &mut portable);
        assert_eq!(portable.i8s(), &want_wide[..]);
        assert_eq!(lane_copies(qw, 1024).i8s(), &want_wide[..]);
        // A dropped buffer is reused by the next call, refilled to exactly the new length.
        let big = TernaryActs::for_isa(&x, 3, shape, Isa::Avx512Vnni);
        let had_lanes = big.lanes.is_some();
        drop(big);
        let small = TernaryActs::for_isa(&x[..2 * 200], 2, shape, Isa::Avx512Vnni);
        assert_eq!(small.lanes.is_some(), had_lanes);
        if let Some(lanes) = &small.lanes {
            assert_eq!(lanes.i8s(), &want[..2 * 256 * LANE_COPIES]);
        }
        // Only the 512-bit paths read them, and only for 2+ tokens.
        assert!(TernaryActs::for_isa(&x, 3, shape, Isa::Avx2).lanes.is_none());
        assert!(TernaryActs::for_isa(&x[..200], 1, shape, Isa::Avx512Vnni).lanes.is_none());
    }

    #[test]
    fn a_reused_q_buffer_keeps_no_stale_values() {
        let wide = TernaryShape { rows: 4, cols: 200, group_size: 64 };
        let x: Vec<f32> = (0..5 * 200).map(|i| 1.0 + (i % 7) as f32).collect();
        drop(TernaryActs::new(&x, 5, wide)); // leaves a spare full of non-zero values
        let narrow = TernaryShape { rows: 4, cols: 70, group_size: 64 }; // kp = 128: 58 padding values
        let y: Vec<f32> = (0..3 * 70).map(|i| ((i * 13) % 29) as f32 - 14.0).collect();
        let acts = TernaryActs::new(&y, 3, narrow);
        let (want_q, want_s) = quantize_activations(&y, 3, 70);
        for t in 0..3 {
            let row = &acts.q.i8s()[t * 128..(t + 1) * 128];
            assert_eq!(&row[..70], &want_q[t * 70..(t + 1) * 70]);
            assert!(row[70..].iter().all(|&v| v == 0), "token {t}: stale padding");
            assert_eq!(acts.s[t], want_s[t]);
        }
        assert_eq!(acts.q.len(), 3 * 128);
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
