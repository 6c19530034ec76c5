"""Model tests: the GPT against a from-scratch re-implementation of docs/contracts.md (RMSNorm, rotate-half
RoPE, GQA head mapping, BitLinear, sub_norms, tied head, mHC), state_dict names, shapes, causal masking,
ignored targets, autocast, bad inputs, and a nano-125m forward+backward that prints its parameter count.

Run: .venv/bin/python -m pytest tests/test_model.py -q -s   (-s shows the parameter counts)
"""

import math
import time

import pytest
import torch

from nanochat import quant
from nanochat.config import ModelConfig, preset
from nanochat.model import GPT

SMALL = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, group_size=64, max_seq_len=48)


def small(**overrides) -> ModelConfig:
    return ModelConfig(**{**SMALL, **overrides})


def reference_logits(sd: dict, cfg: ModelConfig, idx: torch.Tensor, mhc=None) -> torch.Tensor:
    """docs/contracts.md math written out with loops, reading only the state_dict (and mHC matrices)."""
    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    def bitlinear(x, w):
        x = quant.act_quant_ref(x) if cfg.activation_bits else x
        return x @ quant.weight_quant_ref(w, cfg.group_size, cfg.weight_quant).T

    t, hd, n_h, n_kv = idx.shape[1], cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    half = hd // 2
    inv_freq = torch.tensor([cfg.rope_theta ** (-2 * j / hd) for j in range(half)], dtype=torch.float64)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv_freq[None]
    cos, sin = ang.cos().float(), ang.sin().float()

    def rope(x):  # [T, hd]
        x1, x2 = x[:, :half], x[:, half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    def attention(x, p):
        q, k, v = (bitlinear(x, sd[f"{p}.{name}.weight"]) for name in "qkv")
        heads = []
        for h in range(n_h):
            j = h // (n_h // n_kv)  # kv head j serves query heads j*r .. j*r+r-1
            qh, kh = rope(q[:, h * hd:(h + 1) * hd]), rope(k[:, j * hd:(j + 1) * hd])
            scores = qh @ kh.T / math.sqrt(hd)
            scores = scores.masked_fill(torch.ones(t, t).triu(1).bool(), float("-inf"))
            heads.append(scores.softmax(-1) @ v[:, j * hd:(j + 1) * hd])
        y = torch.cat(heads, -1)
        if cfg.sub_norms:
            y = norm(y, sd[f"{p}.sub_norm.weight"])
        return bitlinear(y, sd[f"{p}.o.weight"])

    def ffn(x, p):
        h = torch.nn.functional.silu(bitlinear(x, sd[f"{p}.gate.weight"])) * bitlinear(x, sd[f"{p}.up.weight"])
        if cfg.sub_norms:
            h = norm(h, sd[f"{p}.sub_norm.weight"])
        return bitlinear(h, sd[f"{p}.down.weight"])

    out = []
    for b in range(idx.shape[0]):
        n = cfg.mhc_streams
        xs = [sd["tok_emb.weight"][idx[b]]] * n
        for i in range(cfg.n_layers):
            for kind, f, norm_name in (("attn", attention, "attn_norm"), ("ffn", ffn, "ffn_norm")):
                h_pre, h_post, h_res = mhc[(i, kind)] if n > 1 else ([1.0], [1.0], [[1.0]])
                u = sum(h_pre[s] * xs[s] for s in range(n))
                y = f(norm(u, sd[f"blocks.{i}.{norm_name}.weight"]), f"blocks.{i}.{kind}")
                xs = [sum(h_res[s][r] * xs[r] for r in range(n)) + h_post[s] * y for s in range(n)]
        x = norm(sum(xs) / n, sd["norm.weight"])
        head = sd["tok_emb.weight"] if cfg.tie_embeddings else sd["lm_head.weight"]
        out.append(x @ head.T)
    return torch.stack(out)


def perturbed(cfg: ModelConfig) -> GPT:
    """A model whose norm and mHC parameters are not at their init values (so the test sees them)."""
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    return model


VARIANTS = {
    "plain": dict(),
    "mha": dict(n_kv_heads=4),
    "mqa": dict(n_kv_heads=1),
    "sub_norms": dict(sub_norms=True),
    "tied": dict(tie_embeddings=True),
    "absmax_no_act_quant": dict(weight_quant="absmax", activation_bits=0),
    "mhc2": dict(mhc_streams=2),
    "mhc4_sub_norms_tied": dict(mhc_streams=4, sub_norms=True, tie_embeddings=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_contract_reference(variant):
    cfg = small(**VARIANTS[variant])
    model = perturbed(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 11))
    mhc = {}
    for i, block in enumerate(model.blocks):
        for kind in ("attn", "ffn"):
            module = getattr(block, f"{kind}_mhc")
            if hasattr(module, "matrices"):
                mhc[(i, kind)] = [m.detach().tolist() for m in module.matrices()]
    with torch.no_grad():
        logits, loss = model(idx)
        expected = reference_logits(model.state_dict(), cfg, idx, mhc)
    if cfg.activation_bits == 0:
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    else:
        # int8 activation rounding can flip on float noise for a few elements; compare in bulk
        assert (logits - expected).abs().mean() < 1e-3 and (logits - expected).abs().max() < 0.05
    assert loss is None


def test_state_dict_names_and_shapes_follow_the_contract():
    cfg = small(sub_norms=True, mhc_streams=2)
    sd = GPT(cfg).state_dict()
    d, f, hd = cfg.dim, cfg.ffn_hidden, cfg.head_dim
    expected = {"tok_emb.weight": (cfg.vocab_size, d), "norm.weight": (d,), "lm_head.weight": (cfg.vocab_size, d)}
    for i in range(cfg.n_layers):
        p = f"blocks.{i}"
        expected.update({
            f"{p}.attn_norm.weight": (d,), f"{p}.ffn_norm.weight": (d,),
            f"{p}.attn.q.weight": (cfg.n_heads * hd, d), f"{p}.attn.k.weight": (cfg.n_kv_heads * hd, d),
            f"{p}.attn.v.weight": (cfg.n_kv_heads * hd, d), f"{p}.attn.o.weight": (d, cfg.n_heads * hd),
            f"{p}.attn.sub_norm.weight": (cfg.n_heads * hd,), f"{p}.ffn.sub_norm.weight": (f,),
            f"{p}.ffn.gate.weight": (f, d), f"{p}.ffn.up.weight": (f, d), f"{p}.ffn.down.weight": (d, f),
        })
        for kind in ("attn", "ffn"):
            expected.update({f"{p}.{kind}_mhc.pre_logits": (2,), f"{p}.{kind}_mhc.post_logits": (2,),
                             f"{p}.{kind}_mhc.res_logits": (1,)})
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected  # rope buffers are not persistent

    plain = GPT(small(tie_embeddings=True)).state_dict()
    assert "lm_head.weight" not in plain and not any("sub_norm" in k or "_mhc" in k for k in plain)


@pytest.mark.parametrize("variant", ["plain", "mhc4_sub_norms_tied"])
def test_forward_backward_shapes_and_finite_grads(variant):
    cfg = small(**VARIANTS[variant])
    torch.manual_seed(0)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, 17))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 17, cfg.vocab_size) and logits.dtype == torch.float32
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.5  # near uniform at init
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.num_params() == sum(p.numel() for p in model.parameters())


