"""The CPU inference engine: GGUF loading, forward with KV cache, sampling and continuous batching.

    from nanochat.engine import Engine, Scheduler, SamplingParams
    engine = Engine.load("model.gguf")
    for ev in engine.generate(engine.tokenizer.encode("def fib(n):"), SamplingParams(temperature=0)):
        print(ev.text, end="", flush=True)

Files: gguf_file.py (strict GGUF parsing), loader.py (validation -> weights), kernels.py (Rust or
numpy matrices), model.py (the forward pass), sampling.py, sequence.py, engine.py, scheduler.py.
"""

from nanochat.engine.engine import Engine
from nanochat.engine.loader import ModelFileError
from nanochat.engine.sampling import SamplingParams, TokenEvent
from nanochat.engine.scheduler import QueueFull, Request, Scheduler

__all__ = ["Engine", "Scheduler", "Request", "SamplingParams", "TokenEvent", "QueueFull", "ModelFileError"]
