"""What visual_keep buys a vLLM deployment: stock vLLM, the plugin at keep 1.0, and pruned
keeps, side by side in one run against real `vllm serve` processes on loopback.

Every pruned keep is also served with a free selection: the same server code and the same k
per image, picked by uniform stride with no proxy pass (`PIO_FVLM_SELECTOR=uniform`). That is
the speed-up pruning to k tokens could give at best; each plugin row says how much of it the
plugin keeps (the ratio of the two speed-ups over stock), and what share of its TTFT the
selection pass takes.

    python -m benchmarks.serving --checkpoint checkpoints/small --load-format dummy \\
        --requests 24 --concurrency 1 8 --keeps 1.0 0.5 0.222 0.111
    python -m benchmarks.serving --base-url http://gpu-host:8000 --model llava-hf/llava-v1.6-vicuna-7b-hf

Per configuration and concurrency: TTFT p50/p99, end-to-end latency p50/p99, requests/s and
output tokens/s, prompt tokens per request, peak KV-cache usage and the largest number of
such requests the KV cache holds at once (from /metrics), and the selection pass's own time.
Results go to benchmarks/results/serving_<name>.md (+ .json, and PNG plots).
"""

from __future__ import annotations

import argparse
import re
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pio_fvlm_vllm.images import image_message, synthetic_image
from pio_fvlm_vllm.serving import VllmServer, fetch_metrics, metric_value

from .common import BenchmarkParser, progress, results_dir, write_result, write_rows

SIZES = [(640, 480), (1008, 336), (672, 672), (336, 1008), (800, 600)]
QUESTIONS = ["What is shown in this image?", "Describe the objects and their colours.",
             "How many squares are there?", "Where is the largest square?"]


scrape = fetch_metrics


def metric(text: str, name: str) -> float:
    return metric_value(text, name) or 0.0


def kv_capacity_tokens(text: str) -> int | None:
    m = re.search(r'^vllm:cache_config_info{([^}]*)}', text, re.M)
    if not m:
        return None
    labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
    try:
        return int(labels["num_gpu_blocks"]) * int(labels["block_size"])
    except (KeyError, ValueError):
        return None


@dataclass
class Result:
    config: str
    keep: float | None
    concurrency: int
    requests: int
    errors: int
    ttft_p50: float
    ttft_p99: float
    latency_p50: float
    latency_p99: float
    requests_per_s: float
    output_tokens_per_s: float
    prompt_tokens_mean: float
    kv_usage_peak: float
    max_concurrent_fit: int | None
    selection_s_per_image: float | None
    extras: dict = field(default_factory=dict)
    cached_tokens_mean: float = 0.0  # prompt tokens served from the prefix cache


def percentile(values, q):
    values = sorted(values)
    if not values:
        return float("nan")
    idx = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[idx]


def one_request(client, model, messages, keep, max_tokens):
    body: dict = {"ignore_eos": True}
    if keep is not None:
        body["visual_keep"] = keep
    start = time.perf_counter()
    first = None
    usage = None
    out_tokens = 0
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0.0, stream=True,
        stream_options={"include_usage": True}, extra_body=body)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            usage = chunk.usage
    total = time.perf_counter() - start
    cached = 0
    if usage is not None:
        out_tokens = usage.completion_tokens
        details = getattr(usage, "prompt_tokens_details", None)
        cached = (details.cached_tokens or 0) if details is not None else 0
    return (first if first is not None else total), total, usage.prompt_tokens if usage else 0, out_tokens, cached


