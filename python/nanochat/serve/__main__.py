"""Run the OpenAI-compatible server and web chat page.

    python -m nanochat.serve --model model.gguf                      # http://127.0.0.1:8080
    python -m nanochat.serve --model model.gguf --port 9000 --threads 2 --api-key secret
    curl http://127.0.0.1:8080/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "def fibonacci(n):", "max_tokens": 32, "temperature": 0}'

Flags come from nanochat.serve.settings.Settings (`--help` lists them all).
"""

from __future__ import annotations

import sys

import uvicorn

from nanochat.serve.app import create_app
from nanochat.serve.settings import parse_settings


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    try:
        app = create_app(settings)
    except (OSError, ValueError) as e:  # a missing or invalid model file: say so, no traceback
        sys.exit(f"nanochat.serve: cannot load model {settings.model!r}: {e}")
    engine = app.state.engine
    print(f"nanochat.serve: model {settings.served_model_name} (context {engine.max_seq_len} tokens), "
          f"batch {settings.max_batch}, queue {settings.max_queue}, api key {'required' if settings.api_key else 'off'}; "
          f"http://{settings.host}:{settings.port}/", flush=True)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        print(f"nanochat.serve: warning: listening on {settings.host} without --api-key: anyone who can reach "
              "this port can use the model", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
