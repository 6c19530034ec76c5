//! The engine's small float ops between the matmuls, fused: RMSNorm, SiLU(gate) * up, the mHC
//! stream read and write, and one decode step of attention (RoPE, KV-cache write, single-query GQA
//! softmax attention).
//!
//! In numpy each of these is 5-15 array ops of a microsecond or more per token and layer; here each
//! is one call. The arithmetic follows python/nanochat/engine/model.py (same formulas in f32; sums
//! are taken in 16 lanes, so the last bits can differ from numpy's order).

use crate::error::{invalid, Result};

const LANES: usize = 16;

/// sum a[i] * b[i] in 16 independent lanes (vectorizes without fast-math), lanes added at the end.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// out[n, :] = x[n, :] * (1 / sqrt(mean(x[n]^2) + eps)) * weight, for rows of weight.len().
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) -> Result<()> {
    let d = weight.len();
    if d == 0 || !x.len().is_multiple_of(d) || out.len() != x.len() {
        return Err(invalid("x", format!("expected rows of {d} values (the weight's length), got {}", x.len())));
    }
    for (row, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let inv = 1.0 / (dot(row, row) * (1.0 / d as f32) + eps).sqrt();
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(weight) {
            *o = v * inv * w;
        }
    }
    Ok(())
}

/// out [N, F] = silu(gu[:, :F]) * gu[:, F:] for gu [N, 2F], silu(g) = g / (1 + exp(-g)).
pub fn silu_mul(gu: &[f32], f: usize, out: &mut [f32]) -> Result<()> {
    if f == 0 || !gu.len().is_multiple_of(2 * f) || out.len() != gu.len() / 2 {
        return Err(invalid("gu", format!("expected rows of 2 x {f} values, got {}", gu.len())));
    }
    for (row, o) in gu.chunks_exact(2 * f).zip(out.chunks_exact_mut(f)) {
        let (g, u) = row.split_at(f);
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + (-g).exp()) * u;
        }
    }
    Ok(())
}

