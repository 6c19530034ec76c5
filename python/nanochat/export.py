"""Export a trained checkpoint to one self-contained GGUF file (+ the .mhc sidecar).

    python -m nanochat.export --checkpoint runs/tiny --output model.gguf [--embed q8_0|f16] [--head q8_0|f16]
                              [--ternary tq1_0|tq2_0]

The file holds the model config as metadata, the tokenizer, the ternary weights as TQ1_0 (default) or TQ2_0 codes with
F32 per-group scales, F32 norms and mHC matrices, and the embedding / output head as Q8_0 or F16
(docs/formats.md). The export is exact: the codes and scales written are quant.weight_scales_codes
of the checkpoint's weights, bit for bit. With mhc_streams > 1 a `model.mhc` sidecar is written
next to the GGUF (mhc_file.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import zlib
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm import tqdm

from nanochat import gguf_format as fmt
from nanochat import quant
from nanochat.config import ModelConfig
from nanochat.mhc_file import write_mhc


def ternary_tensors(w: torch.Tensor, cfg: ModelConfig, ternary: str = "tq1_0") -> tuple[np.ndarray, np.ndarray]:
    """A BitLinear shadow weight [M, K] -> (TQ2_0 / TQ1_0 blocks of the codes, scales f32 [M, G])."""
    codes, scales = quant.weight_scales_codes(w.detach().float(), cfg.group_size, cfg.weight_quant)
    codes = codes.numpy()
    if not np.isfinite(scales.numpy()).all():
        raise ValueError(f"weight of shape {tuple(w.shape)} has non-finite values: the run diverged, refusing to export")
    m, k = codes.shape
    padded = np.zeros((m, fmt.padded_k(k)), dtype=np.int8)
    padded[:, :k] = codes  # zero codes in the padding contribute nothing
    if ternary == "tq1_0":  # gguf-py's quantizer: d = block absmax (1, or 0 for an all-zero block), exact
        return gguf.quants.quantize(padded.astype(np.float32), gguf.GGMLQuantizationType.TQ1_0), scales.numpy()
    return fmt.pack_tq2_0(padded), scales.numpy().astype(np.float32)


def float_tensor(w: torch.Tensor, kind: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """Embedding / head [V, D] as Q8_0 blocks or F16."""
    ggml_type = fmt.float_type(kind, "embed/head type")
    w32 = w.detach().float().cpu().numpy()
    if ggml_type == gguf.GGMLQuantizationType.F16:
        return w32.astype(np.float16), ggml_type
    return gguf.quants.quantize(w32, ggml_type), ggml_type


def collect_tensors(model: torch.nn.Module, cfg: ModelConfig, embed: str, head: str,
                    ternary: str = "tq1_0") -> dict[str, tuple[np.ndarray, object]]:
    """GGUF name -> (array, raw GGML type or None for plain F32), in file order."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    f32 = lambda t: t.float().numpy().astype(np.float32)  # noqa: E731
    out: dict[str, tuple[np.ndarray, object]] = {}
    out[fmt.TOKEN_EMBD] = float_tensor(sd["tok_emb.weight"], embed)
    for i in tqdm(range(cfg.n_layers), desc="export layers", unit="layer"):
        p = f"blocks.{i}."
        for src, dst in fmt.NORMS.items():
            out[fmt.blk(i, f"{dst}.weight")] = (f32(sd[p + src + ".weight"]), None)
        for src, dst in fmt.TERNARY_LINEARS.items():
            packed, scales = ternary_tensors(sd[p + src + ".weight"], cfg, ternary)
            out[fmt.blk(i, f"{dst}.weight")] = (packed, fmt.ternary_type(ternary))
            out[fmt.blk(i, f"{dst}.scale")] = (scales, None)
        if cfg.sub_norms:
            for src, dst in fmt.SUB_NORMS.items():
                out[fmt.blk(i, f"{dst}.weight")] = (f32(sd[p + src + ".weight"]), None)
        if cfg.mhc_streams > 1:
            for sub, mats in zip(fmt.MHC_SUBLAYERS, mhc_matrices(model, i)):
                for part, m in zip(fmt.MHC_PARTS, mats):
                    out[fmt.blk(i, f"{sub}.{part}")] = (m, None)
    out[fmt.OUTPUT_NORM] = (f32(sd["norm.weight"]), None)
    if not cfg.tie_embeddings:
        out[fmt.OUTPUT] = float_tensor(sd["lm_head.weight"], head)
    return out


