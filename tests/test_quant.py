"""Quantizer tests: codes and scales against hand-computed examples, ragged groups, round-half-even ties,
non-finite inputs and the straight-through gradients (python/nanochat/quant.py docstring is the spec).

Run: .venv/bin/python -m pytest tests/test_quant.py -q
"""

import math

import pytest
import torch

from nanochat import quant


def loop_reference(w: torch.Tensor, group_size: int, method: str):
    """A deliberately naive per-row, per-group loop over the docstring's rule (independent of quant.py)."""
    n, k = w.shape
    codes = torch.zeros(n, k, dtype=torch.int8)
    scales = torch.zeros(n, math.ceil(k / group_size))
    for r in range(n):
        for g, start in enumerate(range(0, k, group_size)):
            chunk = w[r, start:start + group_size].double()
            s = chunk.abs().mean() if method == "absmean" else chunk.abs().max()
            s = max(float(s), 1e-5)
            scales[r, g] = s
            for j, v in enumerate(chunk.tolist()):
                codes[r, start + j] = int(max(-1, min(1, round(v / s))))  # Python round() is half-even
    return codes, scales


def test_absmean_hand_example():
    # group [0.25, -0.75]: scale 0.5, ratios 0.5 (tie -> 0) and -1.5 (-> -2 -> clamp -1)
    # group [1.5, 0.5]:    scale 1.0, ratios 1.5 (-> 2 -> clamp 1) and 0.5 (tie -> 0)
    w = torch.tensor([[0.25, -0.75, 1.5, 0.5]])
    codes, scales = quant.weight_scales_codes_ref(w, 2, "absmean")
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32
    assert codes.tolist() == [[0, -1, 1, 0]]
    assert scales.tolist() == [[0.5, 1.0]]
    assert quant.weight_quant_ref(w, 2, "absmean").tolist() == [[0.0, -0.5, 1.0, 0.0]]


def test_absmax_hand_example():
    # group [0.25, -1.0]: scale 1.0 -> codes 0, -1;  group [0.5, 0.25]: scale 0.5 -> 1, 0.5 (tie -> 0)
    w = torch.tensor([[0.25, -1.0, 0.5, 0.25]])
    codes, scales = quant.weight_scales_codes_ref(w, 2, "absmax")
    assert codes.tolist() == [[0, -1, 1, 0]]
    assert scales.tolist() == [[1.0, 0.5]]


def test_ragged_last_group_uses_its_own_mean():
    w = torch.tensor([[1.0, -1.0, 1.0, -1.0, 0.25], [2.0, 2.0, 2.0, 2.0, -0.125]])
    codes, scales = quant.weight_scales_codes_ref(w, 4, "absmean")
    assert scales.tolist() == [[1.0, 0.25], [2.0, 0.125]]
    assert codes.tolist() == [[1, -1, 1, -1, 1], [1, 1, 1, 1, -1]]


def test_zero_group_uses_eps_scale():
    codes, scales = quant.weight_scales_codes_ref(torch.zeros(2, 8), 4, "absmean")
    assert codes.abs().sum() == 0
    assert torch.all(scales == quant.EPS)


@pytest.mark.parametrize("method", ["absmean", "absmax"])
@pytest.mark.parametrize("k", [64, 100, 200])
def test_matches_naive_loop(method, k):
    torch.manual_seed(k)
    w = torch.randn(5, k) * 0.05
    codes, scales = quant.weight_scales_codes_ref(w, 64, method)
    ref_codes, ref_scales = loop_reference(w, 64, method)
    torch.testing.assert_close(scales, ref_scales, rtol=1e-6, atol=0)
    # a ratio within float rounding of a .5 tie may legitimately differ between fp32 and fp64
    assert (codes != ref_codes).float().mean() < 0.01
    assert set(codes.unique().tolist()) <= {-1, 0, 1}


def test_weight_quant_equals_codes_times_scales():
    torch.manual_seed(0)
    w = torch.randn(8, 192)
    codes, scales = quant.weight_scales_codes(w, 128, "absmean")
    expanded = scales.repeat_interleave(128, dim=1)[:, :192]
    torch.testing.assert_close(quant.weight_quant_ref(w, 128, "absmean"), codes.float() * expanded, rtol=0, atol=0)


def test_activation_ties_round_half_even():
    # max |x| = 127 -> s = 1, so q = round_half_even(x)
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5]])
    q, s = quant.act_quant_int8_ref(x)
    assert s.item() == 1.0
    assert q.tolist() == [[127, 0, 2, 2, 0, -2]]
    assert quant.act_quant_ref(x).tolist() == [[127.0, 0.0, 2.0, 2.0, 0.0, -2.0]]


def test_activation_per_token_scale():
    x = torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0]])
    q, s = quant.act_quant_int8_ref(x)
    assert s[0, 0].item() == 127.0
    assert s[1, 0].item() == pytest.approx(127.0 / 1e-5, rel=1e-6)  # all-zero token: eps floor
    assert q.tolist() == [[127, -64, 32], [0, 0, 0]]  # -63.5 -> -64 and 31.75 -> 32
    xq = quant.act_quant_ref(x)
    assert (xq - x).abs().max() <= 0.5 / 127


def test_bits_zero_is_identity():
    x = torch.randn(3, 16)
    assert quant.quantize_activation(x, 0) is x


def test_nonfinite_poisons_only_its_group_and_token():
    w = torch.ones(2, 8)
    w[0, 1] = float("nan")
    w[1, 6] = float("inf")
    wq = quant.weight_quant_ref(w, 4, "absmean")
    assert torch.isnan(wq[0, :4]).all() and torch.isfinite(wq[0, 4:]).all()
    assert torch.isnan(wq[1, 4:]).all() and torch.isfinite(wq[1, :4]).all()
    x = torch.ones(2, 4)
    x[1, 2] = float("nan")
    xq = quant.act_quant_ref(x)
    assert torch.isfinite(xq[0]).all() and torch.isnan(xq[1]).all()


def test_bad_weight_inputs_are_named():
    with pytest.raises(ValueError, match="2-D"):
        quant.weight_scales_codes_ref(torch.zeros(4), 2)
    with pytest.raises(ValueError, match="weight_quant"):
        quant.weight_scales_codes_ref(torch.zeros(2, 4), 2, "median")


def test_ste_gradients_are_identity():
    torch.manual_seed(0)
    w = torch.randn(6, 100, requires_grad=True)
    upstream = torch.randn(6, 100)
    wq = quant.quantize_weight(w, 64, "absmean")
    (wq * upstream).sum().backward()
    torch.testing.assert_close(w.grad, upstream, rtol=0, atol=0)
    torch.testing.assert_close(wq.detach(), quant.weight_quant_ref(w.detach(), 64, "absmean"), rtol=0, atol=1e-6)

    x = torch.randn(3, 5, 64, requires_grad=True)
    upstream = torch.randn(3, 5, 64)
    xq = quant.quantize_activation(x, 8)
    (xq * upstream).sum().backward()
    torch.testing.assert_close(x.grad, upstream, rtol=0, atol=0)
    assert not torch.equal(xq.detach(), x.detach())  # it did quantize
