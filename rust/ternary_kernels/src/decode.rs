//! The decode step of a transformer: B sequences, one new token each, through a layer (or the whole
//! model) in one call, so Python pays one call per step instead of ~13 per layer.
//!
//! A `DecodeLayer` is built once from the layer's packed matrices (shared, not copied), its norms and
//! its mHC matrices; `step` runs attention and FFN in place on the residual streams xs [n, B, D]
//! (python/nanochat/engine/model.py, docs/contracts.md):
//!
//! ```text
//! u = mhc_read(xs)  h = rms_norm(u)  qkv = W_qkv h  a = attend_decode(qkv) per sequence
//! y = W_o subnorm?(a)  xs = mhc_write(xs, y)          (then the same with gate_up, silu_mul, down)
//! ```
//!
//! Every piece is the function the prefill path calls (layer_ops.rs, ops.rs), row for row, and the
//! prefill's attention (`layer_ops::attend_prefill`) is this step's attention token by token, so a
//! decoded token gets the same residual stream as the same token in a prefill. `DecodeModel` chains
//! the layers, then the stream mean, the output norm and the int8 head. Each stage's time is summed
//! for benches/bench_engine.py.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use half::f16;

use rayon::prelude::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{invalid, Result};
use crate::kernels::Isa;
use crate::layer_ops::{self, AttnShape};
use crate::ops;
use crate::pack::{PackedInt8, PackedTernary};

/// The stages `StageTimes` tells apart, in report order.
pub const STAGES: [&str; 7] = ["qkv", "attention", "o", "gate_up", "down", "head", "norms, mHC, SiLU"];
const QKV: usize = 0;
const ATTENTION: usize = 1;
const O: usize = 2;
const GATE_UP: usize = 3;
const DOWN: usize = 4;
const HEAD: usize = 5;
const ELEMENTWISE: usize = 6;

/// Nanoseconds spent in each stage, summed over calls (atomics: a step may run on any thread). When a
/// batch is split by sequences (`DecodeModel::layers_by_sequences`) the threads add their own times,
/// so the layer stages then sum thread time, not wall time.
#[derive(Default)]
pub struct StageTimes {
    ns: [AtomicU64; STAGES.len()],
}

impl StageTimes {
    fn add(&self, stage: usize, since: Instant) -> Instant {
        let now = Instant::now();
        self.ns[stage].fetch_add((now - since).as_nanos() as u64, Ordering::Relaxed);
        now
    }

    /// Seconds per stage, in STAGES order.
    pub fn seconds(&self) -> Vec<f64> {
        self.ns.iter().map(|ns| ns.load(Ordering::Relaxed) as f64 * 1e-9).collect()
    }

    pub fn reset(&self) {
        self.ns.iter().for_each(|ns| ns.store(0, Ordering::Relaxed));
    }
}

/// One sublayer's mHC matrices: h_pre [n], h_post [n], h_res [n, n] row-major.
pub struct Mhc {
    pub h_pre: Vec<f32>,
    pub h_post: Vec<f32>,
    pub h_res: Vec<f32>,
}

/// Everything of one layer the decode step reads. Norm weights are f32 [D] (sub-norms [H hd], [F]).
pub struct LayerParts {
    pub attn_norm: Vec<f32>,
    pub qkv: Arc<PackedTernary>,
    pub o: Arc<PackedTernary>,
    pub attn_sub_norm: Option<Vec<f32>>,
    pub attn_mhc: Option<Mhc>,
    pub ffn_norm: Vec<f32>,
    pub gate_up: Arc<PackedTernary>,
    pub down: Arc<PackedTernary>,
    pub ffn_sub_norm: Option<Vec<f32>>,
    pub ffn_mhc: Option<Mhc>,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub eps: f32,
    /// Attention score scale, 1 / sqrt(head_dim) in the model.
    pub scale: f32,
}

/// One sequence's KV cache (float16) and where the new token goes: k and v [KVH, capacity, hd] for a
/// `DecodeLayer`, [L, KVH, capacity, hd] for a `DecodeModel` (which hands each layer its slice).
pub struct SeqCache<'a> {
    pub k: &'a mut [f16],
    pub v: &'a mut [f16],
    pub pos: usize,
}

/// RoPE rows of the new tokens: full-width cos and sin [B, hd] (model.py's tables).
pub struct Rope<'a> {
    pub cos: &'a [f32],
    pub sin: &'a [f32],
}

/// Kernel path and thread count for the matmuls (ops.rs schedules them).
#[derive(Clone, Copy)]
pub struct Exec {
    pub isa: Isa,
    pub threads: usize,
}

pub struct DecodeLayer {
    p: LayerParts,
    dim: usize,
    head_dim: usize,
    streams: usize,
    pub times: StageTimes,
}

fn check_len(arg: &'static str, got: usize, want: usize, what: &str) -> Result<()> {
    if got != want {
        return Err(invalid(arg, format!("expected {want} values ({what}), got {got}")));
    }
    Ok(())
}

