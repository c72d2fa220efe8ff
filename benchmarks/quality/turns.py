"""Accuracy over a chat's turns through `vllm serve`, with prefix caching on.

    python -m benchmarks.quality.turns --dialogues 150 --keeps 0.111 0.05 --shares 0.25 0.5 1.0

Held-out dialogues (seeds no training run and no other split draws): one scene, one question of
every kind it allows, asked in turn; each turn is sent with the true answers of the turns before
it as the history, so every configuration answers the same prompts. Configurations: all image
tokens (keep 1.0), and per keep the plugin with `visual_turns` incremental (one server per delta
share, `PIO_FVLM_TURN_DELTA_SHARE`), first_turn and reselect. Reported per configuration: accuracy
on first turns and on later turns, and each as a share of the all-tokens accuracy on the same
questions.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..common import BenchmarkParser, progress, results_dir, write_result
from .reductions import VALIDATION_SEEDS
from .task import make_dialogue

DIALOGUE_SEEDS = range(VALIDATION_SEEDS.stop, VALIDATION_SEEDS.stop + 1000)  # after every other split


def run_dialogue(client, model, dialogue, body) -> list[str]:
    """The served answer to each turn, with the true answers of the turns before as history."""
    from pio_fvlm_vllm.images import data_url

    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(dialogue.image)}},
                                             {"type": "text", "text": dialogue.turns[0].question}]}]
    answers = []
    for n, turn in enumerate(dialogue.turns):
        if n:
            messages = messages + [{"role": "user", "content": turn.question}]
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=1, temperature=0.0,
                                               extra_body=body)
        answers.append((reply.choices[0].message.content or "").strip())
        messages = messages + [{"role": "assistant", "content": turn.answer}]
    return answers


def serve(checkpoint: Path, dialogues, configs: dict[str, dict], env: dict[str, str], concurrency: int
          ) -> dict[str, list[list[str]]]:
    from openai import OpenAI

    from pio_fvlm_vllm.serving import VllmServer

    out = {}
    with VllmServer(checkpoint, args=["--dtype", "float32", "--max-model-len", "2048"], env=env) as server, \
            ThreadPoolExecutor(concurrency) as pool:
        client = OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
        for name, body in configs.items():
            out[name] = list(pool.map(lambda d: run_dialogue(client, str(checkpoint), d, body), dialogues))
            progress(f"{name}: {len(dialogues)} dialogues")
    return out


def score(dialogues, answers: list[list[str]], full: list[list[str]]) -> dict:
    first = later = first_ok = later_ok = first_full = later_full = 0
    for d, got, ref in zip(dialogues, answers, full):
        for n, turn in enumerate(d.turns):
            ok, ok_full = got[n] == turn.answer, ref[n] == turn.answer
            if n == 0:
                first, first_ok, first_full = first + 1, first_ok + ok, first_full + ok_full
            else:
                later, later_ok, later_full = later + 1, later_ok + ok, later_full + ok_full
    ratio = lambda ok, full_ok: ok / full_ok if full_ok else float("nan")  # noqa: E731
    return {"first_turns": first, "first_accuracy": first_ok / first, "first_of_full": ratio(first_ok, first_full),
            "later_turns": later, "later_accuracy": later_ok / later, "later_of_full": ratio(later_ok, later_full)}


def main(argv=None):
    p = BenchmarkParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=Path(__file__).parent / "checkpoint")
    p.add_argument("--dialogues", type=int, default=150)
    p.add_argument("--keeps", type=float, nargs="+", default=[0.111, 0.05])
    p.add_argument("--shares", type=float, nargs="+", default=[1.0], help="PIO_FVLM_TURN_DELTA_SHARE values")
    p.add_argument("--concurrency", type=int, default=8, help="dialogues in flight at once")
    p.add_argument("--proxy-layer", type=int, default=2,
                   help="K; the checkpoint grounds the question in decoder layer 2 of 4")
    p.add_argument("--name", default="quality_turns")
    args = p.parse_args(argv)
    if not 1 <= args.dialogues <= len(DIALOGUE_SEEDS):
        p.error(f"--dialogues must be in [1, {len(DIALOGUE_SEEDS)}], got {args.dialogues}")
    dialogues = [make_dialogue(s) for s in list(DIALOGUE_SEEDS)[: args.dialogues]]
    env = {"PIO_FVLM_PROXY_LAYER": str(args.proxy_layer)}
    answers: dict[str, list[list[str]]] = {}
    first_share, *other_shares = args.shares
    configs = {"all image tokens (keep 1.0)": {"visual_keep": 1.0}}
    for keep in args.keeps:
        configs[f"keep {keep} incremental, share {first_share}"] = {"visual_keep": keep, "visual_turns": "incremental"}
        configs[f"keep {keep} first_turn"] = {"visual_keep": keep, "visual_turns": "first_turn"}
        configs[f"keep {keep} reselect"] = {"visual_keep": keep, "visual_turns": "reselect"}
    answers.update(serve(args.checkpoint, dialogues, configs, {**env, "PIO_FVLM_TURN_DELTA_SHARE": str(first_share)},
                         args.concurrency))
    for share in other_shares:
        configs = {f"keep {keep} incremental, share {share}": {"visual_keep": keep, "visual_turns": "incremental"}
                   for keep in args.keeps}
        answers.update(serve(args.checkpoint, dialogues, configs, {**env, "PIO_FVLM_TURN_DELTA_SHARE": str(share)},
                             args.concurrency))
    full = answers["all image tokens (keep 1.0)"]
    scores = {name: score(dialogues, got, full) for name, got in answers.items()}
    later = scores[next(iter(scores))]["later_turns"]
    lines = [f"{len(dialogues)} held-out dialogues (seeds from {DIALOGUE_SEEDS.start}), {later} later-turn "
             f"questions, checkpoint `{args.checkpoint}`, through `vllm serve` with prefix caching on; history = "
             "the true answers. One standard error on a later-turn accuracy near 90%: about "
             f"{(0.9 * 0.1 / max(1, later)) ** 0.5:.1%}.", "",
             "| configuration | first turns | of full | later turns | of full |", "|---|---:|---:|---:|---:|"]
    for name, s in scores.items():
        lines.append(f"| {name} | {s['first_accuracy']:.1%} | {s['first_of_full']:.1%} | {s['later_accuracy']:.1%} | "
                     f"{s['later_of_full']:.1%} |")
    body = "\n".join(lines)
    print(body)
    write_result(f"{args.name}.md", "Quality over a chat's turns", body)
    (results_dir() / f"{args.name}.json").write_text(json.dumps(scores, indent=1))


if __name__ == "__main__":
    main()
