"""Multi-turn chats with prefix caching on, as vLLM serves them by default: stock vLLM, the
plugin (each `visual_turns` mode asked for) and the free-selection ceiling, side by side in one
run against real `vllm serve` processes on loopback.

Each chat asks 2-5 questions about one image; several chats run at once, each turn sent when
the chat's previous answer is back. Per configuration and turn: TTFT p50/p99, prompt tokens and
the prompt tokens served from the prefix cache (`usage.prompt_tokens_details.cached_tokens`), and
each turn's TTFT relative to stock's same turn.

    python -m benchmarks.turns --checkpoint checkpoints/small --load-format dummy --dtype float32 \\
        --chats 4 --turns 3 --concurrency 1

Results go to benchmarks/results/turns_<name>.md (+ .json).
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pio_fvlm_vllm.images import image_message, synthetic_image
from pio_fvlm_vllm.serving import VllmServer

from .common import BenchmarkParser, progress, write_result, write_rows

QUESTIONS = ["What is shown in this image?", "Which square is red?", "How many shapes are there?",
             "Where is the largest shape?", "What colour is the circle?"]
FREE = "free selection"


@dataclass
class TurnResult:
    config: str
    turn: int  # 1-based
    requests: int
    errors: int
    ttft_p50: float
    ttft_p99: float
    prompt_tokens_mean: float
    cached_tokens_mean: float


def _percentile(values, q):
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def _ask(client, model, conversation, body, max_tokens):
    start = time.perf_counter()
    reply = client.chat.completions.create(model=model, messages=conversation, max_tokens=max_tokens,
                                           temperature=0.0, extra_body=body or None)
    elapsed = time.perf_counter() - start  # max_tokens 1: the time to the first token
    details = reply.usage.prompt_tokens_details
    cached = (details.cached_tokens or 0) if details is not None else 0
    return elapsed, reply.usage.prompt_tokens, cached, reply.choices[0].message.content or ""


def run_chats(base_url, model, name, body, chats, turns, concurrency, size, seed, max_tokens) -> list[TurnResult]:
    from openai import OpenAI

    client = OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=1800)
    per_turn: list[list[tuple[float, int, int]]] = [[] for _ in range(turns)]
    errors = [0] * turns

    def chat(c: int):
        conversation = image_message(QUESTIONS[0], synthetic_image(*size, seed=seed + c))
        for t in range(turns):
            if t:
                conversation = conversation + [{"role": "user", "content": QUESTIONS[t % len(QUESTIONS)]}]
            try:
                ttft, prompt, cached, answer = _ask(client, model, conversation, body, max_tokens)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors[t] += 1
                progress(f"{name}: chat {c} turn {t + 1} failed: {exc}")
                return
            per_turn[t].append((ttft, prompt, cached))
            conversation = conversation + [{"role": "assistant", "content": answer}]

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(chat, range(chats)))
    progress(f"{name}: {chats} chats of {turns} turns done")
    results = []
    for t, rows in enumerate(per_turn):
        ttft = [r[0] for r in rows]
        results.append(TurnResult(name, t + 1, len(rows), errors[t], _percentile(ttft, 0.5), _percentile(ttft, 0.99),
                                  statistics.mean(r[1] for r in rows) if rows else float("nan"),
                                  statistics.mean(r[2] for r in rows) if rows else float("nan")))
    return results


def table(results: list[TurnResult]) -> str:
    stock = {r.turn: r for r in results if r.config == "stock"}
    lines = ["| configuration | turn | TTFT p50 (s) | TTFT p99 (s) | p50 vs stock's turn | prompt tokens | "
             "cached prompt tokens | errors |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        base = stock.get(r.turn)
        ratio = f"{r.ttft_p50 / base.ttft_p50:.2f}x" if base and base.ttft_p50 > 0 and r.config != "stock" else "-"
        lines.append(f"| {r.config} | {r.turn} | {r.ttft_p50:.3f} | {r.ttft_p99:.3f} | {ratio} | "
                     f"{r.prompt_tokens_mean:.0f} | {r.cached_tokens_mean:.0f} | {r.errors} |")
    return "\n".join(lines)


def main(argv=None):
    p = BenchmarkParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="checkpoints/small", help="model directory to serve (started here)")
    p.add_argument("--load-format", default=None, help="e.g. dummy")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--chats", type=int, default=4)
    p.add_argument("--turns", type=int, default=3, choices=range(2, 6))
    p.add_argument("--concurrency", type=int, default=1, help="chats in flight at once")
    p.add_argument("--keep", type=float, default=0.111)
    p.add_argument("--modes", nargs="+", default=["incremental", "first_turn", "reselect"],
                   choices=["incremental", "first_turn", "reselect"])
    p.add_argument("--size", type=int, nargs=2, default=[672, 672], metavar=("W", "H"))
    p.add_argument("--max-tokens", type=int, default=1)
    p.add_argument("--no-stock", action="store_true")
    p.add_argument("--no-free-selection", action="store_true")
    p.add_argument("--delta-share", type=float, default=None,
                   help="PIO_FVLM_TURN_DELTA_SHARE for the plugin's servers (default: the plugin's default)")
    p.add_argument("--server-arg", action="append", default=[], help="extra vllm serve argument (repeatable)")
    p.add_argument("--name", default="cpu_small")
    args = p.parse_args(argv)

    # vLLM's defaults: prefix caching and chunked prefill on.
    serve_args = ["--dtype", args.dtype, "--max-model-len", "4096", "--enable-prompt-tokens-details",
                  *args.server_arg]
    if args.load_format:
        serve_args += ["--load-format", args.load_format]
    model = str(Path(args.checkpoint))
    env = {} if args.delta_share is None else {"PIO_FVLM_TURN_DELTA_SHARE": str(args.delta_share)}
    size = tuple(args.size)
    results: list[TurnResult] = []
    rounds = [0]

    def sweep(base_url, configs):
        for name, body in configs:
            rounds[0] += 1
            # A warm-up chat per configuration (its own image) so one-time compilation does not count.
            run_chats(base_url, model, name + " (warm-up)", body, 1, args.turns, 1, size, 10_000 * rounds[0],
                      args.max_tokens)
            results.extend(run_chats(base_url, model, name, body, args.chats, args.turns, args.concurrency, size,
                                     10_000 * rounds[0] + 100, args.max_tokens))

    if not args.no_stock:
        with VllmServer(model, plugin=False, args=serve_args) as stock:
            sweep(stock.base_url, [("stock", {})])
    with VllmServer(model, args=serve_args, env=env) as server:
        sweep(server.base_url, [(f"plugin keep={args.keep} {mode}", {"visual_keep": args.keep, "visual_turns": mode})
                                for mode in args.modes])
    if not args.no_free_selection:
        with VllmServer(model, args=serve_args, env={**env, "PIO_FVLM_SELECTOR": "uniform"}) as free:
            sweep(free.base_url, [(f"{FREE} keep={args.keep} incremental",
                                   {"visual_keep": args.keep, "visual_turns": "incremental"})])

    body = table(results)
    print(body)
    intro = (f"Workload: {args.chats} chats of {args.turns} turns about one {size[0]}x{size[1]} image each "
             f"(a new image per chat and configuration), {args.concurrency} chat(s) at a time, each turn sent "
             f"when the previous answer is back, max_tokens={args.max_tokens}, dtype {args.dtype}, prefix caching "
             f"and chunked prefill on (vLLM's defaults), --enable-prompt-tokens-details"
             f"{', --load-format ' + args.load_format if args.load_format else ''}"
             f"{', ' + ' '.join(args.server_arg) if args.server_arg else ''}; stock = vLLM with no plugin "
             f"loaded, same arguments; {FREE} = the plugin's server picking the same k by uniform stride with no "
             f"proxy pass (PIO_FVLM_SELECTOR=uniform), the ceiling of what pruning can give; delta share "
             f"{args.delta_share if args.delta_share is not None else 'the default'}.\n\n")
    write_result(f"turns_{args.name}.md", "Multi-turn chats with prefix caching", intro + body)
    write_rows(f"turns_{args.name}.json", results)


if __name__ == "__main__":
    main()
