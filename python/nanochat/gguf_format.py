"""The GGUF layout of a nanochat-ternary model: tensor names, types, shapes and metadata keys.

Export writes exactly this and the engine loader checks exactly this; docs/formats.md explains it.
Ternary weights are standard TQ2_0 tensors (default; or TQ1_0, 1.69 bits, by option) that hold
the codes (block scale d = 1, so gguf-py's dequantize gives back codes in {-1,0,1}); the per-group
scales sit beside them as F32. TQ2_0/TQ1_0 blocks are 256 wide along K, so a weight whose K is not
a multiple of 256 is stored with zero codes appended up to the next multiple (`padded_k`); the
scale tensor keeps the true K.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from gguf import GGMLQuantizationType as GGMLType

from nanochat.config import ModelConfig

ARCH = "nanochat-ternary"
FORMAT_VERSION = 1
TQ2_BLOCK = 256  # elements per TQ2_0 block: 64 bytes of 2-bit codes + an f16 scale d
TQ2_BLOCK_BYTES = 66

# ---------------------------------------------------------------------------------------------
# Metadata keys

KEY_ARCH = "general.architecture"
KEY_NAME = "general.name"
KEY_FORMAT_VERSION = f"{ARCH}.format_version"
KEY_CONFIG_PREFIX = f"{ARCH}.config."  # + every ModelConfig field name
KEY_TENSOR_CRC32 = f"{ARCH}.tensor_crc32"  # u32 array: zlib.crc32 of each tensor's bytes, in tensor-info order
KEY_EMBED_TYPE = f"{ARCH}.embed_type"  # "q8_0" | "f16"
KEY_HEAD_TYPE = f"{ARCH}.head_type"
KEY_TERNARY_TYPE = f"{ARCH}.ternary_type"  # "tq2_0" | "tq1_0"
KEY_USER_ID = f"{ARCH}.tokenizer.user_id"
KEY_ASSISTANT_ID = f"{ARCH}.tokenizer.assistant_id"
KEY_END_ID = f"{ARCH}.tokenizer.end_id"
KEY_TOK_MODEL = "tokenizer.ggml.model"  # "gpt2" (byte-level BPE)
KEY_TOK_TOKENS = "tokenizer.ggml.tokens"
KEY_TOK_MERGES = "tokenizer.ggml.merges"
KEY_TOK_TYPES = "tokenizer.ggml.token_type"
KEY_TOK_BOS = "tokenizer.ggml.bos_token_id"
KEY_TOK_EOS = "tokenizer.ggml.eos_token_id"

# ---------------------------------------------------------------------------------------------
# Tensor names

TOKEN_EMBD = "token_embd.weight"
OUTPUT_NORM = "output_norm.weight"
OUTPUT = "output.weight"

# model.py state_dict suffix -> GGUF name suffix, for the ternary linears of block i
TERNARY_LINEARS = {
    "attn.q": "attn_q", "attn.k": "attn_k", "attn.v": "attn_v", "attn.o": "attn_output",
    "ffn.gate": "ffn_gate", "ffn.up": "ffn_up", "ffn.down": "ffn_down",
}
NORMS = {"attn_norm": "attn_norm", "ffn_norm": "ffn_norm"}
SUB_NORMS = {"attn.sub_norm": "attn_sub_norm", "ffn.sub_norm": "ffn_sub_norm"}
MHC_SUBLAYERS = ("attn_mhc", "ffn_mhc")
MHC_PARTS = ("h_pre", "h_post", "h_res")


def blk(i: int, name: str) -> str:
    return f"blk.{i}.{name}"


def padded_k(k: int) -> int:
    """K rounded up to whole TQ2_0 blocks."""
    return -(-k // TQ2_BLOCK) * TQ2_BLOCK


def n_groups(k: int, group_size: int) -> int:
    return -(-k // group_size)


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """GGUF linear suffix -> (M rows = outputs, K cols = inputs)."""
    d, hd, f = cfg.dim, cfg.head_dim, cfg.ffn_hidden
    return {
        "attn_q": (cfg.n_heads * hd, d), "attn_k": (cfg.n_kv_heads * hd, d), "attn_v": (cfg.n_kv_heads * hd, d),
        "attn_output": (d, cfg.n_heads * hd), "ffn_gate": (f, d), "ffn_up": (f, d), "ffn_down": (d, f),
    }


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    ggml_type: GGMLType
    shape: tuple[int, ...]  # numpy order (rows, cols); GGUF stores it reversed


def expected_tensors(cfg: ModelConfig, embed_type: str = "q8_0", head_type: str = "q8_0",
                     ternary: str = "tq2_0") -> list[TensorSpec]:
    """Every tensor a valid file holds, with its type and (element) shape."""
    emb = float_type(embed_type, "embed_type")
    tern = ternary_type(ternary)
    specs = [TensorSpec(TOKEN_EMBD, emb, (cfg.vocab_size, cfg.dim))]
    for i in range(cfg.n_layers):
        specs.append(TensorSpec(blk(i, "attn_norm.weight"), GGMLType.F32, (cfg.dim,)))
        specs.append(TensorSpec(blk(i, "ffn_norm.weight"), GGMLType.F32, (cfg.dim,)))
        for name, (m, k) in linear_shapes(cfg).items():
            specs.append(TensorSpec(blk(i, f"{name}.weight"), tern, (m, padded_k(k))))
            specs.append(TensorSpec(blk(i, f"{name}.scale"), GGMLType.F32, (m, n_groups(k, cfg.group_size))))
        if cfg.sub_norms:
            specs.append(TensorSpec(blk(i, "attn_sub_norm.weight"), GGMLType.F32, (cfg.n_heads * cfg.head_dim,)))
            specs.append(TensorSpec(blk(i, "ffn_sub_norm.weight"), GGMLType.F32, (cfg.ffn_hidden,)))
        if cfg.mhc_streams > 1:
            n = cfg.mhc_streams
            for sub in MHC_SUBLAYERS:
                specs.append(TensorSpec(blk(i, f"{sub}.h_pre"), GGMLType.F32, (n,)))
                specs.append(TensorSpec(blk(i, f"{sub}.h_post"), GGMLType.F32, (n,)))
                specs.append(TensorSpec(blk(i, f"{sub}.h_res"), GGMLType.F32, (n, n)))
    specs.append(TensorSpec(OUTPUT_NORM, GGMLType.F32, (cfg.dim,)))
    if not cfg.tie_embeddings:
        specs.append(TensorSpec(OUTPUT, float_type(head_type, "head_type"), (cfg.vocab_size, cfg.dim)))
    return specs


def float_type(name: str, what: str) -> GGMLType:
    types = {"q8_0": GGMLType.Q8_0, "f16": GGMLType.F16}
    if name not in types:
        raise ValueError(f"{what}: expected 'q8_0' or 'f16', got {name!r}")
    return types[name]


def ternary_type(name: str) -> GGMLType:
    types = {"tq2_0": GGMLType.TQ2_0, "tq1_0": GGMLType.TQ1_0}
    if name not in types:
        raise ValueError(f"ternary_type: expected 'tq2_0' or 'tq1_0', got {name!r}")
    return types[name]


def config_value_type(field: dataclasses.Field) -> str:
    """How a ModelConfig field is stored: ints as u32, floats as f64 (exact round trip), bools, strings."""
    return {"int": "u32", "float": "f64", "bool": "bool", "str": "str"}[field.type if isinstance(field.type, str) else field.type.__name__]


# ---------------------------------------------------------------------------------------------
# TQ2_0 packing of ternary codes (ggml block_tq2_0: qs[64] then f16 d; element order below)

def pack_tq2_0(codes: np.ndarray) -> np.ndarray:
    """int8 codes [M, Kp] in {-1,0,1}, Kp a multiple of 256 -> uint8 [M, Kp/256*66] with d = 1.

    Within a block, element 128*h + 32*j + l lives in byte 32*h + l at bits 2j..2j+1, as code+1.
    """
    m, kp = codes.shape
    assert kp % TQ2_BLOCK == 0, kp
    q = (codes.astype(np.int16) + 1).astype(np.uint8).reshape(m, kp // TQ2_BLOCK, 2, 4, 32)
    packed = q[:, :, :, 0] | (q[:, :, :, 1] << 2) | (q[:, :, :, 2] << 4) | (q[:, :, :, 3] << 6)
    d = np.full((m, kp // TQ2_BLOCK, 1), np.float16(1.0)).view(np.uint8)
    return np.concatenate([packed.reshape(m, kp // TQ2_BLOCK, 64), d], axis=-1).reshape(m, -1)


def unpack_tq2_0(raw: np.ndarray, kp: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [M, Kp/256*66] -> (codes+1 as uint8 [M, Kp] in 0..3, block scales d f32 [M, Kp/256])."""
    m = raw.shape[0]
    blocks = raw.reshape(m, kp // TQ2_BLOCK, TQ2_BLOCK_BYTES)
    qs = blocks[:, :, :64].reshape(m, kp // TQ2_BLOCK, 2, 1, 32)
    shifted = (qs >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 1, 4, 1)) & 3
    d = np.ascontiguousarray(blocks[:, :, 64:]).view(np.float16).reshape(m, -1).astype(np.float32)
    return shifted.reshape(m, kp), d
