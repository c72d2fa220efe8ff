"""Process-local counters of the selection pass, exported to Prometheus by the API server."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class SelectionStats:
    images: int = 0
    tokens_seen: int = 0
    tokens_kept: int = 0
    failures: int = 0
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, seen: int, kept: int) -> None:
        with self._lock:
            self.images += 1
            self.tokens_seen += seen
            self.tokens_kept += kept

    def record_time(self, seconds: float) -> None:
        with self._lock:
            self.seconds += seconds

    def record_failure(self) -> None:
        with self._lock:
            self.failures += 1

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {
                "images": self.images,
                "tokens_seen": self.tokens_seen,
                "tokens_kept": self.tokens_kept,
                "failures": self.failures,
                "seconds": self.seconds,
            }


SELECTION_STATS = SelectionStats()
