"""Data pipeline tests on small real corpora in tmp dirs (slices of the Python standard library):
every reader kind, bad inputs, the validation split, the shard cache, sampler / prefetcher
determinism and resume, validation batches, the length curriculum.

Run: .venv/bin/python -m pytest tests/test_data.py -q
"""

import json
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat import data as D
from nanochat.corpus import DataError, is_val_document, open_corpus

STDLIB = Path(sysconfig.get_paths()["stdlib"])
VOCAB = 600


def stdlib_files(count: int, max_size: int = 20_000) -> list[Path]:
    return sorted(f for f in STDLIB.glob("*.py") if 200 < f.stat().st_size < max_size)[:count]


def make_code_dir(root: Path, count: int = 80) -> Path:
    """A corpus folder of real Python files (two levels), plus things the reader must skip."""
    for i, f in enumerate(stdlib_files(count)):
        sub = root / ("pkg" if i % 3 else "") / f.name
        sub.parent.mkdir(parents=True, exist_ok=True)
        sub.write_bytes(f.read_bytes())
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret.py").write_text("never read me\n")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "x.py").write_text("never read me\n")
    (root / "latin1.txt").write_bytes("caf\xe9 latin-1\n".encode("latin-1"))
    (root / "image.png").write_bytes(b"\x89PNG not text")
    (root / "empty.py").write_text("\n\n")
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("prep")
    corpus_dir = make_code_dir(base / "corpus")
    pd = D.prepare_data(str(corpus_dir), base / "run", VOCAB, seed=7, cache_dir=base / "cache", val_fraction=0.1)
    return pd, corpus_dir, base


# ---------------------------------------------------------------------------------------------
# Readers

def test_directory_reader_skips_hidden_cache_binary_and_non_utf8(tmp_path):
    root = make_code_dir(tmp_path / "c", count=10)
    corpus = open_corpus(str(root))
    docs = list(corpus.documents())
    names = [d.name for d in docs]
    assert names == sorted(n for n in names if "/" not in n) + sorted(n for n in names if "/" in n)
    assert len(docs) == 10 and all(".hidden" not in n and "__pycache__" not in n for n in names)
    assert corpus.skipped == ["latin1.txt"]
    assert docs[0].text == (root / names[0]).read_text()
    assert [d.name for d in corpus.documents()] == names  # re-iterable, same order


def test_txt_jsonl_parquet_readers(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n")
    assert [(d.name, d.text) for d in open_corpus(str(tmp_path / "a.txt")).documents()] == [("a.txt", "hello world\n")]
    rows = ["first doc", "", "second\ndoc ünïcode"]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(rows)) + "\n\n")
    assert [(d.name, d.text) for d in open_corpus(str(tmp_path / "r.jsonl")).documents()] == \
        [("r.jsonl:1", "first doc"), ("r.jsonl:3", rows[2])]
    pq.write_table(pa.table({"text": rows + [None], "n": [1, 2, 3, 4]}), tmp_path / "r.parquet", row_group_size=2)
    assert [(d.name, d.text) for d in open_corpus(str(tmp_path / "r.parquet")).documents()] == \
        [("r.parquet#0", "first doc"), ("r.parquet#2", rows[2])]
    # a directory mixes all kinds
    assert len(list(open_corpus(str(tmp_path)).documents())) == 5


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="data path not found: .*missing.txt"):
        open_corpus(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="data path not found: nobody/nothing .*hf:nobody/nothing"):
        open_corpus("nobody/nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty corpus"):
        open_corpus(str(tmp_path / "empty"))
    (tmp_path / "x.docx").write_text("x")
    with pytest.raises(DataError, match=r"x.docx: unknown extension '.docx'"):
        open_corpus(str(tmp_path / "x.docx"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected an object with a 'text' field, got \['body'\]"):
        list(open_corpus(str(tmp_path / "bad.jsonl")).documents())
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=r"broken.jsonl:2: invalid JSON"):
        list(open_corpus(str(tmp_path / "broken.jsonl")).documents())
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "nocol.parquet")
    with pytest.raises(DataError, match=r"nocol.parquet: no 'text' column; columns are \['body'\]"):
        list(open_corpus(str(tmp_path / "nocol.parquet")).documents())
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9")
    with pytest.raises(DataError, match="latin.txt: not UTF-8"):
        list(open_corpus(str(tmp_path / "latin.txt")).documents())
    with pytest.raises(DataError, match=r"val_fraction: expected a fraction in \(0, 0.5\), got 0.0"):
        D.prepare_data(str(tmp_path / "bad.jsonl"), tmp_path / "run", VOCAB, val_fraction=0.0)
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.py").write_text("   \n")
    with pytest.raises(DataError, match="empty corpus"):
        D.prepare_data(str(tmp_path / "blank"), tmp_path / "run", VOCAB, cache_dir=tmp_path / "cache")


