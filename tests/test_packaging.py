"""The wheel an operator installs: built from this tree, installed into an empty virtual
environment, it registers the plugin and ships what the package reads at run time."""

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # The build backend (setuptools, from pyproject's build-system) is already in this
    # environment; without isolation the build needs no network.
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-w", str(out), "-q"], check=True)
    (built,) = out.glob("pio_fvlm_vllm-*.whl")
    return built


def test_the_wheel_holds_the_package_its_data_license_and_entry_point(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = z.read(meta).decode()
        entry_points = z.read(meta.replace("METADATA", "entry_points.txt")).decode()
    assert "pio_fvlm_vllm_dist_alias.pth" in names  # top level: site-packages runs it
    assert {"pio_fvlm_vllm/vllm_touch_points.json", "pio_fvlm_vllm/vllm_ext/families/llava.py",
            "pio_fvlm_vllm/vllm_ext/families/llava_next.py"} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in metadata
    assert 'Requires-Dist: flash-attn>=2.6; extra == "flash-attn"' in metadata
    assert "[vllm.general_plugins]\npio_fvlm = pio_fvlm_vllm:register" in entry_points
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def test_the_wheel_installs_and_registers_the_plugin_in_an_empty_environment(wheel, tmp_path):
    env = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env)
    python = env / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True)
    probe = (
        "import importlib.metadata as m, pathlib, sysconfig, pio_fvlm_vllm;"
        "(ep,) = m.entry_points(group='vllm.general_plugins', name='pio_fvlm');"
        "print(ep.value, pio_fvlm_vllm.__version__,"
        " (pathlib.Path(sysconfig.get_paths()['purelib']) / 'pio_fvlm_vllm_dist_alias.pth').exists())"
    )
    out = subprocess.run([python, "-c", probe], check=True, capture_output=True, text=True).stdout.split()
    assert out == ["pio_fvlm_vllm:register", "0.1.0", "True"]
