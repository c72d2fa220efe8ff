"""The vLLM code the plugin hooks into is the code it was checked against, release by release."""

import zipfile

import pytest
from packaging.version import Version

from pio_fvlm_vllm import unsupported_vllm
from pio_fvlm_vllm.vllm_touch_points import (
    MISSING, TOUCH_POINTS, Source, TouchPoint, compare, fingerprint, fingerprints, installed_root, main, recorded,
)

pytestmark = pytest.mark.vllm_seams

RECORDED = recorded()

# What each release changes against 0.32.0, reviewed one by one (docs/vllm-releases.md says how
# each change leaves the plugin's use intact). A release joins the gate with its record and row.
REVIEWED_CHANGES = {
    "0.32.0": set(),
    "0.33.0": {
        "entrypoints/scale_out/token_in_token_out/serving.py:ServingTokens.serve_tokens",
        "renderers/hf.py:HfRenderer.render_messages",
        "renderers/hf.py:HfRenderer.render_messages_async",
        "renderers/online_renderer.py:OnlineRenderer.preprocess_chat",
        "model_executor/layers/quantization/base_config.py:QuantizeMethodBase",
        "v1/worker/gpu/buffer_utils.py:StagedWriteTensor.stage_write",
    },
    "0.34.0": {
        "entrypoints/anthropic/serving.py:AnthropicServingMessages._build_base_request",
        "entrypoints/scale_out/token_in_token_out/serving.py:ServingTokens.serve_tokens",
        "model_executor/layers/quantization/base_config.py:QuantizeMethodBase",
        "model_executor/model_loader/utils.py:process_weights_after_loading",
        "model_executor/models/qwen2.py:Qwen2DecoderLayer",
        "model_executor/models/qwen3_vl.py:",
        "multimodal/cache/base.py:BaseMultiModalProcessorCache",
        "renderers/hf.py:HfRenderer.render_messages",
        "renderers/hf.py:HfRenderer.render_messages_async",
        "renderers/online_renderer.py:OnlineRenderer.preprocess_chat",
        "v1/worker/gpu/buffer_utils.py:StagedWriteTensor.stage_write",
        "v1/worker/gpu/mm/rope.py:",
        "v1/worker/gpu/model_states/default.py:DefaultModelState.add_request",
    },
}
V1_RUNNER = {key for key, point in TOUCH_POINTS.items() if point.releases == "<0.34"}


def test_the_installed_vllm_matches_the_fingerprints_recorded_for_its_release():
    import vllm

    version = Version(vllm.__version__).base_version
    assert version in RECORDED, f"no fingerprints recorded for vLLM {version}"
    now = fingerprints(installed_root(), version)
    changed = sorted(k for k in now if now[k][0] != RECORDED[version][k][0])
    assert not changed, f"vLLM {version} code the plugin hooks into differs from what was checked: {changed}"


def test_every_release_records_exactly_its_touch_points_and_all_exist():
    for version, prints in RECORDED.items():
        assert set(prints) == {k for k, p in TOUCH_POINTS.items() if p.applies_to(version)}, version
        assert not [k for k, v in prints.items() if MISSING in v], version


def test_the_version_gate_admits_exactly_the_reviewed_releases():
    assert set(RECORDED) == set(REVIEWED_CHANGES)
    for version, prints in RECORDED.items():
        assert unsupported_vllm(version) is None, version
        result = compare(prints, "0.32.0", RECORDED["0.32.0"])
        assert set(result.changed) == REVIEWED_CHANGES[version], (version, result.changed)
        assert set(result.gone) == (V1_RUNNER if Version(version) >= Version("0.34") else set()), version
    assert unsupported_vllm("0.35.0") is not None and unsupported_vllm("0.31.0") is not None


def test_a_syntax_tree_fingerprint_ignores_comments_and_layout_but_not_code(tmp_path):
    def prints(body: str) -> list[str]:
        (tmp_path / "vllm" / "m.py").write_text(body)
        return fingerprint(Source(tmp_path), TouchPoint("m.py", "f", "a test function"))

    (tmp_path / "vllm").mkdir()
    base = prints("def f(x):\n    return x + 1\n")
    commented = prints("def f(x):  # noqa: E501\n    return (x +\n            1)\n")
    changed = prints("def f(x):\n    return x + 2\n")
    assert base[0] == commented[0] and base[1] != commented[1]
    assert changed[0] != base[0]
    assert prints("def g(x):\n    return x\n") == [MISSING, MISSING]


def test_compare_reads_a_wheel_in_place_and_names_each_kind_of_change(tmp_path, capsys):
    """A release's wheel, compared against the records: what changed, what is gone, what only
    moved comments, and the touch points only the new release has."""
    root = installed_root()
    wheel = tmp_path / "vllm-9.0.0-py3-none-any.whl"
    edited = "renderers/hf.py"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("vllm/_version.py", "__version__ = version = '9.0.0'\n")
        for point in {p.path for p in TOUCH_POINTS.values()}:
            file = root / "vllm" / point
            if file.exists() and not point.startswith(("v1/worker/cpu_model_runner.py", "v1/worker/cpu/")):
                text = file.read_text()
                if point == edited:
                    text = text.replace("def safe_apply_chat_template(", "def safe_apply_chat_template(\n")
                    text = text.replace("async def render_messages_async(", "async def render_messages_async(_z, ")
                z.writestr(f"vllm/{point}", text)
        z.writestr("vllm/v1/worker/cpu/rope.py", "class RopeState:\n    pass\n")
    assert Source(wheel).version() == "9.0.0"
    assert main(["--compare", str(wheel)]) == 0
    out = capsys.readouterr().out
    block = out.split("against 0.32.0:")[1].split("against")[0]
    assert "changed  renderers/hf.py:HfRenderer.render_messages_async" in block
    assert "cosmetic renderers/hf.py:safe_apply_chat_template" in block
    assert "gone     v1/worker/cpu_model_runner.py:CPUModelRunner.load_model" in block
    assert "new      v1/worker/cpu/rope.py:RopeState" in block
    assert "cpu/mm_pruning.py" not in block  # expected from 0.34 on, absent here: not "new"
