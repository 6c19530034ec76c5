"""The ternary GPT: a decoder-only transformer whose block linears are BitNet b1.58 `BitLinear`s.

Notable choices (docs/contracts.md has the exact math the export and the engine re-implement):
- Pre-norm RMSNorm, computed in fp32 whatever the autocast dtype; no biases anywhere.
- Rotary position embeddings in the "rotate-half" (GPT-NeoX) layout, cos/sin precomputed in fp32 for
  max_seq_len as non-persistent buffers (not in the state_dict).
- Grouped-query attention: n_kv_heads key/value heads, kv head j serves query heads j*r .. j*r+r-1
  (r = n_heads / n_kv_heads); causal F.scaled_dot_product_attention.
- SwiGLU FFN: down(silu(gate(x)) * up(x)), hidden size config.ffn_hidden.
- Every block linear (q, k, v, o, gate, up, down) is a BitLinear: a full-precision shadow weight,
  quantized on the fly to ternary codes x per-group scale (quant.quantize_weight) and fed int8
  fake-quantized activations (quant.quantize_activation); straight-through gradients. On CUDA the
  quantizers dispatch to the Triton kernels.
- Token embedding and output head stay full precision and are untied unless tie_embeddings.
- Optional sub_norms (BitNet b1.58 / llama.cpp "bitnet"): RMSNorm before the o and down projections.
- Optional mHC-lite residual streams (mhc_streams 2 or 4, see mhc.py); 1 is the plain residual.
- Init: normal(0, 0.02) everywhere, output projections (o, down) scaled by 1/sqrt(2 * n_layers) so the
  residual stream does not grow with depth; norms at 1.
- The residual stream stays fp32 under autocast (the embedding output is fp32, sublayer outputs are
  added to it); logits are returned in fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat import quant
from nanochat.config import ModelConfig
from nanochat.mhc import expand_streams, make_residual, merge_streams

INIT_STD = 0.02


# ---------------------------------------------------------------------------------------------
# Small functions: norm and rotary embeddings

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight, in fp32, returned in x's dtype."""
    x32 = x.float()
    out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return out.to(x.dtype)


