"""`vllm ... --plugin pio_fvlm` while `VLLM_PLUGINS` leaves the plugin out.

vLLM then never loads the plugin, so its `--plugin` flag does not exist and argparse would
answer "unrecognized arguments". Run from the package's .pth file at interpreter start, this
stops such a command with a message naming `VLLM_PLUGINS`. It reads only `sys.argv` and the
environment, and does nothing for any other program.
"""

from __future__ import annotations

import os
import sys

PLUGIN = "pio_fvlm"


def excluded_plugin_message(argv: list[str], environ) -> str | None:
    if not argv or not os.path.basename(argv[0]).startswith("vllm"):
        return None
    allowed = environ.get("VLLM_PLUGINS")
    if allowed is None:
        return None
    named = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--plugin"]
    named += [a.split("=", 1)[1] for a in argv if a.startswith("--plugin=")]
    if PLUGIN not in named or PLUGIN in {p.strip() for p in allowed.split(",")}:
        return None
    return (f"vllm: error: argument --plugin: plugin {PLUGIN!r} is installed but VLLM_PLUGINS={allowed!r} "
            f"leaves it out; add it (VLLM_PLUGINS={allowed + ',' if allowed else ''}{PLUGIN}) or unset VLLM_PLUGINS")


def check() -> None:
    message = excluded_plugin_message(sys.argv, os.environ)
    if message:
        print(message, file=sys.stderr, flush=True)
        os._exit(2)  # site is still importing: SystemExit here would be reported as a fatal error


check()
