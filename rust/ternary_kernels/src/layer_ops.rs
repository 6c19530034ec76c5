//! The engine's small float ops between the matmuls, fused: RMSNorm, SiLU(gate) * up, the mHC
//! stream read and write, and one decode step of attention (RoPE, KV-cache write, single-query GQA
//! softmax attention).
//!
//! In numpy each of these is 5-15 array ops of a microsecond or more per token and layer; here each
//! is one call. The arithmetic follows python/nanochat/engine/model.py (same formulas in f32; sums
//! are taken in 16 lanes, so the last bits can differ from numpy's order).
//!
//! Attention is the hot one at long contexts (12 heads x every cached position, per layer and token):
//! the query heads of a kv head share each key and value load, the softmax uses a branch-free exp that
//! vectorizes, and on AVX-512 the scores and value sums run in registers. Every path performs the same
//! operations in the same order, its multiply-adds fused (`mul_add`, one rounding: `vfmadd` on x86
//! with FMA, a correctly rounded software fma elsewhere), so the bits do not depend on the CPU.
//! nano-125m shapes (12 heads, 4 kv heads, hd 64), one call through the Python binding on this Zen 4:
//! 45 -> 21 us at position 150, 275 -> 97 us at position 1000. SiLU * up uses the same exp: 29.5 -> 3.6 us
//! for one token of F = 2688, 115 -> 23 us for eight.

use half::f16;
use half::slice::HalfFloatSliceExt;

use rayon::prelude::*;

use crate::error::{invalid, Result};

const LANES: usize = 16;

/// The 16 lane sums of a[i] * b[i] over the whole 16-value chunks (16 independent lanes: vectorizes
/// without fast-math), and the leftover tails of a and b. `dot` and `dot_tree` finish them differently.
#[inline(always)]
fn lane_dots<'a>(a: &'a [f32], b: &'a [f32]) -> ([f32; LANES], &'a [f32], &'a [f32]) {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    (acc, ra, rb)
}

/// sum a[i] * b[i]: the lanes added in order at the end, then the tail.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (acc, ra, rb) = lane_dots(a, b);
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// out[n, :] = x[n, :] * (1 / sqrt(mean(x[n]^2) + eps)) * weight, for rows of weight.len().
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) -> Result<()> {
    let d = weight.len();
    if d == 0 || !x.len().is_multiple_of(d) || out.len() != x.len() {
        return Err(invalid("x", format!("expected rows of {d} values (the weight's length), got {}", x.len())));
    }
    let rows = |x: &[f32], out: &mut [f32]| {
        for (row, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let inv = 1.0 / (dot(row, row) * (1.0 / d as f32) + eps).sqrt();
            for ((o, &v), &w) in o.iter_mut().zip(row).zip(weight) {
                *o = v * inv * w;
            }
        }
    };
    over_rows(x, d, out, d, rows);
    Ok(())
}

/// Elementwise calls at least this large (a prompt's rows: 128 tokens x 768 is 98K values) split
/// their rows over rayon's threads. nano-125m's decode step stays below it (SiLU of 4 sequences per
/// thread: 21.5K values); a larger model's may split too. Every row or element is computed as on one
/// thread: the same bits.
const PARALLEL_MIN_VALUES: usize = 1 << 16;

/// Rows of `row` values per parallel chunk for a call over `len` values, or None to stay serial.
fn parallel_rows(len: usize, row: usize) -> Option<usize> {
    let threads = rayon::current_num_threads();
    if len < PARALLEL_MIN_VALUES || threads < 2 || row == 0 {
        return None;
    }
    Some((len / row).div_ceil(4 * threads).max(1))
}

/// `rows(x, out)` over rows of `x_row` inputs and `out_row` outputs: on this thread, or in chunks of
/// rows on all threads for a large call (`parallel_rows`).
fn over_rows(x: &[f32], x_row: usize, out: &mut [f32], out_row: usize, rows: impl Fn(&[f32], &mut [f32]) + Sync) {
    match parallel_rows(x.len(), x_row) {
        Some(per) => x.par_chunks(per * x_row).zip(out.par_chunks_mut(per * out_row)).for_each(|(x, o)| rows(x, o)),
        None => rows(x, out),
    }
}

/// out [N, F] = silu(gu[:, :F]) * gu[:, F:] for gu [N, 2F], silu(g) = g / (1 + exp(-g)).
pub fn silu_mul(gu: &[f32], f: usize, out: &mut [f32]) -> Result<()> {
    if f == 0 || !gu.len().is_multiple_of(2 * f) || out.len() != gu.len() / 2 {
        return Err(invalid("gu", format!("expected rows of 2 x {f} values, got {}", gu.len())));
    }
    let rows = |gu: &[f32], out: &mut [f32]| {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked on the line above).
            unsafe { silu_mul_avx512(gu, f, out) };
            return;
        }
        silu_mul_rows(gu, f, out);
    };
    over_rows(gu, 2 * f, out, f, rows);
    Ok(())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn silu_mul_avx512(gu: &[f32], f: usize, out: &mut [f32]) {
    silu_mul_rows(gu, f, out)
}

/// The SiLU loop, branch-free (exp_poly) so it vectorizes; the same bits whichever ISA compiles it.
#[inline(always)]
fn silu_mul_rows(gu: &[f32], f: usize, out: &mut [f32]) {
    for (row, o) in gu.chunks_exact(2 * f).zip(out.chunks_exact_mut(f)) {
        let (g, u) = row.split_at(f);
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + exp_poly(-g)) * u;
        }
    }
}

/// mHC read: out [M] = sum_i h_pre[i] * xs[i] for n = h_pre.len() streams xs [n][M], streams added
/// in order with separate multiply and add. Prefill and decode both call this (per element, so the
/// token count cannot change a result): their residual streams agree bit for bit.
pub fn mhc_read(xs: &[f32], h_pre: &[f32], out: &mut [f32]) -> Result<()> {
    let (n, m) = (h_pre.len(), out.len());
    if n == 0 || xs.len() != n * m {
        return Err(invalid("xs", format!("expected {n} streams of {m} values, got {} values", xs.len())));
    }
    // out[start..start + len] from the same elements of every stream
    let part = |start: usize, out: &mut [f32]| {
        let len = out.len();
        for (o, &x) in out.iter_mut().zip(&xs[start..start + len]) {
            *o = h_pre[0] * x;
        }
        for (i, stream) in xs.chunks_exact(m).enumerate().skip(1) {
            for (o, &x) in out.iter_mut().zip(&stream[start..start + len]) {
                *o += h_pre[i] * x;
            }
        }
    };
    match parallel_rows(xs.len(), n * MHC_BLOCK) {
        Some(per) => out.par_chunks_mut(per * MHC_BLOCK).enumerate().for_each(|(c, o)| part(c * per * MHC_BLOCK, o)),
        None => part(0, out),
    }
    Ok(())
}

/// Elements per block of `mhc_write` (the old streams of a block are copied aside first).
const MHC_BLOCK: usize = 256;

