"""Generate text from a GGUF model in the terminal, streamed token by token.

    python -m nanochat.generate --model model.gguf --prompt "def fibonacci(n):"
    python -m nanochat.generate --model model.gguf            # interactive chat, one line per turn, until EOF

With --prompt the prompt is completed as plain text (<|bos|> + its tokens; printed first, then the
continuation). Without
it, each stdin line is a user turn; the conversation so far is rendered with the tokenizer's chat
template and the assistant's reply streams after "assistant> ".
"""

from __future__ import annotations

import argparse
import sys

from nanochat.engine import Engine, SamplingParams


def stream(engine: Engine, ids: list[int], params: SamplingParams) -> str:
    """Print the completion as it arrives; returns its text."""
    parts = []
    for ev in engine.generate(ids, params):
        sys.stdout.write(ev.text)
        sys.stdout.flush()
        parts.append(ev.text)
    return "".join(parts)


def chat(engine: Engine, params: SamplingParams, max_tokens: int) -> None:
    messages: list[dict] = []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("you> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        messages.append({"role": "user", "content": line.rstrip("\n")})
        ids = engine.tokenizer.render_chat(messages)
        room = engine.max_seq_len - len(ids)
        while room < 1 and len(messages) > 1:  # forget the oldest turns when the context is full
            messages = messages[2:] if len(messages) > 2 else messages[1:]
            ids = engine.tokenizer.render_chat(messages)
            room = engine.max_seq_len - len(ids)
        if room < 1:
            print(f"[message too long: {len(ids)} tokens, context is {engine.max_seq_len}]")
            messages.pop()
            continue
        sys.stdout.write("assistant> ")
        params.max_tokens = min(max_tokens, room)
        reply = stream(engine, ids, params)
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": reply})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nanochat.generate", description="Stream a completion (or chat) from a nanochat-ternary GGUF model")
    # model
    parser.add_argument("--model", required=True, help="path to the .gguf file")
    parser.add_argument("--mhc", default=None, help="optional .mhc file overriding the mHC matrices")
    parser.add_argument("--threads", type=int, default=-1, help="CPU threads for the kernels (-1 = default)")
    # prompt and sampling
    parser.add_argument("--prompt", default=None, help="text to complete; without it, an interactive chat on stdin")
    parser.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate per reply")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--seed", type=int, default=-1, help="random seed for reproducible sampling (-1 = random)")
    args = parser.parse_args(argv)

    engine = Engine.load(args.model, mhc_path=args.mhc, threads=None if args.threads == -1 else args.threads)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=None if args.seed == -1 else args.seed)
    if args.prompt is None:
        chat(engine, params, args.max_tokens)
        return
    # training documents start with <|bos|>, so a completion prompt does too
    ids = [engine.tokenizer.bos_id] + engine.tokenizer.encode(args.prompt)
    ids = ids[-engine.max_seq_len:]
    params.max_tokens = max(1, min(args.max_tokens, engine.max_seq_len - len(ids) + 1))
    sys.stdout.write(args.prompt)
    stream(engine, ids, params)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
