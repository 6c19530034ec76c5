"""Evaluation: bits per byte, HumanEval / MBPP pass@k in a sandbox, and sample reports.

Run it as `python -m nanochat.eval --task bpb|humaneval|mbpp|samples` (see __main__.py).
Files: source.py (a PyTorch checkpoint or a GGUF engine behind one interface), bpb.py (loss,
perplexity, bits per byte; `evaluate_bpb` for the trainer), sandbox.py (running generated code),
passk.py (the unbiased pass@k), codebench.py (generate -> execute -> score), humaneval.py,
mbpp.py, samples.py (the Markdown report).
"""