fn check_mhc(arg: &'static str, mhc: &Option<Mhc>) -> Result<usize> {
    let Some(m) = mhc else { return Ok(1) };
    let n = m.h_pre.len();
    if n == 0 || m.h_post.len() != n || m.h_res.len() != n * n {
        return Err(invalid(
            arg,
            format!(
                "expected h_pre [n], h_post [n], h_res [n, n] with n > 0, got {}, {}, {} values",
                n,
                m.h_post.len(),
                m.h_res.len()
            ),
        ));
    }
    Ok(n)
}

impl DecodeLayer {
    /// Check that the parts fit together (every message names the part, expected vs got).
    pub fn new(p: LayerParts) -> Result<DecodeLayer> {
        let dim = p.attn_norm.len();
        let (h, kvh) = (p.n_heads, p.n_kv_heads);
        if dim == 0 || kvh == 0 || h == 0 || !h.is_multiple_of(kvh) {
            return Err(invalid(
                "n_heads",
                format!("expected n_heads a positive multiple of n_kv_heads and D > 0, got {h}, {kvh}, D = {dim}"),
            ));
        }
        let qkv = p.qkv.shape;
        if qkv.cols != dim || !qkv.rows.is_multiple_of(h + 2 * kvh) || !(qkv.rows / (h + 2 * kvh)).is_multiple_of(2) {
            return Err(invalid(
                "qkv",
                format!(
                    "expected [(n_heads + 2 n_kv_heads) hd, D] = [{} x even hd, {dim}], got [{}, {}]",
                    h + 2 * kvh,
                    qkv.rows,
                    qkv.cols
                ),
            ));
        }
        let head_dim = qkv.rows / (h + 2 * kvh);
        let shape = |arg: &'static str, m: &PackedTernary, rows: usize, cols: usize| -> Result<()> {
            if m.shape.rows != rows || m.shape.cols != cols {
                return Err(invalid(
                    arg,
                    format!("expected [{rows}, {cols}], got [{}, {}]", m.shape.rows, m.shape.cols),
                ));
            }
            Ok(())
        };
        shape("o", &p.o, dim, h * head_dim)?;
        let ffn = p.gate_up.shape.rows / 2;
        if p.gate_up.shape.cols != dim || !p.gate_up.shape.rows.is_multiple_of(2) {
            return Err(invalid(
                "gate_up",
                format!(
                    "expected [2 F, {dim}] (gate rows then up rows), got [{}, {}]",
                    p.gate_up.shape.rows, p.gate_up.shape.cols
                ),
            ));
        }
        shape("down", &p.down, dim, ffn)?;
        check_len("ffn_norm", p.ffn_norm.len(), dim, "D, attn_norm's length")?;
        if let Some(w) = &p.attn_sub_norm {
            check_len("attn_sub_norm", w.len(), h * head_dim, "n_heads x head_dim")?;
        }
        if let Some(w) = &p.ffn_sub_norm {
            check_len("ffn_sub_norm", w.len(), ffn, "F, half of gate_up's rows")?;
        }
        let streams = check_mhc("attn_mhc", &p.attn_mhc)?;
        if check_mhc("ffn_mhc", &p.ffn_mhc)? != streams {
            return Err(invalid("ffn_mhc", format!("expected the same stream count as attn_mhc ({streams})")));
        }
        Ok(DecodeLayer { p, dim, head_dim, streams, times: StageTimes::default() })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    pub fn n_kv_heads(&self) -> usize {
        self.p.n_kv_heads
    }

    /// n, the residual streams (1: plain residual).
    pub fn streams(&self) -> usize {
        self.streams
    }

    /// The normed sublayer input [B, D] from the streams xs [n, B, D].
    fn read_norm(&self, xs: &[f32], mhc: &Option<Mhc>, weight: &[f32]) -> Result<Vec<f32>> {
        let mut out = vec![0f32; xs.len() / self.streams];
        match mhc {
            None => layer_ops::rms_norm(xs, weight, self.p.eps, &mut out)?,
            Some(m) => {
                let mut u = vec![0f32; out.len()];
                layer_ops::mhc_read(xs, &m.h_pre, &mut u)?;
                layer_ops::rms_norm(&u, weight, self.p.eps, &mut out)?;
            }
        }
        Ok(out)
    }

    /// The sublayer output y [B, D] back into the streams (plain residual: xs += y, as numpy's xs + y).
    fn write(xs: &mut [f32], y: &[f32], mhc: &Option<Mhc>) -> Result<()> {
        match mhc {
            None => xs.iter_mut().zip(y).for_each(|(x, &v)| *x += v),
            Some(m) => layer_ops::mhc_write(xs, y, &m.h_res, &m.h_post)?,
        }
        Ok(())
    }

    fn sub_norm(&self, x: Vec<f32>, weight: &Option<Vec<f32>>) -> Result<Vec<f32>> {
        let Some(w) = weight else { return Ok(x) };
        let mut out = vec![0f32; x.len()];
        layer_ops::rms_norm(&x, w, self.p.eps, &mut out)?;
        Ok(out)
    }

