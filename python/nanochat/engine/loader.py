"""GGUF file -> validated config, tokenizer and engine weights (packed into the Rust kernels).

Everything is checked before use, and every failure is a `ModelFileError` naming the file and the
key or tensor: the architecture and format version, every config field, the exact set of tensors
with their GGML types and shapes (gguf_format.expected_tensors), each tensor's CRC32 against the
checksums written by export (so flipped bytes anywhere in the data are caught), valid TQ2_0 codes
with block scale 1, finite scales, norms and mHC matrices. An optional .mhc file replaces the mHC
matrices from the GGUF after its own checks (mhc_file.read_mhc).
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from nanochat import gguf_format as fmt
from nanochat.config import ConfigError, ModelConfig
from nanochat.engine import kernels
from nanochat.engine.gguf_file import GGUFFile, GGUFFormatError
from nanochat.engine.model import Embedding, LayerWeights, MhcMix, Weights
from nanochat.mhc_file import MhcFileError, read_mhc
from nanochat.tokenizer import TOKEN_CONTROL, Tokenizer


log = logging.getLogger(__name__)


class ModelFileError(ValueError):
    """A GGUF or .mhc file that is malformed, corrupt or does not match its own metadata."""


_META_TYPES = {"u32": int, "f64": float, "bool": bool, "str": str}


def read_config(f: GGUFFile) -> ModelConfig:
    arch = f.metadata.get(fmt.KEY_ARCH)
    if arch != fmt.ARCH:
        raise ModelFileError(f"{f.path}: {fmt.KEY_ARCH}: expected {fmt.ARCH!r}, got {arch!r}")
    version = f.metadata.get(fmt.KEY_FORMAT_VERSION)
    if version != fmt.FORMAT_VERSION:
        raise ModelFileError(f"{f.path}: {fmt.KEY_FORMAT_VERSION}: expected {fmt.FORMAT_VERSION}, got {version!r}")
    values = {}
    for field in dataclasses.fields(ModelConfig):
        key = fmt.KEY_CONFIG_PREFIX + field.name
        if key not in f.metadata:
            raise ModelFileError(f"{f.path}: missing metadata key {key!r}")
        value, want = f.metadata[key], _META_TYPES[fmt.config_value_type(field)]
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise ModelFileError(f"{f.path}: metadata {key!r}: expected {want.__name__}, got {value!r}")
        values[field.name] = value
    try:
        return ModelConfig.from_dict(values)
    except ConfigError as e:
        raise ModelFileError(f"{f.path}: bad model config in metadata: {e}") from e


def read_tokenizer(f: GGUFFile, cfg: ModelConfig) -> tuple[Tokenizer, set[int]]:
    """The tokenizer and the set of control token ids (generation stops on them)."""
    for key in (fmt.KEY_TOK_TOKENS, fmt.KEY_TOK_MERGES, fmt.KEY_TOK_TYPES):
        if key not in f.metadata:
            raise ModelFileError(f"{f.path}: missing metadata key {key!r}")
    tokens, merges, types = (f.metadata[k] for k in (fmt.KEY_TOK_TOKENS, fmt.KEY_TOK_MERGES, fmt.KEY_TOK_TYPES))
    for key, value in ((fmt.KEY_TOK_TOKENS, tokens), (fmt.KEY_TOK_MERGES, merges)):
        if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
            raise ModelFileError(f"{f.path}: metadata {key!r}: expected an array of strings")
    if not isinstance(types, np.ndarray) or types.dtype.kind not in "iu":
        raise ModelFileError(f"{f.path}: metadata {fmt.KEY_TOK_TYPES!r}: expected an array of integers")
    types = [int(t) for t in types]
    if len(tokens) != cfg.vocab_size or len(types) != cfg.vocab_size:
        raise ModelFileError(f"{f.path}: tokenizer has {len(tokens)} tokens and {len(types)} token types, "
                             f"expected vocab_size={cfg.vocab_size}")
    try:
        tok = Tokenizer.from_vocab_merges(list(tokens), list(merges), types)
    except Exception as e:  # noqa: BLE001 - `tokenizers` raises plain Exceptions on bad vocabularies
        raise ModelFileError(f"{f.path}: bad tokenizer in metadata: {e}") from e
    for key, want in ((fmt.KEY_TOK_BOS, tok.bos_id), (fmt.KEY_USER_ID, tok.user_id),
                      (fmt.KEY_ASSISTANT_ID, tok.assistant_id), (fmt.KEY_END_ID, tok.end_id)):
        if f.metadata.get(key) != want:
            raise ModelFileError(f"{f.path}: metadata {key!r}: expected {want}, got {f.metadata.get(key)!r}")
    return tok, {i for i, t in enumerate(types) if t == TOKEN_CONTROL}


def check_tensors(f: GGUFFile, cfg: ModelConfig, embed: str, head: str, ternary: str) -> None:
    """Exactly the expected tensors, with the expected types, shapes and checksums."""
    specs = {s.name: s for s in fmt.expected_tensors(cfg, embed, head, ternary)}
    missing = [n for n in specs if n not in f.tensors]
    if missing:
        raise ModelFileError(f"{f.path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    extra = [n for n in f.tensors if n not in specs]
    if extra:
        raise ModelFileError(f"{f.path}: unexpected tensor(s) {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    crcs = f.metadata.get(fmt.KEY_TENSOR_CRC32)
    if not isinstance(crcs, np.ndarray) or crcs.dtype.kind not in "iu" or len(crcs) != len(f.tensors):
        raise ModelFileError(f"{f.path}: metadata {fmt.KEY_TENSOR_CRC32!r}: expected an array of {len(f.tensors)} "
                             f"u32 checksums, got {type(crcs).__name__} {getattr(crcs, 'shape', '')}")
    for (name, info), want in zip(f.tensors.items(), crcs):
        spec = specs[name]
        if info.ggml_type != spec.ggml_type:
            raise ModelFileError(f"{f.path}: tensor '{name}': type {info.ggml_type.name}, expected {spec.ggml_type.name}")
        if info.shape != spec.shape:
            raise ModelFileError(f"{f.path}: tensor '{name}': shape {list(info.shape)}, expected {list(spec.shape)}")
        got = zlib.crc32(f.raw(name))
        if got != int(want):
            raise ModelFileError(f"{f.path}: tensor '{name}' is corrupt: crc32 {got:#010x}, expected {int(want):#010x}")


def finite(f: GGUFFile, name: str) -> np.ndarray:
    arr = np.array(f.array(name), dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ModelFileError(f"{f.path}: tensor '{name}' holds non-finite values")
    return arr


def ternary_codes(f: GGUFFile, name: str, k: int) -> np.ndarray:
    """TQ2_0 / TQ1_0 tensor -> int8 codes [M, K] (padding dropped); block scales must be 1."""
    m, kp = f.tensors[name].shape
    if f.tensors[name].ggml_type == gguf.GGMLQuantizationType.TQ1_0:
        codes = gguf.quants.dequantize(np.asarray(f.raw(name)).reshape(m, -1), gguf.GGMLQuantizationType.TQ1_0)
        if not np.isin(codes, (-1.0, 0.0, 1.0)).all():
            raise ModelFileError(f"{f.path}: tensor '{name}': TQ1_0 values must be ternary codes (block scale 1)")
        if codes[:, k:].any():
            raise ModelFileError(f"{f.path}: tensor '{name}': non-zero codes in the padding beyond K={k}")
        return codes[:, :k].astype(np.int8)
    q, d = fmt.unpack_tq2_0(f.raw(name).reshape(m, -1), kp)
    if (d != 1.0).any():
        raise ModelFileError(f"{f.path}: tensor '{name}': TQ2_0 block scale d must be 1 (codes only), "
                             f"found {d[d != 1.0][0]}")
    if (q == 3).any():
        raise ModelFileError(f"{f.path}: tensor '{name}': invalid ternary code (2-bit value 3)")
    if (q[:, k:] != 1).any():
        raise ModelFileError(f"{f.path}: tensor '{name}': non-zero codes in the padding beyond K={k}")
    return q[:, :k].astype(np.int8) - np.int8(1)


def ternary_matrix(f: GGUFFile, cfg: ModelConfig, layer: int, names: list[str]):
    """One TernaryMatrix from the row-wise concatenation of the named linears of a layer."""
    shapes = fmt.linear_shapes(cfg)
    codes, scales = [], []
    for n in names:
        k = shapes[n][1]
        codes.append(ternary_codes(f, fmt.blk(layer, f"{n}.weight"), k))
        s = finite(f, fmt.blk(layer, f"{n}.scale"))
        if (s <= 0).any():
            raise ModelFileError(f"{f.path}: tensor '{fmt.blk(layer, n + '.scale')}' holds scales <= 0")
        scales.append(s)
    return kernels.TernaryMatrix(np.ascontiguousarray(np.concatenate(codes)),
                                 np.ascontiguousarray(np.concatenate(scales)), cfg.group_size)


def dequantized(f: GGUFFile, name: str) -> np.ndarray:
    info = f.tensors[name]
    if info.ggml_type == gguf.GGMLQuantizationType.F16:
        return f.array(name).astype(np.float32)
    return gguf.quants.dequantize(np.asarray(f.raw(name)).reshape(info.shape[0], -1), info.ggml_type)


def embedding(f: GGUFFile) -> Embedding:
    info = f.tensors[fmt.TOKEN_EMBD]
    if info.ggml_type == gguf.GGMLQuantizationType.F16:
        return Embedding(np.array(f.array(fmt.TOKEN_EMBD)), None)
    v, dim = info.shape
    blocks = np.asarray(f.raw(fmt.TOKEN_EMBD)).reshape(v, dim // 32, 34)  # Q8_0: f16 d, then 32 int8
    d = np.ascontiguousarray(blocks[:, :, :2]).view(np.float16)[..., 0].astype(np.float32)
    q = np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).reshape(v, dim)
    return Embedding(q, d)


def mhc_mix(f: GGUFFile, layer: int, sub: str) -> MhcMix:
    return MhcMix(*(finite(f, fmt.blk(layer, f"{sub}.{part}")) for part in fmt.MHC_PARTS))


def load(path: str | Path, mhc_path: str | Path | None = None) -> tuple[ModelConfig, Weights, Tokenizer, set[int]]:
    """Read and validate a GGUF (and optional .mhc override) into engine weights."""
    try:
        f = GGUFFile(path)
    except GGUFFormatError as e:
        raise ModelFileError(str(e)) from e
    cfg = read_config(f)
    if cfg.activation_bits == 0:
        log.warning("%s: model trained without activation quantization (activation_bits=0); the CPU kernels "
                    "quantize activations to int8 per token, so outputs differ slightly from training", f.path)
    embed, head = f.metadata.get(fmt.KEY_EMBED_TYPE), f.metadata.get(fmt.KEY_HEAD_TYPE)
    for key, value in ((fmt.KEY_EMBED_TYPE, embed), (fmt.KEY_HEAD_TYPE, head)):
        if value not in ("q8_0", "f16"):
            raise ModelFileError(f"{f.path}: metadata {key!r}: expected 'q8_0' or 'f16', got {value!r}")
    ternary = f.metadata.get(fmt.KEY_TERNARY_TYPE, "tq2_0")  # files from before the key existed are TQ2_0
    if ternary not in ("tq2_0", "tq1_0"):
        raise ModelFileError(f"{f.path}: metadata {fmt.KEY_TERNARY_TYPE!r}: expected 'tq2_0' or 'tq1_0', got {ternary!r}")
    check_tensors(f, cfg, embed, head, ternary)
    tokenizer, control_ids = read_tokenizer(f, cfg)

    override = None
    if mhc_path is not None:
        if cfg.mhc_streams == 1:
            raise ModelFileError(f"{mhc_path}: an mHC file was given but the model {f.path} has mhc_streams=1")
        try:
            override = read_mhc(mhc_path, cfg.mhc_streams, cfg.n_layers)
        except MhcFileError as e:
            raise ModelFileError(str(e)) from e

    layers = []
    for i in tqdm(range(cfg.n_layers), desc="load layers", unit="layer", disable=cfg.n_layers < 8):
        lw = LayerWeights(
            attn_norm=finite(f, fmt.blk(i, "attn_norm.weight")),
            qkv=ternary_matrix(f, cfg, i, ["attn_q", "attn_k", "attn_v"]),
            o=ternary_matrix(f, cfg, i, ["attn_output"]),
            ffn_norm=finite(f, fmt.blk(i, "ffn_norm.weight")),
            gate_up=ternary_matrix(f, cfg, i, ["ffn_gate", "ffn_up"]),
            down=ternary_matrix(f, cfg, i, ["ffn_down"]),
        )
        if cfg.sub_norms:
            lw.attn_sub_norm = finite(f, fmt.blk(i, "attn_sub_norm.weight"))
            lw.ffn_sub_norm = finite(f, fmt.blk(i, "ffn_sub_norm.weight"))
        if cfg.mhc_streams > 1:
            if override is None:
                lw.attn_mhc, lw.ffn_mhc = mhc_mix(f, i, "attn_mhc"), mhc_mix(f, i, "ffn_mhc")
            else:
                lw.attn_mhc, lw.ffn_mhc = (MhcMix(*mats) for mats in override[i])
        layers.append(lw)

    emb = embedding(f)
    head_w = emb.table() if cfg.tie_embeddings else dequantized(f, fmt.OUTPUT)
    if not np.isfinite(head_w).all():
        raise ModelFileError(f"{f.path}: output head / embedding holds non-finite values")
    head = kernels.Int8Matrix.from_f32(np.ascontiguousarray(head_w))
    head = share_pages(layers, head)
    weights = Weights(emb, layers, finite(f, fmt.OUTPUT_NORM), head)
    return cfg, weights, tokenizer, control_ids


MATRICES = ("qkv", "o", "gate_up", "down")


def share_pages(layers: list[LayerWeights], head):
    """Move every layer matrix and the head into shared huge-page mappings (kernels.share_weight_pages), in
    place in `layers`; returns the new head. A decode step streams all of them, and on 4 KiB pages their
    ~12,000 pages miss the TLB on every step."""
    mats = kernels.share_weight_pages([getattr(lw, name) for lw in layers for name in MATRICES] + [head])
    for i, lw in enumerate(layers):
        for j, name in enumerate(MATRICES):
            setattr(lw, name, mats[i * len(MATRICES) + j])
    return mats[-1]
