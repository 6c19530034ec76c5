"""Run folders and checkpoints: atomic save, exact resume, and `load_model` for export/eval.

Layout (docs/contracts.md):
    RUN/config.json        model config + training args
    RUN/tokenizer.json     the tokenizer the run was trained with
    RUN/metrics.jsonl, RUN/loss.png
    RUN/latest/, RUN/best/ checkpoint folders, each holding
        model.safetensors  weights (fp32 master copy; shared tensors stored once)
        state.pt           optimizers, loss scaler, RNG (python, numpy, torch, cuda), data sampler, step
        tokenizer.json     copy, so a checkpoint folder is self-contained
        meta.json          step, val loss, model config; written last, so it marks a complete checkpoint

Atomicity: a checkpoint is written into `RUN/.NAME.tmp`, every file is fsynced, then the old folder
is renamed to `RUN/.NAME.old`, the new one to `RUN/NAME`, and the old one deleted. A kill at any
moment leaves either `RUN/NAME` or `RUN/.NAME.old` complete; `find_checkpoint` falls back to the
latter, and the next save repairs the layout.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from nanochat.config import ConfigError, ModelConfig

WEIGHTS = "model.safetensors"
STATE = "state.pt"
META = "meta.json"
TOKENIZER = "tokenizer.json"
RUN_CONFIG = "config.json"


class CheckpointError(RuntimeError):
    """A missing, incomplete or corrupt checkpoint; the message names the file."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model under DistributedDataParallel (.module) and torch.compile (._orig_mod)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# ---------------------------------------------------------------------------------------------
# Small atomic-file helpers

