"""Shared pieces of the benchmarks: machine description and result files."""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"  # committed: what README and the docs quote
SCRATCH = Path(__file__).parent / "scratch"  # ignored by git: where a run writes unless told
_output = SCRATCH


def results_dir() -> Path:
    """Where this run writes its results: `benchmarks/scratch/`, or `benchmarks/results/`
    with --update-results."""
    return _output


class BenchmarkParser(argparse.ArgumentParser):
    """A benchmark's command line, with --update-results choosing where results go."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("--update-results", action="store_true",
                          help=f"write to the committed {RESULTS.relative_to(RESULTS.parents[1])}/ instead "
                               f"of {SCRATCH.relative_to(SCRATCH.parents[1])}/")

    def parse_args(self, *args, **kwargs):
        global _output
        parsed = super().parse_args(*args, **kwargs)
        _output = RESULTS if parsed.update_results else SCRATCH
        return parsed


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
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    path.write_text(
        f"# {title}\n\n- command: `{command()}`\n- machine: {machine()}\n- date: {stamp}\n\n{body.rstrip()}\n"
    )
    print(f"wrote {path}", file=sys.stderr)
    return path


def progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def write_rows(name: str, rows: list) -> Path:
    """A run's rows (dataclasses) as JSON beside its markdown, for plots and later comparison."""
    import dataclasses
    import json

    path = results_dir() / name
    path.write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    return path
