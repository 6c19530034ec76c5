"""The .mhc sidecar: the mHC mixing matrices of every layer in a small binary file.

Layout (all little-endian; docs/formats.md):
    magic     4 bytes  b"NMHC"
    version   u32      1
    n_streams u32      n
    n_layers  u32      L
    then for each layer, for the attention sublayer and then the FFN sublayer:
        h_pre [n] f32, h_post [n] f32, h_res [n, n] f32 (row-major)
The file size is therefore exactly 16 + L * 2 * (2n + n*n) * 4 bytes.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

MAGIC = b"NMHC"
VERSION = 1
HEADER = struct.Struct("<4sIII")

# Per layer: [(h_pre, h_post, h_res) of attention, (h_pre, h_post, h_res) of the FFN].
MhcLayers = list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]]


class MhcFileError(ValueError):
    """A .mhc file that is malformed or does not fit the model; the message says what mismatches."""


def file_size(n_streams: int, n_layers: int) -> int:
    return HEADER.size + n_layers * 2 * (2 * n_streams + n_streams * n_streams) * 4


def write_mhc(path: str | Path, layers: MhcLayers, n_streams: int) -> None:
    """Write the matrices of every layer; shapes are checked against n_streams."""
    n = n_streams
    chunks = [HEADER.pack(MAGIC, VERSION, n, len(layers))]
    for i, sublayers in enumerate(layers):
        if len(sublayers) != 2:
            raise MhcFileError(f"layer {i}: expected 2 sublayers (attention, FFN), got {len(sublayers)}")
        for h_pre, h_post, h_res in sublayers:
            for name, arr, shape in (("h_pre", h_pre, (n,)), ("h_post", h_post, (n,)), ("h_res", h_res, (n, n))):
                arr = np.asarray(arr, dtype="<f4")
                if arr.shape != shape:
                    raise MhcFileError(f"layer {i} {name}: expected shape {shape}, got {arr.shape}")
                chunks.append(arr.tobytes())
    Path(path).write_bytes(b"".join(chunks))


def read_mhc(path: str | Path, n_streams: int | None = None, n_layers: int | None = None) -> MhcLayers:
    """Read and validate a .mhc file; n_streams / n_layers, when given, must match the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MhcFileError(f"{path}: cannot read mHC file: {e}") from e
    if len(data) < HEADER.size:
        raise MhcFileError(f"{path}: too short for the mHC header: {len(data)} bytes, need {HEADER.size}")
    magic, version, n, layers = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise MhcFileError(f"{path}: bad magic: expected {MAGIC!r}, got {magic!r}")
    if version != VERSION:
        raise MhcFileError(f"{path}: unsupported version: expected {VERSION}, got {version}")
    if n not in (2, 4):
        raise MhcFileError(f"{path}: n_streams: expected 2 or 4, got {n}")
    if n_streams is not None and n != n_streams:
        raise MhcFileError(f"{path}: n_streams mismatch: model has {n_streams}, file has {n}")
    if n_layers is not None and layers != n_layers:
        raise MhcFileError(f"{path}: n_layers mismatch: model has {n_layers}, file has {layers}")
    if len(data) != file_size(n, layers):
        raise MhcFileError(f"{path}: size mismatch: expected {file_size(n, layers)} bytes for "
                           f"{layers} layers x {n} streams, got {len(data)}")
    values = np.frombuffer(data, dtype="<f4", offset=HEADER.size).astype(np.float32)
    if not np.isfinite(values).all():
        raise MhcFileError(f"{path}: holds non-finite values (NaN or inf)")
    out: MhcLayers = []
    per_sub = 2 * n + n * n
    for i in range(layers):
        subs = []
        for s in range(2):
            v = values[(2 * i + s) * per_sub:(2 * i + s + 1) * per_sub]
            subs.append((v[:n].copy(), v[n:2 * n].copy(), v[2 * n:].reshape(n, n).copy()))
        out.append(subs)
    return out
