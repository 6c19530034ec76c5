"""MBPP: "Mostly Basic Python Problems", from a local JSONL file in MBPP's format or Hugging Face.

Each problem has task_id, text (the task in English), code (a reference solution), test_list
(assert statements) and optionally test_setup_code. The prompt is the task text plus its first
test as a docstring, so the model sees the function name and signature it must write:
    \"\"\"
    Write a function to find the shared elements from the given two lists.
    assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))
    \"\"\"
The completion (cut at the HumanEval stop sequences and at a top-level assert) runs with the
setup code and all asserts of test_list in the sandbox.
Run: python -m nanochat.eval --task mbpp --model model.gguf --data mbpp.jsonl [--limit 50]
Without --data the Hugging Face `mbpp` dataset (test split, 500 problems) is used, which needs the
`datasets` package and network access; a clear error says which is missing.
"""

from __future__ import annotations

import json
from pathlib import Path

from nanochat.eval.codebench import CodeTask
from nanochat.eval.humaneval import STOP_SEQUENCES

STOPS = STOP_SEQUENCES + ["\nassert"]
class MbppUnavailable(RuntimeError):
    """The Hugging Face MBPP dataset cannot be had here (package missing or hub unreachable)."""


REQUIRED_FIELDS = {"task_id": (int, str), "text": str, "code": str, "test_list": list}


def validate(problem, where: str) -> dict:
    if not isinstance(problem, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(problem).__name__}")
    for name, kind in REQUIRED_FIELDS.items():
        if name not in problem:
            raise ValueError(f"{where}: missing field '{name}' (MBPP needs {', '.join(REQUIRED_FIELDS)})")
        if not isinstance(problem[name], kind):
            raise ValueError(f"{where}: field '{name}' should be {getattr(kind, '__name__', 'int or str')}, "
                             f"got {type(problem[name]).__name__}")
    if not problem["test_list"] or not all(isinstance(t, str) for t in problem["test_list"]):
        raise ValueError(f"{where}: field 'test_list' should be a non-empty list of assert strings")
    setup = problem.get("test_setup_code") or ""
    if not isinstance(setup, str):
        raise ValueError(f"{where}: field 'test_setup_code' should be a string, got {type(setup).__name__}")
    return {**problem, "test_setup_code": setup}


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data: no such MBPP file: {path}")
    problems = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None
        problems.append(validate(row, f"{path}:{i}"))
    if not problems:
        raise ValueError(f"{path}: no MBPP problems in the file")
    return problems


def read_hf(split: str = "test") -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise MbppUnavailable("MBPP without --data needs the Hugging Face `datasets` package, which is not installed; "
                           "pass --data FILE.jsonl (MBPP format) or install datasets") from None
    try:
        rows = datasets.load_dataset("mbpp", split=split)
    except Exception as e:  # the hub raises many kinds of errors when it cannot be reached
        raise MbppUnavailable(f"could not load the Hugging Face `mbpp` dataset ({type(e).__name__}: {e}); "
                           "pass --data FILE.jsonl (MBPP format) instead") from None
    return [validate(dict(row), f"hf mbpp[{i}]") for i, row in enumerate(rows)]


def load_problems(path: str | Path | None = None, limit: int = -1) -> list[dict]:
    problems = read_jsonl(path) if path is not None else read_hf()
    return problems if limit < 0 else problems[:limit]


def prompt_of(problem: dict) -> str:
    return f'"""\n{problem["text"].strip()}\n{problem["test_list"][0].strip()}\n"""\n'


def check_program(problem: dict, completion: str) -> str:
    tests = "\n".join(problem["test_list"])
    return f"{problem['test_setup_code']}\n{completion}\n\n{tests}\n"


def to_task(problem: dict) -> CodeTask:
    return CodeTask(task_id=str(problem["task_id"]), prompt=prompt_of(problem), stop=STOPS,
                    build_program=lambda completion: check_program(problem, completion))
