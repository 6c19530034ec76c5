"""One interface over the two things eval can run: a PyTorch training checkpoint or a GGUF file.

Both sources offer the same three things, so every task treats them alike:
- `tokenizer` and `max_seq_len`;
- `window_nats(windows, lengths)`: summed negative log-likelihood (nats) of tokens 1..T of each
  window given the tokens before it (teacher forcing), skipping specials (byte length 0): the core
  of bits per byte (bpb.py);
- `complete(prompt, max_tokens, temperature, stop, seed)`: text the model writes after `prompt`
  (the prompt is `<|bos|>` + its tokens, like a document in training), cut at the first stop string.

The PyTorch source samples with a small KV-less loop (the whole context goes through the model at
each step: slow but obviously right, fine for tiny models); the GGUF source uses the CPU engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


def truncate_at_stops(text: str, stops: list[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for stop in stops:
        at = text.find(stop)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]


def freeze_ternary_weights(model) -> None:
    """For inference only: quantize every BitLinear's weight once instead of at every forward.

    Each BitLinear keeps its arithmetic (int8 fake-quant of the input, then the same ternary
    weight), so logits are bit-identical; generation no longer re-quantizes millions of weights
    per token. The model must not be trained afterwards (its BitLinears ignore weight updates).
    """
    import torch
    import torch.nn.functional as F

    from nanochat import quant
    from nanochat.model import BitLinear

    for module in model.modules():
        if isinstance(module, BitLinear) and module.quantize:
            with torch.no_grad():
                w_q = quant.quantize_weight(module.weight, module.group_size, module.weight_quant).detach()

            def forward(x, input_quantized=False, w_q=w_q, bits=module.activation_bits):
                return F.linear(x if input_quantized else quant.quantize_activation(x, bits), w_q)
            module.forward = forward


def special_ids(tokenizer) -> set[int]:
    return {tokenizer.bos_id, tokenizer.user_id, tokenizer.assistant_id, tokenizer.end_id}


@dataclass
class TorchSource:
    """A training checkpoint run by the PyTorch model (CPU or GPU)."""
    model: object
    config: object
    tokenizer: object
    device: str
    name: str
    out_dir: Path
    batch_size: int = 8

    @property
    def max_seq_len(self) -> int:
        return self.config.max_seq_len

    def window_nats(self, windows: np.ndarray, lengths: np.ndarray) -> float:
        from nanochat.eval.bpb import torch_window_nats
        return torch_window_nats(self.model, windows, self.device, self.batch_size, lengths)

    def complete(self, prompt: str, max_tokens: int, temperature: float, stop: list[str], seed: int = 0) -> str:
        import torch

        ids = [self.tokenizer.bos_id] + self.tokenizer.encode(prompt)
        stop_ids = special_ids(self.tokenizer)
        generator = torch.Generator().manual_seed(seed)
        new: list[int] = []
        text = ""
        with torch.no_grad():
            for _ in range(max_tokens):
                context = torch.tensor([ids[-self.max_seq_len:]], dtype=torch.long, device=self.device)
                logits = self.model(context)[0][0, -1].float().cpu()
                if temperature <= 0:
                    token = int(logits.argmax())
                else:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    token = int(torch.multinomial(probs, 1, generator=generator))
                if token in stop_ids:
                    break  # end of turn or start of a new document: the model is done
                ids.append(token)
                new.append(token)
                text = self.tokenizer.decode(new)
                if any(s in text for s in stop):
                    break
        return truncate_at_stops(text, stop)


@dataclass
class EngineSource:
    """An exported GGUF file run by the CPU engine."""
    engine: object
    name: str
    out_dir: Path

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_seq_len(self) -> int:
        return self.engine.max_seq_len

    def window_nats(self, windows: np.ndarray, lengths: np.ndarray) -> float:
        from nanochat.eval.bpb import engine_window_nats
        return engine_window_nats(self.engine, windows, lengths)

    def complete(self, prompt: str, max_tokens: int, temperature: float, stop: list[str], seed: int = 0) -> str:
        from nanochat.engine import SamplingParams

        ids = [self.tokenizer.bos_id] + self.tokenizer.encode(prompt)
        max_tokens = min(max_tokens, self.max_seq_len - 1)
        ids = ids[-(self.max_seq_len - max_tokens):]  # room for the reply inside the engine's context
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, stop=list(stop), seed=seed)
        text = "".join(event.text for event in self.engine.generate(ids, params))
        return truncate_at_stops(text, stop)


def load_source(checkpoint: str | None, model: str | None, device: str = "cpu", threads: int | None = None,
                out_dir: str | None = None):
    """A TorchSource for --checkpoint (run or checkpoint folder) or an EngineSource for --model (a .gguf)."""
    if (checkpoint is None) == (model is None):
        raise ValueError("give exactly one model source: --checkpoint RUN_OR_CKPT (PyTorch) or --model FILE.gguf (engine)")
    if checkpoint is not None:
        from nanochat.checkpoint import load_model

        path = Path(checkpoint)
        if not path.exists():
            raise FileNotFoundError(f"--checkpoint: no such run or checkpoint folder: {path}")
        net, config, tokenizer = load_model(path, device=device)
        freeze_ternary_weights(net)
        return TorchSource(net, config, tokenizer, device, name=path.resolve().name,
                           out_dir=Path(out_dir) if out_dir else path)
    path = Path(model)
    if not path.is_file():
        raise FileNotFoundError(f"--model: no such GGUF file: {path}")
    if device != "cpu":
        raise ValueError(f"--device {device}: the GGUF engine runs on the CPU only (use --checkpoint for {device})")
    from nanochat.engine import Engine

    engine = Engine.load(path, threads=threads)
    return EngineSource(engine, name=path.stem, out_dir=Path(out_dir) if out_dir else path.parent)
