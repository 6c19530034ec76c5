"""Corpus readers: turn a `--data` spec into a deterministic stream of documents.

A spec is one of
- None: the built-in corpus, the Python standard library's own `.py` sources (about 30 MB on
  CPython 3.11; site-packages, __pycache__ and the few test files that are not UTF-8 are skipped);
- a directory: every file below it with a known extension, in sorted path order (hidden entries,
  __pycache__, site-packages and node_modules are skipped, as are non-UTF-8 text files);
- a file: a text/code file (TEXT_EXTENSIONS) is one document; `.jsonl` gives one document per line
  from its "text" field; `.parquet` one per row of its "text" column;
- `hf:NAME` or `hf:NAME:CONFIG`: the "text" column of a Hugging Face dataset's train split,
  through `datasets` (imported only then; it downloads into the HF cache).

Each document has a stable name (path relative to the spec root, `file.jsonl:LINE`,
`file.parquet#ROW`, `NAME#INDEX`); the validation split is chosen by hashing that name.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

TEXT_EXTENSIONS = (".txt", ".md", ".rst", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go",
                   ".java", ".js", ".ts", ".sh", ".toml", ".yaml", ".yml", ".html", ".css")
RECORD_EXTENSIONS = (".jsonl", ".parquet")
SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", "node_modules"}
READER_VERSION = "corpus-v1"  # bump when reading or splitting changes, to invalidate caches


class DataError(ValueError):
    """Bad data input: the message names the file (and line) and what was expected."""


@dataclass
class Document:
    name: str
    text: str


@dataclass
class Corpus:
    """A deterministic, re-iterable document stream plus what identifies its content."""
    description: str
    fingerprint: str  # changes when any file's path, size or mtime changes
    approx_bytes: int  # size on disk (or the dataset's size): sizes progress bars and sampling
    _items: list = field(repr=False, default_factory=list)  # (kind, path or dataset, name)
    skipped: list[str] = field(default_factory=list)  # files left out because they are not UTF-8

    def documents(self) -> Iterator[Document]:
        """Every non-blank document, in corpus order (the same order on every call)."""
        self.skipped = []
        for kind, src, name in self._items:
            if kind == "text":
                doc = _read_text(src, name, strict=False)
                if doc is None:
                    self.skipped.append(name)
                elif doc.text.strip():
                    yield doc
            elif kind == "strict-text":
                doc = _read_text(src, name, strict=True)
                if doc.text.strip():
                    yield doc
            elif kind == "jsonl":
                yield from _read_jsonl(src, name)
            elif kind == "parquet":
                yield from _read_parquet(src, name)
            elif kind == "hf":
                yield from _read_hf(src, name)


def open_corpus(spec: str | None) -> Corpus:
    """The corpus for a `--data` spec (see the module docstring); errors name the bad path."""
    if spec is None:
        return _stdlib_corpus()
    if spec.startswith("hf:"):
        return _hf_corpus(spec[3:])
    path = Path(spec).expanduser()
    if path.is_dir():
        return _dir_corpus(path)
    if path.is_file():
        return _file_corpus(path)
    raise DataError(f"data path not found: {spec} (expected a file, a directory, or hf:{spec} for a Hugging Face dataset)")


def is_val_document(index: int, name: str, val_fraction: float) -> bool:
    """Deterministic split by document: a hash of the name picks ~val_fraction of documents.

    Document 0 always trains, so the training split is never empty.
    """
    if index == 0:
        return False
    h = int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < val_fraction


# ---------------------------------------------------------------------------------------------
# Building corpora

def _fingerprint(parts: list) -> str:
    return hashlib.sha256(json.dumps([READER_VERSION] + parts).encode("utf-8")).hexdigest()[:16]


def _walk(root: Path, extensions: tuple[str, ...]) -> list[Path]:
    """Files below root with one of the extensions, in sorted order, skipping hidden/vendored dirs."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        found += [Path(dirpath, f) for f in sorted(filenames) if not f.startswith(".") and f.endswith(extensions)]
    return found


