"""Per-request image-token accounting: the response header, the served-image metrics and the
opt-in kept indices in the response body (`kept_indices.py`).

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
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm.multimodal.inputs import PlaceholderRange

HEADER = "x-pio-fvlm-image-tokens"

_current: contextvars.ContextVar[dict | None] = contextvars.ContextVar("pio_fvlm_response", default=None)


class _TotalsByHash:
    """Bounded map from multimodal hash to the image's (kept, unpruned) token counts.

    Kept is not the placeholder's length: a pruned image's placeholder also covers the text
    rows that take over the proxy's states. A later turn's delta is (its tokens, 0): its
    image's N is counted with the image's first selection.
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


def _images(engine_inputs: Iterable[dict]) -> Iterator[tuple[PlaceholderRange, str | None]]:
    """(placeholder, multimodal hash) of every image in a request's rendered prompts."""
    for engine_input in engine_inputs:
        if isinstance(engine_input, dict):
            placeholders = (engine_input.get("mm_placeholders") or {}).get("image", [])
            hashes = (engine_input.get("mm_hashes") or {}).get("image", [None] * len(placeholders))
            yield from zip(placeholders, hashes)


def per_image_counts(engine_inputs: Iterable[dict]) -> list[tuple[int, int]]:
    """(kept, total) image tokens of every image in a request's rendered prompts."""
    counts = []
    for placeholder, mm_hash in _images(engine_inputs):
        known = IMAGE_TOTALS.get(mm_hash) if mm_hash is not None else None
        counts.append(known or (placeholder.length, placeholder.length))
    return counts


def image_token_counts(engine_inputs: Iterable[dict]) -> tuple[int, int] | None:
    """(kept, total) image tokens over a request's rendered prompts; None without images."""
    counts = per_image_counts(engine_inputs)
    return (sum(k for k, _ in counts), sum(t for _, t in counts)) if counts else None


# Upper bounds of the kept-share histogram's buckets (per served image); +Inf is implied.
KEPT_SHARE_BUCKETS = (0.02, 0.05, 0.08, 0.111, 0.15, 0.2, 0.25, 0.333, 0.5, 0.75, 0.999, 1.0)


class ServedImageMetrics:
    """Per-request counts of served images and their tokens, in the API server.

    Counted when a request is rendered for the engine, so images the engine serves from its
    caches count like any other. prometheus_client follows vLLM's own metrics: the default
    registry with one API server, the multiprocess directory vLLM sets up with several.
    """

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        labels = ["model_name"]
        self.images = Counter("pio_fvlm_served_images", "Images in requests rendered for serving "
                              "(pruned or not, cache hits included)", labels)
        self.pruned = Counter("pio_fvlm_served_images_pruned", "Served images that kept fewer tokens "
                              "than they have", labels)
        self.tokens = Counter("pio_fvlm_served_image_tokens", "Image tokens the served images have, "
                              "unpruned", labels)
        self.kept = Counter("pio_fvlm_served_image_tokens_kept", "Image tokens prefilled and cached for "
                            "the served images", labels)
        self.share = Histogram("pio_fvlm_served_image_kept_share", "Share of its tokens each served "
                               "image kept", labels, buckets=KEPT_SHARE_BUCKETS)

    def record(self, model_name: str, counts: list[tuple[int, int]]) -> None:
        for kept, total in counts:
            if total == 0:  # a later turn's delta: more tokens of an image counted already
                self.kept.labels(model_name).inc(kept)
                continue
            self.images.labels(model_name).inc()
            self.tokens.labels(model_name).inc(total)
            self.kept.labels(model_name).inc(kept)
            if kept < total:
                self.pruned.labels(model_name).inc()
            self.share.labels(model_name).observe(kept / total if total else 1.0)


_served: ServedImageMetrics | None = None
_served_lock = threading.Lock()


def served_image_metrics() -> ServedImageMetrics:
    global _served
    with _served_lock:
        if _served is None:
            _served = ServedImageMetrics()
        return _served


def note_rendered(engine_inputs: Iterable[dict], model_name: str | None = None, wants_kept: bool = False) -> None:
    engine_inputs = list(engine_inputs)
    images = per_image_counts(engine_inputs)
    if model_name is not None and images:
        served_image_metrics().record(model_name, images)
    holder = _current.get()
    if holder is None:
        return
    if wants_kept:
        holder.setdefault("kept_hashes", []).extend(h for _, h in _images(engine_inputs))
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

        held: list[dict] = []  # the response, while kept indices are added to its body

        async def send_with_header(message):
            if message["type"] == "http.response.start" and "counts" in holder:
                kept, total = holder["counts"]
                headers = list(message.get("headers", []))
                headers.append((HEADER.encode(), f"{kept}/{total}".encode()))
                message = {**message, "headers": headers}
            if "kept_hashes" not in holder:
                return await send(message)
            held.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                await send_with_kept_indices(held, holder["kept_hashes"], send)

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


async def send_with_kept_indices(held: list[dict], hashes: list[str | None], send) -> None:
    """Sends a held response with the request's kept indices added to its JSON body."""
    from .kept_indices import add_to_body, report

    start, *chunks = held
    body = add_to_body(b"".join(m.get("body", b"") for m in chunks), report(hashes))
    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({**start, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
