"""Which image tokens each pruned item served, remembered in the worker.

A later turn's delta selects among the tokens its image has not served yet, and an item the
engine encodes again (a prefix-cache hit that ends inside it, a preemption) must keep exactly
what its cached rows kept: the proxy pass is batched and not bit-reproducible, so its set is
looked up here, by the item's key, before a selection is trusted. Bounded LRU, per process
(tensor-parallel ranks run the same selections, so each holds the same sets).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable

import torch


class ServedSets:
    def __init__(self, capacity: int) -> None:
        self._sets: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.capacity = capacity

    def put(self, key: int, kept: torch.Tensor) -> None:
        if self.capacity <= 0 or key <= 0:
            return
        # int16 holds any index of an image's tokens (N < 32768) at 2 bytes each.
        stored = kept.detach().to("cpu", torch.int16)
        with self._lock:
            self._sets[key] = stored
            self._sets.move_to_end(key)
            while len(self._sets) > self.capacity:
                self._sets.popitem(last=False)

    def get(self, key: int) -> torch.Tensor | None:
        with self._lock:
            kept = self._sets.get(key)
            if kept is not None:
                self._sets.move_to_end(key)
        return None if kept is None else kept.long()

    def union(self, keys: Iterable[int]) -> torch.Tensor | None:
        """The tokens the items `keys` served together; None when any of them is unknown."""
        parts = []
        for key in keys:
            kept = self.get(key)
            if kept is None:
                return None
            parts.append(kept)
        return torch.cat(parts).unique() if parts else torch.empty(0, dtype=torch.long)

    def clear(self) -> None:
        with self._lock:
            self._sets.clear()