/// mHC write, in place: xs[i] = sum_j h_res[i, j] * xs[j] + h_post[i] * y for streams xs [n][M],
/// y [M], h_res [n, n] row-major (same order of operations as `mhc_read`, then the h_post term).
pub fn mhc_write(xs: &mut [f32], y: &[f32], h_res: &[f32], h_post: &[f32]) -> Result<()> {
    let (n, m) = (h_post.len(), y.len());
    if n == 0 || h_res.len() != n * n {
        return Err(invalid("h_res", format!("expected [{n}, {n}] (n = h_post's length), got {} values", h_res.len())));
    }
    if xs.len() != n * m {
        return Err(invalid("xs", format!("expected {n} streams of {m} values (y's length), got {} values", xs.len())));
    }
    let Some(per) = parallel_rows(xs.len(), n * MHC_BLOCK) else {
        let mut streams: Vec<&mut [f32]> = xs.chunks_exact_mut(m).collect();
        mhc_write_part(&mut streams, y, h_res, h_post);
        return Ok(());
    };
    // the same element range of every stream, one task per range
    let chunk = per * MHC_BLOCK;
    let mut parts: Vec<Vec<&mut [f32]>> = (0..m.div_ceil(chunk)).map(|_| Vec::with_capacity(n)).collect();
    for stream in xs.chunks_exact_mut(m) {
        for (part, piece) in parts.iter_mut().zip(stream.chunks_mut(chunk)) {
            part.push(piece);
        }
    }
    parts
        .into_par_iter()
        .zip(y.par_chunks(chunk))
        .for_each(|(mut streams, y)| mhc_write_part(&mut streams, y, h_res, h_post));
    Ok(())
}

/// `mhc_write` on one element range: streams[i] holds stream i's elements of the range, y the range of y.
fn mhc_write_part(streams: &mut [&mut [f32]], y: &[f32], h_res: &[f32], h_post: &[f32]) {
    let (n, m) = (streams.len(), y.len());
    let mut old = vec![0f32; n * MHC_BLOCK];
    for start in (0..m).step_by(MHC_BLOCK) {
        let len = MHC_BLOCK.min(m - start);
        for (j, stream) in streams.iter().enumerate() {
            old[j * MHC_BLOCK..j * MHC_BLOCK + len].copy_from_slice(&stream[start..start + len]);
        }
        for (i, stream) in streams.iter_mut().enumerate() {
            let out = &mut stream[start..start + len];
            for (o, &x) in out.iter_mut().zip(&old[..len]) {
                *o = h_res[i * n] * x;
            }
            for j in 1..n {
                for (o, &x) in out.iter_mut().zip(&old[j * MHC_BLOCK..j * MHC_BLOCK + len]) {
                    *o += h_res[i * n + j] * x;
                }
            }
            for (o, &v) in out.iter_mut().zip(&y[start..start + len]) {
                *o += h_post[i] * v;
            }
        }
    }
}

/// Shapes of one decode attention step.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Positions the cache holds (its second dim).
    pub capacity: usize,
}

/// Rotate-half RoPE with full-width tables cos = [c, c], sin = [-s, s]: x * cos + [x2, x1] * sin.
/// Written as two loops over the halves (no index arithmetic), which vectorize: a loop choosing the
/// partner per element ran scalar, 13% of a decode attention task (perf, examples/attn_probe).
#[inline(always)]
fn rope(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let half = x.len() / 2;
    let (x1, x2) = x.split_at(half);
    let ((c1, c2), (s1, s2)) = (cos.split_at(half), sin.split_at(half));
    let (o1, o2) = out.split_at_mut(half);
    for (((o, &a), &b), (&c, &s)) in o1.iter_mut().zip(x1).zip(x2).zip(c1.iter().zip(s1)) {
        *o = a * c + b * s;
    }
    for (((o, &b), &a), (&c, &s)) in o2.iter_mut().zip(x2).zip(x1).zip(c2.iter().zip(s2)) {
        *o = b * c + a * s;
    }
}

/// RoPE in place on the first `heads` heads (hd values each) of every row of x [N, row], with the rows'
/// full-width cos/sin [N, hd]: the prefill's q and k, the same arithmetic as the decode step's `rope`.
pub fn rope_rows(x: &mut [f32], row: usize, heads: usize, cos: &[f32], sin: &[f32]) -> Result<()> {
    let n = x.len().checked_div(row).unwrap_or(0);
    let hd = cos.len().checked_div(n).unwrap_or(0);
    if row == 0 || !x.len().is_multiple_of(row) || hd == 0 || !hd.is_multiple_of(2) || cos.len() != n * hd {
        return Err(invalid("cos", format!("expected [N, even hd] for {n} rows of x, got {} values", cos.len())));
    }
    if sin.len() != cos.len() || heads * hd > row {
        return Err(invalid(
            "sin",
            format!("expected {} values like cos and {heads} heads of {hd} within a row of {row}", cos.len()),
        ));
    }
    let mut head = vec![0f32; hd];
    for (t, xr) in x.chunks_exact_mut(row).enumerate() {
        let (c, s) = (&cos[t * hd..(t + 1) * hd], &sin[t * hd..(t + 1) * hd]);
        for h in xr[..heads * hd].chunks_exact_mut(hd) {
            head.copy_from_slice(h);
            rope(&head, c, s, h);
        }
    }
    Ok(())
}

/// Causal softmax in place over score rows [..][r][c] of s_len keys each: row k belongs to query k % c of a
/// chunk whose first query sits at position q0, which sees keys 0..=q0 + k % c. Visible scores are
/// multiplied by `scale` and softmaxed (the decode step's exp); the others become 0.
pub fn causal_softmax(scores: &mut [f32], s_len: usize, c: usize, q0: usize, scale: f32) -> Result<()> {
    if s_len == 0 || c == 0 || !scores.len().is_multiple_of(s_len * c) || q0 + c > s_len {
        return Err(invalid(
            "scores",
            format!(
                "expected rows of s_len = {s_len} keys in groups of c = {c} queries (q0 + c <= s_len), got {} values",
                scores.len()
            ),
        ));
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked on the line above).
        unsafe { causal_softmax_avx512(scores, s_len, c, q0, scale) };
        return Ok(());
    }
    causal_softmax_rows(scores, s_len, c, q0, scale);
    Ok(())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn causal_softmax_avx512(scores: &mut [f32], s_len: usize, c: usize, q0: usize, scale: f32) {
    causal_softmax_rows(scores, s_len, c, q0, scale)
}

#[inline(always)]
fn causal_softmax_rows(scores: &mut [f32], s_len: usize, c: usize, q0: usize, scale: f32) {
    for (k, row) in scores.chunks_exact_mut(s_len).enumerate() {
        let (visible, hidden) = row.split_at_mut(q0 + k % c + 1);
        visible.iter_mut().for_each(|v| *v *= scale);
        let max = visible.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        visible.iter_mut().for_each(|v| *v = exp_poly(*v - max));
        let inv = 1.0 / sum_lanes(visible);
        visible.iter_mut().for_each(|v| *v *= inv);
        hidden.fill(0.0);
    }
}

