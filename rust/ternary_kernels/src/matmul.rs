//! The entry points: quantize activations, split row tiles across the pool, run a kernel, gather.
//!
//! Output is [tokens][M] f32 row-major. One token: each thread writes its row tiles of y in place.
//! Several tokens on one node: each thread takes a range of whole tokens (quantized by itself) through
//! every part and writes their rows in place (`Pool::token_split`). Otherwise (several nodes) each work
//! item computes a contiguous range of row tiles of one part into its own buffer; padded rows are
//! dropped when gathering.

use std::ops::Range;

use crate::act::{Int8Acts, TernaryActs};
use crate::aligned::{share_pages, AlignedBuf};
use crate::error::{invalid, Error, Result};
use crate::format::ROWS_PER_TILE;
use crate::kernels::{self, Isa};
use crate::pack::{Int8Part, PackedInt8, PackedTernary, TernaryPart};
use crate::pool::Pool;

/// A contiguous range of tiles inside part `part`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkItem {
    pub part: usize,
    pub tiles: Range<usize>,
}

/// x must hold exactly tokens x cols values (shared by the static and the work-stealing entry points).
pub(crate) fn check_x(x: &[f32], tokens: usize, cols: usize) -> Result<()> {
    if x.len() != tokens * cols {
        return Err(invalid(
            "x",
            format!("expected {tokens} x {cols} = {} values (K = {cols}), got {}", tokens * cols, x.len()),
        ));
    }
    Ok(())
}

/// y [tokens, M] = ternary matmul of x [tokens, K].
pub fn ternary_matmul(m: &PackedTernary, x: &[f32], tokens: usize, isa: Isa, pool: &Pool) -> Result<Vec<f32>> {
    let shape = m.shape;
    check_x(x, tokens, shape.cols)?;
    let acts = TernaryActs::for_isa(x, tokens, shape, isa);
    let part_tiles: Vec<usize> = m.parts.iter().map(|p| p.tiles).collect();
    let first_tiles: Vec<usize> = m.parts.iter().map(|p| p.first_tile).collect();
    let work = shape.rows * shape.cols * tokens;
    if tokens == 1 {
        let mut y = vec![0f32; part_tiles.iter().sum::<usize>() * ROWS_PER_TILE];
        pool.run_rows(&part_tiles, &first_tiles, work, &mut y, |item: &WorkItem, rows: &mut [f32]| {
            let (codes, scales) = m.parts[item.part].tile_range(&shape, item.tiles.clone());
            let ldo = rows.len();
            kernels::ternary(isa, &shape, codes, scales, &acts, rows, ldo);
        });
        y.truncate(shape.rows);
        return Ok(y);
    }
    if let Some(per_share) = pool.token_split(tokens, shape.rows, work) {
        let mut y = vec![0f32; tokens * shape.rows];
        pool.run_chunks(&mut y, per_share * shape.rows, |share, out| {
            let t0 = share * per_share;
            tokens_through_parts(m, &x[t0 * shape.cols..(t0 + out.len() / shape.rows) * shape.cols], isa, out);
        });
        return Ok(y);
    }
    let pieces = pool.run(&part_tiles, work, |item: &WorkItem| {
        let (codes, scales) = m.parts[item.part].tile_range(&shape, item.tiles.clone());
        let ldo = item.tiles.len() * ROWS_PER_TILE;
        let mut out = vec![0f32; tokens * ldo];
        kernels::ternary(isa, &shape, codes, scales, &acts, &mut out, ldo);
        out
    });
    Ok(gather(pieces, &first_tiles, tokens, shape.rows))
}

/// Some whole tokens x [n, K] through every part of m, each token's rows written in place into
/// out [n, M] (M a whole number of tiles, so every part's rows land inside out). The tokens'
/// activations are quantized here, by whichever thread runs the chunk.
pub(crate) fn tokens_through_parts(m: &PackedTernary, x: &[f32], isa: Isa, out: &mut [f32]) {
    let shape = m.shape;
    let acts = TernaryActs::for_isa(x, out.len() / shape.rows, shape, isa);
    for part in &m.parts {
        let out = &mut out[part.first_tile * ROWS_PER_TILE..];
        kernels::ternary(isa, &shape, part.codes.bytes(), part.scales.f32s(), &acts, out, shape.rows);
    }
}

