#!/usr/bin/env bash
# Install everything into ./.venv: the pinned Python packages (requirements.lock), the Rust
# extension built in release mode by maturin, and with --test the Chromium the browser tests drive.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip==25.3
.venv/bin/python -m pip install -q -r requirements.lock
VIRTUAL_ENV="$PWD/.venv" PATH="$PWD/.venv/bin:$PATH" .venv/bin/maturin develop --release -q
# triton_kernels/ is a top-level package: put the repository root on the venv's import path.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$PWD" > "$site/nanochat_repo_root.pth"
if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null; then
  echo "installing Debian's chromium for the browser tests"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
echo "setup done: $(.venv/bin/python -c 'import nanochat.ternary as t; print("rust kernels:", t.active_isa())')"
