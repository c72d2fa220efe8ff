#!/usr/bin/env bash
# Runs the test suite in .venv, setting the environment up first when it is missing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PIO_FVLM_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/vllm" ] || ! "$VENV/bin/python" -c 'import pio_fvlm_vllm, vllm, pytest' 2>/dev/null; then
  bash "$ROOT/scripts/setup_cpu.sh"
fi
cd "$ROOT"
exec "$VENV/bin/python" -m pytest -q "$@" tests
