"""The CPU forward pass in numpy float32, with a KV cache per sequence.

One `forward` call runs any mix of sequences: the prompt of a new one (prefill), one new token of
each running one (batched decode), or both. All their tokens go through every linear as one
[N, K] batch (ternary GEMMs in the Rust kernels); only attention runs per sequence, against that
sequence's own cache and positions. The math follows docs/contracts.md (RMSNorm, rotate-half RoPE,
GQA, SwiGLU, mHC-lite mixing), the same as nanochat.model's quantized forward.

A pure decode step (every sequence has exactly one new token) runs as one native call with the Rust
extension (kernels.DecodeModel, decode.rs): the same norm, mHC, SiLU and matmul functions this file
calls for prefill, and a prompt's attention (kernels.attend_prefill) runs each token through the decode
step's attention, so a prompt read at once and the same tokens decoded one by one agree bit for bit.
The Python layer loop below serves prefill, mixed batches and the numpy backend (whose prefill
attention uses numpy matmuls, another summation order).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nanochat.config import ModelConfig
from nanochat.engine import kernels

# the numpy backend's prefill attention in query blocks; each block sees only the keys up to its last
# query (512-token prefill: 763 tok/s at 64 vs 679 at 256, medians of 3)
ATTN_QUERY_CHUNK = 64


@dataclass
class MhcMix:
    """One sublayer's mHC matrices: h_pre [n], h_post [n], h_res [n, n] (kept float32: the kernels' dtype)."""
    h_pre: np.ndarray
    h_post: np.ndarray
    h_res: np.ndarray

    def __post_init__(self):
        self.h_pre, self.h_post, self.h_res = (np.ascontiguousarray(a, dtype=np.float32)
                                               for a in (self.h_pre, self.h_post, self.h_res))


@dataclass
class LayerWeights:
    attn_norm: np.ndarray
    qkv: object  # TernaryMatrix with the rows of q, k, v stacked
    o: object
    ffn_norm: np.ndarray
    gate_up: object  # TernaryMatrix with the rows of gate then up stacked
    down: object
    attn_sub_norm: np.ndarray | None = None
    ffn_sub_norm: np.ndarray | None = None
    attn_mhc: MhcMix | None = None
    ffn_mhc: MhcMix | None = None


class Embedding:
    """Token embedding rows, dequantized on lookup (Q8_0: int8 values x one f32 scale per 32)."""

    def __init__(self, q: np.ndarray, d: np.ndarray | None):
        self.q, self.d = q, d  # Q8_0: q int8 [V, D], d f32 [V, D/32]; F16: q f16 [V, D], d None

    def rows(self, ids: np.ndarray) -> np.ndarray:
        if self.d is None:
            return self.q[ids].astype(np.float32)
        n, dim = len(ids), self.q.shape[1]
        return (self.q[ids].reshape(n, -1, 32) * self.d[ids][:, :, None]).reshape(n, dim).astype(np.float32)

    def table(self) -> np.ndarray:
        return self.rows(np.arange(self.q.shape[0]))


@dataclass
class Weights:
    embedding: Embedding
    layers: list[LayerWeights]
    output_norm: np.ndarray
    head: object  # Int8Matrix [V, D]


class KVCache:
    """Keys and values of one sequence, preallocated for `capacity` positions: [L, KVH, capacity, hd].

    float16 (rounded to nearest even when written, widened exactly when read): half the memory, and
    decode attention reads half the bytes (nano-125m, 8 sequences at position 400: attention 4.2-5.5 ->
    3.3-4.2 ms per step). Prefill and decode both attend over the rounded values."""

    def __init__(self, cfg: ModelConfig, capacity: int):
        shape = (cfg.n_layers, cfg.n_kv_heads, capacity, cfg.head_dim)
        self.k = np.empty(shape, dtype=np.float16)
        self.v = np.empty(shape, dtype=np.float16)
        self.capacity = capacity
        self.length = 0  # positions filled


def rope_tables(cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Full-width tables f32 [max_seq_len, hd]: cos = [c, c], sin = [-s, s]; angles in float64 like the model."""
    hd = cfg.head_dim
    inv_freq = cfg.rope_theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    angles = np.outer(np.arange(cfg.max_seq_len, dtype=np.float64), inv_freq)
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    return np.concatenate([cos, cos], axis=1), np.concatenate([-sin, sin], axis=1)


