"""The CPU engine against the PyTorch model, and its own invariants.

Run: .venv/bin/python -m pytest tests/test_engine.py -q

- export -> engine exactness: teacher-forced logits on held-out text vs the PyTorch quantized forward
  (top-1 agreement >= 99%, mean KL < 0.01), for plain residual, mHC 2 with sub_norms, mHC 4 tied.
- KV-cache decoding == full recompute; batched decoding == one sequence at a time; the scheduler.
- Loading: truncated files and flipped bytes give ModelFileError naming the file (and the tensor);
  the --mhc override and its mismatch errors.
- Sampling: seeded reproducibility, top-k / top-p masks, penalties, stop strings never emitted,
  UTF-8 characters split across tokens streamed whole.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from nanochat import gguf_format as fmt
from nanochat.engine import Engine, ModelFileError, QueueFull, SamplingParams, Scheduler
from nanochat.engine.gguf_file import GGUFFile
from nanochat.engine.sampling import Sampler, TextStream, top_p_filter
from nanochat.mhc_file import read_mhc, write_mhc
from tests.test_export import exported, held_out_ids, small_model

VARIANTS = {  # name -> small_model / exported arguments
    "plain": dict(mhc_streams=1, sub_norms=False),
    "mhc2_subnorms": dict(mhc_streams=2, sub_norms=True),
    "mhc4_tied": dict(mhc_streams=4, sub_norms=False, tie_embeddings=True),
}


def engine_for(**kw) -> Engine:
    return Engine.load(exported(**kw))


def kl_and_agreement(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    lp = torch.log_softmax(torch.tensor(ref, dtype=torch.float64), -1)
    lq = torch.log_softmax(torch.tensor(got, dtype=torch.float64), -1)
    kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
    return kl, float((ref.argmax(-1) == got.argmax(-1)).mean())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_engine_logits_match_pytorch_quantized_forward(variant):
    kw = VARIANTS[variant]
    model, cfg, _ = small_model(**kw)
    ids = held_out_ids(200)
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0][0].numpy()
    got = engine_for(**kw).logits(ids)
    assert got.shape == ref.shape == (len(ids), cfg.vocab_size)
    kl, agree = kl_and_agreement(ref, got)
    assert agree >= 0.99, f"top-1 agreement {agree:.3f}"
    assert kl < 0.01, f"mean KL {kl:.5f}"


def test_tq1_0_file_gives_the_same_engine():
    ids = held_out_ids(50)
    np.testing.assert_array_equal(Engine.load(exported(ternary="tq1_0")).logits(ids), engine_for().logits(ids))
    assert exported(ternary="tq1_0").stat().st_size < exported().stat().st_size


def test_kv_cache_decode_equals_full_recompute():
    engine = engine_for()
    ids = held_out_ids(60)
    full = engine.logits(ids)
    cache = engine.model.new_cache(len(ids))
    rows = [engine.model.forward([(ids[:40], cache)], all_logits=True)]
    rows += [engine.model.forward([(ids[t:t + 1], cache)]) for t in range(40, 50)]
    rows.append(engine.model.forward([(ids[50:], cache)], all_logits=True))  # a second prefill chunk
    np.testing.assert_allclose(np.concatenate(rows), full, rtol=1e-4, atol=1e-4)


def test_batched_decoding_equals_single_sequences():
    engine = engine_for()
    ids = held_out_ids(120)
    prompts = [ids[:7], ids[30:61], ids[80:83]]
    singles = [[ev.token_id for ev in engine.generate(p, SamplingParams(temperature=0, max_tokens=12))]
               for p in prompts]
    # one forward over three caches at different positions == three separate forwards
    caches = [engine.model.new_cache(64) for _ in prompts]
    together = engine.model.forward(list(zip(prompts, caches)))
    apart = np.concatenate([engine.model.forward([(p, engine.model.new_cache(64))]) for p in prompts])
    np.testing.assert_allclose(together, apart, rtol=1e-4, atol=1e-4)
    # the scheduler decodes them as one batch and gives the same greedy tokens
    sched = Scheduler(engine, max_batch=4)
    try:
        reqs = [sched.submit(p, SamplingParams(temperature=0, max_tokens=12)) for p in prompts]
        batched = [[ev.token_id for ev in r] for r in reqs]
    finally:
        sched.close()
    assert batched == singles
    assert sched.steps < sum(len(s) for s in singles), "the scheduler must batch decode steps"


def test_scheduler_queue_full_cancel_and_stats():
    engine = engine_for(mhc_streams=1, sub_norms=False)
    forward = engine.model.forward

    def slow_forward(*args, **kwargs):  # the real forward, 5 ms slower: the tiny model would finish
        time.sleep(0.005)                # 200 tokens before the test could look at it
        return forward(*args, **kwargs)

    engine.model.forward = slow_forward
    ids = held_out_ids(20)
    sched = Scheduler(engine, max_batch=1, max_queue=2)
    try:
        first = sched.submit(ids, SamplingParams(temperature=0, max_tokens=200))
        next(first)  # first is active: the one batch slot is taken
        waiting = [sched.submit(ids, SamplingParams(max_tokens=5)) for _ in range(2)]
        with pytest.raises(QueueFull):
            sched.submit(ids, SamplingParams(max_tokens=5))
        assert sched.stats()["queue_depth"] == 2 and sched.stats()["active"] == 1
        waiting[1].cancel()  # a cancelled waiting request ends at once, without waiting for a slot
        assert list(waiting[1]) == [] and sched.stats()["queue_depth"] <= 1
        first.cancel()
        assert len(list(first)) < 200
        for r in waiting[:1]:
            events = list(r)
            assert events[-1].finish_reason in ("length", "stop") and len(events) <= 5
        with pytest.raises(ValueError, match="exceed the model's context"):
            sched.submit(ids * 100, SamplingParams())
    finally:
        sched.close()
        engine.model.forward = forward
    assert sched.stats()["active"] == 0


def test_scheduler_is_thread_safe():
    engine = engine_for(mhc_streams=1, sub_norms=False)
    ids = held_out_ids(50)
    want = [ev.token_id for ev in engine.generate(ids[:9], SamplingParams(temperature=0, max_tokens=6))]
    sched = Scheduler(engine, max_batch=3, max_queue=32)
    results, errors = [], []

    def client():
        try:
            results.append([ev.token_id for ev in sched.submit(ids[:9], SamplingParams(temperature=0, max_tokens=6))])
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sched.close()
    assert not errors and results == [want] * 8


# ---------------------------------------------------------------------------------------------
# Bad files


def test_truncated_files_name_the_file_and_tensor(tmp_path):
    src = exported()
    data = src.read_bytes()
    info = GGUFFile(src).tensors
    last = list(info.values())[-1]
    cuts = {"header": 10, "metadata": 200, "middle": len(data) // 2, "last tensor": last.offset + 4}
    for what, cut in cuts.items():
        bad = tmp_path / f"cut_{what.replace(' ', '_')}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelFileError, match=str(bad.name)) as e:
            Engine.load(bad)
        if what == "last tensor":
            assert last.name in str(e.value) and "truncated" in str(e.value)


def test_flipped_bytes_are_caught(tmp_path):
    src = exported()
    data = bytearray(src.read_bytes())
    tensors = GGUFFile(src).tensors
    # a flip inside any tensor's data is caught by its crc32, and the message names that tensor
    for name in [fmt.TOKEN_EMBD, fmt.blk(1, "ffn_down.weight"), fmt.blk(0, "attn_q.scale"), fmt.blk(1, "ffn_mhc.h_res")]:
        bad = bytearray(data)
        bad[tensors[name].offset + tensors[name].nbytes // 2] ^= 0x5A
        (tmp_path / "flip.gguf").write_bytes(bad)
        with pytest.raises(ModelFileError, match=f"'{name}' is corrupt"):
            Engine.load(tmp_path / "flip.gguf")
    # flips anywhere in the header, metadata and tensor table: a clear error or a valid load, never a crash
    rng = np.random.default_rng(0)
    first_data = min(t.offset for t in tensors.values())
    for pos in list(range(0, 24)) + list(rng.integers(24, first_data, 200)):
        bad = bytearray(data)
        bad[pos] ^= 0xFF
        (tmp_path / "flip.gguf").write_bytes(bad)
        try:
            Engine.load(tmp_path / "flip.gguf")
        except ModelFileError as e:
            assert "flip.gguf" in str(e)


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"hello world, not a model" * 10)
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        Engine.load(tmp_path / "x.gguf")
    with pytest.raises(ModelFileError, match="cannot open"):
        Engine.load(tmp_path / "missing.gguf")


def test_mhc_override(tmp_path):
    path = exported()
    ids = held_out_ids(30)
    base = Engine.load(path).logits(ids)
    same = Engine.load(path, mhc_path=path.with_suffix(".mhc")).logits(ids)
    np.testing.assert_array_equal(base, same)
    layers = read_mhc(path.with_suffix(".mhc"))
    layers[1][0] = (layers[1][0][0][::-1].copy(), layers[1][0][1], layers[1][0][2])  # swap h_pre of layer 1 attn
    write_mhc(tmp_path / "other.mhc", layers, 2)
    assert np.abs(Engine.load(path, mhc_path=tmp_path / "other.mhc").logits(ids) - base).max() > 1e-3
    write_mhc(tmp_path / "short.mhc", layers[:1], 2)
    with pytest.raises(ModelFileError, match="n_layers mismatch: model has 2, file has 1"):
        Engine.load(path, mhc_path=tmp_path / "short.mhc")
    with pytest.raises(ModelFileError, match="mhc_streams=1"):
        Engine.load(exported(mhc_streams=1, sub_norms=False), mhc_path=path.with_suffix(".mhc"))


# ---------------------------------------------------------------------------------------------
# Sampling and text


def test_seeded_sampling_is_reproducible():
    engine = engine_for(mhc_streams=1, sub_norms=False)
    ids = held_out_ids(10)
    run = lambda seed: [ev.token_id for ev in engine.generate(ids, SamplingParams(temperature=1.5, max_tokens=15, seed=seed))]  # noqa: E731
    assert run(1) == run(1)
    assert run(1) != run(2)
    greedy = [ev.token_id for ev in engine.generate(ids, SamplingParams(temperature=0, max_tokens=15))]
    assert [ev.token_id for ev in engine.generate(ids, SamplingParams(temperature=0.7, top_k=1, max_tokens=15, seed=3))] == greedy


def test_top_k_and_top_p_masks():
    logits = np.log(np.array([0.05, 0.5, 0.3, 0.15], dtype=np.float32))
    draws = lambda **kw: {Sampler(SamplingParams(seed=s, **kw), 4, []).choose(logits) for s in range(300)}  # noqa: E731
    assert draws(top_k=2) == {1, 2}
    assert draws(top_p=0.8) == {1, 2}
    assert draws(top_p=0.81) == {1, 2, 3}
    assert draws() == {0, 1, 2, 3}
    assert draws(top_p=0.01) == {1}
    # top-p over a large vocabulary: the nucleus is found among the best candidates or by a full sort
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(5000, 0.1))
    for p in (0.3, 0.999):
        kept, kept_probs = top_p_filter(np.arange(5000), probs, p)
        order = np.argsort(-probs)
        n = int(np.searchsorted(np.cumsum(probs[order]), p)) + 1
        assert sorted(kept) == sorted(order[:n])
        assert abs(kept_probs.sum() - 1) < 1e-9


def test_penalties():
    logits = np.array([2.0, -2.0, 1.0, 0.5], dtype=np.float32)
    s = Sampler(SamplingParams(repetition_penalty=2.0), 4, prompt_ids=[0, 1])
    np.testing.assert_allclose(s.penalize(logits), [1.0, -4.0, 1.0, 0.5])
    s = Sampler(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), 4, prompt_ids=[0])
    for t in (2, 2, 3):
        s.record(t)
    np.testing.assert_allclose(s.penalize(logits), [2.0, -2.0, 1.0 - 0.5 - 0.5, 0.5 - 0.5 - 0.25])
    # a strong frequency penalty stops greedy decoding from repeating itself
    engine = engine_for(mhc_streams=1, sub_norms=False)
    ids = held_out_ids(10)
    plain = [ev.token_id for ev in engine.generate(ids, SamplingParams(temperature=0, max_tokens=30))]
    penal = [ev.token_id for ev in engine.generate(ids, SamplingParams(temperature=0, max_tokens=30, frequency_penalty=100.0))]
    assert len(set(penal)) == len(penal) and len(set(plain)) < len(plain)


def test_stop_strings_are_never_emitted():
    engine = engine_for(mhc_streams=1, sub_norms=False)
    ids = held_out_ids(10)
    greedy = "".join(ev.text for ev in engine.generate(ids, SamplingParams(temperature=0, max_tokens=40)))
    assert len(greedy) > 12
    stop = greedy[8:11]
    events = list(engine.generate(ids, SamplingParams(temperature=0, max_tokens=40, stop=["zzzz-never", stop])))
    text = "".join(ev.text for ev in events)
    assert text == greedy[:greedy.index(stop)]
    assert events[-1].finish_reason == "stop"
    # stop string split over pushes, and a partial match that turns out not to be one
    ts = TextStream(["END"])
    assert [ts.push(b) for b in (b"abE", b"N", b"x E", b"ND tail")] == ["ab", "", "ENx ", ""]
    assert ts.stopped and ts.flush() == ""


def test_utf8_split_across_tokens_streams_whole_characters():
    ts = TextStream([])
    data = "é✓日😀".encode()
    out = [ts.push(data[i:i + 1]) for i in range(len(data))]
    assert "".join(out) == "é✓日😀"
    assert all(o == "" or len(o.encode()) in (2, 3, 4) for o in out)
    ts = TextStream([])
    assert ts.push(b"ok\xe6\x97") == "ok" and ts.flush() == "\ufffd"
    # through the engine: the streamed text equals decoding all generated bytes at once
    engine = engine_for(mhc_streams=1, sub_norms=False)
    prompt = engine.tokenizer.encode("# 日本語 ✓ naïve 😀\n")
    events = list(engine.generate(prompt, SamplingParams(temperature=1.0, max_tokens=40, seed=0, logprobs=3)))
    ids = [ev.token_id for ev in events if ev.token_id not in engine.stop_ids]
    assert "".join(ev.text for ev in events) == engine.tokenizer.decode_bytes(ids).decode("utf-8", errors="replace")
    assert all(ev.logprob <= 0 and len(ev.top_logprobs) <= 3 for ev in events)


def test_generate_rejects_bad_requests():
    engine = engine_for(mhc_streams=1, sub_norms=False)
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate([], SamplingParams())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([10**6], SamplingParams())
    with pytest.raises(ValueError, match="'top_p'"):
        engine.generate([5], SamplingParams(top_p=0.0))
    out = list(engine.generate(held_out_ids(250)[:256], SamplingParams(temperature=0, max_tokens=50)))
    assert out[-1].finish_reason == "length" and len(out) <= 50


def test_generate_cli(capsys, monkeypatch):
    import io

    from nanochat.generate import main
    path = exported()
    main(["--model", str(path), "--prompt", "def f(x):", "--max-tokens", "8", "--temperature", "0"])
    out = capsys.readouterr().out
    assert out.startswith("def f(x):") and len(out) > len("def f(x):")
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nsecond line\n"))
    main(["--model", str(path), "--max-tokens", "5", "--seed", "1"])
    assert capsys.readouterr().out.count("assistant>") == 2
