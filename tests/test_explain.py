"""The explain picture: its patch grids are the model's token layout, and the command draws
what the selection keeps."""

import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

from pio_fvlm_vllm.explain import PatchGrid, llava_next_grids
from pio_fvlm_vllm.images import synthetic_image


@pytest.mark.parametrize("size", [(640, 480), (300, 900), (1008, 336), (500, 500), (224, 224)])
def test_grids_lay_out_every_image_token_as_transformers_does(tiny_checkpoint, size):
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(tiny_checkpoint)
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    image = synthetic_image(*size)
    inputs = processor(text="<image>", images=[image], return_tensors="pt")
    n = int((inputs["input_ids"] == config.image_token_id).sum())
    base, tiles = llava_next_grids(config, (size[1], size[0]), n)
    assert base.num_tokens + tiles.num_tokens == n
    assert tiles.first_token == base.num_tokens == 576
    every = torch.arange(n)
    assert len(base.cells(every)) == 576 and len(tiles.cells(every)) == tiles.rows * tiles.cols
    # The unpadded tile grid keeps the image's aspect ratio (to within a row or column).
    assert abs(tiles.cols / tiles.rows - size[0] / size[1]) < 2 / min(tiles.rows, tiles.cols) * max(1, size[0] / size[1])


def test_cells_skip_row_newlines():
    grid = PatchGrid(first_token=10, rows=2, cols=3, newline=True)
    assert grid.cells(torch.tensor([0, 10, 13, 14, 17, 30])) == [(0, 0), (1, 0)]


def test_the_command_draws_the_kept_patches(tiny_checkpoint, tmp_path):
    synthetic_image(640, 480, seed=3).save(tmp_path / "img.png")
    out = tmp_path / "kept.png"
    result = subprocess.run([sys.executable, "-m", "pio_fvlm_vllm.explain", "--checkpoint", str(tiny_checkpoint),
                             "--image", str(tmp_path / "img.png"), "--question", "Which square is red?",
                             "--keep", "0.11", "--out", str(out)], capture_output=True, text=True, check=True)
    # budget(2340, 0.11) = 257, as the server's header reports for this image.
    assert result.stdout.startswith("kept 257 of 2340 image tokens")
    # Every kept token is accounted for: patches drawn plus newline tokens that cover none.
    counts = [int(n) for n in re.findall(r"(\d+) (?:base-view patches|tile patches|row-end newline)", result.stdout)]
    assert sum(counts) == 257, result.stdout
    picture = Image.open(out)
    assert picture.height == 480 + 24 and picture.width == 2 * 640 + 8
    bad = subprocess.run([sys.executable, "-m", "pio_fvlm_vllm.explain", "--checkpoint", str(tiny_checkpoint),
                          "--image", str(tmp_path / "img.png"), "--question", "q", "--keep", "1.5"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--keep must be a number in (0, 1]" in bad.stderr