def rope_cos_sin(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos, sin [max_seq_len, head_dim/2] for inv_freq[j] = theta^(-2j/head_dim), positions from 0."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [B, H, T, hd] with cos/sin [T, hd/2]; math in fp32, result in x's dtype."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Modules

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class BitLinear(nn.Linear):
    """Linear layer with a full-precision shadow weight used as ternary codes x group scales (no bias).

    `quantize = False` turns both quantizers off (a plain linear), for benchmarks comparing QAT to fp.
    """

    def __init__(self, in_features: int, out_features: int, config: ModelConfig):
        super().__init__(in_features, out_features, bias=False)
        self.group_size = config.group_size
        self.weight_quant = config.weight_quant
        self.activation_bits = config.activation_bits
        self.quantize = True

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The int8 fake-quantized input (x itself when quantization is off)."""
        return quant.quantize_activation(x, self.activation_bits) if self.quantize else x

    def forward(self, x: torch.Tensor, input_quantized: bool = False) -> torch.Tensor:
        """input_quantized: x already is `quantize_input(x)` (shared by several linears reading one input)."""
        if not self.quantize:
            return F.linear(x, self.weight)
        x_q = x if input_quantized else self.quantize_input(x)
        w_q = quant.quantize_weight(self.weight, self.group_size, self.weight_quant)
        return F.linear(x_q, w_q)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}, {self.weight_quant}, a{self.activation_bits}"


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        d, q_dim, kv_dim = config.dim, config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        self.q = BitLinear(d, q_dim, config)
        self.k = BitLinear(d, kv_dim, config)
        self.v = BitLinear(d, kv_dim, config)
        self.sub_norm = RMSNorm(q_dim, config.norm_eps) if config.sub_norms else None
        self.o = BitLinear(q_dim, d, config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        x = self.q.quantize_input(x)  # q, k and v read the same input: quantize it once
        q = self.q(x, input_quantized=True).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k(x, input_quantized=True).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x, input_quantized=True).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # GQA: each kv head serves n_heads / n_kv_heads consecutive query heads
        repeat = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        y = F.scaled_dot_product_attention(q, k, v.to(q.dtype), is_causal=True)
        y = y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        if self.sub_norm is not None:
            y = self.sub_norm(y)
        return self.o(y)


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = BitLinear(config.dim, config.ffn_hidden, config)
        self.up = BitLinear(config.dim, config.ffn_hidden, config)
        self.sub_norm = RMSNorm(config.ffn_hidden, config.norm_eps) if config.sub_norms else None
        self.down = BitLinear(config.ffn_hidden, config.dim, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gate.quantize_input(x)  # gate and up read the same input: quantize it once
        h = F.silu(self.gate(x, input_quantized=True)) * self.up(x, input_quantized=True)
        if self.sub_norm is not None:
            h = self.sub_norm(h)
        return self.down(h)


class Block(nn.Module):
    """Pre-norm attention then FFN, each wrapped by its residual (plain or mHC) connection."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn = FeedForward(config)
        # sublayer index 2*layer (attn) and 2*layer+1 (ffn) picks each one's home stream
        self.attn_mhc = make_residual(config.mhc_streams, home=2 * layer)
        self.ffn_mhc = make_residual(config.mhc_streams, home=2 * layer + 1)

    def forward(self, xs: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        u = self.attn_mhc.read(xs)
        xs = self.attn_mhc.write(xs, self.attn(self.attn_norm(u), cos, sin))
        u = self.ffn_mhc.read(xs)
        xs = self.ffn_mhc.write(xs, self.ffn(self.ffn_norm(u)))
        return xs


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        cos, sin = rope_cos_sin(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        out_std = INIT_STD / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith((".o.weight", ".down.weight")):
                nn.init.normal_(p, 0.0, out_std)
            elif p.dim() == 2:
                nn.init.normal_(p, 0.0, INIT_STD)
            elif name.endswith("norm.weight"):
                nn.init.ones_(p)
        for module in self.modules():
            if hasattr(module, "pre_logits"):  # mHC: back to its documented init
                module.reset_parameters()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx [B, T] token ids -> (logits [B, T, V] fp32, mean cross-entropy over targets != -1, or None)."""
        if idx.dim() != 2:
            raise ValueError(f"GPT.forward: idx must be [batch, time], got shape {tuple(idx.shape)}")
        b, t = idx.shape
        if t > self.config.max_seq_len:
            raise ValueError(f"GPT.forward: sequence length {t} exceeds max_seq_len={self.config.max_seq_len}")
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"GPT.forward: targets shape {tuple(targets.shape)} != idx shape {tuple(idx.shape)}")
        if not idx.is_cuda and idx.numel() and (idx.min() < 0 or idx.max() >= self.config.vocab_size):
            raise ValueError(f"GPT.forward: token ids must be in [0, {self.config.vocab_size}), "
                             f"got min {int(idx.min())} max {int(idx.max())}")
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        n = self.config.mhc_streams
        xs = expand_streams(self.tok_emb(idx), n)
        for block in self.blocks:
            xs = block(xs, cos, sin)
        x = self.norm(merge_streams(xs, n))
        head = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, head).float()
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (a tied head counts once); non_embedding drops the embedding and head."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.tok_emb.weight.numel()
            total -= 0 if self.lm_head is None else self.lm_head.weight.numel()
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 * matmul params + 12 * L * D * T for attention."""
        matmul_params = self.num_params(non_embedding=True) + self.config.vocab_size * self.config.dim
        attention = 12 * self.config.n_layers * self.config.n_heads * self.config.head_dim * seq_len
        return 6 * matmul_params + attention

    def set_quantization(self, enabled: bool) -> None:
        """Turn the ternary/int8 fake quantization of every BitLinear on or off (off: plain fp linears)."""
        for module in self.modules():
            if isinstance(module, BitLinear):
                module.quantize = enabled
