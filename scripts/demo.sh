#!/usr/bin/env bash
# The default job: train the `tiny` preset on the built-in corpus (the Python standard library's
# own sources, ~10 minutes on 2 CPU cores), export it to GGUF and stream a completion from it.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/tiny}
.venv/bin/python -m nanochat.train --out "$RUN"
.venv/bin/python -m nanochat.export --checkpoint "$RUN" --output "$RUN/model.gguf"
.venv/bin/python -m nanochat.generate --model "$RUN/model.gguf" --prompt "def fibonacci(n):" --max-tokens 80 --temperature 0
echo
echo "serve it:  .venv/bin/python -m nanochat.serve --model $RUN/model.gguf   (then open http://127.0.0.1:8080/)"
