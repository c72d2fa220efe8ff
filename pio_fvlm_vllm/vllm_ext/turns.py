"""Where each user turn of a chat starts and ends in its prompt, so later turns reuse earlier ones.

A pruned image's selection depends on the text around it. If that text were the whole prompt,
every turn of a chat would select anew, hash differently and miss the prefix cache. Instead an
image's base selection sees the prompt only up to the end of the turn that brought it (the
"cut"), so every later turn rebuilds the same item, hash and rows, and its blocks are prefix-cache
hits. A later turn adds a *delta*: the tokens its own question selects among those not yet
served, placed just before its user message at their original positions (`processor.py`).

Message boundaries exist only in the renderer, which has the parsed conversation; the processor
sees token ids. The renderer wrapper here re-renders the conversation's prefixes with the same
template arguments, tokenizes them, keeps the boundaries only where each prefix's tokens are a
prefix of the whole prompt's (a template that rewrites history fails that check, and its
requests fall back to a whole-prompt selection), and files them in a bounded in-process table
under a digest of the prompt's token ids. The processor runs in the same process and looks them
up by the same digest: a prompt that was not rendered from chat messages (completions, token-in)
finds nothing, and even a client that sends a rendered chat's exact tokens gets boundaries that
are true of those tokens.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from vllm.logger import init_logger

logger = init_logger("vllm.pio_fvlm")


def token_digest(ids: Sequence[int]) -> str:
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()


@dataclass(frozen=True)
class ChatTurns:
    """User turns of a rendered chat prompt, as [start, end) token indices: `start` where the
    user message begins, `end` where its turn's served prompt ends (after the generation
    prompt that follows it)."""

    spans: tuple[tuple[int, int], ...]

    def turn_of(self, index: int) -> int | None:
        """The user turn whose [start, end) holds token `index`."""
        for t, (start, end) in enumerate(self.spans):
            if start <= index < end:
                return t
        return None


class _TurnTable:
    """Bounded map from a prompt's token digest to its turns, shared by the renderer's threads."""

    def __init__(self, capacity: int = 4096) -> None:
        self._data: OrderedDict[str, ChatTurns] = OrderedDict()
        self._lock = threading.Lock()
        self._capacity = capacity

    def put(self, ids: Sequence[int], turns: ChatTurns) -> None:
        key = token_digest(ids)
        with self._lock:
            self._data[key] = turns
            self._data.move_to_end(key)
            while len(self._data) > self._capacity:
                self._data.popitem(last=False)

    def get(self, ids: Sequence[int]) -> ChatTurns | None:
        key = token_digest(ids)
        with self._lock:
            return self._data.get(key)


CHAT_TURNS = _TurnTable()


def _is_prefix(prefix: list[int], ids: list[int]) -> bool:
    return len(prefix) <= len(ids) and ids[: len(prefix)] == prefix


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def chat_turns(render, tokenize, conversation: list, prompt_ids: list[int]) -> ChatTurns | None:
    """The user turns of `prompt_ids`, rendered from `conversation`; None when the chat has one
    user turn (nothing to reuse), ends in a non-user message, or its template does not render
    earlier turns as a prefix of later ones.

    render(messages, add_generation_prompt) -> prompt text; tokenize(text) -> ids.
    """
    users = [i for i, m in enumerate(conversation) if m.get("role") == "user"]
    if len(users) < 2 or users[-1] != len(conversation) - 1:
        return None
    spans: list[tuple[int, int]] = []
    for i in users:
        end = tokenize(render(conversation[: i + 1], True))
        if not _is_prefix(end, prompt_ids):
            return None
        # A history rendered alone may end in whitespace that the next message's first token
        # absorbs (Vicuna's "xx " + "USER:" is "xx" + " USER:"): its turn starts where the
        # tokens stop agreeing, which must lie after the turn before it.
        start = _common_prefix(tokenize(render(conversation[:i], False)), prompt_ids) if i else 0
        if (spans and start < spans[-1][1]) or start >= len(end):
            return None
        spans.append((start, len(end)))
    if spans[-1][1] != len(prompt_ids):
        return None
    return ChatTurns(tuple(spans))


def _template_kwargs(params) -> dict:
    kwargs = dict(params.get_apply_chat_template_kwargs())
    kwargs.pop("add_generation_prompt", None)
    kwargs.pop("continue_final_message", None)
    kwargs["tokenize"] = False
    return kwargs


def _note_turns(renderer, conversation, prompt, params) -> None:
    if not isinstance(prompt, dict) or "image" not in (prompt.get("multi_modal_data") or {}):
        return
    if sum(1 for m in conversation if m.get("role") == "user") < 2 or conversation[-1].get("role") != "user":
        return
    requested = params.get_apply_chat_template_kwargs()
    if requested.get("continue_final_message") or not requested.get("add_generation_prompt", True):
        return  # the prompt does not end where a turn's served prompt ends
    from vllm.renderers.hf import safe_apply_chat_template

    tokenizer = renderer.get_tokenizer()
    kwargs = _template_kwargs(params)

    def render(messages, add_generation_prompt):
        return safe_apply_chat_template(renderer.model_config, tokenizer, messages,
                                        add_generation_prompt=add_generation_prompt, **kwargs)

    def tokenize(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    try:
        ids = prompt["prompt_token_ids"] if "prompt_token_ids" in prompt else tokenize(prompt["prompt"])
        turns = chat_turns(render, tokenize, conversation, list(ids))
    except Exception:  # a template that cannot render a prefix: whole-prompt selection
        logger.debug("PIO-FVLM: no turn boundaries for this chat", exc_info=True)
        turns = None
    if turns is None:
        logger.warning_once("PIO-FVLM: this chat's earlier turns do not render as a prefix of the whole prompt "
                            "with this chat template; such chats select over the whole prompt every turn (no "
                            "prefix-cache reuse of their images)")
        return
    CHAT_TURNS.put(ids, turns)


def _record_turns(render_messages):
    @functools.wraps(render_messages)
    def wrapper(self, messages, params, *args, **kwargs):
        conversation, prompt = render_messages(self, messages, params, *args, **kwargs)
        _note_turns(self, conversation, prompt, params)
        return conversation, prompt

    wrapper.__pio_fvlm__ = True
    return wrapper


def _record_turns_async(render_messages_async):
    @functools.wraps(render_messages_async)
    async def wrapper(self, messages, params, *args, **kwargs):
        from vllm.utils.async_utils import make_async

        conversation, prompt = await render_messages_async(self, messages, params, *args, **kwargs)
        # A render and a tokenization per user turn: on the renderer's pool, off the event loop.
        await make_async(_note_turns, executor=getattr(self, "_executor", None))(self, conversation, prompt, params)
        return conversation, prompt

    wrapper.__pio_fvlm__ = True
    return wrapper


def install_turn_boundaries() -> None:
    from vllm.renderers.hf import HfRenderer

    for name, wrap in (("render_messages", _record_turns), ("render_messages_async", _record_turns_async)):
        current = getattr(HfRenderer, name)
        if not getattr(current, "__pio_fvlm__", False):
            setattr(HfRenderer, name, wrap(current))


# -- the plan of a prompt's items: pure functions over token ids ---------------------------

@dataclass(frozen=True)
class Delta:
    image: int  # which image (index among the prompt's images)
    turn: int  # the later user turn it serves
    insert: int  # prompt index of that turn's user message: the delta goes just before it
    cut: int  # prompt index where that turn's served prompt ends


@dataclass(frozen=True)
class TurnPlan:
    cuts: tuple[int, ...]  # per image: where the prompt its first selection sees ends
    deltas: tuple[Delta, ...]  # in prompt order


def image_starts(prompt_ids: Sequence[int], image_token_id: int) -> list[int]:
    """Index of the first token of each run of image tokens (one run per image)."""
    is_image = np.asarray(prompt_ids, dtype=np.int64) == image_token_id
    return np.flatnonzero(is_image & ~np.concatenate([[False], is_image[:-1]])).tolist()


def plan_turns(prompt_len: int, starts: Sequence[int], turns: ChatTurns | None, mode: str) -> TurnPlan:
    """Cuts and deltas of a prompt whose images start at `starts`.

    Without turns (not a chat, one user turn, a template that fails the prefix check) or with
    mode "reselect", every image sees the whole prompt and nothing is added: each request
    selects afresh. Otherwise an image sees the prompt up to the end of the turn that brought
    it, and with mode "incremental" every later user turn gets a delta of it.
    """
    whole = TurnPlan(tuple(prompt_len for _ in starts), ())
    if turns is None or mode == "reselect":
        return whole
    owners = [turns.turn_of(s) for s in starts]
    if any(t is None for t in owners):
        return whole
    cuts = tuple(turns.spans[t][1] for t in owners)
    deltas = []
    if mode == "incremental":
        for j, (start, end) in enumerate(turns.spans):
            deltas += [Delta(i, j, start, end) for i, t in enumerate(owners) if t < j]
    return TurnPlan(cuts, tuple(deltas))


class TextIndex:
    """Counts of a prompt's non-image tokens, for mapping indices between the prompt before
    and after its image placeholders expand (text tokens are the same in both)."""

    def __init__(self, ids: Sequence[int], image_token_id: int) -> None:
        # before[i]: text tokens in ids[:i]
        self.before = np.concatenate([[0], np.cumsum(np.asarray(ids, dtype=np.int64) != image_token_id)])

    def count(self, end: int) -> int:
        """Tokens of ids[:end] that are not image tokens."""
        return int(self.before[end])

    def index_after(self, num_text: int) -> int:
        """The index right after the first `num_text` non-image tokens."""
        if num_text == 0:
            return 0
        if num_text > self.before[-1]:
            raise ValueError(f"a prompt of {int(self.before[-1])} text tokens has no index after {num_text}")
        return int(np.searchsorted(self.before, num_text))


def text_count(ids: Sequence[int], image_token_id: int, end: int) -> int:
    """Tokens of ids[:end] that are not image tokens."""
    return TextIndex(ids, image_token_id).count(end)


def index_after_text(ids: Sequence[int], image_token_id: int, num_text: int) -> int:
    """The index in `ids` right after its first `num_text` non-image tokens."""
    return TextIndex(ids, image_token_id).index_after(num_text)
