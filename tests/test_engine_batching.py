"""The fast per-token paths of the engine against plain references, and the scheduler's one-pass steps.

Run: .venv/bin/python -m pytest tests/test_engine_batching.py -q

- `top_indices` (block-maxima threshold) == a full stable argsort, ties and all; `draw_index` (blockwise
  inverse CDF) == searchsorted on the full running sum, and never draws a zero-weight token.
- Sampler: penalties on the seen tokens only == the full-vocabulary rule, bit for bit; logprobs ==
  float64 log-softmax; temperature / top-k / top-p draws follow the intended distribution.
- Scheduler: a request that arrives while others decode is prefilled in the same forward passes as
  their decode tokens (one forward per step, a bounded number of prompt tokens per step), with the
  same greedy tokens and logprobs as alone.
"""

from __future__ import annotations

import numpy as np
import pytest

from nanochat.engine import Engine, SamplingParams, Scheduler
from nanochat.engine import scheduler as scheduler_module
from nanochat.engine.sampling import BLOCK, Sampler, draw_index, top_indices
from tests.test_export import exported, held_out_ids


@pytest.mark.parametrize("n", [7, BLOCK * 3, 1000, 5003])
def test_top_indices_equal_a_stable_full_sort(n):
    rng = np.random.default_rng(n)
    for values in (rng.standard_normal(n), rng.integers(0, 6, n).astype(np.float64)):  # the second one is all ties
        for k in (1, 3, 20, n // BLOCK + 5, n // 2, n - 1, n, n + 4):
            want = np.argsort(-values, kind="stable")[:k]
            np.testing.assert_array_equal(top_indices(values, k), want, err_msg=f"n={n} k={k}")


def test_draw_index_equals_the_full_running_sum():
    rng = np.random.default_rng(0)
    for n in (1, 5, BLOCK, 3 * BLOCK + 17, 32000):
        weights = np.exp(rng.standard_normal(n) * 4)
        weights[rng.random(n) < 0.3] = 0.0  # masked tokens must never be drawn
        weights[0] = 0.0
        if not weights.any():
            weights[-1] = 1.0
        cdf = np.cumsum(weights)
        for u in np.concatenate([rng.random(300), [0.0, 1 - 2 ** -53]]):
            target = u * cdf[-1]
            want = min(int(np.searchsorted(cdf, target, side="right")), n - 1)
            got = draw_index(weights, float(u))
            assert weights[got] > 0, (n, u, got)
            if np.min(np.abs(cdf - target)) > 1e-9 * cdf[-1]:  # away from a rounding tie between the two sums
                assert got == want, (n, u)


def full_vocab_penalties(logits: np.ndarray, seen: np.ndarray, counts: np.ndarray, p: SamplingParams) -> np.ndarray:
    """The penalty rules over the whole vocabulary (the engine's previous arithmetic, dtypes included)."""
    out = logits.copy()
    if p.repetition_penalty != 1.0:
        s = out[seen]
        out[seen] = np.where(s > 0, s / p.repetition_penalty, s * p.repetition_penalty)
    if p.presence_penalty or p.frequency_penalty:
        out = out - p.presence_penalty * (counts > 0) - p.frequency_penalty * counts
    return out


def test_penalties_on_seen_tokens_equal_the_full_vocabulary_rule():
    rng = np.random.default_rng(1)
    vocab = 3000
    prompt = [int(t) for t in rng.integers(0, vocab, 40)]
    for kw in (dict(repetition_penalty=1.3), dict(presence_penalty=0.7), dict(frequency_penalty=0.35),
               dict(repetition_penalty=0.8, presence_penalty=-0.5, frequency_penalty=1.1)):
        p = SamplingParams(**kw)
        sampler = Sampler(p, vocab, prompt)
        seen = np.zeros(vocab, dtype=bool)
        seen[prompt] = True
        counts = np.zeros(vocab, dtype=np.float32)
        for step in range(30):
            logits = (rng.standard_normal(vocab) * 3).astype(np.float32)
            want = full_vocab_penalties(logits, seen, counts, p)
            got = sampler.penalize(logits)
            np.testing.assert_array_equal(got, want.astype(got.dtype), err_msg=f"{kw} step {step}")
            assert got.dtype == want.dtype or not counts.any()  # float64 once presence/frequency apply
            token = int(rng.choice(prompt)) if step % 3 else int(rng.integers(0, vocab))  # repeats and new tokens
            sampler.record(token)
            seen[token] = True
            counts[token] += 1


def test_logprobs_equal_float64_log_softmax():
    rng = np.random.default_rng(2)
    logits = (rng.standard_normal(32000) * 4).astype(np.float32)
    logits[[5, 9]] = logits.max() + 1  # a tie at the top: the lower id comes first
    ref = logits.astype(np.float64) - logits.max()
    ref -= np.log(np.exp(ref).sum())
    sampler = Sampler(SamplingParams(), 32000, [])
    value, best = sampler.logprobs(logits, 1234, 6)
    assert value == ref[1234]
    assert [i for i, _ in best] == list(np.argsort(-ref, kind="stable")[:6]) and best[0][0] == 5
    assert [v for _, v in best] == [ref[i] for i, _ in best]
    assert sampler.logprobs(logits, 7, 0) == (ref[7], [])


def test_draws_follow_temperature_top_k_and_top_p():
    vocab, draws = 1000, 4000
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal(vocab) * 2.5).astype(np.float32)

    def expected(temperature, top_k=0, top_p=1.0):
        x = logits.astype(np.float64) / temperature
        order = np.argsort(-x, kind="stable")
        keep = order[:top_k] if top_k else order
        probs = np.exp(x[keep] - x[keep].max())
        probs /= probs.sum()
        if top_p < 1.0:
            n = int(np.searchsorted(np.cumsum(probs), top_p)) + 1
            keep, probs = keep[:n], probs[:n] / probs[:n].sum()
        full = np.zeros(vocab)
        full[keep] = probs
        return full

    for kw in (dict(temperature=1.0), dict(temperature=0.5, top_k=10), dict(temperature=1.5, top_p=0.6)):
        sampler = Sampler(SamplingParams(seed=7, **kw), vocab, [])
        got = np.bincount([sampler.choose(logits) for _ in range(draws)], minlength=vocab) / draws
        want = expected(**kw)
        assert got[want == 0].sum() == 0, f"{kw}: drew a token outside the top-k / nucleus"
        # total variation distance: 4000 draws put it near 0.1 for a spread distribution, far below a wrong one's
        assert 0.5 * np.abs(got - want).sum() < 0.15, kw
    seeded = [Sampler(SamplingParams(seed=11, top_k=50), vocab, []).choose(logits) for _ in range(2)]
    assert seeded[0] == seeded[1]


