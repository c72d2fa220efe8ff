"""The vLLM code the plugin wraps, subclasses or relies on, fingerprinted per vLLM release.

The plugin hooks into vLLM internals (the M-RoPE pruning hook, the multimodal processor and
renderer seams, the weight-loading pass). A release whose touched code is unchanged is safe to
support; one where any of it changed needs review first. Each touched definition is
fingerprinted by the sha256 of its syntax tree (`ast.dump`), so comments and layout do not
count; the hash of its exact source is kept beside it, to tell such edits apart. A touch
point may apply to a range of releases only (Model Runner V1 is gone from 0.34 on; the CPU
backend's own pruner arrives in 0.34).

    python -m pio_fvlm_vllm.vllm_touch_points                      # the installed vLLM
    python -m pio_fvlm_vllm.vllm_touch_points --root DIR_OR_WHEEL  # an unpacked or packed wheel
    python -m pio_fvlm_vllm.vllm_touch_points --compare WHEEL_OR_DIR
        # which touch points a release changes, against every recorded release
    python -m pio_fvlm_vllm.vllm_touch_points --root WHEEL --record VERSION

A wheel is read in place (`pip download --no-deps vllm==X.Y.Z`); nothing is unpacked.
`tests/test_vllm_touch_points.py` checks the installed vLLM against the record of its release
in `vllm_touch_points.json`.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version

RECORD = Path(__file__).with_name("vllm_touch_points.json")
MISSING = "missing"
V1_RUNNER = "<0.34"  # Model Runner V1 is deleted in 0.34
CPU_MRV2 = ">=0.34"  # the CPU backend's own Model Runner V2 port


@dataclass(frozen=True)
class TouchPoint:
    path: str  # under vllm/
    qualname: str  # "" for the whole file
    role: str  # what the plugin does with it
    releases: str = ""  # the vLLM releases it exists in, as a version specifier ("" for all)

    @property
    def key(self) -> str:
        return f"{self.path}:{self.qualname}"

    def applies_to(self, version: str) -> bool:
        return Version(Version(version).base_version) in SpecifierSet(self.releases)


def _points(*rows: tuple[str, ...]) -> dict[str, TouchPoint]:
    points = [TouchPoint(*row) for row in rows]
    return {p.key: p for p in points}


TOUCH_POINTS: dict[str, TouchPoint] = _points(
    # Positions: the pruning hook's callers on every runner, and the interfaces the model implements.
    ("model_executor/models/interfaces.py", "SupportsMRoPE", "implemented by the model"),
    ("model_executor/models/interfaces.py", "SupportsMultiModalPruning", "implemented by the model"),
    ("v1/worker/gpu_model_runner.py", "GPUModelRunner._gather_mm_embeddings", "calls the positions hook (V1)",
     V1_RUNNER),
    ("v1/worker/gpu_model_runner.py", "GPUModelRunner._init_mrope_positions", "initial positions (V1)", V1_RUNNER),
    ("v1/worker/gpu_model_runner.py", "GPUModelRunner._calc_mrope_positions", "decode positions (V1)", V1_RUNNER),
    ("v1/worker/gpu_model_runner.py", "GPUModelRunner.load_model", "sets the pruning flag the CPU runner skips",
     V1_RUNNER),
    ("v1/worker/cpu_model_runner.py", "CPUModelRunner.load_model", "wrapped: sets the pruning flag (V1 CPU)",
     V1_RUNNER),
    ("v1/worker/gpu/model_states/mm_pruning.py", "MultiModalPruner", "calls the positions hook (MRV2)"),
    ("v1/worker/gpu/model_states/mm_pruning.py", "maybe_create_mm_pruner", "MRV2 prunes when the model can"),
    ("v1/worker/gpu/model_states/default.py", "DefaultModelState.add_request", "initial positions (MRV2)"),
    ("v1/worker/gpu/model_states/default.py", "DefaultModelState.prepare_inputs_embeds", "calls the pruner (MRV2)"),
    ("v1/worker/gpu/mm/rope.py", "", "MRV2 positions and decode delta"),
    ("v1/worker/gpu/buffer_utils.py", "StagedWriteTensor.stage_write",
     "holds the hook's positions by reference until applied"),
    ("v1/worker/cpu/mm_pruning.py", "MultiModalPruner", "calls the positions hook (CPU MRV2)", CPU_MRV2),
    ("v1/worker/cpu/mm_pruning.py", "maybe_create_mm_pruner", "the CPU runner prunes when the model can",
     CPU_MRV2),
    ("v1/worker/cpu/rope.py", "RopeState", "CPU positions and decode delta", CPU_MRV2),
    ("v1/worker/cpu/model_states/default.py", "DefaultModelState.add_request", "initial positions (CPU MRV2)",
     CPU_MRV2),
    ("v1/worker/cpu/model_states/default.py", "DefaultModelState.prepare_inputs_embeds",
     "calls the pruner (CPU MRV2)", CPU_MRV2),
    # The hand-off: embed_input_ids gets the step's multimodal rows in the order of its mask.
    ("v1/worker/gpu_model_runner.py", "GPUModelRunner._preprocess",
     "embed_input_ids with the multimodal mask, after the positions hook (V1)", V1_RUNNER),
    ("v1/worker/gpu/mm/encoder_runner.py", "EncoderRunner.gather_mm_embeddings", "the mask's row order (MRV2)"),
    ("v1/worker/gpu/mm/encoder_runner.py", "EncoderRunner.get_inputs_embeds", "embed_input_ids with the mask (MRV2)"),
    ("v1/worker/cpu/encoder_runner.py", "EncoderRunner.gather_mm_embeddings", "the mask's row order (CPU MRV2)",
     CPU_MRV2),
    ("v1/worker/cpu/encoder_runner.py", "EncoderRunner.get_inputs_embeds", "embed_input_ids with the mask (CPU MRV2)",
     CPU_MRV2),
    ("model_executor/models/utils.py", "_merge_multimodal_embeddings", "rows merged in the mask's order"),
    ("transformers_utils/config.py", "uses_mrope", "decides 3-row positions from mrope_section"),
    ("model_executor/models/config.py", "VerifyAndUpdateConfig", "per-architecture engine settings"),
    # Weight loading: the proxy's weights are copied before any post-load processing.
    ("model_executor/model_loader/utils.py", "process_weights_after_loading",
     "visits the snapshot module right after the root"),
    ("model_executor/model_loader/weight_utils.py", "finalize_model_weights",
     "module hooks, skipped below a quant_method", CPU_MRV2),
    ("model_executor/layers/quantization/base_config.py", "QuantizeMethodBase", "the snapshot's hook"),
    # The families' base classes.
    ("model_executor/models/llava.py", "", "LLaVA-1.5 model, processor and info subclassed"),
    ("model_executor/models/llava_next.py", "", "LLaVA-NeXT model, processor and info subclassed"),
    ("model_executor/models/qwen2_5_vl.py", "", "Qwen2.5-VL model, processor and info subclassed"),
    ("model_executor/models/qwen3_vl.py", "", "Qwen3-VL model, processor and info subclassed"),
    ("model_executor/models/qwen2_vl.py", "Qwen2VLProcessingInfo", "image grids and token counts"),
    ("model_executor/models/qwen2.py", "Qwen2DecoderLayer", "proxy weights and layers of Qwen2.5-VL's LM"),
    ("model_executor/models/qwen3.py", "Qwen3Attention", "proxy weights of Qwen3-VL's LM (q_norm, k_norm)"),
    ("model_executor/models/llama.py", "LlamaAttention.__init__", "proxy weights read from qkv_proj, o_proj"),
    ("model_executor/models/llama.py", "LlamaDecoderLayer", "hand-off hook on a layer's (hidden, residual)"),
    # Processor seams.
    ("multimodal/processing/processor.py", "BaseMultiModalProcessor.apply", "overridden"),
    ("multimodal/processing/processor.py", "BaseMultiModalProcessor._get_mm_hashes", "overridden"),
    ("multimodal/processing/processor.py", "BaseMultiModalProcessor._apply_hf_processor_main", "overridden"),
    ("multimodal/processing/processor.py", "BaseMultiModalProcessor._get_mm_fields_config", "a delta's kwargs"),
    ("multimodal/inputs.py", "MultiModalKwargsItems.from_hf_inputs", "a delta's kwargs"),
    ("multimodal/cache/base.py", "BaseMultiModalProcessorCache", "a delta's kwargs sent once, as items are"),
    # Chat turns: boundaries from the renderer, reuse through prefix-cache block keys.
    ("renderers/hf.py", "HfRenderer.render_messages", "wrapped: turn boundaries recorded"),
    ("renderers/hf.py", "HfRenderer.render_messages_async", "wrapped: turn boundaries recorded"),
    ("renderers/hf.py", "safe_apply_chat_template", "renders each turn's prefix"),
    ("v1/core/kv_cache_utils.py", "_gen_mm_extra_hash_keys", "block keys: a turn's items keep their hash"),
    # Request routing and the HTTP surface.
    ("entrypoints/generate/base/protocol.py", "validate_request_mm_kwargs", "wrapped: visual_keep exempted"),
    ("renderers/online_renderer.py", "OnlineRenderer.preprocess_chat", "wrapped: visual_keep routed"),
    ("renderers/online_renderer.py", "OnlineRenderer.preprocess_cmpl", "wrapped: visual_keep routed"),
    ("entrypoints/common/offline.py", "OfflineInferenceMixin._add_completion_requests", "wrapped"),
    ("entrypoints/common/offline.py", "OfflineInferenceMixin._add_chat_requests", "wrapped"),
    ("entrypoints/scale_out/token_in_token_out/serving.py", "ServingTokens.serve_tokens", "wrapped: contexts checked"),
    ("entrypoints/anthropic/serving.py", "AnthropicServingMessages._build_base_request", "wrapped: extras carried"),
    ("entrypoints/serve/middleware/register.py", "init_entrypoints_middleware", "wrapped: middlewares added"),
)


class Source:
    """vLLM's Python files from a directory holding `vllm/`, or read in place from a wheel."""

    def __init__(self, location: Path) -> None:
        self.location = Path(location)
        self._zip = zipfile.ZipFile(self.location) if self.location.is_file() else None

    def read(self, path: str) -> str | None:
        name = f"vllm/{path}"
        if self._zip is not None:
            try:
                return self._zip.read(name).decode("utf-8")
            except KeyError:
                return None
        file = self.location / name
        return file.read_text(encoding="utf-8") if file.exists() else None

    def version(self) -> str:
        text = self.read("_version.py") or ""
        found = re.search(r"""__version__\s*=\s*(?:version\s*=\s*)?['"]([^'"]+)['"]""", text)
        if found is None:
            raise ValueError(f"{self.location}: no vllm/_version.py with a __version__")
        return Version(found.group(1)).base_version


