"""The matrix kernels the engine calls: the Rust extension, or a slow numpy reference without it.

`TernaryMatrix` and `Int8Matrix` follow docs/contracts.md. The Rust classes (nanochat.ternary) are
used when the extension imports; otherwise the numpy classes below compute the same arithmetic
(per-token int8 activations, integer dot products per group, times the group scale, / s) so the
engine still runs, slowly. NANOCHAT_ENGINE_KERNELS=numpy forces the reference (for comparisons).
The float ops between matmuls (rms_norm, silu_mul, attend_decode, mhc_read, mhc_write, rope_rows,
causal_softmax) come from the same backend; `DecodeLayer` / `DecodeModel` (the whole decode step in Rust, decode.rs) and
`attend_prefill` (a prompt's attention, token by token the decode step's) are None with the numpy backend.
"""

from __future__ import annotations

import logging
import os

import numpy as np

log = logging.getLogger(__name__)
EPS = 1e-5


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """f32 [T, K] -> (int8 values as f32 [T, K], s f32 [T]) by the quant.py rule: q = round(x * s), s = 127/absmax."""
    x = np.asarray(x, dtype=np.float32)
    s = np.float32(127.0) / np.maximum(np.abs(x).max(axis=-1), np.float32(EPS))
    q = np.clip(np.rint(x * s[:, None]), -128, 127)
    return q, s


