//! GEMV/GEMM scheduled for a shared machine: small chunks of row tiles handed out on demand.
//!
//! `matmul.rs` gives each pinned thread one fixed share of the tiles, so a call lasts as long as its
//! slowest thread: when another process holds that thread's core, the whole GEMV waits for it. Here
//! the tiles are cut into a few chunks per thread and run on rayon's (unpinned) global pool with work
//! stealing, so a thread that is not preempted takes the chunks of one that is, and the OS may move
//! threads to whichever core is free. Each row's arithmetic is the same kernel call as in `matmul.rs`,
//! so results are bit-identical. A single token's chunks write straight into the output.

use std::ops::Range;

use rayon::prelude::*;

use crate::act::{Int8Acts, TernaryActs};
use crate::error::Result;
use crate::format::ROWS_PER_TILE;
use crate::kernels::{self, Isa};
use crate::matmul::check_x;
use crate::pack::{PackedInt8, PackedTernary};

/// Below this many multiply-adds a GEMV runs on the calling thread (a wake-up costs more than it saves).
/// A decode step reads every weight from memory and one core streams only about half of what two do,
/// so on an idle machine every nano-125m layer matmul (the smallest, 768 x 768, is 590K) gains from
/// both threads: decode medians of 8 interleaved rounds in one process, load 0.6-1.0: 1 << 22 (only
/// the head on 2 threads) 236 tok/s, 1 << 20 246, 1 << 19 255. With the second core busy (load
/// 1.0-1.4 from other jobs) it went the other way: 1 << 19 243 vs 1 << 22 270 tok/s.
pub const DYNAMIC_MIN_WORK: usize = 1 << 19;
/// Chunks per thread: enough for stealing to even out a preempted thread, few enough to stay cheap.
const CHUNKS_PER_THREAD: usize = 8;

/// Run `kernel(part, tiles, out, ldo)` over every part's tiles in chunks; returns y [tokens][rows].
/// One token, or one chunk of whole tiles: the kernel writes straight into y. Otherwise each chunk
/// fills its own [tokens][chunk rows] block, copied into y afterwards (the kernels write one
/// contiguous range of rows per token).
fn chunked<K>(parts: &[(usize, usize)], rows: usize, tokens: usize, threads: usize, work: usize, kernel: K) -> Vec<f32>
where
    K: Fn(usize, Range<usize>, &mut [f32], usize) + Sync,
{
    let parallel = threads > 1 && work >= DYNAMIC_MIN_WORK;
    let total_tiles: usize = parts.iter().map(|p| p.1).sum();
    let chunk = if parallel { total_tiles.div_ceil(threads * CHUNKS_PER_THREAD).max(1) } else { total_tiles.max(1) };
    if tokens == 1 {
        let mut y = vec![0f32; total_tiles * ROWS_PER_TILE];
        for (pi, &(first_tile, tiles)) in parts.iter().enumerate() {
            let out = &mut y[first_tile * ROWS_PER_TILE..(first_tile + tiles) * ROWS_PER_TILE];
            let run = |(i, out): (usize, &mut [f32])| {
                let ldo = out.len();
                kernel(pi, i * chunk..i * chunk + ldo / ROWS_PER_TILE, out, ldo);
            };
            if parallel {
                out.par_chunks_mut(chunk * ROWS_PER_TILE).enumerate().for_each(run);
            } else {
                out.chunks_mut(chunk * ROWS_PER_TILE).enumerate().for_each(run);
            }
        }
        y.truncate(rows);
        return y;
    }
    if !parallel && rows == total_tiles * ROWS_PER_TILE {
        // One chunk: every token's rows go straight into y (a decode step split by sequences makes
        // these calls: 8 sequences on 2 threads, 0.5-1% of the step was this block and its copy).
        let mut y = vec![0f32; tokens * rows];
        for (pi, &(first_tile, tiles)) in parts.iter().enumerate() {
            kernel(pi, 0..tiles, &mut y[first_tile * ROWS_PER_TILE..], rows);
        }
        return y;
    }
    let items: Vec<(usize, Range<usize>)> = parts
        .iter()
        .enumerate()
        .flat_map(|(pi, &(_, tiles))| (0..tiles).step_by(chunk).map(move |t0| (pi, t0..(t0 + chunk).min(tiles))))
        .collect();
    let run = |(pi, tiles): &(usize, Range<usize>)| {
        let ldo = tiles.len() * ROWS_PER_TILE;
        let mut out = vec![0f32; tokens * ldo];
        kernel(*pi, tiles.clone(), &mut out, ldo);
        out
    };
    let blocks: Vec<Vec<f32>> =
        if parallel { items.par_iter().map(run).collect() } else { items.iter().map(run).collect() };
    let mut y = vec![0f32; tokens * rows];
    for ((pi, tiles), block) in items.iter().zip(blocks) {
        let row0 = (parts[*pi].0 + tiles.start) * ROWS_PER_TILE;
        let ldo = tiles.len() * ROWS_PER_TILE;
        let n = ldo.min(rows.saturating_sub(row0));
        for t in 0..tokens {
            y[t * rows + row0..t * rows + row0 + n].copy_from_slice(&block[t * ldo..t * ldo + n]);
        }
    }
    y
}

