"""Shared pieces of the benchmarks: machine description and result files."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def command() -> str:
    return "python -m " + __spec_name() + " " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def __spec_name() -> str:
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    return spec.name if spec else Path(sys.argv[0]).stem


def write_result(name: str, title: str, body: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    path.write_text(
        f"# {title}\n\n- command: `{command()}`\n- machine: {machine()}\n- date: {stamp}\n\n{body.rstrip()}\n"
    )
    print(f"wrote {path}", file=sys.stderr)
    return path


def progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)
