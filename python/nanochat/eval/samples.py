"""A fixed set of prompts (code and prose) completed by the model into a Markdown report.

The report (`samples.md` next to the model) lets a person see what the model actually does, which
no single number shows. Completions are greedy (temperature 0) unless --temperature is given, so
two runs of the same model give the same report.
Run: python -m nanochat.eval --task samples --model model.gguf
"""

from __future__ import annotations

import time
from pathlib import Path

from tqdm import tqdm

# (title, prompt, stop strings): code prompts stop at the next top-level definition.
PROMPTS = [
    ("Python: a function from its docstring",
     'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n', ["\ndef ", "\nclass "]),
    ("Python: list comprehension",
     "def squares_of_evens(numbers):\n    # keep the even numbers and square them\n", ["\ndef ", "\nclass "]),
    ("Python: a class",
     "class Stack:\n    def __init__(self):\n", ["\nclass ", "\nif __name__"]),
    ("Python: imports and a main block",
     "import os\nimport sys\n\n\ndef main():\n", ["\nif __name__"]),
    ("Python: reading a file",
     "def count_lines(path):\n", ["\ndef ", "\nclass "]),
    ("Prose: a story opening", "Once upon a time, in a small village by the sea,", []),
    ("Prose: an explanation", "The reason the sky is blue is", []),
    ("Prose: a list", "Three things every programmer should know:\n1.", []),
]


def generate_samples(complete, max_tokens: int = 96, temperature: float = 0.0, seed: int = 0) -> list[dict]:
    rows = []
    for title, prompt, stop in tqdm(PROMPTS, desc="samples", unit="prompt"):
        start = time.perf_counter()
        completion = complete(prompt, max_tokens, temperature, stop, seed)
        rows.append({"title": title, "prompt": prompt, "completion": completion,
                     "seconds": round(time.perf_counter() - start, 3)})
    return rows


def fence(text: str) -> str:
    """A code fence longer than any run of backticks inside the text."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


def write_report(rows: list[dict], path: str | Path, model_name: str, settings: str) -> Path:
    """samples.md: each prompt with the model's continuation after a ▌ marker."""
    lines = [f"# Samples from {model_name}", "", f"{settings}. Each block is the prompt followed by the "
             "model's continuation; the continuation starts after the `▌` marker.", ""]
    for row in rows:
        text = f"{row['prompt']}▌{row['completion']}"
        f = fence(text)
        lines += [f"## {row['title']}", "", f"{f}text", text, f, "",
                  f"_{len(row['completion'])} characters in {row['seconds']} s_", ""]
    path = Path(path)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