def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str | Path, obj: dict) -> None:
    """Write JSON to path.tmp, fsync, rename over path (readers never see half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt JSON in {path}: {e}") from e


# ---------------------------------------------------------------------------------------------
# RNG state (python, numpy, torch, cuda)

def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Save

def save_checkpoint(
    run_dir: str | Path,
    name: str,
    model: torch.nn.Module,
    config: ModelConfig,
    *,
    step: int,
    optimizers: list[torch.optim.Optimizer] = (),
    scaler: torch.amp.GradScaler | None = None,
    sampler=None,
    val_loss: float | None = None,
    train_state: dict | None = None,
    tokenizer_path: str | Path | None = None,
) -> Path:
    """Write RUN/NAME/ atomically (NAME is "latest" or "best"); returns the checkpoint folder.

    train_state: extra loop counters to restore on resume (best val loss, skipped steps, ...).
    sampler: anything with state_dict() (the data position), stored in state.pt.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final, tmp, old = run_dir / name, run_dir / f".{name}.tmp", run_dir / f".{name}.old"
    _repair(run_dir, name)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    plain = unwrap(model)
    safetensors.torch.save_model(plain, str(tmp / WEIGHTS), metadata={"model_config": config.to_json()})
    os.chmod(tmp / WEIGHTS, 0o644)  # safetensors creates it owner-only; the other files are 0644 too
    state = {
        "step": step,
        "optimizers": [opt.state_dict() for opt in optimizers],
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state(),
        "sampler": sampler.state_dict() if sampler is not None else None,
        "train_state": train_state or {},
    }
    torch.save(state, tmp / STATE)
    if tokenizer_path is not None and Path(tokenizer_path).is_file():
        shutil.copyfile(tokenizer_path, tmp / TOKENIZER)
    meta = {"step": step, "val_loss": val_loss, "model_config": config.to_dict(), "time": time.time()}
    (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    for f in tmp.iterdir():
        _fsync_file(f)
    _fsync_dir(tmp)

    # swap: a kill between these renames leaves .NAME.old complete, which find_checkpoint accepts
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(run_dir)
    if old.exists():
        shutil.rmtree(old)
    return final


def _repair(run_dir: Path, name: str) -> None:
    """Finish a swap a kill interrupted: put RUN/.NAME.old back if RUN/NAME is missing."""
    final, old = run_dir / name, run_dir / f".{name}.old"
    if not final.exists() and (old / META).is_file():
        os.replace(old, final)
    elif old.exists():
        shutil.rmtree(old)


def write_run_config(run_dir: str | Path, config: ModelConfig, train_args: dict) -> None:
    write_json_atomic(Path(run_dir) / RUN_CONFIG, {"model": config.to_dict(), "train": train_args})


# ---------------------------------------------------------------------------------------------
# Find and load

def find_checkpoint(path: str | Path, name: str | None = None) -> Path:
    """Resolve a run folder or checkpoint folder to a complete checkpoint folder.

    For a run folder: NAME if given, else best/ if present, else latest/; an interrupted swap's
    .NAME.old counts too.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if (path / META).is_file() or (path / WEIGHTS).is_file():
        return path
    names = [name] if name else ["best", "latest"]
    for n in names:
        for candidate in (path / n, path / f".{n}.old"):
            if (candidate / META).is_file():
                return candidate
    raise CheckpointError(
        f"no checkpoint in {path}: expected {' or '.join(str(path / n / META) for n in names)}"
    )


def read_meta(ckpt_dir: str | Path) -> dict:
    meta = read_json(Path(ckpt_dir) / META)
    if "model_config" not in meta or "step" not in meta:
        raise CheckpointError(f"{Path(ckpt_dir) / META}: expected keys 'step' and 'model_config', got {sorted(meta)}")
    return meta


def load_weights(model: torch.nn.Module, ckpt_dir: str | Path, device: str | torch.device = "cpu") -> None:
    """Load model.safetensors into model (strict: every key and shape must match)."""
    f = Path(ckpt_dir) / WEIGHTS
    if not f.is_file():
        raise CheckpointError(f"missing file {f}")
    try:
        missing, unexpected = safetensors.torch.load_model(unwrap(model), str(f), strict=False, device=str(device))
    except Exception as e:  # SafetensorError (truncated file, bad header), shape mismatch, I/O error
        raise CheckpointError(f"cannot load weights from {f}: {e}") from e
    if missing or unexpected:
        raise CheckpointError(f"{f} does not match the model: missing keys {sorted(missing)}, unexpected keys {sorted(unexpected)}")


def load_state(ckpt_dir: str | Path) -> dict:
    """state.pt as saved (optimizers, scaler, rng, sampler, step, train_state)."""
    f = Path(ckpt_dir) / STATE
    if not f.is_file():
        raise CheckpointError(f"missing file {f}")
    try:
        # weights_only=False: state.pt holds numpy RNG and sampler state; load only checkpoints you wrote
        return torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or corrupt pickle/zip
        raise CheckpointError(f"corrupt file {f}: {e}") from e


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    *,
    optimizers: list[torch.optim.Optimizer] = (),
    scaler: torch.amp.GradScaler | None = None,
    sampler=None,
    device: str | torch.device = "cpu",
    name: str | None = None,
    restore_rng: bool = True,
) -> dict:
    """Restore everything save_checkpoint wrote into the given objects; returns the state dict
    (step, train_state, ...). path is a run folder (latest/ unless name is given) or a checkpoint folder."""
    ckpt = find_checkpoint(path, name or "latest")
    meta = read_meta(ckpt)
    config = unwrap(model).config if hasattr(unwrap(model), "config") else None
    if config is not None and config.to_dict() != meta["model_config"]:
        raise CheckpointError(
            f"{ckpt / META}: model config differs from the model being resumed: "
            f"checkpoint {meta['model_config']}, model {config.to_dict()}"
        )
    load_weights(model, ckpt, device)
    state = load_state(ckpt)
    if len(state["optimizers"]) != len(optimizers):
        raise CheckpointError(f"{ckpt / STATE}: has {len(state['optimizers'])} optimizer states, expected {len(optimizers)}")
    for opt, sd in zip(optimizers, state["optimizers"]):
        opt.load_state_dict(sd)
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    if sampler is not None and state["sampler"] is not None:
        sampler.load_state_dict(state["sampler"])
    if restore_rng:
        set_rng_state(state["rng"])
    state["path"] = ckpt
    state["meta"] = meta
    return state


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """(model: GPT in eval mode, config: ModelConfig, tokenizer: Tokenizer) from a run or checkpoint folder.

    A run folder uses best/ if present, else latest/. The tokenizer is the checkpoint's copy, else the run's.
    """
    from nanochat.model import GPT

    ckpt = find_checkpoint(path)
    meta = read_meta(ckpt)
    tok_files = [f for f in (ckpt / TOKENIZER, ckpt.parent / TOKENIZER) if f.is_file()]
    if not tok_files:
        raise CheckpointError(f"missing file {ckpt / TOKENIZER} (and no {ckpt.parent / TOKENIZER} in the run folder)")
    try:
        config = ModelConfig.from_dict(meta["model_config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{ckpt / META}: bad model_config: {e}") from e
    model = GPT(config)
    load_weights(model, ckpt, device)
    model.to(device).eval()
    from nanochat.tokenizer import Tokenizer

    return model, config, Tokenizer.load(tok_files[0])