def test_causal_future_tokens_do_not_change_past_logits():
    cfg = small(mhc_streams=2)
    model = perturbed(cfg)
    idx = torch.randint(0, cfg.vocab_size, (1, 20))
    changed = idx.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=0)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_ignored_targets():
    cfg = small()
    model = perturbed(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 10))
    targets = idx.clone()
    targets[:, :4] = -1
    logits, loss = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, cfg.vocab_size), idx[:, 4:].reshape(-1))
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_autocast_runs_and_stays_close(dtype):
    cfg = small(mhc_streams=2, activation_bits=0)
    model = perturbed(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    ref, _ = model(idx)
    with torch.autocast("cpu", dtype=dtype):
        logits, loss = model(idx, idx)
    assert logits.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert (logits - ref).abs().mean() < 0.05 * ref.abs().mean()


def test_quantization_switch_gives_plain_linears():
    cfg = small()
    model = perturbed(cfg)
    idx = torch.randint(0, cfg.vocab_size, (1, 8))
    with torch.no_grad():
        quantized = model(idx)[0]
        model.set_quantization(False)
        plain = model(idx)[0]
        model.set_quantization(True)
        again = model(idx)[0]
    assert not torch.allclose(quantized, plain)
    torch.testing.assert_close(quantized, again, rtol=0, atol=0)


def test_bad_inputs_name_the_problem():
    model = GPT(small())
    with pytest.raises(ValueError, match="idx must be"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len=48"):
        model(torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.full((1, 4), 97, dtype=torch.long))
    with pytest.raises(ValueError, match="targets shape"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long))


def test_preset_parameter_counts():
    for name in ("tiny", "nano-125m", "small-560m", "medium-3b"):
        with torch.device("meta"):  # shapes only: no memory, no init cost
            model = GPT(preset(name))
        print(f"{name}: {model.num_params():,} params ({model.num_params(non_embedding=True):,} non-embedding)")
    with torch.device("meta"):
        nano = GPT(preset("nano-125m"))
    cfg = nano.config
    per_block = 2 * cfg.dim + 2 * cfg.dim * cfg.dim + 2 * cfg.dim * cfg.n_kv_heads * cfg.head_dim \
        + 3 * cfg.dim * cfg.ffn_hidden + 2 * (2 + 2 + 1)
    assert nano.num_params() == 2 * cfg.vocab_size * cfg.dim + cfg.dim + cfg.n_layers * per_block


def test_nano_125m_forward_backward_on_cpu():
    torch.manual_seed(0)
    start = time.time()
    model = GPT(preset("nano-125m"))
    idx = torch.randint(0, model.config.vocab_size, (1, 32))
    logits, loss = model(idx, idx)
    loss.backward()
    print(f"nano-125m: {model.num_params():,} params, loss {loss.item():.3f}, "
          f"init+forward+backward {time.time() - start:.1f}s")
    assert logits.shape == (1, 32, 32000)
    assert abs(loss.item() - math.log(32000)) < 1.0
    assert all(p.grad is not None for p in model.parameters())
    assert 120e6 < model.num_params() < 150e6
