"""Evaluation: pass@k, HumanEval/MBPP scoring in the sandbox, bits per byte and the CLI on a real tiny model.

The tiny model (module fixture) is a 2-layer ternary GPT trained for a few seconds until it has
memorised one pangram, saved as a run folder (PyTorch checkpoint) and exported to GGUF (CPU engine).
So greedy generation is checkable (a prefix of the pangram must continue it) and both model paths
are compared on the same weights: their bits per byte must agree within 1%.
Run: .venv/bin/python -m pytest tests/test_eval.py -q   (about 30 s on an idle 2-core machine,
2-3 min when other jobs load it)
"""

import json
import math
from fractions import Fraction

import numpy as np
import pytest

from nanochat.eval import bpb, humaneval, mbpp
from nanochat.eval.__main__ import main as eval_main
from nanochat.eval.codebench import run_code_tasks
from nanochat.eval.passk import mean_pass_at_k, pass_at_k
from nanochat.eval.source import truncate_at_stops

PANGRAM = "the quick brown fox jumps over the lazy dog. "
OTHER_TEXT = "hello world, how are you? i am fine, thank you. naïve café — 10 € "
TRAIN_STEPS = 40
TRAIN_LEN = 64  # tokens of the pangram stream the model memorises


# ---------------------------------------------------------------------------------------------
# pass@k

def exact_pass_at_k(n, c, k):
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def test_pass_at_k_hand_computed():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4, abs=1e-12)
    # 1 - C(7,5)/C(10,5) = 1 - 21/252 = 11/12
    assert pass_at_k(10, 3, 5) == pytest.approx(11 / 12, abs=1e-12)
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(10, 8, 5) == 1.0  # n - c < k: every draw has a correct one
    assert mean_pass_at_k([(5, 2), (10, 3)], 1) == pytest.approx((0.4 + 0.3) / 2)


def test_pass_at_k_is_stable_for_large_n():
    for n, c, k in [(200, 1, 100), (1000, 10, 100), (1000, 500, 1), (500, 3, 250)]:
        assert pass_at_k(n, c, k) == pytest.approx(float(exact_pass_at_k(n, c, k)), rel=1e-9)


def test_pass_at_k_rejects_bad_input():
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError, match="1 <= k <= n=5"):
        pass_at_k(5, 2, 6)


# ---------------------------------------------------------------------------------------------
# HumanEval and MBPP scoring (no model: completions given directly)

def test_truncation_at_stop_sequences():
    text = "    return x + 1\n\n\ndef helper():\n    pass\n"
    assert truncate_at_stops(text, humaneval.STOP_SEQUENCES) == "    return x + 1\n\n"
    assert truncate_at_stops("    return 1\n# comment\nprint(2)", humaneval.STOP_SEQUENCES) == "    return 1"
    assert truncate_at_stops("    return 1\nif __name__ == '__main__':\n", humaneval.STOP_SEQUENCES) == "    return 1"
    assert truncate_at_stops("    return 1\n", humaneval.STOP_SEQUENCES) == "    return 1\n"


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail():
    problems = humaneval.load_problems()
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"
    subset = {p["task_id"]: p for p in problems[:6]}
    tasks = [humaneval.to_task(p) for p in subset.values()]

    def canonical(prompt, max_tokens, temperature, stop, seed):
        return next(p["canonical_solution"] for p in subset.values() if p["prompt"] == prompt)

    rows, summary = run_code_tasks(canonical, tasks, timeout=10)
    assert summary["pass@1"] == 1.0, rows
    assert all(r["results"][0]["status"] == "passed" for r in rows)

    def wrong(prompt, max_tokens, temperature, stop, seed):
        return "    return None\n"

    rows, summary = run_code_tasks(wrong, tasks, timeout=10)
    assert summary["pass@1"] == 0.0
    assert summary["statuses"] == {"failed": 6}


