//! nanochat-ternary CPU kernels: packed 2-bit ternary and int8 GEMV/GEMM with scalar, AVX2 and
//! AVX-512 paths, a pinned NUMA-aware thread pool, and (feature `python`) the `nanochat._ternary`
//! extension module.
//!
//! Only `py.rs` (and the conversion in `error.rs`) touch Python; everything else is plain Rust so
//! `cargo test` and `cargo bench` run without an interpreter.

// Register-blocked kernels index several accumulator arrays in lockstep; ranges read clearer there.
#![allow(clippy::needless_range_loop)]

pub mod act;
pub mod aligned;
pub mod decode;
pub mod error;
pub mod format;
pub mod gang;
pub mod kernels;
pub mod layer_ops;
pub mod matmul;
pub mod ops;
pub mod pack;
pub mod pool;
pub mod topology;

#[cfg(feature = "python")]
mod py;

pub use error::{Error, Result};
pub use format::TernaryShape;
pub use kernels::{active_isa, best_isa, Isa};
pub use matmul::{int8_matmul, place_int8, place_ternary, share_weight_pages, ternary_matmul};
pub use pack::{Int8Shape, PackedInt8, PackedTernary};
pub use pool::Pool;