def test_hugging_face_dataset_error_is_clear():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="could not load Hugging Face dataset nobody/nothing: .*datasets"):
            open_corpus("hf:nobody/nothing")
    else:  # installed: this machine cannot reach the hub, or the dataset does not exist
        with pytest.raises(DataError, match="could not load Hugging Face dataset nobody/nothing-nanochat-test"):
            open_corpus("hf:nobody/nothing-nanochat-test")


def test_builtin_stdlib_corpus():
    """The only test that reads the real default corpus; it reads names and a few documents only."""
    corpus = open_corpus(None)
    assert "standard library" in corpus.description and corpus.approx_bytes > 5_000_000
    names = [name for _, _, name in corpus._items]
    assert len(names) > 500 and not any("site-packages" in n or "__pycache__" in n for n in names)
    docs = []
    for doc in corpus.documents():
        docs.append(doc)
        if len(docs) == 20:
            break
    assert all(d.name.endswith(".py") and d.text.strip() for d in docs)
    assert open_corpus(None).fingerprint == corpus.fingerprint


def test_val_split_is_deterministic_by_document():
    names = [f"pkg/mod_{i}.py" for i in range(4000)]
    picks = [is_val_document(i, n, 0.015) for i, n in enumerate(names)]
    assert picks == [is_val_document(i, n, 0.015) for i, n in enumerate(names)]
    assert 0.008 < sum(picks) / len(picks) < 0.025
    assert not is_val_document(0, names[0], 1.0)  # document 0 always trains


# ---------------------------------------------------------------------------------------------
# Shards and cache

def test_shards_hold_the_documents_exactly(prepared):
    pd, corpus_dir, _ = prepared
    tok = pd.tokenizer
    assert tok.vocab_size == VOCAB and pd.index["dtype"] == "uint16"
    docs = list(open_corpus(str(corpus_dir)).documents())
    val_docs = [d for i, d in enumerate(docs) if is_val_document(i, d.name, 0.1)]
    train_docs = [d for i, d in enumerate(docs) if not is_val_document(i, d.name, 0.1)]
    assert val_docs and pd.index["val_split"] == "documents"
    val = pd.val_tokens()
    assert tok.decode(val) == "".join("<|bos|>" + d.text for d in val_docs)
    assert pd.val_bytes == sum(len(d.text.encode()) for d in val_docs)
    assert pd.n_train_tokens == sum(len(tok.encode(d.text)) + 1 for d in train_docs)
    assert pd.n_val_tokens == len(val)
    assert np.isclose(pd.bits_per_byte(1.0), (len(val) - 1) / (np.log(2) * pd.val_bytes))


def test_cache_is_reused_and_run_files_written(prepared, tmp_path):
    pd, corpus_dir, base = prepared
    index_mtime = (pd.folder / "index.json").stat().st_mtime_ns
    again = D.prepare_data(str(corpus_dir), tmp_path / "run2", VOCAB, seed=7, cache_dir=base / "cache", val_fraction=0.1)
    assert again.folder == pd.folder and (pd.folder / "index.json").stat().st_mtime_ns == index_mtime
    assert (tmp_path / "run2" / "tokenizer.json").read_text() == (base / "run" / "tokenizer.json").read_text()
    assert np.array_equal(D.val_tokens(tmp_path / "run2"), pd.val_tokens())
    assert D.val_bytes(base / "run") == pd.val_bytes
    with pytest.raises(DataError, match=r"tokenizer.json: vocabulary of 600 tokens, but vocab_size=700"):
        D.prepare_data(str(corpus_dir), tmp_path / "run2", 700, cache_dir=base / "cache", val_fraction=0.1)
    with pytest.raises(DataError, match="data.json not found"):
        D.val_tokens(tmp_path)


def test_small_shards_huge_document_and_tail_split(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "PIECE_CHARS", 3000)  # the one document is encoded in newline-aligned pieces
    text = "".join(f.read_text() for f in stdlib_files(5))
    (tmp_path / "one.txt").write_text(text)  # one document: the hash split cannot pick a val document
    one = D.prepare_data(str(tmp_path / "one.txt"), tmp_path / "run", VOCAB, cache_dir=tmp_path / "cache", shard_tokens=2000)
    assert one.index["val_split"] == "tail" and len(one.index["train"]["shards"]) > 2
    train = D.TokenStream(one.folder, one.index["train"], one.index["dtype"])
    whole = np.concatenate([train.slice(0, len(train)), one.val_tokens()])
    assert one.tokenizer.decode(whole) == "<|bos|>" + text
    assert 0 < one.n_val_tokens <= 0.02 * len(whole)
    assert one.val_bytes == len(one.tokenizer.decode_bytes(one.val_tokens()))
    assert np.load(one.folder / "train_doc_lens.npy").tolist() == [one.n_train_tokens]


