"""Validation loss, perplexity and bits per byte, computed the same way for PyTorch and the GGUF engine.

The token stream (held-out split of a run, or any `--data` text) is cut into the windows
train.evaluate uses: window w is tokens[w*T : w*T + T + 1], non-overlapping, T = seq_len. Every
token after the first of a window is scored given the tokens before it in that window.

Special tokens (the `<|bos|>` that starts each document) are not scored: they stand for no text.
Then over the scored tokens:
    loss  = total nats / number of scored tokens        (nats per token)
    ppl   = exp(loss)
    bpb   = total nats / (ln 2 * total UTF-8 bytes those tokens stand for)
bpb is tokenizer-independent: the bytes are those of the scored text itself (each token's exact
bytes from the byte-level vocabulary), so two tokenizers are compared on the same text. Both model
paths see the same windows and the same byte count; only the nats differ.

For the trainer: `evaluate_bpb(model, batches, n_bytes)` scores (x, y) batches (y == -1 ignored).
train.py's `evaluate()` counts bits per byte the same way (exact bytes of the scored targets,
specials left out, `Tokenizer.byte_lengths`), so at the same windows the two agree.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm import tqdm


@dataclass
class BpbResult:
    loss: float  # nats per scored token
    perplexity: float
    bpb: float
    tokens: int  # scored tokens
    bytes: int  # UTF-8 bytes of the scored tokens
    windows: int

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(nats: float, tokens: int, n_bytes: int, windows: int) -> BpbResult:
    if tokens <= 0 or n_bytes <= 0:
        raise ValueError(f"bits per byte: nothing was scored (tokens={tokens}, bytes={n_bytes})")
    loss = nats / tokens
    return BpbResult(loss=loss, perplexity=math.exp(min(loss, 700.0)), bpb=nats / (math.log(2) * n_bytes),
                     tokens=tokens, bytes=n_bytes, windows=windows)


# ---------------------------------------------------------------------------------------------
# Data: token stream -> windows, scored-token mask and byte count

def read_texts(spec: str, max_bytes: int = -1) -> list[str]:
    """Documents of a --data input, read exactly as training reads a corpus (nanochat.corpus):
    a text file, a folder, a .jsonl/.parquet with a "text" field, or hf:NAME. Stops after about
    max_bytes of text (-1 = all): bpb scores only the first --eval-tokens anyway."""
    from nanochat.corpus import open_corpus

    texts, total = [], 0
    for doc in open_corpus(spec).documents():
        texts.append(doc.text)
        total += len(doc.text)
        if 0 <= max_bytes <= total:
            break
    if not texts:
        raise ValueError(f"--data {spec}: no documents with text")
    return texts


def tokens_of_texts(texts: list[str], tokenizer) -> np.ndarray:
    """The training stream layout: each document is <|bos|> followed by its tokens."""
    ids: list[int] = []
    for text, encoded in zip(texts, tokenizer.encode_batch(texts)):
        ids.append(tokenizer.bos_id)
        ids.extend(encoded)
    return np.asarray(ids, dtype=np.int64)


def held_out_tokens(run_dir: str | Path) -> np.ndarray:
    """The held-out split of a run's corpus, from the data module."""
    from nanochat import data

    return np.asarray(data.val_tokens(run_dir), dtype=np.int64)


def make_windows(tokens: np.ndarray, seq_len: int, max_tokens: int = -1) -> np.ndarray:
    """[N, seq_len + 1] windows at stride seq_len over the first max_tokens (+1) tokens; -1 = all."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if len(tokens) < 2:
        raise ValueError(f"bits per byte: need at least 2 tokens of text, got {len(tokens)}")
    if len(tokens) < seq_len + 1:
        return tokens[None, :]  # one shorter window
    limit = len(tokens) - 1 if max_tokens < 0 else min(max_tokens, len(tokens) - 1)
    n = max(1, limit // seq_len)
    return np.stack([tokens[w * seq_len: w * seq_len + seq_len + 1] for w in range(n)])


def byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 byte length of each token id; 0 for specials (they are not scored)."""
    return tokenizer.byte_lengths()


def scored_mask(windows: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """[N, T] bool: which targets windows[:, 1:] count (text tokens, not specials)."""
    return lengths[windows[:, 1:]] > 0


# ---------------------------------------------------------------------------------------------
# Nats of windows, per model path

def torch_window_nats(model, windows: np.ndarray, device: str, batch_size: int = 8,
                      lengths: np.ndarray | None = None) -> float:
    """Summed nats over the scored targets of windows, by the PyTorch model."""
    import torch

    total = 0.0
    with torch.no_grad():
        for i in tqdm(range(0, len(windows), batch_size), desc="bpb (pytorch)", unit="batch", leave=False):
            chunk = torch.as_tensor(windows[i:i + batch_size], dtype=torch.long, device=device)
            x, y = chunk[:, :-1], chunk[:, 1:].clone()
            if lengths is not None:
                y[~torch.as_tensor(scored_mask(windows[i:i + batch_size], lengths), device=device)] = -1
            logits, _ = model(x)
            nats = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                                                     ignore_index=-1, reduction="sum")
            total += float(nats.double())
    return total


def engine_window_nats(engine, windows: np.ndarray, lengths: np.ndarray | None = None) -> float:
    """Summed nats over the scored targets of windows, by the CPU engine (one prefill per window)."""
    total = 0.0
    for window in tqdm(windows, desc="bpb (engine)", unit="window", leave=False):
        logits = np.asarray(engine.logits([int(t) for t in window[:-1]]), dtype=np.float64)
        peak = logits.max(axis=-1, keepdims=True)
        log_z = peak[:, 0] + np.log(np.exp(logits - peak).sum(axis=-1))
        targets = window[1:]
        nats = log_z - logits[np.arange(len(targets)), targets]
        if lengths is not None:
            nats = nats[lengths[targets] > 0]
        total += float(nats.sum())
    return total


def evaluate_windows(source, windows: np.ndarray) -> BpbResult:
    """Loss, perplexity and bpb of a model source (see source.py) on windows of its tokenizer's ids."""
    lengths = byte_lengths(source.tokenizer)
    mask = scored_mask(windows, lengths)
    n_bytes = int(lengths[windows[:, 1:]].sum())
    nats = source.window_nats(windows, lengths)
    return summarize(nats, int(mask.sum()), n_bytes, len(windows))


def evaluate_bpb(model, batches: Iterable, n_bytes: int) -> BpbResult:
    """For the trainer: score (x, y) LongTensor batches (y == -1 ignored) with a PyTorch model.

    n_bytes is the UTF-8 byte count of the text the scored targets stand for.
    """
    import torch

    was_training = model.training
    model.eval()
    nats, tokens, windows = 0.0, 0, 0
    with torch.no_grad():
        for x, y in batches:
            logits, _ = model(x)
            nats += float(torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                                                            y.reshape(-1), ignore_index=-1, reduction="sum").double())
            tokens += int((y != -1).sum())
            windows += x.shape[0]
    model.train(was_training)
    return summarize(nats, tokens, n_bytes, windows)