def mhc_matrices(model: torch.nn.Module, layer: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """[(h_pre, h_post, h_res) of attention, same of the FFN] of one block, as f32 numpy."""
    block = model.blocks[layer]
    with torch.no_grad():
        return [tuple(m.detach().float().cpu().numpy().astype(np.float32) for m in sub.matrices())
                for sub in (block.attn_mhc, block.ffn_mhc)]


def tokenizer_metadata(writer: gguf.GGUFWriter, tokenizer) -> None:
    tokens, merges, token_types = tokenizer.to_vocab_merges()
    writer.add_string(fmt.KEY_TOK_MODEL, "gpt2")
    writer.add_array(fmt.KEY_TOK_TOKENS, list(tokens))
    writer.add_array(fmt.KEY_TOK_MERGES, list(merges))
    writer.add_array(fmt.KEY_TOK_TYPES, [int(t) for t in token_types])
    writer.add_uint32(fmt.KEY_TOK_BOS, tokenizer.bos_id)
    writer.add_uint32(fmt.KEY_TOK_EOS, tokenizer.end_id)
    writer.add_uint32(fmt.KEY_USER_ID, tokenizer.user_id)
    writer.add_uint32(fmt.KEY_ASSISTANT_ID, tokenizer.assistant_id)
    writer.add_uint32(fmt.KEY_END_ID, tokenizer.end_id)


def config_metadata(writer: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    add = {"u32": writer.add_uint32, "f64": writer.add_float64, "bool": writer.add_bool, "str": writer.add_string}
    for field in dataclasses.fields(ModelConfig):
        add[fmt.config_value_type(field)](fmt.KEY_CONFIG_PREFIX + field.name, getattr(cfg, field.name))


def export_gguf(model: torch.nn.Module, cfg: ModelConfig, tokenizer, output: str | Path,
                embed: str = "q8_0", head: str = "q8_0", name: str = "nanochat-ternary", ternary: str = "tq1_0") -> Path:
    """Write model + tokenizer to `output` (atomically) and, with mHC, the sidecar `output.with_suffix('.mhc')`."""
    output = Path(output)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"tokenizer vocab_size {tokenizer.vocab_size} != model config vocab_size {cfg.vocab_size}")
    fmt.ternary_type(ternary)  # validate before the slow part
    tensors = collect_tensors(model, cfg, embed, head, ternary)
    expected = {s.name for s in fmt.expected_tensors(cfg, embed, head, ternary)}
    assert set(tensors) == expected, sorted(set(tensors) ^ expected)

    tmp = output.with_name(output.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, fmt.ARCH)
    writer.add_name(name)
    writer.add_uint32(fmt.KEY_FORMAT_VERSION, fmt.FORMAT_VERSION)
    writer.add_string(fmt.KEY_EMBED_TYPE, embed)
    writer.add_string(fmt.KEY_HEAD_TYPE, head)
    writer.add_string(fmt.KEY_TERNARY_TYPE, ternary)
    config_metadata(writer, cfg)
    tokenizer_metadata(writer, tokenizer)
    crcs = [zlib.crc32(np.ascontiguousarray(a).data) for a, _ in tensors.values()]
    writer.add_key_value(fmt.KEY_TENSOR_CRC32, crcs, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT32)
    for tname, (arr, raw_type) in tensors.items():
        writer.add_tensor(tname, np.ascontiguousarray(arr), raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()
    os.replace(tmp, output)

    if cfg.mhc_streams > 1:
        write_mhc(output.with_suffix(".mhc"), [mhc_matrices(model, i) for i in range(cfg.n_layers)], cfg.mhc_streams)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nanochat.export", description="Export a nanochat-ternary checkpoint to GGUF (+ .mhc sidecar)")
    parser.add_argument("--checkpoint", required=True, help="run folder (uses best/, else latest/) or checkpoint folder")
    parser.add_argument("--output", required=True, help="output .gguf path; the .mhc sidecar goes next to it")
    parser.add_argument("--embed", default="q8_0", choices=["q8_0", "f16"], help="token embedding storage type")
    parser.add_argument("--head", default="q8_0", choices=["q8_0", "f16"], help="output head storage type")
    parser.add_argument("--ternary", default="tq1_0", choices=["tq2_0", "tq1_0"],
                        help="ternary code blocks: tq1_0 (1.69 bits/weight, default: smallest file) or tq2_0 (2.06 bits/weight, ~0.8 s faster load for nano-125m)")
    args = parser.parse_args(argv)

    from nanochat.checkpoint import load_model  # training-side import only for the CLI
    model, cfg, tokenizer = load_model(args.checkpoint, device="cpu")
    out = export_gguf(model, cfg, tokenizer, args.output, embed=args.embed, head=args.head,
                      name=Path(args.checkpoint).resolve().name, ternary=args.ternary)
    size = out.stat().st_size
    print(f"wrote {out} ({size / 1e6:.1f} MB, {size / 2**20:.1f} MiB)")
    if cfg.mhc_streams > 1:
        print(f"wrote {out.with_suffix('.mhc')}")


if __name__ == "__main__":
    main()
