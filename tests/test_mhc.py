"""mHC-lite tests: H_res doubly stochastic and h_pre/h_post non-negative for any logits (hypothesis),
read/write equal to the contract's formulas, the permutation order, and plain-residual behaviour at init.

Run: .venv/bin/python -m pytest tests/test_mhc.py -q
"""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanochat.config import ModelConfig
from nanochat import mhc
from nanochat.mhc import HyperConnection, PlainResidual, make_residual, permutation_matrices
from nanochat.model import GPT

logit = st.floats(min_value=-30.0, max_value=30.0, allow_nan=False)


def set_logits(hc: HyperConnection, pre, post, res) -> None:
    with torch.no_grad():
        hc.pre_logits.copy_(torch.tensor(pre))
        hc.post_logits.copy_(torch.tensor(post))
        hc.res_logits.copy_(torch.tensor(res))


def check_matrices(hc: HyperConnection) -> None:
    h_pre, h_post, h_res = hc.matrices()
    n = hc.n
    assert h_pre.dtype == h_post.dtype == h_res.dtype == torch.float32
    assert h_pre.shape == (n,) and h_post.shape == (n,) and h_res.shape == (n, n)
    assert (h_res >= 0).all() and (h_pre >= 0).all() and (h_post >= 0).all()
    torch.testing.assert_close(h_res.sum(0), torch.ones(n), rtol=0, atol=1e-5)
    torch.testing.assert_close(h_res.sum(1), torch.ones(n), rtol=0, atol=1e-5)
    torch.testing.assert_close(h_pre.sum(), torch.tensor(1.0), rtol=0, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(st.lists(logit, min_size=2, max_size=2), st.lists(logit, min_size=2, max_size=2), logit)
def test_two_streams_doubly_stochastic(pre, post, res):
    hc = HyperConnection(2)
    set_logits(hc, pre, post, [res])
    check_matrices(hc)
    a = torch.sigmoid(torch.tensor(res))
    torch.testing.assert_close(hc.matrices()[2], torch.stack([torch.stack([a, 1 - a]), torch.stack([1 - a, a])]))


@settings(max_examples=60, deadline=None)
@given(st.lists(logit, min_size=4, max_size=4), st.lists(logit, min_size=4, max_size=4),
       st.lists(logit, min_size=24, max_size=24))
def test_four_streams_doubly_stochastic(pre, post, res):
    hc = HyperConnection(4)
    set_logits(hc, pre, post, res)
    check_matrices(hc)


def test_four_streams_permutation_order():
    mats = permutation_matrices(4)
    perms = list(itertools.permutations(range(4)))
    assert mats.shape == (24, 4, 4)
    for p in (0, 1, 7, 23):
        hc = HyperConnection(4)
        res = torch.full((24,), -100.0)
        res[p] = 100.0
        set_logits(hc, [0.0] * 4, [0.0] * 4, res.tolist())
        expected = torch.zeros(4, 4)
        for i, j in enumerate(perms[p]):
            expected[i, j] = 1.0
        torch.testing.assert_close(hc.matrices()[2], expected)


@pytest.mark.parametrize("n", [2, 4])
def test_read_write_follow_the_contract(n):
    torch.manual_seed(n)
    hc = HyperConnection(n, home=1)
    with torch.no_grad():
        for p in hc.parameters():
            p.normal_()
    xs = torch.randn(n, 2, 3, 8)
    y = torch.randn(2, 3, 8)
    h_pre, h_post, h_res = hc.matrices()
    u_ref = sum(h_pre[i] * xs[i] for i in range(n))
    out_ref = torch.stack([sum(h_res[i, j] * xs[j] for j in range(n)) + h_post[i] * y for i in range(n)])
    torch.testing.assert_close(hc.read(xs), u_ref)
    torch.testing.assert_close(hc.write(xs, y), out_ref)


@pytest.mark.parametrize("n", [2, 4])
def test_init_is_near_identity_and_breaks_symmetry(n):
    hc = HyperConnection(n, home=3)
    h_pre, h_post, h_res = hc.matrices()
    torch.testing.assert_close(h_post, torch.ones(n))
    assert (h_res.diagonal() > 0.85).all()
    assert h_pre.argmax().item() == 3 % n and h_pre.max() > h_pre.min()


def test_make_residual_and_validation():
    assert isinstance(make_residual(1), PlainResidual)
    assert sum(p.numel() for p in make_residual(1).parameters()) == 0
    assert sum(p.numel() for p in make_residual(4).parameters()) == 4 + 4 + 24
    with pytest.raises(ValueError, match="mhc_streams"):
        HyperConnection(3)


@pytest.mark.parametrize("n", [2, 4])
def test_gpt_with_streams_equals_plain_residual_at_init(n):
    base = dict(vocab_size=61, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, group_size=64, max_seq_len=32)
    torch.manual_seed(0)
    plain = GPT(ModelConfig(**base, mhc_streams=1))
    streams = GPT(ModelConfig(**base, mhc_streams=n))
    missing, unexpected = streams.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all("_mhc." in k for k in missing)
    idx = torch.randint(0, 61, (2, 16))
    torch.testing.assert_close(streams(idx)[0], plain(idx)[0], rtol=1e-5, atol=1e-5)


def post_logit_grads(monkeypatch, home_logit: float) -> torch.Tensor:
    monkeypatch.setattr(mhc, "HOME_LOGIT", home_logit)
    cfg = ModelConfig(vocab_size=61, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, group_size=64,
                      max_seq_len=32, mhc_streams=2)
    torch.manual_seed(0)
    model = GPT(cfg)
    idx = torch.randint(0, 61, (2, 16))
    model(idx, idx)[1].backward()
    return model.blocks[0].attn_mhc.post_logits.grad


def test_home_stream_breaks_the_symmetry_between_streams(monkeypatch):
    home_logit = mhc.HOME_LOGIT
    # uniform h_pre: identical streams get identical gradients and would stay copies forever
    uniform = post_logit_grads(monkeypatch, 0.0)
    assert uniform[0] == uniform[1]
    leaning = post_logit_grads(monkeypatch, home_logit)
    assert (leaning[0] - leaning[1]).abs() > 0.1 * leaning.abs().max()
