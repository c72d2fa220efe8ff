"""Which image tokens each pruned item served, remembered in the worker.

A later turn's delta selects among the tokens its image has not served yet, and an item the
engine encodes again (a prefix-cache hit that ends inside it, a preemption) must keep exactly
what its cached rows kept: the proxy pass is batched and not bit-reproducible, so its set is
looked up here, by the item's key, before a selection is trusted. Bounded LRU, per process
(tensor-parallel ranks run the same selections, so each holds the same sets).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..algorithm.saliency import ProxyPast


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


class VisionCache:
    """The vision tower's outputs per image (by `PromptContext.vision_key`), bounded in bytes.

    A chat's later turns (and any other question about an image seen recently) need the image's
    N embeddings again, for the proxy pass and for a delta's rows; they do not depend on the
    question. Kept in host memory so the KV cache, sized after profiling, never loses room to
    it; a hit costs one copy back to the device. Cleared when the weights are (re)loaded.
    """

    def __init__(self, max_bytes: int) -> None:
        self._entries: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self._bytes = 0
        self.max_bytes = max_bytes

    def get_all(self, keys: list[int], device: torch.device) -> list[torch.Tensor] | None:
        """Every key's output on `device`, or None unless all are held."""
        if self.max_bytes <= 0 or not keys or any(k <= 0 for k in keys):
            return None
        with self._lock:
            if any(k not in self._entries for k in keys):
                return None
            found = []
            for k in keys:
                self._entries.move_to_end(k)
                found.append(self._entries[k])
        return [t.to(device, non_blocking=True) for t in found]

    def put(self, key: int, output: torch.Tensor) -> None:
        size = output.numel() * output.element_size()
        if self.max_bytes <= 0 or key <= 0 or size > self.max_bytes:
            return
        stored = output.detach().to("cpu", copy=True)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.numel() * old.element_size()
            self._entries[key] = stored
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= dropped.numel() * dropped.element_size()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


@dataclass(frozen=True)
class _PastEntry:
    text: str  # digest of the token ids around the image the pass saw
    suffix_len: int
    past: ProxyPast


def _text_digest(prefix_ids: list[int], suffix_ids: list[int]) -> str:
    return hashlib.sha256(f"{prefix_ids}|{suffix_ids}".encode()).hexdigest()


class ProxyCache:
    """Each recent selection's proxy past (`algorithm.ProxyPast`), by item key, bounded in bytes.

    A chat's next turn selects its delta over the same image and text plus the new turn's; the
    proxy's full layers then run over the new rows only, continuing the past of the item served
    just before (its first selection or the previous delta). Host memory, as the vision cache.
    """

    def __init__(self, max_bytes: int) -> None:
        self._entries: OrderedDict[int, _PastEntry] = OrderedDict()
        self._lock = threading.Lock()
        self._bytes = 0
        self.max_bytes = max_bytes

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def put(self, key: int, prefix_ids: list[int], suffix_ids: list[int], past: ProxyPast) -> None:
        size = past.nbytes
        if not self.enabled or key <= 0 or size > self.max_bytes:
            return
        entry = _PastEntry(_text_digest(prefix_ids, suffix_ids), len(suffix_ids), past.to("cpu"))
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.past.nbytes
            self._entries[key] = entry
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= dropped.past.nbytes

    def continuable(self, key: int, prefix_ids: list[int], suffix_ids: list[int], num_image_tokens: int,
                    device) -> ProxyPast | None:
        """The past of item `key` when this context continues the sequence it covers."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
        if entry is None or entry.suffix_len >= len(suffix_ids):
            return None
        if entry.past.length != len(prefix_ids) + num_image_tokens + entry.suffix_len:
            return None
        if _text_digest(prefix_ids, suffix_ids[: entry.suffix_len]) != entry.text:
            return None
        return entry.past.to(device)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