/// One token of one sequence at position `pos`: rope q and k of `qkv` ([q | k | v] heads), write k and
/// v into the caches ([KVH, capacity, hd], float16: rounded to nearest even) at `pos`, attend over
/// positions 0..=pos in f32 (the cached rows are widened exactly); out [n_heads * hd]. A one-token
/// `attend_prefill` (out's length admits exactly one token).
#[allow(clippy::too_many_arguments)]
pub fn attend_decode(
    s: AttnShape,
    qkv: &[f32],
    cos: &[f32],
    sin: &[f32],
    k_cache: &mut [f16],
    v_cache: &mut [f16],
    pos: usize,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    attend_prefill(s, qkv, cos, sin, k_cache, v_cache, pos, scale, out, 1)
}

/// One token's k (after RoPE) and v [KVH hd each, side by side in kv] written into the caches at pos,
/// rounded to float16.
fn write_new_kv(
    s: AttnShape,
    kv: &[f32],
    cos: &[f32],
    sin: &[f32],
    k_cache: &mut [f16],
    v_cache: &mut [f16],
    pos: usize,
) {
    let (hd, kv_dim) = (s.head_dim, s.n_kv_heads * s.head_dim);
    let (k_new, v_new) = kv.split_at(kv_dim);
    let mut k_row = vec![0f32; hd];
    for g in 0..s.n_kv_heads {
        let at = (g * s.capacity + pos) * hd;
        rope(&k_new[g * hd..(g + 1) * hd], cos, sin, &mut k_row);
        k_cache[at..at + hd].convert_from_f32_slice(&k_row);
        v_cache[at..at + hd].convert_from_f32_slice(&v_new[g * hd..(g + 1) * hd]);
    }
}

/// `attend_cached` compiled for the widest vectors this CPU has.
fn attend_dispatch(input: &AttnInput, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked on the line above).
            unsafe { attend_avx512(input, out) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked on the line above).
            unsafe { attend_avx2(input, out) };
            return;
        }
    }
    attend_cached::<false>(input, out);
}

/// Prefill attention of N new tokens of one sequence at positions pos0..pos0 + N: qkv [N, (H + 2 KVH)
/// hd] before RoPE, cos/sin [N, hd]. Every token's k and v are written into the caches first, then
/// each token attends over positions 0..=its own, one task per token on up to `threads` threads.
/// `attend_decode` is this for one token, so a prompt read at once and the same tokens decoded one by
/// one give the same bits.
#[allow(clippy::too_many_arguments)]
pub fn attend_prefill(
    s: AttnShape,
    qkv: &[f32],
    cos: &[f32],
    sin: &[f32],
    k_cache: &mut [f16],
    v_cache: &mut [f16],
    pos0: usize,
    scale: f32,
    out: &mut [f32],
    threads: usize,
) -> Result<()> {
    let hd = s.head_dim;
    let (q_dim, kv_dim) = (s.n_heads * hd, s.n_kv_heads * hd);
    let qkv_dim = q_dim + 2 * kv_dim;
    if s.n_kv_heads == 0 || !s.n_heads.is_multiple_of(s.n_kv_heads) || hd == 0 || !hd.is_multiple_of(2) {
        return Err(invalid("shape", format!("{s:?}: heads must be a multiple of kv heads, head_dim even")));
    }
    let n = qkv.len() / qkv_dim;
    if qkv.len() != n * qkv_dim || cos.len() != n * hd || sin.len() != n * hd || out.len() != n * q_dim {
        return Err(invalid(
            "qkv",
            format!(
                "expected qkv [N, {qkv_dim}], cos/sin [N, {hd}], out [N, {q_dim}]; got {}, {}/{}, {} values",
                qkv.len(),
                cos.len(),
                sin.len(),
                out.len()
            ),
        ));
    }
    let cache_len = s.n_kv_heads * s.capacity * hd;
    if k_cache.len() != cache_len || v_cache.len() != cache_len || pos0 + n > s.capacity {
        return Err(invalid(
            "cache",
            format!(
                "expected [{}, {}, {hd}] caches and pos0 + N <= {}, got {} values and {pos0} + {n}",
                s.n_kv_heads,
                s.capacity,
                s.capacity,
                k_cache.len()
            ),
        ));
    }
    for (i, row) in qkv.chunks_exact(qkv_dim).enumerate() {
        let (c, sn) = (&cos[i * hd..(i + 1) * hd], &sin[i * hd..(i + 1) * hd]);
        write_new_kv(s, &row[q_dim..], c, sn, k_cache, v_cache, pos0 + i);
    }
    let (k_cache, v_cache) = (&*k_cache, &*v_cache);
    let attend_token = |(i, o): (usize, &mut [f32])| {
        let (c, sn) = (&cos[i * hd..(i + 1) * hd], &sin[i * hd..(i + 1) * hd]);
        let q_raw = &qkv[i * qkv_dim..i * qkv_dim + q_dim];
        attend_dispatch(&AttnInput { s, q_raw, cos: c, sin: sn, k_cache, v_cache, pos: pos0 + i, scale }, o);
    };
    if threads > 1 && n > 1 {
        use rayon::prelude::*;
        out.par_chunks_mut(q_dim).enumerate().for_each(attend_token);
    } else {
        out.chunks_mut(q_dim).enumerate().for_each(attend_token);
    }
    Ok(())
}

/// What `attend_cached` reads: the raw queries, RoPE rows, and the caches with this token written.
struct AttnInput<'a> {
    s: AttnShape,
    q_raw: &'a [f32],
    cos: &'a [f32],
    sin: &'a [f32],
    k_cache: &'a [f16],
    v_cache: &'a [f16],
    pos: usize,
    scale: f32,
}

