#!/usr/bin/env bash
# Create .venv with Python 3.10 (the openfhe wheel only imports there) and install Gimme
# with its development tools. Re-running is cheap: it reinstalls only when pyproject.toml
# changed.
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
