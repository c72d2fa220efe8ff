"""Per-request image-token accounting, returned to the client as a response header.

`x-pio-fvlm-image-tokens: KEPT/TOTAL` is set on every OpenAI response whose prompt holds
images: KEPT image tokens were prefilled and cached out of TOTAL the image(s) produce.
The processor knows TOTAL per image (it computes the budget from it) and keeps it by
multimodal hash; the renderer wrapper reads the request's placeholders after rendering and
hands the figures to an ASGI middleware, which adds the header when the response starts.
"""

from __future__ import annotations

import contextvars
import threading
from collections import OrderedDict
from collections.abc import Iterable

HEADER = "x-pio-fvlm-image-tokens"

_current: contextvars.ContextVar[dict | None] = contextvars.ContextVar("pio_fvlm_response", default=None)


class _TotalsByHash:
    """Bounded map from multimodal hash to the image's (kept, unpruned) token counts.

    Kept is not the placeholder's length: a pruned image's placeholder also covers the text
    rows that take over the proxy's states.
    """

    def __init__(self, capacity: int = 65536) -> None:
        self._data: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._capacity = capacity

    def put(self, mm_hash: str, kept: int, total: int) -> None:
        with self._lock:
            self._data[mm_hash] = (kept, total)
            self._data.move_to_end(mm_hash)
            while len(self._data) > self._capacity:
                self._data.popitem(last=False)

    def get(self, mm_hash: str) -> tuple[int, int] | None:
        with self._lock:
            return self._data.get(mm_hash)


IMAGE_TOTALS = _TotalsByHash()


def image_token_counts(engine_inputs: Iterable[dict]) -> tuple[int, int] | None:
    """(kept, total) image tokens over a request's rendered prompts; None without images."""
    kept = total = 0
    seen = False
    for engine_input in engine_inputs:
        if not isinstance(engine_input, dict):
            continue
        placeholders = (engine_input.get("mm_placeholders") or {}).get("image", [])
        hashes = (engine_input.get("mm_hashes") or {}).get("image", [None] * len(placeholders))
        for placeholder, mm_hash in zip(placeholders, hashes):
            seen = True
            counts = IMAGE_TOTALS.get(mm_hash) if mm_hash is not None else None
            image_kept, image_total = counts or (placeholder.length, placeholder.length)
            kept += image_kept
            total += image_total
    return (kept, total) if seen else None


def note_rendered(engine_inputs: Iterable[dict]) -> None:
    holder = _current.get()
    if holder is None:
        return
    counts = image_token_counts(engine_inputs)
    if counts is not None:
        # A batch request renders each conversation in turn: the header sums them.
        kept, total = holder.get("counts", (0, 0))
        holder["counts"] = (kept + counts[0], total + counts[1])


class ImageTokensHeaderMiddleware:
    """Pure ASGI middleware: the app runs in this task, so the renderer sees the holder."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        holder: dict = {}
        token = _current.set(holder)

        async def send_with_header(message):
            if message["type"] == "http.response.start" and "counts" in holder:
                kept, total = holder["counts"]
                headers = list(message.get("headers", []))
                headers.append((HEADER.encode(), f"{kept}/{total}".encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_header)
        finally:
            _current.reset(token)


def install_http_middleware() -> None:
    from vllm.entrypoints.launchers import app as app_module

    original = app_module.init_entrypoints_middleware
    if getattr(original, "__pio_fvlm__", False):
        return

    def init_entrypoints_middleware(args, app, *rest, **kwargs):
        from .raw_keep import RawKeepMiddleware

        result = original(args, app, *rest, **kwargs)
        app.add_middleware(ImageTokensHeaderMiddleware)
        app.add_middleware(RawKeepMiddleware)
        return result

    init_entrypoints_middleware.__pio_fvlm__ = True
    app_module.init_entrypoints_middleware = init_entrypoints_middleware
