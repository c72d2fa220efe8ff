#!/usr/bin/env bash
# `vllm serve` with the plugin required, listening on all interfaces of the container.
# Arguments are vllm serve's: the model first, then any flags.
set -euo pipefail
args=("$@")
case " ${args[*]} " in
  *" --plugin "*) ;;
  *) args+=(--plugin pio_fvlm) ;;
esac
case " ${args[*]} " in
  *" --host "*) ;;
  *) args+=(--host 0.0.0.0) ;;
esac
exec vllm serve "${args[@]}"
