"""The training loop on CPU with a tiny model on a few stdlib files: gradient accumulation equals the
big batch, an interrupted run resumed equals an uninterrupted one, fp16 loss scaling skips and counts
an overflowed step, DDP over gloo keeps 2 ranks identical, bad input exits 2 without a traceback.

    .venv/bin/python -m pytest tests/test_train.py -q
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from nanochat import train as train_mod
from nanochat.config import ModelConfig
from nanochat.model import GPT
from nanochat.optim import build_optimizers

REPO = Path(__file__).resolve().parents[1]
TINY_FLAGS = ["--vocab-size", "320", "--dim", "64", "--n-layers", "2", "--n-heads", "2", "--n-kv-heads", "1",
              "--group-size", "64", "--max-seq-len", "64", "--seq-len", "32", "--batch-size", "4",
              "--eval-tokens", "512", "--threads", "1", "--no-progress", "--log-interval", "2"]
TINY = ModelConfig(vocab_size=320, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, group_size=64, max_seq_len=64)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and the CI cores are shared); restore the count after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A few KB of real code (stdlib json package sources) and a private token cache."""
    root = tmp_path_factory.mktemp("corpus")
    stdlib_json = Path(sysconfig.get_paths()["stdlib"]) / "json"
    for name in ("__init__.py", "decoder.py", "encoder.py", "scanner.py"):
        shutil.copyfile(stdlib_json / name, root / name)
    old = os.environ.get("NANOCHAT_CACHE_DIR")
    os.environ["NANOCHAT_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield root
    if old is None:
        os.environ.pop("NANOCHAT_CACHE_DIR")
    else:
        os.environ["NANOCHAT_CACHE_DIR"] = old


def run_args(corpus, out, *extra):
    return train_mod.build_parser().parse_args(["--data", str(corpus), "--out", str(out), *TINY_FLAGS, *extra])


def test_grad_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    model = GPT(TINY)
    x = torch.randint(0, TINY.vocab_size, (8, 32))
    y = torch.randint(0, TINY.vocab_size, (8, 32))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss_big = train_mod.accumulate_gradients(model, [(x, y)], train_mod.autocast_context("cpu", "fp32"), scaler)
    big = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    micro = [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)]
    loss_acc = train_mod.accumulate_gradients(model, micro, train_mod.autocast_context("cpu", "fp32"), scaler)
    assert loss_acc == pytest.approx(loss_big, rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, big[name], rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")
    # without dividing by the accumulation count the gradient would be 4x: the check above can fail
    assert not torch.allclose(4 * big["tok_emb.weight"], big["tok_emb.weight"])


def test_resumed_run_matches_uninterrupted_run(corpus, tmp_path):
    flags = ("--steps", "10", "--checkpoint-interval", "5", "--eval-interval", "5")
    full = train_mod.train(run_args(corpus, tmp_path / "full", *flags))
    first = train_mod.train(run_args(corpus, tmp_path / "split", *flags), stop_at=5)
    assert first["step"] == 5 and json.loads((tmp_path / "split/latest/meta.json").read_text())["step"] == 5
    rest = train_mod.train(run_args(corpus, tmp_path / "split", *flags, "--resume"))
    assert rest["step"] == 10 and len(rest["losses"]) == 5
    assert first["losses"] + rest["losses"] == pytest.approx(full["losses"], abs=1e-6)
    assert rest["val_losses"][-1][1] == pytest.approx(full["val_losses"][-1][1], abs=1e-6)
    for (name, a), b in zip(full["model"].state_dict().items(), rest["model"].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert full["losses"][-1] < full["losses"][0]  # it learns

    run = tmp_path / "split"
    assert {"config.json", "tokenizer.json", "metrics.jsonl", "loss.png", "latest", "best"} <= {p.name for p in run.iterdir()}
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert steps == [2, 4, 6, 8, 10]  # the resumed log continues without duplicates
    train_rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[-3])
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "loss_scale", "peak_mem_mb", "skipped_steps"):
        assert key in train_rec


