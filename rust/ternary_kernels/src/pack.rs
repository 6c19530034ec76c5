//! Packing int8 codes + f32 scales into the planar 2-bit layout of format.rs, and unpacking back.
//!
//! A matrix is stored as one or more parts (contiguous ranges of row tiles), each with its own
//! 64-byte aligned code and scale buffers, so a NUMA-aware caller can create each part on the node
//! whose threads compute it (first touch). unpack(pack(x)) == x for every shape: padding is internal.

use std::ops::Range;

use crate::aligned::AlignedBuf;
use crate::error::{invalid, Result};
use crate::format::{code_position, TernaryShape, GROUP_SIZES, INT8_COL_ALIGN, ROWS_PER_TILE};

/// Row tiles [first_tile, first_tile + tiles) of a ternary matrix.
pub struct TernaryPart {
    pub first_tile: usize,
    pub tiles: usize,
    /// [tile][Kp / 64 vectors][64 bytes]
    pub codes: AlignedBuf,
    /// [tile][G][4] f32
    pub scales: AlignedBuf,
}

pub struct PackedTernary {
    pub shape: TernaryShape,
    pub parts: Vec<TernaryPart>,
}

/// Check shapes and values before packing; every message names the argument.
pub fn validate_ternary(codes: &[i8], scales: &[f32], shape: TernaryShape) -> Result<()> {
    let TernaryShape { rows, cols, group_size } = shape;
    if !GROUP_SIZES.contains(&group_size) {
        return Err(invalid("group_size", format!("expected one of 64, 128, 256, got {group_size}")));
    }
    if rows == 0 || cols == 0 {
        return Err(invalid("codes", format!("expected a non-empty [M, K] matrix, got [{rows}, {cols}]")));
    }
    if codes.len() != rows * cols {
        return Err(invalid(
            "codes",
            format!("expected {} values for [{rows}, {cols}], got {}", rows * cols, codes.len()),
        ));
    }
    let g = shape.groups();
    if scales.len() != rows * g {
        return Err(invalid(
            "scales",
            format!("expected shape [{rows}, {g}] (ceil({cols} / {group_size}) groups), got {} values", scales.len()),
        ));
    }
    if let Some(i) = codes.iter().position(|&c| !(-1..=1).contains(&c)) {
        return Err(invalid(
            "codes",
            format!("value {} at [{}, {}] is not in {{-1, 0, 1}}", codes[i], i / cols, i % cols),
        ));
    }
    Ok(())
}

impl TernaryPart {
    /// The codes and scales of this part's tiles `tiles` (local indices), as the kernels take them.
    pub fn tile_range(&self, shape: &TernaryShape, tiles: Range<usize>) -> (&[u8], &[f32]) {
        let (tb, ts) = (shape.tile_code_bytes(), shape.tile_scales());
        (&self.codes.bytes()[tiles.start * tb..tiles.end * tb], &self.scales.f32s()[tiles.start * ts..tiles.end * ts])
    }

