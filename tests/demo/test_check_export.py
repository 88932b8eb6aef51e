"""demo.check_export: infer.py on a bundle and stock transformers on its `--format llava` export give the same
answers (each in its own process; the stock one imports nothing of this repository)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from demo.check_export import main as check_export
from model.export import main as export_main


@pytest.fixture(scope="module")
def exported(tiny_bundle_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("check_export") / "llava"
    assert export_main(["--checkpoint", str(tiny_bundle_dir), "--output", str(out), "--format", "llava",
                        "--dtype", "fp32"]) == 0
    return out


def test_answers_of_infer_and_of_the_export_are_identical(tiny_bundle_dir, exported, tmp_path, capfd):
    images = []
    for seed, size in ((0, (70, 50)), (1, (40, 90))):
        pixels = np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)
        images.append(tmp_path / f"image{seed}.png")
        Image.fromarray(pixels).save(images[-1])
    code = check_export(["--checkpoint", str(tiny_bundle_dir), "--export", str(exported), "--image", str(images[0]),
                         "--image", str(images[1]), "--prompt", "What colour is the shape?", "--prompt", "图形是什么颜色？",
                         "--max-new-tokens", "6"])
    out = capfd.readouterr().out
    assert code == 0, out
    assert "identical answers: 4 of 4" in out and out.count("[same]") == 4
    answers = [line.split(": ", 1)[1] for line in out.splitlines() if line.strip().startswith("infer.py:")]
    assert len(answers) == 4 and all(answer != "''" for answer in answers)  # something was generated


def test_bad_input_is_one_line_and_status_2(tiny_bundle_dir, tmp_path, capfd):
    image = tmp_path / "image.png"
    Image.new("RGB", (20, 20)).save(image)
    cases = [
        (["--export", str(tiny_bundle_dir), "--image", str(image)], "is not a `python -m model.export --format llava`"),
        (["--export", str(tiny_bundle_dir), "--image", str(tmp_path / "missing.png")], "not found: "),
    ]
    for extra, message in cases:
        code = check_export(["--checkpoint", str(tiny_bundle_dir), "--prompt", "x", *extra])
        err = capfd.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("check_export: error: ") and message in err, err