def _definition(tree: ast.Module, qualname: str) -> ast.AST | None:
    node: ast.AST = tree
    for part in qualname.split("."):
        body = getattr(node, "body", [])
        node = next((n for n in body if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                     and n.name == part), None)
        if node is None:
            return None
    return node


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint(source: Source, point: TouchPoint) -> list[str]:
    """[hash of the syntax tree, hash of the exact source] of the definition (of the whole file
    when it has no qualname), or ["missing", "missing"] when the file or definition is gone."""
    text = source.read(point.path)
    if text is None:
        return [MISSING, MISSING]
    tree = ast.parse(text)
    node = _definition(tree, point.qualname) if point.qualname else tree
    if node is None:
        return [MISSING, MISSING]
    segment = ast.get_source_segment(text, node, padded=True) if point.qualname else text
    return [_sha(ast.dump(node, include_attributes=False)), _sha(segment or "")]


def fingerprints(source: Source | Path, version: str | None = None) -> dict[str, list[str]]:
    """The fingerprints of the touch points that apply to `version` (default: the source's own)."""
    source = source if isinstance(source, Source) else Source(source)
    version = version or source.version()
    return {key: fingerprint(source, p) for key, p in TOUCH_POINTS.items() if p.applies_to(version)}


def recorded() -> dict[str, dict[str, list[str]]]:
    return json.loads(RECORD.read_text()) if RECORD.exists() else {}


