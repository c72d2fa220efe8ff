"""`python -m pio_fvlm_vllm settings [--model DIR] [--mm-processor-kwargs JSON]`: the effective
settings a server started in this environment would use, and where each value comes from.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .budget import VISUAL_KEEP_FIELD
from .settings import ENV_PREFIX, OFFICIAL_SCORING, PioFvlmSettings


def settings_table(environ, model_dir: str | None = None, mm_processor_kwargs: dict | None = None) -> list[tuple]:
    """Rows (setting, effective value, source); raises ValueError naming a bad variable."""
    settings = PioFvlmSettings.from_env(environ)
    rows = []
    for name in PioFvlmSettings.model_fields:
        variable = ENV_PREFIX + name.upper()
        if environ.get(variable):
            source = variable
        elif name in OFFICIAL_SCORING and settings.scoring == "official":
            source = f"{ENV_PREFIX}SCORING=official"
        else:
            source = "default"
        rows.append([name, getattr(settings, name), source])
    keep = settings.server_default_keep(mm_processor_kwargs)
    if (mm_processor_kwargs or {}).get(VISUAL_KEEP_FIELD) is not None:
        next(r for r in rows if r[0] == VISUAL_KEEP_FIELD)[1:] = [keep, "--mm-processor-kwargs"]
    if model_dir is not None:
        config = json.loads((Path(model_dir) / "config.json").read_text())
        depth = (config.get("text_config") or config)["num_hidden_layers"]
        for row in rows:
            if row[0] == "proxy_layer":
                row[1] = settings.proxy_layer_for(depth)
                row[2] += f" (K for {depth} decoder layers" + (", +1 for official scoring)" if
                                                             settings.scoring == "official" else ")")
            elif row[0] == "handoff_layer":
                row[1] = settings.handoff_layer_for(depth)
                row[2] += f" (h for {depth} decoder layers" + (", off)" if row[1] == 0 else ")")
    return [tuple(r) for r in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pio_fvlm_vllm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("settings", help="print the effective settings and where each comes from")
    show.add_argument("--model", help="model directory: resolve the depth-dependent K and h for it")
    show.add_argument("--mm-processor-kwargs", type=json.loads, default=None,
                      help="the JSON you pass to vllm serve, to include its visual_keep")
    args = parser.parse_args(argv)
    if args.mm_processor_kwargs is not None and not isinstance(args.mm_processor_kwargs, dict):
        parser.error(f"--mm-processor-kwargs must be a JSON object, got {args.mm_processor_kwargs!r}")
    try:
        rows = settings_table(os.environ, args.model, args.mm_processor_kwargs)
    except (ValueError, OSError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    width = max(len(r[0]) for r in rows)
    value_width = max(len(str(r[1])) for r in rows)
    for name, value, source in rows:
        print(f"{name:<{width}}  {value!s:<{value_width}}  {source}")
    for name in PioFvlmSettings.unknown_env(os.environ):
        print(f"warning: {name} is not a pio_fvlm setting and is ignored", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