def run_config(base_url, model, name, keep, concurrency, workload, max_tokens) -> Result:
    from openai import OpenAI

    client = OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=1800)
    before = scrape(base_url)
    peak = [0.0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], metric(scrape(base_url), "vllm:kv_cache_usage_perc"))
            except OSError:
                pass
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    results, errors = [], 0
    done = [0]
    start = time.perf_counter()

    def task(messages):
        try:
            return one_request(client, model, messages, keep, max_tokens)
        finally:
            done[0] += 1
            if done[0] % max(1, len(workload) // 4) == 0:
                progress(f"{name} c={concurrency}: {done[0]}/{len(workload)} requests")

    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(task, m) for m in workload]
        for f in futures:
            try:
                results.append(f.result())
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors += 1
                progress(f"request failed: {exc}")
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    after = scrape(base_url)
    ttft = [r[0] for r in results]
    lat = [r[1] for r in results]
    prompt = [r[2] for r in results]
    out = sum(r[3] for r in results)
    capacity = kv_capacity_tokens(after)
    mean_prompt = statistics.mean(prompt) if prompt else float("nan")
    fit = int(capacity // (mean_prompt + max_tokens)) if capacity and prompt else None
    images = metric(after, "pio_fvlm_images_pruned_total") - metric(before, "pio_fvlm_images_pruned_total")
    sel = metric(after, "pio_fvlm_selection_seconds_total") - metric(before, "pio_fvlm_selection_seconds_total")
    cached = statistics.mean(r[4] for r in results) if results else float("nan")
    return Result(name, keep, concurrency, len(workload), errors, percentile(ttft, 0.5), percentile(ttft, 0.99),
                  percentile(lat, 0.5), percentile(lat, 0.99), len(results) / wall, out / wall, mean_prompt,
                  peak[0], fit, (sel / images) if images else None, cached_tokens_mean=cached)


def workload(n, seed=0):
    return [image_message(QUESTIONS[i % len(QUESTIONS)],
                          synthetic_image(*SIZES[i % len(SIZES)], seed=seed + i)) for i in range(n)]


FREE = "free selection"


def table(results: list[Result]) -> str:
    stock = {r.concurrency: r for r in results if r.config == "stock"}
    free = {(r.keep, r.concurrency): r for r in results if r.config.startswith(FREE)}
    lines = ["| config | conc. | TTFT p50 s | TTFT p99 s | latency p50 s | req/s | out tok/s | "
             "prompt tok/req | cached tok/req | KV peak | fits at once | selection s/image | selection / TTFT | TTFT vs stock | "
             "req/s vs stock | of free selection's gain (TTFT / req/s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        base = stock.get(r.concurrency)
        ttft_x = f"{base.ttft_p50 / r.ttft_p50:.2f}x" if base else "-"
        rps_x = f"{r.requests_per_s / base.requests_per_s:.2f}x" if base else "-"
        sel, share = "-", "-"
        if r.selection_s_per_image is not None:
            sel, share = f"{r.selection_s_per_image:.3f}", f"{r.selection_s_per_image / r.ttft_p50:.0%}"
        ceiling = free.get((r.keep, r.concurrency))
        kept = "-"
        if ceiling is not None and ceiling is not r:
            # Ratio of the speed-ups over stock: the stock time cancels.
            kept = f"{ceiling.ttft_p50 / r.ttft_p50:.0%} / {r.requests_per_s / ceiling.requests_per_s:.0%}"
        lines.append(f"| {r.config} | {r.concurrency} | {r.ttft_p50:.3f} | {r.ttft_p99:.3f} | {r.latency_p50:.3f} | "
                     f"{r.requests_per_s:.3f} | {r.output_tokens_per_s:.1f} | {r.prompt_tokens_mean:.0f} | "
                     f"{r.cached_tokens_mean:.0f} | "
                     f"{r.kv_usage_peak:.1%} | {r.max_concurrent_fit or '-'} | {sel} | {share} | {ttft_x} | "
                     f"{rps_x} | {kept} |")
    errors = sum(r.errors for r in results)
    lines.append("")
    lines.append(f"Requests failed: {errors}. TTFT and latency from streamed responses; 'fits at once' = KV-cache "
                 "capacity (tokens, from vllm:cache_config_info) / (mean prompt tokens + max_tokens). "
                 f"'{FREE}' = the plugin's server with `PIO_FVLM_SELECTOR=uniform`: the same k per image, no proxy "
                 "pass. The last column is (plugin speed-up over stock) / (free selection's speed-up over stock) "
                 "at the same keep and concurrency.")
    return "\n".join(lines)


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for conc in sorted({r.concurrency for r in results}):
        rs = [r for r in results if r.concurrency == conc and r.config.startswith("plugin")]
        keeps = [r.keep for r in rs]
        axes[0].plot(keeps, [r.ttft_p50 for r in rs], "o-", label=f"plugin, concurrency {conc}")
        axes[1].plot(keeps, [r.requests_per_s for r in rs], "o-", label=f"plugin, concurrency {conc}")
        free = [r for r in results if r.concurrency == conc and r.config.startswith(FREE)]
        if free:
            axes[0].plot([r.keep for r in free], [r.ttft_p50 for r in free], "x:", label=f"{FREE}, concurrency {conc}")
            axes[1].plot([r.keep for r in free], [r.requests_per_s for r in free], "x:")
        stock = [r for r in results if r.concurrency == conc and r.config == "stock"]
        if stock:
            axes[0].axhline(stock[0].ttft_p50, ls="--", color="grey", label=f"stock, concurrency {conc}")
            axes[1].axhline(stock[0].requests_per_s, ls="--", color="grey")
    first = [r for r in results
             if r.concurrency == min(x.concurrency for x in results) and r.config.startswith("plugin")]
    axes[2].bar([str(r.keep) for r in first], [r.prompt_tokens_mean for r in first])
    axes[0].set(xlabel="visual_keep", ylabel="TTFT p50 (s)", title="Time to first token", xscale="log")
    axes[1].set(xlabel="visual_keep", ylabel="requests / s", title="Throughput", xscale="log")
    axes[2].set(xlabel="visual_keep", ylabel="tokens", title="KV tokens per request (prompt)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    progress(f"wrote {path}")


def main(argv=None):
    p = BenchmarkParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="checkpoints/small", help="model directory to serve (started here)")
    p.add_argument("--base-url", default=None, help="target an already running plugin server instead")
    p.add_argument("--model", default=None, help="served model name (with --base-url)")
    p.add_argument("--load-format", default=None, help="e.g. dummy")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--keeps", type=float, nargs="+", default=[1.0, 0.5, 0.222, 0.111])
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--no-stock", action="store_true", help="skip the stock vLLM baseline")
    p.add_argument("--no-free-selection", action="store_true",
                   help="skip the free-selection ceiling (uniform stride, no proxy) at the pruned keeps")
    p.add_argument("--server-arg", action="append", default=[], help="extra vllm serve argument (repeatable)")
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable for every server started, stock included (repeatable)")
    p.add_argument("--name", default="cpu_small")
    args = p.parse_args(argv)
    if args.base_url and (args.server_env or args.server_arg):
        p.error("--server-env and --server-arg apply to the servers this benchmark starts; "
                "with --base-url, start the server with them yourself")
    server_env = {}
    for item in args.server_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            p.error(f"--server-env must be NAME=VALUE, got {item!r}")
        server_env[name] = value

    # vLLM's defaults (prefix caching on); fresh images every round, so a request reuses at
    # most the text before its image: the runs measure compute. Multi-turn reuse: benchmarks.turns.
    serve_args = ["--dtype", args.dtype, "--max-model-len", "4096", "--enable-prompt-tokens-details",
                  *args.server_arg]
    if args.load_format:
        serve_args += ["--load-format", args.load_format]
    results: list[Result] = []

    rounds = [0]

    def fresh_workload(n):
        rounds[0] += 1
        return workload(n, seed=1000 * rounds[0])

    def sweep(base_url, model, configs):
        for name, keep in configs:
            # A warm-up request per configuration so one-time compilation does not count.
            run_config(base_url, model, name, keep, 1, fresh_workload(1), args.max_tokens)
            for conc in args.concurrency:
                progress(f"{name}: concurrency {conc}, {args.requests} requests")
                results.append(run_config(base_url, model, name, keep, conc, fresh_workload(args.requests),
                                          args.max_tokens))

    plugin_configs = [(f"plugin keep={k}", k) for k in args.keeps]
    if args.base_url:
        sweep(args.base_url, args.model, plugin_configs)
    else:
        model = str(Path(args.checkpoint))
        if not args.no_stock:
            with VllmServer(model, plugin=False, args=serve_args, env=server_env) as stock:
                sweep(stock.base_url, model, [("stock", None)])
        with VllmServer(model, args=serve_args, env=server_env) as server:
            sweep(server.base_url, model, plugin_configs)
        pruned = [k for k in args.keeps if k < 1.0]
        if pruned and not args.no_free_selection:
            with VllmServer(model, args=serve_args, env={**server_env, "PIO_FVLM_SELECTOR": "uniform"}) as free:
                sweep(free.base_url, model, [(f"{FREE} keep={k}", k) for k in pruned])

    body = table(results)
    print(body)
    intro = (f"Workload: {args.requests} chat requests, one image each, sizes cycling through {SIZES}, "
             f"max_tokens={args.max_tokens} (ignore_eos), dtype {args.dtype}, prefix caching on (vLLM's "
             f"default; 'cached tok/req' is what it served), every round with images not seen before"
             f"{', --load-format ' + args.load_format if args.load_format else ''}; stock = vLLM with no "
             f"plugin loaded (VLLM_PLUGINS=''), same arguments"
             f"{'; every server with ' + ', '.join(args.server_env) if args.server_env else ''}"
             f".\n\n![serving](serving_{args.name}.png)\n\n")
    write_result(f"serving_{args.name}.md", "Serving benchmark", intro + body)
    write_rows(f"serving_{args.name}.json", results)
    plot(results, results_dir() / f"serving_{args.name}.png")


if __name__ == "__main__":
    main()
