"""Which image tokens a served request kept, returned to the client when it asks.

A request with `"pio_fvlm_kept_indices": true` (non-streaming) gets, beside the usual
response, `"pio_fvlm": {"kept_indices": [[...], ...], "image_tokens": [N, ...]}`: per image,
the indices (among its N tokens, ascending) that were prefilled and cached, or null for an
image served unpruned or whose record is gone.

The selection runs in a worker, the response is written by the API server: the worker records
each pruned image's kept indices under its multimodal hash (which the processor packs into the
image's context) in the server's shared metrics directory, and the API server reads them back
by the request's hashes. An image served from vLLM's caches runs no selection; its record from
the first time answers, so records are kept for the most recent `CAPACITY` selections.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .stats import STATS_DIR_ENV

FIELD = "pio_fvlm_kept_indices"
RESPONSE_FIELD = "pio_fvlm"
CAPACITY = 4096
_PRUNE_EVERY = 256


def image_key(mm_hash: str) -> int:
    """A multimodal hash as a positive int64 (its first 60 bits); 0 means none."""
    try:
        return int(mm_hash[:15], 16) or 1
    except ValueError:
        return int.from_bytes(mm_hash.encode()[:7].ljust(7, b"\0"), "big") or 1


class KeptStore:
    """One small JSON file per recorded image in `<PIO_FVLM_STATS_DIR>/kept`."""

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self._directory = Path(directory) if directory is not None else None
        self._writes = 0

    @property
    def directory(self) -> Path | None:
        if self._directory is not None:
            return self._directory
        root = os.environ.get(STATS_DIR_ENV)
        return Path(root) / "kept" if root else None

    def put(self, key: int, kept: torch.Tensor, num_tokens: int) -> None:
        """kept: (k,) the image's kept indices, on any device (read only when recorded)."""
        directory = self.directory
        if directory is None or key <= 0:
            return  # no server around (offline LLM) or no key: nothing to record, nothing copied
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{key}.json"
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"kept": kept.tolist(), "tokens": num_tokens}))
        tmp.replace(path)
        self._writes += 1
        if self._writes % _PRUNE_EVERY == 0:
            self._prune(directory)

    def get(self, key: int) -> tuple[list[int], int] | None:
        directory = self.directory
        if directory is None or key <= 0:
            return None
        try:
            record = json.loads((directory / f"{key}.json").read_text())
        except (OSError, ValueError):
            return None
        return record["kept"], record["tokens"]

    @staticmethod
    def _prune(directory: Path) -> None:
        files = sorted(directory.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for old in files[: max(0, len(files) - CAPACITY)]:
            old.unlink(missing_ok=True)


KEPT_STORE = KeptStore()


def requested(body: dict, stream: bool) -> bool:
    """Whether a request asks for its kept indices; ValueError naming the field otherwise."""
    value = body.get(FIELD)
    if value is None or value is False:
        return False
    if value is not True:
        raise ValueError(f"{FIELD} must be true or false, got {json.dumps(value)}")
    if stream:
        raise ValueError(f"{FIELD} is returned in the response body: send it with stream false")
    return True


def report(hashes: list[str | None]) -> dict:
    """The response field for a request's images, in prompt order."""
    kept, tokens = [], []
    for mm_hash in hashes:
        record = KEPT_STORE.get(image_key(mm_hash)) if mm_hash else None
        kept.append(record[0] if record else None)
        tokens.append(record[1] if record else None)
    return {"kept_indices": kept, "image_tokens": tokens}


def add_to_body(body: bytes, field: dict) -> bytes:
    try:
        payload = json.loads(body)
    except ValueError:
        return body  # not a JSON response (an error page): left as it is
    if not isinstance(payload, dict) or "error" in payload:
        return body
    payload[RESPONSE_FIELD] = field
    return json.dumps(payload).encode()
