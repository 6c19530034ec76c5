#!/usr/bin/env bash
# The whole test suite: Rust unit and property tests, then pytest. Fails loudly on any error,
# including a pytest run that collects no tests (exit code 5).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== cargo test (release) =="
cargo test --release --workspace
echo "== pytest =="
.venv/bin/python -m pytest tests -q "$@"
