"""`vllm_xargs.visual_keep` as the client wrote it.

vLLM's schema types `vllm_xargs` values as str | int | float, so a JSON `true` would reach the
plugin as 1 and a `null` would fail with a schema error before the plugin sees the request.
A small ASGI middleware reads the raw JSON of the bodies that mention both keys, and applies
the rules of the top-level field: a boolean is a 400 naming `vllm_xargs.visual_keep`, null
means "not set".
"""

from __future__ import annotations

import json

from ..budget import VISUAL_KEEP_FIELD, validate_visual_keep


def raw_xargs_keep_problem(body: bytes) -> tuple[bytes | None, str | None]:
    """vLLM's schema types `vllm_xargs` values as str | int | float, so `true` would reach the
    plugin as 1 and `null` fail with a schema error: look at the raw JSON first.

    Returns (body to pass on, error message): null is dropped ("not set", as at the top level),
    a boolean is refused.
    """
    if b"vllm_xargs" not in body or VISUAL_KEEP_FIELD.encode() not in body:
        return body, None
    try:
        parsed = json.loads(body)
    except ValueError:
        return body, None  # vLLM answers malformed JSON itself
    xargs = parsed.get("vllm_xargs") if isinstance(parsed, dict) else None
    if not isinstance(xargs, dict) or VISUAL_KEEP_FIELD not in xargs:
        return body, None
    value = xargs[VISUAL_KEEP_FIELD]
    if isinstance(value, bool):
        try:
            validate_visual_keep(value, field="vllm_xargs.visual_keep")
        except ValueError as exc:
            return None, str(exc)
    if value is None:
        del xargs[VISUAL_KEEP_FIELD]
        return json.dumps(parsed).encode(), None
    return body, None


class RawKeepMiddleware:
    """Pure ASGI middleware: applies `raw_xargs_keep_problem` to POST bodies."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message], receive), send)
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body, error = raw_xargs_keep_problem(b"".join(chunks))
        if error is not None:
            payload = json.dumps({"error": {"message": error, "type": "BadRequestError",
                                            "param": "vllm_xargs.visual_keep", "code": 400}}).encode()
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload})
            return
        await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive), send)


def _replay(messages: list[dict], receive):
    pending = list(messages)

    async def replayed():
        return pending.pop(0) if pending else await receive()

    return replayed
