//! Kernel paths and run-time dispatch: scalar everywhere, AVX2 and AVX-512 on x86_64.
//!
//! The best path the CPU supports is detected once and cached; NANOCHAT_TERNARY_ISA=scalar|avx2|
//! avx512bw|avx512vnni forces one (an error if this CPU lacks it). Tests and benches can also pass
//! a path explicitly. Within avx512vnni, one-token blocks also use GFNI where the CPU has it (the
//! same bits; avx512.rs `block_body`).

use std::sync::OnceLock;

use crate::act::{Int8Acts, TernaryActs};
use crate::error::{Error, Result};
use crate::format::TernaryShape;
#[cfg(target_arch = "x86_64")]
use crate::format::{ROWS_PER_TILE, VECTOR_BYTES};

#[cfg(target_arch = "x86_64")]
pub mod avx2;
#[cfg(target_arch = "x86_64")]
pub mod avx512;
#[cfg(target_arch = "x86_64")]
pub mod lut;
pub mod scalar;

/// Software prefetch reaches at least this far ahead along the weights: a decode step reads every
/// weight from memory once (a model does not fit the LLC), and the hardware prefetcher alone
/// leaves a GEMV at ~60% of the streaming bandwidth. Into L2 (hint T1), whose miss queue is deeper
/// than L1's (T1 beat T0, T2 and NTA by 25-35% on a cold 4096x4096 GEMV).
pub(crate) const PREFETCH_MIN_BYTES: usize = 8192;

/// Everything one SIMD ternary call reads, its lengths checked once by `Ternary::checked`, the bounds
/// every pointer of the AVX2 and AVX-512 loops stays within.
#[cfg(target_arch = "x86_64")]
pub(crate) struct Ternary<'a> {
    pub codes: &'a [u8],
    pub scales: &'a [f32],
    pub q: &'a [i8],
    pub group_sums: &'a [i32],
    pub group_starts: &'a [[i32; 4]],
    /// `TernaryActs::lanes` for the AVX-512 paths' blocks of 2+ tokens (empty otherwise).
    pub lanes: &'a [i8],
    pub s: &'a [f32],
    pub kp: usize,
    pub groups: usize,
    pub vectors_per_group: usize,
    pub tile_bytes: usize,
    pub n_tiles: usize,
}

#[cfg(target_arch = "x86_64")]
impl<'a> Ternary<'a> {
    /// Panics unless codes, scales, activations and `out` (rows at stride `ldo`) cover whole tiles.
    pub fn checked(
        shape: &TernaryShape,
        codes: &'a [u8],
        scales: &'a [f32],
        acts: &'a TernaryActs,
        lanes: &'a [i8],
        out: &[f32],
        ldo: usize,
    ) -> Self {
        let tile_bytes = shape.tile_code_bytes();
        let n_tiles = codes.len() / tile_bytes;
        let k = Ternary {
            codes,
            scales,
            q: acts.q.i8s(),
            group_sums: &acts.group_sums,
            group_starts: &acts.group_starts,
            lanes,
            s: &acts.s,
            kp: acts.kp,
            groups: shape.groups(),
            vectors_per_group: shape.vectors_per_group(),
            tile_bytes,
            n_tiles,
        };
        // kp == tile_bytes: 4 rows x 2 bits = 1 byte per k
        assert!(k.kp == tile_bytes && k.kp.is_multiple_of(VECTOR_BYTES) && acts.q.len() >= acts.tokens * k.kp);
        assert!(scales.len() >= n_tiles * k.groups * ROWS_PER_TILE && k.group_sums.len() >= acts.tokens * k.groups);
        assert!(k.group_starts.len() >= acts.tokens * k.groups);
        assert!(lanes.is_empty() || lanes.len() >= acts.tokens * crate::act::lane_stride(k.kp));
        assert!(acts.tokens == 0 || out.len() >= (acts.tokens - 1) * ldo + n_tiles * ROWS_PER_TILE);
        k
    }
}

/// Prefetch distance for a loop that walks `block_bytes` of interleaved weight streams at a time
/// (several rows side by side): a whole number of blocks, so every prefetch lands on the line that
/// the same stream reads in a later block. A plain 8 KiB hit the next rows of the *current* block
/// whenever a block was wider than 8 KiB (K >= 2048): half the lines were never prefetched, and a
/// cold 4096x4096 GEMV ran at 11.6 GB/s instead of 15.8 (1 thread).
pub(crate) fn prefetch_distance(block_bytes: usize) -> usize {
    PREFETCH_MIN_BYTES.div_ceil(block_bytes.max(1)) * block_bytes.max(1)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512Bw,
    Avx512Vnni,
}

