"""Optimizers and the learning-rate schedule: Muon for the block matrices, AdamW for the rest, WSD.

- Muon (Keller Jordan's MomentUm Orthogonalized by Newton-schulz): for each 2-D block weight (the
  BitLinear shadow weights q, k, v, o, gate, up, down) keep a momentum buffer of the gradient, replace
  the (Nesterov) momentum by its nearest semi-orthogonal matrix (5 steps of the quintic Newton-Schulz
  iteration, in bf16 on CUDA and on CPUs with native bf16 matmul (AVX512-BF16/AMX: 2.5x fp32 there),
  fp32 elsewhere) and step along it, scaled by sqrt(max(1, rows / cols)) so
  tall matrices get the same per-element update size. Decoupled weight decay as in AdamW. Matrices of
  one shape (nano-125m: 84 matrices, 4 shapes) are updated together: foreach momentum and decay, one
  stacked Newton-Schulz, so a step launches a few batched matmul chains instead of one per matrix.
- AdamW for the token embedding and output head (with weight decay) and for the norm weights and mHC
  logits (without).
- One learning-rate knob: `build_optimizers(model, lr=1.0)` takes a *multiplier* of the per-group
  defaults MUON_LR and ADAMW_LR, stored in each param group as `base_lr`. `set_lr(optimizers, factor)`
  then sets every group's lr to base_lr * factor, where the factor comes from the schedule, e.g.
  `set_lr(opts, wsd_lr(step, total, warmup, 0.2))`.
- Default lrs, from a sweep on the `tiny` preset (batch 8 x 128 tokens, 150 steps, WSD with 20 warmup
  and 30% decay, stdlib .py bytes; validation loss in nats): Muon/AdamW 0.02/0.003: 2.25,
  0.04/0.006: 2.19, 0.01/0.0015: 2.34, 0.08/0.012: 2.26, 0.05/0.003: 2.19, 0.04/0.01: 2.15,
  0.02/0.01: 2.15, 0.02/0.02: 2.13. The AdamW side (embedding/head) wanted the bigger lr; we take
  0.02/0.01 (longer runs tolerate less). Larger presets likely want a multiplier below 1.
- `wsd_lr`: warmup-stable-decay: linear warmup, a flat stretch, a linear decay over the last
  decay_frac of training.

The optimizers only read p.grad, so under DDP (gradients already all-reduced) and under a GradScaler
(`scaler.step(opt)` unscales and skips on inf) they work unchanged; their state_dict() holds the
momentum buffers and the param groups (base_lr included) for checkpoints.
"""

from __future__ import annotations

import platform
import re
from pathlib import Path

import torch
import torch.nn as nn

MUON_LR = 0.02  # Muon lr for the block matrices at multiplier 1.0
ADAMW_LR = 1e-2  # AdamW lr for embedding, head, norms and mHC at multiplier 1.0
MUON_MOMENTUM = 0.95
ADAMW_BETAS = (0.9, 0.95)
NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz coefficients (Keller Jordan)
NS_STEPS = 5
# at most this many weights per stacked Newton-Schulz (fp32 stack 1 GiB): all of nano-125m's matrices
# of one shape go together; medium-3b's 9216 x 3072 ones 9 at a time, which bounds the extra memory
MUON_STACK_ELEMENTS = 1 << 28