class NumpyTernaryMatrix:
    """Reference ternary matrix: codes int8 [M, K] in {-1,0,1}, scales f32 [M, G]."""

    def __init__(self, codes: np.ndarray, scales: np.ndarray, group_size: int = 128):
        m, k = codes.shape
        g = -(-k // group_size)
        if scales.shape != (m, g):
            raise ValueError(f"scales: expected shape {(m, g)}, got {scales.shape}")
        self.rows, self.cols, self.group_size = m, k, group_size
        self._codes, self._scales = codes.astype(np.int8), scales.astype(np.float32)
        padded = np.zeros((m, g * group_size), dtype=np.float32)
        padded[:, :k] = codes
        self._grouped = padded.reshape(m, g, group_size)
        self.nbytes = self._codes.nbytes + self._scales.nbytes

    def gemm(self, x: np.ndarray) -> np.ndarray:
        q, s = quantize_activations(x)
        t = q.shape[0]
        qp = np.zeros((t, self._grouped.shape[1] * self.group_size), dtype=np.float32)
        qp[:, :self.cols] = q
        # integer-valued partial sums per group are exact in f32 (|sum| <= 128 * 256)
        partial = np.einsum("mgk,tgk->tmg", self._grouped, qp.reshape(t, -1, self.group_size))
        return (partial * self._scales[None]).sum(-1) / s[:, None]

    def gemv(self, x: np.ndarray) -> np.ndarray:
        return self.gemm(x[None])[0]

    gemv_dynamic = gemv  # the Rust classes schedule these two differently; same results
    gemm_dynamic = gemm

    def unpack(self) -> tuple[np.ndarray, np.ndarray]:
        return self._codes.copy(), self._scales.copy()


class NumpyInt8Matrix:
    """Reference per-row int8 matrix: W = q * scales[:, None]."""

    def __init__(self, q: np.ndarray, scales: np.ndarray):
        self._q, self._scales = q.astype(np.float32), scales.astype(np.float32)
        self.rows, self.cols = q.shape

    @staticmethod
    def from_f32(w: np.ndarray) -> "NumpyInt8Matrix":
        w = np.asarray(w, dtype=np.float32)
        scales = np.abs(w).max(axis=1) / np.float32(127.0)
        safe = np.where(scales > 0, scales, np.float32(1.0))
        return NumpyInt8Matrix(np.clip(np.rint(w / safe[:, None]), -127, 127).astype(np.int8), scales)

    def gemm(self, x: np.ndarray) -> np.ndarray:
        q, s = quantize_activations(x)
        return (q @ self._q.T) * self._scales[None] / s[:, None]

    def gemv(self, x: np.ndarray) -> np.ndarray:
        return self.gemm(x[None])[0]

    gemv_dynamic = gemv  # the Rust classes schedule these two differently; same results
    gemm_dynamic = gemm


def numpy_rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim (x f32 [N, D])."""
    ms = np.einsum("nd,nd->n", x, x)
    ms *= np.float32(1.0 / x.shape[-1])
    ms += np.float32(eps)
    return x * (1.0 / np.sqrt(ms))[:, None] * weight


def numpy_silu_mul(gu: np.ndarray) -> np.ndarray:
    """silu(gate) * up of gu [N, 2F] = [gate | up]."""
    g, u = np.split(gu, 2, axis=1)
    return g / (1.0 + np.exp(-g)) * u


def numpy_attend_decode(qkv, cos, sin, k_cache, v_cache, pos: int, n_heads: int, scale: float) -> np.ndarray:
    """One decode step of one sequence: RoPE, cache write at pos (float16 caches: rounded), softmax attention
    over 0..pos in float32 (see layer_ops.rs)."""
    n_kv, _, hd = k_cache.shape
    swap = np.concatenate([np.arange(hd // 2, hd), np.arange(hd // 2)])
    qk = qkv[:(n_heads + n_kv) * hd].reshape(n_heads + n_kv, hd)
    qk = qk * cos + qk[:, swap] * sin
    k_cache[:, pos] = qk[n_heads:]
    v_cache[:, pos] = qkv[(n_heads + n_kv) * hd:].reshape(n_kv, hd)
    keys, values = k_cache[:, :pos + 1].astype(np.float32), v_cache[:, :pos + 1].astype(np.float32)
    scores = np.matmul(qk[:n_heads].reshape(n_kv, -1, hd), keys.transpose(0, 2, 1)) * np.float32(scale)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    scores /= scores.sum(axis=-1, keepdims=True)
    return np.matmul(scores, values).reshape(n_heads * hd)


def numpy_mhc_read(xs: np.ndarray, h_pre: np.ndarray) -> np.ndarray:
    """sum_i h_pre[i] xs[i] for streams xs [n, ..., D] (a matmul on the flattened view: no Python loop)."""
    return (h_pre @ xs.reshape(xs.shape[0], -1)).reshape(xs.shape[1:])


def numpy_mhc_write(xs: np.ndarray, y: np.ndarray, h_res: np.ndarray, h_post: np.ndarray) -> None:
    """In place: xs[i] = sum_j h_res[i, j] xs[j] + h_post[i] y."""
    mixed = (h_res @ xs.reshape(xs.shape[0], -1)).reshape(xs.shape)
    mixed += h_post.reshape(-1, *([1] * y.ndim)) * y
    xs[...] = mixed


def numpy_rope_rows(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, heads: int) -> None:
    """Rotate-half RoPE in place on the first `heads` heads of each row of x [N, row]; cos/sin [N, hd] full-width."""
    n, hd = cos.shape
    swap = np.concatenate([np.arange(hd // 2, hd), np.arange(hd // 2)])  # [x1, x2] -> [x2, x1]
    h = x[:, :heads * hd].reshape(n, heads, hd)
    out = h * cos[:, None]
    out += h[..., swap] * sin[:, None]
    x[:, :heads * hd] = out.reshape(n, heads * hd)


def numpy_causal_softmax(scores: np.ndarray, c: int, q0: int, scale: float) -> None:
    """In place on scores [..., r * c, s_len]: query i (row % c) sees keys 0..=q0 + i; scaled softmax, masked -> 0."""
    s_len = scores.shape[-1]
    rows = scores.reshape(-1, c, s_len)
    rows *= np.float32(scale)
    rows[:, np.arange(s_len)[None, :] > (q0 + np.arange(c))[:, None]] = -np.inf
    rows -= rows.max(axis=-1, keepdims=True)
    np.exp(rows, out=rows)
    rows /= rows.sum(axis=-1, keepdims=True)


def limit_numpy_blas_threads(n: int) -> bool:
    """Set the thread count of numpy's bundled OpenBLAS (attention matmuls). Its worker threads spin-wait
    and fight the Rust kernels' pool for the cores: on 2 busy cores one thread was 10x faster than two."""
    import ctypes
    import glob
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "*openblas*.so*"))
    for path in libs:
        lib = ctypes.CDLL(path)
        for symbol in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads"):
            fn = getattr(lib, symbol, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                return True
    return False


NUMPY_BACKEND = (NumpyTernaryMatrix, NumpyInt8Matrix, lambda n: None, numpy_rms_norm, numpy_silu_mul,
                 numpy_attend_decode, numpy_mhc_read, numpy_mhc_write, numpy_rope_rows, numpy_causal_softmax, None, None,
                 None, lambda matrices: list(matrices), "numpy")


def _load_backend():
    if os.environ.get("NANOCHAT_ENGINE_KERNELS", "auto") == "numpy":
        log.info("engine kernels: numpy reference (NANOCHAT_ENGINE_KERNELS=numpy)")
        return NUMPY_BACKEND
    try:
        from nanochat import _ternary as rust
        from nanochat import ternary
    except ImportError as e:
        log.warning("engine kernels: Rust extension nanochat._ternary not importable (%s); using the slow numpy "
                    "reference. Build it with `maturin develop --release`.", e)
        return NUMPY_BACKEND
    log.info("engine kernels: Rust extension, isa %s", ternary.active_isa())
    return (ternary.TernaryMatrix, ternary.Int8Matrix, ternary.set_num_threads, rust.rms_norm, rust.silu_mul,
            rust.attend_decode, rust.mhc_read, rust.mhc_write, rust.rope_rows, rust.causal_softmax, rust.DecodeLayer,
            rust.DecodeModel, rust.attend_prefill, rust.share_weight_pages,
            f"rust-{ternary.active_isa()}")


# the fused float ops come from the same backend as the matrices (prefill and decode share their arithmetic)
(TernaryMatrix, Int8Matrix, set_num_threads, rms_norm, silu_mul, attend_decode, mhc_read, mhc_write, rope_rows,
 causal_softmax, DecodeLayer, DecodeModel, attend_prefill, share_weight_pages, BACKEND) = _load_backend()
