"""The native decode step (rust/ternary_kernels/src/decode.rs) against the engine's Python layer loop and numpy.

Run: .venv/bin/python -m pytest tests/test_engine_decode.py -q

- DecodeLayer.step on one layer == a numpy reference of the layer (numpy norms, mHC and attention; the
  Rust matmuls, which test_ternary_bindings.py checks on their own), for plain residual, mHC 2 with
  sub-norms and mHC 4, three sequences at different positions.
- Transformer.forward through DecodeModel == the Python layer loop bit for bit (both call the same
  Rust norm / mHC / attention / matmul functions), logits and KV caches, over several batched steps;
  and greedy generation on the exported tiny model (tests/fixtures_model.py) is unchanged.
- A prompt read at once (attend_prefill: each token through the decode step's attention) == the same
  tokens decoded one by one, bit for bit, logits and caches.
- mhc_read / mhc_write and the numpy prefill's rope_rows / causal_softmax == their numpy definitions (the
  numpy backend's functions); bad shapes raise ValueError naming the argument.
"""

from __future__ import annotations

import numpy as np
import pytest

from nanochat.config import ModelConfig
from nanochat.engine import kernels
from nanochat.engine.model import Embedding, KVCache, LayerWeights, MhcMix, Transformer, Weights
from tests.fixtures_model import tiny_gguf  # noqa: F401  (pytest fixture)

if kernels.DecodeModel is None:
    pytest.skip("the native decode step needs the Rust extension (maturin develop --release)", allow_module_level=True)

VARIANTS = {"plain": (1, False), "mhc2_subnorms": (2, True), "mhc4": (4, False)}  # name -> (streams, sub_norms)


