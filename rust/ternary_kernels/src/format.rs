//! The packed ternary layout: the one truth for where each 2-bit code lives (see docs/packed-layout.md).
//!
//! - 2 bits per weight. A code c in {-1, 0, 1} is stored as the unsigned field c + 1 in {0, 1, 2}
//!   (3 never occurs), so the kernels can feed it straight to u8 x s8 multiplies (`maddubs`,
//!   `vpdpbusd`) and subtract the per-group sum of activations afterwards:
//!   sum(c * x) = sum((c + 1) * x) - sum(x).
//! - Rows are grouped in tiles of ROWS_PER_TILE = 4 (M is padded to a multiple of 4 with zero codes
//!   and zero scales). Within a tile, K is padded to a whole number of groups (Kp = G * group_size).
//! - A tile is Kp / 64 "vectors" of 64 bytes; vector v holds k in [64 v, 64 v + 64) of all 4 rows.
//!   Byte b of a vector: dword j = b / 4, byte-in-dword e = b % 4, row r = j / 4, quad q = j % 4.
//!   Its 2-bit field f (bits 2f, 2f+1) holds the weight of row r at k = 64 v + 16 f + 4 q + e.
//!   So after `(byte >> 2f) & 3`, each 128-bit lane of a decoded vector holds 16 consecutive weights
//!   of one row (lane r = row r), all multiplying the same 16 activations q[64 v + 16 f ..][..16]:
//!   the kernels broadcast those 16 bytes to every lane (a plain broadcast load, no expanded copy).
//! - Per-group scales: [tile][G][4] f32 (the 4 rows of a tile side by side).

/// Rows per tile: the unit of padding, threading and the kernels' register blocking.
pub const ROWS_PER_TILE: usize = 4;
/// Bytes per packed vector (one AVX-512 register; two AVX2 registers).
pub const VECTOR_BYTES: usize = 64;
/// Weights of one row per packed vector.
pub const WEIGHTS_PER_VECTOR: usize = 64;
/// Group sizes the kernels support (each a whole number of vectors).
pub const GROUP_SIZES: [usize; 3] = [64, 128, 256];

const _: () = assert!(ROWS_PER_TILE * WEIGHTS_PER_VECTOR * 2 / 8 == VECTOR_BYTES);

/// Byte offset inside a tile's code block, and bit shift, of the weight of tile row `r` at input `k`.
#[inline(always)]
pub fn code_position(r: usize, k: usize) -> (usize, u32) {
    let v = k / WEIGHTS_PER_VECTOR;
    let within = k % WEIGHTS_PER_VECTOR;
    let field = within / 16;
    let quad = (within % 16) / 4;
    let e = within % 4;
    let dword = r * 4 + quad;
    (v * VECTOR_BYTES + dword * 4 + e, 2 * field as u32)
}

/// The shape of a ternary matrix and the sizes derived from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TernaryShape {
    pub rows: usize,
    pub cols: usize,
    pub group_size: usize,
}

impl TernaryShape {
    pub fn groups(&self) -> usize {
        self.cols.div_ceil(self.group_size)
    }
    pub fn tiles(&self) -> usize {
        self.rows.div_ceil(ROWS_PER_TILE)
    }
    /// K padded to whole groups.
    pub fn padded_cols(&self) -> usize {
        self.groups() * self.group_size
    }
    /// Code bytes of one tile (4 rows x Kp weights x 2 bits).
    pub fn tile_code_bytes(&self) -> usize {
        self.padded_cols()
    }
    /// Scales (f32) of one tile.
    pub fn tile_scales(&self) -> usize {
        self.groups() * ROWS_PER_TILE
    }
    pub fn vectors_per_group(&self) -> usize {
        self.group_size / WEIGHTS_PER_VECTOR
    }
}

/// Int8 matrices (the output head) are row-major with K padded to a multiple of 64 and M to a
/// multiple of 4; the padding is zero. Per-row scales are stored separately.
pub const INT8_COL_ALIGN: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_cover_each_bit_pair_once() {
        let mut seen = vec![0u8; 256];
        for r in 0..ROWS_PER_TILE {
            for k in 0..256 {
                let (byte, shift) = code_position(r, k);
                assert!(byte < 256 && shift < 8);
                assert_eq!(seen[byte] & (3 << shift), 0, "r={r} k={k} collides");
                seen[byte] |= 3 << shift;
            }
        }
        assert!(seen.iter().all(|&b| b == 0xff));
    }
}