/// Fewest tokens per chunk when a matmul is split by tokens.
const MIN_TOKEN_CHUNK: usize = 8;
/// Matrices up to this many weights (256 KiB packed: nano-125m's qkv and o) split a decode batch by
/// tokens, one chunk per thread, at this many tokens per chunk or more (4 tokens run the AVX-512
/// kernel at ~99% of 8's GOPS).
const SMALL_MATRIX_WEIGHTS: usize = 1 << 20;
const MIN_SMALL_TOKEN_CHUNK: usize = 4;

/// Split by tokens instead of rows: prompts (prefill) and wide batches. Each chunk quantizes its own
/// tokens' activations and writes its tokens' rows of y in place, where a row split would fill a
/// block per chunk and copy it into y (prefill of 8 x 16 tokens: 16% of the time went to memset and
/// memmove). Each chunk reads the weights again, from cache, at >= 8 tokens of work per weight.
/// Chunks come in multiples of the thread count, at least two per thread (small matrices at a decode
/// batch excepted, below): with one per thread, a worker that is slow to wake finds its chunk already
/// taken by the caller, and the call runs on one thread (examples/ops_probe, 1280x768 at 32 tokens:
/// 319 instead of ~540 GOPS). Needs M a whole number of tiles (every part's rows then land inside y).
/// Returns the tokens per chunk.
fn by_tokens(rows: usize, cols: usize, tokens: usize, threads: usize) -> Option<usize> {
    let threads = threads.max(1);
    if !rows.is_multiple_of(ROWS_PER_TILE) {
        return None;
    }
    if tokens < 2 * MIN_TOKEN_CHUNK * threads {
        // A small matrix at a decode batch of 8+: one chunk per thread. A row split there spends more
        // on its per-chunk blocks, the copy into y and the serial activation quantization than the
        // chunks compute (decode_step, 8 sequences: qkv 0.52 -> 0.37-0.41 ms, o 0.35 -> 0.24-0.25 ms
        // per step). Larger ones keep the row split: there each thread's rows stay in its own cache for
        // the elementwise work that follows (the token split made SiLU after gate_up slower).
        let small = rows * cols <= SMALL_MATRIX_WEIGHTS;
        return (small && threads > 1 && tokens >= MIN_SMALL_TOKEN_CHUNK * threads).then(|| tokens.div_ceil(threads));
    }
    let chunks = threads * (tokens / (MIN_TOKEN_CHUNK * threads)).clamp(2, CHUNKS_PER_THREAD / 2);
    Some(tokens.div_ceil(chunks))
}

/// y [tokens, M] = ternary matmul of x [tokens, K], on up to `threads` threads.
pub fn ternary_matmul(m: &PackedTernary, x: &[f32], tokens: usize, isa: Isa, threads: usize) -> Result<Vec<f32>> {
    let shape = m.shape;
    check_x(x, tokens, shape.cols)?;
    if let Some(per_chunk) = by_tokens(shape.rows, shape.cols, tokens, threads) {
        let mut y = vec![0f32; tokens * shape.rows];
        let run = |(out, x): (&mut [f32], &[f32])| crate::matmul::tokens_through_parts(m, x, isa, out);
        let (out_chunk, x_chunk) = (per_chunk * shape.rows, per_chunk * shape.cols);
        if threads > 1 {
            y.par_chunks_mut(out_chunk).zip(x.par_chunks(x_chunk)).for_each(run);
        } else {
            y.chunks_mut(out_chunk).zip(x.chunks(x_chunk)).for_each(run);
        }
        return Ok(y);
    }
    let acts = TernaryActs::for_isa(x, tokens, shape, isa);
    let parts: Vec<(usize, usize)> = m.parts.iter().map(|p| (p.first_tile, p.tiles)).collect();
    let work = shape.rows * shape.cols * tokens;
    Ok(chunked(&parts, shape.rows, tokens, threads, work, |pi, tiles, out, ldo| {
        let (codes, scales) = m.parts[pi].tile_range(&shape, tiles);
        kernels::ternary(isa, &shape, codes, scales, &acts, out, ldo);
    }))
}

