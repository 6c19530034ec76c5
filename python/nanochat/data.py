"""Token data for training: tokenizer, token-shard cache, batch sampler, prefetcher, validation batches.

The one entry point the trainer uses is `prepare_data(data, run_dir, vocab_size, seed)`:
1. reads the corpus (`nanochat.corpus`; None = the Python standard library's .py sources);
2. trains the tokenizer on a deterministic sample of training documents (every k-th one, up to
   `tokenizer_sample_bytes`), or reuses RUN/tokenizer.json or a cached one; saves RUN/tokenizer.json;
3. tokenizes once into a cache folder keyed by (corpus fingerprint, tokenizer fingerprint):
   `train_000.bin`, `val_000.bin`, ... (uint16 when the vocabulary fits, else uint32; each document
   is <|bos|> + its tokens), `train_doc_lens.npy` and `index.json` (counts, val_bytes); a second
   run finds the folder and memory-maps it;
4. writes RUN/data.json (where the cache is, token and byte counts) for eval: `val_tokens(run_dir)`.

Validation: ~val_fraction of documents, chosen by a hash of the document name (`corpus.is_val_document`);
if that picks none (a tiny corpus), the last val_fraction of the training tokens is held out instead.
Bits per byte = loss_nats * n_tokens / (ln 2 * n_bytes), see `PreparedData.bits_per_byte`.

Curriculum (easy -> hard): `train_sampler(order="length")` reads a second copy of the training
stream with documents sorted shortest first (built once, cached), and `sample(..., progress=p)`
draws windows only from its first p share of tokens: early steps see short, simple files, the
whole corpus is in play from p = 1. With order="corpus" progress is ignored.

The cache lives in `cache_dir`, else $NANOCHAT_CACHE_DIR, else ~/.cache/nanochat; builds hold a
file lock, so DDP ranks that call prepare_data together tokenize only once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from nanochat.corpus import READER_VERSION, Corpus, DataError, is_val_document, open_corpus
from nanochat.tokenizer import Tokenizer

VAL_FRACTION = 0.015
TOKENIZER_SAMPLE_BYTES = 8_000_000  # enough for stable merges, trains in seconds
SHARD_TOKENS = 2**27  # 256 MB per uint16 shard
CACHE_VERSION = "shards-v1"
ENCODE_CHUNK_CHARS = 4_000_000  # text handed to encode_batch at once
PIECE_CHARS = 1_000_000  # longer documents are encoded in newline-aligned pieces of about this size


def cache_root(cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or os.environ.get("NANOCHAT_CACHE_DIR") or Path.home() / ".cache" / "nanochat")


@contextlib.contextmanager
def _locked(path: Path):
    """Exclusive inter-process lock (DDP ranks, parallel runs) around building one cache entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Token streams on disk