class Transformer:
    """Weights + config + RoPE tables; `forward` is the whole model."""

    def __init__(self, cfg: ModelConfig, weights: Weights):
        self.cfg, self.w = cfg, weights
        self.cos, self.sin = rope_tables(cfg)
        self.q_dim = cfg.n_heads * cfg.head_dim
        self.kv_dim = cfg.n_kv_heads * cfg.head_dim
        self.eps = np.float32(cfg.norm_eps)
        self.scale = np.float32(1.0 / np.sqrt(cfg.head_dim))
        self.mean_weights = np.full(cfg.mhc_streams, 1.0 / cfg.mhc_streams, dtype=np.float32)
        self.decoder = self._native_decoder()

    def _native_decoder(self):
        """The whole decode step in Rust over the same matrices (shared, not copied); None with numpy kernels
        (or matrices that are not the Rust classes: then decode runs the Python layer loop)."""
        mats = [m for lw in self.w.layers for m in (lw.qkv, lw.o, lw.gate_up, lw.down)]
        if kernels.DecodeModel is None or not (all(isinstance(m, kernels.TernaryMatrix) for m in mats)
                                               and isinstance(self.w.head, kernels.Int8Matrix)):
            return None
        cfg = self.cfg
        mats = lambda mix: None if mix is None else (mix.h_pre, mix.h_post, mix.h_res)  # noqa: E731
        layers = [kernels.DecodeLayer(lw.attn_norm, lw.qkv, lw.o, lw.ffn_norm, lw.gate_up, lw.down, cfg.n_heads,
                                      cfg.n_kv_heads, float(self.eps), float(self.scale), lw.attn_sub_norm,
                                      lw.ffn_sub_norm, mats(lw.attn_mhc), mats(lw.ffn_mhc))
                  for lw in self.w.layers]
        return kernels.DecodeModel(layers, self.w.output_norm, self.w.head)

    def new_cache(self, capacity: int | None = None) -> KVCache:
        cap = self.cfg.max_seq_len if capacity is None else min(capacity, self.cfg.max_seq_len)
        return KVCache(self.cfg, cap)

    @staticmethod
    def _linear(mat, x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        if n == 1:  # decode: rows in small chunks that idle threads steal (steady on shared cores)
            return mat.gemv_dynamic(x[0])[None]
        # a whole prompt at once: the kernels split it by tokens and write in place (ops.rs); the 64-token
        # pieces this used to cut and concatenate were no faster (512-token prefill, medians of 6
        # interleaved runs: 1083 vs 1087 tok/s) and cost a copy of every output
        return mat.gemm_dynamic(x)

    def forward(self, seqs: list[tuple[list[int], KVCache]], all_logits: bool = False) -> np.ndarray:
        """Run the new tokens of each (tokens, cache) pair; returns logits of each sequence's last token
        [n_seqs, V], or of every token [N, V] with all_logits. Each cache grows by its tokens."""
        cfg, n = self.cfg, self.cfg.mhc_streams
        lengths = [len(t) for t, _ in seqs]
        for (tokens, cache), t in zip(seqs, lengths):
            if t == 0:
                raise ValueError("forward: a sequence with no new tokens")
            if cache.length + t > cache.capacity:
                raise ValueError(f"forward: {cache.length} + {t} tokens exceed the KV cache capacity {cache.capacity}")
        if self.decoder is not None and len(seqs) == sum(lengths):
            return self._decode(seqs)
        ids = np.fromiter((tok for tokens, _ in seqs for tok in tokens), dtype=np.int64, count=sum(lengths))
        positions = np.concatenate([np.arange(c.length, c.length + t) for (_, c), t in zip(seqs, lengths)])
        cos, sin = self.cos[positions], self.sin[positions]  # [N, hd]
        x = self.w.embedding.rows(ids)
        xs = x if n == 1 else np.broadcast_to(x, (n, *x.shape)).copy()
        for li, layer in enumerate(self.w.layers):
            u = self._read(xs, layer.attn_mhc)
            y = self._attention(li, layer, kernels.rms_norm(u, layer.attn_norm, self.eps), seqs, lengths, cos, sin)
            xs = self._write(xs, y, layer.attn_mhc)
            u = self._read(xs, layer.ffn_mhc)
            xs = self._write(xs, self._ffn(layer, kernels.rms_norm(u, layer.ffn_norm, self.eps)), layer.ffn_mhc)
        x = xs if n == 1 else kernels.mhc_read(xs, self.mean_weights)  # the stream mean, as the decode step takes it
        for (_, cache), t in zip(seqs, lengths):
            cache.length += t
        if not all_logits:
            x = x[np.cumsum(lengths) - 1]
        return self._linear(self.w.head, kernels.rms_norm(x, self.w.output_norm, self.eps))

    def _decode(self, seqs: list[tuple[list[int], KVCache]]) -> np.ndarray:
        """One new token per sequence through every layer and the head in one native call -> logits [B, V]."""
        positions = [cache.length for _, cache in seqs]
        x = self.w.embedding.rows(np.array([tokens[0] for tokens, _ in seqs], dtype=np.int64))
        xs = np.broadcast_to(x, (self.cfg.mhc_streams, *x.shape)).copy()  # written in place
        logits = self.decoder.step(xs, self.cos[positions], self.sin[positions], [c.k for _, c in seqs],
                                   [c.v for _, c in seqs], positions)
        for _, cache in seqs:
            cache.length += 1
        return logits

    # mHC read / write (in place on xs); with one stream they are the plain residual
    @staticmethod
    def _read(xs: np.ndarray, mix: MhcMix | None) -> np.ndarray:
        return xs if mix is None else kernels.mhc_read(xs, mix.h_pre)

    @staticmethod
    def _write(xs: np.ndarray, y: np.ndarray, mix: MhcMix | None) -> np.ndarray:
        if mix is None:
            return xs + y
        kernels.mhc_write(xs, y, mix.h_res, mix.h_post)
        return xs

    def _ffn(self, layer: LayerWeights, h: np.ndarray) -> np.ndarray:
        a = kernels.silu_mul(self._linear(layer.gate_up, h))
        if layer.ffn_sub_norm is not None:
            a = kernels.rms_norm(a, layer.ffn_sub_norm, self.eps)
        return self._linear(layer.down, a)

    def _attention(self, li: int, layer: LayerWeights, h: np.ndarray, seqs, lengths, cos, sin) -> np.ndarray:
        cfg = self.cfg
        qkv = self._linear(layer.qkv, h)
        if kernels.attend_prefill is not None:  # Rust: each token through the decode step's attention, a call per sequence
            out = np.empty((h.shape[0], self.q_dim), dtype=np.float32)
            start = 0
            for (_, cache), t in zip(seqs, lengths):
                rows = slice(start, start + t)
                out[rows] = kernels.attend_prefill(qkv[rows], cos[rows], sin[rows], cache.k[li], cache.v[li],
                                                   cache.length, cfg.n_heads, self.scale)
                start += t
        elif h.shape[0] == len(seqs):  # numpy decode: one new token per sequence, RoPE + cache write + attention
            out = np.stack([kernels.attend_decode(qkv[i], cos[i], sin[i], cache.k[li], cache.v[li], cache.length,
                                                  cfg.n_heads, self.scale) for i, (_, cache) in enumerate(seqs)])
        else:
            out = self._numpy_prefill_attention(li, qkv, seqs, lengths, cos, sin)
        if layer.attn_sub_norm is not None:
            out = kernels.rms_norm(out, layer.attn_sub_norm, self.eps)
        return self._linear(layer.o, out)

    def _numpy_prefill_attention(self, li: int, qkv: np.ndarray, seqs, lengths, cos, sin) -> np.ndarray:
        """The numpy backend's prompt attention: RoPE in place, cache writes, query blocks of BLAS matmuls."""
        cfg = self.cfg
        hd, n_kv = cfg.head_dim, cfg.n_kv_heads
        r = cfg.n_heads // n_kv
        n_tok, qk_dim = qkv.shape[0], self.q_dim + self.kv_dim
        kernels.rope_rows(qkv, cos, sin, cfg.n_heads + n_kv)  # q and k heads, in place (the decode step's arithmetic)
        q = qkv[:, :self.q_dim].reshape(n_tok, cfg.n_heads, hd)
        k = qkv[:, self.q_dim:qk_dim].reshape(n_tok, n_kv, hd)
        v = qkv[:, qk_dim:].reshape(n_tok, n_kv, hd)
        out = np.empty((n_tok, self.q_dim), dtype=np.float32)
        start = 0
        for (_, cache), t in zip(seqs, lengths):
            p0, end = cache.length, start + t
            kc, vc = cache.k[li], cache.v[li]  # [KVH, capacity, hd]
            kc[:, p0:p0 + t] = k[start:end].transpose(1, 0, 2)  # rounded to float16, as the decode step writes
            vc[:, p0:p0 + t] = v[start:end].transpose(1, 0, 2)
            keys, values = kc[:, :p0 + t].astype(np.float32), vc[:, :p0 + t].astype(np.float32)
            # [KVH, r*t, hd]: the r query heads of a kv head share one 3-D matmul (BLAS-friendly, no broadcasting)
            qh = q[start:end].reshape(t, n_kv, r, hd).transpose(1, 2, 0, 3)
            for c0 in range(0, t, ATTN_QUERY_CHUNK):
                c1 = min(t, c0 + ATTN_QUERY_CHUNK)
                s_len = p0 + c1  # keys visible to the last query of this chunk
                qc = qh[:, :, c0:c1].reshape(n_kv, r * (c1 - c0), hd)
                scores = np.matmul(qc, keys[:, :s_len].transpose(0, 2, 1))
                kernels.causal_softmax(scores, c1 - c0, p0 + c0, self.scale)  # scaled, causal mask, in place
                y = np.matmul(scores, values[:, :s_len])  # [KVH, r*c, hd]
                out[start + c0:start + c1] = y.reshape(n_kv, r, c1 - c0, hd).transpose(2, 0, 1, 3).reshape(c1 - c0, self.q_dim)
            start = end
        return out
