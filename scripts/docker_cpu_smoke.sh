#!/usr/bin/env bash
# Builds the CPU image and checks that docker/README.md's CPU run line, as written there, serves
# a pruned request: the tiny checkpoint is built inside the image, the line is run (docker or
# podman), one chat with an image and visual_keep 0.25 must come back with the plugin's header.
#
#   bash scripts/docker_cpu_smoke.sh
#   PIO_FVLM_BASE_IMAGE=debian-local bash scripts/docker_cpu_smoke.sh
#       # where no container registry is reachable: the base image is made from Debian's
#       # packages (debootstrap), not pulled
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
ENGINE="${CONTAINER_ENGINE:-$(command -v docker || command -v podman || true)}"
[ -n "$ENGINE" ] || { echo "docker or podman is required (or set CONTAINER_ENGINE)" >&2; exit 2; }
IMAGE=pio-fvlm-vllm:cpu
BASE="${PIO_FVLM_BASE_IMAGE:-python:3.11-slim-bookworm}"
step() { printf '\n==> [cpu image] %s\n' "$1"; }

if [ "$BASE" = "debian-local" ]; then
  BASE=localhost/pio-fvlm-base:bookworm
  if ! "$ENGINE" image exists "$BASE" 2>/dev/null && [ -z "$("$ENGINE" images -q "$BASE" 2>/dev/null)" ]; then
    step "base image $BASE from Debian bookworm's packages (debootstrap)"
    rootfs="$(mktemp -d)"
    # python3-distutils provides the python3.11-distutils that python3.11-venv needs (debootstrap
    # does not resolve "Provides"); python3.11-dev: torch.compile's kernels include Python.h
    # (python:3.11-slim ships the headers).
    debootstrap --variant=minbase --include=python3.11,python3.11-venv,python3.11-dev,python3-distutils,python3-lib2to3,ca-certificates \
      bookworm "$rootfs" http://deb.debian.org/debian
    ln -sf python3.11 "$rootfs/usr/bin/python3"
    # This machine's trust store (it may hold a proxy's CA), for pip and apt inside the build.
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    tar -C "$rootfs" -c . | "$ENGINE" import --change "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt" - "$BASE"
    rm -rf "$rootfs"
  fi
fi

step "build $IMAGE on $BASE"
start=$(date +%s)
"$ENGINE" build -f docker/Dockerfile.cpu --build-arg BASE_IMAGE="$BASE" -t "$IMAGE" .
echo "built in $(( $(date +%s) - start )) s; size: $("$ENGINE" image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.2f GB", $1/1e9}')"

step "the tiny checkpoint, built inside the image"
mkdir -p checkpoints
"$ENGINE" run --rm --entrypoint python -v "$PWD/checkpoints:/models" "$IMAGE" \
  -m pio_fvlm_vllm.checkpoints tiny /models/tiny >/dev/null

step "docker/README.md's CPU run line, as written there"
line="$(grep -E '^docker run .*pio-fvlm-vllm:cpu /models/tiny' docker/README.md)"
echo "$line"
if curl -s localhost:8000 >/dev/null 2>&1; then
  echo "port 8000 is already in use; stop what listens there first" >&2
  exit 1
fi
log="$(mktemp)"
before="$("$ENGINE" ps -aq | sort)"
eval "${line/#docker/$ENGINE}" >"$log" 2>&1 &
# The line names no container: stop (and remove) the ones it started.
stop() { comm -13 <(echo "$before") <("$ENGINE" ps -aq | sort) | xargs -r "$ENGINE" rm -f >/dev/null; }
trap 'stop; rm -f "$log"' EXIT
for _ in $(seq 1 180); do
  curl -sf localhost:8000/health >/dev/null && break
  sleep 2
done
curl -sf localhost:8000/health >/dev/null || { tail -n 40 "$log"; echo "server did not start" >&2; exit 1; }

step "a pruned request"
body="$(mktemp)" headers="$(mktemp)"
"$ENGINE" run --rm --entrypoint python "$IMAGE" -c '
import base64, io, json
from pio_fvlm_vllm.images import synthetic_image
buffer = io.BytesIO(); synthetic_image(640, 480).save(buffer, "PNG")
url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
print(json.dumps({"model": "/models/tiny", "max_tokens": 4, "visual_keep": 0.25, "messages": [{"role": "user",
    "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is shown?"}]}]}))' \
  > "$body"
curl -sf -D "$headers" -o /dev/null localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \
  -d @"$body"
kept="$(grep -i '^x-pio-fvlm-image-tokens:' "$headers" | tr -d '\r')"
rm -f "$headers" "$body"
echo "$kept"
grep -E 'Application startup complete|PIO-FVLM proxy ready' "$log" | cut -c1-160 | head -n 3
[[ "$kept" =~ :\ ([0-9]+)/([0-9]+)$ ]] && (( BASH_REMATCH[1] < BASH_REMATCH[2] )) \
  || { echo "the request was not pruned" >&2; exit 1; }
echo "ok: the image serves pruned requests"