    /// Pack row tiles `tiles` of a validated row-major matrix; allocates (first-touches) in this thread.
    pub fn pack(codes: &[i8], scales: &[f32], shape: TernaryShape, tiles: Range<usize>) -> TernaryPart {
        let n_tiles = tiles.len();
        let tile_bytes = shape.tile_code_bytes();
        let groups = shape.groups();
        let mut code_buf = AlignedBuf::zeroed(n_tiles * tile_bytes);
        let mut scale_buf = AlignedBuf::zeroed(n_tiles * shape.tile_scales() * 4);
        let out = code_buf.bytes_mut();
        // Padding weights (k >= K or rows >= M) hold field 1, i.e. code 0.
        out.fill(0b0101_0101);
        for (t_local, tile) in tiles.clone().enumerate() {
            let tile_out = &mut out[t_local * tile_bytes..(t_local + 1) * tile_bytes];
            for r in 0..ROWS_PER_TILE {
                let row = tile * ROWS_PER_TILE + r;
                if row >= shape.rows {
                    break;
                }
                let src = &codes[row * shape.cols..(row + 1) * shape.cols];
                for (k, &c) in src.iter().enumerate() {
                    let (byte, shift) = code_position(r, k);
                    let field = (c + 1) as u8;
                    tile_out[byte] = (tile_out[byte] & !(3 << shift)) | (field << shift);
                }
            }
        }
        let sc = scale_buf.f32s_mut();
        for (t_local, tile) in tiles.clone().enumerate() {
            for r in 0..ROWS_PER_TILE {
                let row = tile * ROWS_PER_TILE + r;
                if row >= shape.rows {
                    break;
                }
                for g in 0..groups {
                    sc[(t_local * groups + g) * ROWS_PER_TILE + r] = scales[row * groups + g];
                }
            }
        }
        TernaryPart { first_tile: tiles.start, tiles: n_tiles, codes: code_buf, scales: scale_buf }
    }
}

impl PackedTernary {
    /// Validate and pack in the calling thread, as one part.
    pub fn new(codes: &[i8], scales: &[f32], shape: TernaryShape) -> Result<Self> {
        validate_ternary(codes, scales, shape)?;
        let part = TernaryPart::pack(codes, scales, shape, 0..shape.tiles());
        Ok(PackedTernary { shape, parts: vec![part] })
    }

    /// Bytes of packed codes and scales (padding included).
    pub fn nbytes(&self) -> usize {
        self.parts.iter().map(|p| p.codes.len() + p.scales.len()).sum()
    }

    /// (codes int8 [M, K] row-major, scales f32 [M, G]) exactly as given to `new`.
    pub fn unpack(&self) -> (Vec<i8>, Vec<f32>) {
        let s = self.shape;
        let groups = s.groups();
        let mut codes = vec![0i8; s.rows * s.cols];
        let mut scales = vec![0f32; s.rows * groups];
        for part in &self.parts {
            let bytes = part.codes.bytes();
            let sc = part.scales.f32s();
            for t_local in 0..part.tiles {
                let tile_codes = &bytes[t_local * s.tile_code_bytes()..];
                for r in 0..ROWS_PER_TILE {
                    let row = (part.first_tile + t_local) * ROWS_PER_TILE + r;
                    if row >= s.rows {
                        break;
                    }
                    for k in 0..s.cols {
                        let (byte, shift) = code_position(r, k);
                        codes[row * s.cols + k] = ((tile_codes[byte] >> shift) & 3) as i8 - 1;
                    }
                    for g in 0..groups {
                        scales[row * groups + g] = sc[(t_local * groups + g) * ROWS_PER_TILE + r];
                    }
                }
            }
        }
        (codes, scales)
    }
}

// ---------------------------------------------------------------------------------------------
// Int8 matrices (per-row scale), e.g. the output head.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Int8Shape {
    pub rows: usize,
    pub cols: usize,
}

impl Int8Shape {
    pub fn padded_cols(&self) -> usize {
        self.cols.div_ceil(INT8_COL_ALIGN) * INT8_COL_ALIGN
    }
    pub fn tiles(&self) -> usize {
        self.rows.div_ceil(ROWS_PER_TILE)
    }
}

/// Row tiles [first_tile, first_tile + tiles) of an int8 matrix: q [rows][Kp] i8, scales [rows] f32.
pub struct Int8Part {
    pub first_tile: usize,
    pub tiles: usize,
    pub q: AlignedBuf,
    pub scales: AlignedBuf,
}

pub struct PackedInt8 {
    pub shape: Int8Shape,
    pub parts: Vec<Int8Part>,
}

