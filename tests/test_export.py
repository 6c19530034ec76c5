"""GGUF export: exact codes and scales, every tensor readable by gguf-py, metadata and tokenizer round
trips, the .mhc sidecar and its error messages, and the nano-125m size budget.

Run: .venv/bin/python -m pytest tests/test_export.py -q

`small_model(...)` (also used by tests/test_engine.py) trains a tiny GPT for a few dozen AdamW steps
on Python standard-library source, so its predictions are peaked like a real model's, and caches it
for the whole session.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import inspect
import shutil
import tempfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from nanochat import gguf_format as fmt
from nanochat import quant
from nanochat.config import ModelConfig, preset
from nanochat.export import export_gguf
from nanochat.mhc_file import MhcFileError, file_size, read_mhc, write_mhc
from nanochat.model import GPT
from nanochat.tokenizer import Tokenizer

SEQ = 96
TRAIN_STEPS = 30


def corpus() -> tuple[str, str]:
    """(training text, held-out text): fixed standard-library sources."""
    import bisect, heapq, shlex, string, textwrap, fractions  # noqa: E401
    train = "\n".join(inspect.getsource(m) for m in (textwrap, string, heapq, shlex, bisect))
    return train, inspect.getsource(fractions)


@functools.lru_cache(maxsize=None)
def tokenizer() -> Tokenizer:
    train, _ = corpus()
    return Tokenizer.train([train], 512)


def small_model(mhc_streams: int = 2, sub_norms: bool = True, tie_embeddings: bool = False) -> tuple[GPT, ModelConfig, Tokenizer]:
    """A tiny GPT trained for TRAIN_STEPS steps (cached per session). ffn_hidden = 448 is not a multiple of
    256, so the TQ2_0 padding is exercised."""
    return _small_model(mhc_streams, sub_norms, tie_embeddings)


@functools.lru_cache(maxsize=None)
def _small_model(mhc_streams: int, sub_norms: bool, tie_embeddings: bool) -> tuple[GPT, ModelConfig, Tokenizer]:
    tok = tokenizer()
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_mult=3.5,
                      max_seq_len=256, group_size=64, mhc_streams=mhc_streams, sub_norms=sub_norms,
                      tie_embeddings=tie_embeddings)
    torch.manual_seed(0)
    model = GPT(cfg)
    ids = torch.tensor(tok.encode(corpus()[0]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only fight the other test processes
    try:
        for _ in range(TRAIN_STEPS):
            starts = torch.randint(0, len(ids) - SEQ - 1, (8,), generator=gen)
            batch = torch.stack([ids[s:s + SEQ + 1] for s in starts])
            _, loss = model(batch[:, :-1], batch[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval(), cfg, tok


def exported(mhc_streams: int = 2, sub_norms: bool = True, tie_embeddings: bool = False,
             embed: str = "q8_0", head: str = "q8_0", ternary: str = "tq2_0") -> Path:
    """Export small_model(...) once per session; returns the .gguf path."""
    return _exported(mhc_streams, sub_norms, tie_embeddings, embed, head, ternary)


@functools.lru_cache(maxsize=None)
def _exported(mhc_streams: int, sub_norms: bool, tie_embeddings: bool, embed: str, head: str, ternary: str) -> Path:
    model, cfg, tok = small_model(mhc_streams, sub_norms, tie_embeddings)
    folder = Path(tempfile.mkdtemp(prefix="nanochat_export_test_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return export_gguf(model, cfg, tok, folder / "model.gguf", embed=embed, head=head, ternary=ternary)


def held_out_ids(n: int = 200) -> list[int]:
    return tokenizer().encode(corpus()[1])[:n]


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ternary", ["tq2_0", "tq1_0"])
def test_codes_and_scales_are_exact(ternary):
    model, cfg, _ = small_model()
    reader = gguf.GGUFReader(exported(ternary=ternary))
    tensors = {t.name: t for t in reader.tensors}
    sd = model.state_dict()
    for i in range(cfg.n_layers):
        for src, dst in fmt.TERNARY_LINEARS.items():
            codes, scales = quant.weight_scales_codes(sd[f"blocks.{i}.{src}.weight"], cfg.group_size, cfg.weight_quant)
            t = tensors[fmt.blk(i, f"{dst}.weight")]
            assert t.tensor_type == fmt.ternary_type(ternary)
            got = gguf.quants.dequantize(t.data, t.tensor_type)  # d = 1: the codes themselves
            k = codes.shape[1]
            assert got.shape == (codes.shape[0], fmt.padded_k(k))
            np.testing.assert_array_equal(got[:, :k], codes.numpy())
            assert not got[:, k:].any(), "TQ2_0 padding beyond K must be zero codes"
            np.testing.assert_array_equal(tensors[fmt.blk(i, f"{dst}.scale")].data, scales.numpy())
    assert any(fmt.padded_k(k) != k for _, k in fmt.linear_shapes(cfg).values()), "test must cover padding"


@pytest.mark.parametrize("embed,head", [("q8_0", "q8_0"), ("f16", "f16")])
def test_gguf_py_reads_and_dequantizes_every_tensor(embed, head):
    model, cfg, tok = small_model()
    path = exported(embed=embed, head=head)
    reader = gguf.GGUFReader(path)
    specs = {s.name: s for s in fmt.expected_tensors(cfg, embed, head)}
    assert sorted(t.name for t in reader.tensors) == sorted(specs)
    for t in reader.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        assert arr.shape == specs[t.name].shape, t.name
        assert t.tensor_type == specs[t.name].ggml_type, t.name
        assert np.isfinite(arr).all(), t.name
    emb = gguf.quants.dequantize(next(t for t in reader.tensors if t.name == fmt.TOKEN_EMBD).data,
                                 fmt.float_type(embed, "embed"))
    ref = model.tok_emb.weight.detach().numpy()
    assert np.abs(emb - ref).max() <= np.abs(ref).max() / (100 if embed == "q8_0" else 1000)


def test_metadata_config_and_tokenizer_round_trip():
    _, cfg, tok = small_model()
    reader = gguf.GGUFReader(exported())
    field = lambda key: reader.get_field(key).contents()  # noqa: E731
    assert field(fmt.KEY_ARCH) == "nanochat-ternary"
    back = {f.name: field(fmt.KEY_CONFIG_PREFIX + f.name) for f in dataclasses.fields(ModelConfig)}
    assert ModelConfig.from_dict(back) == cfg  # floats stored as f64: exact
    tokens, merges, types = field(fmt.KEY_TOK_TOKENS), field(fmt.KEY_TOK_MERGES), field(fmt.KEY_TOK_TYPES)
    assert field(fmt.KEY_TOK_MODEL) == "gpt2"
    assert (field(fmt.KEY_TOK_BOS), field(fmt.KEY_TOK_EOS)) == (tok.bos_id, tok.end_id)
    rebuilt = Tokenizer.from_vocab_merges(tokens, merges, types)
    text = corpus()[1][:2000] + " héllo wörld ✓ 日本語"
    assert rebuilt.encode(text) == tok.encode(text)


def test_mhc_sidecar_matches_model_and_gguf():
    model, cfg, _ = small_model()
    path = exported()
    layers = read_mhc(path.with_suffix(".mhc"), n_streams=2, n_layers=cfg.n_layers)
    tensors = {t.name: t.data for t in gguf.GGUFReader(path).tensors}
    for i, block in enumerate(model.blocks):
        for sub, module, mats in zip(fmt.MHC_SUBLAYERS, (block.attn_mhc, block.ffn_mhc), layers[i]):
            for part, want, got in zip(fmt.MHC_PARTS, module.matrices(), mats):
                np.testing.assert_array_equal(got, want.detach().numpy())
                np.testing.assert_array_equal(tensors[fmt.blk(i, f"{sub}.{part}")], got)
    assert path.with_suffix(".mhc").stat().st_size == file_size(2, cfg.n_layers)


def test_no_sidecar_without_mhc():
    path = exported(mhc_streams=1, sub_norms=False)
    assert not path.with_suffix(".mhc").exists()
    assert not any(".h_res" in t.name for t in gguf.GGUFReader(path).tensors)


def test_mhc_file_errors_say_what_mismatches(tmp_path):
    rng = np.random.default_rng(0)
    layers = [[(rng.random(2, dtype=np.float32), rng.random(2, dtype=np.float32), rng.random((2, 2), dtype=np.float32))
               for _ in range(2)] for _ in range(3)]
    good = tmp_path / "m.mhc"
    write_mhc(good, layers, 2)
    back = read_mhc(good, 2, 3)
    for a, b in zip(layers, back):
        for sa, sb in zip(a, b):
            for x, y in zip(sa, sb):
                np.testing.assert_array_equal(x, y)
    data = good.read_bytes()
    cases = {
        "bad magic": b"XMHC" + data[4:],
        "unsupported version": data[:4] + (7).to_bytes(4, "little") + data[8:],
        "size mismatch": data[:-4],
        "too short": data[:10],
    }
    for expected, blob in cases.items():
        (tmp_path / "bad.mhc").write_bytes(blob)
        with pytest.raises(MhcFileError, match=expected):
            read_mhc(tmp_path / "bad.mhc", 2, 3)
    with pytest.raises(MhcFileError, match="n_streams mismatch: model has 4, file has 2"):
        read_mhc(good, 4, 3)
    with pytest.raises(MhcFileError, match="n_layers mismatch: model has 12, file has 3"):
        read_mhc(good, 2, 12)
    with pytest.raises(MhcFileError, match=r"layer 0 h_res: expected shape \(2, 2\)"):
        write_mhc(tmp_path / "x.mhc", [[(np.ones(2), np.ones(2), np.ones(4))] * 2], 2)


def predicted_size(cfg: ModelConfig, embed: str = "q8_0", head: str = "q8_0", ternary: str = "tq2_0") -> int:
    """Bytes of tensor data from the type sizes alone (what the file costs beyond metadata)."""
    total = 0
    for s in fmt.expected_tensors(cfg, embed, head, ternary):
        block, type_size = gguf.GGML_QUANT_SIZES[s.ggml_type]
        total += int(np.prod(s.shape)) // block * type_size
    return total


def test_file_size_is_the_tensor_budget_plus_metadata():
    _, cfg, _ = small_model()
    size = exported().stat().st_size
    data = predicted_size(cfg)
    assert data < size < data + 64 * 1024  # metadata of a 512-token tokenizer is small


def test_nano_125m_size_budget():
    """nano-125m tensor data: 79.5e6 bytes with TQ2_0 (+ ~0.9e6 of tokenizer metadata: 80.5e6 = 76.7 MiB,
    under 80 MiB), 75.3e6 with TQ1_0 (76.2e6 in all, under 80e6). benches/bench_engine.py measures real exports."""
    cfg = preset("nano-125m")
    assert predicted_size(cfg) + 1_500_000 <= 80 * 2**20, predicted_size(cfg)
    assert predicted_size(cfg, ternary="tq1_0") + 1_500_000 <= 80_000_000, predicted_size(cfg, ternary="tq1_0")


def test_export_refuses_a_diverged_model(tmp_path):
    model, cfg, tok = small_model()
    broken = GPT(cfg)
    broken.load_state_dict(model.state_dict())
    with torch.no_grad():
        broken.blocks[0].attn.q.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        export_gguf(broken, cfg, tok, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_export_cli_from_checkpoint(tmp_path):
    """`python -m nanochat.export` reads a run folder through checkpoint.load_model and writes GGUF + sidecar."""
    from nanochat.checkpoint import save_checkpoint
    from nanochat.export import main

    model, cfg, tok = small_model()
    tok.save(tmp_path / "tokenizer.json")
    save_checkpoint(tmp_path / "run", "latest", model, cfg, step=1, tokenizer_path=tmp_path / "tokenizer.json")
    main(["--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "cli.gguf"), "--head", "f16"])
    reader = gguf.GGUFReader(tmp_path / "cli.gguf")
    head = next(t for t in reader.tensors if t.name == fmt.OUTPUT)
    assert head.tensor_type == gguf.GGMLQuantizationType.F16
    np.testing.assert_array_equal(head.data, model.lm_head.weight.detach().numpy().astype(np.float16))
    assert (tmp_path / "cli.mhc").stat().st_size == file_size(cfg.mhc_streams, cfg.n_layers)