    /// Ask for the cached rows this layer's attention will read, for every sequence at once, up to
    /// KV_PREFETCH_BYTES: one burst with many misses in flight, where the attention of one head after
    /// another waits for a few at a time (the rows are cold: megabytes of weights pass between two
    /// steps' attention of a layer). Rows past the budget come from the hardware prefetcher as before.
    fn prefetch_caches(&self, caches: &[SeqCache]) {
        let (hd, kvh) = (self.head_dim, self.p.n_kv_heads);
        let row_bytes = hd * std::mem::size_of::<f16>();
        let want: usize = caches.iter().map(|c| 2 * kvh * (c.pos + 1) * row_bytes).sum();
        let share = (KV_PREFETCH_BYTES as f64 / want.max(1) as f64).min(1.0);
        for c in caches {
            let capacity = c.k.len() / (kvh * hd);
            let rows = (((c.pos + 1) as f64 * share) as usize).min(capacity);
            let shape = AttnShape { n_heads: kvh, n_kv_heads: kvh, head_dim: hd, capacity };
            layer_ops::prefetch_rows(shape, c.k, rows);
            layer_ops::prefetch_rows(shape, c.v, rows);
        }
    }

    /// Decode attention of every sequence into att [B, H hd], one task per (sequence, kv head): the
    /// heads are independent (each writes its own cache rows and output heads), so one sequence's
    /// attention also spreads over the threads (examples/decode_step, 1 sequence at context 400, 2
    /// threads: 3.08-3.92 -> 2.62-3.21 ms per step).
    fn attend(&self, qkv: &[f32], rope: &Rope, caches: &mut [SeqCache], att: &mut [f32], ex: Exec) -> Result<()> {
        let (hd, p) = (self.head_dim, &self.p);
        let (kvh, r) = (p.n_kv_heads, p.n_heads / p.n_kv_heads);
        let (q_dim, kv_dim, qkv_dim) = (p.n_heads * hd, kvh * hd, p.qkv.shape.rows);
        let mut tasks = Vec::with_capacity(caches.len() * kvh);
        for (i, (cache, out)) in caches.iter_mut().zip(att.chunks_mut(q_dim)).enumerate() {
            if cache.k.len() != cache.v.len() || cache.k.is_empty() || !cache.k.len().is_multiple_of(kv_dim) {
                return Err(invalid(
                    "caches",
                    format!(
                        "sequence {i}: expected k and v [{kvh}, capacity, {hd}], got {} and {} values",
                        cache.k.len(),
                        cache.v.len()
                    ),
                ));
            }
            let capacity = cache.k.len() / kv_dim;
            let shape = AttnShape { n_heads: r, n_kv_heads: 1, head_dim: hd, capacity };
            let heads =
                cache.k.chunks_mut(capacity * hd).zip(cache.v.chunks_mut(capacity * hd)).zip(out.chunks_mut(r * hd));
            for (g, ((k, v), o)) in heads.enumerate() {
                tasks.push((i, g, shape, cache.pos, k, v, o));
            }
        }
        let attend_head =
            |(i, g, shape, pos, k, v, o): (usize, usize, AttnShape, usize, &mut [f16], &mut [f16], &mut [f32])| {
                // this kv head's [r query heads | k | v], as attend_decode takes them for a one-kv-head shape
                let q = &qkv[i * qkv_dim..(i + 1) * qkv_dim];
                let mut head_qkv = Vec::with_capacity((r + 2) * hd);
                head_qkv.extend_from_slice(&q[g * r * hd..(g + 1) * r * hd]);
                head_qkv.extend_from_slice(&q[q_dim + g * hd..q_dim + (g + 1) * hd]);
                head_qkv.extend_from_slice(&q[q_dim + kv_dim + g * hd..q_dim + kv_dim + (g + 1) * hd]);
                let (cos, sin) = (&rope.cos[i * hd..(i + 1) * hd], &rope.sin[i * hd..(i + 1) * hd]);
                layer_ops::attend_decode(shape, &head_qkv, cos, sin, k, v, pos, p.scale, o)
            };
        if ex.threads > 1 && tasks.len() > 1 {
            tasks.into_par_iter().try_for_each(attend_head)
        } else {
            tasks.into_iter().try_for_each(attend_head)
        }
    }

