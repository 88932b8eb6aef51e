"""An image processor that does not make the tower's image size is refused when the tower loads, in one message
(it used to pass loading and fail as a shape assert at the first training step)."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from model import build_vlm
from visual.checkpoint import CheckpointError
from visual.clip_tower import CLIPVisionTower


@pytest.mark.parametrize("change,message", [
    ({"crop_size": 28}, "crops images to 28x28, but the tower (config.json image_size) takes 56x56"),
    ({"crop_size": {"height": 56, "width": 48}}, "crops images to 56x48"),
    ({"do_center_crop": False}, "has do_center_crop false"),
])
def test_a_crop_size_other_than_the_towers_fails_at_load(tiny_clip_dir, tiny_llm_dir, tmp_path, change, message):
    clip = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, clip)
    config = json.loads((clip / "preprocessor_config.json").read_text())
    (clip / "preprocessor_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=re.escape(message)):
        CLIPVisionTower.from_pretrained(clip)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        build_vlm(tiny_llm_dir, clip)


def test_the_official_layout_loads(tiny_clip_dir):
    tower = CLIPVisionTower.from_pretrained(tiny_clip_dir)
    assert tower.image_size == json.loads((tiny_clip_dir / "preprocessor_config.json").read_text())["crop_size"]