pub fn validate_int8(q: &[i8], scales: &[f32], shape: Int8Shape) -> Result<()> {
    let Int8Shape { rows, cols } = shape;
    if rows == 0 || cols == 0 {
        return Err(invalid("q", format!("expected a non-empty [M, K] matrix, got [{rows}, {cols}]")));
    }
    if q.len() != rows * cols {
        return Err(invalid("q", format!("expected {} values for [{rows}, {cols}], got {}", rows * cols, q.len())));
    }
    if scales.len() != rows {
        return Err(invalid(
            "scales",
            format!("expected shape [{rows}] (one per row of q), got {} values", scales.len()),
        ));
    }
    Ok(())
}

impl Int8Part {
    pub fn pack(q: &[i8], scales: &[f32], shape: Int8Shape, tiles: Range<usize>) -> Int8Part {
        let kp = shape.padded_cols();
        let rows_here = tiles.len() * ROWS_PER_TILE;
        let mut qbuf = AlignedBuf::zeroed(rows_here * kp);
        let mut sbuf = AlignedBuf::zeroed(rows_here * 4);
        let first_row = tiles.start * ROWS_PER_TILE;
        let dst = qbuf.i8s_mut();
        let sc = sbuf.f32s_mut();
        for r in 0..rows_here {
            let row = first_row + r;
            if row >= shape.rows {
                break;
            }
            dst[r * kp..r * kp + shape.cols].copy_from_slice(&q[row * shape.cols..(row + 1) * shape.cols]);
            sc[r] = scales[row];
        }
        Int8Part { first_tile: tiles.start, tiles: tiles.len(), q: qbuf, scales: sbuf }
    }
}

impl PackedInt8 {
    pub fn new(q: &[i8], scales: &[f32], shape: Int8Shape) -> Result<Self> {
        validate_int8(q, scales, shape)?;
        let part = Int8Part::pack(q, scales, shape, 0..shape.tiles());
        Ok(PackedInt8 { shape, parts: vec![part] })
    }

    /// Per-row absmax quantization: scale = max|w| / 127, q = round_half_even(w / scale); zero rows get scale 0.
    pub fn quantize_f32(w: &[f32], rows: usize, cols: usize) -> Result<(Vec<i8>, Vec<f32>)> {
        if rows == 0 || cols == 0 || w.len() != rows * cols {
            return Err(invalid(
                "w",
                format!("expected a non-empty [M, K] matrix, got {} values for [{rows}, {cols}]", w.len()),
            ));
        }
        let mut q = vec![0i8; rows * cols];
        let mut scales = vec![0f32; rows];
        for r in 0..rows {
            let row = &w[r * cols..(r + 1) * cols];
            if let Some(k) = row.iter().position(|v| !v.is_finite()) {
                return Err(invalid("w", format!("non-finite value {} at [{r}, {k}]", row[k])));
            }
            let absmax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            if absmax == 0.0 {
                continue;
            }
            let scale = absmax / 127.0;
            scales[r] = scale;
            for (dst, &v) in q[r * cols..(r + 1) * cols].iter_mut().zip(row) {
                *dst = (v / scale).round_ties_even().clamp(-127.0, 127.0) as i8;
            }
        }
        Ok((q, scales))
    }

    pub fn nbytes(&self) -> usize {
        self.parts.iter().map(|p| p.q.len() + p.scales.len()).sum()
    }

    pub fn unpack(&self) -> (Vec<i8>, Vec<f32>) {
        let s = self.shape;
        let kp = s.padded_cols();
        let mut q = vec![0i8; s.rows * s.cols];
        let mut scales = vec![0f32; s.rows];
        for part in &self.parts {
            for r in 0..part.tiles * ROWS_PER_TILE {
                let row = part.first_tile * ROWS_PER_TILE + r;
                if row >= s.rows {
                    break;
                }
                q[row * s.cols..(row + 1) * s.cols].copy_from_slice(&part.q.i8s()[r * kp..r * kp + s.cols]);
                scales[row] = part.scales.f32s()[r];
            }
        }
        (q, scales)
    }
}