/// y [tokens, M] = int8 matmul of x [tokens, K].
pub fn int8_matmul(m: &PackedInt8, x: &[f32], tokens: usize, isa: Isa, pool: &Pool) -> Result<Vec<f32>> {
    let shape = m.shape;
    check_x(x, tokens, shape.cols)?;
    let acts = Int8Acts::new(x, tokens, shape.cols);
    let kp = shape.padded_cols();
    let part_tiles: Vec<usize> = m.parts.iter().map(|p| p.tiles).collect();
    let first_tiles: Vec<usize> = m.parts.iter().map(|p| p.first_tile).collect();
    let work = shape.rows * shape.cols * tokens * 4;
    if tokens == 1 {
        let mut y = vec![0f32; part_tiles.iter().sum::<usize>() * ROWS_PER_TILE];
        pool.run_rows(&part_tiles, &first_tiles, work, &mut y, |item: &WorkItem, out: &mut [f32]| {
            let part = &m.parts[item.part];
            let rows = item.tiles.start * ROWS_PER_TILE..item.tiles.end * ROWS_PER_TILE;
            let ldo = out.len();
            kernels::int8(
                isa,
                &part.q.i8s()[rows.start * kp..rows.end * kp],
                &part.scales.f32s()[rows],
                &acts,
                out,
                ldo,
            );
        });
        y.truncate(shape.rows);
        return Ok(y);
    }
    let pieces = pool.run(&part_tiles, work, |item: &WorkItem| {
        let part = &m.parts[item.part];
        let rows = item.tiles.start * ROWS_PER_TILE..item.tiles.end * ROWS_PER_TILE;
        let q = &part.q.i8s()[rows.start * kp..rows.end * kp];
        let scales = &part.scales.f32s()[rows.clone()];
        let ldo = rows.len();
        let mut out = vec![0f32; tokens * ldo];
        kernels::int8(isa, q, scales, &acts, &mut out, ldo);
        out
    });
    Ok(gather(pieces, &first_tiles, tokens, shape.rows))
}

/// Copy each work item's [tokens][rows_of_item] block into y [tokens][rows], dropping padded rows.
fn gather(pieces: Vec<(WorkItem, Vec<f32>)>, first_tiles: &[usize], tokens: usize, rows: usize) -> Vec<f32> {
    // One piece covering the matrix with no padded rows in the way: it already is y.
    if pieces.len() == 1 && pieces[0].0.tiles.len() * ROWS_PER_TILE == rows {
        if let Some((_, mut only)) = pieces.into_iter().next() {
            only.truncate(tokens * rows);
            return only;
        }
        return Vec::new();
    }
    let mut y = vec![0f32; tokens * rows];
    for (item, block) in pieces {
        let row0 = (first_tiles[item.part] + item.tiles.start) * ROWS_PER_TILE;
        let ldo = item.tiles.len() * ROWS_PER_TILE;
        let n = ldo.min(rows.saturating_sub(row0));
        for t in 0..tokens {
            y[t * rows + row0..t * rows + row0 + n].copy_from_slice(&block[t * ldo..t * ldo + n]);
        }
    }
    y
}

/// Validate and pack a ternary matrix with its parts placed on the pool's nodes.
pub fn place_ternary(
    codes: &[i8],
    scales: &[f32],
    shape: crate::format::TernaryShape,
    pool: &Pool,
) -> Result<PackedTernary> {
    crate::pack::validate_ternary(codes, scales, shape)?;
    let parts = pool.place(shape.tiles(), |tiles| crate::pack::TernaryPart::pack(codes, scales, shape, tiles));
    Ok(PackedTernary { shape, parts })
}

/// Validate and pack an int8 matrix with its parts placed on the pool's nodes.
pub fn place_int8(q: &[i8], scales: &[f32], shape: crate::pack::Int8Shape, pool: &Pool) -> Result<PackedInt8> {
    crate::pack::validate_int8(q, scales, shape)?;
    let parts = pool.place(shape.tiles(), |tiles| crate::pack::Int8Part::pack(q, scales, shape, tiles));
    Ok(PackedInt8 { shape, parts })
}

