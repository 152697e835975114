"""tools.profile: the in-process stage split that `make bench` prints above each model's table."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFile

from tests.conftest import RGB_HANDLER, image_project
from tools.profile import profile_archive

DECODE_S = 0.02


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="a batch's images are decoded side by side only with 2 or more cores")
def test_images_decoded_side_by_side_count_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch whose 8 images are decoded on 2 threads: its decode stage is the batch's wall time, so the stages add
    up to no more than the batch, and "handler other" is never negative (summing the threads' times made it so)."""
    threads = torch.get_num_threads()
    project = image_project(tmp_path, 3, {**RGB_HANDLER, "torch_threads": 2}, [2, 3, 32, 32], ("classes.txt", "a\nb\nc\nd\n"))
    load = ImageFile.ImageFile.load

    def slow_load(self: ImageFile.ImageFile):  # a decoder that sleeps releases the GIL, as Pillow's C decoders do
        time.sleep(DECODE_S)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", slow_load)
    png = io.BytesIO()
    Image.new("RGB", (48, 40), (200, 30, 90)).save(png, format="PNG")
    try:
        (one, eight) = profile_archive(project.archive, png.getvalue(), "image/png", batches=(1, 8), seconds=0.5)
    finally:
        torch.set_num_threads(threads)
    single = one.stages_us["decode"]
    assert single >= DECODE_S * 1e6
    # 8 images on 2 threads take ~4 images' wall time, not 8
    assert 3 * single <= eight.stages_us["decode"] < 6 * single
    for profile in (one, eight):
        assert profile.stages_us["handler other"] >= 0
        assert sum(profile.stages_us.values()) <= profile.predict_us