pub const ALL_ISAS: [Isa; 4] = [Isa::Scalar, Isa::Avx2, Isa::Avx512Bw, Isa::Avx512Vnni];

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Bw => "avx512bw",
            Isa::Avx512Vnni => "avx512vnni",
        }
    }

    pub fn parse(name: &str) -> Result<Isa> {
        ALL_ISAS.into_iter().find(|isa| isa.name() == name.trim().to_ascii_lowercase()).ok_or_else(|| {
            Error::Isa(format!("NANOCHAT_TERNARY_ISA: expected scalar, avx2, avx512bw or avx512vnni, got {name:?}"))
        })
    }

    /// The first CPU feature this path needs that the machine lacks, or None if it can run.
    pub fn missing_feature(self) -> Option<&'static str> {
        #[cfg(target_arch = "x86_64")]
        {
            let needs: &[(&str, bool)] = match self {
                Isa::Scalar => &[],
                Isa::Avx2 => &[("avx2", is_x86_feature_detected!("avx2")), ("fma", is_x86_feature_detected!("fma"))],
                Isa::Avx512Bw => &[
                    ("avx512f", is_x86_feature_detected!("avx512f")),
                    ("avx512bw", is_x86_feature_detected!("avx512bw")),
                    ("avx512vl", is_x86_feature_detected!("avx512vl")),
                ],
                Isa::Avx512Vnni => &[
                    ("avx512f", is_x86_feature_detected!("avx512f")),
                    ("avx512bw", is_x86_feature_detected!("avx512bw")),
                    ("avx512vl", is_x86_feature_detected!("avx512vl")),
                    ("avx512vnni", is_x86_feature_detected!("avx512vnni")),
                ],
            };
            needs.iter().find(|(_, ok)| !ok).map(|(name, _)| *name)
        }
        #[cfg(not(target_arch = "x86_64"))]
        match self {
            Isa::Scalar => None,
            _ => Some("x86_64"),
        }
    }

    /// Whether this path's ternary kernel reads `TernaryActs::lanes` (the 512-bit ones do, for 2+ tokens).
    pub fn reads_lanes(self) -> bool {
        matches!(self, Isa::Avx512Bw | Isa::Avx512Vnni)
    }

    pub fn available(self) -> bool {
        self.missing_feature().is_none()
    }
}

/// The fastest path this CPU supports.
pub fn best_isa() -> Isa {
    ALL_ISAS.into_iter().rev().find(|isa| isa.available()).unwrap_or(Isa::Scalar)
}

/// The path every call uses: NANOCHAT_TERNARY_ISA if set, else the best; decided once per process.
pub fn active_isa() -> Result<Isa> {
    static ACTIVE: OnceLock<Result<Isa>> = OnceLock::new();
    ACTIVE
        .get_or_init(|| match std::env::var("NANOCHAT_TERNARY_ISA") {
            Ok(name) if !name.trim().is_empty() => {
                let isa = Isa::parse(&name)?;
                match isa.missing_feature() {
                    None => Ok(isa),
                    Some(feat) => Err(Error::Isa(format!(
                        "NANOCHAT_TERNARY_ISA={} needs the CPU feature {feat}, which this CPU lacks",
                        isa.name()
                    ))),
                }
            }
            _ => Ok(best_isa()),
        })
        .clone()
}

/// Ternary kernel on whole tiles: out[t * ldo + row_in_slice] for every token. Panics if `isa` is not
/// available (callers pick it with `active_isa` or `Isa::available`).
pub fn ternary(
    isa: Isa,
    shape: &TernaryShape,
    codes: &[u8],
    scales: &[f32],
    acts: &TernaryActs,
    out: &mut [f32],
    ldo: usize,
) {
    // The SIMD bodies are only sound on a CPU that has their features: refuse, never guess.
    assert!(isa.available(), "kernel path {} is not available on this CPU", isa.name());
    match isa {
        Isa::Scalar => scalar::ternary(shape, codes, scales, acts, out, ldo),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2::ternary(shape, codes, scales, acts, out, ldo),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Bw => avx512::ternary(false, false, shape, codes, scales, acts, out, ldo),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => {
            avx512::ternary(true, is_x86_feature_detected!("gfni"), shape, codes, scales, acts, out, ldo)
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => scalar::ternary(shape, codes, scales, acts, out, ldo),
    }
}

/// Int8 kernel on whole rows ([rows][kp]): out[t * ldo + row_in_slice]. Panics if `isa` is not available.
pub fn int8(isa: Isa, q: &[i8], scales: &[f32], acts: &Int8Acts, out: &mut [f32], ldo: usize) {
    // The SIMD bodies are only sound on a CPU that has their features: refuse, never guess.
    assert!(isa.available(), "kernel path {} is not available on this CPU", isa.name());
    match isa {
        Isa::Scalar => scalar::int8(q, scales, acts, out, ldo),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2::int8(q, scales, acts, out, ldo),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Bw => avx512::int8(false, q, scales, acts, out, ldo),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => avx512::int8(true, q, scales, acts, out, ldo),
        #[cfg(not(target_arch = "x86_64"))]
        _ => scalar::int8(q, scales, acts, out, ldo),
    }
}
