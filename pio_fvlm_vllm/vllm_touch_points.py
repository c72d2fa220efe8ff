"""The vLLM code the plugin wraps, subclasses or relies on, fingerprinted per vLLM release.

The plugin hooks into vLLM internals (the M-RoPE pruning hook, the multimodal processor and
renderer seams, a CPU runner flag). A release whose touched code is unchanged is safe to
support; one where any of it changed needs review first. This module fingerprints each touched
definition (the sha256 of its exact source) in an installed vLLM or an unpacked wheel:

    python -m pio_fvlm_vllm.vllm_touch_points                    # the installed vLLM
    python -m pio_fvlm_vllm.vllm_touch_points --root DIR         # DIR/vllm from an unpacked wheel
    python -m pio_fvlm_vllm.vllm_touch_points --compare A B      # two roots, the differing ones

`tests/test_vllm_touch_points.py` checks the installed vLLM against the fingerprints recorded
for its release in `vllm_touch_points.json` (0.32.0 and 0.33.0), which this command writes
with `--record VERSION`.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import sys
from pathlib import Path

RECORD = Path(__file__).with_name("vllm_touch_points.json")

# (file under vllm/, qualified name): what the plugin does with it.
TOUCH_POINTS: dict[tuple[str, str], str] = {
    # Positions: the pruning hook's callers on both runners, and the interfaces the model implements.
    ("model_executor/models/interfaces.py", "SupportsMRoPE"): "implemented by the model",
    ("model_executor/models/interfaces.py", "SupportsMultiModalPruning"): "implemented by the model",
    ("v1/worker/gpu_model_runner.py", "GPUModelRunner._gather_mm_embeddings"): "calls the positions hook (V1)",
    ("v1/worker/gpu_model_runner.py", "GPUModelRunner._init_mrope_positions"): "initial positions (V1)",
    ("v1/worker/gpu_model_runner.py", "GPUModelRunner._calc_mrope_positions"): "decode positions (V1)",
    ("v1/worker/gpu_model_runner.py", "GPUModelRunner.load_model"): "sets the pruning flag the CPU runner skips",
    ("v1/worker/cpu_model_runner.py", "CPUModelRunner.load_model"): "wrapped: sets the pruning flag",
    ("v1/worker/gpu/model_states/mm_pruning.py", "MultiModalPruner"): "calls the positions hook (MRV2)",
    ("v1/worker/gpu/mm/rope.py", ""): "MRV2 positions and decode delta",
    ("transformers_utils/config.py", "uses_mrope"): "decides 3-row positions from mrope_section",
    ("model_executor/models/config.py", "VerifyAndUpdateConfig"): "per-architecture engine settings",
    # The families' base classes.
    ("model_executor/models/llava.py", ""): "LLaVA-1.5 model, processor and info subclassed",
    ("model_executor/models/llava_next.py", ""): "LLaVA-NeXT model, processor and info subclassed",
    ("model_executor/models/qwen2_5_vl.py", ""): "Qwen2.5-VL model, processor and info subclassed",
    ("model_executor/models/qwen3_vl.py", ""): "Qwen3-VL model, processor and info subclassed",
    ("model_executor/models/qwen2_vl.py", "Qwen2VLProcessingInfo"): "image grids and token counts",
    ("model_executor/models/qwen2.py", "Qwen2DecoderLayer"): "proxy weights and layers of Qwen2.5-VL's LM",
    ("model_executor/models/qwen3.py", "Qwen3Attention"): "proxy weights of Qwen3-VL's LM (q_norm, k_norm)",
    ("model_executor/models/llama.py", "LlamaAttention.__init__"): "proxy weights read from qkv_proj, o_proj",
    ("model_executor/models/llama.py", "LlamaDecoderLayer"): "hand-off hook on a layer's (hidden, residual)",
    # Processor seams.
    ("multimodal/processing/processor.py", "BaseMultiModalProcessor.apply"): "overridden",
    ("multimodal/processing/processor.py", "BaseMultiModalProcessor._get_mm_hashes"): "overridden",
    ("multimodal/processing/processor.py", "BaseMultiModalProcessor._apply_hf_processor_main"): "overridden",
    ("multimodal/processing/processor.py", "BaseMultiModalProcessor._get_mm_fields_config"): "a delta's kwargs",
    ("multimodal/inputs.py", "MultiModalKwargsItems.from_hf_inputs"): "a delta's kwargs",
    ("multimodal/cache/base.py", "BaseMultiModalProcessorCache"): "a delta's kwargs sent once, as items are",
    # Chat turns: boundaries from the renderer, reuse through prefix-cache block keys.
    ("renderers/hf.py", "HfRenderer.render_messages"): "wrapped: turn boundaries recorded",
    ("renderers/hf.py", "HfRenderer.render_messages_async"): "wrapped: turn boundaries recorded",
    ("renderers/hf.py", "safe_apply_chat_template"): "renders each turn's prefix",
    ("v1/core/kv_cache_utils.py", "_gen_mm_extra_hash_keys"): "block keys: a turn's items keep their hash",
    # Request routing and the HTTP surface.
    ("entrypoints/generate/base/protocol.py", "validate_request_mm_kwargs"): "wrapped: visual_keep exempted",
    ("renderers/online_renderer.py", "OnlineRenderer.preprocess_chat"): "wrapped: visual_keep routed",
    ("renderers/online_renderer.py", "OnlineRenderer.preprocess_cmpl"): "wrapped: visual_keep routed",
    ("entrypoints/common/offline.py", "OfflineInferenceMixin._add_completion_requests"): "wrapped",
    ("entrypoints/common/offline.py", "OfflineInferenceMixin._add_chat_requests"): "wrapped",
    ("entrypoints/scale_out/token_in_token_out/serving.py", "ServingTokens.serve_tokens"): "wrapped: contexts checked",
    ("entrypoints/anthropic/serving.py", "AnthropicServingMessages._build_base_request"): "wrapped: extras carried",
    ("entrypoints/serve/middleware/register.py", "init_entrypoints_middleware"): "wrapped: middlewares added",
}


def _definition(tree: ast.Module, qualname: str) -> ast.AST | None:
    node: ast.AST = tree
    for part in qualname.split("."):
        body = getattr(node, "body", [])
        node = next((n for n in body if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                     and n.name == part), None)
        if node is None:
            return None
    return node


def fingerprint(root: Path, path: str, qualname: str) -> str:
    """sha256 of the definition's exact source (of the whole file when qualname is empty);
    "missing" when the file or the definition is gone."""
    file = root / "vllm" / path
    if not file.exists():
        return "missing"
    text = file.read_text(encoding="utf-8")
    if qualname:
        node = _definition(ast.parse(text), qualname)
        if node is None:
            return "missing"
        text = ast.get_source_segment(text, node, padded=True) or ""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprints(root: Path) -> dict[str, str]:
    return {f"{path}:{name}": fingerprint(root, path, name) for path, name in TOUCH_POINTS}


def installed_root() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("vLLM is not installed")
    return Path(next(iter(spec.submodule_search_locations))).parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pio_fvlm_vllm.vllm_touch_points", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, help="directory holding vllm/ (default: the installed vLLM)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    parser.add_argument("--record", metavar="VERSION", help=f"store --root's fingerprints in {RECORD.name}")
    args = parser.parse_args(argv)
    if args.compare:
        a, b = (fingerprints(r) for r in args.compare)
        changed = [k for k in a if a[k] != b[k]]
        for key in changed:
            print(f"changed  {key}")
        print(f"{len(changed)} of {len(a)} touch points differ")
        return 1 if changed else 0
    prints = fingerprints(args.root or installed_root())
    if args.record:
        recorded = json.loads(RECORD.read_text()) if RECORD.exists() else {}
        recorded[args.record] = prints
        RECORD.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
    for key, value in prints.items():
        print(f"{value}  {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