// The same source compiled for wider vectors: Rust fuses only the explicit `mul_add`s (into `vfmadd`
// where FMA is enabled, avx512f implying it), so every path performs the same operations in the same
// order and gives the same bits; only the speed differs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn attend_avx512(a: &AttnInput, out: &mut [f32]) {
    attend_cached::<true>(a, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn attend_avx2(a: &AttnInput, out: &mut [f32]) {
    attend_cached::<false>(a, out)
}

/// Softmax attention of each query head over positions 0..=pos. The r query heads of a kv head go
/// together, so each cached key and value row is loaded once for all r of them. AVX512: called from
/// `attend_avx512` only (the scores then come from `scores_avx512`, same bits as `dot_tree`).
#[inline(always)]
fn attend_cached<const AVX512: bool>(a: &AttnInput, out: &mut [f32]) {
    let (s, hd, n) = (a.s, a.s.head_dim, a.pos + 1);
    let r = s.n_heads / s.n_kv_heads;
    let mut q = vec![0f32; r * hd];
    let mut p = vec![0f32; r * n];
    // the generic loops take one kv head's cached rows widened to f32 (exact); AVX-512 widens in registers
    let mut rows = Vec::new();
    for g in 0..s.n_kv_heads {
        for (i, qi) in q.chunks_exact_mut(hd).enumerate() {
            let h = g * r + i;
            rope(&a.q_raw[h * hd..(h + 1) * hd], a.cos, a.sin, qi);
        }
        let keys = &a.k_cache[g * s.capacity * hd..(g * s.capacity + n) * hd];
        #[cfg(target_arch = "x86_64")]
        if AVX512 && hd.is_multiple_of(LANES) {
            // SAFETY: AVX512 is true only inside attend_avx512, which runs on CPUs with AVX-512F.
            unsafe { scores_avx512(&q, keys, hd, a.scale, &mut p) };
        } else {
            scores(&q, widen(keys, &mut rows), hd, a.scale, &mut p);
        }
        #[cfg(not(target_arch = "x86_64"))]
        scores(&q, widen(keys, &mut rows), hd, a.scale, &mut p);
        let mut inv_sums = [0f32; MAX_GROUP];
        for (i, row) in p.chunks_exact_mut(n).enumerate() {
            let max = max_lanes(row);
            row.iter_mut().for_each(|v| *v = exp_poly(*v - max));
            inv_sums[i % MAX_GROUP] = 1.0 / sum_lanes(row);
        }
        let o = &mut out[g * r * hd..(g + 1) * r * hd];
        let values = &a.v_cache[g * s.capacity * hd..(g * s.capacity + n) * hd];
        #[cfg(target_arch = "x86_64")]
        if AVX512 && hd.is_multiple_of(VALUE_BLOCK) {
            // SAFETY: AVX512 is true only inside attend_avx512, which runs on CPUs with AVX-512F.
            unsafe { weighted_values_avx512(&p, values, hd, o) };
        } else {
            weighted_values(&p, widen(values, &mut rows), hd, o);
        }
        #[cfg(not(target_arch = "x86_64"))]
        weighted_values(&p, widen(values, &mut rows), hd, o);
        for (i, oi) in o.chunks_exact_mut(hd).enumerate() {
            let inv = if r <= MAX_GROUP { inv_sums[i] } else { 1.0 / sum_lanes(&p[i * n..(i + 1) * n]) };
            oi.iter_mut().for_each(|o| *o *= inv);
        }
    }
}

/// x widened to f32 into `buf` (exact: every f16 is an f32); returns the widened slice. With F16C
/// (every AVX2 CPU this project targets) the whole slice goes through one `vcvtph2ps` loop: `half`'s
/// slice conversion calls a function per 8 values, which on AVX-512 made attention slower than the
/// float32 cache it replaced (1 sequence at context 400: 0.77-0.81 -> 0.88-0.93 ms per step).
fn widen<'a>(x: &[f16], buf: &'a mut Vec<f32>) -> &'a [f32] {
    buf.resize(x.len(), 0.0);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: the CPU has F16C (checked on the line above).
        unsafe { widen_f16c(x, buf) };
        return buf;
    }
    x.convert_to_f32_slice(buf);
    buf
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
fn widen_f16c(x: &[f16], out: &mut [f32]) {
    use std::arch::x86_64::*;
    assert_eq!(x.len(), out.len());
    let whole = x.len() - x.len() % 8;
    for i in (0..whole).step_by(8) {
        // SAFETY: i + 8 <= whole <= x.len() == out.len(), so both 8-value accesses are in bounds.
        unsafe {
            let h = _mm_loadu_si128(x.as_ptr().add(i) as *const __m128i);
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        }
    }
    for (o, v) in out[whole..].iter_mut().zip(&x[whole..]) {
        *o = v.to_f32();
    }
}

/// Cached positions per kv head `prefetch_cache` asks for.
const PREFETCH_ROWS: usize = 64;

/// Prefetch hints (into L2) for the first min(n, PREFETCH_ROWS) positions of each kv head of a cache
/// [KVH, capacity, hd]; returns the bytes asked for. No effect on results. Attention's callers ask
/// for them, once per call, where the rows are cold (py.rs: a prompt's attention after megabytes of
/// weights streamed through the caches; beyond these rows the hardware streams keep up, and
/// prefetching a whole long context only evicted itself: 97 -> 128 us at position 1000); the decode
/// step asks for every row of a layer at once instead (decode.rs `prefetch_caches`).
pub fn prefetch_cache<T>(s: AttnShape, cache: &[T], n: usize) -> usize {
    let rows = n.min(PREFETCH_ROWS).min(s.capacity);
    prefetch_rows(s, cache, rows);
    s.n_kv_heads * rows * s.head_dim * std::mem::size_of::<T>()
}

/// Prefetch hints (into L2) for the first `rows` positions of each kv head of a cache [KVH, capacity,
/// hd]; no effect on results.
pub fn prefetch_rows<T>(s: AttnShape, cache: &[T], rows: usize) {
    let (hd, rows) = (s.head_dim, rows.min(s.capacity));
    for g in 0..s.n_kv_heads {
        if let Some(head) = cache.get(g * s.capacity * hd..(g * s.capacity + rows) * hd) {
            prefetch_l2(head);
        }
    }
}