# ---------------------------------------------------------------------------------------------
# Sampling

def test_sampler_windows_determinism_ranks_and_resume(prepared):
    pd, _, _ = prepared
    a, b = pd.train_sampler(), pd.train_sampler()
    batches = [a.sample(4, 32) for _ in range(5)]
    for x, y in batches:
        assert x.shape == y.shape == (4, 32) and x.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])
    stream = D.TokenStream(pd.folder, pd.index["train"], pd.index["dtype"])
    row = np.concatenate([batches[0][0][0].numpy(), batches[0][1][0, -1:].numpy()])
    windows = np.lib.stride_tricks.sliding_window_view(stream.slice(0, len(stream)), 33)
    assert (windows == row).all(1).any()  # the row is a real 33-token window of the stream
    assert all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(batches, (b.sample(4, 32) for _ in range(5))))
    other_rank = pd.train_sampler(rank=1, world_size=2)
    assert not torch.equal(other_rank.sample(4, 32)[0], batches[0][0])
    state = a.state_dict()
    after = [a.sample(2, 16) for _ in range(3)]
    resumed = pd.train_sampler(rank=1, world_size=2)  # any rank can restore the saved counter
    resumed.load_state_dict(state)
    resumed.rank = 0
    assert all(torch.equal(p[0], q[0]) for p, q in zip(after, (resumed.sample(2, 16) for _ in range(3))))
    with pytest.raises(ValueError, match="field 'seed'"):
        pd.train_sampler(seed=99).load_state_dict(state)
    with pytest.raises(DataError, match="too short for one window"):
        a.sample(1, 10**8)


def test_prefetcher_matches_plain_sampler_and_tracks_state(prepared):
    pd, _, _ = prepared
    plan = lambda i: (8 // (1 + i % 2), 16 * (1 + i % 2), 1.0)  # noqa: E731 (curriculum-like changing shapes)
    plain = pd.train_sampler()
    expected = [plain.sample(*plan(i)) for i in range(6)]
    with D.Prefetcher(pd.train_sampler(), plan=plan, depth=2) as pf:
        got = [next(pf) for _ in range(4)]
        assert pf.state_dict() == {"seed": 7, "order": "corpus", "batches": 4}
        state = pf.state_dict()
    assert all(torch.equal(e[0], g[0]) and torch.equal(e[1], g[1]) for e, g in zip(expected, got))
    resumed = pd.train_sampler()
    resumed.load_state_dict(state)
    with D.Prefetcher(resumed, plan=plan) as pf:
        assert all(torch.equal(next(pf)[0], e[0]) for e in expected[4:])
    with D.Prefetcher(pd.train_sampler(), batch_size=1, seq_len=10**8) as pf:
        with pytest.raises(DataError, match="too short"):
            next(pf)


def test_val_batches_cover_every_token_once(prepared):
    pd, _, _ = prepared
    val = pd.val_tokens().astype(np.int64)
    xs, ys = zip(*pd.val_batches(batch_size=3, seq_len=50))
    x, y = torch.cat(xs).flatten(), torch.cat(ys).flatten()
    keep = y != -1
    assert torch.equal(x[keep], torch.from_numpy(val[:-1])) and torch.equal(y[keep], torch.from_numpy(val[1:]))
    parts = [torch.cat([yb for _, yb in pd.val_batches(3, 50, rank=r, world_size=2)]) for r in range(2)]
    assert sum(int((p != -1).sum()) for p in parts) == len(val) - 1
    assert len(list(pd.val_batches(3, 50, max_batches=1))) == 1
    assert all(torch.equal(a[0], b[0]) for a, b in zip(pd.val_batches(3, 50), pd.val_batches(3, 50)))


def test_length_curriculum_orders_documents_short_first(prepared):
    pd, _, _ = prepared
    sampler = pd.train_sampler(order="length")
    ordered = sampler.stream.slice(0, len(sampler.stream))
    train = D.TokenStream(pd.folder, pd.index["train"], pd.index["dtype"])
    assert np.array_equal(np.bincount(ordered, minlength=VOCAB), np.bincount(train.slice(0, len(train)), minlength=VOCAB))
    doc_starts = np.flatnonzero(ordered == pd.tokenizer.bos_id)
    lengths = np.diff(np.append(doc_starts, len(ordered)))
    assert np.all(np.diff(lengths) >= 0)
    share = 0.2
    easy = int(np.ceil(share * len(ordered)))
    for _ in range(5):
        x, y = sampler.sample(4, 32, progress=share)
        for row in torch.cat([x, y[:, -1:]], 1).numpy():
            windows = np.lib.stride_tricks.sliding_window_view(ordered[:easy + 33], 33)
            assert (windows == row).all(1).any()
    assert sampler.state_dict()["order"] == "length"
