//! AVX2 kernels (with FMA): decode-and-multiply through `vpmaddubsw`.
//!
//! Ternary: each 64-byte packed vector is read as two 32-byte halves; half h holds rows 2h and
//! 2h+1 (one per 128-bit lane, format.rs). Field f = `(w >> 2f) & 3` (code + 1) of both halves, decoded
//! once for up to MAX_TOKENS tokens, times the token's 16 activations broadcast to both lanes (one
//! load for both halves, and for both tiles of a one-token block), through `vpmaddubsw` into i16
//! (exact: a group adds at most 16 products of |2 x 2 x 128| = 512 per i16), widened once per group
//! with `vpmaddwd` onto the group's correction `[-sum, 0, 0, 0]` per lane (act.rs
//! `group_starts`, one load), converted to f32 and fused-multiply-added with the two rows' scales
//! (one 4-float load and a permute per group, shared by the tokens).
//!
//! Int8: |w| x sign(x, w) through `vpmaddubsw` (exact while |x| <= 127, which the quantizer ensures).

use std::arch::x86_64::*;

use crate::act::{Int8Acts, TernaryActs};
use crate::format::{TernaryShape, ROWS_PER_TILE, VECTOR_BYTES};
use crate::kernels::scalar::finish_int8;
use crate::kernels::{prefetch_distance, Ternary};

/// Tokens sharing each decoded field: 2 i16 accumulators per token, plus the mask, two halves of codes,
/// their field and one activation vector fill the 16 ymm registers. 2048x2048 x 32 tokens, 1 thread
/// (examples/quick_gops, Zen 4, best of 3): 2 tokens per block 203 GOPS, 4 220-230, 6 203-223.
const MAX_TOKENS: usize = 4;
const INT8_TOKENS: usize = 2;

pub(crate) fn ternary(
    shape: &TernaryShape,
    codes: &[u8],
    scales: &[f32],
    acts: &TernaryActs,
    out: &mut [f32],
    ldo: usize,
) {
    let k = Ternary::checked(shape, codes, scales, acts, &[], out, ldo);
    let n_tiles = k.n_tiles;
    if acts.tokens == 1 {
        // one token: two tiles at a time, so each activation load feeds both and four i16 chains run
        let mut tile = 0;
        while tile < n_tiles {
            // SAFETY: as below; tile + 1 < n_tiles for the pair.
            unsafe {
                if tile + 1 < n_tiles {
                    tile_avx2::<2, 1>(&k, tile, 0, out, ldo);
                } else {
                    tile_avx2::<1, 1>(&k, tile, 0, out, ldo);
                }
            }
            tile += 2;
        }
        return;
    }
    for tile in 0..n_tiles {
        let mut t0 = 0;
        while t0 < acts.tokens {
            let nt = (acts.tokens - t0).min(MAX_TOKENS);
            // SAFETY: kernels::ternary only selects this path when Isa::available() confirmed avx2
            // and fma; `Ternary::checked` bounds every offset used.
            unsafe {
                match nt {
                    1 => tile_avx2::<1, 1>(&k, tile, t0, out, ldo),
                    2 => tile_avx2::<1, 2>(&k, tile, t0, out, ldo),
                    3 => tile_avx2::<1, 3>(&k, tile, t0, out, ldo),
                    _ => tile_avx2::<1, 4>(&k, tile, t0, out, ldo),
                }
            }
            t0 += nt;
        }
    }
}

/// RT tiles (4 rows each) for NT tokens: each activation load feeds both halves' `vpmaddubsw` of every
/// tile; 2 x RT x NT i16 accumulators stay in registers, the f32 sums (touched once per group) may live
/// in memory.
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const RT: usize, const NT: usize>(
    k: &Ternary,
    tile: usize,
    t0: usize,
    out: &mut [f32],
    ldo: usize,
) {
    let mask3 = _mm256_set1_epi8(3);
    let ones16 = _mm256_set1_epi16(1);
    let pick = [_mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3)];
    let codes: [*const u8; RT] = std::array::from_fn(|r| k.codes.as_ptr().add((tile + r) * k.tile_bytes));
    let scales: [*const f32; RT] =
        std::array::from_fn(|r| k.scales.as_ptr().add((tile + r) * k.groups * ROWS_PER_TILE));
    let q = k.q.as_ptr().add(t0 * k.kp);
    let starts = k.group_starts.as_ptr().add(t0 * k.groups);
    let mut facc = [[[_mm256_setzero_ps(); NT]; 2]; RT];
    // RT interleaved streams: a prefetch lands on the same vector of a later block of RT tiles
    let ahead = prefetch_distance(RT * k.tile_bytes);
    for g in 0..k.groups {
        let mut acc = [[[_mm256_setzero_si256(); NT]; 2]; RT];
        for vi in 0..k.vectors_per_group {
            let v = g * k.vectors_per_group + vi;
            let w: [[__m256i; 2]; RT] = std::array::from_fn(|r| {
                _mm_prefetch::<_MM_HINT_T1>(codes[r].add(v * VECTOR_BYTES).wrapping_add(ahead) as *const i8);
                [
                    _mm256_load_si256(codes[r].add(v * VECTOR_BYTES) as *const __m256i),
                    _mm256_load_si256(codes[r].add(v * VECTOR_BYTES + 32) as *const __m256i),
                ]
            });
            for f in 0..4 {
                let d = w.map(|halves| {
                    halves.map(|w| match f {
                        0 => _mm256_and_si256(w, mask3),
                        1 => _mm256_and_si256(_mm256_srli_epi16::<2>(w), mask3),
                        2 => _mm256_and_si256(_mm256_srli_epi16::<4>(w), mask3),
                        _ => _mm256_and_si256(_mm256_srli_epi16::<6>(w), mask3),
                    })
                });
                for t in 0..NT {
                    let xp = q.add(t * k.kp + v * 64 + f * 16) as *const __m128i;
                    let x = _mm256_broadcastsi128_si256(_mm_loadu_si128(xp));
                    for r in 0..RT {
                        for h in 0..2 {
                            acc[r][h][t] = _mm256_add_epi16(acc[r][h][t], _mm256_maddubs_epi16(d[r][h], x));
                        }
                    }
                }
            }
        }
        let group_starts: [__m256i; NT] = std::array::from_fn(|t| {
            _mm256_broadcastsi128_si256(_mm_loadu_si128(starts.add(t * k.groups + g) as *const __m128i))
        });
        for r in 0..RT {
            let four = _mm256_castps128_ps256(_mm_loadu_ps(scales[r].add(g * ROWS_PER_TILE)));
            let sc = pick.map(|lanes| _mm256_permutevar8x32_ps(four, lanes)); // rows 2h, 2h + 1 of each half
            for t in 0..NT {
                for h in 0..2 {
                    let exact = _mm256_add_epi32(_mm256_madd_epi16(acc[r][h][t], ones16), group_starts[t]);
                    facc[r][h][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(exact), sc[h], facc[r][h][t]);
                }
            }
        }
    }
    for r in 0..RT {
        finish_tile::<NT>(k, tile + r, t0, &facc[r][0], &facc[r][1], out, ldo);
    }
}