/// Prefetch hints (into L2) for every 64-byte line of x; no effect on results.
#[inline(always)]
fn prefetch_l2<T>(x: &[T]) {
    #[cfg(target_arch = "x86_64")]
    for line in x.chunks((64 / std::mem::size_of::<T>().max(1)).max(1)) {
        // SAFETY: a prefetch never faults, and the pointer is inside x.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(line.as_ptr() as *const i8) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}

/// p[i, j] = (q_i . key_j) * scale for the r queries q [r, hd] and keys [n, hd]; p [r, n].
#[inline(always)]
fn scores(q: &[f32], keys: &[f32], hd: usize, scale: f32, p: &mut [f32]) {
    let n = keys.len() / hd;
    for (j, key) in keys.chunks_exact(hd).enumerate() {
        for (i, qi) in q.chunks_exact(hd).enumerate() {
            p[i * n + j] = dot_tree(qi, key) * scale;
        }
    }
}

/// `scores` in AVX-512 registers for hd a multiple of 16, the f16 keys widened in registers (`vcvtph2ps`,
/// exact): one zmm of 16 lanes accumulates each (query, key) pair's fused multiply-adds, reduced as
/// `tree_sum` does (8 + 8, 4 + 4, 2 + 2, 1 + 1), so the bits equal the generic path's. Keys go in
/// blocks of 4 whose sums are reduced together (`sum_four`: 14 shuffles and adds for 4 scores, where
/// one at a time took 8 per score), each key chunk widened once for up to 4 queries. With the vectorized
/// `rope` and `max_lanes`: examples/attn_probe, one task at position 96 / 400, 2.04 / 6.14 -> 1.63 / 5.04 us.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn scores_avx512(q: &[f32], keys: &[f16], hd: usize, scale: f32, p: &mut [f32]) {
    use std::arch::x86_64::*;
    let (n, r) = (keys.len() / hd, q.len() / hd);
    assert!(hd.is_multiple_of(LANES) && p.len() >= r * n && keys.len() == n * hd && q.len() == r * hd);
    let whole = n - n % KEY_BLOCK;
    for j0 in (0..whole).step_by(KEY_BLOCK) {
        for i0 in (0..r).step_by(4) {
            // SAFETY: the asserts above hold, j0 + 4 <= n and the queries i0..i0 + G are within r.
            unsafe {
                match r - i0 {
                    1 => score_block::<1>(q, keys, hd, scale, p, i0, j0),
                    2 => score_block::<2>(q, keys, hd, scale, p, i0, j0),
                    3 => score_block::<3>(q, keys, hd, scale, p, i0, j0),
                    _ => score_block::<4>(q, keys, hd, scale, p, i0, j0),
                }
            }
        }
    }
    let chunks = hd / LANES;
    for j in whole..n {
        for i in 0..r {
            // SAFETY: the asserts above keep every load inside q[i * hd..(i + 1) * hd] and
            // keys[j * hd..(j + 1) * hd] (hd a multiple of 16), the store inside p.
            unsafe {
                let (qi, key_j) = (q.as_ptr().add(i * hd), keys.as_ptr().add(j * hd));
                let mut acc = _mm512_setzero_ps();
                for c in 0..chunks {
                    let k = _mm512_cvtph_ps(_mm256_loadu_si256(key_j.add(c * LANES) as *const __m256i));
                    acc = _mm512_fmadd_ps(_mm512_loadu_ps(qi.add(c * LANES)), k, acc);
                }
                let halves = _mm512_add_ps(acc, _mm512_shuffle_f32x4::<0b11_10_11_10>(acc, acc));
                let low = _mm512_castps512_ps256(halves);
                let quarters = _mm_add_ps(_mm256_castps256_ps128(low), _mm256_extractf128_ps::<1>(low));
                let eighths = _mm_add_ps(quarters, _mm_movehl_ps(quarters, quarters));
                let total = _mm_add_ss(eighths, _mm_shuffle_ps::<1>(eighths, eighths));
                *p.get_unchecked_mut(i * n + j) = _mm_cvtss_f32(total) * scale;
            }
        }
    }
}

/// Scores of queries i0..i0 + G against keys j0..j0 + 4 (`scores_avx512`): each key chunk widened once
/// for the G queries. Callers guarantee AVX-512F, `scores_avx512`'s asserts, i0 + G <= r, j0 + 4 <= n.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn score_block<const G: usize>(
    q: &[f32],
    keys: &[f16],
    hd: usize,
    scale: f32,
    p: &mut [f32],
    i0: usize,
    j0: usize,
) {
    use std::arch::x86_64::*;
    let n = keys.len() / hd;
    // SAFETY (this block): loads stay inside q[(i0 + g) * hd..(i0 + g + 1) * hd] and keys[j * hd..(j + 1) * hd]
    // for j < j0 + 4 <= n; the 4-float stores inside p[(i0 + g) * n + j0..(i0 + g) * n + j0 + 4].
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); KEY_BLOCK]; G];
        for c in (0..hd).step_by(LANES) {
            let key: [__m512; KEY_BLOCK] = std::array::from_fn(|kk| {
                _mm512_cvtph_ps(_mm256_loadu_si256(keys.as_ptr().add((j0 + kk) * hd + c) as *const __m256i))
            });
            for (g, acc) in acc.iter_mut().enumerate() {
                let qc = _mm512_loadu_ps(q.as_ptr().add((i0 + g) * hd + c));
                for (a, &k) in acc.iter_mut().zip(&key) {
                    *a = _mm512_fmadd_ps(qc, k, *a);
                }
            }
        }
        for (g, acc) in acc.into_iter().enumerate() {
            _mm_storeu_ps(p.as_mut_ptr().add((i0 + g) * n + j0), _mm_mul_ps(sum_four(acc), _mm_set1_ps(scale)));
        }
    }
}

/// Keys per block of `scores_avx512`.
const KEY_BLOCK: usize = 4;

/// The lane sums of four vectors [a, b, c, d], each as `tree_sum` adds: lane i + lane i + 8, then
/// + 4, + 2, + 1, the same additions in the same order (the shuffles only move lanes).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn sum_four(v: [std::arch::x86_64::__m512; 4]) -> std::arch::x86_64::__m128 {
    use std::arch::x86_64::*;
    // 128-bit blocks [a0 a1 b0 b1] + [a2 a3 b2 b3]: lanes i + i + 8 of a (blocks 0-1) and b (2-3)
    let ab = _mm512_add_ps(
        _mm512_shuffle_f32x4::<0b01_00_01_00>(v[0], v[1]),
        _mm512_shuffle_f32x4::<0b11_10_11_10>(v[0], v[1]),
    );
    let cd = _mm512_add_ps(
        _mm512_shuffle_f32x4::<0b01_00_01_00>(v[2], v[3]),
        _mm512_shuffle_f32x4::<0b11_10_11_10>(v[2], v[3]),
    );
    // [a b c d] first halves + second halves: i + i + 4, one block per vector
    let m = _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(ab, cd), _mm512_shuffle_f32x4::<0b11_01_11_01>(ab, cd));
    let n = _mm512_add_ps(m, _mm512_permute_ps::<0b11_10_11_10>(m)); // i + i + 2
    let total = _mm512_add_ps(n, _mm512_permute_ps::<0b11_10_00_01>(n)); // lane 0 + lane 1 of each block
    _mm512_castps512_ps128(_mm512_permutexvar_ps(
        _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0),
        total,
    ))
}

/// o_i = sum_j p[i, j] * value_j (j ascending, fused multiply-adds) for p [r, n], values [n, hd], o [r, hd].
#[inline(always)]
fn weighted_values(p: &[f32], values: &[f32], hd: usize, o: &mut [f32]) {
    let n = values.len() / hd;
    o.fill(0.0);
    for (j, value) in values.chunks_exact(hd).enumerate() {
        for (i, oi) in o.chunks_exact_mut(hd).enumerate() {
            let w = p[i * n + j];
            oi.iter_mut().zip(value).for_each(|(o, &v)| *o = w.mul_add(v, *o));
        }
    }
}

/// Columns of o one AVX-512 pass keeps in registers (4 zmm).
const VALUE_BLOCK: usize = 64;

/// `weighted_values` with 64-column blocks of o for up to 4 queries held in zmm registers over all j
/// (the generic loop loads and stores o for every j), each f16 value row widened in registers once
/// for those queries; same operations in the same order on the same (exactly widened) values, same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn weighted_values_avx512(p: &[f32], values: &[f16], hd: usize, o: &mut [f32]) {
    let (n, r) = (values.len() / hd, o.len() / hd);
    assert!(hd.is_multiple_of(VALUE_BLOCK) && p.len() >= r * n && values.len() == n * hd && o.len() == r * hd);
    for i0 in (0..r).step_by(4) {
        // SAFETY: the asserts above hold, and queries i0..i0 + G are within r.
        unsafe {
            match r - i0 {
                1 => weighted_values_queries::<1>(p, values, hd, i0, o),
                2 => weighted_values_queries::<2>(p, values, hd, i0, o),
                3 => weighted_values_queries::<3>(p, values, hd, i0, o),
                _ => weighted_values_queries::<4>(p, values, hd, i0, o),
            }
        }
    }
}