def ternary(rng, rows: int, cols: int, group_size: int = 64):
    codes = rng.integers(-1, 2, (rows, cols)).astype(np.int8)
    scales = rng.uniform(0.02, 0.06, (rows, -(-cols // group_size))).astype(np.float32)
    return kernels.TernaryMatrix(codes, scales, group_size)


def mhc_mix(rng, n: int) -> MhcMix:
    h_res = rng.uniform(0.1, 1.0, (n, n))
    return MhcMix(rng.uniform(0.3, 0.8, n), rng.uniform(0.5, 1.5, n), h_res / h_res.sum(1, keepdims=True))


def random_transformer(streams: int, sub_norms: bool, seed: int = 0) -> Transformer:
    """A 2-layer random ternary model (D 64, 4 heads, 2 kv heads) built straight from arrays."""
    cfg = ModelConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_mult=2.0, max_seq_len=64,
                      group_size=64, mhc_streams=streams, sub_norms=sub_norms)
    rng = np.random.default_rng(seed)
    d, f, hd = cfg.dim, cfg.ffn_hidden, cfg.head_dim
    norm = lambda n: rng.uniform(0.5, 1.5, n).astype(np.float32)  # noqa: E731
    layers = [LayerWeights(norm(d), ternary(rng, (cfg.n_heads + 2 * cfg.n_kv_heads) * hd, d),
                           ternary(rng, d, cfg.n_heads * hd), norm(d), ternary(rng, 2 * f, d), ternary(rng, d, f),
                           norm(cfg.n_heads * hd) if sub_norms else None, norm(f) if sub_norms else None,
                           mhc_mix(rng, streams) if streams > 1 else None,
                           mhc_mix(rng, streams) if streams > 1 else None)
              for _ in range(cfg.n_layers)]
    emb = Embedding(rng.normal(0, 1, (cfg.vocab_size, d)).astype(np.float16), None)
    head = kernels.Int8Matrix.from_f32(rng.normal(0, 0.1, (cfg.vocab_size, d)).astype(np.float32))
    return Transformer(cfg, Weights(emb, layers, norm(d), head))


def numpy_layer_step(model: Transformer, lw: LayerWeights, xs, cos, sin, ks, vs, positions) -> np.ndarray:
    """One layer for B new tokens in numpy (the Rust matrices for the matmuls): returns the new xs."""
    cfg, eps = model.cfg, model.eps
    xs = xs.copy()

    def read(mix):
        return xs[0] if mix is None else np.einsum("i,ibd->bd", mix.h_pre, xs)

    def write(y, mix):
        xs[...] = xs + y if mix is None else np.einsum("ij,jbd->ibd", mix.h_res, xs) + mix.h_post[:, None, None] * y

    qkv = lw.qkv.gemm(kernels.numpy_rms_norm(read(lw.attn_mhc), lw.attn_norm, eps))
    att = np.stack([kernels.numpy_attend_decode(qkv[i], cos[i], sin[i], ks[i], vs[i], p, cfg.n_heads, model.scale)
                    for i, p in enumerate(positions)])
    if lw.attn_sub_norm is not None:
        att = kernels.numpy_rms_norm(att, lw.attn_sub_norm, eps)
    write(lw.o.gemm(att.astype(np.float32)), lw.attn_mhc)
    a = kernels.numpy_silu_mul(lw.gate_up.gemm(kernels.numpy_rms_norm(read(lw.ffn_mhc), lw.ffn_norm, eps)))
    if lw.ffn_sub_norm is not None:
        a = kernels.numpy_rms_norm(a, lw.ffn_sub_norm, eps)
    write(lw.down.gemm(a.astype(np.float32)), lw.ffn_mhc)
    return xs


def layer_inputs(model: Transformer, rng, positions=(0, 5, 9)):
    cfg = model.cfg
    b, hd = len(positions), cfg.head_dim
    xs = rng.normal(0, 1, (cfg.mhc_streams, b, cfg.dim)).astype(np.float32)
    caches = [rng.normal(0, 1, (2, cfg.n_kv_heads, 16, hd)).astype(np.float16) for _ in positions]  # k, v
    return xs, model.cos[list(positions)], model.sin[list(positions)], caches, list(positions)


def decode_layer(model: Transformer, lw: LayerWeights):
    mats = lambda mix: None if mix is None else (mix.h_pre, mix.h_post, mix.h_res)  # noqa: E731
    cfg = model.cfg
    return kernels.DecodeLayer(lw.attn_norm, lw.qkv, lw.o, lw.ffn_norm, lw.gate_up, lw.down, cfg.n_heads,
                               cfg.n_kv_heads, float(model.eps), float(model.scale), lw.attn_sub_norm, lw.ffn_sub_norm,
                               mats(lw.attn_mhc), mats(lw.ffn_mhc))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_layer_step_matches_numpy_reference(variant):
    model = random_transformer(*VARIANTS[variant])
    lw = model.w.layers[0]
    xs, cos, sin, caches, positions = layer_inputs(model, np.random.default_rng(1))
    ref_caches = [c.copy() for c in caches]
    want = numpy_layer_step(model, lw, xs, cos, sin, [c[0] for c in ref_caches], [c[1] for c in ref_caches], positions)
    got = xs.copy()
    decode_layer(model, lw).step(got, cos, sin, [c[0] for c in caches], [c[1] for c in caches], positions)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * scale)  # f32 rounding only (different sum orders)
    for c, r in zip(caches, ref_caches):
        # RoPE'd k and v written in place, rounded to float16 the same way (round to nearest even)
        np.testing.assert_allclose(c.astype(np.float32), r.astype(np.float32), rtol=0, atol=1e-3 * np.abs(r).max())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_native_decode_equals_python_layer_loop(variant):
    native = random_transformer(*VARIANTS[variant])
    python = random_transformer(*VARIANTS[variant])
    python.decoder = None  # the same weights through the Python layer loop
    prompts = [[3, 17, 40, 2, 9], [50], [7, 7, 8, 90, 1, 4, 4, 60]]
    state = {}
    for name, model in (("native", native), ("python", python)):
        caches = [model.new_cache(32) for _ in prompts]
        model.forward(list(zip(prompts, caches)))
        tokens, steps = [p[-1] for p in prompts], []
        for _ in range(6):  # greedy, all three sequences batched, each at its own position
            logits = model.forward([([t], c) for t, c in zip(tokens, caches)])
            steps.append(logits)
            tokens = [int(t) for t in logits.argmax(-1)]
        state[name] = (np.stack(steps), caches)
    np.testing.assert_array_equal(state["native"][0], state["python"][0])
    for a, b, p in zip(state["native"][1], state["python"][1], prompts):
        assert a.length == b.length == len(p) + 6
        np.testing.assert_array_equal(a.k[:, :, :a.length], b.k[:, :, :b.length])
        np.testing.assert_array_equal(a.v[:, :, :a.length], b.v[:, :, :b.length])


def test_exported_tiny_model_generates_the_same_with_and_without_the_native_step(tiny_gguf):  # noqa: F811
    from nanochat.engine import Engine, SamplingParams

    engine = Engine.load(tiny_gguf)
    prompt = engine.tokenizer.encode("the quick brown fox")
    params = SamplingParams(temperature=0, max_tokens=24)
    native = [ev.token_id for ev in engine.generate(prompt, params)]
    engine.model.decoder = None
    python = [ev.token_id for ev in engine.generate(prompt, params)]
    assert native == python and len(native) == 24


def test_matrices_other_than_the_rust_classes_use_the_python_loop():
    model = random_transformer(2, True)
    for lw in model.w.layers:
        lw.qkv = kernels.NumpyTernaryMatrix(*lw.qkv.unpack(), 64)
    fallback = Transformer(model.cfg, model.w)
    assert model.decoder is not None and fallback.decoder is None
    cache = fallback.new_cache(8)
    fallback.forward([([1, 2, 3], cache)])
    assert fallback.forward([([4], cache)]).shape == (1, model.cfg.vocab_size) and cache.length == 4


def test_mhc_read_and_write_match_their_definitions():
    rng = np.random.default_rng(2)
    xs = rng.normal(0, 1, (3, 5, 40)).astype(np.float32)
    y = rng.normal(0, 1, (5, 40)).astype(np.float32)
    mix = mhc_mix(rng, 3)
    np.testing.assert_allclose(kernels.mhc_read(xs, mix.h_pre), np.einsum("i,itd->td", mix.h_pre, xs), rtol=1e-6, atol=1e-6)
    want = np.einsum("ij,jtd->itd", mix.h_res, xs) + mix.h_post[:, None, None] * y
    kernels.mhc_write(xs, y, mix.h_res, mix.h_post)
    np.testing.assert_allclose(xs, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="h_pre: expected one weight per stream"):
        kernels.mhc_read(xs, mix.h_pre[:2].copy())
    with pytest.raises(ValueError, match="y: expected shape"):
        kernels.mhc_write(xs, y[:4].copy(), mix.h_res, mix.h_post)
    with pytest.raises(ValueError, match="h_res: expected h_res"):
        kernels.mhc_write(xs, y, mix.h_res[:2].copy(), mix.h_post)


def test_prefill_rope_and_causal_softmax_match_numpy():
    rng = np.random.default_rng(4)
    model = random_transformer(1, False)
    n, heads, hd = 9, 6, model.cfg.head_dim
    x = rng.normal(0, 1, (n, 8 * hd)).astype(np.float32)
    cos, sin = model.cos[3:3 + n], model.sin[3:3 + n]
    got, want = x.copy(), x.copy()
    kernels.rope_rows(got, cos, sin, heads)
    kernels.numpy_rope_rows(want, cos, sin, heads)
    np.testing.assert_array_equal(got, want)  # same formula, same rounding
    assert np.array_equal(got[:, heads * hd:], x[:, heads * hd:])
    scores = rng.normal(0, 3, (2, 3 * 4, 10)).astype(np.float32)  # [KVH, r * c, s_len], c = 4 queries from 6
    got, want = scores.copy(), scores.copy()
    kernels.causal_softmax(got, 4, 6, 0.25)
    kernels.numpy_causal_softmax(want, 4, 6, 0.25)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert got[0, 0, 7:].max() == 0 and got[0, 3, 9] > 0  # query 0 at position 6 sees keys 0..6; query 3 all 10
    with pytest.raises(ValueError, match="scores: expected rows of s_len = 10 keys in groups of c = 4"):
        kernels.causal_softmax(got, 4, 7, 0.25)
    with pytest.raises(ValueError, match=r"cos: expected cos and sin \[N = 9, hd\]"):
        kernels.rope_rows(got.reshape(-1, 10)[:9].copy(), cos[:4].copy(), sin, 2)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_equals_decoding_the_prompt_token_by_token(variant):
    """A prompt read at once gives the logits and caches of the same tokens decoded one by one, bit for
    bit (two sequences in one prefill, each at its own offset). The int8 quantization of the attention
    output hides last-bit differences of attention from the logits, so the attention itself is compared
    in the next test."""
    model = random_transformer(*VARIANTS[variant])
    prompts = [[3, 17, 40, 2, 9, 33, 8], [50, 7, 1]]
    at_once = [model.new_cache(16) for _ in prompts]
    for c, start in zip(at_once, ([5], [11, 12])):  # caches that already hold a few positions
        model.forward([(start, c)])
    one_by_one = [model.new_cache(16) for _ in prompts]
    for c, start in zip(one_by_one, ([5], [11, 12])):
        model.forward([(start, c)])
    got = model.forward(list(zip(prompts, at_once)), all_logits=True)
    want = [model.forward([([t], c)]) for p, c in zip(prompts, one_by_one) for t in p]
    np.testing.assert_array_equal(got, np.concatenate(want))
    for a, b in zip(at_once, one_by_one):
        assert a.length == b.length
        np.testing.assert_array_equal(a.k[:, :, :a.length], b.k[:, :, :b.length])
        np.testing.assert_array_equal(a.v[:, :, :a.length], b.v[:, :, :b.length])


def test_attend_prefill_equals_attend_decode_token_by_token():
    rng = np.random.default_rng(9)
    n_heads, kvh, hd, cap, n, pos0 = 12, 4, 64, 40, 13, 6
    qkv = rng.normal(0, 1.5, (n, (n_heads + 2 * kvh) * hd)).astype(np.float32)
    angles = rng.uniform(0, 6.3, (n, hd // 2)).astype(np.float32)
    cos = np.concatenate([np.cos(angles), np.cos(angles)], 1)
    sin = np.concatenate([-np.sin(angles), np.sin(angles)], 1)
    k0 = rng.normal(0, 1, (kvh, cap, hd)).astype(np.float16)
    v0 = rng.normal(0, 1, (kvh, cap, hd)).astype(np.float16)
    k_want, v_want = k0.copy(), v0.copy()
    want = np.stack([kernels.attend_decode(qkv[i], cos[i], sin[i], k_want, v_want, pos0 + i, n_heads, 0.125)
                     for i in range(n)])
    k, v = k0.copy(), v0.copy()
    got = kernels.attend_prefill(qkv, cos, sin, k, v, pos0, n_heads, 0.125)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(k, k_want)
    np.testing.assert_array_equal(v, v_want)
    # the numpy prefill it replaced (BLAS matmuls, another summation order) agrees to f32 rounding
    numpy_out = np.stack([kernels.numpy_attend_decode(qkv[i], cos[i], sin[i], k0.copy(), v0.copy(), pos0 + i, n_heads,
                                                      0.125) for i in range(1)])
    np.testing.assert_allclose(numpy_out, got[:1], rtol=0, atol=1e-5)


def test_attend_prefill_rejects_bad_arguments():
    model = random_transformer(1, False)
    cfg, hd = model.cfg, model.cfg.head_dim
    cache = model.new_cache(8)
    qkv = np.zeros((3, (cfg.n_heads + 2 * cfg.n_kv_heads) * hd), dtype=np.float32)
    cos, sin = model.cos[:3], model.sin[:3]
    k, v = cache.k[0], cache.v[0]
    with pytest.raises(ValueError, match=r"cache: expected .* pos0 \+ N <= 8, got .* 6 \+ 3"):
        kernels.attend_prefill(qkv, cos, sin, k, v, 6, cfg.n_heads, model.scale)
    with pytest.raises(ValueError, match=r"qkv: expected qkv \[N, "):
        kernels.attend_prefill(qkv[:, :-1].copy(), cos, sin, k, v, 0, cfg.n_heads, model.scale)
    with pytest.raises(ValueError, match=r"qkv: expected \[N, \(H \+ 2 KVH\) hd\]"):
        kernels.attend_prefill(qkv[0], cos, sin, k, v, 0, cfg.n_heads, model.scale)
    with pytest.raises(ValueError, match="k_cache: expected two"):
        kernels.attend_prefill(qkv, cos, sin, k, v[:1], 0, cfg.n_heads, model.scale)


def test_bad_step_arguments_name_the_argument():
    model = random_transformer(2, True)
    layer = decode_layer(model, model.w.layers[0])
    xs, cos, sin, caches, positions = layer_inputs(model, np.random.default_rng(3))
    ks, vs = [c[0] for c in caches], [c[1] for c in caches]
    cases = [
        (dict(xs=xs[:, :, :32].copy()), r"xs: expected \[n_streams = 2, B > 0, D = 64\]"),
        (dict(xs=xs[:1].copy()), "xs: expected"),
        (dict(xs=xs.astype(np.float64)), "xs: expected dtype float32"),
        (dict(xs=xs[:, ::-1]), "xs: .*not C-contiguous"),
        (dict(cos=cos[:2].copy()), r"cos: expected \[B = 3, head_dim = 16\]"),
        (dict(sin=sin[:, :8].copy()), "sin: expected"),
        (dict(k_caches=ks[:2]), r"k_caches: expected one per sequence \(B = 3\), got 2"),
        (dict(positions=positions[:1]), "positions: expected one per sequence"),
        (dict(positions=[0, 5, 16]), r"positions: sequence 2: expected 0 <= position < 16, got 16"),
        (dict(positions=[0, -1, 3]), "positions: sequence 1"),
        (dict(v_caches=[vs[0], vs[1], vs[2][:, :8].copy()]), "k_caches: sequence 2: expected k and v caches"),
        (dict(k_caches=[ks[0], ks[0], ks[2]]), "k_caches: sequence 1: cannot write the cache"),
        (dict(k_caches=[ks[0], ks[1], [1.0]]), "k_caches: expected a numpy.ndarray"),
        (dict(v_caches=[vs[0], vs[1].astype(np.float32), vs[2]]), "v_caches: expected dtype float16, got float32"),
    ]
    for change, message in cases:
        args = dict(xs=xs, cos=cos, sin=sin, k_caches=ks, v_caches=vs, positions=positions) | change
        with pytest.raises((ValueError, TypeError), match=message):
            layer.step(**args)
    lw = model.w.layers[0]
    with pytest.raises(ValueError, match=r"o: expected \[64, 64\], got \[64, 32\]"):
        kernels.DecodeLayer(lw.attn_norm, lw.qkv, ternary(np.random.default_rng(0), 64, 32), lw.ffn_norm, lw.gate_up,
                            lw.down, 4, 2, 1e-5, 0.25)
    with pytest.raises(ValueError, match="n_heads: expected n_heads a positive multiple of n_kv_heads"):
        kernels.DecodeLayer(lw.attn_norm, lw.qkv, lw.o, lw.ffn_norm, lw.gate_up, lw.down, 4, 3, 1e-5, 0.25)
    with pytest.raises(ValueError, match="ffn_mhc: expected the same stream count as attn_mhc"):
        kernels.DecodeLayer(lw.attn_norm, lw.qkv, lw.o, lw.ffn_norm, lw.gate_up, lw.down, 4, 2, 1e-5, 0.25,
                            attn_mhc=(lw.attn_mhc.h_pre, lw.attn_mhc.h_post, lw.attn_mhc.h_res))
    plain = decode_layer(random_transformer(1, False), random_transformer(1, False).w.layers[0])
    with pytest.raises(ValueError, match="layers: expected every layer with D 64, head_dim 16, 2 kv heads, 2 streams"):
        kernels.DecodeModel([layer, plain], model.w.output_norm, model.w.head)
    with pytest.raises(ValueError, match=r"output_norm: expected 64 values"):
        kernels.DecodeModel([layer], model.w.output_norm[:10].copy(), model.w.head)
    with pytest.raises(ValueError, match="k_caches: expected a 4-D array, got 3-D"):
        kernels.DecodeModel([layer], model.w.output_norm, model.w.head).step(xs, cos, sin, ks, vs, positions)