def test_pass_at_k_from_samples_of_mixed_quality(tmp_path):
    problem = humaneval.load_problems(limit=1)[0]
    answers = [problem["canonical_solution"], "    return None\n", "    while True:\n        pass\n"]

    def sample(prompt, max_tokens, temperature, stop, seed):
        return answers[seed % 3]

    jsonl = tmp_path / "rows.jsonl"
    rows, summary = run_code_tasks(sample, [humaneval.to_task(problem)], samples=3, temperature=0.8,
                                   timeout=3, jsonl_path=jsonl)
    assert [r["status"] for r in rows[0]["results"]] == ["passed", "failed", "timeout"]
    assert summary["pass@1"] == pytest.approx(1 / 3)
    assert json.loads(jsonl.read_text().splitlines()[0])["c"] == 1
    with pytest.raises(ValueError, match="temperature"):
        run_code_tasks(sample, [humaneval.to_task(problem)], samples=3, temperature=0.0)


MBPP_ROWS = [
    {"task_id": 2, "text": "Write a function to find the shared elements from the given two lists.",
     "code": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))",
     "test_list": ["assert set(similar_elements((3, 4, 5, 6), (5, 7, 4, 10))) == set((4, 5))",
                   "assert set(similar_elements((1, 2, 3, 4), (5, 4, 3, 7))) == set((3, 4))"],
     "test_setup_code": ""},
    {"task_id": 3, "text": "Write a python function to identify non-prime numbers.",
     "code": "def is_not_prime(n):\n    return n < 2 or any(n % i == 0 for i in range(2, int(n ** 0.5) + 1))",
     "test_list": ["assert is_not_prime(2) == False", "assert is_not_prime(10) == True",
                   "assert is_not_prime(35) == True"],
     "test_setup_code": "import math"},
]


