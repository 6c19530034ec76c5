"""Server settings: one dataclass whose fields also define the command-line flags.

Each field carries its help text and flag group in its metadata; `build_parser` turns the fields
into kebab-case flags (`max_batch` -> `--max-batch`), so a new setting is one new field.
Numeric limits use -1 for "off" where that makes sense. The API key may also come from the
environment (NANOCHAT_API_KEY) so it stays out of the process list.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

# Request limits (defaults of the flags below).
DEFAULT_MAX_REQUEST_BYTES = 1_000_000  # a request body bigger than this gets 413
DEFAULT_MAX_TOKENS_LIMIT = 4096  # max_tokens above this gets 400
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions when max_tokens is omitted


def _setting(default, help: str, group: str):
    return field(default=default, metadata={"help": help, "group": group})


@dataclass
class Settings:
    # model
    model: str = _setting("", "path to the model .gguf file (required)", "model")
    mhc: str | None = _setting(None, "mHC sidecar file overriding the GGUF's mHC parameters", "model")
    model_name: str | None = _setting(None, "model id reported by /v1/models (default: the GGUF file stem)", "model")
    threads: int = _setting(-1, "CPU threads for the kernels (-1 = the engine's default)", "model")
    # network
    host: str = _setting("127.0.0.1", "address to bind (loopback by default)", "network")
    port: int = _setting(8080, "TCP port", "network")
    api_key: str | None = _setting(None, "require 'Authorization: Bearer KEY' on /v1 routes (env NANOCHAT_API_KEY)", "network")
    log_level: str = _setting("info", "uvicorn log level: debug, info, warning, error", "network")
    # batching and limits
    max_batch: int = _setting(8, "sequences decoded together in one batch", "limits")
    max_queue: int = _setting(64, "requests waiting for a batch slot before new ones get 429", "limits")
    max_request_bytes: int = _setting(DEFAULT_MAX_REQUEST_BYTES, "largest accepted request body in bytes", "limits")
    max_tokens_limit: int = _setting(DEFAULT_MAX_TOKENS_LIMIT, "largest accepted max_tokens", "limits")

    def __post_init__(self) -> None:
        if self.api_key is None:
            self.api_key = os.environ.get("NANOCHAT_API_KEY") or None
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ValueError(f"setting --{name.replace('_', '-')}: expected {expected}, got {getattr(self, name)!r}")

        need(self.threads == -1 or self.threads > 0, "threads", "a positive integer or -1")
        need(0 < self.port < 65536, "port", "a TCP port in 1..65535")
        need(self.max_batch > 0, "max_batch", "a positive integer")
        need(self.max_queue > 0, "max_queue", "a positive integer")
        need(self.max_request_bytes > 0, "max_request_bytes", "a positive integer")
        need(self.max_tokens_limit > 0, "max_tokens_limit", "a positive integer")
        need(self.log_level in ("debug", "info", "warning", "error", "critical"), "log_level", "debug, info, warning or error")

    @property
    def served_model_name(self) -> str:
        return self.model_name or Path(self.model).stem or "nanochat"


def build_parser() -> argparse.ArgumentParser:
    """One flag per Settings field, grouped as the field metadata says."""
    parser = argparse.ArgumentParser(
        prog="python -m nanochat.serve",
        description="Serve a nanochat-ternary GGUF model with an OpenAI-compatible API and a web chat page.",
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(Settings):
        group_name = f.metadata["group"]
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name)
        flag = "--" + f.name.replace("_", "-")
        value_type = type(f.default) if f.default is not None else str
        groups[group_name].add_argument(
            flag, dest=f.name, type=value_type, default=f.default,
            required=(f.name == "model"), help=f.metadata["help"] + (f" (default {f.default})" if f.default not in (None, "") else ""),
        )
    return parser


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Parse command-line flags into Settings; a bad value exits with the flag named."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return Settings(**vars(args))
    except ValueError as e:
        parser.error(str(e))
