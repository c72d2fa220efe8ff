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
    ("0.32.0", True), ("0.32.0+cpu", True), ("0.32.3", True), ("0.33.0", False), ("0.31.2", False),
    ("0.33.0rc1", False),
])
def test_the_vllm_version_gate(version, supported):
    from pio_fvlm_vllm import unsupported_vllm

    message = unsupported_vllm(version)
    assert (message is None) == supported
    if message:
        assert version in message and "PIO_FVLM_ALLOW_UNSUPPORTED_VLLM=1" in message