/// Queries i0..i0 + G of `weighted_values_avx512`. Callers guarantee AVX-512F, its asserts, and
/// i0 + G <= r.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn weighted_values_queries<const G: usize>(p: &[f32], values: &[f16], hd: usize, i0: usize, o: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = values.len() / hd;
    for c in (0..hd).step_by(VALUE_BLOCK) {
        // SAFETY (this block): every load stays inside values[j * hd + c..j * hd + c + 64] and
        // p[(i0 + g) * n + j], every store inside o[(i0 + g) * hd + c..(i0 + g) * hd + c + 64].
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 4]; G];
            for j in 0..n {
                let v = values.as_ptr().add(j * hd + c);
                let value: [__m512; 4] =
                    std::array::from_fn(|k| _mm512_cvtph_ps(_mm256_loadu_si256(v.add(16 * k) as *const __m256i)));
                for (g, acc) in acc.iter_mut().enumerate() {
                    let w = _mm512_set1_ps(*p.get_unchecked((i0 + g) * n + j));
                    for (a, &value) in acc.iter_mut().zip(&value) {
                        *a = _mm512_fmadd_ps(w, value, *a);
                    }
                }
            }
            for (g, acc) in acc.iter().enumerate() {
                for (k, acc) in acc.iter().enumerate() {
                    _mm512_storeu_ps(o.as_mut_ptr().add((i0 + g) * hd + c + 16 * k), *acc);
                }
            }
        }
    }
}

/// Query heads per kv head whose softmax sums are kept on the stack (more are summed again).
const MAX_GROUP: usize = 16;

/// sum a[i] * b[i] in 16 lanes of fused multiply-adds, the lanes added as a tree (halves, quarters,
/// ...: vector shuffles, not 15 dependent scalar adds).
#[inline(always)]
fn dot_tree(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    for (i, (x, y)) in ra.iter().zip(rb).enumerate() {
        acc[i] = x.mul_add(*y, acc[i]);
    }
    tree_sum(acc)
}

#[inline(always)]
fn tree_sum(mut acc: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            acc[i] += acc[i + width];
        }
        width /= 2;
    }
    acc[0]
}

