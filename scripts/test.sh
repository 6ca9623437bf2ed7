#!/usr/bin/env bash
# Set up (if needed) and run every check: lint, types, tests. Extra args go to pytest.
#   --all   also run the tests marked slow (minutes each on heavy models; they repeat a
#           protection a faster test checks on a smaller model, or measure a heavy model)
set -euo pipefail
cd "$(dirname "$0")/.."
selection=(-m "not slow")
if [ "${1:-}" = "--all" ]; then
  selection=()
  shift
fi
scripts/setup.sh --torch  # with .venv-torch: the bident training tests use it
echo "== ruff"; .venv/bin/ruff check .
echo "== mypy"; .venv/bin/mypy
echo "== pytest"; .venv/bin/pytest "${selection[@]}" "$@"