# ---------------------------------------------------------------------------------------------
# The scheduler's steps


class CountingModel:
    """The engine's model, recording how many sequences and tokens each forward pass carried."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward(self, seqs, all_logits=False):
        self.calls.append([len(tokens) for tokens, _ in seqs])
        return self.model.forward(seqs, all_logits)


def test_new_prompts_join_the_running_decode_step(monkeypatch):
    monkeypatch.setattr(scheduler_module, "PREFILL_TOKENS_PER_STEP", 8)  # a 17-token prompt is read in 3 steps
    engine = Engine.load(exported(mhc_streams=1, sub_norms=False))
    ids = held_out_ids(100)
    first_prompt, late_prompts = ids[:8], [ids[40:57], ids[70:75]]
    params = lambda n: SamplingParams(temperature=0, max_tokens=n, logprobs=2)  # noqa: E731
    alone = [[(ev.token_id, ev.logprob) for ev in engine.generate(p, params(n))]
             for p, n in [(first_prompt, 60)] + [(p, 10) for p in late_prompts]]
    counting = CountingModel(engine.model)
    engine.model = counting
    sched = Scheduler(engine, max_batch=4)
    try:
        first = sched.submit(first_prompt, params(60))
        head = [next(first) for _ in range(3)]  # first is decoding now
        late = [sched.submit(p, params(10)) for p in late_prompts]
        together = [[(ev.token_id, ev.logprob) for ev in head + list(first)]] + [
            [(ev.token_id, ev.logprob) for ev in r] for r in late]
    finally:
        sched.close()
        engine.model = counting.model
    assert [[t for t, _ in s] for s in together] == [[t for t, _ in s] for s in alone]
    for got, want in zip(together, alone):
        np.testing.assert_allclose([lp for _, lp in got], [lp for _, lp in want], rtol=1e-4, atol=1e-4)
    assert len(counting.calls) == sched.steps  # one forward pass per step, prefills included
    # the late prompts were read next to the first sequence's decode token, at most 8 prompt tokens a step
    prefills = [c for c in counting.calls[1:] if any(t > 1 for t in c)]
    assert len(prefills) >= 3 and all(1 in c and sum(t for t in c if t > 1) <= 8 for c in prefills), counting.calls[:8]