def _files_corpus(description: str, root: Path, files: list[Path], strict: bool) -> Corpus:
    items, parts, total = [], [str(root.resolve())], 0
    for f in files:
        st = f.stat()
        name = f.relative_to(root).as_posix() if f != root else f.name
        kind = f.suffix if f.suffix in RECORD_EXTENSIONS else (".strict" if strict else ".text")
        items.append(({".jsonl": "jsonl", ".parquet": "parquet", ".strict": "strict-text", ".text": "text"}[kind], f, name))
        parts.append([name, st.st_size, st.st_mtime_ns])
        total += st.st_size
    return Corpus(description=f"{description}: {len(files)} files, {total / 1e6:.2f} MB",
                  fingerprint=_fingerprint(parts), approx_bytes=total, _items=items)


def _stdlib_corpus() -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = _walk(root, (".py",))
    if not files:
        raise DataError(f"built-in corpus: no .py files found under the standard library folder {root}")
    return _files_corpus(f"Python {sys.version.split()[0]} standard library ({root})", root, files, strict=False)


def _dir_corpus(root: Path) -> Corpus:
    files = _walk(root, TEXT_EXTENSIONS + RECORD_EXTENSIONS)
    if not files:
        raise DataError(f"data directory {root}: empty corpus, no files with extensions {' '.join(TEXT_EXTENSIONS + RECORD_EXTENSIONS)}")
    return _files_corpus(f"directory {root}", root, files, strict=False)


def _file_corpus(path: Path) -> Corpus:
    if path.suffix not in TEXT_EXTENSIONS + RECORD_EXTENSIONS:
        raise DataError(f"data file {path}: unknown extension {path.suffix!r}; expected one of {' '.join(TEXT_EXTENSIONS + RECORD_EXTENSIONS)}")
    return _files_corpus(f"file {path}", path.parent, [path], strict=True)


def _hf_corpus(spec: str) -> Corpus:
    name, _, config = spec.partition(":")
    try:
        import datasets
    except ImportError:
        raise DataError(f"could not load Hugging Face dataset {name}: the 'datasets' package is not installed "
                        f"(pip install datasets)") from None
    try:
        ds = datasets.load_dataset(name, config or None, split="train")
    except Exception as e:  # network, missing dataset, bad config: all mean the same to the user
        raise DataError(f"could not load Hugging Face dataset {name}: {type(e).__name__}: {e}") from e
    if "text" not in ds.column_names:
        raise DataError(f"Hugging Face dataset {name}: no 'text' column; columns are {ds.column_names}")
    size = int(ds.info.dataset_size or 0)
    return Corpus(description=f"Hugging Face dataset {spec}: {len(ds)} rows", approx_bytes=size,
                  fingerprint=_fingerprint(["hf", name, config, ds._fingerprint]), _items=[("hf", ds, name)])


# ---------------------------------------------------------------------------------------------
# Readers

def _read_text(path: Path, name: str, strict: bool) -> Document | None:
    """One document per file; a non-UTF-8 file is an error if named explicitly, else skipped (None)."""
    try:
        return Document(name, path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        if strict:
            raise DataError(f"{path}: not UTF-8 text ({e})") from None
        return None


def _read_jsonl(path: Path, name: str) -> Iterator[Document]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e})") from None
            if not isinstance(record, dict) or "text" not in record:
                got = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"{path}:{lineno}: expected an object with a 'text' field, got {got}")
            if not isinstance(record["text"], str):
                raise DataError(f"{path}:{lineno}: field 'text': expected a string, got {type(record['text']).__name__}")
            if record["text"].strip():
                yield Document(f"{name}:{lineno}", record["text"])


def _read_parquet(path: Path, name: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise DataError(f"{path}: not a readable parquet file ({e})") from e
    columns = pf.schema_arrow.names
    if "text" not in columns:
        raise DataError(f"{path}: no 'text' column; columns are {columns}")
    row = 0
    for batch in pf.iter_batches(columns=["text"], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text is not None and not isinstance(text, str):
                raise DataError(f"{path}: row {row}: column 'text': expected a string, got {type(text).__name__}")
            if text and text.strip():
                yield Document(f"{name}#{row}", text)
            row += 1


def _read_hf(ds, name: str) -> Iterator[Document]:
    for i, row in enumerate(ds):
        text = row["text"]
        if isinstance(text, str) and text.strip():
            yield Document(f"{name}#{i}", text)
