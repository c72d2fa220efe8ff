"""End to end in one command: build the tiny checkpoint, serve it with the plugin, ask about
an image with and without `visual_keep`, print the answers and token counts, stop.

    python -m pio_fvlm_vllm.demo [--keep 0.11] [--checkpoint checkpoints/tiny]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .budget import validate_visual_keep
from .checkpoints import build
from .images import image_message, synthetic_image
from .serving import VllmServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pio_fvlm_vllm.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=float, default=0.11, help="visual_keep for the pruned request")
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/tiny"))
    args = parser.parse_args(argv)
    keep = validate_visual_keep(args.keep, field="--keep")

    if not (args.checkpoint / "config.json").exists():
        build("tiny", args.checkpoint)
    from openai import OpenAI

    with VllmServer(args.checkpoint, args=["--dtype", "float32", "--max-model-len", "4096"]) as server:
        client = OpenAI(base_url=server.base_url + "/v1", api_key="unused")
        messages = image_message("What is shown in this image?", synthetic_image(640, 480))
        rows = []
        for label, extra in (("all image tokens", None), (f"visual_keep={keep}", {"visual_keep": keep})):
            raw = client.chat.completions.with_raw_response.create(
                model=str(args.checkpoint), messages=messages, max_tokens=16, temperature=0.0,
                extra_body=extra,
            )
            reply = raw.parse()
            rows.append((label, reply.usage.prompt_tokens, raw.headers.get("x-pio-fvlm-image-tokens"),
                         reply.choices[0].message.content))
    print()
    print(f"{'request':<20} {'prompt_tokens':>13} {'image tokens kept/total':>24}  answer")
    for label, prompt_tokens, image_tokens, answer in rows:
        print(f"{label:<20} {prompt_tokens:>13} {image_tokens or '-':>24}  {answer!r}")
    print("\n(the tiny checkpoint has random weights: the answers are noise, the counts are real)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