@dataclass
class Comparison:
    """How a release's touch points differ from a recorded release's."""

    baseline: str
    total: int
    changed: list[str]  # the syntax tree differs
    gone: list[str]  # the file or definition no longer exists
    cosmetic: list[str]  # same tree: comments or layout only
    new: list[str]  # touch points of the release that the baseline's record does not have

    @property
    def differ(self) -> int:
        return len(self.changed) + len(self.gone) + len(self.cosmetic)


def compare(now: dict[str, list[str]], baseline: str, before: dict[str, list[str]]) -> Comparison:
    gone, changed, cosmetic = [], [], []
    for key, (tree, text) in before.items():
        new_tree, new_text = now.get(key, (MISSING, MISSING))
        if new_tree == MISSING:
            gone.append(key)
        elif new_tree != tree:
            changed.append(key)
        elif new_text != text:
            cosmetic.append(key)
    new = sorted(k for k, (tree, _) in now.items() if k not in before and tree != MISSING)
    return Comparison(baseline, len(before), changed, gone, cosmetic, new)


def installed_root() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("vLLM is not installed")
    return Path(next(iter(spec.submodule_search_locations))).parent


def _report(source: Source, version: str, now: dict[str, list[str]]) -> None:
    print(f"vLLM {version} ({source.location}) against the recorded releases:")
    for baseline, before in sorted(recorded().items(), key=lambda kv: Version(kv[0])):
        if baseline == version:
            continue
        result = compare(now, baseline, before)
        print(f"\n  against {baseline}: {result.differ} of {result.total} touch points differ "
              f"({len(result.changed)} changed, {len(result.gone)} gone, "
              f"{len(result.cosmetic)} in comments or layout only)")
        for label, keys in (("changed", result.changed), ("gone", result.gone), ("cosmetic", result.cosmetic),
                            ("new", result.new)):
            for key in keys:
                print(f"    {label:8s} {key}  ({TOUCH_POINTS[key].role})" if key in TOUCH_POINTS
                      else f"    {label:8s} {key}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pio_fvlm_vllm.vllm_touch_points", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, metavar="DIR_OR_WHEEL",
                        help="a directory holding vllm/, or a vLLM wheel (default: the installed vLLM)")
    parser.add_argument("--compare", type=Path, metavar="WHEEL_OR_DIR",
                        help="print which touch points this release changes against each recorded release")
    parser.add_argument("--record", metavar="VERSION", help=f"store --root's fingerprints in {RECORD.name}")
    args = parser.parse_args(argv)
    source = Source(args.compare or args.root or installed_root())
    version = args.record or source.version()
    now = fingerprints(source, version)
    if args.compare:
        _report(source, version, now)
        return 0
    if args.record:
        records = recorded()
        records[args.record] = now
        RECORD.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
    for key, (tree, _) in now.items():
        print(f"{tree}  {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