/// mHC read: out [M] = sum_i h_pre[i] * xs[i] for n = h_pre.len() streams xs [n][M], streams added
/// in order with separate multiply and add. Prefill and decode both call this (per element, so the
/// token count cannot change a result): their residual streams agree bit for bit.
pub fn mhc_read(xs: &[f32], h_pre: &[f32], out: &mut [f32]) -> Result<()> {
    let (n, m) = (h_pre.len(), out.len());
    if n == 0 || xs.len() != n * m {
        return Err(invalid("xs", format!("expected {n} streams of {m} values, got {} values", xs.len())));
    }
    for (o, &x) in out.iter_mut().zip(&xs[..m]) {
        *o = h_pre[0] * x;
    }
    for (i, stream) in xs.chunks_exact(m).enumerate().skip(1) {
        for (o, &x) in out.iter_mut().zip(stream) {
            *o += h_pre[i] * x;
        }
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
    let mut old = vec![0f32; n * MHC_BLOCK];
    for start in (0..m).step_by(MHC_BLOCK) {
        let len = MHC_BLOCK.min(m - start);
        for j in 0..n {
            old[j * MHC_BLOCK..j * MHC_BLOCK + len].copy_from_slice(&xs[j * m + start..j * m + start + len]);
        }
        for i in 0..n {
            let out = &mut xs[i * m + start..i * m + start + len];
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
    Ok(())
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
fn rope(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let half = x.len() / 2;
    for i in 0..x.len() {
        let swapped = if i < half { x[i + half] } else { x[i - half] };
        out[i] = x[i] * cos[i] + swapped * sin[i];
    }
}

/// One token of one sequence at position `pos`: rope q and k of `qkv` ([q | k | v] heads), write k and
/// v into the caches ([KVH, capacity, hd]) at `pos`, attend over positions 0..=pos; out [n_heads * hd].
#[allow(clippy::too_many_arguments)]
pub fn attend_decode(
    s: AttnShape,
    qkv: &[f32],
    cos: &[f32],
    sin: &[f32],
    k_cache: &mut [f32],
    v_cache: &mut [f32],
    pos: usize,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    let hd = s.head_dim;
    let (q_dim, kv_dim) = (s.n_heads * hd, s.n_kv_heads * hd);
    let cache_len = s.n_kv_heads * s.capacity * hd;
    if s.n_kv_heads == 0 || !s.n_heads.is_multiple_of(s.n_kv_heads) || !hd.is_multiple_of(2) {
        return Err(invalid("shape", format!("{s:?}: heads must be a multiple of kv heads, head_dim even")));
    }
    if qkv.len() != q_dim + 2 * kv_dim || cos.len() != hd || sin.len() != hd || out.len() != q_dim {
        return Err(invalid(
            "qkv",
            format!(
                "expected qkv {} values, cos/sin {hd}, out {q_dim}; got {}, {}/{}, {}",
                q_dim + 2 * kv_dim,
                qkv.len(),
                cos.len(),
                sin.len(),
                out.len()
            ),
        ));
    }
    if k_cache.len() != cache_len || v_cache.len() != cache_len || pos >= s.capacity {
        return Err(invalid(
            "cache",
            format!(
                "expected [{}, {}, {hd}] caches and pos < {}, got {} values and pos {pos}",
                s.n_kv_heads,
                s.capacity,
                s.capacity,
                k_cache.len()
            ),
        ));
    }
    let (q_raw, kv) = qkv.split_at(q_dim);
    let (k_new, v_new) = kv.split_at(kv_dim);
    for g in 0..s.n_kv_heads {
        let at = (g * s.capacity + pos) * hd;
        rope(&k_new[g * hd..(g + 1) * hd], cos, sin, &mut k_cache[at..at + hd]);
        v_cache[at..at + hd].copy_from_slice(&v_new[g * hd..(g + 1) * hd]);
    }
    let r = s.n_heads / s.n_kv_heads;
    let mut q = vec![0f32; hd];
    let mut p = vec![0f32; pos + 1];
    for h in 0..s.n_heads {
        let g = h / r;
        rope(&q_raw[h * hd..(h + 1) * hd], cos, sin, &mut q);
        let keys = &k_cache[g * s.capacity * hd..(g * s.capacity + pos + 1) * hd];
        let values = &v_cache[g * s.capacity * hd..(g * s.capacity + pos + 1) * hd];
        let mut max = f32::NEG_INFINITY;
        for (pj, key) in p.iter_mut().zip(keys.chunks_exact(hd)) {
            *pj = dot(&q, key) * scale;
            max = max.max(*pj);
        }
        let mut sum = 0f32;
        for pj in p.iter_mut() {
            *pj = (*pj - max).exp();
            sum += *pj;
        }
        let o = &mut out[h * hd..(h + 1) * hd];
        o.fill(0.0);
        for (&pj, value) in p.iter().zip(values.chunks_exact(hd)) {
            let w = pj / sum;
            for (o, &v) in o.iter_mut().zip(value) {
                *o += w * v;
            }
        }
    }
    Ok(())
}

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

    #[test]
    fn attention_matches_the_definition() {
        let s = AttnShape { n_heads: 4, n_kv_heads: 2, head_dim: 8, capacity: 6 };
        let (hd, pos) = (8, 3);
        let mut k_cache: Vec<f32> = (0..2 * 6 * hd).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut v_cache: Vec<f32> = (0..2 * 6 * hd).map(|i| (i as f32 * 0.07).sin()).collect();
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
            close(
                &k_cache[at..at + hd],
                &rot(&qkv[(4 + g) * hd..(5 + g) * hd]).iter().map(|v| *v as f32).collect::<Vec<_>>(),
                1e-6,
            );
            assert_eq!(&v_cache[at..at + hd], &qkv[(6 + g) * hd..(7 + g) * hd]);
        }
        for h in 0..4 {
            let g = h / 2;
            let q = rot(&qkv[h * hd..(h + 1) * hd]);
            let scores: Vec<f64> = (0..=pos)
                .map(|j| (0..hd).map(|d| q[d] * k_cache[(g * 6 + j) * hd + d] as f64).sum::<f64>() * 0.5)
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|v| (v - m).exp()).collect();
            let z: f64 = e.iter().sum();
            let want: Vec<f32> = (0..hd)
                .map(|d| ((0..=pos).map(|j| e[j] / z * v_cache[(g * 6 + j) * hd + d] as f64).sum::<f64>()) as f32)
                .collect();
            close(&out[h * hd..(h + 1) * hd], &want, 1e-5);
        }
        assert!(attend_decode(s, &qkv, &cos, &sin, &mut k_cache, &mut v_cache, 6, 0.5, &mut out).is_err());
    }
}