def write_mbpp(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_mbpp_file_reference_solutions_pass_and_wrong_ones_fail(tmp_path):
    problems = mbpp.load_problems(write_mbpp(tmp_path / "mbpp.jsonl", MBPP_ROWS))
    assert [p["task_id"] for p in problems] == [2, 3]
    prompt = mbpp.prompt_of(problems[0])
    assert MBPP_ROWS[0]["text"] in prompt and MBPP_ROWS[0]["test_list"][0] in prompt
    tasks = [mbpp.to_task(p) for p in problems]
    by_prompt = {mbpp.prompt_of(p): p["code"] for p in problems}
    _, summary = run_code_tasks(lambda prompt, *a: by_prompt[prompt], tasks)
    assert summary["pass@1"] == 1.0
    # passes the first assert (the one in the prompt) but not the others: all of test_list must run
    half_right = "def similar_elements(a, b):\n    return (4, 5)\ndef is_not_prime(n):\n    return n == 10"
    _, summary = run_code_tasks(lambda *a: half_right, tasks)
    assert summary["pass@1"] == 0.0


def test_mbpp_bad_file_names_the_problem(tmp_path):
    bad = dict(MBPP_ROWS[0])
    del bad["test_list"]
    path = write_mbpp(tmp_path / "bad.jsonl", [MBPP_ROWS[1], bad])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing field 'test_list'"):
        mbpp.load_problems(path)
    path.write_text('{"task_id": 1, "text": "x", "code": "", "test_list": "assert True"}\n')
    with pytest.raises(ValueError, match="field 'test_list' should be list"):
        mbpp.load_problems(path)
    with pytest.raises(FileNotFoundError, match="no such MBPP file"):
        mbpp.load_problems(tmp_path / "missing.jsonl")


def test_mbpp_without_data_or_datasets_says_what_is_missing(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(mbpp.MbppUnavailable, match="`datasets` package, which is not installed.*--data"):
        mbpp.load_problems(None)


# ---------------------------------------------------------------------------------------------
# A real tiny model: PyTorch checkpoint + GGUF export of the same weights

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import torch

    from nanochat.checkpoint import save_checkpoint
    from nanochat.config import ModelConfig
    from nanochat.data import prepare_data
    from nanochat.export import export_gguf
    from nanochat.model import GPT

    root = tmp_path_factory.mktemp("eval_tiny")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i:02d}.txt").write_text(PANGRAM * 6 if i % 2 == 0 else OTHER_TEXT * 3)
    run = root / "run"
    # the run folder as training makes it: tokenizer.json, data.json and the held-out split
    tokenizer = prepare_data(str(corpus), run, vocab_size=320, cache_dir=root / "cache").tokenizer
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_mult=2.0,
                      max_seq_len=128, group_size=64, mhc_streams=2)
    model = GPT(cfg)
    ids = [tokenizer.bos_id] + tokenizer.encode(PANGRAM * 10)
    data = torch.tensor(ids[: TRAIN_LEN + 1]).unsqueeze(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(TRAIN_STEPS):
        _, loss = model(data[:, :-1], data[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    save_checkpoint(run, "latest", model, cfg, step=TRAIN_STEPS, tokenizer_path=run / "tokenizer.json")
    (root / "gguf").mkdir()
    gguf = export_gguf(model, cfg, tokenizer, root / "gguf" / "tiny.gguf", name="tiny")
    text = root / "text.txt"
    text.write_text((PANGRAM * 3 + OTHER_TEXT) * 12)
    return {"run": run, "gguf": gguf, "text": text, "tokenizer": tokenizer, "root": root}


def test_bpb_of_pytorch_and_gguf_agree(tiny):
    args = ["--task", "bpb", "--data", str(tiny["text"]), "--seq-len", "64", "--eval-tokens", "-1"]
    assert eval_main(args + ["--checkpoint", str(tiny["run"])]) == 0
    assert eval_main(args + ["--model", str(tiny["gguf"])]) == 0
    torch_result = json.loads((tiny["run"] / "eval_bpb.json").read_text())
    engine_result = json.loads((tiny["gguf"].parent / "eval_bpb.json").read_text())
    assert torch_result["backend"] == "pytorch" and engine_result["backend"] == "gguf-engine"
    assert torch_result["tokens"] == engine_result["tokens"] > 500
    assert torch_result["bytes"] == engine_result["bytes"]
    assert abs(torch_result["bpb"] - engine_result["bpb"]) / torch_result["bpb"] < 0.01, (torch_result, engine_result)
    assert torch_result["bpb"] == pytest.approx(
        torch_result["loss"] * torch_result["tokens"] / (math.log(2) * torch_result["bytes"]))
    assert torch_result["perplexity"] == pytest.approx(math.exp(torch_result["loss"]))


def test_bpb_on_the_held_out_split_of_the_run(tiny, tmp_path):
    from nanochat.data import val_tokens

    assert eval_main(["--task", "bpb", "--checkpoint", str(tiny["run"]), "--seq-len", "4",
                      "--out-dir", str(tmp_path / "torch")]) == 0
    assert eval_main(["--task", "bpb", "--model", str(tiny["gguf"]), "--run", str(tiny["run"]), "--seq-len", "4",
                      "--out-dir", str(tmp_path / "engine")]) == 0
    torch_result = json.loads((tmp_path / "torch" / "eval_bpb.json").read_text())
    engine_result = json.loads((tmp_path / "engine" / "eval_bpb.json").read_text())
    assert "held-out" in torch_result["data"]
    n_val = len(val_tokens(tiny["run"]))
    assert torch_result["windows"] == (n_val - 1) // 4 >= 2 and torch_result["tokens"] > 0
    assert torch_result["bytes"] == engine_result["bytes"]
    assert abs(torch_result["bpb"] - engine_result["bpb"]) / torch_result["bpb"] < 0.01, (torch_result, engine_result)


def test_bpb_is_low_on_the_memorised_text(tiny):
    from nanochat.eval.source import load_source

    source = load_source(None, str(tiny["gguf"]))
    memorised = bpb.evaluate_windows(source, bpb.make_windows(bpb.tokens_of_texts([PANGRAM * 6], source.tokenizer), 64))
    unseen = bpb.evaluate_windows(source, bpb.make_windows(bpb.tokens_of_texts([OTHER_TEXT * 3], source.tokenizer), 64))
    assert memorised.loss < 1.0 < unseen.loss
    assert memorised.bpb < 0.25 * unseen.bpb


def test_bpb_counts_the_utf8_bytes_of_the_scored_text(tiny):
    tokenizer = tiny["tokenizer"]
    docs = [OTHER_TEXT, PANGRAM]
    tokens = bpb.tokens_of_texts(docs, tokenizer)
    windows = bpb.make_windows(tokens, seq_len=512)
    assert windows.shape == (1, len(tokens))  # shorter than one window: one window of everything
    lengths = bpb.byte_lengths(tokenizer)
    # every token but the leading <|bos|> is a target; the inner <|bos|> counts no bytes
    assert int(lengths[windows[:, 1:]].sum()) == sum(len(d.encode("utf-8")) for d in docs)
    assert int(bpb.scored_mask(windows, lengths).sum()) == len(tokens) - 2
    windows = bpb.make_windows(np.arange(1000), seq_len=100, max_tokens=450)
    assert windows.shape == (4, 101) and windows[1, 0] == 100 and windows[1, -1] == 200


def test_frozen_ternary_weights_give_identical_logits(tiny):
    import torch

    from nanochat.checkpoint import load_model
    from nanochat.eval.source import freeze_ternary_weights

    model, cfg, _ = load_model(tiny["run"])
    x = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x)[0]
        freeze_ternary_weights(model)
        after = model(x)[0]
    assert torch.equal(before, after)


def test_greedy_generation_continues_the_memorised_text_on_both_paths(tiny):
    from nanochat.eval.source import load_source

    for source in (load_source(str(tiny["run"]), None), load_source(None, str(tiny["gguf"]))):
        completion = source.complete("the quick brown", 6, 0.0, [], 0)
        assert completion.startswith(" fox jumps"), (type(source).__name__, completion)
        cut = source.complete("the quick brown", 8, 0.0, ["lazy"], 0)
        assert cut.startswith(" fox") and "lazy" not in cut


def test_humaneval_mbpp_and_samples_cli_on_the_engine(tiny, tmp_path):
    gguf = str(tiny["gguf"])
    assert eval_main(["--task", "humaneval", "--model", gguf, "--limit", "2", "--max-tokens", "8",
                      "--out-dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "eval_humaneval.json").read_text())
    assert summary["problems"] == 2 and summary["pass@1"] == 0.0 and summary["sandbox"]["python_guard"]
    rows = [json.loads(line) for line in (tmp_path / "eval_humaneval.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in rows] == ["HumanEval/0", "HumanEval/1"]
    for row in rows:
        assert not any(s in row["completions"][0] for s in humaneval.STOP_SEQUENCES)
        assert row["results"][0]["status"] in ("failed", "timeout", "error")

    data = write_mbpp(tmp_path / "mbpp.jsonl", MBPP_ROWS)
    assert eval_main(["--task", "mbpp", "--model", gguf, "--data", str(data), "--max-tokens", "8",
                      "--out-dir", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "eval_mbpp.json").read_text())["problems"] == 2

    assert eval_main(["--task", "samples", "--model", gguf, "--max-tokens", "8", "--out-dir", str(tmp_path)]) == 0
    report = (tmp_path / "samples.md").read_text()
    from nanochat.eval.samples import PROMPTS
    assert report.count("\n## ") == len(PROMPTS) >= 8
    assert all(prompt in report for _, prompt, _ in PROMPTS)


def test_cli_errors_name_the_problem(tiny, tmp_path, capsys):
    assert eval_main(["--task", "bpb", "--model", str(tmp_path / "missing.gguf"), "--data", str(tiny["text"])]) == 2
    assert "no such GGUF file" in capsys.readouterr().err
    assert eval_main(["--task", "bpb", "--model", str(tiny["gguf"]), "--checkpoint", str(tiny["run"])]) == 2
    assert "exactly one model source" in capsys.readouterr().err
    assert eval_main(["--task", "bpb", "--model", str(tiny["gguf"])]) == 2
    assert "--data" in capsys.readouterr().err
    assert eval_main(["--task", "humaneval", "--model", str(tiny["gguf"]), "--samples", "4",
                      "--temperature", "0", "--limit", "1"]) == 2
    assert "temperature" in capsys.readouterr().err
