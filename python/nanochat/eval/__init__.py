"""Evaluation: bits per byte, HumanEval / MBPP pass@k in a sandbox, and sample reports.

Run it as `python -m nanochat.eval --task bpb|humaneval|mbpp|samples` (see __main__.py).
"""
