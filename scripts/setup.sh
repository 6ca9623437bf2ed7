#!/usr/bin/env bash
# Create .venv with Python 3.10 (the openfhe wheel only imports there) and install Gimme
# with its development tools. Re-running is cheap: it reinstalls only when pyproject.toml
# changed.
#   --torch   also create .venv-torch: PyTorch (CPU build) for training bident models, an
#             optional extra. It uses Python 3.11 when present (the machine's CPU wheel of
#             torch 2.13 is built for it), else 3.10; without either it is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  if command -v python3.10 >/dev/null 2>&1 && python3.10 -c 'import sys' >/dev/null 2>&1; then
    command -v python3.10; return
  fi
  if command -v pyenv >/dev/null 2>&1; then
    for candidate in "$(pyenv root)"/versions/3.10*/bin/python3.10; do
      [ -x "$candidate" ] && { echo "$candidate"; return; }
    done
  fi
  echo "error: Python 3.10 not found (the openfhe wheel needs exactly 3.10)." >&2
  echo "Install it, e.g. 'pyenv install 3.10', or put python3.10 on PATH." >&2
  exit 1
}

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null; then
  rm -rf .venv
  "$(find_python)" -m venv .venv
fi
stamp=.venv/.gimme-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[dev]'
  echo "$want" > "$stamp"
fi

if [ "${1:-}" = "--torch" ]; then
  torch_python=$(command -v python3.11 || command -v python3.10 || true)
  if [ -z "$torch_python" ] || ! "$torch_python" -c 'import sys' >/dev/null 2>&1; then
    echo "note: no Python 3.11/3.10 for .venv-torch; bident training is unavailable" >&2
    exit 0
  fi
  torch_stamp=.venv-torch/.gimme-installed
  torch_want="torch==2.13.0 onnxscript onnx onnxruntime numpy cryptography rich"
  if [ ! -f "$torch_stamp" ] || [ "$(cat "$torch_stamp")" != "$torch_want" ]; then
    rm -rf .venv-torch
    "$torch_python" -m venv .venv-torch
    .venv-torch/bin/python -m pip install --quiet --upgrade pip
    # shellcheck disable=SC2086
    .venv-torch/bin/python -m pip install --quiet $torch_want
    echo "$torch_want" > "$torch_stamp"
  fi
fi
