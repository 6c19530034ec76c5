"""Checkpoints: round trip of weights/optimizer/scaler/RNG/sampler state, the atomic swap surviving a
kill at each point, clear errors on missing or corrupt files, and the metrics log/plot.

    .venv/bin/python -m pytest tests/test_checkpoint.py -q
"""

import json
import os
import random
import shutil

import numpy as np
import pytest
import torch

from nanochat import checkpoint
from nanochat.checkpoint import CheckpointError
from nanochat.config import ModelConfig
from nanochat.metrics import MetricsLogger, read_metrics
from nanochat.model import GPT
from nanochat.optim import build_optimizers

TINY = dict(vocab_size=300, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_mult=2.0, max_seq_len=32, group_size=64)


class CountingSampler:
    """Stand-in for the data sampler: only its state_dict protocol matters here."""

    def __init__(self):
        self.position = 0

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def trained_model(config, steps=2, seed=0):
    torch.manual_seed(seed)
    model = GPT(config)
    opts = build_optimizers(model)
    for _ in range(steps):
        idx = torch.randint(0, config.vocab_size, (2, 16))
        _, loss = model(idx, idx)
        loss.backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
    return model, opts


@pytest.mark.parametrize("overrides", [dict(mhc_streams=2), dict(mhc_streams=1, tie_embeddings=True, sub_norms=True)])
def test_round_trip_restores_everything(tmp_path, overrides):
    config = ModelConfig(**TINY, **overrides)
    model, opts = trained_model(config)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    sampler = CountingSampler()
    sampler.position = 17
    random.seed(5); np.random.seed(5); torch.manual_seed(5)
    checkpoint.save_checkpoint(tmp_path, "latest", model, config, step=2, optimizers=opts, scaler=scaler,
                               sampler=sampler, val_loss=3.5, train_state={"skipped_steps": 1})
    expected_draws = (random.random(), np.random.rand(), torch.rand(1).item())

    model2 = GPT(config)
    opts2 = build_optimizers(model2)
    scaler2, sampler2 = torch.amp.GradScaler("cpu"), CountingSampler()
    state = checkpoint.load_checkpoint(tmp_path, model2, optimizers=opts2, scaler=scaler2, sampler=sampler2)

    for (name, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), name
    if config.tie_embeddings:
        assert model2.lm_head is None
    assert state["step"] == 2 and state["train_state"] == {"skipped_steps": 1}
    assert sampler2.position == 17 and scaler2.get_scale() == 1024.0
    for o1, o2 in zip(opts, opts2):
        s1, s2 = o1.state_dict(), o2.state_dict()
        assert s1["param_groups"] == s2["param_groups"]
        for k in s1["state"]:
            for field, v in s1["state"][k].items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(s2["state"][k][field]))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected_draws
    meta = json.loads((tmp_path / "latest" / "meta.json").read_text())
    assert meta["step"] == 2 and meta["val_loss"] == 3.5 and meta["model_config"] == config.to_dict()


def test_overwrite_and_kill_during_swap_leave_a_loadable_checkpoint(tmp_path):
    config = ModelConfig(**TINY)
    model, opts = trained_model(config, steps=1)
    checkpoint.save_checkpoint(tmp_path, "latest", model, config, step=1, optimizers=opts)
    model_b, opts_b = trained_model(config, steps=2, seed=1)
    checkpoint.save_checkpoint(tmp_path, "latest", model_b, config, step=2, optimizers=opts_b)
    assert checkpoint.read_meta(tmp_path / "latest")["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]  # no temp or old folders left behind

    # a kill after "latest -> .latest.old" but before ".latest.tmp -> latest"
    os.replace(tmp_path / "latest", tmp_path / ".latest.old")
    (tmp_path / ".latest.tmp").mkdir()
    (tmp_path / ".latest.tmp" / "model.safetensors").write_bytes(b"half written")
    found = checkpoint.find_checkpoint(tmp_path, "latest")
    assert found.name == ".latest.old"
    fresh = GPT(config)
    assert checkpoint.load_checkpoint(tmp_path, fresh, optimizers=build_optimizers(fresh))["step"] == 2
    # the next save repairs the layout
    checkpoint.save_checkpoint(tmp_path, "latest", model, config, step=3, optimizers=opts)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]
    assert checkpoint.read_meta(tmp_path / "latest")["step"] == 3

    # a kill while the temp folder is being written: latest untouched
    shutil.rmtree(tmp_path / "latest" / ".." / ".latest.tmp", ignore_errors=True)
    (tmp_path / ".latest.tmp").mkdir()
    assert checkpoint.find_checkpoint(tmp_path, "latest") == tmp_path / "latest"


def test_missing_and_corrupt_files_name_the_file(tmp_path):
    config = ModelConfig(**TINY)
    model, opts = trained_model(config, steps=1)
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.find_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        checkpoint.find_checkpoint(tmp_path)

    ckpt = checkpoint.save_checkpoint(tmp_path, "latest", model, config, step=1, optimizers=opts)
    weights = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        checkpoint.load_checkpoint(tmp_path, GPT(config), optimizers=opts)
    (ckpt / "model.safetensors").write_bytes(weights)

    (ckpt / "state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="state.pt"):
        checkpoint.load_checkpoint(tmp_path, GPT(config), optimizers=opts)
    (ckpt / "state.pt").unlink()
    with pytest.raises(CheckpointError, match="missing file .*state.pt"):
        checkpoint.load_checkpoint(tmp_path, GPT(config), optimizers=opts)

    (ckpt / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="meta.json"):
        checkpoint.read_meta(ckpt)

    other = ModelConfig(**{**TINY, "dim": 128, "group_size": 64})
    checkpoint.save_checkpoint(tmp_path, "latest", model, config, step=1, optimizers=opts)
    with pytest.raises(CheckpointError, match="model config differs"):
        checkpoint.load_checkpoint(tmp_path, GPT(other), optimizers=opts)


def test_load_model_prefers_best_and_needs_a_tokenizer(tmp_path):
    config = ModelConfig(**TINY)
    model, opts = trained_model(config, steps=1)
    checkpoint.save_checkpoint(tmp_path, "latest", model, config, step=5, optimizers=opts)
    assert checkpoint.find_checkpoint(tmp_path).name == "latest"
    checkpoint.save_checkpoint(tmp_path, "best", model, config, step=3, optimizers=opts, val_loss=2.0)
    assert checkpoint.find_checkpoint(tmp_path).name == "best"
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        checkpoint.load_model(tmp_path)


def test_metrics_log_resume_truncates_and_plot(tmp_path):
    log = MetricsLogger(tmp_path)
    for step in (1, 2, 3):
        log.log("train", step, loss=5.0 - step, lr=1e-3)
    log.log("eval", 3, val_loss=2.5, val_bpb=float("inf"))
    log.plot()
    log.close()
    assert (tmp_path / "loss.png").stat().st_size > 1000
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 3] and records[-1]["val_bpb"] is None

    log = MetricsLogger(tmp_path, resume_step=2)  # the run was killed after its step-2 checkpoint
    log.log("train", 3, loss=1.5)
    log.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(1, 4.0), (2, 3.0), (3, 1.5)]
