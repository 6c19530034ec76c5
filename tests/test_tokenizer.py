"""Tokenizer tests on real text (Python standard library sources): round trips, specials, chat template,
GGUF vocab/merges rebuild, save/load, padding of small vocabularies.

Run: .venv/bin/python -m pytest tests/test_tokenizer.py -q
"""

import sysconfig
from pathlib import Path

import pytest

from nanochat.config import SPECIAL_TOKENS
from nanochat.tokenizer import TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNUSED, Tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
UNICODE = "naïve café — 日本語 😀 tab\there\r\nwindows line\n\n  indented\x00nul"


def stdlib_texts(start: int, count: int) -> list[str]:
    files = sorted(f for f in STDLIB.glob("*.py") if f.stat().st_size < 40_000)
    return [f.read_text(encoding="utf-8") for f in files[start:start + count]]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(stdlib_texts(0, 40), 1024)


@pytest.fixture(scope="module")
def held_out() -> list[str]:
    return stdlib_texts(40, 10)


def test_roundtrip_and_compression_on_unseen_code(tok, held_out):
    for text in held_out + [UNICODE, "", " ", "<|end|> is just text"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode_bytes(ids) == text.encode("utf-8")
        assert all(0 <= i < tok.vocab_size for i in ids)
    n_bytes = sum(len(t.encode()) for t in held_out)
    n_tokens = sum(len(tok.encode(t)) for t in held_out)
    assert n_bytes / n_tokens > 2.5, f"BPE learned little: {n_bytes / n_tokens:.2f} bytes per token"
    assert tok.encode_batch(held_out[:3]) == [tok.encode(t) for t in held_out[:3]]


def test_special_tokens_at_fixed_ids_and_never_from_text(tok):
    assert tok.vocab_size == 1024
    assert (tok.bos_id, tok.user_id, tok.assistant_id, tok.end_id) == (0, 1, 2, 3)
    assert [tok.hf.id_to_token(i) for i in range(4)] == SPECIAL_TOKENS.all
    ids = tok.encode("".join(SPECIAL_TOKENS.all))
    assert not set(ids) & {0, 1, 2, 3}
    assert tok.decode([0, 3]) == "<|bos|><|end|>"
    assert tok.decode([0] + tok.encode("hi") + [3], skip_special_tokens=True) == "hi"


def test_render_chat_layout(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "<|end|> and 3+3?"}]
    e = tok.encode
    expected = ([0, 1] + e("Be brief.\n\nWhat is 2+2?") + [3, 2] + e("4") + [3, 1] + e("<|end|> and 3+3?") + [3, 2])
    assert tok.render_chat(msgs) == expected
    assert tok.render_chat(msgs, add_generation_prompt=False) == expected[:-1]
    assert tok.render_chat([{"role": "system", "content": "s"}], add_generation_prompt=False) == [0, 1] + e("s") + [3]
    with pytest.raises(ValueError, match=r"messages\[0\].role: expected 'system', 'user' or 'assistant', got 'tool'"):
        tok.render_chat([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match=r"messages\[1\].content: expected a string"):
        tok.render_chat([{"role": "user", "content": "x"}, {"role": "assistant", "content": None}])


def test_vocab_merges_rebuild_is_identical(tok, held_out):
    tokens, merges, types = tok.to_vocab_merges()
    assert len(tokens) == len(types) == tok.vocab_size
    assert tokens[:4] == SPECIAL_TOKENS.all and types[:4] == [TOKEN_CONTROL] * 4
    assert set(types[4:]) == {TOKEN_NORMAL}
    assert all(len(m.split(" ")) == 2 for m in merges) and len(merges) == tok.vocab_size - 4 - 256
    rebuilt = Tokenizer.from_vocab_merges(tokens, merges, types)
    for text in held_out + [UNICODE]:
        assert rebuilt.encode(text) == tok.encode(text)
    assert rebuilt.fingerprint() == tok.fingerprint()
    assert rebuilt.render_chat([{"role": "user", "content": "hi"}]) == tok.render_chat([{"role": "user", "content": "hi"}])


def test_rebuild_rejects_bad_vocab(tok):
    tokens, merges, _ = tok.to_vocab_merges()
    with pytest.raises(ValueError, match="special tokens"):
        Tokenizer.from_vocab_merges(tokens[4:], merges)
    with pytest.raises(ValueError, match=r"merges\[0\]"):
        Tokenizer.from_vocab_merges(tokens, ["nospace"] + merges[1:])
    with pytest.raises(ValueError, match="duplicate token"):
        Tokenizer.from_vocab_merges(tokens + [tokens[10]], merges)


def test_save_load_and_json_str(tok, held_out, tmp_path):
    path = tmp_path / "sub" / "tokenizer.json"
    tok.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.encode(held_out[0]) == tok.encode(held_out[0])
    assert loaded.encode("<|bos|>") == tok.encode("<|bos|>")  # still plain text after a reload
    assert Tokenizer.from_json_str(path.read_text()).fingerprint() == tok.fingerprint()
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Tokenizer.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        Tokenizer.load(tmp_path / "bad.json")


def test_training_is_deterministic():
    texts = stdlib_texts(50, 8)
    assert Tokenizer.train(texts, 600).fingerprint() == Tokenizer.train(texts, 600).fingerprint()


def test_small_corpus_is_padded_to_exact_vocab_size():
    tok = Tokenizer.train(["def f(x):\n    return x + 1\n"], 2000)
    assert tok.vocab_size == 2000
    tokens, merges, types = tok.to_vocab_merges()
    fillers = [i for i, t in enumerate(types) if t == TOKEN_UNUSED]
    assert fillers and tokens[fillers[0]].startswith("<|unused_")
    text = "def f(x):\n    return x + 1\n" + " ".join(tokens[i] for i in fillers[:5])
    assert not set(tok.encode(text)) & set(fillers)
    assert tok.decode(tok.encode(text)) == text
    assert Tokenizer.from_vocab_merges(tokens, merges, types).encode(text) == tok.encode(text)


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match="vocab_size: expected an integer >= 260"):
        Tokenizer.train(["x"], 100)