/// The tile's 4 rows per token from the two halves' per-lane sums, divided by the token's scale.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn finish_tile<const NT: usize>(
    k: &Ternary,
    tile: usize,
    t0: usize,
    f0: &[__m256; NT],
    f1: &[__m256; NT],
    out: &mut [f32],
    ldo: usize,
) {
    for t in 0..NT {
        // hadd twice: [r(2h) x4 | r(2h+1) x4] -> per-lane sums; combine halves into 4 rows.
        let a = _mm256_hadd_ps(f0[t], f1[t]); // lane0: r0a r0b r2a r2b | lane1: r1a r1b r3a r3b
        let b = _mm256_hadd_ps(a, a); // lane0: r0 r2 r0 r2 | lane1: r1 r3 r1 r3
        let lo = _mm256_castps256_ps128(b);
        let hi = _mm256_extractf128_ps::<1>(b);
        let rows = _mm_unpacklo_ps(lo, hi); // r0 r1 r2 r3
        let y = _mm_div_ps(rows, _mm_set1_ps(*k.s.get_unchecked(t0 + t)));
        _mm_storeu_ps(out.as_mut_ptr().add((t0 + t) * ldo + tile * ROWS_PER_TILE), y);
    }
}

// ---------------------------------------------------------------------------------------------
// Int8 x int8 (output head)

pub(crate) fn int8(q: &[i8], scales: &[f32], acts: &Int8Acts, out: &mut [f32], ldo: usize) {
    let kp = acts.kp;
    let rows = q.len() / kp;
    assert!(
        kp.is_multiple_of(64)
            && rows.is_multiple_of(ROWS_PER_TILE)
            && scales.len() >= rows
            && acts.q.len() >= acts.tokens * kp
    );
    assert!(acts.tokens == 0 || out.len() >= (acts.tokens - 1) * ldo + rows);
    for tile in 0..rows / ROWS_PER_TILE {
        let mut t0 = 0;
        while t0 < acts.tokens {
            let nt = (acts.tokens - t0).min(INT8_TOKENS);
            // SAFETY: kernels::int8 only selects this path when avx2 and fma were detected; the
            // asserts above bound every row, token and output offset.
            unsafe {
                match nt {
                    1 => int8_avx2::<1>(q, scales, acts, tile, t0, out, ldo),
                    _ => int8_avx2::<2>(q, scales, acts, tile, t0, out, ldo),
                }
            }
            t0 += nt;
        }
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn int8_avx2<const NT: usize>(
    q: &[i8],
    scales: &[f32],
    acts: &Int8Acts,
    tile: usize,
    t0: usize,
    out: &mut [f32],
    ldo: usize,
) {
    let kp = acts.kp;
    let ones16 = _mm256_set1_epi16(1);
    let w_base = q.as_ptr().add(tile * ROWS_PER_TILE * kp);
    let x_base = acts.q.i8s().as_ptr().add(t0 * kp);
    let mut acc = [[_mm256_setzero_si256(); NT]; ROWS_PER_TILE];
    let ahead = prefetch_distance(ROWS_PER_TILE * kp); // the same column of a later tile
    for c in (0..kp).step_by(32) {
        let mut xs = [_mm256_setzero_si256(); NT];
        for t in 0..NT {
            xs[t] = _mm256_load_si256(x_base.add(t * kp + c) as *const __m256i);
        }
        for r in 0..ROWS_PER_TILE {
            if c % 64 == 0 {
                _mm_prefetch::<_MM_HINT_T1>(w_base.add(r * kp + c).wrapping_add(ahead));
            }
            let w = _mm256_load_si256(w_base.add(r * kp + c) as *const __m256i);
            let magnitude = _mm256_abs_epi8(w);
            for t in 0..NT {
                let pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(xs[t], w));
                acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_madd_epi16(pairs, ones16));
            }
        }
    }
    for r in 0..ROWS_PER_TILE {
        let row = tile * ROWS_PER_TILE + r;
        for t in 0..NT {
            let v = acc[r][t];
            let s4 = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
            let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
            let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32::<0b01>(s2));
            let dot = _mm_cvtsi128_si32(s1);
            *out.get_unchecked_mut((t0 + t) * ldo + row) =
                finish_int8(*scales.get_unchecked(row), dot, *acts.s.get_unchecked(t0 + t));
        }
    }
}
