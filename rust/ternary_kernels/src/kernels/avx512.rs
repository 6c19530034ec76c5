//! AVX-512 kernels: AVX-512BW (`vpmaddubsw`) and VNNI (`vpdpbusd`), decode-and-multiply.
//!
//! Ternary: a 64-byte packed vector is 4 rows x 64 weights; `(w >> 2f) & 3` gives field f, whose
//! 128-bit lane r holds 16 weights of row r (format.rs), all multiplying the same 16 activations in
//! each of the 4 lanes: broadcast from q, or for 2+ tokens loaded whole from their lane copies
//! where those fit L1 or the call passes over the weights more than once (act.rs
//! `block_reads_lanes`). Fields are the unsigned code + 1, so u8 x s8
//! multiplies are exact and the per-group activation sum is subtracted once per row
//! (sum(c x) = sum((c+1) x) - sum(x)).
//! Per group the exact i32 lanes are converted to f32 and fused-multiply-added with the row scales;
//! the 4 lanes of a row are summed at the end of the row. Up to 6 tokens share each decoded
//! vector (GEMM), so the decode is paid once per weight tile, not once per token; GEMV instead
//! blocks 4 tiles so enough independent accumulator chains hide the multiply latency.
//!
//! Int8: per row, `vpdpbusd((w ^ 0x80), x)` = sum((w + 128) x), minus 128 * sum(x); BW without VNNI
//! uses |w| x sign(x, w) through `vpmaddubsw` (exact: pairs stay within +-32512 since |x| <= 127).

use std::arch::x86_64::*;

use crate::act::{fill_lanes_with, lane_stride, Int8Acts, TernaryActs, LANE_COPIES};
use crate::aligned::AlignedBuf;
use crate::format::{TernaryShape, ROWS_PER_TILE, VECTOR_BYTES};
use crate::kernels::scalar::finish_int8;
use crate::kernels::{prefetch_distance, Ternary};

/// Tiles per block: the outer loop walks 4 tiles (16 rows) at a time and splits them by token count.
const BLOCK_TILES: usize = 4;
/// Tokens per register block.
const TOKEN_BLOCK: usize = crate::act::ONE_PASS_TOKENS;
/// Lane copies (act.rs) of at most this many bytes are swept by every tile block: L2 is 1 MiB on Zen 4
/// (512 KiB on Zen 3) and also holds the weights streaming through.
const LANES_L2_BYTES: usize = 256 * 1024;
/// Int8: tokens per register block (4 rows x 4 tokens accumulators).
const INT8_TOKENS: usize = 4;

/// Register blocking (tiles RT x tokens NT x accumulator chains PAR), chosen so every call keeps at
/// least 8 independent `vpdpbusd` chains in flight (its latency is 4-5 cycles, its throughput 1).
macro_rules! block {
    ($vnni:expr, ($rt:literal, $nt:literal, $par:literal), $($arg:expr),*) => {
        block!($vnni, ($rt, $nt, $par, false), $($arg),*)
    };
    ($vnni:expr, ($rt:literal, $nt:literal, $par:literal, $lanes:literal), $($arg:expr),*) => {
        if $vnni {
            block_vnni::<$rt, $nt, $par, $lanes>($($arg),*)
        } else {
            block_bw::<$rt, $nt, $par, $lanes>($($arg),*)
        }
    };
}

/// Blocks of 2+ tokens, from the lane copies when `lanes`, else by broadcasts.
macro_rules! multi_block {
    ($vnni:expr, $lanes:expr, ($rt:literal, $nt:literal, $par:literal), $($arg:expr),*) => {
        if $lanes { block!($vnni, ($rt, $nt, $par, true), $($arg),*) } else { block!($vnni, ($rt, $nt, $par), $($arg),*) }
    };
}

/// One-token blocks, which take the GFNI field decode where the CPU has it (see `block_body`).
macro_rules! gemv_block {
    ($vnni:expr, $gfni:expr, ($rt:literal, $par:literal), $($arg:expr),*) => {
        if $vnni && $gfni {
            block_vnni_gfni::<$rt, 1, $par>($($arg),*)
        } else {
            block!($vnni, ($rt, 1, $par), $($arg),*)
        }
    };
}

