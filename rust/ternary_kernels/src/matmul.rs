//! The entry points: quantize activations, split row tiles across the pool, run a kernel, gather.
//!
//! Output is [tokens][M] f32 row-major. Each work item computes a contiguous range of row tiles of
//! one part into its own buffer; padded rows are dropped when gathering.

use std::ops::Range;

use crate::act::{Int8Acts, TernaryActs};
use crate::error::{invalid, Result};
use crate::format::ROWS_PER_TILE;
use crate::kernels::{self, Isa};
use crate::pack::{PackedInt8, PackedTernary};
use crate::pool::Pool;

/// A contiguous range of tiles inside part `part`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkItem {
    pub part: usize,
    pub tiles: Range<usize>,
}

fn check_x(x: &[f32], tokens: usize, cols: usize) -> Result<()> {
    if x.len() != tokens * cols {
        return Err(invalid("x", format!("expected {tokens} x {cols} = {} values (K = {cols}), got {}", tokens * cols, x.len())));
    }
    Ok(())
}

/// y [tokens, M] = ternary matmul of x [tokens, K].
pub fn ternary_matmul(m: &PackedTernary, x: &[f32], tokens: usize, isa: Isa, pool: &Pool) -> Result<Vec<f32>> {
    let shape = m.shape;
    check_x(x, tokens, shape.cols)?;
    let acts = TernaryActs::new(x, tokens, shape);
    let part_tiles: Vec<usize> = m.parts.iter().map(|p| p.tiles).collect();
    let work = shape.rows * shape.cols * tokens;
    let pieces = pool.run(&part_tiles, work, |item: &WorkItem| {
        let part = &m.parts[item.part];
        let tb = shape.tile_code_bytes();
        let ts = shape.tile_scales();
        let codes = &part.codes.bytes()[item.tiles.start * tb..item.tiles.end * tb];
        let scales = &part.scales.f32s()[item.tiles.start * ts..item.tiles.end * ts];
        let ldo = item.tiles.len() * ROWS_PER_TILE;
        let mut out = vec![0f32; tokens * ldo];
        kernels::ternary(isa, &shape, codes, scales, &acts, &mut out, ldo);
        out
    });
    let first_tiles: Vec<usize> = m.parts.iter().map(|p| p.first_tile).collect();
    Ok(gather(pieces, &first_tiles, tokens, shape.rows))
}

/// y [tokens, M] = int8 matmul of x [tokens, K].
pub fn int8_matmul(m: &PackedInt8, x: &[f32], tokens: usize, isa: Isa, pool: &Pool) -> Result<Vec<f32>> {
    let shape = m.shape;
    check_x(x, tokens, shape.cols)?;
    let acts = Int8Acts::new(x, tokens, shape.cols);
    let kp = shape.padded_cols();
    let part_tiles: Vec<usize> = m.parts.iter().map(|p| p.tiles).collect();
    let work = shape.rows * shape.cols * tokens * 4;
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
    let first_tiles: Vec<usize> = m.parts.iter().map(|p| p.first_tile).collect();
    Ok(gather(pieces, &first_tiles, tokens, shape.rows))
}

/// Copy each work item's [tokens][rows_of_item] block into y [tokens][rows], dropping padded rows.
fn gather(pieces: Vec<(WorkItem, Vec<f32>)>, first_tiles: &[usize], tokens: usize, rows: usize) -> Vec<f32> {
    if pieces.len() == 1 && tokens == 1 {
        let (_, mut only) = pieces.into_iter().next().expect("one piece");
        only.truncate(rows);
        return only;
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
pub fn place_ternary(codes: &[i8], scales: &[f32], shape: crate::format::TernaryShape, pool: &Pool) -> Result<PackedTernary> {
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