/// The same matrices with all their weights moved into shared mappings advised for huge pages
/// (aligned.rs `share_pages`): one mapping per node part, filled on a thread of that node. A model
/// calls this once after loading; results are unchanged, only the TLB reach grows.
pub fn share_weight_pages(
    ternary: &[&PackedTernary],
    int8: &[&PackedInt8],
    pool: &Pool,
) -> Result<(Vec<PackedTernary>, Vec<PackedInt8>)> {
    let parts = ternary.iter().map(|m| m.parts.len()).chain(int8.iter().map(|m| m.parts.len())).max().unwrap_or(0);
    let by_node = parts == pool.nodes()
        && ternary.iter().all(|m| m.parts.len() == parts)
        && int8.iter().all(|m| m.parts.len() == parts);
    // every buffer of part `slot`, ternary (codes, scales) then int8 (q, scales), in matrix order
    let buffers_of = |slot: usize| -> Vec<&AlignedBuf> {
        let t = ternary.iter().filter_map(|m| m.parts.get(slot)).flat_map(|p| [&p.codes, &p.scales]);
        t.chain(int8.iter().filter_map(|m| m.parts.get(slot)).flat_map(|p| [&p.q, &p.scales])).collect()
    };
    let share = |slot: usize| share_pages(&buffers_of(slot));
    let shared: Vec<std::io::Result<Vec<AlignedBuf>>> =
        if by_node { pool.on_nodes(share) } else { (0..parts).map(share).collect() };
    let mut shared: Vec<std::vec::IntoIter<AlignedBuf>> = shared
        .into_iter()
        .map(|r| r.map(Vec::into_iter))
        .collect::<std::io::Result<_>>()
        .map_err(|e| Error::Memory(format!("cannot map {parts} part(s) of weights: {e}")))?;
    let mut next = |slot: usize| shared[slot].next().expect("one shared buffer per original");
    let ternary = ternary
        .iter()
        .map(|m| {
            let parts = (0..m.parts.len())
                .map(|slot| {
                    let p = &m.parts[slot];
                    TernaryPart { first_tile: p.first_tile, tiles: p.tiles, codes: next(slot), scales: next(slot) }
                })
                .collect();
            PackedTernary { shape: m.shape, parts }
        })
        .collect::<Vec<_>>();
    let int8 = int8
        .iter()
        .map(|m| {
            let parts = (0..m.parts.len())
                .map(|slot| {
                    let p = &m.parts[slot];
                    Int8Part { first_tile: p.first_tile, tiles: p.tiles, q: next(slot), scales: next(slot) }
                })
                .collect();
            PackedInt8 { shape: m.shape, parts }
        })
        .collect();
    Ok((ternary, int8))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{TernaryShape, GROUP_SIZES};
    use crate::kernels::ALL_ISAS;
    use crate::pack::Int8Shape;
    use crate::topology::{Node, Topology};
    use proptest::prelude::*;

    fn config() -> ProptestConfig {
        ProptestConfig { cases: 64, ..ProptestConfig::default() }
    }

    /// Paths this CPU can run; the others are reported, never silently passed.
    fn runnable() -> Vec<Isa> {
        ALL_ISAS
            .into_iter()
            .filter(|isa| match isa.missing_feature() {
                None => true,
                Some(feat) => {
                    eprintln!("skipping the {} path: this CPU lacks {feat}", isa.name());
                    false
                }
            })
            .collect()
    }

    fn ternary_case() -> impl Strategy<Value = (TernaryShape, Vec<i8>, Vec<f32>, Vec<f32>, usize)> {
        ternary_case_in(1..23, 1..700)
    }

    /// K up to 3000: in calls of up to 6 tokens, blocks of 3+ tokens broadcast their activations
    /// instead of reading lane copies (act.rs `block_reads_lanes`); 2-token blocks, and every block
    /// of a call of 7+ tokens, still read them.
    fn wide_ternary_case() -> impl Strategy<Value = (TernaryShape, Vec<i8>, Vec<f32>, Vec<f32>, usize)> {
        ternary_case_in(1..9, 1000..3000)
    }

    fn ternary_case_in(
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
    ) -> impl Strategy<Value = (TernaryShape, Vec<i8>, Vec<f32>, Vec<f32>, usize)> {
        (rows, cols, prop::sample::select(GROUP_SIZES.to_vec()), 1usize..12, any::<u64>()).prop_map(
            |(rows, cols, group_size, tokens, seed)| {
                let shape = TernaryShape { rows, cols, group_size };
                let mut rng = seed;
                let mut next = move || {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng
                };
                let codes = (0..rows * cols).map(|_| (next() % 3) as i8 - 1).collect();
                // Powers of two: every partial sum is exact in f32, so all paths must agree bit for bit.
                let scales = (0..rows * shape.groups()).map(|_| 2f32.powi((next() % 7) as i32 - 3)).collect();
                let x = (0..tokens * cols).map(|_| (next() % 2001) as f32 / 1000.0 - 1.0).collect();
                (shape, codes, scales, x, tokens)
            },
        )
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn ternary_pack_round_trip((shape, codes, scales, _x, _t) in ternary_case()) {
            let m = PackedTernary::new(&codes, &scales, shape).unwrap();
            let (c, s) = m.unpack();
            prop_assert_eq!(c, codes);
            prop_assert_eq!(s, scales);
        }

        #[test]
        fn ternary_paths_match_scalar((shape, codes, scales, x, tokens) in ternary_case()) {
            let pool = Pool::new(1, &Topology::detect()).unwrap();
            let m = PackedTernary::new(&codes, &scales, shape).unwrap();
            let want = ternary_matmul(&m, &x, tokens, Isa::Scalar, &pool).unwrap();
            // The scalar path against the definition, straight from codes and scales (exact here).
            let (q, s) = crate::act::quantize_activations(&x, tokens, shape.cols);
            let groups = shape.groups();
            for t in 0..tokens {
                for row in 0..shape.rows {
                    let mut acc = 0f64;
                    for k in 0..shape.cols {
                        let w = codes[row * shape.cols + k] as f64 * scales[row * groups + k / shape.group_size] as f64;
                        acc += w * q[t * shape.cols + k] as f64;
                    }
                    prop_assert_eq!(want[t * shape.rows + row], (acc as f32) / s[t], "row {} token {}", row, t);
                }
            }
            for isa in runnable() {
                let got = ternary_matmul(&m, &x, tokens, isa, &pool).unwrap();
                prop_assert_eq!(&got, &want, "{} differs from scalar for {:?} x {} tokens", isa.name(), shape, tokens);
            }
        }

        #[test]
        fn wide_ternary_paths_match_scalar((shape, codes, scales, x, tokens) in wide_ternary_case()) {
            let pool = Pool::new(1, &Topology::detect()).unwrap();
            let m = PackedTernary::new(&codes, &scales, shape).unwrap();
            let want = ternary_matmul(&m, &x, tokens, Isa::Scalar, &pool).unwrap();
            for isa in runnable() {
                let got = ternary_matmul(&m, &x, tokens, isa, &pool).unwrap();
                prop_assert_eq!(&got, &want, "{} differs from scalar for {:?} x {} tokens", isa.name(), shape, tokens);
            }
        }

        #[test]
        fn int8_paths_match_scalar(rows in 1usize..19, cols in 1usize..400, tokens in 1usize..10, seed in any::<u32>()) {
            let shape = Int8Shape { rows, cols };
            let w: Vec<f32> = (0..rows * cols).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 - 500.0).collect();
            let (mut q, scales) = PackedInt8::quantize_f32(&w, rows, cols).unwrap();
            q[0] = -128; // the full int8 range must work on every path
            let x: Vec<f32> = (0..tokens * cols).map(|i| ((i as u32).wrapping_mul(40503).wrapping_add(seed) % 255) as f32 - 127.0).collect();
            let m = PackedInt8::new(&q, &scales, shape).unwrap();
            let (q2, s2) = m.unpack();
            prop_assert_eq!(&q2, &q);
            prop_assert_eq!(&s2, &scales);
            let pool = Pool::new(1, &Topology::detect()).unwrap();
            let want = int8_matmul(&m, &x, tokens, Isa::Scalar, &pool).unwrap();
            for isa in runnable() {
                let got = int8_matmul(&m, &x, tokens, isa, &pool).unwrap();
                prop_assert_eq!(&got, &want, "{} int8 differs from scalar", isa.name());
            }
        }
    }

    #[test]
    fn random_scales_stay_within_rounding() {
        let shape = TernaryShape { rows: 37, cols: 1000, group_size: 128 };
        let codes: Vec<i8> = (0..shape.rows * shape.cols).map(|i| ((i * 7919) % 3) as i8 - 1).collect();
        let scales: Vec<f32> = (0..shape.rows * shape.groups()).map(|i| 0.01 + (i % 17) as f32 * 0.003).collect();
        let x: Vec<f32> = (0..3 * shape.cols).map(|i| ((i * 31) % 200) as f32 / 100.0 - 1.0).collect();
        let pool = Pool::new(1, &Topology::detect()).unwrap();
        let m = PackedTernary::new(&codes, &scales, shape).unwrap();
        let want = ternary_matmul(&m, &x, 3, Isa::Scalar, &pool).unwrap();
        let bound = 1e-5 * want.iter().fold(1f32, |a, v| a.max(v.abs()));
        for isa in runnable() {
            let got = ternary_matmul(&m, &x, 3, isa, &pool).unwrap();
            let err = got.iter().zip(&want).fold(0f32, |a, (g, w)| a.max((g - w).abs()));
            assert!(err <= bound, "{}: max diff {err} > {bound}", isa.name());
        }
    }

    #[test]
    fn a_token_split_gives_the_bits_of_one_thread() {
        let isa = crate::kernels::best_isa();
        let one = Pool::new(1, &Topology::detect()).unwrap();
        let pool = Pool::new(3, &Topology { nodes: vec![Node { id: 0, cpus: vec![0, 1, 2] }] }).unwrap();
        for (rows, tokens) in [(512, 16), (512, 7), (510, 16), (512, 5)] {
            let shape = TernaryShape { rows, cols: 2048, group_size: 128 };
            let codes: Vec<i8> = (0..rows * shape.cols).map(|i| ((i * 13 + i / 7) % 3) as i8 - 1).collect();
            let scales: Vec<f32> = (0..rows * shape.groups()).map(|i| 0.01 + (i % 11) as f32 * 0.003).collect();
            let x: Vec<f32> = (0..tokens * shape.cols).map(|i| ((i * 17) % 100) as f32 / 50.0 - 1.0).collect();
            let split = pool.token_split(tokens, rows, rows * shape.cols * tokens);
            // whole tiles and >= 2 tokens per thread split by tokens; otherwise the rows are split
            assert_eq!(split.is_some(), rows % 4 == 0 && tokens >= 6, "{rows} x {tokens}");
            let want = ternary_matmul(&PackedTernary::new(&codes, &scales, shape).unwrap(), &x, tokens, isa, &one);
            let got = ternary_matmul(&place_ternary(&codes, &scales, shape, &pool).unwrap(), &x, tokens, isa, &pool);
            assert_eq!(got.unwrap(), want.unwrap(), "{rows} x {tokens}");
        }
    }

    #[test]
    fn threads_and_parts_do_not_change_results() {
        let shape = TernaryShape { rows: 203, cols: 300, group_size: 64 };
        let codes: Vec<i8> = (0..shape.rows * shape.cols).map(|i| ((i * 13) % 3) as i8 - 1).collect();
        let scales: Vec<f32> = (0..shape.rows * shape.groups()).map(|i| 0.5 + (i % 5) as f32).collect();
        let x: Vec<f32> = (0..2 * shape.cols).map(|i| ((i * 17) % 100) as f32 / 50.0 - 1.0).collect();
        let isa = crate::kernels::best_isa();
        let one = Pool::new(1, &Topology::detect()).unwrap();
        let m = PackedTernary::new(&codes, &scales, shape).unwrap();
        let want = ternary_matmul(&m, &x, 2, isa, &one).unwrap();
        // A fabricated two-node machine: two parts, each split over its node's threads.
        let topo = Topology { nodes: vec![Node { id: 0, cpus: vec![0] }, Node { id: 1, cpus: vec![1] }] };
        let pool = Pool::new(3, &topo).unwrap();
        let placed = place_ternary(&codes, &scales, shape, &pool).unwrap();
        assert_eq!(placed.parts.len(), 2);
        assert_eq!(placed.unpack(), (codes.clone(), scales.clone()));
        let pieces = pool.run(&placed.parts.iter().map(|p| p.tiles).collect::<Vec<_>>(), usize::MAX, |item| {
            let part = &placed.parts[item.part];
            let tb = shape.tile_code_bytes();
            let ts = shape.tile_scales();
            let acts = TernaryActs::new(&x, 2, shape);
            let ldo = item.tiles.len() * ROWS_PER_TILE;
            let mut out = vec![0f32; 2 * ldo];
            kernels::ternary(
                isa,
                &shape,
                &part.codes.bytes()[item.tiles.start * tb..item.tiles.end * tb],
                &part.scales.f32s()[item.tiles.start * ts..item.tiles.end * ts],
                &acts,
                &mut out,
                ldo,
            );
            out
        });
        assert!(pieces.len() >= 3, "every thread should get work, got {} pieces", pieces.len());
        let firsts: Vec<usize> = placed.parts.iter().map(|p| p.first_tile).collect();
        assert_eq!(gather(pieces, &firsts, 2, shape.rows), want);
        // And the public entry point with the real threshold.
        assert_eq!(ternary_matmul(&placed, &x, 2, isa, &pool).unwrap(), want);
        // One token: every thread writes its items' rows of y in place (run_rows), forced parallel.
        let x1 = &x[..shape.cols];
        let want1 = ternary_matmul(&m, x1, 1, isa, &one).unwrap();
        let acts = TernaryActs::for_isa(x1, 1, shape, isa);
        let part_tiles: Vec<usize> = placed.parts.iter().map(|p| p.tiles).collect();
        let mut y = vec![f32::NAN; part_tiles.iter().sum::<usize>() * ROWS_PER_TILE];
        let calls = std::sync::atomic::AtomicUsize::new(0);
        pool.run_rows(&part_tiles, &firsts, usize::MAX, &mut y, |item, rows| {
            calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let part = &placed.parts[item.part];
            let (tb, ts) = (shape.tile_code_bytes(), shape.tile_scales());
            let (codes, scales) = (
                &part.codes.bytes()[item.tiles.start * tb..item.tiles.end * tb],
                &part.scales.f32s()[item.tiles.start * ts..item.tiles.end * ts],
            );
            let ldo = rows.len();
            kernels::ternary(isa, &shape, codes, scales, &acts, rows, ldo);
        });
        assert!(calls.into_inner() >= 3, "every thread should get rows");
        assert_eq!(&y[..shape.rows], &want1[..]);
        assert_eq!(ternary_matmul(&placed, x1, 1, isa, &pool).unwrap(), want1);
    }

    #[test]
    fn shared_weight_pages_keep_parts_and_results() {
        let shape = TernaryShape { rows: 203, cols: 300, group_size: 64 };
        let codes: Vec<i8> = (0..shape.rows * shape.cols).map(|i| ((i * 13) % 3) as i8 - 1).collect();
        let scales: Vec<f32> = (0..shape.rows * shape.groups()).map(|i| 0.5 + (i % 5) as f32).collect();
        let w: Vec<f32> = (0..70 * 300).map(|i| ((i * 29) % 255) as f32 - 127.0).collect();
        let (q, qs) = PackedInt8::quantize_f32(&w, 70, 300).unwrap();
        let x: Vec<f32> = (0..3 * shape.cols).map(|i| ((i * 17) % 100) as f32 / 50.0 - 1.0).collect();
        let isa = crate::kernels::best_isa();
        // one node (parts shared on the caller) and a fabricated two-node machine (one mapping per node)
        let two = Topology { nodes: vec![Node { id: 0, cpus: vec![0] }, Node { id: 1, cpus: vec![1] }] };
        for pool in [Pool::new(1, &Topology::detect()).unwrap(), Pool::new(3, &two).unwrap()] {
            let t = place_ternary(&codes, &scales, shape, &pool).unwrap();
            let i8m = place_int8(&q, &qs, Int8Shape { rows: 70, cols: 300 }, &pool).unwrap();
            let (ts, is) = share_weight_pages(&[&t, &t], &[&i8m], &pool).unwrap();
            assert_eq!((ts.len(), is.len()), (2, 1));
            for shared in &ts {
                assert_eq!(shared.parts.len(), pool.nodes());
                assert!(shared.parts.iter().all(|p| p.codes.is_shared() && p.scales.is_shared()));
                assert_eq!(shared.unpack(), (codes.clone(), scales.clone()));
                assert_eq!(
                    ternary_matmul(shared, &x, 3, isa, &pool).unwrap(),
                    ternary_matmul(&t, &x, 3, isa, &pool).unwrap()
                );
            }
            assert_eq!(is[0].unpack(), (q.clone(), qs.clone()));
            assert_eq!(int8_matmul(&is[0], &x, 3, isa, &pool).unwrap(), int8_matmul(&i8m, &x, 3, isa, &pool).unwrap());
        }
    }

    #[test]
    fn wrong_x_length_is_an_error() {
        let shape = TernaryShape { rows: 4, cols: 64, group_size: 64 };
        let m = PackedTernary::new(&[0; 256], &[1.0; 4], shape).unwrap();
        let pool = Pool::new(1, &Topology::detect()).unwrap();
        let err = ternary_matmul(&m, &[0.0; 63], 1, Isa::Scalar, &pool).unwrap_err();
        assert!(err.to_string().starts_with("x: expected 1 x 64"), "{err}");
    }
}