/// `gfni`: the CPU has GFNI (used by the one-token VNNI blocks); callers check it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn ternary(
    vnni: bool,
    gfni: bool,
    shape: &TernaryShape,
    codes: &[u8],
    scales: &[f32],
    acts: &TernaryActs,
    out: &mut [f32],
    ldo: usize,
) {
    // Callers that run this path build the lane copies once per call where they pay off
    // (`TernaryActs::for_isa`); a caller that did not (a test, a probe) gets them built here.
    let built;
    let lanes = match &acts.lanes {
        Some(lanes) => lanes.i8s(),
        None if crate::act::lanes_pay_off(acts.tokens, acts.kp) => {
            built = crate::act::lane_copies(acts.q.i8s(), acts.kp);
            built.i8s()
        }
        None => &[],
    };
    let k = Ternary::checked(shape, codes, scales, acts, lanes, out, ldo);
    let n_tiles = k.n_tiles;
    // Every tile block passes over all the tokens' lane copies, so take the tokens in batches whose
    // copies stay in L2; the weights are re-read per batch instead (a quarter of the bytes per token).
    let batch = (LANES_L2_BYTES / lane_stride(k.kp)).max(1).div_ceil(TOKEN_BLOCK) * TOKEN_BLOCK;
    let mut batch0 = 0;
    while batch0 < acts.tokens {
        let batch_end = (batch0 + batch).min(acts.tokens);
        let mut tile0 = 0;
        while tile0 < n_tiles {
            let tiles = (n_tiles - tile0).min(BLOCK_TILES);
            // SAFETY: kernels::ternary only selects this path when Isa::available() confirmed
            // avx512f/bw/vl (and vnni for `vnni`); `Ternary::checked` bounded every offset for
            // tiles < n_tiles and tokens < acts.tokens, and these ranges stay within both.
            unsafe { tile_block(vnni, gfni, &k, tile0, tiles, batch0..batch_end, out, ldo) };
            tile0 += tiles;
        }
        batch0 = batch_end;
    }
}

/// Tiles tile0..tile0 + tiles (at most BLOCK_TILES) for `tokens`, in register blocks of TOKEN_BLOCK.
/// Callers guarantee the CPU features and that the tiles and tokens lie within what `k` checked.
#[allow(clippy::too_many_arguments)]
unsafe fn tile_block(
    vnni: bool,
    gfni: bool,
    k: &Ternary,
    tile0: usize,
    tiles: usize,
    tokens: std::ops::Range<usize>,
    out: &mut [f32],
    ldo: usize,
) {
    let mut t0 = tokens.start;
    while t0 < tokens.end {
        let nt = (tokens.end - t0).min(TOKEN_BLOCK);
        let lanes = !k.lanes.is_empty() && crate::act::block_reads_lanes(nt, k.kp, k.s.len());
        // SAFETY: as for this function; each call covers tiles [tile0, tile0 + tiles) and tokens
        // [t0, t0 + nt) only.
        unsafe {
            let o = &mut *out;
            match (tiles, nt) {
                (4, 1) => gemv_block!(vnni, gfni, (4, 2), k, tile0, t0, o, ldo),
                (4, 2) => {
                    multi_block!(vnni, lanes, (2, 2, 2), k, tile0, t0, o, ldo);
                    multi_block!(vnni, lanes, (2, 2, 2), k, tile0 + 2, t0, o, ldo)
                }
                (4, 3) => {
                    multi_block!(vnni, lanes, (2, 3, 2), k, tile0, t0, o, ldo);
                    multi_block!(vnni, lanes, (2, 3, 2), k, tile0 + 2, t0, o, ldo)
                }
                (4, 4) => {
                    // two accumulator chains per (tile, token): the decode step's 4 tokens per thread at
                    // 8 sequences; steps alternating in one process, 5 runs: median 1.2-4.2% faster
                    // (PAR 1 -> 2; 5 and 6 tokens spill with PAR 2, and 4 one-tile blocks were 15% slower)
                    multi_block!(vnni, lanes, (2, 4, 2), k, tile0, t0, o, ldo);
                    multi_block!(vnni, lanes, (2, 4, 2), k, tile0 + 2, t0, o, ldo)
                }
                (4, 5) => {
                    multi_block!(vnni, lanes, (2, 5, 1), k, tile0, t0, o, ldo);
                    multi_block!(vnni, lanes, (2, 5, 1), k, tile0 + 2, t0, o, ldo)
                }
                (4, 6) => {
                    multi_block!(vnni, lanes, (2, 6, 1), k, tile0, t0, o, ldo);
                    multi_block!(vnni, lanes, (2, 6, 1), k, tile0 + 2, t0, o, ldo)
                }
                (_, 1) => {
                    for t in tile0..tile0 + tiles {
                        gemv_block!(vnni, gfni, (1, 4), k, t, t0, o, ldo)
                    }
                }
                (_, 2) => {
                    for t in tile0..tile0 + tiles {
                        multi_block!(vnni, lanes, (1, 2, 4), k, t, t0, o, ldo)
                    }
                }
                (_, 3) => {
                    for t in tile0..tile0 + tiles {
                        multi_block!(vnni, lanes, (1, 3, 2), k, t, t0, o, ldo)
                    }
                }
                (_, 4) => {
                    for t in tile0..tile0 + tiles {
                        multi_block!(vnni, lanes, (1, 4, 2), k, t, t0, o, ldo)
                    }
                }
                (_, 5) => {
                    for t in tile0..tile0 + tiles {
                        multi_block!(vnni, lanes, (1, 5, 2), k, t, t0, o, ldo)
                    }
                }
                _ => {
                    for t in tile0..tile0 + tiles {
                        multi_block!(vnni, lanes, (1, 6, 1), k, t, t0, o, ldo)
                    }
                }
            }
        }
        t0 += nt;
    }
}