    /// Run the layer for B = caches.len() new tokens, in place on xs [n, B, D].
    pub fn step(&self, xs: &mut [f32], rope: &Rope, caches: &mut [SeqCache], ex: Exec) -> Result<()> {
        let (b, d, hd, p) = (caches.len(), self.dim, self.head_dim, &self.p);
        check_len("xs", xs.len(), self.streams * b * d, "[n_streams, B, D]")?;
        check_len("cos", rope.cos.len(), b * hd, "[B, head_dim]")?;
        check_len("sin", rope.sin.len(), b * hd, "[B, head_dim]")?;
        let q_dim = p.n_heads * hd;
        let times = &self.times;
        let t = Instant::now();
        self.prefetch_caches(caches);
        let h = self.read_norm(xs, &p.attn_mhc, &p.attn_norm)?;
        let t = times.add(ELEMENTWISE, t);
        let qkv = ops::ternary_matmul(&p.qkv, &h, b, ex.isa, ex.threads)?;
        let t = times.add(QKV, t);
        let mut att = vec![0f32; b * q_dim];
        self.attend(&qkv, rope, caches, &mut att, ex)?;
        let t = times.add(ATTENTION, t);
        let att = self.sub_norm(att, &p.attn_sub_norm)?;
        let t = times.add(ELEMENTWISE, t);
        let y = ops::ternary_matmul(&p.o, &att, b, ex.isa, ex.threads)?;
        let t = times.add(O, t);
        Self::write(xs, &y, &p.attn_mhc)?;
        let h = self.read_norm(xs, &p.ffn_mhc, &p.ffn_norm)?;
        let t = times.add(ELEMENTWISE, t);
        let gu = ops::ternary_matmul(&p.gate_up, &h, b, ex.isa, ex.threads)?;
        let t = times.add(GATE_UP, t);
        let ffn = p.gate_up.shape.rows / 2;
        let mut a = vec![0f32; b * ffn];
        layer_ops::silu_mul(&gu, ffn, &mut a)?;
        let a = self.sub_norm(a, &p.ffn_sub_norm)?;
        let t = times.add(ELEMENTWISE, t);
        let y = ops::ternary_matmul(&p.down, &a, b, ex.isa, ex.threads)?;
        let t = times.add(DOWN, t);
        Self::write(xs, &y, &p.ffn_mhc)?;
        times.add(ELEMENTWISE, t);
        Ok(())
    }
}

/// Bytes of cached keys and values a layer asks for before its matmuls (`prefetch_caches`), within
/// the 1 MB L2 beside the qkv weights that stream through it meanwhile. examples/decode_step, medians
/// of 6 alternating runs, attention ms per step (thread time), 8 sequences at context 100 / 400:
/// no prefetch 2.08 / 4.85, 192 KB 1.99 / 5.17, 384 KB 1.60-1.67 / 4.02-4.55, 768 KB 1.40-1.47 /
/// 3.56-4.11, 1 MB 1.39 / 3.54.
const KV_PREFETCH_BYTES: usize = 768 * 1024;

/// Sequences per thread from which a decode step splits its batch by sequences (`layers_by_sequences`).
const SPLIT_MIN_PER_THREAD: usize = 2;

/// A helper stops polling after this long without finding work (a long serial stretch: let it sleep).
const WARM_IDLE: Duration = Duration::from_millis(1);

/// Run `f` on a worker of rayon's pool while `helpers` other workers poll for its parallel work.
///
/// A decode step opens ~60 short parallel regions (matmuls, attention) separated by serial work; an
/// idle rayon worker goes to sleep within tens of microseconds, and waking it again costs ~20 us per
/// region (examples/ops_probe with GAP_US=100 between 8-token matmuls: 768x768 on 2 threads 27 ->
/// 51 us mean). Helpers instead steal through `rayon::yield_now` and spin while there is nothing,
/// until `f` returns or they stay idle for WARM_IDLE. Results do not change: the same chunks run.
fn with_warm_pool<R: Send>(helpers: usize, f: impl FnOnce() -> R + Send) -> R {
    let done = &AtomicBool::new(false);
    rayon::scope(|s| {
        let main = rayon::current_thread_index();
        for _ in 0..helpers {
            s.spawn(move |_| {
                if rayon::current_thread_index() == main {
                    return; // the step's own thread popped it while waiting: nothing to keep warm
                }
                let mut idle_since = Instant::now();
                while !done.load(Ordering::Acquire) {
                    if rayon::yield_now() == Some(rayon::Yield::Executed) {
                        idle_since = Instant::now();
                    } else if idle_since.elapsed() > WARM_IDLE {
                        return;
                    } else {
                        std::hint::spin_loop();
                    }
                }
            });
        }
        let out = f();
        done.store(true, Ordering::Release);
        out
    })
}

/// All layers, then the stream mean, the output norm and the head: one call per decode step.
pub struct DecodeModel {
    layers: Vec<Arc<DecodeLayer>>,
    output_norm: Vec<f32>,
    head: Arc<PackedInt8>,
    pub times: StageTimes,
}

impl DecodeModel {
    pub fn new(layers: Vec<Arc<DecodeLayer>>, output_norm: Vec<f32>, head: Arc<PackedInt8>) -> Result<DecodeModel> {
        let Some(first) = layers.first() else {
            return Err(invalid("layers", "expected at least one layer, got none"));
        };
        let (d, hd, kvh, n) = (first.dim, first.head_dim, first.p.n_kv_heads, first.streams);
        for l in &layers {
            if (l.dim, l.head_dim, l.p.n_kv_heads, l.streams) != (d, hd, kvh, n) {
                return Err(invalid(
                    "layers",
                    format!(
                        "expected every layer with D {d}, head_dim {hd}, {kvh} kv heads, {n} streams (as the first), \
                         got {}, {}, {}, {}",
                        l.dim, l.head_dim, l.p.n_kv_heads, l.streams
                    ),
                ));
            }
        }
        check_len("output_norm", output_norm.len(), d, "D")?;
        if head.shape.cols != d {
            return Err(invalid("head", format!("expected [V, {d}], got [{}, {}]", head.shape.rows, head.shape.cols)));
        }
        Ok(DecodeModel { layers, output_norm, head, times: StageTimes::default() })
    }

