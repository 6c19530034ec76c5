"""Model configuration: one dataclass, presets are named overrides of it.

The config is the single source of truth for the architecture: it is saved in every
checkpoint (config.json) and written as GGUF metadata; everything downstream reads it
from there.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A bad configuration value; the message names the field, what was expected and what was given."""


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2  # grouped-query attention: each kv head serves n_heads // n_kv_heads query heads
    ffn_mult: float = 3.5  # FFN hidden size = dim * ffn_mult, rounded up to a multiple of group_size
    max_seq_len: int = 512
    group_size: int = 128  # ternary weights share one scale per group of consecutive input weights
    weight_quant: str = "absmean"  # group scale: "absmean" (BitNet b1.58) or "absmax"
    activation_bits: int = 8  # per-token absmax fake-quant of BitLinear inputs; 0 = off
    mhc_streams: int = 1  # hyper-connection residual streams: 1 (plain residual), 2 or 4
    sub_norms: bool = False  # RMSNorm before o-proj and down-proj (BitNet b1.58 / llama.cpp "bitnet")
    tie_embeddings: bool = False  # output head shares the token embedding
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        hidden = int(self.dim * self.ffn_mult)
        return -(-hidden // self.group_size) * self.group_size

    def validate(self) -> None:
        def need(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ConfigError(f"model config field '{name}': expected {expected}, got {getattr(self, name)!r}")

        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "a positive integer")
        need(self.ffn_mult > 0, "ffn_mult", "a positive number")
        need(self.dim % self.n_heads == 0, "n_heads", f"a divisor of dim={self.dim}")
        need(self.head_dim % 2 == 0, "n_heads", f"an even head_dim (dim/n_heads), dim={self.dim}")
        need(self.n_heads % self.n_kv_heads == 0, "n_kv_heads", f"a divisor of n_heads={self.n_heads}")
        need(self.group_size in (64, 128, 256), "group_size", "one of 64, 128, 256")
        need(self.dim % self.group_size == 0, "group_size", f"a divisor of dim={self.dim}")
        need(self.weight_quant in ("absmean", "absmax"), "weight_quant", "'absmean' or 'absmax'")
        need(self.activation_bits in (0, 8), "activation_bits", "8 (int8) or 0 (off)")
        need(self.mhc_streams in (1, 2, 4), "mhc_streams", "1, 2 or 4")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"model config: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# Presets: a name plus overrides of the defaults above.
PRESETS: dict[str, dict] = {
    # Trains usefully on 2 CPU cores in about 10 minutes (the default job).
    "tiny": dict(vocab_size=4096, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_mult=3.5,
                 max_seq_len=512, group_size=128, mhc_streams=2),
    "nano-125m": dict(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_mult=3.5,
                      max_seq_len=2048, group_size=128, mhc_streams=2),
    "small-560m": dict(vocab_size=32000, dim=1536, n_layers=20, n_heads=16, n_kv_heads=4, ffn_mult=3.0,
                       max_seq_len=2048, group_size=128, mhc_streams=2),
    "medium-3b": dict(vocab_size=32000, dim=3072, n_layers=26, n_heads=24, n_kv_heads=8, ffn_mult=3.0,
                      max_seq_len=4096, group_size=128, mhc_streams=2),
}


def preset(name: str, **overrides) -> ModelConfig:
    """Build the config of a named preset, with optional field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


@dataclass
class SpecialTokens:
    """Special tokens shared by the tokenizer, the chat template and the GGUF export."""
    bos: str = "<|bos|>"
    user: str = "<|user|>"
    assistant: str = "<|assistant|>"
    end: str = "<|end|>"
    all: list[str] = field(default_factory=lambda: ["<|bos|>", "<|user|>", "<|assistant|>", "<|end|>"])


SPECIAL_TOKENS = SpecialTokens()
