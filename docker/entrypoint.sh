#!/usr/bin/env bash
# `vllm serve` with the plugin required, listening on all interfaces of the container unless
# told otherwise. Arguments are vllm serve's: the model first, then any flags; a --host or
# --plugin of the caller's (either spelling: "--host H" or "--host=H") is kept as given.
set -euo pipefail
args=("$@")
given() {
  local a
  for a in "${args[@]}"; do
    case "$a" in "$1" | "$1"=*) return 0 ;; esac
  done
  return 1
}
defaults=()
given --plugin || defaults+=(--plugin pio_fvlm)
given --host || defaults+=(--host 0.0.0.0)
exec vllm serve "${args[@]}" "${defaults[@]}"