    pub fn layers(&self) -> &[Arc<DecodeLayer>] {
        &self.layers
    }

    pub fn vocab(&self) -> usize {
        self.head.shape.rows
    }

    /// Run every layer on xs [n, B, D] (in place), then return logits [B, V].
    ///
    /// The step runs on a thread of rayon's pool: a parallel matmul started from outside the pool parks
    /// the caller until a worker wakes (on busy cores, a scheduler slice), while from inside it the
    /// calling worker starts on the chunks at once. nano-125m, medians of 3 interleaved bench_engine runs
    /// (load 1.3): decode 245 -> 272 tok/s, 8 sequences 648 -> 789 tok/s.
    ///
    /// A batch of at least `SPLIT_MIN_PER_THREAD` sequences per thread is split by sequences instead
    /// (`layers_by_sequences`); the head still runs on all threads at once.
    pub fn step(&self, xs: &mut [f32], rope: &Rope, caches: &mut [SeqCache], ex: Exec) -> Result<Vec<f32>> {
        self.check_caches(caches)?;
        with_warm_pool(ex.threads.min(rayon::current_num_threads()).saturating_sub(1), || {
            if ex.threads > 1 && caches.len() >= SPLIT_MIN_PER_THREAD * ex.threads {
                self.layers_by_sequences(xs, rope, caches, ex)?;
            } else {
                self.layers_here(xs, rope, caches, ex, None)?;
            }
            self.head_here(xs, caches.len(), ex)
        })
    }

    /// The layers for B sequences cut into `ex.threads` groups, each run start to end on one thread
    /// (its matmuls, attention and elementwise work serial): no thread waits for another between the
    /// ~60 small parallel regions of a step, and the norms, mHC and SiLU run on every thread, not on
    /// one. Each thread reads every weight (at B >= 4 the step is bound by compute, not by memory).
    /// Every token's arithmetic is the same as on one thread (the kernels never mix
    /// tokens), so results do not change. nano-125m on 2 threads, steps alternating between the two
    /// ways in one process (a temporary switch), medians of 3 runs: 8 sequences 5.65-5.96 -> 5.40-5.65
    /// ms per step, 4 sequences 3.98 -> 3.57 ms; 2 and 3 sequences were no faster, so they keep the
    /// shared path.
    ///
    /// A group that finishes first lets the others split their remaining layers' matmuls and
    /// attention over all threads (`layers_here`'s `help`): when the host preempts one thread, the
    /// other no longer waits idle at the join (0.1-0.4 ms a step on average at 8 sequences). Steps
    /// alternating with and without it in one process, 5 runs of `decode_step 8 16 300`: median
    /// 0.9-3.3% faster in 4, p90 3-8% faster in 3, never slower beyond the noise.
    fn layers_by_sequences(&self, xs: &mut [f32], rope: &Rope, caches: &mut [SeqCache], ex: Exec) -> Result<()> {
        let first = &self.layers[0];
        let (n, b, d, hd) = (first.streams, caches.len(), first.dim, first.head_dim);
        check_len("xs", xs.len(), n * b * d, "[n_streams, B, D]")?;
        check_len("cos", rope.cos.len(), b * hd, "[B, head_dim]")?;
        check_len("sin", rope.sin.len(), b * hd, "[B, head_dim]")?;
        let per_group = b.div_ceil(ex.threads);
        let one_thread = Exec { threads: 1, ..ex };
        let finished = &AtomicUsize::new(0);
        let xs_in: &[f32] = xs;
        // each group's streams [n, group, D] gathered from xs, run, and returned for the copy back
        let groups: Vec<Result<Vec<f32>>> = caches
            .par_chunks_mut(per_group)
            .enumerate()
            .map(|(g, group)| {
                let rows = g * per_group..g * per_group + group.len();
                let mut sub = Vec::with_capacity(n * group.len() * d);
                for stream in xs_in.chunks_exact(b * d) {
                    sub.extend_from_slice(&stream[rows.start * d..rows.end * d]);
                }
                let rope = Rope {
                    cos: &rope.cos[rows.start * hd..rows.end * hd],
                    sin: &rope.sin[rows.start * hd..rows.end * hd],
                };
                let done = self.layers_here(&mut sub, &rope, group, one_thread, Some((finished, ex)));
                finished.fetch_add(1, Ordering::Release);
                done?;
                Ok(sub)
            })
            .collect();
        for (g, sub) in groups.into_iter().enumerate() {
            let sub = sub?;
            let rows = sub.len() / (n * d);
            for (stream, part) in xs.chunks_exact_mut(b * d).zip(sub.chunks_exact(rows * d)) {
                stream[g * per_group * d..(g * per_group + rows) * d].copy_from_slice(part);
            }
        }
        Ok(())
    }

