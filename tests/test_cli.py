"""The `vllm` command line with the plugin installed."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pio_fvlm_vllm.plugin_guard import excluded_plugin_message


def _vllm() -> str:
    found = shutil.which("vllm", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("no vllm command next to this interpreter")
    return found


def test_vllm_plugins_leaving_the_plugin_out_is_named_at_the_command_line():
    env = {**os.environ, "VLLM_PLUGINS": "other"}
    result = subprocess.run([_vllm(), "serve", "some-model", "--plugin", "pio_fvlm"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "VLLM_PLUGINS='other' leaves it out" in result.stderr and "VLLM_PLUGINS=other,pio_fvlm" in result.stderr


@pytest.mark.parametrize("argv, env, names", [
    (["/x/vllm", "serve", "m", "--plugin", "pio_fvlm"], {"VLLM_PLUGINS": ""}, True),
    (["/x/vllm", "serve", "m", "--plugin=pio_fvlm"], {"VLLM_PLUGINS": "a,b"}, True),
    (["/x/vllm", "serve", "m", "--plugin", "pio_fvlm"], {"VLLM_PLUGINS": "a, pio_fvlm"}, False),
    (["/x/vllm", "serve", "m", "--plugin", "pio_fvlm"], {}, False),
    (["/x/vllm", "serve", "m"], {"VLLM_PLUGINS": ""}, False),  # stock vLLM on purpose
    (["python", "-m", "x", "--plugin", "pio_fvlm"], {"VLLM_PLUGINS": ""}, False),  # not the vllm command
])
def test_the_guard_acts_only_on_vllm_commands_naming_an_excluded_plugin(argv, env, names):
    assert (excluded_plugin_message(argv, env) is not None) == names


@pytest.mark.parametrize("version, supported", [
    ("0.32.0", True), ("0.32.0+cpu", True), ("0.32.3", True), ("0.33.0", True), ("0.34.0", True),
    ("0.34.2", True), ("0.31.2", False), ("0.35.0", False), ("0.35.0rc1", False),
])
def test_the_vllm_version_gate(version, supported):
    from pio_fvlm_vllm import unsupported_vllm

    message = unsupported_vllm(version)
    assert (message is None) == supported
    if message:
        assert version in message and "PIO_FVLM_ALLOW_UNSUPPORTED_VLLM=1" in message


def test_settings_command_prints_effective_values_and_their_sources(tmp_path):
    (tmp_path / "config.json").write_text('{"text_config": {"num_hidden_layers": 32}}')
    env = {**os.environ, "PIO_FVLM_SCORING": "official", "PIO_FVLM_NMS_INCLUSIVE": "false", "PIO_FVLM_VISUALKEEP": "1"}
    env.pop("PIO_FVLM_VISUAL_KEEP", None)
    result = subprocess.run([sys.executable, "-m", "pio_fvlm_vllm", "settings", "--model", str(tmp_path),
                             "--mm-processor-kwargs", '{"visual_keep": 0.25}'], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in result.stdout.splitlines()}
    # One column each: every source starts at the same offset.
    lines = result.stdout.splitlines()
    assert len({line.index(source) for line, (_, source) in zip(lines, rows.values())
                if source.startswith(("default", "PIO_FVLM_"))}) == 1
    assert rows["visual_keep"] == ["0.25", "--mm-processor-kwargs"]
    assert rows["nms_threshold"] == ["0.8", "PIO_FVLM_SCORING=official"]
    assert rows["nms_inclusive"] == ["False", "PIO_FVLM_NMS_INCLUSIVE"]
    assert rows["proxy_layer"][0] == "3" and "K for 32 decoder layers" in rows["proxy_layer"][1]
    assert "PIO_FVLM_VISUALKEEP is not a pio_fvlm setting" in result.stderr
    env["PIO_FVLM_PROXY_LAYER"] = "99"
    result = subprocess.run([sys.executable, "-m", "pio_fvlm_vllm", "settings", "--model", str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "PIO_FVLM_PROXY_LAYER" in result.stderr


def test_settings_command_shows_the_hand_off_after_layer_k_for_every_family(tmp_path):
    from pio_fvlm_vllm.__main__ import settings_table

    (tmp_path / "config.json").write_text(
        '{"architectures": ["Qwen2_5_VLForConditionalGeneration"], "num_hidden_layers": 28}')
    rows = {name: (value, source) for name, value, source in settings_table({}, str(tmp_path))}
    assert rows["handoff_layer"] == (2, "default (h for 28 decoder layers)")
    assert rows["proxy_layer"][0] == 2
    rows = {name: (value, source) for name, value, source in settings_table({"PIO_FVLM_HANDOFF_LAYER": "0"},
                                                                               str(tmp_path))}
    assert rows["handoff_layer"] == (0, "PIO_FVLM_HANDOFF_LAYER (h for 28 decoder layers, off)")
    (tmp_path / "config.json").write_text(
        '{"architectures": ["LlavaNextForConditionalGeneration"], "text_config": {"num_hidden_layers": 32}}')
    assert dict((n, v) for n, v, _ in settings_table({}, str(tmp_path)))["handoff_layer"] == 2
