"""Optimizer tests: Newton-Schulz orthogonalizes, Muon reduces a toy loss and round-trips its state_dict,
build_optimizers assigns every parameter to the right group exactly once, set_lr and the WSD schedule.

Run: .venv/bin/python -m pytest tests/test_optim.py -q
"""

import copy

import pytest
import torch

from nanochat import optim
from nanochat.config import ModelConfig
from nanochat.model import GPT
from nanochat.optim import (ADAMW_LR, MUON_LR, Muon, build_optimizers, newton_schulz, set_lr, split_params,
                            wsd_lr)


def small_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=61, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, group_size=64, max_seq_len=32)
    return GPT(ModelConfig(**{**cfg, **overrides}))


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48)])
def test_newton_schulz_pushes_singular_values_near_one(shape):
    torch.manual_seed(0)
    rows, cols = shape
    k = min(shape)
    u, _ = torch.linalg.qr(torch.randn(rows, k))
    v, _ = torch.linalg.qr(torch.randn(cols, k))
    g = u @ torch.diag(torch.linspace(0.2, 5.0, k)) @ v.T  # singular values spread over 25x
    out = newton_schulz(g)
    assert out.shape == g.shape and out.dtype == torch.float32
    sv = torch.linalg.svdvals(out)
    assert sv.min() > 0.6 and sv.max() < 1.25, sv  # the quintic iteration lands in about [0.7, 1.2]
    # same singular vectors: out is close to U V^T
    assert torch.nn.functional.cosine_similarity(out.flatten(), (u @ v.T).flatten(), dim=0) > 0.98


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_stacked_newton_schulz_equals_one_matrix_at_a_time(shape):
    torch.manual_seed(1)
    stack = torch.randn(3, *shape) * torch.tensor([0.01, 1.0, 50.0]).view(3, 1, 1)  # norms far apart
    together = newton_schulz(stack)
    for i in range(3):
        torch.testing.assert_close(together[i], newton_schulz(stack[i]), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="shape"):
        newton_schulz(torch.zeros(2, 2, 3, 3))


@pytest.mark.parametrize("stack_elements", [1 << 28, 1100])  # all three (32, 16) at once; 2 + 1
def test_muon_step_equals_the_per_parameter_rule(stack_elements, monkeypatch):
    # two shapes, three params of one of them, weight decay, Nesterov, two steps: every param gets
    # lerp momentum -> Nesterov direction -> Newton-Schulz -> decay -> scaled step, as if alone
    monkeypatch.setattr(optim, "MUON_STACK_ELEMENTS", stack_elements)
    torch.manual_seed(2)
    shapes = [(32, 16), (32, 16), (16, 48), (32, 16)]
    params = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    mirror = [p.detach().clone() for p in params]
    bufs = [torch.zeros(*s) for s in shapes]
    lr, beta, wd = 0.05, 0.9, 0.1
    opt = Muon(params, lr=lr, momentum=beta, weight_decay=wd)
    for _ in range(2):
        grads = [torch.randn(*s) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for w, buf, g in zip(mirror, bufs, grads):
            buf.lerp_(g, 1 - beta)
            update = newton_schulz(g.lerp(buf, beta))
            w.mul_(1 - lr * wd).add_(update, alpha=-lr * max(1.0, w.size(0) / w.size(1)) ** 0.5)
    for p, w, buf in zip(params, mirror, bufs):
        torch.testing.assert_close(p.detach(), w, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], buf)


def test_muon_reduces_a_least_squares_loss():
    torch.manual_seed(0)
    x, w_true = torch.randn(256, 32), torch.randn(16, 32)
    y = x @ w_true.T
    w = torch.nn.Parameter(torch.zeros(16, 32))
    opt = Muon([w], lr=0.1)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = ((x @ w.T - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses[::10]
    assert all(b < a for a, b in zip(losses, losses[1:]))


def test_muon_rejects_vectors_and_bad_hyperparameters():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(4))])
    with pytest.raises(ValueError, match="lr"):
        Muon([torch.nn.Parameter(torch.zeros(4, 4))], lr=0.0)