    /// Every sequence's k and v must hold [L, KVH, capacity, hd] (each layer takes its slice).
    fn check_caches(&self, caches: &[SeqCache]) -> Result<()> {
        let first = &self.layers[0];
        let layer_len = first.p.n_kv_heads * first.head_dim;
        let n_layers = self.layers.len();
        for (i, c) in caches.iter().enumerate() {
            if c.k.len() != c.v.len() || c.k.is_empty() || !c.k.len().is_multiple_of(n_layers * layer_len) {
                return Err(invalid(
                    "k_caches",
                    format!(
                        "sequence {i}: expected k and v [{n_layers}, {}, capacity, {}], got {} and {} values",
                        first.p.n_kv_heads,
                        first.head_dim,
                        c.k.len(),
                        c.v.len()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Every layer on xs [n, B, D], in place (caches checked by the caller). With `help` = (groups
    /// finished, all threads), a layer that starts after another group has finished runs on all
    /// threads (the same arithmetic row for row: the same bits).
    fn layers_here(
        &self,
        xs: &mut [f32],
        rope: &Rope,
        caches: &mut [SeqCache],
        ex: Exec,
        help: Option<(&AtomicUsize, Exec)>,
    ) -> Result<()> {
        let n_layers = self.layers.len();
        for (li, layer) in self.layers.iter().enumerate() {
            let ex = match help {
                Some((finished, all)) if finished.load(Ordering::Acquire) > 0 => all,
                _ => ex,
            };
            let mut views: Vec<SeqCache> = caches
                .iter_mut()
                .map(|c| {
                    let per_layer = c.k.len() / n_layers;
                    SeqCache {
                        k: &mut c.k[li * per_layer..(li + 1) * per_layer],
                        v: &mut c.v[li * per_layer..(li + 1) * per_layer],
                        pos: c.pos,
                    }
                })
                .collect();
            layer.step(xs, rope, &mut views, ex)?;
        }
        Ok(())
    }

    /// The stream mean, the output norm and the head: logits [B, V] from xs [n, B, D].
    fn head_here(&self, xs: &[f32], b: usize, ex: Exec) -> Result<Vec<f32>> {
        let first = &self.layers[0];
        let (n, d) = (first.streams, first.dim);
        let t = Instant::now();
        // the stream mean as an mHC read with weights 1/n (the prefill path calls the same)
        let x = if n == 1 {
            xs.to_vec()
        } else {
            let mut mean = vec![0f32; b * d];
            layer_ops::mhc_read(xs, &vec![1.0 / n as f32; n], &mut mean)?;
            mean
        };
        let mut normed = vec![0f32; b * d];
        layer_ops::rms_norm(&x, &self.output_norm, first.p.eps, &mut normed)?;
        let t = self.times.add(ELEMENTWISE, t);
        let logits = ops::int8_matmul(&self.head, &normed, b, ex.isa, ex.threads)?;
        self.times.add(HEAD, t);
        Ok(logits)
    }

    /// Seconds per stage over the layers and the head, in STAGES order.
    pub fn seconds(&self) -> Vec<f64> {
        let mut total = self.times.seconds();
        for l in &self.layers {
            total.iter_mut().zip(l.times.seconds()).for_each(|(t, s)| *t += s);
        }
        total
    }

    pub fn reset_times(&self) {
        self.times.reset();
        self.layers.iter().for_each(|l| l.times.reset());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::TernaryShape;
    use crate::kernels::best_isa;

    fn matrix(rows: usize, cols: usize, seed: usize) -> Arc<PackedTernary> {
        let shape = TernaryShape { rows, cols, group_size: 64 };
        let codes: Vec<i8> = (0..rows * cols).map(|i| ((i * 7 + seed * 13 + i / 5) % 3) as i8 - 1).collect();
        let scales: Vec<f32> = (0..rows * shape.groups()).map(|i| 0.02 + ((i + seed) % 7) as f32 * 0.005).collect();
        Arc::new(PackedTernary::new(&codes, &scales, shape).unwrap())
    }

    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.37 + seed).sin()).collect()
    }

    /// D 64, 4 heads of 16, 2 kv heads, F 96, 2 mHC streams, sub-norms.
    fn parts() -> LayerParts {
        let mhc =
            |s: f32| Mhc { h_pre: vec![0.4, 0.7], h_post: vec![1.2, 0.8], h_res: vec![0.7 + s, 0.3 - s, 0.2, 0.8] };
        LayerParts {
            attn_norm: values(64, 1.0).iter().map(|v| 1.0 + 0.3 * v).collect(),
            qkv: matrix(128, 64, 1),
            o: matrix(64, 64, 2),
            attn_sub_norm: Some(values(64, 2.0).iter().map(|v| 1.0 + 0.2 * v).collect()),
            attn_mhc: Some(mhc(0.0)),
            ffn_norm: values(64, 3.0).iter().map(|v| 1.0 + 0.3 * v).collect(),
            gate_up: matrix(192, 64, 3),
            down: matrix(64, 96, 4),
            ffn_sub_norm: Some(values(96, 4.0).iter().map(|v| 1.0 + 0.2 * v).collect()),
            ffn_mhc: Some(mhc(0.1)),
            n_heads: 4,
            n_kv_heads: 2,
            eps: 1e-5,
            scale: 0.25,
        }
    }

    #[test]
    fn step_equals_the_ops_composed_by_hand() {
        let layer = DecodeLayer::new(parts()).unwrap();
        let p = &layer.p;
        let ex = Exec { isa: best_isa(), threads: 1 };
        let (b, d, cap) = (2, 64, 8);
        let xs0 = values(2 * b * d, 5.0);
        let (cos, sin) = (values(b * 16, 6.0), values(b * 16, 7.0));
        let caches0: Vec<Vec<f16>> =
            (0..2 * b).map(|i| values(2 * cap * 16, i as f32).into_iter().map(f16::from_f32).collect()).collect();
        let positions = [3, 6];
        // by hand, the order model.py's Python loop calls them in
        let mut want = xs0.clone();
        let mut kv = caches0.clone();
        let mut u = vec![0f32; b * d];
        let mut h = vec![0f32; b * d];
        layer_ops::mhc_read(&want, &p.attn_mhc.as_ref().unwrap().h_pre, &mut u).unwrap();
        layer_ops::rms_norm(&u, &p.attn_norm, p.eps, &mut h).unwrap();
        let qkv = ops::ternary_matmul(&p.qkv, &h, b, ex.isa, 1).unwrap();
        let mut att = vec![0f32; b * 64];
        for i in 0..b {
            let (k, v) = kv.split_at_mut(2 * i + 1);
            let shape = AttnShape { n_heads: 4, n_kv_heads: 2, head_dim: 16, capacity: cap };
            let (c, s) = (&cos[i * 16..(i + 1) * 16], &sin[i * 16..(i + 1) * 16]);
            let out = &mut att[i * 64..(i + 1) * 64];
            let q = &qkv[i * 128..(i + 1) * 128];
            layer_ops::attend_decode(shape, q, c, s, &mut k[2 * i], &mut v[0], positions[i], 0.25, out).unwrap();
        }
        let mut normed = vec![0f32; att.len()];
        layer_ops::rms_norm(&att, p.attn_sub_norm.as_ref().unwrap(), p.eps, &mut normed).unwrap();
        let y = ops::ternary_matmul(&p.o, &normed, b, ex.isa, 1).unwrap();
        let m = p.attn_mhc.as_ref().unwrap();
        layer_ops::mhc_write(&mut want, &y, &m.h_res, &m.h_post).unwrap();
        let m = p.ffn_mhc.as_ref().unwrap();
        layer_ops::mhc_read(&want, &m.h_pre, &mut u).unwrap();
        layer_ops::rms_norm(&u, &p.ffn_norm, p.eps, &mut h).unwrap();
        let gu = ops::ternary_matmul(&p.gate_up, &h, b, ex.isa, 1).unwrap();
        let mut a = vec![0f32; b * 96];
        layer_ops::silu_mul(&gu, 96, &mut a).unwrap();
        let mut an = vec![0f32; a.len()];
        layer_ops::rms_norm(&a, p.ffn_sub_norm.as_ref().unwrap(), p.eps, &mut an).unwrap();
        let y = ops::ternary_matmul(&p.down, &an, b, ex.isa, 1).unwrap();
        layer_ops::mhc_write(&mut want, &y, &m.h_res, &m.h_post).unwrap();
        // the layer step, on 1 and 2 threads
        for threads in [1, 2] {
            let mut got = xs0.clone();
            let mut kv_got = caches0.clone();
            let (ks, vs): (Vec<_>, Vec<_>) = kv_got.iter_mut().enumerate().partition(|(i, _)| i % 2 == 0);
            let mut caches: Vec<SeqCache> = ks
                .into_iter()
                .zip(vs)
                .zip(positions)
                .map(|(((_, k), (_, v)), pos)| SeqCache { k: k.as_mut_slice(), v: v.as_mut_slice(), pos })
                .collect();
            layer.step(&mut got, &Rope { cos: &cos, sin: &sin }, &mut caches, Exec { threads, ..ex }).unwrap();
            assert_eq!(got, want, "{threads} threads");
            assert_eq!(kv_got, kv, "{threads} threads: caches");
        }
        assert!(layer.times.seconds().iter().sum::<f64>() > 0.0);
    }

    /// The model step's results do not depend on the thread count, nor on whether the batch was split
    /// by sequences (5 sequences: shared on 1 and 3 threads, split 3 + 2 on 2).
    #[test]
    fn model_step_is_the_same_on_any_thread_count() {
        let layers = vec![Arc::new(DecodeLayer::new(parts()).unwrap()), Arc::new(DecodeLayer::new(parts()).unwrap())];
        let q: Vec<i8> = (0..40 * 64).map(|i| ((i * 40503) % 255) as i8).collect();
        let scales: Vec<f32> = (0..40).map(|i| 0.001 * (1 + i % 13) as f32).collect();
        let head = Arc::new(PackedInt8::new(&q, &scales, crate::pack::Int8Shape { rows: 40, cols: 64 }).unwrap());
        let model = DecodeModel::new(layers, values(64, 8.0), head).unwrap();
        let (b, cap) = (5, 8);
        let xs0 = values(2 * b * 64, 5.0);
        let (cos, sin) = (values(b * 16, 6.0), values(b * 16, 7.0));
        let caches0: Vec<Vec<f16>> =
            (0..2 * b).map(|i| values(2 * 2 * cap * 16, i as f32).into_iter().map(f16::from_f32).collect()).collect();
        let run = |threads: usize| {
            let (mut xs, mut kv) = (xs0.clone(), caches0.clone());
            let (ks, vs) = kv.split_at_mut(b);
            let mut caches: Vec<SeqCache> = ks
                .iter_mut()
                .zip(vs.iter_mut())
                .enumerate()
                .map(|(i, (k, v))| SeqCache { k: k.as_mut_slice(), v: v.as_mut_slice(), pos: 1 + i })
                .collect();
            let ex = Exec { isa: best_isa(), threads };
            let logits = model.step(&mut xs, &Rope { cos: &cos, sin: &sin }, &mut caches, ex).unwrap();
            (logits, xs, kv)
        };
        let want = run(1);
        assert_eq!(want.0.len(), b * 40);
        assert!(want.0.iter().all(|v| v.is_finite()));
        for threads in [2, 3] {
            assert!(run(threads) == want, "{threads} threads");
        }
    }

    /// A group's layers give the same bits when another group has finished and they spread over all
    /// threads (`layers_by_sequences`' help), with matrices large enough to be split.
    #[test]
    fn helped_layers_are_the_same_as_alone() {
        let big = LayerParts {
            attn_norm: values(256, 1.0).iter().map(|v| 1.0 + 0.3 * v).collect(),
            qkv: matrix(512, 256, 1),
            o: matrix(256, 256, 2),
            attn_sub_norm: None,
            ffn_norm: values(256, 3.0).iter().map(|v| 1.0 + 0.3 * v).collect(),
            gate_up: matrix(1536, 256, 3),
            down: matrix(256, 768, 4),
            ffn_sub_norm: None,
            ..parts()
        };
        let head = Arc::new(
            PackedInt8::new(&[1; 8 * 256], &[0.01; 8], crate::pack::Int8Shape { rows: 8, cols: 256 }).unwrap(),
        );
        let model = DecodeModel::new(vec![Arc::new(DecodeLayer::new(big).unwrap())], vec![1.0; 256], head).unwrap();
        let (b, cap, hd) = (4, 8, 64);
        let (cos, sin) = (values(b * hd, 6.0), values(b * hd, 7.0));
        let run = |help: Option<(&AtomicUsize, Exec)>| {
            let mut xs = values(2 * b * 256, 5.0);
            let mut kv: Vec<Vec<f16>> =
                (0..2 * b).map(|i| values(2 * cap * hd, i as f32).into_iter().map(f16::from_f32).collect()).collect();
            let (ks, vs) = kv.split_at_mut(b);
            let mut caches: Vec<SeqCache> = ks
                .iter_mut()
                .zip(vs.iter_mut())
                .map(|(k, v)| SeqCache { k: k.as_mut_slice(), v: v.as_mut_slice(), pos: 3 })
                .collect();
            let one = Exec { isa: best_isa(), threads: 1 };
            model.layers_here(&mut xs, &Rope { cos: &cos, sin: &sin }, &mut caches, one, help).unwrap();
            (xs, kv)
        };
        let alone = run(None);
        let finished = AtomicUsize::new(1);
        assert!(run(Some((&finished, Exec { isa: best_isa(), threads: 2 }))) == alone);
    }

    #[test]
    fn mismatched_parts_are_named() {
        let err = |p: LayerParts| DecodeLayer::new(p).err().unwrap().to_string();
        assert!(err(LayerParts { o: matrix(64, 32, 0), ..parts() }).starts_with("o: expected [64, 64], got [64, 32]"));
        assert!(err(LayerParts { down: matrix(64, 90, 0), ..parts() }).starts_with("down: expected [64, 96]"));
        assert!(err(LayerParts { n_kv_heads: 3, ..parts() }).starts_with("n_heads:"));
        assert!(err(LayerParts { ffn_mhc: None, ..parts() }).starts_with("ffn_mhc: expected the same stream count"));
        assert!(
            err(LayerParts { ffn_sub_norm: Some(vec![1.0; 95]), ..parts() }).starts_with("ffn_sub_norm: expected 96")
        );
        let layer = DecodeLayer::new(parts()).unwrap();
        let ex = Exec { isa: best_isa(), threads: 1 };
        let rope = Rope { cos: &[0.0; 16], sin: &[0.0; 16] };
        let (mut k, mut v) = (vec![f16::ZERO; 2 * 4 * 16], vec![f16::ZERO; 2 * 4 * 16]);
        let mut caches = [SeqCache { k: &mut k, v: &mut v, pos: 0 }];
        let e = layer.step(&mut [0.0; 64], &rope, &mut caches, ex).unwrap_err().to_string();
        assert!(e.starts_with("xs: expected 128 values ([n_streams, B, D])"), "{e}");
    }
}