/// y [tokens, M] = int8 matmul of x [tokens, K] (e.g. the output head), on up to `threads` threads.
pub fn int8_matmul(m: &PackedInt8, x: &[f32], tokens: usize, isa: Isa, threads: usize) -> Result<Vec<f32>> {
    let shape = m.shape;
    check_x(x, tokens, shape.cols)?;
    let acts = Int8Acts::new(x, tokens, shape.cols);
    let kp = shape.padded_cols();
    let parts: Vec<(usize, usize)> = m.parts.iter().map(|p| (p.first_tile, p.tiles)).collect();
    let work = shape.rows * shape.cols * tokens;
    Ok(chunked(&parts, shape.rows, tokens, threads, work, |pi, tiles, out, ldo| {
        let part = &m.parts[pi];
        let (r0, r1) = (tiles.start * ROWS_PER_TILE, tiles.end * ROWS_PER_TILE);
        kernels::int8(isa, &part.q.i8s()[r0 * kp..r1 * kp], &part.scales.f32s()[r0..r1], &acts, out, ldo);
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::TernaryShape;
    use crate::matmul;
    use crate::pack::Int8Shape;
    use crate::pool::Pool;
    use crate::topology::Topology;

    #[test]
    fn chunked_matmul_equals_pool_matmul() {
        let pool = Pool::new(1, &Topology::detect()).unwrap();
        let isa = crate::kernels::best_isa();
        for (rows, cols) in [(5, 70), (96, 200), (1283, 768), (2048, 640)] {
            let shape = TernaryShape { rows, cols, group_size: 128 };
            let codes: Vec<i8> = (0..rows * cols).map(|i| ((i * 7919 + i / 3) % 3) as i8 - 1).collect();
            let scales: Vec<f32> = (0..rows * shape.groups()).map(|i| 0.01 + (i % 17) as f32 * 0.003).collect();
            let m = PackedTernary::new(&codes, &scales, shape).unwrap();
            let x: Vec<f32> = (0..61 * cols).map(|i| ((i * 31) % 200) as f32 / 100.0 - 1.0).collect();
            for tokens in [1, 7, 8, 24, 61] {
                let x = &x[..tokens * cols];
                let want = matmul::ternary_matmul(&m, x, tokens, isa, &pool).unwrap();
                for threads in [1, 2, 3] {
                    let got = ternary_matmul(&m, x, tokens, isa, threads).unwrap();
                    assert_eq!(got, want, "{rows}x{cols} T{tokens} t{threads}");
                }
            }
            let ishape = Int8Shape { rows, cols };
            let q: Vec<i8> = (0..rows * cols).map(|i| ((i * 40503) % 255) as i8).collect();
            let s: Vec<f32> = (0..rows).map(|i| 0.001 * (1 + i % 13) as f32).collect();
            let h = PackedInt8::new(&q, &s, ishape).unwrap();
            for tokens in [1, 7] {
                let x = &x[..tokens * cols];
                let want = matmul::int8_matmul(&h, x, tokens, isa, &pool).unwrap();
                for threads in [1, 2, 3] {
                    let got = int8_matmul(&h, x, tokens, isa, threads).unwrap();
                    assert_eq!(got, want, "int8 {rows}x{cols} T{tokens} t{threads}");
                }
            }
        }
    }

    #[test]
    fn wrong_x_length_is_an_error() {
        let shape = TernaryShape { rows: 4, cols: 64, group_size: 64 };
        let m = PackedTernary::new(&[0; 256], &[1.0; 4], shape).unwrap();
        let err = ternary_matmul(&m, &[0.0; 63], 1, Isa::Scalar, 1).unwrap_err();
        assert!(err.to_string().starts_with("x: expected 1 x 64"), "{err}");
    }
}
