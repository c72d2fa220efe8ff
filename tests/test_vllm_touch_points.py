"""The vLLM code the plugin hooks into is the code it was checked against."""

import json

from packaging.version import Version

from pio_fvlm_vllm import SUPPORTED_VLLM, unsupported_vllm
from pio_fvlm_vllm.vllm_touch_points import RECORD, TOUCH_POINTS, fingerprints, installed_root

RECORDED = json.loads(RECORD.read_text())


def test_the_installed_vllm_matches_the_fingerprints_recorded_for_its_release():
    import vllm

    version = Version(vllm.__version__).base_version
    assert version in RECORDED, f"no fingerprints recorded for vLLM {version}"
    now = fingerprints(installed_root())
    changed = sorted(k for k in now if now[k] != RECORDED[version].get(k))
    assert not changed, f"vLLM {version} code the plugin hooks into differs from what was checked: {changed}"


def test_every_touch_point_exists_in_every_recorded_release():
    assert len(TOUCH_POINTS) == len(next(iter(RECORDED.values())))
    for version, prints in RECORDED.items():
        assert "missing" not in prints.values(), (version, [k for k, v in prints.items() if v == "missing"])


def test_the_version_gate_admits_exactly_the_releases_whose_touch_points_were_checked_equal():
    """0.33.0 changed four wrapped methods (inside their bodies): it stays outside the gate
    until it has run; a release joins the gate with its own record."""
    reference = RECORDED["0.32.0"]
    for version, prints in RECORDED.items():
        same = prints == reference
        assert (unsupported_vllm(version) is None) == same, (version, SUPPORTED_VLLM)
    assert sorted(k for k in RECORDED["0.33.0"] if RECORDED["0.33.0"][k] != reference[k]) == [
        "entrypoints/scale_out/token_in_token_out/serving.py:ServingTokens.serve_tokens",
        "renderers/hf.py:HfRenderer.render_messages",
        "renderers/hf.py:HfRenderer.render_messages_async",
        "renderers/online_renderer.py:OnlineRenderer.preprocess_chat",
    ]
