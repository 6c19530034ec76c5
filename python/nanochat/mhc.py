"""Manifold-constrained hyper-connections, "lite" (mHC-lite): n residual streams mixed doubly-stochastically.

With `mhc_streams = n > 1` the residual state is X [n, B, T, D], n copies of the token embedding at the
start. Each sublayer f (attention or FFN, each with its own `HyperConnection`) does:

    u     = sum_i h_pre[i] * X[i]                        read: a mix of the streams
    y     = f(norm(u))
    X'[i] = sum_j H_res[i, j] * X[j] + h_post[i] * y     mix the streams, write the output back

and after the last block the model reads x = mean_i X[i]. The learned parameters are raw logits; the
matrices the math uses (and that export writes, via `matrices()`) are:

    h_pre  = softmax(pre_logits)          >= 0, sums to 1 (u is a convex mix of the streams)
    h_post = 2 * sigmoid(post_logits)     in (0, 2), exactly 1 at init
    H_res  = n=2: [[a, 1-a], [1-a, a]] with a = sigmoid(res_logits[0])
             n=4: sum_p softmax(res_logits)[p] * P_p over the 24 permutation matrices P_p of 4 elements
                  (itertools.permutations order)

A convex combination of permutation matrices is doubly stochastic (Birkhoff-von Neumann), so every
H_res has non-negative entries and rows and columns summing to 1 by construction, for any logits:
mixing never grows or shrinks the residual signal, which keeps deep stacks stable.

Init: H_res starts near the identity (weight 0.9 on "keep your own stream"), h_post at 1, and h_pre
leans on one "home" stream per sublayer (sublayer index mod n). Since every row of H_res sums to 1,
sum(h_pre) = 1 and h_post = 1, streams that start identical stay identical, so at init the network
computes exactly what the plain residual network computes. The lean of h_pre is what breaks the
symmetry between streams (as in the hyper-connections paper); with uniform h_pre the streams would
receive identical gradients and remain copies forever.

With n = 1 the residual is the plain `x + f(norm(x))` and `PlainResidual` holds no parameters.
All mixing runs in fp32 with autocast off, so fp16/bf16 training never rounds the residual stream.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn as nn

HOME_LOGIT = 1.0  # h_pre logit bonus of the home stream: weight 0.73 for n=2, 0.48 for n=4
RES_KEEP = 0.9  # initial weight of the identity in H_res


def permutation_matrices(n: int) -> torch.Tensor:
    """All n! permutation matrices [n!, n, n] in itertools.permutations order: P[p, i, perm[i]] = 1."""
    perms = list(itertools.permutations(range(n)))
    mats = torch.zeros(len(perms), n, n)
    for p, perm in enumerate(perms):
        mats[p, torch.arange(n), torch.tensor(perm)] = 1.0
    return mats


class PlainResidual(nn.Module):
    """n = 1: the ordinary residual connection; no parameters."""

    n = 1

    def read(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def write(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y


class HyperConnection(nn.Module):
    """One sublayer's mHC-lite parameters and its read/write of the n residual streams."""

    def __init__(self, n: int, home: int = 0):
        super().__init__()
        if n not in (2, 4):
            raise ValueError(f"mhc_streams: expected 2 or 4 for a HyperConnection, got {n!r}")
        self.n = n
        self.home = home % n
        self.pre_logits = nn.Parameter(torch.zeros(n))
        self.post_logits = nn.Parameter(torch.zeros(n))
        self.res_logits = nn.Parameter(torch.zeros(1 if n == 2 else math.factorial(n)))
        if n == 4:
            self.register_buffer("perms", permutation_matrices(4), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.pre_logits.zero_()
        self.pre_logits[self.home] = HOME_LOGIT
        self.post_logits.zero_()
        self.res_logits.zero_()
        if self.n == 2:
            self.res_logits[0] = math.log(RES_KEEP / (1 - RES_KEEP))
        else:
            # softmax weight RES_KEEP on the identity (permutation 0), the rest shared by the other 23
            others = self.res_logits.numel() - 1
            self.res_logits[0] = math.log(RES_KEEP * others / (1 - RES_KEEP))

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(h_pre [n], h_post [n], H_res [n, n]) as fp32 tensors, differentiable w.r.t. the logits."""
        h_pre = torch.softmax(self.pre_logits.float(), dim=0)
        h_post = 2.0 * torch.sigmoid(self.post_logits.float())
        if self.n == 2:
            a = torch.sigmoid(self.res_logits.float()[0])
            h_res = torch.stack([torch.stack([a, 1 - a]), torch.stack([1 - a, a])])
        else:
            weights = torch.softmax(self.res_logits.float(), dim=0)
            h_res = torch.einsum("p,pij->ij", weights, self.perms.float())
        return h_pre, h_post, h_res

    def read(self, xs: torch.Tensor) -> torch.Tensor:
        """u = sum_i h_pre[i] X[i] for X [n, ..., D]."""
        h_pre, _, _ = self.matrices()
        with torch.autocast(xs.device.type, enabled=False):
            return mix_streams(h_pre.to(xs.dtype).unsqueeze(0), xs).squeeze(0)

    def write(self, xs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """X'[i] = sum_j H_res[i, j] X[j] + h_post[i] y."""
        _, h_post, h_res = self.matrices()
        with torch.autocast(xs.device.type, enabled=False):
            mixed = mix_streams(h_res.to(xs.dtype), xs)
            return mixed + per_stream(h_post.to(xs.dtype), xs) * y.to(xs.dtype)

    def extra_repr(self) -> str:
        return f"n={self.n}, home={self.home}"


def per_stream(weights: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """Mixing weights [n] or [m, n] viewed to broadcast against the streams X [n, ..., D]."""
    return weights.view(*weights.shape, *([1] * (xs.dim() - 1)))


_FORCE_REFERENCE = False


def force_reference(flag: bool = True) -> None:
    """Mix with the PyTorch broadcast form even on CUDA (benchmarks compare the two)."""
    global _FORCE_REFERENCE
    _FORCE_REFERENCE = flag


def mix_streams(w: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """out[i] = sum_j w[i, j] X[j] for w [m, n], X [n, ..., D] (fp32). On a GPU, the fused Triton kernel
    (triton_kernels/stream_mix.py): broadcast multiplies and a sum materialize [m, n, B, T, D] both ways in
    unvectorized kernels there (~80 ms of a ~205 ms nano-125m step on an H200), and a matmul runs as a
    SIMT sgemm no faster; as einsum, the weight gradient was one matmul reduced on one tile (43%).
    On the CPU, the broadcast form (a matmul made the tiny preset's step 10-15% slower)."""
    if xs.is_cuda and not _FORCE_REFERENCE:
        try:
            from triton_kernels.stream_mix import stream_mix
        except ImportError:
            pass
        else:
            return stream_mix(w, xs)
    return (per_stream(w, xs) * xs.unsqueeze(0)).sum(1)


def make_residual(n: int, home: int = 0) -> nn.Module:
    """The residual connection of one sublayer: plain for n = 1, a HyperConnection for n = 2 or 4."""
    return PlainResidual() if n == 1 else HyperConnection(n, home)


def expand_streams(x: torch.Tensor, n: int) -> torch.Tensor:
    """[..., D] -> [n, ..., D]: n copies of the embedding (unchanged for n = 1)."""
    return x if n == 1 else x.unsqueeze(0).expand(n, *x.shape)


def merge_streams(xs: torch.Tensor, n: int) -> torch.Tensor:
    """[n, ..., D] -> [..., D]: the mean of the streams (unchanged for n = 1)."""
    return xs if n == 1 else xs.mean(0)