def test_fp16_overflow_skips_and_counts_then_training_continues():
    torch.manual_seed(0)
    model = GPT(TINY)
    opts = build_optimizers(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    autocast = train_mod.autocast_context("cpu", "fp16")
    batch = [(torch.randint(0, 320, (2, 16)), torch.randint(0, 320, (2, 16)))]

    train_mod.accumulate_gradients(model, batch, autocast, scaler)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    next(model.parameters()).grad[0, 0] = float("inf")  # an fp16 overflow in one parameter
    grad_norm, skipped = train_mod.optimizer_step(model, opts, scaler, grad_clip=1.0)
    assert skipped and not torch.isfinite(torch.tensor(grad_norm))
    assert scaler.get_scale() == 2.0**11  # dynamic scaling halved the scale
    for n, p in model.named_parameters():  # neither Muon nor AdamW moved anything
        assert torch.equal(p, before[n]), n

    loss = train_mod.accumulate_gradients(model, batch, autocast, scaler)
    grad_norm, skipped = train_mod.optimizer_step(model, opts, scaler, grad_clip=1.0)
    assert not skipped and loss == loss and grad_norm > 0
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_bf16_cpu_run_end_to_end(corpus, tmp_path):
    # what --precision auto picks on CPUs with bf16 matmul (Zen 4, AMX): it must train, and export sees fp32 weights
    summary = train_mod.train(run_args(corpus, tmp_path / "bf16", "--steps", "6", "--precision", "bf16"))
    assert summary["precision"] == "bf16" and summary["skipped_steps"] == 0
    assert all(l == l for l in summary["losses"]) and summary["losses"][-1] < summary["losses"][0]
    assert all(p.dtype == torch.float32 for p in summary["model"].parameters())


def test_fp16_run_end_to_end(corpus, tmp_path):
    summary = train_mod.train(run_args(corpus, tmp_path / "fp16", "--steps", "4", "--precision", "fp16"))
    assert summary["precision"] == "fp16" and all(l == l for l in summary["losses"])
    rec = [json.loads(line) for line in (tmp_path / "fp16/metrics.jsonl").read_text().splitlines()]
    scales = [r["loss_scale"] for r in rec if r["kind"] == "train"]
    assert scales and all(s >= 1 for s in scales)  # a real dynamic scale, not the disabled scaler's 1.0
    assert summary["skipped_steps"] == rec[-1]["skipped_steps"]


def _ddp_worker(rank, corpus, out, port):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    args = run_args(corpus, out, "--steps", "3", "--eval-interval", "3", "--device", "cpu")
    try:
        summary = train_mod.train(args)
        torch.save(summary["model"].state_dict(), Path(out) / f"rank{rank}.pt")
    finally:
        train_mod.cleanup_distributed()


def test_ddp_two_cpu_processes_end_identical(corpus, tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(str(corpus), str(tmp_path / "ddp"), port), nprocs=2, join=True)
    w0, w1 = (torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in (0, 1))
    initial = GPT(TINY).state_dict()
    for name in w0:
        assert torch.equal(w0[name], w1[name]), name
    assert any(not torch.equal(w0[n], initial[n]) for n in w0)  # they trained, not just stayed at init
    assert (tmp_path / "ddp" / "latest" / "meta.json").is_file()  # rank 0 wrote the checkpoint


@pytest.mark.parametrize("argv, message", [
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--data", "/no/such/corpus"], "/no/such/corpus"),
    (["--eval-interval", "0"], "--eval-interval"),
    (["--seq-len", "4096"], "--seq-len"),
    (["--dim", "192"], "group_size"),
    (["--resume", "--out", "/tmp/nanochat-no-such-run"], "--resume"),
])
def test_bad_input_is_a_clear_error_with_exit_code_2(argv, message, capsys):
    assert train_mod.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_flag_values_exit_2_from_the_command_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_mod.build_parser().parse_args(["--precision", "fp8"])
    assert exit_info.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'python'}:{REPO}"}
    r = subprocess.run([sys.executable, "-m", "nanochat.train", "--steps", "0"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "--steps: expected a positive integer, got 0" in r.stderr and "Traceback" not in r.stderr


def test_auto_sized_curriculum_run(corpus, tmp_path):
    """No --steps: a throughput probe sizes the run to --time-budget (at least 10 steps; a budget
    already spent also stops re-planning, so the count is exact here); the
    curriculum grows windows with tokens per step held steady, and the chosen sizes are saved."""
    args = run_args(corpus, tmp_path / "auto", "--time-budget", "0.001", "--curriculum", "--curriculum-min-len", "8",
                    "--log-interval", "1")
    summary = train_mod.train(args)
    saved = json.loads((tmp_path / "auto/config.json").read_text())["train"]
    assert summary["step"] == saved["steps"] == 10 and saved["curriculum_steps"] == 3 and saved["eval_interval"] == 1
    rec = [json.loads(line) for line in (tmp_path / "auto/metrics.jsonl").read_text().splitlines()]
    lens = [r["seq_len"] for r in rec if r["kind"] == "train"]
    assert lens[0] == 8 and lens == sorted(lens) and lens[-1] == 32
    plan = [train_mod.curriculum_plan(s, args) for s in range(4)]
    assert all(0 <= 4 * 32 - b * t < t for b, t, _ in plan)  # tokens per step steady, up to one window
    assert plan[0][2] < plan[2][2] <= plan[3][2] == 1.0  # data progress: easy (short documents) first


def test_replan_only_moves_the_total_during_the_stable_phase():
    import argparse
    from nanochat.distributed import DistInfo
    args = argparse.Namespace(decay_frac=0.2, time_budget=100.0, steps=50)
    # 1 s per step so far and 20 s spent: the 80 s left fit 80 more steps
    assert train_mod.replan_steps(args, 10, 10, 10.0, 20.0, DistInfo(), "cpu") == 90
    # 2 s per step: 40 more steps, exactly the plan: keep it
    assert train_mod.replan_steps(args, 10, 10, 20.0, 20.0, DistInfo(), "cpu") is None
    # slower than planned: shrink while the new total's decay is still ahead
    args.time_budget = 80.0
    assert train_mod.replan_steps(args, 10, 10, 20.0, 20.0, DistInfo(), "cpu") == 40
    # inside the decay, or with the budget spent: never
    assert train_mod.replan_steps(args, 45, 45, 45.0, 50.0, DistInfo(), "cpu") is None
    assert train_mod.replan_steps(args, 10, 10, 10.0, 120.0, DistInfo(), "cpu") is None


def test_validation_bpb_equals_the_eval_tasks_bpb(corpus, tmp_path):
    """The trainer's bits per byte, on its own val windows, equals nanochat.eval's count of the same
    windows: exact bytes of the scored text targets, specials left out."""
    from nanochat import data as data_mod
    from nanochat.eval import bpb as eval_bpb

    prepared = data_mod.prepare_data(str(corpus), tmp_path / "run", TINY.vocab_size, seed=1)
    torch.manual_seed(0)
    model = GPT(TINY)
    lengths = torch.from_numpy(prepared.tokenizer.byte_lengths())
    batches = list(prepared.val_batches(4, 32))
    batches[0][1][0, 5] = prepared.tokenizer.bos_id  # a document boundary: a special target, no bytes
    val_loss, bpb = train_mod.evaluate(model, batches, "cpu", torch.autocast("cpu", enabled=False),
                                       train_mod.DistInfo(), lengths)

    # the eval task's way: score only text targets (specials -> -1), divide by their exact bytes
    text_batches = [(x, torch.where(lengths[y.clamp(min=0)].gt(0) & y.ne(-1), y, -1)) for x, y in batches]
    n_bytes = sum(int(lengths[y[y != -1]].sum()) for _, y in text_batches)
    expected = eval_bpb.evaluate_bpb(model, text_batches, n_bytes)
    all_targets = eval_bpb.evaluate_bpb(model, batches, 1)
    assert abs(val_loss - all_targets.loss) < 1e-5
    assert abs(bpb - expected.bpb) < 1e-6 * expected.bpb