def test_build_optimizers_covers_every_param_once():
    model = small_gpt(mhc_streams=2, sub_norms=True)
    muon, adamw = build_optimizers(model, lr=2.0, weight_decay=0.1)
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    adamw_ids = [id(p) for g in adamw.param_groups for p in g["params"]]
    assert not muon_ids & set(adamw_ids) and len(adamw_ids) == len(set(adamw_ids))
    assert muon_ids | set(adamw_ids) == {id(p) for p in model.parameters()}
    groups = split_params(model)
    assert len(groups["muon"]) == 7 * 2
    assert all(n.endswith(("q.weight", "k.weight", "v.weight", "o.weight", "gate.weight", "up.weight",
                           "down.weight")) for n, _ in groups["muon"])
    assert sorted(n for n, _ in groups["decay"]) == ["lm_head.weight", "tok_emb.weight"]
    assert all(n.endswith(("norm.weight", "_logits")) for n, _ in groups["no_decay"])
    assert muon.param_groups[0]["lr"] == pytest.approx(2.0 * MUON_LR)
    assert [g["lr"] for g in adamw.param_groups] == pytest.approx([2.0 * ADAMW_LR] * 2)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.1, 0.0]
    with pytest.raises(ValueError, match="multiplier"):
        build_optimizers(model, lr=0.0)


def test_build_optimizers_sees_through_ddp_style_prefix():
    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    groups = split_params(Wrapper(small_gpt()))
    assert len(groups["muon"]) == 14 and all(n.startswith("blocks.") for n, _ in groups["muon"])


def test_set_lr_scales_each_group_from_its_base():
    opts = build_optimizers(small_gpt(), lr=1.0)
    set_lr(opts, 0.5)
    assert opts[0].param_groups[0]["lr"] == pytest.approx(0.5 * MUON_LR)
    assert opts[1].param_groups[0]["lr"] == pytest.approx(0.5 * ADAMW_LR)


def train_steps(model, opts, steps, idx):
    losses = []
    for _ in range(steps):
        _, loss = model(idx, idx)
        loss.backward()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_gpt_loss_drops_and_state_dict_round_trips():
    model = small_gpt(mhc_streams=2)
    opts = build_optimizers(model)
    idx = torch.randint(0, 61, (4, 24), generator=torch.Generator().manual_seed(1))
    losses = train_steps(model, opts, 12, idx)
    assert losses[-1] < losses[0] - 1.0, losses  # a fixed batch is memorised quickly

    # resuming from saved optimizer state continues exactly like the uninterrupted run
    twin = copy.deepcopy(model)
    twin_opts = build_optimizers(twin)
    for opt, twin_opt in zip(opts, twin_opts):
        twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert "momentum_buffer" in next(iter(opts[0].state_dict()["state"].values()))
    assert opts[0].state_dict()["param_groups"][0]["base_lr"] == MUON_LR
    a = train_steps(model, opts, 2, idx)
    b = train_steps(twin, twin_opts, 2, idx)
    assert a == b


def test_wsd_schedule_values():
    total, warmup = 100, 10
    assert wsd_lr(0, total, warmup, 0.2, base=2.0) == pytest.approx(0.2)
    assert wsd_lr(9, total, warmup, 0.2, base=2.0) == pytest.approx(2.0)
    assert wsd_lr(50, total, warmup, 0.2, base=2.0) == 2.0
    assert wsd_lr(79, total, warmup, 0.2, base=2.0) == 2.0
    assert wsd_lr(80, total, warmup, 0.2, base=2.0) == pytest.approx(2.0)  # decay starts at 1.0
    assert wsd_lr(90, total, warmup, 0.2, base=2.0) == pytest.approx(1.0)
    assert wsd_lr(99, total, warmup, 0.2, base=2.0) == pytest.approx(0.1)
    assert wsd_lr(100, total, warmup, 0.2, base=2.0) == 0.0
    assert wsd_lr(90, total, warmup, 0.2, final_frac=0.1) == pytest.approx(0.55)
    assert wsd_lr(5, total, 0, 0.0) == 1.0  # no warmup, no decay: constant
    # overlapping warmup and decay: the smaller factor wins
    assert wsd_lr(3, 10, 8, 0.8) == pytest.approx(min(4 / 8, 7 / 8))
    values = [wsd_lr(s, total, warmup, 0.3) for s in range(total)]
    assert max(values) == 1.0 and min(values) > 0


def test_wsd_rejects_bad_arguments():
    with pytest.raises(ValueError, match="total"):
        wsd_lr(0, 0, 0)
    with pytest.raises(ValueError, match="decay_frac"):
        wsd_lr(0, 10, 0, 1.5)
    with pytest.raises(ValueError, match="warmup"):
        wsd_lr(0, 10, -1)