class ShardWriter:
    """Appends token arrays to prefix_000.bin, prefix_001.bin, ... of at most shard_tokens each."""

    def __init__(self, folder: Path, prefix: str, dtype, shard_tokens: int):
        self.folder, self.prefix, self.dtype, self.shard_tokens = folder, prefix, dtype, shard_tokens
        self.shards: list[str] = []
        self.counts: list[int] = []
        self._file = None

    def append(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._file is None or self.counts[-1] == self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.counts[-1]
            self._file.write(tokens[:room].tobytes())
            self.counts[-1] += len(tokens[:room])
            tokens = tokens[room:]

    def _open_next(self) -> None:
        if self._file is not None:
            self._file.close()
        self.shards.append(f"{self.prefix}_{len(self.shards):03d}.bin")
        self.counts.append(0)
        self._file = open(self.folder / self.shards[-1], "wb")

    def close(self) -> dict:
        if self._file is not None:
            self._file.close()
        return {"shards": self.shards, "tokens": self.counts}


class TokenStream:
    """Memory-mapped shards read as one long token array."""

    def __init__(self, folder: Path, split: dict, dtype: str):
        self.arrays = [np.memmap(folder / s, dtype=dtype, mode="r", shape=(n,))
                       for s, n in zip(split["shards"], split["tokens"]) if n > 0]
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def slice(self, start: int, stop: int) -> np.ndarray:
        parts = []
        for a, off in zip(self.arrays, self.offsets):
            lo, hi = max(start - off, 0), min(stop - off, len(a))
            if lo < hi:
                parts.append(a[lo:hi])
        if not parts:
            return np.empty(0, dtype=self.arrays[0].dtype if self.arrays else np.uint16)
        return np.concatenate(parts) if len(parts) > 1 else np.asarray(parts[0])


def _count_bytes(stream: TokenStream, lengths: np.ndarray) -> int:
    step = 1 << 24
    return int(sum(lengths[stream.slice(i, min(i + step, len(stream)))].sum() for i in range(0, len(stream), step)))


def build_shards(corpus: Corpus, tok: Tokenizer, folder: Path, val_fraction: float = VAL_FRACTION,
                 shard_tokens: int = SHARD_TOKENS) -> dict:
    """Tokenize the corpus into folder (train/val shards, train_doc_lens.npy, index.json); returns the index."""
    folder.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    writers = {s: ShardWriter(folder, s, dtype, shard_tokens) for s in ("train", "val")}
    doc_lens: dict[str, list[int]] = {"train": [], "val": []}
    bar = tqdm(total=corpus.approx_bytes, unit="B", unit_scale=True, desc="tokenizing", mininterval=1.0)
    pending: list[tuple[str, str, bool]] = []  # (split, text, starts a document)

    def flush() -> None:
        for (split, _, first), ids in zip(pending, tok.encode_batch([text for _, text, _ in pending])):
            writers[split].append(np.array([tok.bos_id] + ids if first else ids, dtype=dtype))
            if first:
                doc_lens[split].append(len(ids) + 1)
            else:
                doc_lens[split][-1] += len(ids)
        bar.update(sum(len(text) for _, text, _ in pending))
        pending.clear()

    chars = 0
    for i, doc in enumerate(corpus.documents()):
        split = "val" if is_val_document(i, doc.name, val_fraction) else "train"
        for j, piece in enumerate(_pieces(doc.text, PIECE_CHARS)):
            pending.append((split, piece, j == 0))
            chars += len(piece)
            if chars >= ENCODE_CHUNK_CHARS:
                flush()
                chars = 0
    flush()
    bar.total = bar.n
    bar.close()
    splits = {s: w.close() for s, w in writers.items()}
    if not doc_lens["train"]:
        raise DataError(f"{corpus.description}: empty corpus, no non-blank documents"
                        + (f" ({len(corpus.skipped)} files skipped as not UTF-8)" if corpus.skipped else ""))
    val_split = "documents"
    if not doc_lens["val"]:  # too few documents for the hash to pick one: hold out the tail instead
        val_split = "tail"
        splits["train"], splits["val"] = _split_tail(folder, splits["train"], doc_lens["train"], dtype, val_fraction, shard_tokens)
    np.save(folder / "train_doc_lens.npy", np.array(doc_lens["train"], dtype=np.int64))
    lengths = tok.byte_lengths()
    for s in ("train", "val"):
        splits[s]["documents"] = len(doc_lens[s])
        splits[s]["bytes"] = _count_bytes(TokenStream(folder, splits[s], dtype.__name__), lengths)
    index = {"version": CACHE_VERSION, "corpus": corpus.description, "corpus_fingerprint": corpus.fingerprint,
             "tokenizer_fingerprint": tok.fingerprint(), "vocab_size": tok.vocab_size, "dtype": dtype.__name__,
             "val_fraction": val_fraction, "val_split": val_split, "skipped_not_utf8": corpus.skipped, **splits}
    _write_json(folder / "index.json", index)
    return index


def _pieces(text: str, size: int) -> Iterator[str]:
    """A huge document (a whole book in one .txt) in newline-aligned pieces, so memory stays bounded."""
    start = 0
    while len(text) - start > size:
        cut = text.rfind("\n", start, start + size) + 1 or start + size
        yield text[start:cut]
        start = cut
    yield text[start:]


def _split_tail(folder: Path, train: dict, doc_lens: list[int], dtype, val_fraction: float, shard_tokens: int):
    """Move the last val_fraction of the train tokens (at least one) into a val shard; fix doc_lens."""
    stream = TokenStream(folder, train, dtype.__name__)
    total = len(stream)
    n_val = max(1, round(total * val_fraction))
    if total - n_val < 2:
        raise DataError(f"corpus too small: {total} tokens, cannot hold out a validation split")
    tail = np.array(stream.slice(total - n_val, total))
    del stream
    keep, off, kept = total - n_val, 0, []
    for name, n in zip(train["shards"], train["tokens"]):
        kept.append(int(max(0, min(n, keep - off))))
        os.truncate(folder / name, kept[-1] * np.dtype(dtype).itemsize)
        off += n
    train = {"shards": train["shards"], "tokens": kept}
    while n_val > 0:  # the documents at the end lose the tokens that moved
        cut = min(doc_lens[-1], n_val)
        doc_lens[-1] -= cut
        n_val -= cut
        if doc_lens[-1] == 0:
            doc_lens.pop()
    writer = ShardWriter(folder, "val", dtype, shard_tokens)
    writer.append(tail)
    return train, writer.close()


def _build_length_order(folder: Path, index: dict) -> dict:
    """Write train_by_length_*.bin: the train documents sorted shortest first (stable)."""
    stream = TokenStream(folder, index["train"], index["dtype"])
    lens = np.load(folder / "train_doc_lens.npy")
    starts = np.cumsum(np.concatenate([[0], lens[:-1]]))
    writer = ShardWriter(folder, "train_by_length", np.dtype(index["dtype"]), max(index["train"]["tokens"]))
    for d in tqdm(np.argsort(lens, kind="stable"), desc="ordering documents by length", mininterval=1.0):
        writer.append(stream.slice(int(starts[d]), int(starts[d] + lens[d])))
    return writer.close()


# ---------------------------------------------------------------------------------------------
# Sampling

class TrainSampler:
    """Random windows of seq_len + 1 tokens from the train stream -> (x, y) LongTensors [B, T].

    Batch i is drawn with numpy's default_rng([seed, rank, i]): each DDP rank gets its own stream,
    and the whole state is the batch counter, so any rank can restore a saved state exactly.
    Windows never cross a shard boundary; they do cross documents (separated by <|bos|>).
    """

    def __init__(self, stream: TokenStream, seed: int, rank: int = 0, world_size: int = 1, order: str = "corpus"):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
        self.stream, self.seed, self.rank, self.world_size, self.order = stream, seed, rank, world_size, order
        self.batches = 0

    def sample(self, batch_size: int, seq_len: int, progress: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Next batch; progress in (0, 1] limits windows to the easiest share of a length-ordered stream."""
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len: expected positive integers, got {batch_size}, {seq_len}")
        share = min(max(progress, 0.0), 1.0) if self.order == "length" else 1.0
        limit = max(seq_len + 1, math.ceil(share * len(self.stream)))  # window starts before this token
        valid = np.array([max(0, len(a) - seq_len) for a in self.stream.arrays])
        eligible = np.clip(limit - self.stream.offsets[:-1], 0, valid)
        if eligible.sum() == 0:
            longest = max((len(a) for a in self.stream.arrays), default=0)
            raise DataError(f"train split: {len(self.stream)} tokens (longest shard {longest}) "
                            f"is too short for one window of seq_len + 1 = {seq_len + 1} tokens")
        rng = np.random.default_rng([self.seed, self.rank, self.batches])
        picks = rng.integers(0, eligible.sum(), size=batch_size)
        ends = np.cumsum(eligible)
        shards = np.searchsorted(ends, picks, side="right")
        starts = picks - (ends[shards] - eligible[shards])
        buf = np.stack([self.stream.arrays[s][o:o + seq_len + 1] for s, o in zip(shards, starts)]).astype(np.int64)
        self.batches += 1
        t = torch.from_numpy(buf)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def state_dict(self) -> dict:
        return {"seed": self.seed, "order": self.order, "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "order"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"sampler state: field '{key}' is {state.get(key)!r}, this sampler has {getattr(self, key)!r}")
        self.batches = int(state["batches"])


class Prefetcher:
    """Draws batches from a sampler in a background thread, `depth` ahead, so the GPU never waits.

    plan(i) -> (batch_size, seq_len, progress) shapes batch i (sampler.batches counts from a restored
    state), for curricula; default: fixed (batch_size, seq_len, 1.0). On CUDA batches are pinned and
    copied with non_blocking. state_dict() is the sampler state after the last batch handed out, so a
    checkpoint resumes exactly. Do not use the sampler directly while a Prefetcher runs.
    """

    def __init__(self, sampler: TrainSampler, batch_size: int = 0, seq_len: int = 0, device: str | torch.device = "cpu",
                 depth: int = 4, plan: Callable[[int], tuple[int, int, float]] | None = None):
        if plan is None and (batch_size < 1 or seq_len < 1):
            raise ValueError(f"Prefetcher: expected batch_size, seq_len >= 1 or a plan, got {batch_size}, {seq_len}")
        self.sampler, self.device = sampler, torch.device(device)
        self.plan = plan or (lambda i: (batch_size, seq_len, 1.0))
        self.pin = self.device.type == "cuda"
        self._state = sampler.state_dict()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._work, name="nanochat-prefetch", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            while not self._stop.is_set():
                x, y = self.sampler.sample(*self.plan(self.sampler.batches))
                if self.pin:
                    x, y = x.pin_memory(), y.pin_memory()
                item = (x, y, self.sampler.state_dict())
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except Exception as e:  # hand the error to the consumer instead of dying silently
            self._queue.put(e)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._error is not None:
            raise self._error
        if self._stop.is_set():
            raise RuntimeError("Prefetcher: next() after close()")
        item = self._queue.get()
        if isinstance(item, Exception):
            self._error = item  # the worker has stopped: every later call fails the same way
            raise item
        x, y, self._state = item
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def state_dict(self) -> dict:
        return dict(self._state)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def val_batches_of(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int | None = None,
                   rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed consecutive windows over tokens (window w goes to rank w % world_size); the last one is
    padded with targets -1 (ignored by the loss), so every val token but the first is predicted once."""
    n_windows = math.ceil((len(tokens) - 1) / seq_len)
    mine = list(range(rank, n_windows, world_size))
    for b, first in enumerate(range(0, len(mine), batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        x = torch.zeros(len(mine[first:first + batch_size]), seq_len, dtype=torch.long)
        y = torch.full_like(x, -1)
        for row, w in enumerate(mine[first:first + batch_size]):
            chunk = torch.from_numpy(np.asarray(tokens[w * seq_len: w * seq_len + seq_len + 1], dtype=np.int64))
            x[row, :len(chunk) - 1] = chunk[:-1]
            y[row, :len(chunk) - 1] = chunk[1:]
        yield x, y


# ---------------------------------------------------------------------------------------------
# The trainer's entry point

@dataclass
class PreparedData:
    """Tokenizer plus memory-mapped train/val tokens of one corpus."""
    tokenizer: Tokenizer
    folder: Path  # the shard cache folder
    index: dict
    seed: int

    @property
    def n_train_tokens(self) -> int:
        return sum(self.index["train"]["tokens"])

    @property
    def n_val_tokens(self) -> int:
        return sum(self.index["val"]["tokens"])

    @property
    def val_bytes(self) -> int:
        return self.index["val"]["bytes"]

    def val_tokens(self) -> np.ndarray:
        stream = TokenStream(self.folder, self.index["val"], self.index["dtype"])
        return stream.slice(0, len(stream))

    def train_sampler(self, rank: int = 0, world_size: int = 1, seed: int | None = None, order: str = "corpus") -> TrainSampler:
        """order: "corpus" (documents as read) or "length" (shortest first; see progress in sample())."""
        if order not in ("corpus", "length"):
            raise ValueError(f"order: expected 'corpus' or 'length', got {order!r}")
        if order == "length" and "train_by_length" not in self.index:
            with _locked(self.folder.with_name(self.folder.name + ".lock")):
                index = json.loads((self.folder / "index.json").read_text())
                if "train_by_length" not in index:
                    index["train_by_length"] = _build_length_order(self.folder, index)
                    _write_json(self.folder / "index.json", index)
                self.index = index
        split = self.index["train_by_length" if order == "length" else "train"]
        stream = TokenStream(self.folder, split, self.index["dtype"])
        return TrainSampler(stream, self.seed if seed is None else seed, rank, world_size, order)

    def val_batches(self, batch_size: int, seq_len: int, max_batches: int | None = None,
                    rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return val_batches_of(self.val_tokens(), batch_size, seq_len, max_batches, rank, world_size)

    def bits_per_byte(self, mean_loss_nats: float) -> float:
        """Mean val loss (nats per predicted token) -> bits per UTF-8 byte of the val text."""
        return mean_loss_nats * (self.n_val_tokens - 1) / (math.log(2) * self.val_bytes)


def prepare_data(data: str | None, run_dir: str | Path, vocab_size: int, seed: int = 0, *,
                 cache_dir: str | Path | None = None, val_fraction: float = VAL_FRACTION,
                 tokenizer_sample_bytes: int = TOKENIZER_SAMPLE_BYTES, shard_tokens: int = SHARD_TOKENS) -> PreparedData:
    """Tokenizer (RUN/tokenizer.json) + token shards (cached) for a `--data` spec; see the module docstring."""
    if not 0.0 < val_fraction < 0.5:
        raise DataError(f"val_fraction: expected a fraction in (0, 0.5), got {val_fraction}")
    run_dir, root = Path(run_dir), cache_root(cache_dir)
    corpus = open_corpus(data)
    print(f"corpus: {corpus.description}")
    tok = _run_tokenizer(corpus, run_dir, root, vocab_size, val_fraction, tokenizer_sample_bytes)
    key = f"{corpus.fingerprint}-{tok.fingerprint()}-{val_fraction}"
    folder = root / "shards" / key
    with _locked(root / "shards" / f"{key}.lock"):
        index_file = folder / "index.json"
        index = json.loads(index_file.read_text()) if index_file.is_file() else None
        if index is not None and index.get("version") == CACHE_VERSION:
            print(f"token cache: reusing {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)  # a build that died half way
            started = time.time()
            index = build_shards(corpus, tok, folder, val_fraction, shard_tokens)
            print(f"token cache: wrote {folder} in {time.time() - started:.1f}s")
    prepared = PreparedData(tok, folder, index, seed)
    print(f"data: {prepared.n_train_tokens:,} train tokens, {prepared.n_val_tokens:,} val tokens "
          f"({index['val']['documents']} documents, {prepared.val_bytes:,} bytes, split by {index['val_split']})"
          + (f"; skipped {len(index['skipped_not_utf8'])} non-UTF-8 files" if index["skipped_not_utf8"] else ""))
    _write_json(run_dir / "data.json", {"data": data, "corpus": corpus.description, "cache": str(folder),
                                        "n_train_tokens": prepared.n_train_tokens, "n_val_tokens": prepared.n_val_tokens,
                                        "val_bytes": prepared.val_bytes, "vocab_size": tok.vocab_size})
    return prepared


def _run_tokenizer(corpus: Corpus, run_dir: Path, root: Path, vocab_size: int, val_fraction: float, sample_bytes: int) -> Tokenizer:
    """RUN/tokenizer.json if present (resume), else a cached one for this corpus, else train one."""
    run_file = run_dir / "tokenizer.json"
    if run_file.is_file():
        tok = Tokenizer.load(run_file)
        if tok.vocab_size != vocab_size:
            raise DataError(f"{run_file}: vocabulary of {tok.vocab_size} tokens, but vocab_size={vocab_size} was asked for")
        return tok
    key = f"{corpus.fingerprint}-v{vocab_size}-s{sample_bytes}-{val_fraction}-{READER_VERSION}"
    cached = root / "tokenizers" / f"{key}.json"
    with _locked(root / "tokenizers" / f"{key}.lock"):
        if cached.is_file():
            tok = Tokenizer.load(cached)
            print(f"tokenizer: reusing {cached}")
        else:
            started = time.time()
            texts = _tokenizer_sample(corpus, val_fraction, sample_bytes)
            tok = Tokenizer.train(texts, vocab_size)
            print(f"tokenizer: trained {vocab_size} tokens on {sum(map(len, texts)) / 1e6:.1f} MB "
                  f"({len(texts)} documents) in {time.time() - started:.1f}s")
            tok.save(cached)
    tok.save(run_file)
    return tok


def _tokenizer_sample(corpus: Corpus, val_fraction: float, sample_bytes: int) -> list[str]:
    """Every k-th training document, k chosen so the sample is about sample_bytes (deterministic)."""
    stride = max(1, math.ceil(corpus.approx_bytes / sample_bytes))
    texts, total = [], 0
    for i, doc in enumerate(corpus.documents()):
        if i % stride == 0 and not is_val_document(i, doc.name, val_fraction):
            texts.append(doc.text[: sample_bytes - total])  # one huge document must not blow the budget
            total += len(texts[-1])
            if total >= sample_bytes:
                break
    if not texts:
        raise DataError(f"{corpus.description}: empty corpus, no non-blank documents")
    return texts


def _run_data(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "data.json"
    if not path.is_file():
        raise DataError(f"{path} not found: run_dir must be a run folder made by training (prepare_data writes it)")
    return json.loads(path.read_text())


def val_tokens(run_dir: str | Path) -> np.ndarray:
    """The held-out tokens of a run (memory-mapped from the token cache recorded in RUN/data.json)."""
    info = _run_data(run_dir)
    folder = Path(info["cache"])
    if not (folder / "index.json").is_file():
        raise DataError(f"token cache {folder} (named in {Path(run_dir) / 'data.json'}) is gone; rerun prepare_data")
    index = json.loads((folder / "index.json").read_text())
    stream = TokenStream(folder, index["val"], index["dtype"])
    return stream.slice(0, len(stream))


def val_bytes(run_dir: str | Path) -> int:
    """UTF-8 bytes of a run's held-out text, for bits per byte."""
    return int(_run_data(run_dir)["val_bytes"])
