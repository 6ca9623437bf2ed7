#!/usr/bin/env bash
# Set up (if needed) and run every check: lint, types, tests. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --torch  # with .venv-torch: the bident training tests use it
echo "== ruff"; .venv/bin/ruff check .
echo "== mypy"; .venv/bin/mypy
echo "== pytest"; .venv/bin/pytest "$@"
