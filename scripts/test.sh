#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine (as root): set-up (idempotent),
# then lint, types and every test, end-to-end ones included. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${MEDHIVE_VENV:-$PWD/.venv}
echo "[test] ruff"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
echo "[test] mypy"
"$VENV/bin/mypy"
echo "[test] pytest"
exec "$VENV/bin/pytest" "$@"
