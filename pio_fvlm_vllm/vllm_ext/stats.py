"""Counters of the selection pass and their Prometheus export.

The selection runs in vLLM's worker processes, the API server serves /metrics. Two routes,
chosen by how vLLM runs its own metrics:

- one API server (Prometheus' default registry): workers write their cumulative counters to
  one small JSON file each in a directory shared through the environment
  (`PIO_FVLM_STATS_DIR`, created by the first process that loads the plugin), and a collector
  in the API server sums them at every scrape;
- several API servers (`--api-server-count N`: vLLM sets `PROMETHEUS_MULTIPROC_DIR` for every
  process and /metrics reads only that directory): workers also update prometheus_client
  metrics of the same names, which that mode stores there.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from bisect import bisect_left
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATS_DIR_ENV = "PIO_FVLM_STATS_DIR"
MODEL_LABEL = "model_name"  # as vLLM's own metrics and the served-image ones label it

# Upper bounds (seconds) of the selection-time histogram's buckets; +Inf is implied.
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


# name -> help, for both export routes
HELP = {
    "pio_fvlm_images_pruned": "Images the PIO-FVLM selection pass pruned",
    "pio_fvlm_image_tokens_seen": "Image tokens scored by the selection pass",
    "pio_fvlm_image_tokens_kept": "Image tokens kept by the selection pass",
    "pio_fvlm_selection_failures": "Selections that failed and fell back to uniform stride",
    "pio_fvlm_selection_seconds": "Time spent in the selection pass",
    "pio_fvlm_selection_pass_seconds": "Duration of one selection pass (the images of one engine step: proxy, "
                                       "saliency, NMS)",
}
_COUNTER_FIELDS = {"pio_fvlm_images_pruned": "images", "pio_fvlm_image_tokens_seen": "tokens_seen",
                   "pio_fvlm_image_tokens_kept": "tokens_kept", "pio_fvlm_selection_failures": "failures",
                   "pio_fvlm_selection_seconds": "seconds"}


class _MultiprocessMetrics:
    """prometheus_client metrics, created in a worker only in Prometheus multiprocess mode."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.counters = {field: Counter(name, HELP[name], [MODEL_LABEL]) for name, field in _COUNTER_FIELDS.items()}
        self.passes = Histogram("pio_fvlm_selection_pass_seconds", HELP["pio_fvlm_selection_pass_seconds"],
                                [MODEL_LABEL], buckets=SECONDS_BUCKETS)

    def record(self, model_name: str, increments: dict[str, float], seconds: float) -> None:
        for field, value in increments.items():
            self.counters[field].labels(model_name).inc(value)
        self.passes.labels(model_name).observe(seconds)


@dataclass
class SelectionCounters:
    images: int = 0
    tokens_seen: int = 0
    tokens_kept: int = 0
    failures: int = 0
    seconds: float = 0.0
    # passes per bucket of SECONDS_BUCKETS, the last entry for longer ones (not cumulative)
    seconds_buckets: list[int] = field(default_factory=lambda: [0] * (len(SECONDS_BUCKETS) + 1))


class SelectionStats:
    """Process-local counters per served model name, persisted for the API server after every
    update."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters: dict[str, SelectionCounters] = {}
        self._multiprocess: _MultiprocessMetrics | None = None

    def record(self, model_name: str, tokens_seen: list[int], tokens_kept: list[int], seconds: float,
               failed: bool) -> None:
        increments = {"images": len(tokens_seen), "tokens_seen": sum(tokens_seen),
                      "tokens_kept": sum(tokens_kept), "failures": int(failed), "seconds": seconds}
        with self._lock:
            c = self.counters.setdefault(model_name, SelectionCounters())
            for name, value in increments.items():
                setattr(c, name, getattr(c, name) + value)
            c.seconds_buckets[bisect_left(SECONDS_BUCKETS, seconds)] += 1
            self._persist({model: asdict(counters) for model, counters in self.counters.items()})
            if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                self._multiprocess = self._multiprocess or _MultiprocessMetrics()
                self._multiprocess.record(model_name, increments, seconds)

    @staticmethod
    def _persist(values: dict) -> None:
        directory = os.environ.get(STATS_DIR_ENV)
        if not directory:
            return
        path = Path(directory) / f"{os.getpid()}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(values))
        tmp.replace(path)


SELECTION_STATS = SelectionStats()


_owned_dir: tempfile.TemporaryDirectory | None = None


def ensure_stats_dir() -> str:
    """The shared directory, created once by the first process; children inherit it. The
    process that creates it removes it, with the workers' files, when it exits (as vLLM does
    with its Prometheus directory)."""
    global _owned_dir
    directory = os.environ.get(STATS_DIR_ENV)
    if not directory or not os.path.isdir(directory):
        _owned_dir = tempfile.TemporaryDirectory(prefix="pio_fvlm_stats_")
        directory = _owned_dir.name
        os.environ[STATS_DIR_ENV] = directory
    return directory


def read_totals(directory: str | None = None) -> dict[str, SelectionCounters]:
    """Every worker's counters, summed per served model name."""
    directory = directory or os.environ.get(STATS_DIR_ENV)
    totals: dict[str, SelectionCounters] = {}
    if not directory or not os.path.isdir(directory):
        return totals
    for path in Path(directory).glob("*.json"):
        try:
            per_model = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced right now; the next scrape reads it
        for model_name, values in per_model.items():
            if not isinstance(values, dict):
                continue
            total = totals.setdefault(model_name, SelectionCounters())
            for name, value in values.items():
                if name == "seconds_buckets" and len(value) == len(total.seconds_buckets):
                    total.seconds_buckets = [a + b for a, b in zip(total.seconds_buckets, value)]
                elif hasattr(total, name) and not isinstance(value, list):
                    setattr(total, name, getattr(total, name) + value)
    return totals


class SelectionCollector:
    """Prometheus collector over the workers' counters."""

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        totals = read_totals()
        for name, field in _COUNTER_FIELDS.items():
            family = CounterMetricFamily(name, HELP[name], labels=[MODEL_LABEL])
            for model_name, t in totals.items():
                family.add_metric([model_name], getattr(t, field))
            yield family
        passes = HistogramMetricFamily("pio_fvlm_selection_pass_seconds", HELP["pio_fvlm_selection_pass_seconds"],
                                       labels=[MODEL_LABEL])
        for model_name, t in totals.items():
            cumulative, buckets = 0, []
            for bound, count in zip([*map(str, SECONDS_BUCKETS), "+Inf"], t.seconds_buckets):
                cumulative += count
                buckets.append((bound, cumulative))
            passes.add_metric([model_name], buckets, sum_value=t.seconds)
        yield passes


_collector_registered = False


def register_collector() -> None:
    """Serves the workers' JSON counters on the default registry (one API server; with several,
    /metrics reads the multiprocess directory the workers write to)."""
    global _collector_registered
    if _collector_registered:
        return
    from prometheus_client import REGISTRY

    REGISTRY.register(SelectionCollector())
    _collector_registered = True