/// act.rs `lane_copies` into `lanes`, with one 512-bit broadcast and store per line (the portable
/// build makes eight 8-byte stores). Callers guarantee AVX-512F and q a whole number of kp-rows.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn fill_lane_copies(q: &[i8], kp: usize, lanes: &mut AlignedBuf) {
    fill_lanes_with(q, kp, lanes, |group| {
        // SAFETY: `group` is 16 readable bytes; an __m512i and a [u8; 64] have the same size, and every
        // bit pattern is valid for both.
        unsafe {
            let copies = _mm512_broadcast_i32x4(_mm_loadu_si128(group.as_ptr() as *const __m128i));
            std::mem::transmute::<__m512i, [u8; 64]>(copies)
        }
    })
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn block_vnni<const RT: usize, const NT: usize, const PAR: usize, const LANES: bool>(
    k: &Ternary,
    tile: usize,
    t0: usize,
    out: &mut [f32],
    ldo: usize,
) {
    block_body::<RT, NT, PAR, true, false, LANES>(k, tile, t0, out, ldo)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,gfni")]
unsafe fn block_vnni_gfni<const RT: usize, const NT: usize, const PAR: usize>(
    k: &Ternary,
    tile: usize,
    t0: usize,
    out: &mut [f32],
    ldo: usize,
) {
    block_body::<RT, NT, PAR, true, true, false>(k, tile, t0, out, ldo)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn block_bw<const RT: usize, const NT: usize, const PAR: usize, const LANES: bool>(
    k: &Ternary,
    tile: usize,
    t0: usize,
    out: &mut [f32],
    ldo: usize,
) {
    block_body::<RT, NT, PAR, false, false, LANES>(k, tile, t0, out, ldo)
}

/// Tiles tile..tile+RT for tokens t0..t0+NT; field f accumulates into chain f % PAR.
/// Callers guarantee the CPU features (GFNI too when `GFNI`) and the bounds.
///
/// GFNI: fields 2 and 3 each by one `vgf2p8affineqb` (a bit-select matrix) instead of a shift and a
/// mask. It issues on the multiply pipes beside `vpdpbusd`, which a one-token block leaves idle
/// while the two zmm ops per cycle in all are its limit: 768 x 768 GEMV, kernel alone, 235 -> 254
/// GOPS (one field by GFNI: 251; three: 233). The GEMM is bound by `vpdpbusd` and keeps the shifts.
#[inline(always)]
unsafe fn block_body<
    const RT: usize,
    const NT: usize,
    const PAR: usize,
    const VNNI: bool,
    const GFNI: bool,
    const LANES: bool,
>(
    k: &Ternary,
    tile: usize,
    t0: usize,
    out: &mut [f32],
    ldo: usize,
) {
    let mask3 = _mm512_set1_epi8(3);
    // result bit i of a byte = parity(byte & A.byte[7 - i]): bits 2f and 2f + 1 to bits 0 and 1, rest 0
    let select_field = |f: i64| _mm512_set1_epi64(((1i64 << (2 * f)) << 56) | ((1i64 << (2 * f + 1)) << 48));
    let (field2, field3) = (select_field(2), select_field(3));
    let ones16 = _mm512_set1_epi16(1);
    let lane_of_row = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    let codes = k.codes.as_ptr().add(tile * k.tile_bytes);
    let scales = k.scales.as_ptr().add(tile * k.groups * ROWS_PER_TILE);
    let q = k.q.as_ptr().add(t0 * k.kp);
    let stride = lane_stride(k.kp);
    let lanes = k.lanes.as_ptr().wrapping_add(t0 * stride); // only read when LANES
    let mut facc = [[_mm512_setzero_ps(); NT]; RT];
    let ahead = prefetch_distance(RT * k.tile_bytes); // the same vector of a later block of RT tiles
                                                      // the scales are a stream of their own: the same group of the tile `ahead` bytes of codes later
    let scales_ahead = ahead / k.tile_bytes * k.groups * ROWS_PER_TILE;
    for g in 0..k.groups {
        // VNNI accumulates i32 directly; BW accumulates maddubs pairs in i16 (|sum| <= 16 x 512) per group.
        let mut acc = [[[_mm512_setzero_si512(); PAR]; NT]; RT];
        if VNNI {
            // Start each row's first lane at -sum(x) of the group: the code + 1 correction for free.
            for t in 0..NT {
                let lane = k.group_starts.as_ptr().add((t0 + t) * k.groups + g) as *const __m128i;
                let start = _mm512_broadcast_i32x4(_mm_loadu_si128(lane));
                for r in 0..RT {
                    acc[r][t][0] = start;
                }
            }
        }
        for vi in 0..k.vectors_per_group {
            let v = g * k.vectors_per_group + vi;
            for r in 0..RT {
                let at = codes.add(r * k.tile_bytes + v * VECTOR_BYTES);
                _mm_prefetch::<_MM_HINT_T1>(at.wrapping_add(ahead) as *const i8);
                let w = _mm512_load_si512(at as *const __m512i);
                let fields = [
                    _mm512_and_si512(w, mask3),
                    _mm512_and_si512(_mm512_srli_epi16::<2>(w), mask3),
                    if GFNI {
                        _mm512_gf2p8affine_epi64_epi8::<0>(w, field2)
                    } else {
                        _mm512_and_si512(_mm512_srli_epi16::<4>(w), mask3)
                    },
                    if GFNI {
                        _mm512_gf2p8affine_epi64_epi8::<0>(w, field3)
                    } else {
                        _mm512_and_si512(_mm512_srli_epi16::<6>(w), mask3)
                    },
                ];
                for (f, d) in fields.into_iter().enumerate() {
                    for t in 0..NT {
                        // The 16 activations of field f in each of the 4 row lanes: a broadcast of
                        // q, or one load of their lane copies (act.rs).
                        let x = if LANES {
                            let xp = lanes.add(t * stride + (v * 64 + f * 16) * LANE_COPIES);
                            _mm512_load_si512(xp as *const __m512i)
                        } else {
                            let xq = q.add(t * k.kp + v * 64 + f * 16);
                            _mm512_broadcast_i32x4(_mm_loadu_si128(xq as *const __m128i))
                        };
                        let a = &mut acc[r][t][f % PAR];
                        *a = if VNNI {
                            _mm512_dpbusd_epi32(*a, d, x)
                        } else {
                            _mm512_add_epi16(*a, _mm512_maddubs_epi16(d, x))
                        };
                    }
                }
            }
        }
        for r in 0..RT {
            let sp = scales.add(r * k.groups * ROWS_PER_TILE + g * ROWS_PER_TILE);
            _mm_prefetch::<_MM_HINT_T1>(sp.wrapping_add(scales_ahead) as *const i8);
            let sc4 = _mm512_castps128_ps512(_mm_loadu_ps(sp));
            let sc = _mm512_permutexvar_ps(lane_of_row, sc4);
            for t in 0..NT {
                let mut raw = _mm512_setzero_si512();
                for p in 0..PAR {
                    raw = _mm512_add_epi32(
                        raw,
                        if VNNI { acc[r][t][p] } else { _mm512_madd_epi16(acc[r][t][p], ones16) },
                    );
                }
                let exact = if VNNI {
                    raw
                } else {
                    let correction =
                        _mm512_maskz_set1_epi32(0x1111, *k.group_sums.get_unchecked((t0 + t) * k.groups + g));
                    _mm512_sub_epi32(raw, correction)
                };
                facc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), sc, facc[r][t]);
            }
        }
    }
    let first_of_lane = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0);
    for r in 0..RT {
        for t in 0..NT {
            let v = facc[r][t];
            let a = _mm512_add_ps(v, _mm512_permute_ps::<0b01_00_11_10>(v));
            let b = _mm512_add_ps(a, _mm512_permute_ps::<0b10_11_00_01>(a));
            let rows = _mm512_castps512_ps128(_mm512_permutexvar_ps(first_of_lane, b));
            let y = _mm_div_ps(rows, _mm_set1_ps(*k.s.get_unchecked(t0 + t)));
            _mm_storeu_ps(out.as_mut_ptr().add((t0 + t) * ldo + (tile + r) * ROWS_PER_TILE), y);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Int8 x int8 (output head)

pub(crate) fn int8(vnni: bool, q: &[i8], scales: &[f32], acts: &Int8Acts, out: &mut [f32], ldo: usize) {
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
            // SAFETY: kernels::int8 only selects this path when Isa::available() confirmed the
            // features; the asserts above bound every row, token and output offset.
            unsafe {
                match (vnni, nt) {
                    (true, 1) => int8_vnni::<1>(q, scales, acts, tile, t0, out, ldo),
                    (true, 2) => int8_vnni::<2>(q, scales, acts, tile, t0, out, ldo),
                    (true, 3) => int8_vnni::<3>(q, scales, acts, tile, t0, out, ldo),
                    (true, _) => int8_vnni::<4>(q, scales, acts, tile, t0, out, ldo),
                    (false, 1) => int8_bw::<1>(q, scales, acts, tile, t0, out, ldo),
                    (false, 2) => int8_bw::<2>(q, scales, acts, tile, t0, out, ldo),
                    (false, 3) => int8_bw::<3>(q, scales, acts, tile, t0, out, ldo),
                    (false, _) => int8_bw::<4>(q, scales, acts, tile, t0, out, ldo),
                }
            }
            t0 += nt;
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn int8_vnni<const NT: usize>(
    q: &[i8],
    scales: &[f32],
    acts: &Int8Acts,
    tile: usize,
    t0: usize,
    out: &mut [f32],
    ldo: usize,
) {
    int8_body::<NT, true>(q, scales, acts, tile, t0, out, ldo)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn int8_bw<const NT: usize>(
    q: &[i8],
    scales: &[f32],
    acts: &Int8Acts,
    tile: usize,
    t0: usize,
    out: &mut [f32],
    ldo: usize,
) {
    int8_body::<NT, false>(q, scales, acts, tile, t0, out, ldo)
}

#[inline(always)]
unsafe fn int8_body<const NT: usize, const VNNI: bool>(
    q: &[i8],
    scales: &[f32],
    acts: &Int8Acts,
    tile: usize,
    t0: usize,
    out: &mut [f32],
    ldo: usize,
) {
    let kp = acts.kp;
    let offset = _mm512_set1_epi8(-128);
    let ones16 = _mm512_set1_epi16(1);
    let zero = _mm512_setzero_si512();
    let w_base = q.as_ptr().add(tile * ROWS_PER_TILE * kp);
    let x_base = acts.q.i8s().as_ptr().add(t0 * kp);
    // two accumulator chains per (row, token) when few tokens: vpdpbusd's latency, not its throughput,
    // bounded one chain per row
    let chains = if NT <= 2 { 2 } else { 1 };
    let mut acc = [[[_mm512_setzero_si512(); 2]; NT]; ROWS_PER_TILE];
    let ahead = prefetch_distance(ROWS_PER_TILE * kp); // the same column of a later tile
    for c in (0..kp).step_by(64) {
        let mut xs = [zero; NT];
        for t in 0..NT {
            xs[t] = _mm512_load_si512(x_base.add(t * kp + c) as *const __m512i);
        }
        for r in 0..ROWS_PER_TILE {
            let at = w_base.add(r * kp + c);
            _mm_prefetch::<_MM_HINT_T1>(at.wrapping_add(ahead));
            let w = _mm512_load_si512(at as *const __m512i);
            if VNNI {
                let u = _mm512_xor_si512(w, offset);
                for t in 0..NT {
                    let a = &mut acc[r][t][(c / 64) % chains];
                    *a = _mm512_dpbusd_epi32(*a, u, xs[t]);
                }
            } else {
                let negative = _mm512_movepi8_mask(w);
                let magnitude = _mm512_abs_epi8(w);
                for t in 0..NT {
                    let signed_x = _mm512_mask_sub_epi8(xs[t], negative, zero, xs[t]);
                    let pairs = _mm512_maddubs_epi16(magnitude, signed_x);
                    let a = &mut acc[r][t][(c / 64) % chains];
                    *a = _mm512_add_epi32(*a, _mm512_madd_epi16(pairs, ones16));
                }
            }
        }
    }
    if NT == INT8_TOKENS {
        // SAFETY: as for this function; NT = 4, so the 16 sums are [row r][token t] of this block.
        let sums: [[__m512i; 4]; 4] = std::array::from_fn(|r| std::array::from_fn(|t| acc[r][t][0]));
        finish_int8_block::<VNNI>(&sums, scales, acts, tile, t0, out, ldo);
        return;
    }
    for r in 0..ROWS_PER_TILE {
        let row = tile * ROWS_PER_TILE + r;
        for t in 0..NT {
            let mut dot = _mm512_reduce_add_epi32(_mm512_add_epi32(acc[r][t][0], acc[r][t][1]));
            if VNNI {
                dot -= 128 * *acts.sums.get_unchecked(t0 + t);
            }
            *out.get_unchecked_mut((t0 + t) * ldo + row) =
                finish_int8(*scales.get_unchecked(row), dot, *acts.s.get_unchecked(t0 + t));
        }
    }
}

/// The 4 rows x 4 tokens of an int8 block finished together: the 16 accumulators are reduced into one
/// vector by a transposing tree (integer adds: exact in any order), whose lane 4 t + r then holds
/// row r, token t; the float epilogue runs on all 16 lanes with the same operations as
/// `finish_int8`, so the bits equal the one-at-a-time path at ~1/4 of its reduction work.
#[inline(always)]
unsafe fn finish_int8_block<const VNNI: bool>(
    acc: &[[__m512i; 4]; 4],
    scales: &[f32],
    acts: &Int8Acts,
    tile: usize,
    t0: usize,
    out: &mut [f32],
    ldo: usize,
) {
    let v: [__m512; 16] = std::array::from_fn(|k| _mm512_castsi512_ps(acc[k / 4][k % 4]));
    let add =
        |a: __m512, b: __m512| _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(a), _mm512_castps_si512(b)));
    // halves: 256-bit lanes of 2 k and 2 k + 1 side by side
    let h: [__m512; 8] = std::array::from_fn(|k| {
        let (a, b) = (v[2 * k], v[2 * k + 1]);
        add(_mm512_shuffle_f32x4::<0b01_00_01_00>(a, b), _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b))
    });
    // quarters: 128-bit lane l of q[m] holds the four partial sums of k = 4 m + l
    let q: [__m512; 4] = std::array::from_fn(|m| {
        let (a, b) = (h[2 * m], h[2 * m + 1]);
        add(_mm512_shuffle_f32x4::<0b10_00_10_00>(a, b), _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b))
    });
    let pair =
        |a: __m512, b: __m512| add(_mm512_shuffle_ps::<0b01_00_01_00>(a, b), _mm512_shuffle_ps::<0b11_10_11_10>(a, b));
    let (e0, e1) = (pair(q[0], q[1]), pair(q[2], q[3]));
    // lane 4 l + m holds k = 4 m + l, i.e. lane 4 t + r holds [row r][token t]
    let mut dot = _mm512_castps_si512(add(
        _mm512_shuffle_ps::<0b10_00_10_00>(e0, e1),
        _mm512_shuffle_ps::<0b11_01_11_01>(e0, e1),
    ));
    if VNNI {
        let sum = |t: usize| *acts.sums.get_unchecked(t0 + t);
        let (s0, s1, s2, s3) = (sum(0), sum(1), sum(2), sum(3));
        let sums = _mm512_setr_epi32(s0, s0, s0, s0, s1, s1, s1, s1, s2, s2, s2, s2, s3, s3, s3, s3);
        // dot - 128 * sum(x), wrapping as the scalar path's i32 arithmetic
        dot = _mm512_sub_epi32(dot, _mm512_slli_epi32::<7>(sums));
    }
    let row_scales = _mm512_broadcast_f32x4(_mm_loadu_ps(scales.as_ptr().add(tile * ROWS_PER_TILE)));
    let act_scale = |t: usize| *acts.s.get_unchecked(t0 + t);
    let (a0, a1, a2, a3) = (act_scale(0), act_scale(1), act_scale(2), act_scale(3));
    let s = _mm512_setr_ps(a0, a0, a0, a0, a1, a1, a1, a1, a2, a2, a2, a2, a3, a3, a3, a3);
    let y = _mm512_div_ps(_mm512_mul_ps(row_scales, _mm512_cvtepi32_ps(dot)), s);
    let rows = [
        _mm512_extractf32x4_ps::<0>(y),
        _mm512_extractf32x4_ps::<1>(y),
        _mm512_extractf32x4_ps::<2>(y),
        _mm512_extractf32x4_ps::<3>(y),
    ];
    for (t, r) in rows.into_iter().enumerate() {
        _mm_storeu_ps(out.as_mut_ptr().add((t0 + t) * ldo + tile * ROWS_PER_TILE), r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gfni_field_decode_gives_the_same_bits() {
        if let Some(missing) = crate::kernels::Isa::Avx512Vnni.missing_feature() {
            eprintln!("skipping: this CPU lacks {missing}");
            return;
        }
        if !std::arch::is_x86_feature_detected!("gfni") {
            eprintln!("skipping: this CPU lacks gfni");
            return;
        }
        let mut seed = 99u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            seed >> 8
        };
        // 1 token takes the one-token blocks; 7 tokens a 6-token block and a one-token one
        for (rows, cols, group_size, tokens) in [(20, 200, 64, 1), (64, 768, 128, 1), (36, 1000, 256, 7)] {
            let shape = TernaryShape { rows, cols, group_size };
            let codes: Vec<i8> = (0..rows * cols).map(|_| (next() % 3) as i8 - 1).collect();
            let scales: Vec<f32> = (0..rows * shape.groups()).map(|_| (next() % 100) as f32 * 1e-3 + 0.01).collect();
            let m = crate::pack::PackedTernary::new(&codes, &scales, shape).unwrap();
            let x: Vec<f32> = (0..tokens * cols).map(|_| (next() % 2001) as f32 / 1000.0 - 1.0).collect();
            let acts = TernaryActs::for_isa(&x, tokens, shape, crate::kernels::Isa::Avx512Vnni);
            let part = &m.parts[0];
            let ldo = part.tiles * ROWS_PER_TILE;
            let (mut plain, mut gfni) = (vec![0f32; tokens * ldo], vec![1f32; tokens * ldo]);
            ternary(true, false, &shape, part.codes.bytes(), part.scales.f32s(), &acts, &mut plain, ldo);
            ternary(true, true, &shape, part.codes.bytes(), part.scales.f32s(), &acts, &mut gfni, ldo);
            assert_eq!(plain, gfni, "{rows}x{cols} g{group_size} T{tokens}");
        }
    }
}