def _cpu_has_bf16_matmul() -> bool:
    """True when this CPU multiplies bf16 in hardware: AVX512-BF16 or AMX on x86 (oneDNN's own check
    also says yes for AVX-512 CPUs without them, where bf16 is emulated), BF16 on Arm."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        try:
            return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", Path("/proc/cpuinfo").read_text()))
        except OSError:
            return False
    try:  # a private oneDNN query: absent in some builds, then we assume no
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# CPUs with native bf16 matmul run Newton-Schulz in bf16 like CUDA (2.5x fp32 there); elsewhere bf16 is emulated (slow)
CPU_BF16_MATMUL = _cpu_has_bf16_matmul()


def newton_schulz(g: torch.Tensor, steps: int = NS_STEPS, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalize a matrix [m, n], or each of a stack [B, m, n] (U V^T of its SVD,
    singular values pushed near 1). A stack runs as one batched matmul chain: on a GPU the per-matrix
    chain of a small model is launch-bound."""
    if g.dim() not in (2, 3):
        raise ValueError(f"newton_schulz: expected a matrix or a stack of matrices, got shape {tuple(g.shape)}")
    a, b, c = NS_COEFFS
    x = g.bfloat16() if g.is_cuda or CPU_BF16_MATMUL else g.float()
    x = x if g.dim() == 3 else x.unsqueeze(0)
    transposed = x.size(1) > x.size(2)
    if transposed:  # iterate on the wide orientation: X X^T is the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(1, 2), keepdim=True) + eps)  # Frobenius norm >= spectral norm: singular values start <= 1
    for _ in range(steps):
        gram = x @ x.mT
        # x <- a x + (b gram + c gram^2) x, the scalings folded into the two matmuls (one pass each)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    x = x.mT if transposed else x
    x = x if g.dim() == 3 else x.squeeze(0)
    return x if g.is_cuda else x.float()  # CPU callers get fp32 whatever the iteration ran in


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters: orthogonalized Nesterov momentum with decoupled weight decay.

    Parameters of one shape are updated together: multi-tensor (foreach) momentum and weight
    decay, one stacked Newton-Schulz. The state stays per parameter (`momentum_buffer`)."""

    def __init__(self, params, lr: float = MUON_LR, momentum: float = MUON_MOMENTUM, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = NS_STEPS):
        if lr <= 0:
            raise ValueError(f"Muon: lr must be > 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon: momentum must be in [0, 1), got {momentum}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon: only 2-D parameters, got one of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_shape: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
            for params in by_shape.values():
                per_stack = max(1, MUON_STACK_ELEMENTS // params[0].numel())
                for i in range(0, len(params), per_stack):
                    self._step_same_shape(params[i:i + per_stack], group)
        return loss

    def _step_same_shape(self, params: list[torch.Tensor], group: dict) -> None:
        lr, beta, wd = group["lr"], group["momentum"], group["weight_decay"]
        grads = [p.grad.float() for p in params]
        for p, grad in zip(params, grads):
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(grad)
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        torch._foreach_lerp_(bufs, grads, 1 - beta)
        directions = torch._foreach_lerp(grads, bufs, beta) if group["nesterov"] else bufs
        updates = newton_schulz(torch.stack(directions), group["ns_steps"]).to(params[0].dtype).unbind(0)
        # rows/cols > 1: the orthogonal update's entries are smaller; restore the per-element size
        scale = max(1.0, params[0].size(0) / params[0].size(1)) ** 0.5
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_add_(params, updates, alpha=-lr * scale)


def split_params(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Named trainable params by optimizer role: 'muon' (2-D block weights), 'decay' (embedding, head),
    'no_decay' (norms, mHC logits, any other vector)."""
    groups: dict[str, list] = {"muon": [], "decay": [], "no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = name.removeprefix("module.")  # DDP wrapper
        if p.dim() == 2 and name.startswith("blocks."):
            groups["muon"].append((name, p))
        elif p.dim() == 2:
            groups["decay"].append((name, p))
        else:
            groups["no_decay"].append((name, p))
    return groups


def build_optimizers(model: nn.Module, lr: float = 1.0, weight_decay: float = 0.0, *,
                     muon_lr: float = MUON_LR, adamw_lr: float = ADAMW_LR,
                     betas: tuple[float, float] = ADAMW_BETAS,
                     momentum: float = MUON_MOMENTUM) -> list[torch.optim.Optimizer]:
    """[Muon, AdamW] over all trainable params of `model` (a GPT, or a DDP-wrapped GPT).

    lr is a multiplier of both per-group defaults (muon_lr, adamw_lr); each group remembers its
    `base_lr` so that `set_lr` can apply a schedule factor on top.
    """
    if not lr > 0:
        raise ValueError(f"build_optimizers: lr (a multiplier of the default lrs) must be > 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"build_optimizers: weight_decay must be >= 0, got {weight_decay}")
    groups = split_params(model)
    if not groups["muon"]:
        raise ValueError("build_optimizers: the model has no 2-D 'blocks.*' weights for Muon")
    muon = Muon([p for _, p in groups["muon"]], lr=muon_lr * lr, momentum=momentum, weight_decay=weight_decay)
    adamw_groups = [
        dict(params=[p for _, p in groups["decay"]], weight_decay=weight_decay),
        dict(params=[p for _, p in groups["no_decay"]], weight_decay=0.0),
    ]
    adamw_groups = [g for g in adamw_groups if g["params"]]
    fused = all(p.is_cuda for g in adamw_groups for p in g["params"])
    adamw = torch.optim.AdamW(adamw_groups, lr=adamw_lr * lr, betas=betas, eps=1e-8, fused=fused or None)
    for opt in (muon, adamw):
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return [muon, adamw]


def set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    """Set every param group's lr to its base_lr * factor (factor from the schedule, e.g. wsd_lr)."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * factor


def wsd_lr(step: int, total: int, warmup: int, decay_frac: float = 0.2, base: float = 1.0,
           final_frac: float = 0.0) -> float:
    """Warmup-stable-decay learning rate at `step` (0-based) of `total` steps.

    Linear warmup from base/warmup to base over the first `warmup` steps, then base, then over the
    last round(decay_frac * total) steps a linear decay from base towards base * final_frac
    (reached at step == total). Where warmup and decay overlap the smaller factor wins.
    """
    if total <= 0:
        raise ValueError(f"wsd_lr: total steps must be > 0, got {total}")
    if warmup < 0:
        raise ValueError(f"wsd_lr: warmup must be >= 0, got {warmup}")
    if not 0.0 <= decay_frac <= 1.0:
        raise ValueError(f"wsd_lr: decay_frac must be in [0, 1], got {decay_frac}")
    factor = 1.0
    if step < warmup:
        factor = (step + 1) / warmup
    decay_steps = round(decay_frac * total)
    if decay_steps > 0 and step >= total - decay_steps:
        progress = max(0.0, (total - step) / decay_steps)  # 1 at the decay start, 0 at step == total
        factor = min(factor, final_frac + (1 - final_frac) * progress)
    return base * factor
