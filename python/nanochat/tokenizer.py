"""Byte-level BPE tokenizer (HF `tokenizers`), its special tokens and the chat template.

- Byte level: text is UTF-8 bytes, each byte shown as one printable character (the GPT-2 map),
  so every string round-trips exactly and there is no unknown token.
- Special tokens sit at fixed ids 0..3 (`config.SPECIAL_TOKENS`: bos, user, assistant, end).
  `encode` never turns text into specials: a literal "<|end|>" in a document or a chat message is
  plain bytes; specials enter only through `render_chat` and the data pipeline (bos per document).
- The vocabulary is always exactly `vocab_size`: when a small corpus runs out of merges, unused
  filler tokens `<|unused_N|>` (never produced by encode) pad it, so model, tokenizer and GGUF agree.
- `to_vocab_merges()` / `from_vocab_merges()` are the GGUF view (tokens in id order, "a b" merges,
  gguf token types) and rebuild an identical tokenizer from it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from nanochat.config import SPECIAL_TOKENS

# gguf token types (gguf.TokenType): what the export writes next to each token
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_UNUSED = 1, 3, 5
FILLER = "<|unused_{}|>"
MIN_VOCAB = len(SPECIAL_TOKENS.all) + 256  # specials + one token per byte


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte -> printable character map that the ByteLevel pre-tokenizer uses."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)  # unprintable bytes move past Latin-1
            extra += 1
    return mapping


_CHAR_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}


def _byte_level(model: models.BPE) -> HFTokenizer:
    """The fixed pipeline around a BPE model: no normalizer, ByteLevel pre-tokenizer and decoder."""
    hf = HFTokenizer(model)
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    return hf


class Tokenizer:
    """A byte-level BPE tokenizer with nanochat's special tokens at ids 0..3."""

    def __init__(self, hf: HFTokenizer):
        for i, name in enumerate(SPECIAL_TOKENS.all):
            got = hf.id_to_token(i)
            if got != name:
                raise ValueError(f"tokenizer: expected special token {name!r} at id {i}, got {got!r}")
        hf.encode_special_tokens = True  # text never becomes a special token (no prompt injection)
        self.hf = hf
        self._token_bytes: list[bytes] | None = None

    # -- building ------------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Train byte-level BPE on `texts`; the result has exactly `vocab_size` tokens."""
        if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
            raise ValueError(f"vocab_size: expected an integer >= {MIN_VOCAB} (4 specials + 256 bytes), got {vocab_size!r}")
        hf = _byte_level(models.BPE())
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS.all),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer)
        tok = cls(hf)
        if tok.vocab_size < vocab_size:
            # too little text for that many merges: pad with fillers that encode never produces
            tokens, merges, _ = tok.to_vocab_merges()
            fillers = [FILLER.format(i) for i in range(vocab_size - len(tokens))]
            tok = cls.from_vocab_merges(tokens + fillers, merges)
        return tok

    @classmethod
    def from_vocab_merges(cls, tokens: list[str], merges: list[str], token_types: list[int] | None = None) -> "Tokenizer":
        """Rebuild the tokenizer from `to_vocab_merges()` output (e.g. read back from GGUF).

        token_types is accepted for symmetry and only checked for length: the specials are known.
        """
        if list(tokens[: len(SPECIAL_TOKENS.all)]) != SPECIAL_TOKENS.all:
            raise ValueError(f"tokens: expected the special tokens {SPECIAL_TOKENS.all} at ids 0..3, got {list(tokens[:4])}")
        if token_types is not None and len(token_types) != len(tokens):
            raise ValueError(f"token_types: expected {len(tokens)} entries (one per token), got {len(token_types)}")
        vocab: dict[str, int] = {}
        for i, t in enumerate(tokens):
            if t in vocab:
                raise ValueError(f"tokens: duplicate token {t!r} at ids {vocab[t]} and {i}")
            vocab[t] = i
        pairs = []
        for i, m in enumerate(merges):
            parts = m.split(" ")
            if len(parts) != 2 or parts[0] not in vocab or parts[1] not in vocab or parts[0] + parts[1] not in vocab:
                raise ValueError(f"merges[{i}]: expected 'a b' with a, b and ab in the vocabulary, got {m!r}")
            pairs.append((parts[0], parts[1]))
        hf = _byte_level(models.BPE(vocab=vocab, merges=pairs))
        hf.add_special_tokens(list(SPECIAL_TOKENS.all))
        return cls(hf)

    from_gguf_vocab = from_vocab_merges

    @classmethod
    def from_json_str(cls, text: str) -> "Tokenizer":
        """Load from the contents of a tokenizer.json (e.g. the copy embedded in a GGUF file)."""
        return cls(HFTokenizer.from_str(text))

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad json
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from e
        return cls(hf)

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json atomically (temp file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        self.hf.save(str(tmp))
        os.replace(tmp, path)

    # -- the GGUF view ---------------------------------------------------------------------------

    def to_vocab_merges(self) -> tuple[list[str], list[str], list[int]]:
        """(tokens in id order, merges as "a b" strings in priority order, gguf token types)."""
        vocab = self.hf.get_vocab(with_added_tokens=True)
        tokens = [""] * len(vocab)
        for t, i in vocab.items():
            tokens[i] = t
        merges = json.loads(self.hf.to_str())["model"]["merges"]
        # tokenizers >= 0.20 stores [a, b] pairs, older versions "a b" strings
        merges = [m if isinstance(m, str) else f"{m[0]} {m[1]}" for m in merges]
        specials = set(SPECIAL_TOKENS.all)
        types = [TOKEN_CONTROL if t in specials else TOKEN_UNUSED if _is_filler(t) else TOKEN_NORMAL for t in tokens]
        return tokens, merges, types

    def fingerprint(self) -> str:
        """Hash of everything that decides the encoding (tokens + merges): keys the token cache."""
        tokens, merges, _ = self.to_vocab_merges()
        blob = json.dumps(["byte-level-bpe-v1", tokens, merges], ensure_ascii=False).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()[:16]

    # -- encoding ----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return 0

    @property
    def user_id(self) -> int:
        return 1

    @property
    def assistant_id(self) -> int:
        return 2

    @property
    def end_id(self) -> int:
        return 3

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no specials added (and none recognised in the text)."""
        if not isinstance(text, str):
            raise TypeError(f"encode: expected str, got {type(text).__name__}")
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode() of each text, in parallel inside `tokenizers`."""
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; specials appear as their names unless skipped. Split UTF-8 bytes show as U+FFFD."""
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one token stands for (a special's name as UTF-8): for streaming UTF-8-safe text."""
        if self._token_bytes is None:
            tokens, _, types = self.to_vocab_merges()
            self._token_bytes = [t.encode("utf-8") if ty == TOKEN_CONTROL else bytes(_CHAR_TO_BYTE[c] for c in t)
                                 for t, ty in zip(tokens, types)]
        return self._token_bytes[token_id]

    def byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes of text behind each token id, 0 for specials: counts bytes from tokens exactly (bits per byte)."""
        _, _, types = self.to_vocab_merges()
        return np.array([0 if ty == TOKEN_CONTROL else len(self.token_bytes(i)) for i, ty in enumerate(types)],
                        dtype=np.int64)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return b"".join(self.token_bytes(i) for i in ids)

    # -- chat ----------------------------------------------------------------------------------

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """<|bos|> then per turn <|user|>/<|assistant|> + content + <|end|>; then <|assistant|> if asking for a reply.

        System messages are folded into the next user turn (joined with a blank line); a system
        message with no user turn after it becomes a user turn of its own.
        """
        ids = [self.bos_id]
        system: list[str] = []

        def turn(role_id: int, content: str) -> None:
            ids.append(role_id)
            ids.extend(self.encode(content))
            ids.append(self.end_id)

        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}]: expected a dict with 'role' and 'content', got {m!r}")
            role, content = m["role"], m["content"]
            if not isinstance(content, str):
                raise ValueError(f"messages[{i}].content: expected a string, got {type(content).__name__}")
            if role == "system":
                system.append(content)
            elif role == "user":
                turn(self.user_id, "\n\n".join(system + [content]))
                system = []
            elif role == "assistant":
                if system:
                    turn(self.user_id, "\n\n".join(system))
                    system = []
                turn(self.assistant_id, content)
            else:
                raise ValueError(f"messages[{i}].role: expected 'system', 'user' or 'assistant', got {role!r}")
        if system:
            turn(self.user_id, "\n\n".join(system))
        if add_generation_prompt:
            ids.append(self.assistant_id)
        return ids


def _is_filler(token: str) -> bool:
    return token.startswith("<|unused_") and token.endswith("|>") and token[9:-2].isdigit()