/// The largest value of x (NaNs skipped, as f32::max does; -inf for none), in 16 lanes: a maximum is
/// exact in any order, and `f32::max`'s NaN rule kept a plain fold scalar.
#[inline(always)]
fn max_lanes(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    for (a, &v) in acc.iter_mut().zip(chunks.remainder()) {
        *a = if v > *a { v } else { *a };
    }
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    acc.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

#[inline(always)]
fn sum_lanes(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    for (i, &v) in chunks.remainder().iter().enumerate() {
        acc[i] += v;
    }
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    tree_sum(acc)
}

/// e^x within 2 ulp: x = n ln2 + t with |t| <= ln2 / 2, e^t by the Cephes expf polynomial, times 2^n
/// from the exponent bits. Branch-free, so loops of it vectorize (libm's expf is a call per element).
/// x is clamped to [-87, 88]: e^-87 ~ 1.6e-38 is nothing in a softmax sum, and silu(g) = g / (1 + e^-g)
/// for g < -88 is ~1e-36 instead of ~0; NaN stays NaN.
#[inline(always)]
fn exp_poly(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let magic_bits = ROUND_MAGIC.to_bits() as i32;
    let shifted = x * LOG2E + ROUND_MAGIC;
    let n = shifted - ROUND_MAGIC; // round(x / ln2), ties to even
    let t = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * t + 1.398_199_9e-3;
    p = p * t + 8.333_452e-3;
    p = p * t + 4.166_579_6e-2;
    p = p * t + 1.666_666_5e-1;
    p = p * t + 0.5;
    let e_t = p * t * t + t + 1.0;
    let two_n = f32::from_bits(((shifted.to_bits() as i32 - magic_bits + 127) << 23) as u32);
    e_t * two_n
}

/// 1.5 * 2^23: adding it rounds an f32 of magnitude < 2^22 to an integer held in the low mantissa bits.
const ROUND_MAGIC: f32 = 12_582_912.0;

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32], tol: f32) {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "index {i}: {x} vs {y}");
        }
    }

    #[test]
    fn rms_norm_and_silu_match_the_definition() {
        let x: Vec<f32> = (0..2 * 40).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..40).map(|i| 0.5 + i as f32 * 0.01).collect();
        let mut out = vec![0f32; 80];
        rms_norm(&x, &w, 1e-5, &mut out).unwrap();
        for n in 0..2 {
            let row = &x[n * 40..(n + 1) * 40];
            let ms = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / 40.0;
            let want: Vec<f32> =
                row.iter().zip(&w).map(|(v, w)| (*v as f64 / (ms + 1e-5).sqrt() * *w as f64) as f32).collect();
            close(&out[n * 40..(n + 1) * 40], &want, 1e-6);
        }
        let mut a = vec![0f32; 40];
        silu_mul(&x, 20, &mut a).unwrap();
        for n in 0..2 {
            for i in 0..20 {
                let (g, u) = (x[n * 40 + i] as f64, x[n * 40 + 20 + i] as f64);
                close(&a[n * 20 + i..n * 20 + i + 1], &[(g / (1.0 + (-g).exp()) * u) as f32], 1e-6);
            }
        }
        assert!(rms_norm(&x[..39], &w, 1e-5, &mut out[..39]).is_err());
    }

    #[test]
    fn large_calls_split_over_threads_give_the_same_bits() {
        // sizes past PARALLEL_MIN_VALUES take the parallel path; rows one at a time take the serial one
        let value = |i: usize| ((i * 7919 % 2003) as f32 - 1001.0) * 0.003;
        let (d, n_rows) = (768, 97);
        let x: Vec<f32> = (0..d * n_rows).map(value).collect();
        let w: Vec<f32> = (0..d).map(|i| 0.5 + (i % 7) as f32 * 0.1).collect();
        let mut got = vec![0f32; x.len()];
        rms_norm(&x, &w, 1e-5, &mut got).unwrap();
        for (row, g) in x.chunks_exact(d).zip(got.chunks_exact(d)) {
            let mut want = vec![0f32; d];
            rms_norm(row, &w, 1e-5, &mut want).unwrap();
            assert_eq!(g, &want[..]);
        }
        let f = 2688;
        let gu: Vec<f32> = (0..2 * f * 13).map(value).collect();
        let mut got = vec![0f32; f * 13];
        silu_mul(&gu, f, &mut got).unwrap();
        for (row, g) in gu.chunks_exact(2 * f).zip(got.chunks_exact(f)) {
            let mut want = vec![0f32; f];
            silu_mul(row, f, &mut want).unwrap();
            assert_eq!(g, &want[..]);
        }
        let (n, m) = (3, 40_000 + 77);
        let xs: Vec<f32> = (0..n * m).map(value).collect();
        let (h_pre, h_post) = (vec![0.4f32, 0.35, 0.25], vec![0.9f32, 1.1, 0.7]);
        let h_res: Vec<f32> = (0..n * n).map(|i| 0.2 + i as f32 * 0.07).collect();
        let mut got = vec![0f32; m];
        mhc_read(&xs, &h_pre, &mut got).unwrap();
        let want: Vec<f32> =
            (0..m).map(|e| (1..n).fold(h_pre[0] * xs[e], |acc, i| acc + h_pre[i] * xs[i * m + e])).collect();
        assert_eq!(got, want);
        let y: Vec<f32> = (0..m).map(|i| value(i + 5)).collect();
        let mut got = xs.clone();
        mhc_write(&mut got, &y, &h_res, &h_post).unwrap();
        let mut want = xs.clone();
        let mut streams: Vec<&mut [f32]> = want.chunks_exact_mut(m).collect();
        mhc_write_part(&mut streams, &y, &h_res, &h_post);
        assert_eq!(got, want);
    }

    #[test]
    fn mhc_read_and_write_match_the_definition() {
        let (n, m) = (3, 300); // more than one MHC_BLOCK, and a partial one
        let xs: Vec<f32> = (0..n * m).map(|i| (i as f32 * 0.13).sin()).collect();
        let y: Vec<f32> = (0..m).map(|i| (i as f32 * 0.07).cos()).collect();
        let (h_pre, h_post) = ([0.5f32, 0.25, 0.75], [1.5f32, 0.5, 1.0]);
        let h_res = [0.6f32, 0.3, 0.1, 0.2, 0.5, 0.3, 0.2, 0.2, 0.6];
        let mut u = vec![0f32; m];
        mhc_read(&xs, &h_pre, &mut u).unwrap();
        let mut written = xs.clone();
        mhc_write(&mut written, &y, &h_res, &h_post).unwrap();
        for k in 0..m {
            assert_eq!(u[k], h_pre[0] * xs[k] + h_pre[1] * xs[m + k] + h_pre[2] * xs[2 * m + k]);
            for i in 0..n {
                let mixed = h_res[i * n] * xs[k] + h_res[i * n + 1] * xs[m + k] + h_res[i * n + 2] * xs[2 * m + k];
                assert_eq!(written[i * m + k], mixed + h_post[i] * y[k], "stream {i} element {k}");
            }
        }
        assert!(mhc_read(&xs[1..], &h_pre, &mut u).is_err());
        assert!(mhc_write(&mut written, &y, &h_res[1..], &h_post).is_err());
    }

    fn got_p(x: &[f32], r: usize, n: usize) -> Vec<f32> {
        x[..r * n].iter().map(|v| v.abs() / n as f32).collect()
    }

    #[test]
    fn widening_equals_the_exact_conversion() {
        // every f16 bit pattern but NaNs (whose payload bits need not survive), at lengths that leave tails
        let all: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).filter(|v| !v.is_nan()).collect();
        for len in [0, 1, 7, 8, 9, 61, all.len()] {
            let x = &all[all.len() - len..];
            let mut buf = Vec::new();
            let got = widen(x, &mut buf).to_vec();
            let want: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn avx512_scores_and_values_equal_the_generic_ones() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("skipping: this CPU lacks AVX-512F");
            return;
        }
        // r > 4 goes in groups of 4 queries; keys in blocks of 4 and a tail of 1-3 single keys (or none)
        for (r, n, hd) in [(3, 37, 64), (1, 5, 128), (7, 19, 64), (2, 11, 256), (4, 8, 128)] {
            let half = |v: Vec<f32>| -> Vec<f16> { v.into_iter().map(f16::from_f32).collect() };
            let wide = |v: &[f16]| -> Vec<f32> { v.iter().map(|x| x.to_f32()).collect() };
            let q: Vec<f32> = (0..r * hd).map(|i| (i as f32 * 0.31).sin()).collect();
            let keys = half((0..n * hd).map(|i| (i as f32 * 0.17).cos()).collect());
            let (mut want, mut got) = (vec![0f32; r * n], vec![0f32; r * n]);
            scores(&q, &wide(&keys), hd, 0.125, &mut want);
            // SAFETY: AVX-512F is present (checked above).
            unsafe { scores_avx512(&q, &keys, hd, 0.125, &mut got) };
            assert_eq!(got, want, "scores r {r} hd {hd}");
            let values = half((0..n * hd).map(|i| (i as f32 * 0.23).sin()).collect());
            let (mut want, mut got) = (vec![0f32; r * hd], vec![1f32; r * hd]);
            let p = got_p(&wide(&keys), r, n);
            weighted_values(&p, &wide(&values), hd, &mut want);
            // SAFETY: AVX-512F is present (checked above).
            unsafe { weighted_values_avx512(&p, &values, hd, &mut got) };
            assert_eq!(got, want, "values r {r} hd {hd}");
        }
    }

    #[test]
    fn rope_rows_and_causal_softmax_match_the_definitions() {
        let (n, row, hd) = (3, 5 * 8, 8);
        let x: Vec<f32> = (0..n * row).map(|i| (i as f32 * 0.37).sin()).collect();
        let cos: Vec<f32> = (0..n * hd).map(|i| (i as f32 * 0.11).cos()).collect();
        let sin: Vec<f32> = (0..n * hd).map(|i| (i as f32 * 0.13).sin()).collect();
        let mut got = x.clone();
        rope_rows(&mut got, row, 4, &cos, &sin).unwrap();
        for t in 0..n {
            for h in 0..5 {
                let at = t * row + h * hd;
                let mut want = x[at..at + hd].to_vec();
                if h < 4 {
                    rope(&x[at..at + hd], &cos[t * hd..(t + 1) * hd], &sin[t * hd..(t + 1) * hd], &mut want);
                }
                assert_eq!(&got[at..at + hd], &want[..], "token {t} head {h}");
            }
        }
        assert!(rope_rows(&mut got, row, 6, &cos, &sin).is_err());
        let (s_len, c, q0) = (7, 3, 2);
        let scores: Vec<f32> = (0..2 * c * s_len).map(|i| (i as f32 * 0.7).sin() * 4.0).collect();
        let mut p = scores.clone();
        causal_softmax(&mut p, s_len, c, q0, 0.5).unwrap();
        for k in 0..2 * c {
            let visible = q0 + k % c + 1;
            let row = &scores[k * s_len..(k + 1) * s_len];
            let m = row[..visible].iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64 * 0.5));
            let z: f64 = row[..visible].iter().map(|&v| (v as f64 * 0.5 - m).exp()).sum();
            for j in 0..s_len {
                let want = if j < visible { ((row[j] as f64 * 0.5 - m).exp() / z) as f32 } else { 0.0 };
                close(&p[k * s_len + j..k * s_len + j + 1], &[want], 1e-6);
            }
        }
        assert!(causal_softmax(&mut p, s_len, c, 5, 0.5).is_err());
    }

    #[test]
    fn exp_poly_is_within_two_ulp() {
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let (got, want) = (exp_poly(x) as f64, (x as f64).exp());
            assert!((got - want).abs() <= 2.0 * f32::EPSILON as f64 * want, "exp({x}) = {got}, want {want}");
        }
        for i in 0..=100_000 {
            let x = 88.0 * i as f32 / 100_000.0;
            let (got, want) = (exp_poly(x) as f64, (x as f64).exp());
            assert!((got - want).abs() <= 2.0 * f32::EPSILON as f64 * want, "exp({x}) = {got}, want {want}");
        }
        assert_eq!(exp_poly(0.0), 1.0);
        assert!(exp_poly(-1000.0) < 1e-37);
        assert!(exp_poly(1000.0).is_finite() && exp_poly(f32::NAN).is_nan());
    }

    /// A prompt's attention read at once equals its tokens decoded one by one, bit for bit (caches too),
    /// on 1 and 2 threads; a prompt past the cache is an error that names the sizes.
    #[test]
    fn prefill_attention_equals_decoding_token_by_token() {
        let (hd, cap, n, pos0) = (16, 12, 5, 3);
        let s = AttnShape { n_heads: 6, n_kv_heads: 2, head_dim: hd, capacity: cap };
        let qkv_dim = (6 + 4) * hd;
        let qkv: Vec<f32> = (0..n * qkv_dim).map(|i| (i as f32 * 0.173).sin() * 1.7).collect();
        let cos: Vec<f32> = (0..n * hd).map(|i| (i as f32 * 0.05).cos()).collect();
        let sin: Vec<f32> = (0..n * hd).map(|i| (i as f32 * 0.05).sin()).collect();
        let k0: Vec<f16> = (0..2 * cap * hd).map(|i| f16::from_f32((i as f32 * 0.11).cos())).collect();
        let v0: Vec<f16> = (0..2 * cap * hd).map(|i| f16::from_f32((i as f32 * 0.07).sin())).collect();
        let (mut k_want, mut v_want) = (k0.clone(), v0.clone());
        let mut want = vec![0f32; n * 6 * hd];
        for i in 0..n {
            let (c, sn) = (&cos[i * hd..(i + 1) * hd], &sin[i * hd..(i + 1) * hd]);
            let out = &mut want[i * 6 * hd..(i + 1) * 6 * hd];
            let q = &qkv[i * qkv_dim..(i + 1) * qkv_dim];
            attend_decode(s, q, c, sn, &mut k_want, &mut v_want, pos0 + i, 0.25, out).unwrap();
        }
        for threads in [1, 2] {
            let (mut k, mut v) = (k0.clone(), v0.clone());
            let mut got = vec![0f32; n * 6 * hd];
            attend_prefill(s, &qkv, &cos, &sin, &mut k, &mut v, pos0, 0.25, &mut got, threads).unwrap();
            assert_eq!(got, want, "{threads} threads");
            assert_eq!((k, v), (k_want.clone(), v_want.clone()), "{threads} threads: caches");
        }
        let (mut k, mut v) = (k0.clone(), v0.clone());
        let mut got = vec![0f32; n * 6 * hd];
        let err = attend_prefill(s, &qkv, &cos, &sin, &mut k, &mut v, cap - 2, 0.25, &mut got, 1).unwrap_err();
        assert!(err.to_string().contains("pos0 + N <= 12, got 384 values and 10 + 5"), "{err}");
    }

    #[test]
    fn attention_matches_the_definition() {
        let s = AttnShape { n_heads: 4, n_kv_heads: 2, head_dim: 8, capacity: 6 };
        let (hd, pos) = (8, 3);
        let mut k_cache: Vec<f16> = (0..2 * 6 * hd).map(|i| f16::from_f32((i as f32 * 0.11).cos())).collect();
        let mut v_cache: Vec<f16> = (0..2 * 6 * hd).map(|i| f16::from_f32((i as f32 * 0.07).sin())).collect();
        let qkv: Vec<f32> = (0..(4 + 4) * hd).map(|i| (i as f32 * 0.29).sin()).collect();
        let cos: Vec<f32> = (0..hd).map(|i| ((i % 4) as f32 * 0.3).cos()).collect();
        let sin: Vec<f32> =
            (0..hd).map(|i| if i < 4 { -(i as f32 * 0.3).sin() } else { ((i - 4) as f32 * 0.3).sin() }).collect();
        let mut out = vec![0f32; 4 * hd];
        attend_decode(s, &qkv, &cos, &sin, &mut k_cache, &mut v_cache, pos, 0.5, &mut out).unwrap();
        let rot = |x: &[f32]| -> Vec<f64> {
            (0..hd).map(|i| x[i] as f64 * cos[i] as f64 + x[(i + hd / 2) % hd] as f64 * sin[i] as f64).collect()
        };
        for g in 0..2 {
            let at = (g * 6 + pos) * hd;
            // written rounded to float16 (relative error <= 2^-11)
            let k_written: Vec<f32> = k_cache[at..at + hd].iter().map(|v| v.to_f32()).collect();
            close(
                &k_written,
                &rot(&qkv[(4 + g) * hd..(5 + g) * hd]).iter().map(|v| *v as f32).collect::<Vec<_>>(),
                1e-3,
            );
            let v_want: Vec<f16> = qkv[(6 + g) * hd..(7 + g) * hd].iter().map(|&v| f16::from_f32(v)).collect();
            assert_eq!(&v_cache[at..at + hd], &v_want[..]);
        }
        for h in 0..4 {
            let g = h / 2;
            let q = rot(&qkv[h * hd..(h + 1) * hd]);
            let scores: Vec<f64> = (0..=pos)
                .map(|j| (0..hd).map(|d| q[d] * k_cache[(g * 6 + j) * hd + d].to_f64()).sum::<f64>() * 0.5)
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|v| (v - m).exp()).collect();
            let z: f64 = e.iter().sum();
            let want: Vec<f32> = (0..hd)
                .map(|d| ((0..=pos).map(|j| e[j] / z * v_cache[(g * 6 + j) * hd + d].to_f64()).sum::<f64>()) as f32)
                .collect();
            close(&out[h * hd..(h + 1) * hd], &want, 1e-5);
        }
        // the generic build of the same source gives the same bits as the dispatched (AVX) one
        let mut generic = vec![0f32; 4 * hd];
        let input = AttnInput {
            s,
            q_raw: &qkv[..4 * hd],
            cos: &cos,
            sin: &sin,
            k_cache: &k_cache,
            v_cache: &v_cache,
            pos,
            scale: 0.5,
        };
        attend_cached::<false>(&input, &mut generic);
        assert_eq!(generic, out);
        assert!(attend_decode(s, &qkv, &cos, &sin, &mut k_cache, &mut v_cache, 6, 0.5, &mut out).is_err());
    }
}
