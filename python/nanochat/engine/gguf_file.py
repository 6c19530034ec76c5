"""A small, strict GGUF reader: every read is bounds-checked, so a bad file gives a clear error.

gguf-py's GGUFReader trusts the file and fails deep inside numpy on a truncated one; here each
header field, metadata value and tensor range is checked against the file size, and errors name
the file and the field or tensor being read. Tensor data is memory-mapped, not copied.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4

# GGUF metadata value types -> struct format of a scalar
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_NP_ARRAY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}


class GGUFFormatError(ValueError):
    """The file is not a well-formed GGUF file; the message names the file and what failed."""


@dataclass
class TensorInfo:
    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (GGUF dims reversed)
    offset: int  # absolute file offset of the data
    nbytes: int


class _Cursor:
    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise GGUFFormatError(f"{self.path}: truncated or corrupt while reading {what} at byte {self.pos} "
                                  f"(needs {n} bytes, file has {len(self.buf)})")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", f"{what} length")
        raw = self.take(n, what)
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFFormatError(f"{self.path}: {what} is not valid UTF-8 at byte {self.pos - n}: {e}") from e

    def value(self, vtype: int, what: str):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            item_type = self.scalar("<I", f"{what} item type")
            count = self.scalar("<Q", f"{what} item count")
            if count > len(self.buf) - self.pos:
                raise GGUFFormatError(f"{self.path}: {what}: array of {count} items cannot fit in the file")
            if item_type in _NP_ARRAY:
                dtype = np.dtype(_NP_ARRAY[item_type])
                arr = np.frombuffer(self.take(count * dtype.itemsize, what), dtype=dtype)
                return arr.astype(bool) if item_type == 7 else arr
            if item_type == _STRING:
                return [self.string(f"{what}[{j}]") for j in range(count)]
            raise GGUFFormatError(f"{self.path}: {what}: unsupported array item type {item_type}")
        raise GGUFFormatError(f"{self.path}: {what}: unknown value type {vtype}")


class GGUFFile:
    """Parsed header, metadata and tensor table of a GGUF file, with memory-mapped tensor data."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._mmap = np.memmap(self.path, mode="r", dtype=np.uint8)
        except (OSError, ValueError) as e:
            raise GGUFFormatError(f"{self.path}: cannot open: {e}") from e
        cur = _Cursor(memoryview(self._mmap), self.path)
        magic = bytes(cur.take(4, "magic"))
        if magic != GGUF_MAGIC:
            raise GGUFFormatError(f"{self.path}: not a GGUF file: magic {magic!r}, expected {GGUF_MAGIC!r}")
        self.version = cur.scalar("<I", "version")
        if self.version not in (2, 3):
            raise GGUFFormatError(f"{self.path}: unsupported GGUF version {self.version}, expected 3")
        n_tensors = cur.scalar("<Q", "tensor count")
        n_kv = cur.scalar("<Q", "metadata count")
        if n_tensors > 1 << 20 or n_kv > 1 << 20:
            raise GGUFFormatError(f"{self.path}: implausible counts: {n_tensors} tensors, {n_kv} metadata keys")
        self.metadata: dict[str, object] = {}
        for j in range(n_kv):
            key = cur.string(f"metadata key #{j}")
            vtype = cur.scalar("<I", f"type of metadata '{key}'")
            self.metadata[key] = cur.value(vtype, f"metadata '{key}'")
        infos = []
        for j in range(n_tensors):
            name = cur.string(f"tensor #{j} name")
            n_dims = cur.scalar("<I", f"tensor '{name}' dim count")
            if not 1 <= n_dims <= MAX_DIMS:
                raise GGUFFormatError(f"{self.path}: tensor '{name}': {n_dims} dims, expected 1..{MAX_DIMS}")
            dims = [cur.scalar("<Q", f"tensor '{name}' dims") for _ in range(n_dims)]
            raw_type = cur.scalar("<I", f"tensor '{name}' type")
            offset = cur.scalar("<Q", f"tensor '{name}' offset")
            infos.append((name, dims, raw_type, offset))
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFFormatError(f"{self.path}: general.alignment must be a power of two, got {alignment!r}")
        data_start = -(-cur.pos // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, raw_type, offset in infos:
            self.tensors[name] = self._tensor_info(name, dims, raw_type, data_start + offset)

    def _tensor_info(self, name: str, dims: list[int], raw_type: int, offset: int) -> TensorInfo:
        try:
            ggml_type = GGMLQuantizationType(raw_type)
        except ValueError:
            raise GGUFFormatError(f"{self.path}: tensor '{name}': unknown GGML type {raw_type}") from None
        if name in self.tensors:
            raise GGUFFormatError(f"{self.path}: tensor '{name}' appears twice")
        block, type_size = GGML_QUANT_SIZES[ggml_type]
        if any(d <= 0 or d > 1 << 40 for d in dims) or dims[0] % block:
            raise GGUFFormatError(f"{self.path}: tensor '{name}': bad dims {dims} for {ggml_type.name}")
        nbytes = int(np.prod(dims, dtype=object)) // block * type_size
        if offset + nbytes > len(self._mmap):
            raise GGUFFormatError(f"{self.path}: tensor '{name}' data (bytes {offset}..{offset + nbytes}) runs past the "
                                  f"end of the file ({len(self._mmap)} bytes): file truncated?")
        return TensorInfo(name, ggml_type, tuple(reversed(dims)), offset, nbytes)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes (uint8, read-only view of the file)."""
        info = self.tensors[name]
        return self._mmap[info.offset:info.offset + info.nbytes]

    def array(self, name: str) -> np.ndarray:
        """F32 / F16 tensors as numpy arrays of their shape (views, not copies, for F32)."""
        info = self.tensors[name]
        dtype = {GGMLQuantizationType.F32: "<f4", GGMLQuantizationType.F16: "<f2"}[info.ggml_type]
        return self.raw(name).view(dtype).reshape(info.shape)
